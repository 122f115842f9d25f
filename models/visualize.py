"""Drawings of instances (masks, boxes, class names, scores) with detectron2's ``Visualizer``,
for dataset previews and ``tools/infer.py``.
"""
import colorsys
from typing import Optional, Sequence

import numpy as np
from detectron2.utils.visualizer import ColorMode, Visualizer, VisImage

__all__ = ["class_colors", "draw_instances", "spread_labels", "upscale_factor"]

MASK_ALPHA = 0.45


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
    spread_labels(drawing)
    return drawing.get_image()


def spread_labels(output: VisImage, gap: float = 1.0) -> int:
    """Move the labels of a drawing so that none covers another; return how many moved.

    ``Visualizer`` puts each label at its box's top-left corner (below a small box). Two
    detections of one object, of two classes, have nearly the same box, and their labels are
    printed over each other, unreadable. Here each label, in the order drawn (largest instance
    first), goes down just below every earlier label it would overlap, ``gap`` pixels apart, or
    up above them where below would leave the picture.
    """
    renderer = output.canvas.get_renderer()
    to_data = output.ax.transData.inverted()
    placed, moved = [], 0

    def settle(x0, y0, x1, y1, down: bool) -> float:
        """How far (display pixels, down positive) the box must move to overlap no placed label."""
        shift = 0.0
        for _ in range(len(placed) + 1):
            hit = next((p for p in placed if x0 < p[2] and p[0] < x1 and y0 - shift < p[3] and p[1] < y1 - shift),
                       None)
            if hit is None:
                break
            shift = y1 - hit[1] if down else y0 - hit[3]  # top to its bottom, or bottom to its top
        return shift

    for text in output.ax.texts:
        box = text.get_window_extent(renderer)  # display pixels, y pointing up from the picture's bottom
        x0, y0, x1, y1 = box.x0 - gap, box.y0 - gap, box.x1 + gap, box.y1 + gap
        shift = settle(x0, y0, x1, y1, down=True)
        if y0 - shift < 0:  # below the picture: above the labels it meets instead
            shift = settle(x0, y0, x1, y1, down=False)
        if shift:
            x, y = output.ax.transData.transform(text.get_position())
            text.set_position(to_data.transform((x, y - shift)))
            moved += 1
        placed.append((x0, y0 - shift, x1, y1 - shift))
    return moved
