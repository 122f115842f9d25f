"""Masks and drawings with numpy and PIL only: outlines of binary masks as COCO polygons,
and drawings of instances (masks, boxes, class names, scores).

detectron2's ``Visualizer`` needs OpenCV, which MIMDet does not depend on; ``draw_instances``
draws the same things for dataset previews and ``tools/infer.py``.
"""
import colorsys
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
    """(num_classes, 3) uint8 colours, evenly spread hues so neighbouring classes differ."""
    hues = (np.arange(num_classes) * 0.618034) % 1.0  # golden-ratio steps
    return np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]) * 255


def upscale_factor(height: int, width: int, min_size: int) -> int:
    """Smallest integer factor that makes the short side at least ``min_size`` (>= 1)."""
    return max(1, -(-min_size // max(1, min(height, width))))


def _edge(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def draw_instances(
    image: np.ndarray,
    boxes: np.ndarray,
    classes: Sequence[int],
    class_names: Sequence[str],
    scores: Optional[Sequence[float]] = None,
    masks: Optional[np.ndarray] = None,
    min_size: int = 0,
) -> np.ndarray:
    """Draw instances on an RGB image and return the drawing (uint8, H', W', 3).

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) XYXY in pixels of ``image``.
        classes: N contiguous class indices into ``class_names``.
        class_names: names of all classes (an index beyond them is drawn as "class <i>").
        scores: N confidences, shown after the names; None for ground truth.
        masks: (N, H, W) bool, or None.
        min_size: upscale by an integer factor until the short side is at least this, so
            labels stay readable on small images.
    """
    factor = upscale_factor(image.shape[0], image.shape[1], min_size)
    canvas = np.repeat(np.repeat(image, factor, 0), factor, 1).astype(np.float64)
    colors = class_colors(max(len(class_names), max(classes, default=0) + 1))
    order = range(len(boxes))
    for i in order:
        if masks is not None:
            mask = np.repeat(np.repeat(np.asarray(masks[i], bool), factor, 0), factor, 1)
            color = colors[classes[i]]
            canvas[mask] = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * color
            canvas[_edge(mask)] = color
    drawing = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(drawing)
    font = ImageFont.load_default()
    for i in order:
        color = tuple(int(c) for c in colors[classes[i]])
        x0, y0, x1, y1 = (float(v) * factor for v in boxes[i])
        draw.rectangle([x0, y0, x1, y1], outline=color, width=max(1, factor))
        name = class_names[classes[i]] if classes[i] < len(class_names) else f"class {classes[i]}"
        label = name if scores is None else f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_y = y0 - (bottom - top) - 2 if y0 >= bottom - top + 2 else y0
        draw.rectangle([x0, text_y, x0 + right - left + 2, text_y + bottom - top + 2], fill=color)
        draw.text((x0 + 1 - left, text_y + 1 - top), label, fill=(0, 0, 0), font=font)
    return np.asarray(drawing)
