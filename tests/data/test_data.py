"""models/data/datasets.py: COCO-format datasets from the config, their files, their validation
before any work, and degenerate annotations."""
import json
import logging
import os

import pytest

import models  # noqa: F401  (before detectron2)
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

from models.config import load_config
from models.data.datasets import (check_dataset_files, check_image_sizes, drop_degenerate_annotations,
                                  register_coco_datasets, validate_coco_json)
from models.engine import loops

TINY = "configs/test/tiny_mimdet.py"

SQUARE = [10, 10, 30, 10, 30, 30, 10, 30]


def _annotation(id, bbox=(10, 10, 20, 20), segmentation=(SQUARE,)):
    return dict(id=id, bbox=list(bbox), bbox_mode=BoxMode.XYWH_ABS, category_id=0,
                segmentation=[list(p) for p in segmentation])


def test_degenerate_boxes_and_polygons_are_dropped_with_one_counting_warning(caplog):
    records = [
        dict(file_name="a.png", annotations=[
            _annotation(1),
            _annotation(2, bbox=(10, 10, 0, 20)),  # no width
            _annotation(3, bbox=(10, float("nan"), 5, 5)),
            _annotation(4, segmentation=([10, 10, 30, 10],)),  # two points
            _annotation(5, segmentation=([10, 10, 20, 20, 30, 30],)),  # collinear: no area
            _annotation(6, segmentation=(SQUARE, [1, 1, 2, 2, 3, 3])),  # one good polygon is enough
        ]),
        dict(file_name="b.png", annotations=[_annotation(7, bbox=(5, 5, -3, 4))]),
        dict(file_name="c.png", annotations=[_annotation(8)]),
    ]
    with caplog.at_level(logging.WARNING, logger="models.data.datasets"):
        kept = drop_degenerate_annotations(records)
    assert [r["file_name"] for r in kept] == ["a.png", "c.png"]
    assert [a["id"] for a in kept[0]["annotations"]] == [1, 6]
    assert kept[0]["annotations"][1]["segmentation"] == [SQUARE]
    assert "Dropped 5 of 8 training annotations with degenerate boxes or polygons" in caplog.text
    assert "a.png, annotation 2: box [10, 10, 0, 20] has no area" in caplog.text
    assert "1 image(s) left without annotations dropped" in caplog.text
    assert records[0]["annotations"][1]["id"] == 2  # the input is not modified


def test_nothing_left_is_a_clear_error_and_clean_data_passes_untouched(caplog):
    with pytest.raises(ValueError, match=r"no training image is left: all 1 annotations are degenerate .*b.png"):
        drop_degenerate_annotations([dict(file_name="b.png", annotations=[_annotation(1, bbox=(0, 0, 0, 0))])])
    clean = [dict(file_name="c.png", annotations=[_annotation(1)]), dict(file_name="d.png")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.data.datasets"):
        assert drop_degenerate_annotations(clean) == clean
    assert caplog.text == ""


def test_missing_dataset_files_are_named(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(FileNotFoundError, match=r"dataset 'nojson': json_file .*absent.json does not exist"):
        register_coco_datasets([dict(name="nojson", json_file=str(tmp_path / "absent.json"), image_root=str(images))])
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"dataset 'noimages': image_root .*nowhere is not a folder"):
        register_coco_datasets([dict(name="noimages", json_file=str(tmp_path / "a.json"),
                                     image_root=str(tmp_path / "nowhere"))])
    with pytest.raises(ValueError, match=r"lacks \['image_root'\]"):
        register_coco_datasets([dict(name="partial", json_file=str(tmp_path / "a.json"))])


def test_builtin_dataset_without_its_files_is_named():
    if os.path.exists(os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "coco")):
        pytest.skip("COCO is present here")
    with pytest.raises(FileNotFoundError, match=r"dataset 'coco_2017_val': annotation file .*instances_val2017.json"
                                                r" does not exist \(builtin datasets live under \$DETECTRON2_DATASETS"):
        check_dataset_files("coco_2017_val")
    with pytest.raises(KeyError, match="dataset 'no_such_set' is not registered"):
        check_dataset_files(["no_such_set"])


def test_the_resumable_train_loader_drops_them(caplog):
    from models.data.resumable import build_resumable_train_loader

    records = [dict(file_name=f"{i}.png", width=32, height=32, image_id=i,
                    annotations=[_annotation(1, bbox=(0, 0, 0, 5) if i == 2 else (1, 1, 5, 5))]) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="models.data.datasets"):
        loader = build_resumable_train_loader(records, mapper=lambda r: r, total_batch_size=3,
                                              aspect_ratio_grouping=False)
    assert "Dropped 1 of 4 training annotations" in caplog.text
    assert sorted(r["image_id"] for r in next(iter(loader))) == [0, 1, 3]


def _broken_copy(json_file, edit):
    data = json.loads(json_file.read_text())
    edit(data)
    broken = json_file.with_name("broken.json")
    broken.write_text(json.dumps(data))
    return broken


def test_every_problem_of_a_json_is_listed_at_once_with_counts(tmp_path, toy_coco_writer):
    json_file = toy_coco_writer(tmp_path)

    def edit(data):
        images, annotations = data["images"], data["annotations"]
        images.append(dict(images[0], file_name="another.png"))  # a second image with id 1
        del images[2]["height"]
        del annotations[0]["bbox"], annotations[1]["category_id"]
        annotations[2]["category_id"] = 5
        annotations[3]["image_id"] = 999
        annotations[4]["id"] = annotations[5]["id"]
        del annotations[6]["area"]
        annotations[7].pop("iscrowd")
        annotations[8]["segmentation"] = [[1, 1, 5, 5]]  # 2 points: pycocotools cannot rasterize it
        annotations[9]["segmentation"] = [[10, 10, float("nan"), 20, 30, 40]]
        annotations[10]["segmentation"] = []
        annotations[11]["area"] = -5
        annotations[12]["bbox"] = [500, 500, 20, 30]  # the images are 128 x 128

    broken = _broken_copy(json_file, edit)
    with pytest.raises(ValueError) as error:
        validate_coco_json("broken", str(broken))
    message = str(error.value)
    assert message.startswith(f"dataset 'broken' ({broken}) has problems that would stop or corrupt the run")
    for line in ["1 x duplicate image ids (one image would take another's annotations) (e.g. image 1)",
                 "1 x images without height (e.g. image 3)",
                 "1 x annotations without a bbox of 4 numbers (e.g. annotation 1: None)",
                 "2 x annotations without a category_id of the categories (e.g. annotation 2: None, annotation 3: 5)",
                 "1 x annotations of an image id not in images (e.g. annotation 4: 999)",
                 "1 x duplicate annotation ids (e.g. annotation 6)",
                 "1 x annotations whose bbox lies outside its image (e.g. annotation 13: [500, 500, 20, 30])"]:
        assert f"  {line}" in message.splitlines()
    assert "area" not in message and "fewer than 3 points" not in message  # a training set needs neither
    with pytest.raises(ValueError) as error:
        validate_coco_json("broken", str(broken), for_evaluation=True)
    lines = str(error.value).splitlines()
    for line in ["2 x annotations without a non-negative area (COCO evaluation reads it) (e.g. annotation 7, "
                 "annotation 12)",
                 "1 x polygons with coordinates that are not finite numbers (e.g. annotation 10)",
                 "1 x annotations without a segmentation (mask evaluation reads it) (e.g. annotation 11: [])",
                 "1 x annotations without iscrowd 0 or 1 (COCO evaluation reads it) (e.g. annotation 8)",
                 "1 x polygons of fewer than 3 points (pycocotools cannot rasterize them) (e.g. annotation 9)"]:
        assert f"  {line}" in lines
    validate_coco_json("toy", str(json_file), for_evaluation=True)  # the clean original passes


def test_duplicate_class_names_and_an_evaluation_set_without_annotations_are_named(tmp_path, toy_coco_writer):
    json_file = toy_coco_writer(tmp_path)
    same_names = _broken_copy(json_file, lambda data: data["categories"][1].update(name="red"))
    with pytest.raises(ValueError, match=r"1 x duplicate category names \(results are reported, and checked, by "
                                         r"name\) \(e.g. red\)"):
        validate_coco_json("same_names", str(same_names))
    empty = _broken_copy(json_file, lambda data: data.update(annotations=[]))
    validate_coco_json("empty", str(empty))  # a training set without annotations fails in detectron2's loader
    with pytest.raises(ValueError, match=r"evaluation sets without annotations"):
        validate_coco_json("empty", str(empty), for_evaluation=True)


def test_a_json_that_is_not_json_is_named(tmp_path):
    bad = tmp_path / "annotations.json"
    bad.write_text('{"images": [], "annotations": [,]}')
    with pytest.raises(ValueError, match=rf"dataset 'x' \({bad}\) is not valid JSON: Expecting value: line 1"):
        validate_coco_json("x", str(bad))
    bad.write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"no list of annotations, categories"):
        validate_coco_json("x", str(bad))


def test_the_launcher_validates_before_training(tmp_path, toy_coco_writer, dataset_overrides):
    json_file = toy_coco_writer(tmp_path)
    broken = _broken_copy(json_file, lambda data: data["images"][1].update(id=data["images"][0]["id"]))
    cfg = load_config(TINY, dataset_overrides("dup_ids", broken, tmp_path / "images"))
    with pytest.raises(ValueError, match=r"1 x duplicate image ids"):
        loops.prepare(cfg)


def test_test_images_of_another_size_than_annotated_are_named(coco_quirks):
    json_file, image_root = coco_quirks
    records = load_coco_json(str(json_file), str(image_root))
    check_image_sizes("quirks", records)  # an EXIF-rotated JPEG counts at its displayed size
    rotated = next(r for r in records if r["file_name"].endswith("exif_rotated.jpg"))
    rotated["height"], rotated["width"] = rotated["width"], rotated["height"]  # the stored, unrotated size
    with pytest.raises(ValueError, match=r"1 x images of another size than the json says \(e.g. exif_rotated.jpg: "):
        check_image_sizes("quirks", records)
