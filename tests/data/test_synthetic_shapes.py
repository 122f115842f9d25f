"""The synthetic shapes dataset: deterministic, valid COCO, honest occlusion, detectron2-ready."""
import json
import os
import signal

import models  # noqa: F401  (detectron2 compatibility first)
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import PolygonMasks, polygons_to_bitmask
from PIL import Image
from pycocotools.coco import COCO

from models.data.synthetic_shapes import (
    DATASET_NAMES, SHAPE_CLASSES, ShapesConfig, ensure_shapes, generate_split, is_simple_region, pixel_outline,
    register_shapes, render_image,
)
from models.data.synthetic_shapes import RenderingProcessDied, _generation_lock, _map_in_processes

NUM_TRAIN, NUM_VAL = 16, 6


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    return root, ensure_shapes(root, NUM_TRAIN, NUM_VAL, seed=3)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _generator_command():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "generate_shapes", os.path.join(os.path.dirname(__file__), "..", "..", "datasets", "generate_shapes.py"))
    generate_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate_shapes)
    return generate_shapes


def _start_generator_with_two_workers(tmp_path, prelude: str = "", **popen):
    """A child process rendering 5000 images in two workers; returns it once both have started
    (they start once the package is imported), with the workers' pids."""
    import subprocess
    import sys
    import time

    script = (prelude + "from models.data.synthetic_shapes import generate_split\n"
              f"generate_split({str(tmp_path)!r}, 'train', 5000, processes=2)\n")
    process = subprocess.Popen([sys.executable, "-c", script], **popen)
    workers = []
    for _ in range(300):
        time.sleep(0.1)
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        if len(workers) == 2 or process.poll() is not None:
            break
    assert len(workers) == 2
    time.sleep(0.5)
    return process, workers


def test_same_seed_same_bytes_other_seed_other_data(shapes, tmp_path):
    root, paths = shapes
    again = ensure_shapes(str(tmp_path / "again"), NUM_TRAIN, NUM_VAL, seed=3)
    for split in ("train", "val"):
        assert _read(paths[split][0]) == _read(again[split][0])
        names = sorted(os.listdir(paths[split][1]))
        assert names == sorted(os.listdir(again[split][1]))
        assert len(names) == (NUM_TRAIN if split == "train" else NUM_VAL)
        for name in names:
            assert _read(os.path.join(paths[split][1], name)) == _read(os.path.join(again[split][1], name))
    other = ensure_shapes(str(tmp_path / "other"), NUM_TRAIN, NUM_VAL, seed=4)
    assert _read(paths["val"][0]) != _read(other["val"][0])


@pytest.mark.parametrize("processes", [1, 3])
def test_the_number_of_processes_changes_no_byte(shapes, tmp_path, processes):
    root, paths = shapes
    json_file, image_root = generate_split(str(tmp_path), "train", NUM_TRAIN, seed=3, processes=processes)
    assert _read(json_file) == _read(paths["train"][0])
    names = sorted(os.listdir(image_root))
    assert names == sorted(os.listdir(paths["train"][1])) and len(names) == NUM_TRAIN
    for name in names:
        assert _read(os.path.join(image_root, name)) == _read(os.path.join(paths["train"][1], name))


def _double_but_die_on_three(job):
    if job == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return 2 * job


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_a_killed_worker_is_an_error_not_a_hang():
    import threading

    outcome = {}

    def run(jobs):
        try:
            outcome["result"] = _map_in_processes(_double_but_die_on_three, jobs, 2)
        except Exception as error:  # noqa: BLE001  (the error is the finding)
            outcome["error"] = error

    for jobs in ([0, 1, 2, 4, 5, 6], list(range(8))):
        outcome.clear()
        thread = threading.Thread(target=run, args=(jobs,), daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the parent waits forever for the killed worker's job"
        if 3 not in jobs:
            assert outcome == {"result": [0, 2, 4, 8, 10, 12]}
    assert list(outcome) == ["error"] and type(outcome["error"]) is RenderingProcessDied, outcome
    assert "died before finishing" in str(outcome["error"]) and "processes=1" in str(outcome["error"])


@pytest.mark.parametrize("arguments", [dict(processes="2"), dict(processes=2.5), dict(processes=True),
                                       dict(num_images=3.0), dict(seed=1.5)])
def test_counts_must_be_whole_numbers(tmp_path, arguments):
    arguments = {"num_images": 2, **arguments}
    name = [key for key in arguments if key != "num_images"] or ["num_images"]
    with pytest.raises(TypeError, match=f"{name[0]} must be a whole number, got"):
        generate_split(str(tmp_path), "train", **arguments)
    assert os.listdir(tmp_path) == []


def test_processes_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="processes must be at least 1, got 0"):
        generate_split(str(tmp_path), "train", 2, processes=0)
    assert not os.path.exists(tmp_path / "train")


def test_valid_coco_with_masks_inside_boxes(shapes):
    _, paths = shapes
    for split, (json_file, image_root) in paths.items():
        coco = COCO(json_file)
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
        assert len(coco.getImgIds()) == (NUM_TRAIN if split == "train" else NUM_VAL)
        for image in coco.loadImgs(coco.getImgIds()):
            with Image.open(os.path.join(image_root, image["file_name"])) as pixels:
                assert pixels.size == (image["width"], image["height"]) and pixels.mode == "RGB"
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            assert len(anns) >= 1
            visible = np.zeros((image["height"], image["width"]), int)
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert ann["iscrowd"] == 0 and w > 0 and h > 0
                assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
                mask = coco.annToMask(ann).astype(bool)
                assert mask.sum() > 0 and abs(mask.sum() - ann["area"]) <= 0.01 * ann["area"]
                outside = mask.copy()
                outside[y:y + h, x:x + w] = False
                assert not outside.any(), "mask leaves its box"
                rows, cols = np.nonzero(mask)  # and the box is tight
                assert (cols.min(), rows.min(), cols.max() + 1 - x, rows.max() + 1 - y) == (x, y, w, h)
                visible += mask
            assert visible.max() == 1, "an occluded shape's mask must not cover its occluder"


def test_polygons_rasterize_to_the_rendered_masks():
    config = ShapesConfig()
    for index in range(8):
        image, instances = render_image(np.random.default_rng([7, 0, index]), config)
        assert image.dtype == np.uint8 and image.ndim == 3
        for instance in instances:
            mask = instance["mask"]
            assert is_simple_region(mask) and mask.sum() >= config.min_area
            rle = mask_util.frPyObjects([pixel_outline(mask)], *mask.shape)
            assert np.array_equal(mask_util.decode(mask_util.merge(rle)).astype(bool), mask)


def test_pixel_outline_and_simple_regions():
    mask = np.zeros((6, 6), bool)
    mask[1:4, 1:3] = True
    mask[3, 3:5] = True  # an L
    assert pixel_outline(mask) == [3, 1, 3, 3, 5, 3, 5, 4, 1, 4, 1, 1]  # pixel corners, clockwise
    assert is_simple_region(mask)
    holed = np.ones((5, 5), bool)
    holed[2, 2] = False
    diagonal = np.eye(3, dtype=bool)
    # A ring whose hole reaches the outside only through a pixel corner: its outline touches
    # itself there, so it is no simple polygon.
    pinched = np.array([[0, 0, 1, 1, 1],
                        [0, 0, 1, 0, 1],
                        [1, 1, 0, 0, 1],
                        [1, 0, 0, 0, 1],
                        [1, 1, 1, 1, 1]], bool)
    assert not is_simple_region(holed) and not is_simple_region(diagonal) and not is_simple_region(pinched)
    assert not is_simple_region(np.zeros((3, 3), bool))
    for not_simple in (holed, diagonal, pinched):
        with pytest.raises(ValueError, match="one 4-connected region without holes"):
            pixel_outline(not_simple)


def test_splits_are_disjoint_and_all_classes_appear(shapes):
    _, paths = shapes
    train, val = (json.load(open(paths[split][0])) for split in ("train", "val"))
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
    assert not {i["file_name"] for i in train["images"]} & {i["file_name"] for i in val["images"]}
    assert not {a["id"] for a in train["annotations"]} & {a["id"] for a in val["annotations"]}
    assert {a["category_id"] for a in train["annotations"]} == set(range(1, len(SHAPE_CLASSES) + 1))


def test_ensure_shapes_keeps_current_data_and_redoes_stale(shapes):
    root, paths = shapes
    json_file = paths["train"][0]
    before = os.stat(json_file).st_mtime_ns
    assert ensure_shapes(root, NUM_TRAIN, NUM_VAL, seed=3) == paths
    assert os.stat(json_file).st_mtime_ns == before
    os.remove(os.path.join(paths["val"][1], "val_000000.png"))
    ensure_shapes(root, NUM_TRAIN, NUM_VAL, seed=3)
    assert os.path.isfile(os.path.join(paths["val"][1], "val_000000.png"))
    with pytest.raises(ValueError, match="num_images=0"):
        ensure_shapes(root, 0, NUM_VAL)


@pytest.mark.parametrize("damage", ["{", "", "[]", '{"info": 1}'])
def test_a_damaged_json_is_generated_again(tmp_path, damage):
    config = ShapesConfig(image_size=(48, 64), object_size=(16, 24), objects_per_image=(1, 2))
    paths = ensure_shapes(str(tmp_path), 2, 1, cfg=config)
    with open(paths["val"][0], "w") as f:
        f.write(damage)
    assert ensure_shapes(str(tmp_path), 2, 1, cfg=config) == paths
    assert len(json.load(open(paths["val"][0]))["images"]) == 1


def test_a_smaller_split_leaves_no_stale_images(tmp_path):
    config = ShapesConfig(image_size=(48, 64), object_size=(16, 24), objects_per_image=(1, 2))
    _, image_root = generate_split(str(tmp_path), "train", 4, cfg=config)
    (tmp_path / "train" / "notes.txt").write_text("not ours")
    generate_split(str(tmp_path), "train", 2, cfg=config)
    assert sorted(os.listdir(image_root)) == ["notes.txt", "train_000000.png", "train_000001.png"]


def test_register_shapes_gives_detectron2_instances(shapes):
    root, _ = shapes
    assert register_shapes(root, NUM_TRAIN, NUM_VAL, seed=3) == list(DATASET_NAMES)
    assert register_shapes(root, NUM_TRAIN, NUM_VAL, seed=3) == list(DATASET_NAMES)  # idempotent
    records = DatasetCatalog.get("shapes_train")
    assert len(records) == NUM_TRAIN and all(r["annotations"] for r in records)
    assert MetadataCatalog.get("shapes_val").thing_classes == list(SHAPE_CLASSES)
    assert len(DatasetCatalog.get("shapes_val")) == NUM_VAL
    record = records[0]
    image = utils.read_image(record["file_name"], format="RGB")
    assert image.shape[:2] == (record["height"], record["width"])
    transforms = T.AugmentationList([T.ResizeShortestEdge(320, 640)])(T.AugInput(image))
    new_size = transforms.apply_image(image).shape[:2]
    annos = [utils.transform_instance_annotations(a, transforms, new_size) for a in record["annotations"]]
    instances = utils.annotations_to_instances(annos, new_size, mask_format="polygon")
    assert isinstance(instances.gt_masks, PolygonMasks) and len(instances) == len(record["annotations"])
    assert instances.gt_classes.tolist() == [a["category_id"] for a in record["annotations"]]
    for polygons, box in zip(instances.gt_masks.polygons, instances.gt_boxes.tensor):
        mask = polygons_to_bitmask(polygons, *new_size)
        rows, cols = np.nonzero(mask)
        assert mask.sum() > 0 and abs(cols.min() - box[0]) <= 2 and abs(rows.max() + 1 - box[3]) <= 2


def test_register_elsewhere_replaces_the_registration(shapes, tmp_path):
    root, _ = shapes
    names = ("shapes_test_a", "shapes_test_b")
    register_shapes(root, NUM_TRAIN, NUM_VAL, seed=3, names=names)
    register_shapes(str(tmp_path), 2, 1, seed=3, names=names)
    assert len(DatasetCatalog.get("shapes_test_a")) == 2 and len(DatasetCatalog.get("shapes_test_b")) == 1


@pytest.mark.parametrize("argv, message", [
    (["--num-train", "0"], "--num-train must be at least 1, got 0"),
    (["--force", "--num-val", "-3"], "--num-val must be at least 1, got -3"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--preview", "-1"], "--preview takes a number of val images >= 0"),
    (["--out", ""], "--out is empty"),
    (["--processes", "0"], "--processes must be at least 1, got 0"),
])
def test_generator_command_refuses_bad_arguments_before_writing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        _generator_command().main(["--out", str(tmp_path / "out"), *argv])
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing written, not even with --out ''
    with pytest.raises(ValueError, match="num_images=-3"):
        generate_split(str(tmp_path / "out"), "train", -3)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_ctrl_c_during_generation_stops_every_process_with_one_message(tmp_path):
    """Ctrl-C reaches every process of the terminal's group: the workers leave the stopping to
    the parent, so only the parent reports it and no process is left behind."""
    import subprocess
    import time

    process, workers = _start_generator_with_two_workers(
        tmp_path, "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    assert output.count("Traceback") == 1 and "ForkProcess" not in output, output  # the parent's only
    time.sleep(0.5)
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


SMALL = ShapesConfig(image_size=(48, 64), object_size=(16, 24), objects_per_image=(1, 2))


def test_an_interrupted_regeneration_leaves_no_json_to_trust(tmp_path, monkeypatch):
    """Regenerating with another seed overwrites images in place: stopped halfway, the old json
    must not vouch for the mix (the next run generates the split again)."""
    import models.data.synthetic_shapes as synthetic_shapes

    root = str(tmp_path)
    paths = ensure_shapes(root, 6, 1, seed=0, cfg=SMALL, processes=1)
    original = {name: _read(os.path.join(paths["train"][1], name)) for name in os.listdir(paths["train"][1])}
    write_image = synthetic_shapes._write_image

    def interrupted(job):
        if job[2] == 3:
            raise KeyboardInterrupt
        return write_image(job)

    monkeypatch.setattr(synthetic_shapes, "_write_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_split(root, "train", 6, seed=1, cfg=SMALL, processes=1)
    assert not os.path.exists(paths["train"][0])
    assert sum(_read(os.path.join(paths["train"][1], n)) != b for n, b in original.items()) == 3  # seed 1's
    monkeypatch.setattr(synthetic_shapes, "_write_image", write_image)
    assert ensure_shapes(root, 6, 1, seed=0, cfg=SMALL, processes=1) == paths
    assert {name: _read(os.path.join(paths["train"][1], name)) for name in original} == original


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="fcntl locks are POSIX")
def test_a_second_generator_waits_for_the_first(tmp_path):
    import subprocess
    import sys
    import time

    root = str(tmp_path)
    script = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
              "from models.data.synthetic_shapes import ShapesConfig, ensure_shapes\n"
              f"ensure_shapes({root!r}, 2, 1, cfg=ShapesConfig(image_size=(48, 64), object_size=(16, 24), "
              "objects_per_image=(1, 2)))\nprint('done')\n")
    with _generation_lock(root):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        time.sleep(8)  # the package's imports, then the lock
        assert process.poll() is None and not os.path.exists(tmp_path / "annotations")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "waiting for it to finish" in output and "done" in output, output
    assert os.path.isfile(tmp_path / "annotations" / "instances_val.json")


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX signals")
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_workers_end_with_a_killed_parent(tmp_path, signal_name):
    """Killed alone (by the out-of-memory killer, say), the parent leaves no worker waiting."""
    import subprocess
    import time

    process, workers = _start_generator_with_two_workers(tmp_path, stdout=subprocess.DEVNULL,
                                                         stderr=subprocess.DEVNULL)
    process.send_signal(getattr(signal, signal_name))
    process.wait(timeout=30)
    for _ in range(50):
        time.sleep(0.1)
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")
                 and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]]
        if not alive:
            break
    for pid in alive:  # leave nothing behind, whatever the outcome
        os.kill(int(pid), signal.SIGKILL)
    assert alive == []


def test_a_json_that_cannot_be_written_leaves_no_temporary_file(tmp_path):
    os.makedirs(tmp_path / "annotations" / "instances_train.json")  # a folder in the json's place
    with pytest.raises(OSError):
        generate_split(str(tmp_path), "train", 2, cfg=SMALL, processes=1)
    assert os.listdir(tmp_path / "annotations") == ["instances_train.json"]


def test_generator_command_names_an_unwritable_folder_in_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as stop:
        _generator_command().main(["--out", str(tmp_path / "a_file" / "shapes"), "--num-train", "2", "--num-val", "1"])
    message = str(stop.value.code)
    assert message.startswith("generate_shapes.py: cannot write the dataset into") and "Not a directory" in message
    assert "\n" not in message


def test_force_rewrites_both_splits_under_one_hold_of_the_lock(tmp_path, monkeypatch):
    """A second generator waits for both splits of the first, not for one at a time (which
    would interleave them: train of one seed, val of another)."""
    import contextlib

    import models.data.synthetic_shapes as synthetic_shapes

    root = str(tmp_path)
    paths = ensure_shapes(root, 2, 1, seed=0, cfg=SMALL, processes=1)
    for json_file, _ in paths.values():
        os.utime(json_file, (0, 0))
    holds = []
    lock = synthetic_shapes._generation_lock

    @contextlib.contextmanager
    def counted(folder):
        with lock(folder):
            holds.append(folder)
            yield

    monkeypatch.setattr(synthetic_shapes, "_generation_lock", counted)
    assert ensure_shapes(root, 2, 1, seed=0, cfg=SMALL, processes=1) == paths and holds == []  # up to date
    assert ensure_shapes(root, 2, 1, seed=0, cfg=SMALL, processes=1, force=True) == paths
    assert holds == [root]
    assert all(os.stat(json_file).st_mtime > 0 for json_file, _ in paths.values())  # both written again
