"""Outlines of binary masks as exact COCO polygons (for the synthetic shapes), and drawings of
instances (masks, boxes, class names, scores) with detectron2's ``Visualizer``, for dataset
previews and ``tools/infer.py``.
"""
import colorsys
from typing import List, Optional, Sequence

import numpy as np
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["class_colors", "draw_instances", "is_simple_region", "trace_outline", "upscale_factor"]

MASK_ALPHA = 0.45


def _grow(seed: np.ndarray, allowed: np.ndarray, diagonal: bool) -> np.ndarray:
    """Pixels of ``allowed`` connected to ``seed`` (4- or 8-connectivity)."""
    region = seed & allowed
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        across = grown.copy() if diagonal else region  # row then column dilation: 3x3
        grown[:, 1:] |= across[:, :-1]
        grown[:, :-1] |= across[:, 1:]
        grown &= allowed
        if grown.sum() == region.sum():  # grown contains region, so nothing new
            return grown
        region = grown


def _crop(mask: np.ndarray) -> np.ndarray:
    """The mask's bounding box, padded with one empty pixel on each side."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.pad(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], 1)


def is_simple_region(mask: np.ndarray) -> bool:
    """True if ``mask`` is one 4-connected region with no holes (background 8-connected)."""
    if not mask.any():
        return False
    crop = _crop(mask)
    seed = np.zeros_like(crop)
    seed.flat[np.argmax(crop)] = True
    if _grow(seed, crop, diagonal=False).sum() != crop.sum():
        return False
    outside = np.zeros_like(crop)
    outside[0] = outside[-1] = outside[:, 0] = outside[:, -1] = True
    return _grow(outside, ~crop, diagonal=True).sum() + crop.sum() == crop.size


def trace_outline(mask: np.ndarray) -> List[float]:
    """Outline of a simple region along pixel edges, as a flat COCO polygon [x0, y0, x1, ...].

    Walks the boundary with the region on the right, turning right where the pixel ahead
    on the right is background (so diagonal pixels are not connected), and keeps the corners.
    """
    padded = np.pad(mask, 1)
    r0, c0 = np.argwhere(padded)[0]  # topmost, then leftmost pixel; its top edge is boundary
    start = (int(c0), int(r0))
    (x, y), (dx, dy) = start, (1, 0)
    corners = []
    while True:
        x, y = x + dx, y + dy
        ahead_right = padded[y + (dy + dx - 1) // 2, x + (dx - dy - 1) // 2]
        ahead_left = padded[y + (dy - dx - 1) // 2, x + (dx + dy - 1) // 2]
        if not ahead_right:
            turn = (-dy, dx)
        elif ahead_left:
            turn = (dy, -dx)
        else:
            turn = (dx, dy)
        if turn != (dx, dy):
            corners.append((x - 1, y - 1))  # padded corner -> image corner
            dx, dy = turn
        if (x, y) == start and (dx, dy) == (1, 0):
            break
    return [float(v) for corner in corners for v in corner]


def class_colors(num_classes: int) -> np.ndarray:
    """(num_classes, 3) RGB colours in [0, 1], evenly spread hues so neighbouring classes differ."""
    hues = (np.arange(num_classes) * 0.618034) % 1.0  # golden-ratio steps
    return np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues])


def upscale_factor(height: int, width: int, min_size: int) -> int:
    """Smallest integer factor that makes the short side at least ``min_size`` (>= 1)."""
    return max(1, -(-min_size // max(1, min(height, width))))


def draw_instances(
    image: np.ndarray,
    boxes: np.ndarray,
    classes: Sequence[int],
    class_names: Sequence[str],
    scores: Optional[Sequence[float]] = None,
    masks: Optional[np.ndarray] = None,
    min_size: int = 0,
) -> np.ndarray:
    """Draw instances on an RGB image with detectron2's ``Visualizer``; return the drawing
    (uint8, H', W', 3).

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) XYXY in pixels of ``image``.
        classes: N contiguous class indices into ``class_names``.
        class_names: names of all classes (an index beyond them is drawn as "class <i>").
        scores: N confidences, shown after the names; None for ground truth.
        masks: (N, H, W) bool, or None.
        min_size: draw at an integer scale that makes the short side at least this, so
            labels stay readable on small images.
    """
    factor = upscale_factor(image.shape[0], image.shape[1], min_size)
    colors = class_colors(max(len(class_names), max(classes, default=0) + 1))
    names = [class_names[c] if c < len(class_names) else f"class {c}" for c in classes]
    labels = names if scores is None else [f"{name} {score:.2f}" for name, score in zip(names, scores)]
    visualizer = Visualizer(image, scale=factor, instance_mode=ColorMode.IMAGE)
    drawing = visualizer.overlay_instances(
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else None,
        labels=labels or None,
        masks=None if masks is None or not len(masks) else np.asarray(masks, dtype=bool),
        assigned_colors=[tuple(colors[c]) for c in classes] or None,
        alpha=MASK_ALPHA,
    )
    return drawing.get_image()
