"""Synthetic shapes: a small COCO-format instance-segmentation dataset made on the fly.

Images of 160-256 px hold 2-6 coloured shapes (circle, rectangle, triangle, star, cross) of
16-64 px, rotated, shaded and drawn over textured backgrounds (gradients, stripes, blotches,
checkers); later shapes occlude earlier ones. Every image is a function of (seed, split,
index) only, so the same seed gives the same bytes.

Masks are honest about occlusion: each instance's mask is what stays visible after the later
shapes are drawn. A placement is refused (and retried elsewhere) if it would leave any shape
less than ``min_visible_fraction`` visible, split it in two or punch a hole in it, so every
visible region is one simple outline. That outline runs along pixel edges (the shapely union
of the region's pixel rows) and is stored as a COCO polygon, which pycocotools rasterizes back
to the same pixels; polygons are what
detectron2's default ``instance_mask_format="polygon"`` reads (RLE would need "bitmask").
``bbox`` is tight around the visible pixels and ``area`` is their count.
"""
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import cv2
import shapely
from PIL import Image, ImageDraw

from models.lifetime import die_with_parent

__all__ = ["SHAPE_CLASSES", "DATASET_NAMES", "ShapesConfig", "render_image", "generate_split",
           "ensure_shapes", "register_shapes", "is_simple_region", "pixel_outline", "RenderingProcessDied"]

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "rectangle", "triangle", "star", "cross")
DATASET_NAMES = ("shapes_train", "shapes_val")
SPLITS = ("train", "val")
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """What the generator draws; stored in each json's ``info`` so stale data is regenerated."""

    image_size: Tuple[int, int] = (160, 256)  # each side uniform in [min, max] px
    object_size: Tuple[int, int] = (16, 64)  # shape diameter, px
    objects_per_image: Tuple[int, int] = (2, 6)
    min_visible_fraction: float = 0.6  # of a shape's own area, after occlusion
    min_area: int = 48  # px, visible
    max_tries: int = 20  # placements tried per shape before it is left out
    min_color_distance: float = 90.0  # RGB distance to the background and overlapped shapes
    circle_vertices: int = 32
    star_inner_ratio: float = 0.45
    cross_arm_ratio: float = 0.34  # arm width / diameter
    noise_std: float = 4.0


def _outline(kind: str, size: float, angle: float, aspect: float, cfg: ShapesConfig) -> np.ndarray:
    """Vertices (N, 2) of a shape of diameter ``size`` centred on 0, rotated by ``angle``."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, cfg.circle_vertices, endpoint=False)
        unit = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "rectangle":
        unit = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]]) / np.hypot(1, aspect)
    elif kind == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        unit = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, cfg.star_inner_ratio)
        unit = np.stack([np.cos(t), np.sin(t)], 1) * radius[:, None]
    elif kind == "cross":
        a = cfg.cross_arm_ratio
        unit = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                         [-a, a], [-1, a], [-1, -a], [-a, -a]])
    else:
        raise ValueError(f"unknown shape '{kind}'; known: {SHAPE_CLASSES}")
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return unit @ rotation.T * (size / 2)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float (H, W, 3) texture: gradient, stripes, blotches or checkers between two colours."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    kind = rng.integers(4)
    if kind == 0:
        t = (along - along.min()) / np.ptp(along)
    elif kind == 1:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * along / rng.uniform(6, 30))
    elif kind == 2:
        grid = rng.uniform(0, 1, (height // 24 + 2, width // 24 + 2)).astype(np.float32)
        t = np.asarray(Image.fromarray(grid, "F").resize((width, height), Image.BICUBIC), np.float64)
    else:
        cell = rng.uniform(8, 24)
        t = ((xx // cell + yy // cell) % 2).astype(np.float64)
    low = rng.uniform(0, 255, 3)
    high = np.clip(low + rng.uniform(-90, 90, 3), 0, 255)
    return low + np.clip(t, 0, 1)[..., None] * (high - low)


def is_simple_region(mask: np.ndarray) -> bool:
    """True if ``mask`` is one 4-connected region without holes: its background (padded by a
    pixel all round) is one 4-connected region too. A background pocket that reaches the
    outside only through a pixel corner counts as a hole: the outline along pixel edges would
    touch itself at that corner, which a COCO polygon cannot express."""
    if not mask.any():
        return False
    foreground, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    background, _ = cv2.connectedComponents(np.pad(~mask, 1, constant_values=True).astype(np.uint8),
                                            connectivity=4)
    return foreground == 2 and background == 2  # each count includes the other's label 0


def pixel_outline(mask: np.ndarray) -> List[float]:
    """Outline of a simple region (see ``is_simple_region``) along pixel edges, as a flat COCO
    polygon ``[x0, y0, x1, y1, ...]`` that rasterizes back to exactly ``mask``.

    The union (shapely) of one rectangle per horizontal run of pixels, with collinear vertices
    removed. The ring is clockwise on screen (region on the right of each edge) and ends at the
    top-left corner of the topmost row's leftmost pixel.
    """
    if not mask.any():
        raise ValueError("pixel_outline needs one 4-connected region without holes, got an empty mask")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, left = rows[0], cols[0]
    window = mask[top:rows[-1] + 1, left:cols[-1] + 1].astype(np.int8)
    # Row-major order: in each row a run's start (+1) is followed by its end (-1).
    run_y, run_x = np.nonzero(np.diff(np.pad(window, ((0, 0), (1, 1))), axis=1))
    y, x0, x1 = run_y[::2] + top, run_x[::2] + left, run_x[1::2] + left
    region = shapely.union_all(shapely.box(x0, y, x1, y + 1)).simplify(0)
    if region.geom_type != "Polygon" or region.interiors:
        raise ValueError("pixel_outline needs one 4-connected region without holes")
    corners = np.asarray(region.exterior.coords)[:-1]
    if not shapely.LinearRing(corners).is_ccw:  # counter-clockwise in y-up axes is clockwise on screen
        corners = corners[::-1]
    start = (float(np.argmax(mask[top])), float(top))
    last = next(i for i, corner in enumerate(corners) if tuple(corner) == start)
    corners = np.roll(corners, len(corners) - 1 - last, axis=0)
    return [float(v) for v in corners.ravel()]


def _pick_color(rng: np.random.Generator, avoid: Sequence[np.ndarray], cfg: ShapesConfig) -> np.ndarray:
    """A colour far from every colour in ``avoid`` (the best of ``max_tries`` if none is far enough)."""
    candidates = rng.uniform(0, 255, (cfg.max_tries, 3))
    distance = np.min([np.linalg.norm(candidates - a, axis=1) for a in avoid], axis=0)
    far = np.flatnonzero(distance >= cfg.min_color_distance)
    return candidates[far[0] if len(far) else np.argmax(distance)]


def render_image(rng: np.random.Generator, cfg: ShapesConfig = ShapesConfig()) -> Tuple[np.ndarray, List[dict]]:
    """One image (H, W, 3) uint8 and its instances ``{"category": index, "mask": (H, W) bool}``."""
    width, height = (int(v) for v in rng.integers(cfg.image_size[0], cfg.image_size[1] + 1, 2))
    canvas = _background(rng, height, width)
    yy, xx = np.mgrid[0:height, 0:width]
    shapes: List[dict] = []  # {"category", "full", "visible", "color"}
    for _ in range(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1)):
        for _try in range(cfg.max_tries):
            category = int(rng.integers(len(SHAPE_CLASSES)))
            size = rng.uniform(*cfg.object_size)
            center = rng.uniform([size / 2, size / 2], [width - size / 2, height - size / 2])
            points = _outline(SHAPE_CLASSES[category], size, rng.uniform(0, 2 * np.pi), rng.uniform(0.55, 1.0), cfg)
            layer = Image.new("L", (width, height), 0)
            ImageDraw.Draw(layer).polygon([tuple(p) for p in points + center], fill=1)
            mask = np.asarray(layer, dtype=bool)
            if mask.sum() < cfg.min_area or not is_simple_region(mask):
                continue
            occluded = [s for s in shapes if (s["visible"] & mask).any()]
            if all(_still_visible(s, s["visible"] & ~mask, cfg) for s in occluded):
                break
        else:
            continue  # no room for this shape
        for s in occluded:
            s["visible"] = s["visible"] & ~mask
        color = _pick_color(rng, [canvas[mask].mean(0)] + [s["color"] for s in occluded], cfg)
        shade_angle = rng.uniform(0, 2 * np.pi)
        shade = ((xx - center[0]) * np.cos(shade_angle) + (yy - center[1]) * np.sin(shade_angle)) / size
        canvas[mask] = color + rng.uniform(10, 40) * shade[mask][:, None]
        shapes.append({"category": category, "full": mask, "visible": mask, "color": color})
    canvas += rng.normal(0, cfg.noise_std, canvas.shape)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, [{"category": s["category"], "mask": s["visible"]} for s in shapes]


def _still_visible(shape: dict, visible: np.ndarray, cfg: ShapesConfig) -> bool:
    area = visible.sum()
    return bool(area >= cfg.min_area and area >= cfg.min_visible_fraction * shape["full"].sum()
                and is_simple_region(visible))


def _annotation(instance: dict) -> dict:
    """An instance's COCO annotation, without its ``id`` and ``image_id``."""
    mask = instance["mask"]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    return {"category_id": instance["category"] + 1, "bbox": bbox, "area": int(mask.sum()), "iscrowd": 0,
            "segmentation": [pixel_outline(mask)]}


def _write_image(job: Tuple[str, str, int, int, ShapesConfig]) -> Tuple[dict, List[dict]]:
    """Render image ``index`` of a split, write it into ``image_root``; return its COCO image entry
    (without ``id``) and its annotations (without ``id`` and ``image_id``)."""
    image_root, split, index, seed, cfg = job
    image, instances = render_image(np.random.default_rng([seed, SPLITS.index(split), index]), cfg)
    file_name = f"{split}_{index:06d}.png"
    # Stored without compression: the noise the images carry leaves zlib little to gain
    # (15% smaller), and an uncompressed PNG is written 2x and read 5x faster.
    Image.fromarray(image).save(os.path.join(image_root, file_name), compress_level=0)
    entry = {"file_name": file_name, "height": image.shape[0], "width": image.shape[1]}
    return entry, [_annotation(instance) for instance in instances]


class RenderingProcessDied(RuntimeError):
    """A process rendering shapes ended before its images were done."""


def _map_in_processes(fn, jobs: list, processes: int) -> list:
    """``[fn(job) for job in jobs]``, in ``processes`` forked processes where there are several
    jobs, and in this one where forking is not available (Windows) or not asked for.

    A worker that dies (killed by the out-of-memory killer, say) raises an error here instead of
    leaving the parent waiting for its images forever, as ``multiprocessing.Pool`` would.
    """
    if processes <= 1 or len(jobs) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [fn(job) for job in jobs]
    # Fork, not spawn: a spawned process would import this package (and torch) again first.
    context = multiprocessing.get_context("fork")
    executor = ProcessPoolExecutor(min(processes, len(jobs)), mp_context=context, initializer=_quiet_worker,
                                   initargs=(os.getpid(),))
    try:
        # One job per task: on Ctrl-C or an error only the few images already handed out are
        # finished before the workers stop (an image takes ~20 ms; the hand-over ~0.1 ms).
        return list(executor.map(fn, jobs))
    except BrokenProcessPool as error:
        raise RenderingProcessDied(
            f"a process rendering shapes died before finishing its images (killed by the system, out of memory?); "
            f"run again, or in one process (processes=1, or --processes 1 for datasets/generate_shapes.py; this "
            f"run had {processes})") from error
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _quiet_worker(parent_pid: int) -> None:
    """Ctrl-C reaches the parent, which stops the workers; SIGTERM ends a worker at once,
    whatever handler it inherited: no traceback per worker. A worker ends with its parent
    (killed, say): it would otherwise wait for jobs forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent_pid)


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _split_info(split: str, num_images: int, seed: int, cfg: ShapesConfig) -> dict:
    return {"description": "MIMDet synthetic shapes", "version": FORMAT_VERSION, "split": split,
            "num_images": num_images, "seed": seed, "config": json.loads(json.dumps(dataclasses.asdict(cfg)))}


def _paths(root: str, split: str) -> Tuple[str, str]:
    """(json_file, image_root) of a split under ``root``."""
    return (os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split))


def _check_number(name: str, value, minimum: int, too_small: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(too_small)


def _check_arguments(split: str, num_images: int, seed: int, processes: Optional[int]) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    _check_number("num_images", num_images, 1, f"{split} needs at least one image, got num_images={num_images}")
    _check_number("seed", seed, 0, f"seed must be >= 0, got {seed}")
    if processes is not None:
        _check_number("processes", processes, 1, f"processes must be at least 1, got {processes}")


@contextlib.contextmanager
def _generation_lock(root: str) -> Iterator[None]:
    """One generator at a time in ``root``; a second one waits for the first. Two at once
    (with different seeds, say) would leave one's images under the other's json. Uses
    ``fcntl.flock`` on ``root/.generating.lock``, which the system releases when its holder
    dies; where ``fcntl`` is missing (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".generating.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Another process is generating shapes in %s; waiting for it to finish", root)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def generate_split(root: str, split: str, num_images: int, seed: int = 0,
                   cfg: ShapesConfig = ShapesConfig(), processes: Optional[int] = None) -> Tuple[str, str]:
    """Write ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json``.

    Image ids start at 1 (train) and 1,000,001 (val); file names carry the split, so splits
    never share ids or files. Images of an earlier, larger split are removed; other files in
    the folder are left alone. Returns (json_file, image_root).

    ``processes`` render the images side by side (default: one per available CPU); each image
    is a function of (seed, split, index) alone, so their number does not change a byte.

    The split's json is removed before the first image is written and written again after the
    last, so a run that is interrupted leaves no json, and the next run generates the split
    again. One generator at a time writes into ``root`` (a second waits).
    """
    _check_arguments(split, num_images, seed, processes)
    with _generation_lock(root):
        return _generate_split(root, split, num_images, seed, cfg, processes)


def _generate_split(root: str, split: str, num_images: int, seed: int, cfg: ShapesConfig,
                    processes: Optional[int]) -> Tuple[str, str]:
    if processes is None:
        processes = _available_cpus()
    json_file, image_root = _paths(root, split)
    if os.path.lexists(json_file) and not os.path.isdir(json_file):
        os.remove(json_file)  # the split is incomplete from here until the new json is written
    os.makedirs(image_root, exist_ok=True)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    split_index = SPLITS.index(split)
    jobs = [(image_root, split, index, seed, cfg) for index in range(num_images)]
    images, annotations = [], []
    for index, (entry, image_annotations) in enumerate(_map_in_processes(_write_image, jobs, processes)):
        image_id = split_index * 1_000_000 + index + 1
        images.append({"id": image_id, **entry})
        for annotation in image_annotations:
            annotation_id = len(annotations) + 1 + split_index * 10_000_000
            annotations.append({"id": annotation_id, "image_id": image_id, **annotation})
    current = {image["file_name"] for image in images}
    for name in os.listdir(image_root):  # images of an earlier, larger split are not data any more
        if name.startswith(f"{split}_") and name.endswith(".png") and name not in current:
            os.remove(os.path.join(image_root, name))
    coco = {"info": _split_info(split, num_images, seed, cfg), "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(SHAPE_CLASSES)]}
    temporary = f"{json_file}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as f:
            json.dump(coco, f)
        os.replace(temporary, json_file)  # the json comes last: its presence means the split is complete
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)
    logger.info("Wrote %d %s images with %d shapes to %s", num_images, split, len(annotations), image_root)
    return json_file, image_root


def _is_current(root: str, split: str, num_images: int, seed: int, cfg: ShapesConfig, quiet: bool = False) -> bool:
    json_file, image_root = _paths(root, split)
    if not os.path.isfile(json_file):
        return False
    try:
        with open(json_file) as f:
            coco = json.load(f)
        return coco.get("info") == _split_info(split, num_images, seed, cfg) and all(
            os.path.isfile(os.path.join(image_root, image["file_name"])) for image in coco["images"])
    except (ValueError, AttributeError, TypeError, KeyError):  # a damaged or foreign file: generate it again
        if not quiet:
            logger.warning("%s is not a json this generator wrote (damaged?): generating the %s split again",
                           json_file, split)
        return False


def ensure_shapes(root: str, num_train: int = 600, num_val: int = 100, seed: int = 0,
                  cfg: ShapesConfig = ShapesConfig(), processes: Optional[int] = None,
                  force: bool = False) -> Dict[str, Tuple[str, str]]:
    """Generate the train and val splits under ``root`` unless they are already there with
    the same sizes, seed and config, or always with ``force`` (``processes``: see
    :func:`generate_split`). Both splits are written under one hold of the folder's lock, so a
    second generator waits for both. Returns ``{split: (json_file, image_root)}``."""
    for split, num_images in zip(SPLITS, (num_train, num_val)):
        _check_arguments(split, num_images, seed, processes)
    splits = list(zip(SPLITS, (num_train, num_val)))
    if not force and all(_is_current(root, split, num_images, seed, cfg, quiet=True) for split, num_images in splits):
        return {split: _paths(root, split) for split in SPLITS}  # no lock needed (the folder may be read-only)
    paths = {}
    with _generation_lock(root):  # a generator already at work here finishes first
        for split, num_images in zip(SPLITS, (num_train, num_val)):
            if not force and _is_current(root, split, num_images, seed, cfg):
                logger.info("Synthetic shapes %s split is up to date in %s", split, root)
                paths[split] = _paths(root, split)
            else:
                paths[split] = _generate_split(root, split, num_images, seed, cfg, processes)
    return paths


def register_shapes(root: str = "datasets/shapes", num_train: int = 600, num_val: int = 100, seed: int = 0,
                    cfg: ShapesConfig = ShapesConfig(), names: Sequence[str] = DATASET_NAMES) -> List[str]:
    """Make sure the data exist (``ensure_shapes``) and register them with detectron2 as
    ``names`` (default "shapes_train", "shapes_val"). Calling it again is harmless; a name
    registered with other files is re-registered with these."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    paths = ensure_shapes(root, num_train, num_val, seed, cfg)
    for name, split in zip(names, SPLITS):
        json_file, image_root = (os.path.abspath(p) for p in paths[split])
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file", None) == json_file:
                continue
            logger.warning("Dataset '%s' was registered with other files; re-registering %s", name, json_file)
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {"thing_classes": list(SHAPE_CLASSES)}, json_file, image_root)
    return list(names)


def load_split(json_file: str) -> dict:
    """The COCO dict of a generated split (for previews and tests)."""
    with open(json_file) as f:
        return json.load(f)
