"""tools/infer.py and tools/plot_metrics.py: outputs users can load, clear errors on bad inputs."""
import json
import logging
import os
import shutil
import subprocess
import sys

import models  # noqa: F401  (detectron2 compatibility first)
import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from PIL import Image
from pycocotools.coco import COCO

from models.config import load_config
from models.data.synthetic_shapes import SHAPE_CLASSES, ensure_shapes
from tools import infer, plot_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small Mask R-CNN (ResNet-18 FPN, 32 channels) from detectron2's model zoo pieces.
TINY_CONFIG = '''
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.modeling.backbone import ResNet
from omegaconf import OmegaConf

width = 32
model = get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="FrozenBN")
model.backbone.out_channels = width
model.proposal_generator.head.in_channels = width
model.proposal_generator.post_nms_topk = (100, 50)
model.roi_heads.box_head.input_shape = ShapeSpec(channels=width, height=7, width=7)
model.roi_heads.box_head.fc_dims = [64]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=64)
model.roi_heads.box_predictor.test_topk_per_image = 5
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=width, width=14, height=14)
model.roi_heads.mask_head.conv_dims = [width]
model.roi_heads.num_classes = 80  # the checkpoint's 5 win
dataloader = OmegaConf.create()
dataloader.test = dict(mapper=dict(augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=160)]))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config file, random-weights checkpoint with 5 classes, {split: (json, image_root)})."""
    root = tmp_path_factory.mktemp("tools")
    config_file = root / "tiny_r18.py"
    config_file.write_text(TINY_CONFIG)
    cfg = load_config(str(config_file))
    cfg.model.roi_heads.num_classes = len(SHAPE_CLASSES)
    torch.manual_seed(0)
    checkpoint = root / "model.pth"
    torch.save({"model": instantiate(cfg.model).state_dict()}, checkpoint)
    return str(config_file), str(checkpoint), ensure_shapes(str(root / "shapes"), 1, 2, seed=0)


def _exit_message(argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        infer.main(argv)
    assert isinstance(exit_info.value.code, str)  # sys.exit(message): status 1, message on stderr
    return exit_info.value.code


def test_infer_draws_every_image_and_writes_loadable_results(setup, tmp_path):
    config_file, checkpoint, paths = setup
    gt_json, image_root = paths["val"]
    out = tmp_path / "out"
    infer.main([image_root, "--config-file", config_file, "--checkpoint", checkpoint, "--output", str(out),
                "--score-threshold", "0", "--coco-json", gt_json, "--device", "cpu"])
    gt = COCO(gt_json)
    for image in gt.loadImgs(gt.getImgIds()):
        with Image.open(out / image["file_name"]) as drawing:  # upscaled to a readable size
            assert min(drawing.size) >= 512 and drawing.size[0] * image["height"] == drawing.size[1] * image["width"]
    results = json.loads((out / "results.json").read_text())
    assert 0 < len(results) <= 5 * len(gt.getImgIds())
    detections = gt.loadRes(str(out / "results.json"))
    for result in detections.loadAnns(detections.getAnnIds()):
        image = gt.imgs[result["image_id"]]
        assert result["category_id"] in gt.getCatIds() and result["file_name"] == image["file_name"]
        assert result["segmentation"]["size"] == [image["height"], image["width"]] and len(result["bbox"]) == 4
    listed = json.loads((out / "images.json").read_text())
    assert [c["name"] for c in listed["categories"]] == list(SHAPE_CLASSES)



def test_infer_matches_ground_truth_images_of_one_name_by_their_folders(setup, tmp_path):
    """Ground truth a/x.png (id 100) and b/x.png (id 101): each input is credited to the image of
    its own folder, and results and images.json name the ground truth's file_name."""
    config_file, checkpoint, paths = setup
    gt_json, image_root = paths["val"]
    sources = [os.path.join(image_root, name) for name in sorted(os.listdir(image_root))]
    data = tmp_path / "data"
    for folder, source in zip("ab", sources):
        (data / folder).mkdir(parents=True)
        shutil.copy(source, data / folder / "x.png")
    with open(gt_json) as f:
        categories = json.load(f)["categories"]
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"images": [{"id": 100, "file_name": "a/x.png", "height": 1, "width": 1},
                                          {"id": 101, "file_name": "b/x.png", "height": 1, "width": 1}],
                               "annotations": [], "categories": categories}))
    inputs = [str(data / "a" / "x.png"), str(data / "b" / "x.png")]
    assert infer.ground_truth_ids(inputs[::-1], str(two))[0] == [101, 100]
    out = tmp_path / "out"
    infer.main([*inputs, "--config-file", config_file, "--checkpoint", checkpoint, "--output", str(out),
                "--score-threshold", "0", "--coco-json", str(two)])
    images = json.loads((out / "images.json").read_text())["images"]
    assert [(i["id"], i["file_name"]) for i in images] == [(100, "a/x.png"), (101, "b/x.png")]
    results = json.loads((out / "results.json").read_text())
    assert results and all(r["file_name"] == {100: "a/x.png", 101: "b/x.png"}[r["image_id"]] for r in results)
    # An input whose folders fit neither, and two inputs that are one ground-truth image: refused.
    (data / "c").mkdir()
    shutil.copy(sources[0], data / "c" / "x.png")
    with pytest.raises(infer.InferenceError) as error:
        infer.ground_truth_ids([str(data / "c" / "x.png")], str(two))
    assert str(error.value) == (f"{data / 'c' / 'x.png'} fits 2 images of {two} equally well (a/x.png, b/x.png); "
                                "give it by a path whose folders tell them apart")
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"images": [{"id": 7, "file_name": "x.png"}], "categories": categories}))
    with pytest.raises(infer.InferenceError) as error:
        infer.ground_truth_ids(inputs, str(one))
    assert str(error.value) == f"{inputs[0]} and {inputs[1]} are both image 7 (x.png) of {one}; give each image once"
    # A linked folder is matched by what it links to; Windows file_names by their folders too.
    (tmp_path / "linked").symlink_to(data / "b")
    assert infer.ground_truth_ids([str(tmp_path / "linked" / "x.png")], str(two))[0] == [101]
    backslashed = tmp_path / "backslashed.json"
    backslashed.write_text(two.read_text().replace("a/x.png", "a\\\\x.png").replace("b/x.png", "b\\\\x.png"))
    assert infer.ground_truth_ids(inputs[::-1], str(backslashed))[0] == [101, 100]


def test_infer_without_ground_truth_numbers_images_in_order(setup, tmp_path):
    config_file, checkpoint, paths = setup
    image_root = paths["val"][1]
    out = tmp_path / "out"
    infer.main([os.path.join(image_root, "*.png"), "--config-file", config_file, "--checkpoint", checkpoint,
                "--output", str(out), "--score-threshold", "0"])
    images = json.loads((out / "images.json").read_text())["images"]
    assert [i["id"] for i in images] == [1, 2] and [i["file_name"] for i in images] == sorted(os.listdir(image_root))
    assert {r["image_id"] for r in json.loads((out / "results.json").read_text())} <= {1, 2}
    assert [i["drawing"] for i in images] == [n.replace(".png", "") + ".png" for n in sorted(os.listdir(image_root))]
    # A rerun into the same folder with one image leaves its drawing only, and the user's files.
    (out / "notes.png").write_bytes(b"")
    first = sorted(os.listdir(image_root))[0]
    infer.main([os.path.join(image_root, first), "--config-file", config_file, "--checkpoint", checkpoint,
                "--output", str(out), "--score-threshold", "0"])
    assert sorted(os.listdir(out)) == sorted(["images.json", "results.json", "notes.png", first])


def test_infer_without_ground_truth_names_the_classes_and_category_ids_the_checkpoint_was_trained_on(setup,
                                                                                                    tmp_path):
    """A checkpoint of this project keeps its training set's class names and json category ids
    (COCO's run 1..90 with gaps): results name those, not 1..N."""
    config_file, checkpoint, paths = setup
    state = torch.load(checkpoint, weights_only=True)
    names, ids = [f"shape{i}" for i in range(len(SHAPE_CLASSES))], [3, 7, 11, 20, 90][:len(SHAPE_CLASSES)]
    state["config"] = {"classes": repr(names), "category_ids": repr(ids)}
    torch.save(state, tmp_path / "trained.pth")
    out = tmp_path / "out"
    infer.main([paths["val"][1], "--config-file", config_file, "--checkpoint", str(tmp_path / "trained.pth"),
                "--output", str(out), "--score-threshold", "0"])
    categories = json.loads((out / "images.json").read_text())["categories"]
    assert categories == [{"id": i, "name": n} for i, n in zip(ids, names)]
    results = json.loads((out / "results.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(ids)


def test_infer_into_the_images_own_folder_never_draws_over_an_image(setup, tmp_path):
    """``infer.py photos --output photos``, twice: the PNG inputs keep their bytes, the drawings are
    numbered beside them, and the rerun neither reads nor keeps the first run's drawings."""
    config_file, checkpoint, paths = setup
    photos = tmp_path / "photos"
    shutil.copytree(paths["val"][1], photos)
    originals = {p.name: p.read_bytes() for p in photos.iterdir()}
    stems = sorted(name[:-len(".png")] for name in originals)
    for _ in range(2):
        infer.main([str(photos), "--config-file", config_file, "--checkpoint", checkpoint, "--output", str(photos),
                    "--score-threshold", "0"])
        images = json.loads((photos / "images.json").read_text())["images"]
        assert [i["file_name"] for i in images] == [f"{stem}.png" for stem in stems]
        assert [i["drawing"] for i in images] == [f"{stem}_2.png" for stem in stems]
        assert sorted(p.name for p in photos.iterdir()) == sorted(
            [*originals, *(f"{stem}_2.png" for stem in stems), "images.json", "results.json"])
        assert {name: (photos / name).read_bytes() for name in originals} == originals
    # Naming only the drawings of that run is an error, and deletes nothing.
    message = _exit_message([str(photos / f"{stems[0]}_2.png"), "--config-file", config_file, "--checkpoint",
                             checkpoint, "--output", str(photos)])
    assert message == f"infer.py: error: the only images given are the drawings of an earlier run into {photos}"
    assert (photos / f"{stems[0]}_2.png").is_file()


def test_infer_never_overwrites_or_deletes_a_file_it_did_not_write(setup, tmp_path):
    """A user's photo_2.png beside photo.png, a drawing the user replaced, a results.json of the
    user's, a rerun that fails at its first image: every such file keeps its bytes."""
    config_file, checkpoint, paths = setup
    photos = tmp_path / "photos"
    photos.mkdir()
    source = sorted(p for p in os.listdir(paths["val"][1]))[0]
    shutil.copy(os.path.join(paths["val"][1], source), photos / "photo.png")
    (photos / "photo_2.png").write_bytes(b"the user's own picture")
    args = ["--config-file", config_file, "--checkpoint", checkpoint, "--output", str(photos)]

    def drawings():
        return [image["drawing"] for image in json.loads((photos / "images.json").read_text())["images"]]

    infer.main([str(photos / "photo.png"), *args])
    assert drawings() == ["photo_3.png"] and (photos / "photo_2.png").read_bytes() == b"the user's own picture"
    infer.main([str(photos / "photo.png"), *args])  # a rerun redraws its own picture
    assert drawings() == ["photo_3.png"]
    (photos / "photo_3.png").write_bytes(b"the user's picture in place of the drawing")
    infer.main([str(photos / "photo.png"), *args])
    assert drawings() == ["photo_4.png"]
    assert (photos / "photo_3.png").read_bytes() == b"the user's picture in place of the drawing"

    # A rerun that stops at its first image leaves the earlier run's files as they were.
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    thin = tmp_path / "thin.png"
    Image.fromarray(np.full((1, 2000, 3), 128, np.uint8)).save(thin)
    assert _exit_message([str(thin), *args]).startswith(f"infer.py: error: cannot process image {thin}")
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before

    # A results.json that this tool did not write, and a file given as the output folder.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("my results")
    message = _exit_message([str(photos / "photo.png"), *args[:-1], str(mine)])
    foreign = (f"infer.py: error: --output {mine} holds a results.json that is not the one an earlier infer.py run "
               "wrote there (written by someone else, or changed since); choose another --output or move the file")
    assert message == foreign
    assert sorted(os.listdir(mine)) == ["results.json"] and (mine / "results.json").read_text() == "my results"
    shutil.copy(photos / "images.json", mine)  # another run's images.json does not vouch for this results.json
    assert _exit_message([str(photos / "photo.png"), *args[:-1], str(mine)]) == foreign
    assert (mine / "results.json").read_text() == "my results"
    # results.json edited by hand after a run, or replaced by a link: refused, kept
    (photos / "results.json").write_text("[]")
    assert _exit_message([str(photos / "photo.png"), *args]) == foreign.replace(str(mine), str(photos))
    os.remove(photos / "results.json")
    os.symlink(mine / "results.json", photos / "results.json")
    assert _exit_message([str(photos / "photo.png"), *args]) == (
        f"infer.py: error: --output {photos}: its results.json is a link, which infer.py does not write through; "
        "choose another --output or move the link")
    assert (mine / "results.json").read_text() == "my results"
    message = _exit_message([str(photos / "photo.png"), *args[:-1], str(mine / "results.json")])
    assert message == f"infer.py: error: --output {mine / 'results.json'} is a file; it takes a folder"


def test_infer_never_writes_through_a_link_in_the_output_folder(setup, tmp_path):
    config_file, checkpoint, paths = setup
    source = os.path.join(paths["val"][1], sorted(os.listdir(paths["val"][1]))[0])
    stem = os.path.splitext(os.path.basename(source))[0]
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "precious.png").write_bytes(b"precious")
    os.symlink(tmp_path / "nowhere.png", out / f"{stem}.png")  # dangling: a write would create nowhere.png
    os.symlink(tmp_path / "precious.png", out / f"{stem}_2.png")
    infer.main([source, "--config-file", config_file, "--checkpoint", checkpoint, "--output", str(out)])
    images = json.loads((out / "images.json").read_text())["images"]
    assert [image["drawing"] for image in images] == [f"{stem}_3.png"]
    assert not (tmp_path / "nowhere.png").exists() and (tmp_path / "precious.png").read_bytes() == b"precious"


def test_infer_missing_files_are_named(setup, tmp_path):
    config_file, checkpoint, paths = setup
    image_root = paths["val"][1]
    missing = str(tmp_path / "nope.pth")
    message = _exit_message([image_root, "--config-file", config_file, "--checkpoint", missing])
    assert missing in message and "--checkpoint" in message
    missing_config = str(tmp_path / "nope.py")
    assert missing_config in _exit_message([image_root, "--config-file", missing_config, "--checkpoint", checkpoint])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in _exit_message([str(empty), "--config-file", config_file, "--checkpoint", checkpoint])
    pattern = str(tmp_path / "*.jpg")
    assert pattern in _exit_message([pattern, "--config-file", config_file, "--checkpoint", checkpoint])


def test_infer_names_bad_model_values_other_architectures_and_bad_files(setup, tmp_path):
    config_file, checkpoint, paths = setup
    image = os.path.join(paths["val"][1], sorted(os.listdir(paths["val"][1]))[0])
    tiny_mimdet = os.path.join(REPO, "configs", "test", "tiny_mimdet.py")
    out = ["--output", str(tmp_path / "o")]
    message = _exit_message([image, "--config-file", tiny_mimdet, "--checkpoint", checkpoint, *out,
                             "--opts", "model.backbone.bottom_up.sample_ratio=0"])
    assert message == (f"infer.py: error: {tiny_mimdet} with --opts model.backbone.bottom_up.sample_ratio=0: "
                       "model.backbone.bottom_up.sample_ratio must be a number in (0, 1], got 0")
    message = _exit_message([image, "--config-file", config_file, "--checkpoint", checkpoint, *out,
                             "--opts", "model.roi_heads.foo=1"])
    assert message.startswith(
        f"infer.py: error: {config_file} with --opts model.roi_heads.foo=1: model.roi_heads.foo: ")
    assert "unexpected keyword argument 'foo'" in message
    message = _exit_message([image, "--config-file", tiny_mimdet, "--checkpoint", checkpoint, *out])
    assert message.startswith(f"infer.py: error: --checkpoint {checkpoint} does not fit {tiny_mimdet}: checkpoint "
                              "is for another architecture")
    notes = tmp_path / "notes.txt"
    notes.write_text("not json")
    message = _exit_message([image, "--config-file", config_file, "--checkpoint", checkpoint, *out,
                             "--coco-json", str(notes)])
    assert message.startswith(f"infer.py: error: --coco-json {notes} is not a COCO annotation file")
    for size in ("-5", "6000"):
        message = _exit_message([image, "--config-file", config_file, "--checkpoint", checkpoint, *out,
                                 "--draw-min-size", size])
        assert message == f"infer.py: error: --draw-min-size must be in [0, 2048] (pixels), got {size}"
    assert not (tmp_path / "o").exists()  # nothing written by a run refused


def test_infer_unreadable_image_is_named_or_skipped(setup, tmp_path):
    config_file, checkpoint, paths = setup
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    good = os.path.join(paths["val"][1], sorted(os.listdir(paths["val"][1]))[0])
    args = [good, str(broken), "--config-file", config_file, "--checkpoint", checkpoint,
            "--output", str(tmp_path / "o")]
    assert str(broken) in _exit_message(args)
    infer.main(args + ["--skip-unreadable", "--score-threshold", "0"])
    assert sorted(os.listdir(tmp_path / "o")) == ["images.json", "results.json", os.path.basename(good)]


def test_infer_cli_exits_nonzero_with_message(tmp_path):
    missing = str(tmp_path / "model.pth")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "infer.py"), str(image), "--config-file",
                           os.path.join(REPO, "tools", "infer.py"), "--checkpoint", missing],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and missing in done.stderr
    for checkpoint, why in ((tmp_path, "a folder, not a file"), (image, "neither a zip archive")):
        message = _exit_message([str(image), "--config-file", os.path.join(REPO, "configs/test/tiny_mimdet.py"),
                                 "--checkpoint", str(checkpoint)])
        assert message.startswith("infer.py: error: --checkpoint") and why in message


def _write_metrics(path, with_ap: bool = True, with_loss: bool = True) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for iteration in range(0, 200, 5):
            record = {"iteration": iteration, "lr": 1e-4 * min(1.0, iteration / 40), "time": 0.1}
            if with_loss:
                record.update(total_loss=2 * np.exp(-iteration / 80) + 0.2 * rng.random(),
                              loss_cls=np.exp(-iteration / 80), loss_mask=0.5 + 0.1 * rng.random())
            f.write(json.dumps(record) + "\n")
            if with_ap and iteration % 100 == 95:
                f.write(json.dumps({"iteration": iteration, "bbox/AP": iteration / 4, "segm/AP": iteration / 5}) + "\n")
        f.write('{"iteration": 200, "total_')  # a run killed mid-line


@pytest.mark.parametrize("with_ap", [True, False])
def test_plot_metrics_draws_losses_and_aps(tmp_path, with_ap):
    metrics = tmp_path / "metrics.json"
    _write_metrics(metrics, with_ap=with_ap)
    out = tmp_path / "plots" / "curve.png"
    plot_metrics.main([str(metrics), "--out", str(out), "--smooth", "5"])
    assert out.stat().st_size > 20_000
    with Image.open(out) as image:
        width, height = image.size
        assert width == 900 and height == (800 if with_ap else 450)
        assert len(np.unique(np.asarray(image.convert("L")))) > 20  # curves, not a blank canvas


def test_plot_metrics_smooth_and_series():
    assert np.allclose(plot_metrics.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])
    # A NaN record is a gap at its own point; every other window averages its other records.
    values = np.arange(33, dtype=float)
    values[2] = np.nan
    smoothed = plot_metrics.smooth(values, 5)
    assert np.isnan(smoothed).tolist() == [i == 2 for i in range(33)]
    expected = [np.nanmean(values[max(0, i - 4):i + 1]) for i in range(33)]
    assert np.allclose(np.delete(smoothed, 2), np.delete(expected, 2))
    assert np.isnan(plot_metrics.smooth(np.array([1.0, np.inf]), 1)).tolist() == [False, True]
    # A spike leaves the later windows as they are, and values near the float limit do not overflow.
    spiked = plot_metrics.smooth(np.array([1e20, 1.0, 2.0, 3.0, 4.0]), 2)
    assert spiked[3:].tolist() == [2.5, 3.5]
    assert plot_metrics.smooth(np.array([1e308, 1e308, 1e308]), 2).tolist() == [1e308, 1e308, 1e308]
    series = plot_metrics._series([{"iteration": 2, "loss_a": 1.0}, {"iteration": 1, "loss_a": 3.0},
                                   {"iteration": 2, "loss_a": 0.5}], plot_metrics._is_loss)
    assert series["loss_a"][0].tolist() == [1, 2] and series["loss_a"][1].tolist() == [3.0, 0.5]


def test_plot_metrics_bad_inputs_are_named(tmp_path, capsys):
    missing = str(tmp_path / "missing.json")
    with pytest.raises(SystemExit) as exit_info:
        plot_metrics.main([missing])
    assert missing in str(exit_info.value.code)
    no_loss = tmp_path / "metrics.json"
    _write_metrics(no_loss, with_loss=False)
    with pytest.raises(ValueError, match="no loss entries"):
        plot_metrics.plot_metrics(str(no_loss), str(tmp_path / "x.png"))
    with pytest.raises(SystemExit):
        plot_metrics.main([str(no_loss), "--smooth", "0"])
    assert "--smooth is a number of records to average, at least 1 (no smoothing), got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder; name the picture"):
        plot_metrics.picture_path(str(tmp_path))
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"weights")
    below = str(checkpoint / "plots" / "x.png")
    (tmp_path / "run").mkdir()
    _write_metrics(tmp_path / "run" / "metrics.json")
    with pytest.raises(SystemExit) as exit_info:  # not os.makedirs' traceback after the drawing
        plot_metrics.main([str(tmp_path / "run"), "--out", below])
    assert exit_info.value.code == (f"plot_metrics.py: error: {below}: {checkpoint} is a file, not a folder, so no "
                                    "picture can be written below it")
    with pytest.raises(ValueError, match=f"{checkpoint} is a file, not a folder"):
        plot_metrics.picture_path(str(checkpoint / "x.png"))
    # A dangling link or a name too long for the file system: one line, not a traceback.
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    for out in (str(tmp_path / "gone" / "x.png"), str(tmp_path / ("x" * 300 + ".png"))):
        with pytest.raises(SystemExit) as exit_info:
            plot_metrics.main([str(tmp_path / "run"), "--out", out])
        assert str(exit_info.value.code).startswith("plot_metrics.py: error: ")


def test_plot_metrics_skips_records_without_a_whole_iteration(tmp_path, caplog):
    metrics = tmp_path / "metrics.json"
    lines = [{"iteration": i, "total_loss": 1.0 / (i + 1)} for i in range(3)]
    lines[1]["iteration"] = None
    metrics.write_text("\n".join(json.dumps(line) for line in lines + [{"iteration": 2.5, "total_loss": 1}]))
    with caplog.at_level(logging.WARNING, logger="mimdet.plot_metrics"):
        records = plot_metrics.read_metrics(str(metrics))
    assert [r["iteration"] for r in records] == [0, 2]
    assert "metrics.json:2: iteration None is not a whole number; skipped" in caplog.text
    plot_metrics.plot_metrics(str(metrics), str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 0


def test_plot_metrics_takes_a_run_folder_and_names_the_file_it_wrote(tmp_path, capsys):
    _write_metrics(tmp_path / "metrics.json")
    plot_metrics.main([str(tmp_path), "--out", str(tmp_path / "curves")])  # matplotlib adds .png
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curves.png'}"
    assert (tmp_path / "curves.png").is_file() and not (tmp_path / "curves").exists()


def test_infer_with_a_mimdet_config_sees_every_token_and_repeats_exactly(setup, tmp_path, caplog):
    """The COCO configs train at sample ratio 0.5; inference uses 1.0 unless told otherwise."""
    _, _, paths = setup
    cfg = load_config(os.path.join(REPO, "configs/test/tiny_mimdet.py"))
    cfg.model.roi_heads.num_classes = len(SHAPE_CLASSES)
    torch.manual_seed(0)
    checkpoint = tmp_path / "mimdet.pth"
    torch.save({"model": instantiate(cfg.model).state_dict()}, checkpoint)
    image_root = paths["val"][1]
    results = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        with caplog.at_level(logging.INFO):
            infer.main([image_root, "--config-file", os.path.join(REPO, "configs/test/tiny_mimdet.py"),
                        "--checkpoint", str(checkpoint), "--output", str(out), "--score-threshold", "0"])
        results.append((out / "results.json").read_text())
    assert "The ViT sees 1.0 of the image tokens (the config's eval_sample_ratio)" in caplog.text
    # --opts reaches the backbone like --sample-ratio: a random half of the tokens.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        infer.main([image_root, "--config-file", os.path.join(REPO, "configs/test/tiny_mimdet.py"),
                    "--checkpoint", str(checkpoint), "--output", str(tmp_path / "half"), "--score-threshold", "0",
                    "--opts", "model.backbone.bottom_up.eval_sample_ratio=0.5"])
    assert "The ViT sees 0.5 of the image tokens (the config's eval_sample_ratio)" in caplog.text
    assert len(json.loads(results[0])) > 0 and results[0] == results[1]
    message = _exit_message([image_root, "--config-file", os.path.join(REPO, "configs/test/tiny_mimdet.py"),
                             "--checkpoint", str(checkpoint), "--sample-ratio", "1.5"])
    assert "--sample-ratio must be in (0, 1], got 1.5" in message
    for threshold in ("nan", "2", "-0.1"):
        message = _exit_message([image_root, "--config-file", os.path.join(REPO, "configs/test/tiny_mimdet.py"),
                                 "--checkpoint", str(checkpoint), "--score-threshold", threshold])
        assert f"--score-threshold must be in [0, 1] (scores are probabilities), got {float(threshold)}" in message
    message = _exit_message([image_root, "--config-file", os.path.join(REPO, "configs/test/tiny_mimdet.py"),
                             "--checkpoint", str(checkpoint), "--opts", "train.seed=1", image_root])
    assert f"--opts takes KEY=VALUE config overrides, got {image_root!r}; put images before --opts" in message
    message = _exit_message(["--config-file", os.path.join(REPO, "configs/test/tiny_mimdet.py"),
                             "--checkpoint", str(checkpoint), "--opts", "train.seed=1", image_root])
    assert f"got {image_root!r}; put images before --opts" in message
    message = _exit_message(["--config-file", os.path.join(REPO, "configs/test/tiny_mimdet.py"),
                             "--checkpoint", str(checkpoint)])
    assert message.endswith("no images given: name image files, folders or globs")


def test_infer_results_equal_detectron2_postprocessing(setup):
    """Masks pasted one at a time give exactly what detectron2's postprocessing gives."""
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json
    from detectron2.data.detection_utils import read_image

    config_file, checkpoint, paths = setup
    cfg = infer.load_config(config_file)
    model = infer.build_model(cfg, checkpoint, "cpu", score_threshold=0.0)
    augmentations = infer.test_augmentations(cfg)
    image_root = paths["val"][1]
    for name in sorted(os.listdir(image_root)):
        rgb = read_image(os.path.join(image_root, name), format="RGB")
        ours = infer.coco_results(infer.predict(model, rgb, augmentations, "BGR", 0.0), 7, rgb.shape[:2])
        aug_input = infer.T.AugInput(np.ascontiguousarray(rgb[:, :, ::-1]))
        augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        with torch.no_grad():
            reference = model([{"image": tensor, "height": rgb.shape[0], "width": rgb.shape[1]}])[0]["instances"]
        assert len(ours) == len(reference) > 0
        assert ours == instances_to_coco_json(reference, 7)


def test_infer_skips_an_image_it_cannot_process_and_keeps_the_others(setup, tmp_path):
    config_file, checkpoint, paths = setup
    thin = tmp_path / "thin.png"
    Image.fromarray(np.full((1, 2000, 3), 128, np.uint8)).save(thin)
    good = os.path.join(paths["val"][1], sorted(os.listdir(paths["val"][1]))[0])
    args = [good, str(thin), "--config-file", config_file, "--checkpoint", checkpoint, "--output",
            str(tmp_path / "o"), "--score-threshold", "0"]
    message = _exit_message(args)
    assert f"cannot process image {thin}: ValueError: the 1x2000 (height x width) image cannot be resized" in message
    assert "--skip-unreadable" in message
    first = json.loads((tmp_path / "o" / "results.json").read_text())  # written for the image before it
    assert first and {r["file_name"] for r in first} == {os.path.basename(good)}
    infer.main(args + ["--skip-unreadable"])
    assert json.loads((tmp_path / "o" / "results.json").read_text()) == first


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak from Linux's /proc")
def test_infer_on_an_8000_pixel_image_stays_under_2_gb(setup, tmp_path):
    """detectron2's postprocessing pastes every mask at full size at once (50 x 64 MB here)."""
    config_file, checkpoint, _ = setup
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (500, 500, 3), dtype=np.uint8)
    Image.fromarray(np.tile(tile, (16, 16, 1))).save(tmp_path / "huge.jpg", quality=80)
    # The child's own high-water mark (VmHWM belongs to its address space, which exec makes new;
    # getrusage's ru_maxrss would carry over the RSS of the pytest process that started it).
    script = ("import runpy, sys\n"
              f"sys.argv = ['infer.py', {str(tmp_path / 'huge.jpg')!r}, '--config-file', {config_file!r}, "
              f"'--checkpoint', {checkpoint!r}, '--output', {str(tmp_path / 'o')!r}, '--score-threshold', '0', "
              "'--opts', 'model.roi_heads.box_predictor.test_topk_per_image=50']\n"
              "try:\n"
              f"    runpy.run_path({os.path.join(REPO, 'tools', 'infer.py')!r}, run_name='__main__')\n"
              "finally:\n"
              "    hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]\n"
              "    print('peak_kib', hwm.split()[1])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    peak_gib = int(out.stdout.split("peak_kib")[-1]) / 2 ** 20
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert len(results) == 50 and results[0]["segmentation"]["size"] == [8000, 8000]
    assert peak_gib < 2.0, f"peak {peak_gib:.2f} GiB"
    with Image.open(tmp_path / "o" / "huge.png") as drawing:
        assert max(drawing.size) == infer.MAX_DRAWING_SIDE


def test_infer_refuses_a_coco_json_of_other_classes_than_the_checkpoint(setup, tmp_path):
    config_file, checkpoint, paths = setup
    state = torch.load(checkpoint, weights_only=True)
    val_json, image_root = paths["val"]
    with open(val_json) as f:
        names = [c["name"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"])]
    args = [image_root, "--config-file", config_file, "--coco-json", val_json, "--output", str(tmp_path / "o")]
    swapped = tmp_path / "swapped.pth"
    torch.save({**state, "config": {"classes": repr(names[::-1])}}, swapped)
    message = _exit_message(args + ["--checkpoint", str(swapped)])
    assert f"the checkpoint was trained on the classes {names[::-1]}, --coco-json {val_json} has {names}" in message
    same = tmp_path / "same.pth"
    torch.save({**state, "config": {"classes": repr(names)}}, same)
    infer.main(args + ["--checkpoint", str(same)])  # matching classes, and checkpoints without any, run
    assert (tmp_path / "o" / "results.json").exists()


def _label_boxes(output):
    renderer = output.canvas.get_renderer()
    return {text.get_text(): text.get_window_extent(renderer) for text in output.ax.texts}


def test_labels_of_two_detections_of_one_object_do_not_cover_each_other():
    """Two classes on nearly the same box: detectron2 prints their labels over each other;
    spread_labels moves the second below the first and leaves a distant label where it was."""
    from detectron2.utils.visualizer import Visualizer

    from models.visualize import spread_labels

    image = np.full((200, 300, 3), 90, dtype=np.uint8)
    boxes = np.array([[40, 50, 160, 170], [42, 51, 158, 168], [200, 20, 290, 120]], dtype=np.float64)
    labels = ["circle 0.94", "rectangle 0.61", "star 0.80"]
    output = Visualizer(image, scale=2).overlay_instances(boxes=boxes, labels=labels)
    before = _label_boxes(output)
    assert before["circle 0.94"].overlaps(before["rectangle 0.61"])  # what detectron2 alone draws
    assert spread_labels(output) == 1
    after = _label_boxes(output)
    first, second = after["circle 0.94"], after["rectangle 0.61"]
    assert not first.overlaps(second) and second.y1 <= first.y0  # below it (display y points up)
    assert abs(second.x0 - before["rectangle 0.61"].x0) < 1e-6  # moved down only
    assert first.bounds == before["circle 0.94"].bounds and after["star 0.80"].bounds == before["star 0.80"].bounds


def test_a_label_that_would_leave_the_picture_goes_above_instead():
    from detectron2.utils.visualizer import Visualizer

    from models.visualize import spread_labels

    image = np.full((200, 300, 3), 90, dtype=np.uint8)
    # small boxes near the bottom: detectron2 writes their labels below them, at the picture's edge
    boxes = np.array([[40, 160, 70, 185], [41, 161, 69, 184]], dtype=np.float64)
    output = Visualizer(image).overlay_instances(boxes=boxes, labels=["triangle 0.52", "rectangle 0.85"])
    assert spread_labels(output) == 1
    after = _label_boxes(output)
    first, second = after["triangle 0.52"], after["rectangle 0.85"]
    assert not first.overlaps(second) and second.y0 >= first.y1 and second.y0 >= 0  # above it, in the picture
