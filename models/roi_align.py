"""RoIAlign as weighted row sums, for training on a CPU.

torchvision's CPU RoIAlign walks every RoI, channel and bin in one thread, and its backward
scatters each sample's four bilinear weights the same way. In the demo's Mask R-CNN step
(256 box RoIs at 7x7 and up to 128 mask RoIs at 14x14 per batch of 4, 32 channels) the
backward alone took 22 ms of a 164 ms step. With a fixed number of samples per bin the sample
points depend only on the boxes, so every bin is a weighted sum of a few rows of the
channels-last (B * H * W, C) feature map: its samples' four bilinear neighbours. Both the sum
and its gradient (the same pairs grouped by row) are one ``embedding_bag`` each, multi-threaded
and without the (bins, neighbours, channels) products a gather followed by a multiply would
hold. Same numbers as torchvision's kernel up to float rounding; forward+backward of the demo's
mask pooling (110 RoIs, 14x14, 32 channels) takes 3.1 ms against 7.4 ms for a gather and a
weighted sum on 2 idle cores.

:class:`ROIPooler` is detectron2's, with its RoIAlign levels replaced by :class:`ROIAlign`,
which takes this path on CPU tensors with ``sampling_ratio > 0`` and calls torchvision
otherwise (CUDA, and the adaptive ``sampling_ratio=0`` that varies per RoI).
"""
from typing import Tuple, Union

import torch
from detectron2.layers import ROIAlign as _ROIAlign
from detectron2.modeling.poolers import ROIPooler as _ROIPooler
from torch import nn
from torch.nn import functional as F

__all__ = ["roi_align_gather", "ROIAlign", "ROIPooler"]


def _bilinear_neighbours(coords: torch.Tensor, size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """Low and high neighbour indices, the weight of the high one, and whether each sample
    counts, along one axis of ``size`` pixels, with torchvision's rules: a sample beyond one
    pixel outside the map is zero, one at or below 0 reads row 0, and one at or past the
    last row reads the last row."""
    inside = (coords >= -1.0) & (coords <= size)
    coords = coords.clamp(min=0)
    low = coords.floor().clamp(max=size - 1)
    coords = torch.where(low >= size - 1, low, coords)
    high = (low + 1).clamp(max=size - 1)
    return low.long(), high.long(), coords - low, inside


def roi_align_gather(input: torch.Tensor, rois: torch.Tensor, output_size: Union[int, Tuple[int, int]],
                     spatial_scale: float, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """``torchvision.ops.roi_align`` for a fixed ``sampling_ratio`` >= 1, computed in float32
    (float64 for float64 input) as weighted sums of feature-map rows (see the module docstring).

    Args:
        input: (B, C, H, W) features.
        rois: (R, 5) rows of (batch index, x0, y0, x1, y1) in input-image pixels.
        output_size: bins per RoI, ``(height, width)`` or one int for both.
        spatial_scale: feature-map pixels per image pixel.
        sampling_ratio: samples per bin along each axis (averaged).
        aligned: shift the box by -0.5 feature pixels (detectron2's ROIAlignV2).

    Returns:
        (R, C, output_height, output_width) float32, or float64 for float64 input.
    """
    if sampling_ratio < 1:
        raise ValueError(f"roi_align_gather needs a fixed sampling_ratio >= 1, got {sampling_ratio}")
    pooled_h, pooled_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    batch, channels, height, width = input.shape
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32  # float64 stays float64
    rois = rois.to(dtype)
    offset = 0.5 if aligned else 0.0
    start_x, start_y = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w, roi_h = rois[:, 3] * spatial_scale - offset - start_x, rois[:, 4] * spatial_scale - offset - start_y
    if not aligned:  # the legacy op makes every box at least one pixel
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / pooled_w, roi_h / pooled_h
    # Sample positions as torchvision computes them: start + bin * size + (i + 0.5) * size / grid.
    grid = torch.arange(sampling_ratio, dtype=dtype, device=input.device) + 0.5
    bins_y = torch.arange(pooled_h, dtype=dtype, device=input.device)
    bins_x = torch.arange(pooled_w, dtype=dtype, device=input.device)
    ys = (start_y[:, None, None] + bins_y[None, :, None] * bin_h[:, None, None]
          + grid[None, None, :] * bin_h[:, None, None] / sampling_ratio)
    xs = (start_x[:, None, None] + bins_x[None, :, None] * bin_w[:, None, None]
          + grid[None, None, :] * bin_w[:, None, None] / sampling_ratio)
    y_low, y_high, ly, y_in = _bilinear_neighbours(ys.flatten(1), height)  # (R, pooled_h * grid)
    x_low, x_high, lx, x_in = _bilinear_neighbours(xs.flatten(1), width)

    # Rows of the (B * H * W, C) map and weights of the four neighbours of every sample: one bag
    # of sampling_ratio^2 x 4 rows per bin, laid out (R, bin y, bin x, sample y, sample x, 4).
    base = (rois[:, 0].long() * (height * width))[:, None, None]
    rows_y = torch.stack([y_low, y_low, y_high, y_high], -1)[:, :, None, :] * width
    cols_x = torch.stack([x_low, x_high, x_low, x_high], -1)[:, None, :, :]
    weight_y = torch.stack([1 - ly, 1 - ly, ly, ly], -1)[:, :, None, :]
    weight_x = torch.stack([1 - lx, lx, 1 - lx, lx], -1)[:, None, :, :]
    inside = (y_in[:, :, None] & x_in[:, None, :])[..., None]
    index = base[..., None] + rows_y + cols_x  # (R, pooled_h * grid, pooled_w * grid, 4)
    weight = weight_y * weight_x * inside / (sampling_ratio * sampling_ratio)
    bags = (-1, pooled_h, sampling_ratio, pooled_w, sampling_ratio, 4)
    index = index.view(bags).permute(0, 1, 3, 2, 4, 5).reshape(-1, sampling_ratio * sampling_ratio * 4)
    weight = weight.view(bags).permute(0, 1, 3, 2, 4, 5).reshape(index.shape)

    features = input.to(dtype).permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    pooled = _WeightedRowSum.apply(features, index, weight)
    return pooled.view(-1, pooled_h, pooled_w, channels).permute(0, 3, 1, 2)


class _WeightedRowSum(torch.autograd.Function):
    """``out[i] = sum_k weight[i, k] * rows[index[i, k]]`` and its gradient for ``rows``, both
    as ``embedding_bag`` sums: the forward over the bags as given, the backward over the same
    pairs grouped by row (a stable sort of ``index``, so each row's gradient adds its terms in
    RoI, bin and neighbour order, as torchvision's kernel does). Neither materialises the
    (bins, neighbours, channels) products that a gather followed by a weighted sum would."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, weight)
        ctx.num_rows = rows.shape[0]
        return F.embedding_bag(index, rows, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, weight = ctx.saved_tensors
        flat = index.flatten()
        order = flat.argsort(stable=True)
        offsets = torch.zeros(ctx.num_rows, dtype=torch.long, device=flat.device)
        offsets[1:] = torch.bincount(flat, minlength=ctx.num_rows).cumsum(0)[:-1]
        grad_rows = F.embedding_bag(order // index.shape[1], grad.contiguous(), offsets,
                                    per_sample_weights=weight.flatten()[order], mode="sum")
        return grad_rows, None, None


class ROIAlign(_ROIAlign):
    """detectron2's ``ROIAlign``, computed by :func:`roi_align_gather` on CPU tensors when the
    number of samples per bin is fixed; the output has the input's dtype, as under torchvision's
    autocast rule."""

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if input.device.type != "cpu" or self.sampling_ratio <= 0 or input.dim() != 4:
            return super().forward(input, rois)
        with torch.autocast("cpu", enabled=False):
            pooled = roi_align_gather(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                                      self.aligned)
        return pooled.to(input.dtype)


class ROIPooler(_ROIPooler):
    """detectron2's ``ROIPooler`` with :class:`ROIAlign` levels for "ROIAlign" and "ROIAlignV2"."""

    def __init__(self, output_size, scales, sampling_ratio, pooler_type, canonical_box_size=224,
                 canonical_level=4) -> None:
        super().__init__(output_size, scales, sampling_ratio, pooler_type, canonical_box_size=canonical_box_size,
                         canonical_level=canonical_level)
        if pooler_type in ("ROIAlign", "ROIAlignV2"):
            self.level_poolers = nn.ModuleList(
                ROIAlign(self.output_size, spatial_scale=scale, sampling_ratio=sampling_ratio,
                         aligned=pooler_type == "ROIAlignV2") for scale in scales)
