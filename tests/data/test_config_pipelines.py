"""Every COCO config's own train and test mappers, augmentations untouched, on the COCO-quirks
set (tests/conftest.py: category ids 1/7/90, a two-part object, arches a crop cuts in two,
crowd RLE, a self-intersecting polygon, grayscale / RGBA / EXIF-rotated images, an image
without annotations), drawn often enough, seeded, that the random crops really happen.
"""
import copy
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode, PolygonMasks
from fvcore.transforms.transform import CropTransform

from models.config import load_config
from models.data.datasets import InstanceDatasetMapper, drop_degenerate_annotations

REPO = Path(__file__).resolve().parents[2]
MIMDET = [f"configs/mimdet/mimdet_vit_{v}_mask_rcnn_fpn_sr_{r}_800_1333_4xdec_{f}coco_3x{b}.py"
          for v, r, f, b in [("base", "0p25", "", ""), ("base", "0p25", "", "_bs16"), ("base", "0p5", "", ""),
                             ("base", "0p5", "convfill_", ""), ("large", "0p5", "", ""),
                             ("large", "0p5", "convfill_", "")]]
BENCHMARKING = [f"configs/benchmarking/benchmarking_mask_rcnn_base_FPN_{e}ep_LSJ_mae.py" for e in (25, 50, 100)]
DRAWS = 20  # per training image and config: 120 draws, about 60 random crops at p=0.5
ARCH = 2  # contiguous class of category id 90 (ids 1, 7, 90 -> 0, 1, 2)


@pytest.fixture(scope="module")
def quirks(coco_quirks):
    json_file, image_root = coco_quirks
    if "quirks_pipeline" not in DatasetCatalog.list():
        register_coco_instances("quirks_pipeline", {}, str(json_file), str(image_root))
    return DatasetCatalog.get("quirks_pipeline")


def test_the_set_has_the_traits_of_real_coco(quirks):
    metadata = MetadataCatalog.get("quirks_pipeline")
    assert metadata.thing_dataset_id_to_contiguous_id == {1: 0, 7: 1, 90: 2}
    annotations = [a for record in quirks for a in record["annotations"]]
    assert sum(a["iscrowd"] == 1 and isinstance(a["segmentation"], dict) for a in annotations) == 2
    assert any(len(a["segmentation"]) == 2 for a in annotations if not a["iscrowd"])
    assert [len(r["annotations"]) for r in quirks].count(0) == 1
    assert {r["height"] > r["width"] for r in quirks} == {True, False}


def _mask_box(polygons) -> np.ndarray:
    xy = np.concatenate([p.reshape(-1, 2) for p in polygons])
    return np.concatenate([xy.min(0), xy.max(0)])


def _draw_all(mapper, records, draws: int):
    """Map each record ``draws`` times; return (outputs, transforms) with each output's transforms."""
    augmentations, used = mapper.augmentations, []

    def recording(aug_input):
        transforms = augmentations(aug_input)
        used.append(transforms)
        return transforms

    mapper.augmentations = recording
    outputs = [mapper(copy.deepcopy(record)) for _ in range(draws) for record in records]
    return outputs, used


@pytest.mark.parametrize("config", MIMDET + BENCHMARKING, ids=lambda c: Path(c).stem)
def test_train_mapper_keeps_boxes_masks_and_images_consistent(config, quirks):
    cfg = load_config(str(REPO / config))
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert isinstance(mapper, InstanceDatasetMapper)
    records = drop_degenerate_annotations([r for r in quirks if r["annotations"]])  # what the loader trains on
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    outputs, used = _draw_all(mapper, records, DRAWS)

    counts = Counter()
    for record, out, transforms in zip(records * DRAWS, outputs, used):
        image, instances = out["image"], out["instances"]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert tuple(image.shape[1:]) == instances.image_size
        h, w = instances.image_size
        cropped = any(isinstance(t, CropTransform) for t in transforms)
        counts["crop"] += cropped
        boxes = instances.gt_boxes.tensor.numpy()
        assert len(instances) <= sum(not a["iscrowd"] for a in record["annotations"])  # no crowd region trains
        assert set(instances.gt_classes.tolist()) <= {0, 1, 2}
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= -1e-3).all() and (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
        assert isinstance(instances.gt_masks, PolygonMasks) and len(instances.gt_masks) == len(instances)
        for box, polygons, label in zip(boxes, instances.gt_masks.polygons, instances.gt_classes.tolist()):
            counts["instances"] += 1
            if not polygons:  # the crop kept part of the box but none of the outline
                counts["no polygon left"] += 1
                assert cropped
                continue
            mask_box = _mask_box(polygons)
            assert (mask_box[:2] >= box[:2] - 1e-3).all() and (mask_box[2:] <= box[2:] + 1e-3).all()  # inside
            if not cropped:  # flips and resizes move box and outline alike
                np.testing.assert_allclose(mask_box, box, atol=1e-3)
            if label == ARCH and len(polygons) == 2:
                counts["arch cut in two"] += 1
    print(Path(config).stem, dict(counts), "failed annotations:", mapper.failed)
    assert mapper.failed == 0
    assert counts["crop"] >= (len(outputs) if "LSJ" in config else 30)  # LSJ always crops; MIMDet at p=0.5
    assert counts["arch cut in two"] >= 1


@pytest.mark.parametrize("config", [MIMDET[2], BENCHMARKING[0]], ids=["mimdet", "benchmarking"])
def test_test_mapper_gives_three_channels_at_the_test_size(config, quirks):
    cfg = load_config(str(REPO / config))
    mapper = instantiate(cfg.dataloader.test.mapper)
    for record in quirks:
        out = mapper(copy.deepcopy(record))
        image = out["image"]
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and "instances" not in out
        h, w = image.shape[1:]
        if "LSJ" in config:  # longest side 1024, padded to a 1024x1024 square
            assert (h, w) == (1024, 1024)
        else:
            short, long = sorted((h, w))
            assert short == 800 or long == 1333
            assert (h > w) == (record["height"] > record["width"])  # EXIF orientation applied
        assert (out["height"], out["width"]) == (record["height"], record["width"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_mapping_leaves_the_dataset_records_as_they_were(quirks, split):
    """The mapper copies only the top level of a record (detectron2's deep copy is skipped), so
    what it transforms must be its own copies: records are reused every epoch."""
    cfg = load_config(str(REPO / MIMDET[2]))
    mapper = instantiate(cfg.dataloader[split].mapper)
    records = drop_degenerate_annotations(list(quirks))
    before = copy.deepcopy(records)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    outputs = [mapper(record) for _ in range(6) for record in records]
    assert records == before
    assert all(type(out) is dict and "image" in out for out in outputs)
    assert sum("instances" in out for out in outputs) == (len(outputs) if split == "train" else 0)
    assert sum(len(out.get("instances", [])) for out in outputs[:len(records)]) > 0 or split == "test"


def test_a_crop_through_the_legs_keeps_both_pieces_of_one_instance():
    record = dict(file_name="", height=100, width=100, annotations=[dict(
        iscrowd=0, category_id=0, bbox=[10, 10, 80, 80], bbox_mode=BoxMode.XYWH_ABS,
        segmentation=[[10, 10, 90, 10, 90, 90, 70, 90, 70, 30, 30, 30, 30, 90, 10, 90]])])
    mapper = InstanceDatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True)
    transforms = T.TransformList([CropTransform(0, 50, 100, 50)])  # rows 50-99: only the legs
    mapper._transform_annotations(record, transforms, (50, 100))
    (polygons,) = record["instances"].gt_masks.polygons
    assert len(polygons) == 2
    assert sorted(_mask_box([p]).tolist() for p in polygons) == [[10, 0, 30, 40], [70, 0, 90, 40]]


def test_an_annotation_the_transforms_fail_on_is_dropped_and_counted(caplog):
    good = dict(id=1, iscrowd=0, category_id=0, bbox=[10, 10, 20, 20], bbox_mode=BoxMode.XYWH_ABS,
                segmentation=[[10, 10, 30, 10, 30, 30, 10, 30]])
    odd = dict(good, id=2, segmentation=[[10, 10, 30, 10, 30, 30, 10]])  # 7 coordinates: no x, y pairs
    mapper = InstanceDatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True)
    for _ in range(2):
        record = dict(file_name="odd.png", annotations=[good, odd])
        mapper._transform_annotations(record, T.TransformList([]), (64, 64))
        assert record["instances"].gt_boxes.tensor.tolist() == [[10.0, 10.0, 30.0, 30.0]]
    assert mapper.failed == 2
    assert "Dropped annotation 2 of odd.png: its transform failed (ValueError" in caplog.text


def test_non_crowd_rle_becomes_polygons_and_an_empty_one_is_dropped():
    from pycocotools import mask as mask_util

    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[5:15, 10:30] = 1  # two parts
    mask[25:35, 40:55] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle = dict(size=rle["size"], counts=rle["counts"].decode("ascii"))
    empty = mask_util.encode(np.asfortranarray(np.zeros((40, 60), dtype=np.uint8)))
    crowd = dict(id=3, iscrowd=1, category_id=0, bbox=[10, 5, 20, 10], segmentation=rle)
    records = [dict(file_name="rle.png", annotations=[
        dict(id=1, iscrowd=0, category_id=0, bbox=[10, 5, 45, 30], segmentation=rle),
        dict(id=2, iscrowd=0, category_id=0, bbox=[1, 1, 5, 5],
             segmentation=dict(size=[40, 60], counts=empty["counts"])),
        crowd])]
    (kept,) = drop_degenerate_annotations(records)
    converted, kept_crowd = kept["annotations"]
    assert kept_crowd is crowd  # crowd regions stay RLE: detectron2 leaves them out of training
    boxes = sorted(_mask_box([np.asarray(p)]).tolist() for p in converted["segmentation"])
    assert boxes == [[10.5, 5.5, 29.5, 14.5], [40.5, 25.5, 54.5, 34.5]]


def test_integer_boxes_and_polygons_are_resized_without_truncation():
    annotation = dict(iscrowd=0, category_id=0, bbox=[3, 3, 7, 7], bbox_mode=BoxMode.XYWH_ABS,
                      segmentation=[[3, 3, 10, 3, 10, 10, 3, 10]])  # ints, as many COCO-format files store them
    mapper = InstanceDatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True)
    record = dict(file_name="int.png", annotations=[annotation])
    mapper._transform_annotations(record, T.TransformList([T.ResizeTransform(20, 20, 30, 30, 2)]), (30, 30))
    (polygons,) = record["instances"].gt_masks.polygons
    assert polygons[0].tolist() == [4.5, 4.5, 15.0, 4.5, 15.0, 15.0, 4.5, 15.0]
    assert record["instances"].gt_boxes.tensor.tolist() == [[4.5, 4.5, 15.0, 15.0]]
    assert annotation["segmentation"] == [[3, 3, 10, 3, 10, 10, 3, 10]]  # the record itself is not modified


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_array_polygons_and_keypoints_of_a_record_stay_as_they_were(tmp_path, dtype):
    """fvcore resizes and flips coordinates in place; the mapper transforms copies, so a record
    whose polygons or keypoints are numpy arrays maps the same every epoch."""
    from PIL import Image

    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "a.png")
    polygon = np.array([10, 10, 30, 10, 30, 30, 10, 30], dtype=dtype)
    keypoints = np.array([12, 14, 2, 20, 22, 2], dtype=dtype)
    record = dict(file_name=str(tmp_path / "a.png"), height=40, width=60, image_id=1, annotations=[dict(
        iscrowd=0, category_id=0, bbox=[10, 10, 20, 20], bbox_mode=BoxMode.XYWH_ABS, segmentation=[polygon],
        keypoints=keypoints)])
    mapper = InstanceDatasetMapper(is_train=True, image_format="RGB", use_instance_mask=True, use_keypoint=True,
                                   keypoint_hflip_indices=np.array([1, 0]), augmentations=[
                                       T.ResizeShortestEdge(80, 1000), T.RandomFlip(prob=1.0)])
    outputs = [mapper(record) for _ in range(3)]
    assert polygon.tolist() == [10, 10, 30, 10, 30, 30, 10, 30]
    assert keypoints.tolist() == [12, 14, 2, 20, 22, 2]
    for out in outputs:
        assert out["instances"].gt_masks.polygons[0][0].tolist() == [100, 20, 60, 20, 60, 60, 100, 60]
        # flipped: the two keypoints swap (hflip indices) and mirror at x -> 120 - x
        assert out["instances"].gt_keypoints.tensor[0, :, :2].tolist() == [[80, 44], [96, 28]]


def test_a_bitmask_array_segmentation_is_counted_as_present(caplog):
    """A (H, W) array as a segmentation (which detectron2's transforms do not take) is a
    segmentation, not a missing one: numpy refuses the truth test of such an array, which
    stopped the mapper; now its transform's failure drops it with the usual warning."""
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:50] = 1
    record = dict(file_name="a.png", annotations=[dict(iscrowd=0, category_id=0, bbox=[20, 10, 30, 20],
                                                       bbox_mode=BoxMode.XYWH_ABS, segmentation=mask)])
    assert drop_degenerate_annotations([record], need_masks=True) == [record]
    mapper = InstanceDatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True,
                                   instance_mask_format="bitmask")
    mapper._transform_annotations(record, T.TransformList([T.HFlipTransform(60)]), (40, 60))
    assert mapper.failed == 1 and len(record["instances"]) == 0
    assert "Cannot transform segmentation of type" in caplog.text and "no segmentation" not in caplog.text


def test_a_cropped_instance_keeps_its_annotated_box():
    """The original's mapper does not recompute boxes from masks: a crop clips the annotated
    box. The triangle's outline inside the crop is lower than its clipped box."""
    cfg = load_config(str(REPO / MIMDET[2]))
    mapper = instantiate(cfg.dataloader.train.mapper)
    record = dict(file_name="triangle.png", annotations=[dict(
        iscrowd=0, category_id=0, bbox=[0, 0, 60, 60], bbox_mode=BoxMode.XYWH_ABS,
        segmentation=[[0, 0, 60, 0, 0, 60]])])
    mapper._transform_annotations(record, T.TransformList([CropTransform(30, 0, 30, 60)]), (60, 30))
    (polygons,) = record["instances"].gt_masks.polygons
    assert record["instances"].gt_boxes.tensor.tolist() == [[0.0, 0.0, 30.0, 60.0]]  # the box, clipped
    assert _mask_box(polygons).tolist() == [0.0, 0.0, 30.0, 30.0]  # what the mask alone would give


def test_annotations_without_segmentation_are_dropped_when_masks_train(caplog):
    """detectron2's load_coco_json leaves ``"segmentation": []`` out of the record; mixed with
    annotations that have one, detectron2's mapper would stop (KeyError / no gt_masks)."""
    good = dict(id=1, iscrowd=0, category_id=0, bbox=[10, 10, 20, 20], bbox_mode=BoxMode.XYWH_ABS,
                segmentation=[[10, 10, 30, 10, 30, 30, 10, 30]])
    box_only = dict(good, id=2)
    del box_only["segmentation"]
    records = [dict(file_name="a.png", annotations=[box_only, good]), dict(file_name="b.png", annotations=[box_only])]
    assert drop_degenerate_annotations(records) == records  # box-only training keeps them
    (kept,) = drop_degenerate_annotations(records, need_masks=True)
    assert [a["id"] for a in kept["annotations"]] == [1]
    assert "Dropped 2 of 3 training annotations" in caplog.text and "no segmentation" in caplog.text
    mapper = InstanceDatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True)
    for annotations in ([box_only, good], [box_only]):  # the mapper alone copes too
        record = dict(file_name="a.png", annotations=annotations)
        mapper._transform_annotations(record, T.TransformList([]), (64, 64))
        assert len(record["instances"]) == len(annotations) - 1
        assert len(record["instances"].gt_masks) == len(annotations) - 1
    assert mapper.failed == 2


def test_list_arguments_reach_the_augmentations_as_tuples_that_draw_the_same_sizes():
    """LazyConfig passes lists as omegaconf ListConfigs; the mapper makes them tuples (numpy reads
    those without omegaconf's costly attribute errors), and the sizes drawn stay the same."""
    from omegaconf import ListConfig

    cfg = load_config(str(REPO / "configs/demo/mimdet_shapes.py"))
    resize = instantiate(cfg.dataloader.train.mapper).augmentations.augs[1]
    as_configured = instantiate(cfg.dataloader.train.mapper.augmentations[1])
    assert isinstance(as_configured.short_edge_length, ListConfig)
    assert type(resize.short_edge_length) is tuple and resize.short_edge_length == (144, 160, 176, 192)
    image = np.zeros((200, 240, 3), np.uint8)
    sizes = []
    for augmentation in (resize, as_configured):
        np.random.seed(0)
        sizes.append([augmentation.get_transform(image).new_h for _ in range(40)])
    assert sizes[0] == sizes[1] and set(sizes[0]) == {144, 160, 176, 192}


def _list_configs_in(augmentation) -> list:
    found = []
    for value in vars(augmentation).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        found += [value] if any(type(v).__name__ == "ListConfig" for v in [value, *items]) else []
        found += [x for item in items if isinstance(item, T.Augmentation) for x in _list_configs_in(item)]
    return found


@pytest.mark.parametrize("config", [MIMDET[2], BENCHMARKING[0]], ids=["mimdet", "benchmarking"])
def test_no_list_config_is_left_in_nested_augmentations(config):
    """The COCO configs' crop sits inside RandomApply(AugmentationList(...)); its lists are
    tuples too."""
    cfg = load_config(str(REPO / config))
    assert _list_configs_in(instantiate(cfg.dataloader.train.mapper.augmentations[1])) if config == MIMDET[2] else 1
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert _list_configs_in(mapper.augmentations) == []
