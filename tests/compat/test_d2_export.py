"""detectron2.export on a MIMDet model: TracingAdapter + torch.jit.trace give eager's outputs.

As detectron2's tools/deploy/export_model.py does for ``--export-method tracing``: the model's
``inference(inputs, do_postprocess=False)`` is traced through a TracingAdapter, which flattens
the ``[{"image": tensor}]`` inputs and the Instances outputs into tensors.
"""
import warnings
from pathlib import Path
from typing import Dict, List

import pytest
import torch

import models  # noqa: F401  (applies the compatibility layer before detectron2 is imported)
from detectron2.config import instantiate
from detectron2.export import TracingAdapter
from detectron2.structures import Instances

from models.config import load_config

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("pred_boxes", "scores", "pred_classes", "pred_masks")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """The tiny MIMDet Mask R-CNN with random weights, seeing every token, keeping every detection."""
    cfg = load_config(str(REPO / "configs/test/tiny_mimdet.py"))
    bottom_up = cfg.model.backbone.bottom_up
    bottom_up.sample_ratio = bottom_up.eval_sample_ratio = 1.0  # no random token sampling
    # Random weights score every class about 1/81: without this threshold nothing would be compared.
    cfg.model.roi_heads.box_predictor.test_score_thresh = 0.0
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    assert model.backbone.bottom_up.active_sample_ratio == 1.0
    return model


def _inference(model: torch.nn.Module, inputs: List[Dict[str, torch.Tensor]]) -> List[Dict[str, Instances]]:
    """Raw detections (boxes on the resized input, 28x28 mask probabilities), as export_model.py."""
    return [{"instances": instances} for instances in model.inference(inputs, do_postprocess=False)]


def _images(*shapes, seed: int = 0) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for shape in shapes]


def _trace(model: torch.nn.Module, images: List[torch.Tensor]):
    adapter = TracingAdapter(model, [{"image": image} for image in images], _inference)
    with warnings.catch_warnings():
        # detectron2's boxes, NMS and poolers turn sizes into Python values (TracerWarnings);
        # the comparisons with eager below are what tells whether the trace is right.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(adapter, adapter.flattened_inputs)
    return adapter, traced


def _assert_same(traced: Instances, eager: Instances) -> None:
    assert len(eager) > 0 and len(traced) == len(eager)
    assert tuple(int(side) for side in traced.image_size) == eager.image_size  # a tensor when traced
    assert set(traced.get_fields()) == set(FIELDS)
    torch.testing.assert_close(traced.pred_boxes.tensor, eager.pred_boxes.tensor)
    torch.testing.assert_close(traced.scores, eager.scores)
    assert torch.equal(traced.pred_classes, eager.pred_classes)
    torch.testing.assert_close(traced.pred_masks, eager.pred_masks)


@torch.no_grad()
def test_traced_mimdet_matches_eager_at_the_traced_and_other_sizes(model):
    """Traced on one 64x96 image, the graph serves other images and sizes too: the padded size,
    the token grid, the resized position table and the RoI boxes are computed from the input's
    shape in the graph. At sample ratio 1 the encoder skips the token shuffle (encoder.py: every
    token kept), so nothing random is traced."""
    (image,) = _images((3, 64, 96))
    adapter, traced = _trace(model, [image])
    graph = str(traced.inlined_graph)
    assert "aten::rand" not in graph and "aten::argsort" not in graph  # no token sampling was traced
    for other in [image] + _images((3, 64, 96), (3, 80, 64), (3, 100, 130), seed=1):
        (eager,) = _inference(model, [{"image": other}])
        (outputs,) = adapter.outputs_schema(traced(other))
        _assert_same(outputs["instances"], eager["instances"])


@torch.no_grad()
def test_traced_mimdet_matches_eager_on_batches_of_two(model):
    """Traced on two images of different sizes (padded to one batch), the graph gives each
    image's detections for that pair and for another pair of other sizes."""
    traced_pair = _images((3, 64, 96), (3, 96, 64), seed=2)
    adapter, traced = _trace(model, traced_pair)
    for pair in (traced_pair, _images((3, 80, 64), (3, 64, 112), seed=3)):
        eager = _inference(model, [{"image": image} for image in pair])
        outputs = adapter.outputs_schema(traced(*pair))
        assert len(outputs) == 2
        for traced_image, eager_image in zip(outputs, eager):
            _assert_same(traced_image["instances"], eager_image["instances"])
