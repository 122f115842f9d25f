"""models/data/datasets.py: COCO-format datasets from the config, their files, and degenerate annotations."""
import logging
import os

import pytest

import models  # noqa: F401  (before detectron2)
from detectron2.structures import BoxMode

from models.data.datasets import check_dataset_files, drop_degenerate_annotations, register_coco_datasets

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
