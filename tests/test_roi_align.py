"""The gather RoIAlign: torchvision's numbers and gradients, the same pooler outputs as
detectron2's, and torchvision itself where the gather does not apply."""
from pathlib import Path

import models  # noqa: F401  (before detectron2)
import pytest
import torch
from detectron2.config import instantiate
from detectron2.modeling.poolers import ROIPooler as D2ROIPooler
from detectron2.structures import Boxes
from torchvision.ops import roi_align

from models.config import load_config
from models.roi_align import ROIAlign, ROIPooler, roi_align_gather

REPO = Path(__file__).resolve().parents[1]


def _boxes(count: int, width: float, height: float, seed: int = 0) -> torch.Tensor:
    """(count, 5) RoIs over a 2-image batch: some reach past the border, some are under a pixel."""
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, 2, (count, 1), generator=generator).float()
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([width + 40, height + 40]) - 20
    size = torch.rand(count, 2, generator=generator) * 60
    size[:4] = 0.3
    return torch.cat([batch, corner, corner + size], 1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("output_size", [7, (3, 5)])
def test_gather_matches_torchvision_values_and_gradients(aligned, sampling_ratio, output_size):
    torch.manual_seed(0)
    features = torch.randn(2, 5, 13, 17, requires_grad=True)
    rois = _boxes(60, 17 * 8, 13 * 8)
    expected = roi_align(features, rois, output_size, 0.125, sampling_ratio, aligned)
    upstream = torch.randn_like(expected)
    expected_grad, = torch.autograd.grad(expected, features, upstream)
    ours = roi_align_gather(features, rois, output_size, 0.125, sampling_ratio, aligned)
    ours_grad, = torch.autograd.grad(ours, features, upstream)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=0, atol=1e-5)


def test_gather_needs_a_fixed_sampling_ratio():
    with pytest.raises(ValueError, match="sampling_ratio >= 1, got 0"):
        roi_align_gather(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, 1.0, 0, True)


def test_module_keeps_the_input_dtype_and_handles_no_rois():
    layer = ROIAlign((7, 7), spatial_scale=0.25, sampling_ratio=1, aligned=True)
    features = torch.randn(2, 4, 16, 16)
    rois = _boxes(9, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = layer(features.bfloat16(), rois)
    assert pooled.dtype == torch.bfloat16 and pooled.shape == (9, 4, 7, 7)
    assert layer(features, rois[:0]).shape == (0, 4, 7, 7)


def test_adaptive_sampling_falls_back_to_torchvision(monkeypatch):
    calls = []
    monkeypatch.setattr("models.roi_align.roi_align_gather", lambda *a, **k: calls.append(a))
    layer = ROIAlign((7, 7), spatial_scale=0.25, sampling_ratio=0, aligned=True)
    features, rois = torch.randn(2, 4, 16, 16), _boxes(5, 64, 64)
    assert torch.equal(layer(features, rois), roi_align(features, rois, (7, 7), 0.25, 0, True))
    assert not calls


@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign"])
def test_pooler_gives_detectron2s_outputs_on_every_level(pooler_type):
    torch.manual_seed(0)
    scales = (1 / 4, 1 / 8, 1 / 16)
    kwargs = dict(output_size=7, scales=scales, sampling_ratio=1, pooler_type=pooler_type)
    ours, theirs = ROIPooler(**kwargs), D2ROIPooler(**kwargs)
    assert all(isinstance(level, ROIAlign) for level in ours.level_poolers)
    features = [torch.randn(2, 8, int(128 * s), int(128 * s), requires_grad=True) for s in scales]
    boxes = [Boxes(_boxes(40, 128, 128, seed=i)[:, 1:].clamp(0, 128)) for i in range(2)]
    # Larger boxes, pooled from the coarser levels (detectron2 maps a 224-px box to the third).
    boxes[0].tensor[:3] = torch.tensor([[10.0, 10.0, 150.0, 140.0], [0.0, 20.0, 120.0, 128.0],
                                        [5.0, 5.0, 300.0, 290.0]])
    boxes[1].tensor[:2] = torch.tensor([[-20.0, -10.0, 260.0, 250.0], [30.0, 40.0, 180.0, 170.0]])
    expected, pooled = theirs(features, boxes), ours(features, boxes)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), features) for out in (pooled, expected)]
    for ours_grad, expected_grad in zip(*grads):
        # Sums of up to ~400 here, added in another order: float rounding is relative.
        torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-6, atol=1e-5)


def test_the_detector_configs_pool_with_it():
    cfg = load_config(str(REPO / "configs" / "demo" / "mimdet_shapes.py"))
    roi_heads = instantiate(cfg.model.roi_heads)
    for pooler in (roi_heads.box_pooler, roi_heads.mask_pooler):
        assert all(isinstance(level, ROIAlign) and level.sampling_ratio == 1 for level in pooler.level_poolers)


def test_float64_input_is_pooled_in_float64():
    features = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.3, 2.1, 17.7, 19.2]], dtype=torch.float64)
    layer = ROIAlign(3, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    assert torch.autograd.gradcheck(lambda x: layer(x, rois), (features,))


def test_no_rois_still_give_a_gradient():
    features = torch.randn(2, 3, 8, 8, requires_grad=True)
    pooled = ROIAlign(3, spatial_scale=0.25, sampling_ratio=2, aligned=True)(features, torch.zeros(0, 5))
    assert pooled.shape == (0, 3, 3, 3)
    grad, = torch.autograd.grad(pooled.sum(), features)
    assert torch.equal(grad, torch.zeros_like(features))
