"""detectron2 0.6 works end to end on this stack: its own Mask R-CNN trains and infers on CPU,
and COCOEvaluator scores predictions with pycocotools."""
import copy
import itertools
import json

import numpy as np
import pytest
import torch

import models  # noqa: F401  (compatibility layer first)
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import SimpleTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.model_zoo import get_config
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances


def _square_polygon(x, y, size):
    return [float(v) for v in (x, y, x + size, y, x + size, y + size, x, y + size)]


def _rectangles(num_images, seed=0):
    """Per image a list of (category, x, y, size) squares that do not overlap."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        objs = []
        for row in range(int(rng.integers(1, 3))):
            size = int(rng.integers(16, 28))
            objs.append((int(rng.integers(0, 2)), 8 + row * 32, int(rng.integers(4, 30)), size))
        images.append(objs)
    return images


def _training_batch(images, height=64, width=64):
    batch = []
    for objs in images:
        image = torch.full((3, height, width), 40, dtype=torch.float32)
        masks = torch.zeros(len(objs), height, width, dtype=torch.bool)
        for i, (cat, x, y, s) in enumerate(objs):
            image[cat, y:y + s, x:x + s] = 220
            masks[i, y:y + s, x:x + s] = True
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.tensor([[x, y, x + s, y + s] for _, x, y, s in objs], dtype=torch.float32))
        inst.gt_classes = torch.tensor([cat for cat, *_ in objs])
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": image, "height": height, "width": width, "instances": inst})
    return batch


@pytest.fixture(scope="module")
def mask_rcnn():
    cfg = get_config("common/models/mask_rcnn_fpn.py").model
    cfg.roi_heads.num_classes = 2
    # Random weights: BatchNorm instead of the zoo's FrozenBN (meant for pretrained weights) keeps
    # 50 layers of random convolutions from overflowing.
    cfg.backbone.bottom_up.freeze_at = 0
    cfg.backbone.bottom_up.stem.norm = "BN"
    cfg.backbone.bottom_up.stages.norm = "BN"
    torch.manual_seed(0)
    return instantiate(cfg).to("cpu")


def test_model_zoo_mask_rcnn_trains_and_infers_on_cpu(mask_rcnn):
    model = mask_rcnn
    model.train()
    batch = _training_batch(_rectangles(2))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    trainer = SimpleTrainer(model, itertools.repeat(batch), optimizer)
    trainer.train(0, 3)
    assert trainer.iter == 3  # detectron2 leaves iter at max_iter after the loop
    losses = trainer.storage.latest()
    for name in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"):
        assert np.isfinite(losses[name][0]), name
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("roi_heads.mask_head") for k in changed)
    assert any(k.startswith("backbone.bottom_up") for k in changed)

    model.eval()
    with torch.no_grad():
        outputs = model([{"image": batch[0]["image"], "height": 128, "width": 96}])
    inst = outputs[0]["instances"]
    assert inst.image_size == (128, 96)  # rescaled to the requested output size
    assert {"pred_boxes", "scores", "pred_classes", "pred_masks"} <= set(inst.get_fields())
    if len(inst):
        assert inst.pred_masks.shape[1:] == (128, 96)


@pytest.fixture
def coco_dataset(tmp_path):
    """A COCO-format json of 6 images with non-overlapping squares of 2 classes."""
    name = f"d2setup_{tmp_path.name}"
    images, annotations = [], []
    for image_id, objs in enumerate(_rectangles(6, seed=1), start=1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 64, "width": 64})
        for cat, x, y, s in objs:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat + 1, "iscrowd": 0,
                "bbox": [x, y, s, s], "area": s * s, "segmentation": [_square_polygon(x, y, s)],
            })
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _predictions(records, shift=0):
    """Predictions equal to the ground truth, boxes and masks moved right by `shift` pixels."""
    outputs = []
    for record in records:
        h, w = record["height"], record["width"]
        boxes, masks = [], torch.zeros(len(record["annotations"]), h, w, dtype=torch.bool)
        for i, ann in enumerate(record["annotations"]):
            x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            boxes.append([x0 + shift, y0, x1 + shift, y1])
            masks[i, int(y0):int(y1), int(x0) + shift:int(x1) + shift] = True
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]])
        inst.pred_masks = masks
        outputs.append({"instances": inst})
    return outputs


def _evaluate(name, records, outputs, output_dir):
    evaluator = COCOEvaluator(name, output_dir=str(output_dir))
    evaluator.reset()
    for record, output in zip(records, outputs):
        evaluator.process([{"image_id": record["image_id"]}], [output])
    return evaluator.evaluate()


def test_coco_evaluator_scores_perfect_and_degraded_predictions(coco_dataset, tmp_path):
    records = DatasetCatalog.get(coco_dataset)
    perfect = _evaluate(coco_dataset, records, _predictions(records), tmp_path / "perfect")
    assert perfect["bbox"]["AP"] == pytest.approx(100.0)
    assert perfect["segm"]["AP"] == pytest.approx(100.0)

    degraded = _evaluate(coco_dataset, copy.deepcopy(records), _predictions(records, shift=5), tmp_path / "shifted")
    assert 0.0 < degraded["bbox"]["AP"] < 90.0
    assert 0.0 < degraded["segm"]["AP"] < 90.0
    assert degraded["bbox"]["AP50"] > degraded["bbox"]["AP75"]
