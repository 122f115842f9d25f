"""Any COCO-format dataset, registered from the config instead of code.

A config (or a command-line override) lists datasets under the top-level key
``datasets.register``, each ``dict(name=..., json_file=..., image_root=...)``; the launcher
registers them with detectron2's ``register_coco_instances`` before building anything, so
``dataloader.train.dataset.names=my_train`` just works. Builtin names (``coco_2017_train``,
``coco_2017_val``, ...) need no entry: detectron2 registers them under
``$DETECTRON2_DATASETS`` (default ``./datasets``).

Training annotations are checked once, before training, so that no image can stop a run
mid-way: degenerate boxes and polygons are dropped with one counting warning, and
non-crowd masks stored as RLE become polygons (detectron2's polygon-format mapper and
fvcore's crop take only polygons). :class:`InstanceDatasetMapper` is detectron2's
``DatasetMapper`` that drops, with a counted warning, any annotation its transforms still
cannot handle.
"""
import collections
import collections.abc
import hashlib
import json
import logging
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BitMasks, BoxMode, PolygonMasks
from omegaconf import ListConfig
from pycocotools import mask as mask_util

__all__ = [
    "register_coco_datasets",
    "thing_classes",
    "check_dataset_files",
    "validate_coco_json",
    "check_image_sizes",
    "drop_degenerate_annotations",
    "InstanceDatasetMapper",
]

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("name", "json_file", "image_root")


def register_coco_datasets(specs: Iterable[Mapping]) -> List[str]:
    """Register COCO-format datasets; return their names.

    Args:
        specs: mappings with ``name``, ``json_file`` (COCO instances json) and
            ``image_root`` (folder the json's ``file_name`` entries are relative to).

    A name registered before with the same files is left as it is; the same name with
    other files, a builtin name, a missing key or a missing file is an error.
    """
    names = []
    for spec in specs:
        missing = [k for k in _REQUIRED_KEYS if k not in spec]
        if missing:
            raise ValueError(f"datasets.register entry {dict(spec)} lacks {missing}; each needs {_REQUIRED_KEYS}")
        name, json_file, image_root = (str(spec[k]) for k in _REQUIRED_KEYS)
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"dataset '{name}': json_file {json_file} does not exist")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"dataset '{name}': image_root {image_root} is not a folder")
        if name in DatasetCatalog.list():
            registered = MetadataCatalog.get(name).get("json_file", None)
            if registered is None or os.path.abspath(registered) != os.path.abspath(json_file):
                raise ValueError(
                    f"dataset name '{name}' is already registered (with json_file {registered}); "
                    "choose another name"
                )
            logger.debug("Dataset '%s' is registered with %s already", name, json_file)  # the launcher's second pass
        else:
            register_coco_instances(name, {}, json_file, image_root)
            logger.info("Registered COCO-format dataset '%s': %s, images in %s", name, json_file, image_root)
        names.append(name)
    return names


def category_ids(names: Union[str, Sequence[str]]) -> Optional[List[int]]:
    """The json's category id of each class, in class order, for the first of ``names``
    (None for a dataset without the mapping, e.g. one that is not COCO-format)."""
    thing_classes(names)  # reads the json if it has not been read
    to_contiguous = MetadataCatalog.get(names if isinstance(names, str) else names[0]).get(
        "thing_dataset_id_to_contiguous_id", None)
    return [k for k, _ in sorted(to_contiguous.items(), key=lambda kv: kv[1])] if to_contiguous else None


def thing_classes(names: Union[str, Sequence[str]]) -> List[str]:
    """Class names of a registered dataset (the first of ``names``).

    COCO-format datasets learn their classes when their json is read, so the json is
    loaded here if the metadata does not have them yet.
    """
    name = names if isinstance(names, str) else names[0]
    if name not in DatasetCatalog.list():
        raise KeyError(
            f"dataset '{name}' is not registered; add it to datasets.register or use a builtin name "
            f"such as coco_2017_train"
        )
    metadata = MetadataCatalog.get(name)
    if not metadata.get("thing_classes", None):
        DatasetCatalog.get(name)  # load_coco_json fills metadata.thing_classes
    classes = metadata.get("thing_classes", None)
    if not classes:
        raise ValueError(f"dataset '{name}' has no thing_classes in its metadata")
    return list(classes)


def check_dataset_files(names: Union[str, Sequence[str]]) -> None:
    """Raise FileNotFoundError, naming the dataset and the path, if a registered dataset's
    annotation json or image folder does not exist (checked before any training starts)."""
    for name in [names] if isinstance(names, str) else names:
        if name not in DatasetCatalog.list():
            raise KeyError(f"dataset '{name}' is not registered; add it to datasets.register or use a builtin name")
        metadata = MetadataCatalog.get(name)
        json_file, image_root = metadata.get("json_file", None), metadata.get("image_root", None)
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
        where = f" (builtin datasets live under $DETECTRON2_DATASETS={root})"
        if json_file and not os.path.isfile(json_file):
            raise FileNotFoundError(f"dataset '{name}': annotation file {json_file} does not exist{where}")
        if image_root and not os.path.isdir(image_root):
            raise FileNotFoundError(f"dataset '{name}': image folder {image_root} does not exist{where}")


_EXAMPLES = 3


class _Problems:
    """Problems of one json, grouped by kind: each counted, the first few ids kept as examples."""

    def __init__(self, examples: int = _EXAMPLES) -> None:
        self.counts: Dict[str, int] = collections.Counter()
        self.examples: Dict[str, List[str]] = collections.defaultdict(list)
        self.max_examples = examples

    def add(self, kind: str, example: Any) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < self.max_examples:
            self.examples[kind].append(str(example))

    def report(self) -> str:
        return "\n".join(f"  {count} x {kind} (e.g. {', '.join(self.examples[kind])})"
                         for kind, count in self.counts.items())


def _number(value: Any) -> bool:
    """A finite int or float, not a bool, nor an integer beyond a float's range (10**400)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _finite_sum(values: list) -> bool:
    try:
        return math.isfinite(sum(values))
    except OverflowError:  # integers beyond a float's range
        return False


def _positive_whole(value: Any) -> bool:
    """A positive whole number, such as an RLE's side: ``221`` or ``221.0`` (many exporters
    write sides as floats, and detectron2 and pycocotools take them), not ``221.5`` or ``True``."""
    return _number(value) and value > 0 and value == int(value)


def _id(value: Any) -> bool:
    """An id detectron2 can key a dict with and a report can name: an integer or a string."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


# Image sides beyond this are an exporter's error: detectron2 and pycocotools allocate
# height x width masks, and the largest aerial images of detection sets are ~30,000 px a side.
_MAX_SIDE = 100_000


def _valid_side(value: Any) -> bool:
    """An image side as detectron2 needs it: an int up to _MAX_SIDE. detectron2 pastes masks into
    tensors of the image's sides, which a float (221.0) makes fail at the end of a run, in its
    final evaluation."""
    return type(value) is int and 0 < value <= _MAX_SIDE


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters for an example in a problem report."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_NOT_POLYGONS = "segmentations that are not a list of polygons (lists of x, y numbers) or an RLE"


def _polygons_problem(segmentation: list, for_evaluation: bool,
                      size: Optional[Tuple[int, int]] = None) -> Optional[Tuple[str, str]]:
    """(kind, example) of the first problem of a list of polygons, or None.

    detectron2's loader stops on a polygon that is not a list (``[x1, y1, x2, y2, ...]``
    written without the outer list) and training stops later on one with a value that is not a
    number; a polygon of an odd number of values has no last y. A training set may keep polygons
    of fewer than 3 points (they are dropped with a count before training), an evaluation set may
    not (pycocotools cannot rasterize them). With the image's ``size`` (height, width) known, a
    point more than one image side outside the image is refused: pycocotools rasterizes a
    polygon edge by edge in 32-bit integers, and a coordinate of 1e8 or more makes it allocate
    without bound or crash the process. Builtin ``map``/``sum``/``min``/``max`` keep this quick
    on COCO-sized sets; only a polygon that fails them is looked at value by value.
    """
    side = max(size) if size is not None else None
    for polygon in segmentation:
        if type(polygon) is not list:
            return _NOT_POLYGONS, _short(segmentation)
    for polygon in segmentation:
        if not set(map(type, polygon)) <= {int, float} or not _finite_sum(polygon):
            bad = [v for v in polygon if not _number(v)]  # none if only the sum overflowed
            if bad:
                return "polygons with coordinates that are not finite numbers", _short(bad[0])
        if len(polygon) % 2:
            return ("polygons of an odd number of coordinates (each point is an x, y pair)",
                    f"{len(polygon)} coordinates")
        if side is not None and polygon and not -side <= min(polygon) <= max(polygon) <= 2 * side:
            far = max(polygon, key=lambda v: max(-v - side, v - 2 * side))
            return ("polygons with a point more than one image side outside the image",
                    f"{_short(far)} in an image of {size[0]}x{size[1]}")
        if for_evaluation and len(polygon) < 6:
            return "polygons of fewer than 3 points (pycocotools cannot rasterize them)", ""
    return None


def _compressed_rle_fits(counts: str, height: int, width: int) -> bool:
    """Whether a compressed RLE string holds runs that fill a ``height`` x ``width`` mask.

    This reads the string as pycocotools' ``rleFrString`` does: each run is a group of
    characters ``'0'``..``'o'`` (6 bits each: 5 of the value, and 0x20 on all but the group's
    last), the last character's 0x10 bit is the sign, and each run from the fourth on is stored
    as its difference from the run two before it. The string fits if it ends a group and its
    runs are non-negative and add up to ``height * width``. pycocotools checks less: for a
    string such as ``""`` or ``"0"`` it returns a mask of uninitialised memory, and one that ends
    inside a group makes it read past the string's end; so a string goes to
    ``pycocotools.mask.decode`` only after it passes here.
    """
    if not counts or not counts.isascii():
        return False
    codes = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if codes.min() < 0 or codes.max() > 63 or codes[-1] & 0x20:
        return False
    ends = (codes & 0x20) == 0  # the last character of each run
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    lengths = np.diff(np.append(starts, codes.size))
    if lengths.max() > 7:  # 7 characters hold 35 bits, more than any mask has pixels
        return False
    shifts = 5 * (np.arange(codes.size) - np.repeat(starts, lengths))
    runs = np.add.reduceat((codes & 0x1F) << shifts, starts)
    runs -= ((codes[ends] & 0x10) != 0) << (5 * lengths)  # sign-extend the negative ones
    runs[1::2] = np.cumsum(runs[1::2])  # undo the differences to the run two before
    runs[2::2] = np.cumsum(runs[2::2])
    return bool(runs.min() >= 0 and runs.sum() == height * width)


def _rle_problem(rle: Mapping, image_size: Optional[Tuple[Any, Any]]) -> Optional[Tuple[str, str]]:
    """(kind, example) of the first problem of an RLE segmentation, or None.

    ``size`` must be ``[height, width]`` of the annotation's image (``image_size``, when the
    image has a valid one): pycocotools scores masks of different sizes with an IoU of -1, so a
    swapped ``[width, height]`` would silently ruin the AP. ``counts`` must decode to a mask of
    that size: a list of non-negative run lengths adding up to height x width (uncompressed), or
    a string that :func:`pycocotools.mask.decode` reads as such (compressed).
    """
    if "counts" not in rle or "size" not in rle:
        return "RLE segmentations without counts and size", ""
    size, counts = rle["size"], rle["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(_positive_whole(v) and v <= _MAX_SIDE for v in size)):
        return (f"RLE segmentations whose size is not [height, width] of 2 whole numbers from 1 to {_MAX_SIDE}",
                _short(size))
    height, width = int(size[0]), int(size[1])
    if image_size is not None and all(_positive_whole(v) for v in image_size) and \
            (height, width) != image_size:
        return ("RLE segmentations whose size is not [height, width] of their image (pycocotools would "
                "score them IoU -1)", f"size {size!r}, image [{int(image_size[0])}, {int(image_size[1])}]")
    if type(counts) is list:
        if set(map(type, counts)) <= {int} and (not counts or min(counts) >= 0) and sum(counts) == height * width:
            return None
        return ("uncompressed RLEs whose counts are not non-negative whole numbers adding up to height x width",
                f"{_short(counts)} for size {size!r}")
    if isinstance(counts, str):
        if _compressed_rle_fits(counts, height, width):
            try:  # a string that fits decodes; pycocotools has the last word all the same
                mask_util.decode({"size": [height, width], "counts": counts})
                return None
            except (ValueError, TypeError):
                pass
        return ("compressed RLEs whose counts do not decode to a mask of their size",
                f"{_short(counts)} for size {size!r}")
    return ("RLE segmentations whose counts are neither a list of run lengths nor a compressed string",
            _short(counts))


def validate_coco_json(name: str, json_file: str, for_evaluation: bool = False) -> str:
    """Check a COCO-format json once, before any work, and list every problem at once.

    What would stop a run mid-way or silently corrupt it is an error: the file is not JSON or
    lacks ``images``/``annotations``/``categories``; an image without an ``id`` (an integer or a
    string), a ``file_name`` or integer sides ``height``/``width`` from 1 to 100,000; a category
    id that is not an integer or a name that is not a string;
    duplicate image, annotation or category ids (one image would take another's annotations);
    an annotation without a known ``image_id``, a 4-number ``bbox`` (that overlaps its image) or
    a known ``category_id``; a segmentation that is neither a list of polygons (lists of an even
    number of finite x, y values, none more than one image side outside the image) nor an RLE
    of its image's ``[height, width]`` that decodes. A
    set used for evaluation also needs what pycocotools reads: a non-negative ``area``,
    ``iscrowd`` and a segmentation, its polygons of 3 or more points. (Degenerate boxes and
    polygons of a training set are dropped with a count later, see
    :func:`drop_degenerate_annotations`.) Raises ValueError naming the dataset and the file,
    each kind of problem with its count and example ids. Returns the file's sha256 (a resumed
    run compares it with the one its checkpoint was trained on).
    """
    where = f"dataset '{name}' ({json_file})"
    with open(json_file, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not a text (JSON) file: {e}") from None
    except RecursionError:
        raise ValueError(f"{where} is not valid JSON that Python reads: its lists or objects nest too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a COCO json object with images, annotations and categories, "
                         f"found a {type(data).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise ValueError(f"{where}: no list of {', '.join(missing)} (a COCO instances json has images, "
                         "annotations and categories)")
    problems = _Problems()
    if not data["categories"]:
        problems.add("datasets without categories (the classes to detect)", "categories: []")
    categories = collections.Counter()
    for category in data["categories"]:
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            problems.add("categories without id or name", _short(category))
        else:
            if not isinstance(category["name"], str) or not category["name"]:
                problems.add("categories whose name is not a non-empty string", _short(category["name"]))
            category_id = category["id"]
            if not isinstance(category_id, int) or isinstance(category_id, bool):
                # detectron2 sorts the ids to map them to classes: "1" among 2, 3 stops it
                problems.add("categories whose id is not an integer",
                             f"{_short(category['name'])}: {_short(category_id)}")
            if isinstance(category_id, collections.abc.Hashable):  # "1" named once, not again by its annotations
                categories[category_id] += 1
    for category_id, count in categories.items():
        if count > 1:
            problems.add("duplicate category ids", category_id)
    names = collections.Counter(c["name"] for c in data["categories"] if isinstance(c, dict) and _id(c.get("name")))
    for category_name, count in names.items():
        if count > 1:
            problems.add("duplicate category names (results are reported, and checked, by name)", category_name)
    if for_evaluation and not data["annotations"]:
        problems.add("evaluation sets without annotations (there is nothing to score)", "no annotations")
    images = collections.Counter()
    sizes = {}
    for number, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            problems.add("images that are not objects", f"#{number}")
            continue
        which = _short(image.get("id", f"#{number}"))
        lacking = [key for key in ("id", "file_name", "height", "width") if key not in image]
        if lacking:
            problems.add(f"images without {'/'.join(lacking)}", f"image {which}")
        for key in ("height", "width"):
            if key in image and not _valid_side(image[key]):
                problems.add(f"images whose {key} is not an integer from 1 to {_MAX_SIDE}",
                             f"image {which}: {_short(image[key])}")
        if "file_name" in image and not (isinstance(image["file_name"], str) and image["file_name"]):
            problems.add("images whose file_name is not a non-empty string",
                         f"image {which}: {_short(image['file_name'])}")
        if "id" in image and not _id(image["id"]):
            problems.add("images whose id is not an integer or a string", f"#{number}: {which}")
        elif "id" in image:
            images[image["id"]] += 1
            sizes[image["id"]] = (image.get("height"), image.get("width"))
    if len({type(image_id) for image_id in images}) > 1:  # detectron2 sorts the ids
        example = next(image_id for image_id in images if isinstance(image_id, str))
        problems.add("image ids that mix integers and strings (detectron2 sorts them)", f"image {example!r}")
    for image_id, count in images.items():
        if count > 1:
            problems.add("duplicate image ids (one image would take another's annotations)", f"image {image_id}")
    annotations = collections.Counter()
    for number, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            problems.add("annotations that are not objects", f"#{number}")
            continue
        which = f"annotation {_short(annotation.get('id', f'#{number}'))}"
        if "id" in annotation and not _id(annotation["id"]):
            problems.add("annotations whose id is not an integer or a string", which)
        elif "id" in annotation:
            annotations[annotation["id"]] += 1
        image_id = annotation.get("image_id")
        if not _id(image_id) or image_id not in images:
            problems.add("annotations of an image id not in images", f"{which}: {_short(image_id)}")
            image_id = None
        box = annotation.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
            problems.add("annotations without a bbox of 4 numbers", f"{which}: {_short(box)}")
        elif image_id in sizes:
            height, width = sizes[image_id]
            x, y, w, h = box
            known = _number(height) and _number(width) and height > 0 and width > 0
            if known and (x >= width or y >= height or x + w <= 0 or y + h <= 0):
                problems.add("annotations whose bbox lies outside its image", f"{which}: {box!r}")
        category_id = annotation.get("category_id")
        if not isinstance(category_id, collections.abc.Hashable) or category_id not in categories:
            problems.add("annotations without a category_id of the categories", f"{which}: {_short(category_id)}")
        # Masks are checked in training sets too: detectron2's loader and mapper stop on broken
        # ones, and an RLE of the wrong size trains on the wrong pixels.
        segmentation = annotation.get("segmentation")
        problem = None
        if isinstance(segmentation, dict):
            problem = _rle_problem(segmentation, sizes.get(image_id))
        elif isinstance(segmentation, list) and segmentation:
            problem = _polygons_problem(segmentation, for_evaluation, _known_size(sizes.get(image_id)))
        elif segmentation:
            problem = _NOT_POLYGONS, _short(segmentation)
        elif for_evaluation:  # a training set may have none: detectron2 leaves it out
            problem = "annotations without a segmentation (mask evaluation reads it)", _short(segmentation)
        if problem is not None:
            kind, example = problem
            problems.add(kind, f"{which}: {example}" if example else which)
        if not for_evaluation:
            continue
        if not _number(annotation.get("area")) or annotation["area"] < 0:
            problems.add("annotations without a non-negative area (COCO evaluation reads it)", which)
        if annotation.get("iscrowd") not in (0, 1, True, False):
            problems.add("annotations without iscrowd 0 or 1 (COCO evaluation reads it)", which)
    for annotation_id, count in annotations.items():
        if count > 1:
            problems.add("duplicate annotation ids", f"annotation {annotation_id}")
    if problems.counts:
        raise ValueError(f"{where} has problems that would stop or corrupt the run; fix the json:\n"
                         f"{problems.report()}")
    if len(set(image["file_name"] for image in data["images"] if isinstance(image, dict))) < len(images):
        logger.warning("%s: several images share a file_name", where)
    return hashlib.sha256(raw).hexdigest()


def _known_size(size: Optional[Tuple[Any, Any]]) -> Optional[Tuple[int, int]]:
    """(height, width) if both are valid image sides, else None (their problem is reported)."""
    if size is None or not all(_valid_side(v) for v in size):
        return None
    return size


def check_image_sizes(name: str, records: Sequence[Mapping]) -> None:
    """Raise ValueError, listing them by kind with counts (up to 10 named of each), if image files
    are missing, cannot be read or are not the size their records say (after their EXIF
    orientation, as detectron2 reads them). Reads headers only."""
    from PIL import Image

    wrong = _Problems(examples=10)
    for record in records:
        if not os.path.exists(record["file_name"]):
            wrong.add("images that do not exist", record["file_name"])
            continue
        if not os.path.isfile(record["file_name"]):
            wrong.add("image paths that are not files (a folder, say)", record["file_name"])
            continue
        try:
            with Image.open(record["file_name"]) as image:
                width, height = image.size
                orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation: 5-8 swap the sides
        except (OSError, SyntaxError, ValueError) as e:  # not an image, or cut short within its header
            wrong.add("images that cannot be read", f"{os.path.basename(record['file_name'])}: {e}")
            continue
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        if (height, width) != (record.get("height"), record.get("width")):
            wrong.add("images of another size than the json says",
                      f"{os.path.basename(record['file_name'])}: {height}x{width} read, "
                      f"{record.get('height')}x{record.get('width')} in the json")
    if wrong.counts:
        raise ValueError(f"dataset '{name}': evaluation needs every one of its {len(records)} images, readable and "
                         f"at its annotated size:\n{wrong.report()}")


def _box_problem(annotation: Mapping) -> Optional[str]:
    if "bbox" not in annotation:
        return None
    box = BoxMode.convert(list(annotation["bbox"]), annotation.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
    if not all(math.isfinite(v) for v in box):
        return f"box {list(annotation['bbox'])} is not finite"
    if box[2] <= box[0] or box[3] <= box[1]:
        return f"box {list(annotation['bbox'])} has no area"
    return None


def _polygon_problem(polygon: Sequence[float]) -> Optional[str]:
    if len(polygon) < 6 or len(polygon) % 2:
        return f"polygon of {len(polygon)} coordinates (needs 3 or more x, y points)"
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(xy).all():
        return "polygon is not finite"
    area = 0.5 * abs(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))
    return None if area > 0 else "polygon has no area"


def rle_to_polygons(segmentation: Mapping) -> List[List[float]]:
    """Polygons (``[x0, y0, x1, y1, ...]``, pixel-corner coordinates) of an RLE mask's outer
    contours, each of 3 or more points; ``[]`` for an empty mask."""
    rle = segmentation
    if isinstance(rle.get("counts"), list):  # uncompressed RLE
        rle = mask_util.frPyObjects(rle, *rle["size"])
    mask = np.ascontiguousarray(mask_util.decode(rle), dtype=np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # findContours returns pixel indices; in COCO's continuous coordinates pixel i spans
    # [i, i + 1], so +0.5 puts each point at its pixel's centre.
    return [(c.reshape(-1, 2).astype(np.float64) + 0.5).reshape(-1).tolist() for c in contours if len(c) >= 3]


def _is_empty_segmentation(segmentation) -> bool:
    """No segmentation: absent, or an empty polygon list or array (a bitmask array is not
    tested for truth, which numpy refuses for more than one element)."""
    if segmentation is None:
        return True
    if isinstance(segmentation, np.ndarray):
        return segmentation.size == 0
    return len(segmentation) == 0


def _clean_annotation(annotation: dict, need_masks: bool) -> Tuple[Optional[dict], Optional[str]]:
    """(the annotation to train on, None) or (None, why it is dropped)."""
    problem = _box_problem(annotation)
    if problem is not None:
        return None, problem
    segmentation = annotation.get("segmentation")
    if need_masks and _is_empty_segmentation(segmentation) and not annotation.get("iscrowd", 0):
        # detectron2's load_coco_json leaves an empty segmentation out of the record
        return None, "no segmentation (the model trains masks)"
    if isinstance(segmentation, Mapping) and not annotation.get("iscrowd", 0):
        segmentation = rle_to_polygons(segmentation)
        annotation = {**annotation, "segmentation": segmentation}
        if not segmentation:
            return None, "RLE mask is empty"
    if isinstance(segmentation, list):
        problems = [_polygon_problem(p) for p in segmentation]
        if not segmentation or all(problems):
            return None, problems[0] if problems else "segmentation has no polygon"
        if any(problems):
            annotation = {**annotation, "segmentation": [p for p, bad in zip(segmentation, problems) if not bad]}
    return annotation, None


def drop_degenerate_annotations(records: Sequence[dict], need_masks: bool = False) -> List[dict]:
    """Training records without degenerate annotations, with one warning that counts them.

    An annotation is dropped if its box is not finite or has no area; a polygon is dropped
    if it has fewer than 3 points or no area, and the annotation with it if none is left
    (a self-intersecting polygon stays: fvcore's crop repairs it with ``buffer(0)``). A non-crowd RLE mask becomes
    polygons (its outer contours). An image all of whose annotations were dropped is dropped
    too. With ``need_masks`` (a mapper with ``use_instance_mask``), an annotation without a
    segmentation is dropped as well: one image mixing both would stop detectron2's mapper.
    Raises ValueError if no image is left. The input records are not modified.
    """
    kept, dropped, emptied, converted, example, total = [], 0, 0, 0, None, 0
    for record in records:
        annotations = record.get("annotations")
        if annotations is None:
            kept.append(record)
            continue
        clean = []
        for number, annotation in enumerate(annotations):
            total += 1
            cleaned, problem = _clean_annotation(annotation, need_masks)
            converted += isinstance(annotation.get("segmentation"), Mapping) and not annotation.get("iscrowd", 0)
            if cleaned is not None:
                clean.append(cleaned)
                continue
            dropped += 1
            which = f"annotation {annotation['id']}" if "id" in annotation else f"annotation #{number} of the image"
            example = example or f"{record.get('file_name')}, {which}: {problem}"
        if annotations and not clean:
            emptied += 1
            continue
        unchanged = len(clean) == len(annotations) and all(a is b for a, b in zip(clean, annotations))
        kept.append(record if unchanged else {**record, "annotations": clean})
    if converted:
        logger.info("Converted %d non-crowd RLE masks to polygons (their outer contours)", converted)
    if dropped:
        logger.warning("Dropped %d of %d training annotations with degenerate boxes or polygons (e.g. %s)%s",
                       dropped, total, example,
                       f"; {emptied} image(s) left without annotations dropped" if emptied else "")
    if records and not kept:
        raise ValueError(f"no training image is left: all {total} annotations are degenerate (e.g. {example})")
    return kept


def _plain(value):
    """A ListConfig as a tuple, nested ones included; anything else as it is."""
    return tuple(_plain(v) for v in value) if isinstance(value, ListConfig) else value


def _plain_list_arguments(augmentation) -> None:
    """Turn the ListConfig arguments of ``augmentation`` and of the augmentations inside it
    (``AugmentationList``, ``RandomApply``) into tuples, in place.

    A LazyConfig hands list arguments (ResizeShortestEdge's short_edge_length, say) to the
    augmentations as omegaconf ListConfigs. numpy probes such an argument for its array
    interfaces on every draw, and each probe of a ListConfig raises and formats an error inside
    omegaconf: 0.15 of the 1.9 ms it takes to map a demo image. Tuples hold the same values and
    draw the same numbers.
    """
    for name, value in vars(augmentation).items():
        if isinstance(value, ListConfig):
            setattr(augmentation, name, _plain(value))
        elif isinstance(value, T.Augmentation):
            _plain_list_arguments(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, T.Augmentation):
                    _plain_list_arguments(item)


class _CopiedAlready(dict):
    """A shallow copy of a dict that ``copy.deepcopy`` returns as it is."""

    def __deepcopy__(self, memo) -> "_CopiedAlready":
        return self


class InstanceDatasetMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` that names the image it cannot read and drops an annotation
    its transforms fail on.

    An image that cannot be read raises ``OSError`` naming its file (PIL's own message for a
    truncated file does not), so an evaluation stopped by one says which.

    detectron2 transforms all annotations of an image in one go, so one annotation that a
    transform cannot handle (a polygon shapely cannot crop, say) would stop training. Here
    each is transformed on its own; a failure drops that annotation, counts it in
    ``self.failed`` and logs a warning (the first, then every 100th). Boxes and polygons are
    made floating point first, so that resizing does not truncate integer coordinates. The
    rest is detectron2's ``_transform_annotations``: crowd regions are left out of training,
    instances are built, boxes follow the masks if ``recompute_boxes``, empty ones go.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failed = 0
        _plain_list_arguments(self.augmentations)

    def __call__(self, dataset_dict: dict) -> dict:
        if self.proposal_topk is None:
            # detectron2's mapper deep-copies the dict before it changes it: 0.3 of the 2.4 ms it
            # takes to map a demo image. A shallow copy is enough: the mapper adds and removes keys
            # of the dict itself, and this class copies each annotation before transforming it.
            # (Precomputed proposals are transformed in place, so with them the deep copy stays.)
            dataset_dict = _CopiedAlready(dataset_dict)
        try:
            return dict(super().__call__(dataset_dict))
        except OSError as e:  # PIL: missing, truncated or not an image
            name = dataset_dict.get("file_name")
            if name and str(name) in str(e):
                raise
            raise type(e)(f"cannot read image {name}: {e}") from e

    def _drop(self, annotation: dict, dataset_dict: dict, why: str) -> None:
        self.failed += 1
        if self.failed == 1 or self.failed % 100 == 0:
            logger.warning("Dropped annotation %s of %s: %s; %d dropped so far", annotation.get("id", "?"),
                           dataset_dict.get("file_name"), why, self.failed)

    def _transform_annotations(self, dataset_dict: dict, transforms, image_shape) -> None:
        kept = []
        for annotation in dataset_dict.pop("annotations"):
            if annotation.get("iscrowd", 0):
                continue
            annotation = dict(annotation)
            if not self.use_instance_mask:
                annotation.pop("segmentation", None)
            elif _is_empty_segmentation(annotation.get("segmentation")):
                self._drop(annotation, dataset_dict, "it has no segmentation and the model trains masks")
                continue
            if not self.use_keypoint:
                annotation.pop("keypoints", None)
            # fvcore's transforms change coordinates in place: each box, polygon and keypoint
            # array transformed here is a new float64 copy, so the record (reused every epoch)
            # keeps its own, and integer boxes and polygons (as many COCO-format files store
            # them) are not truncated, which would put them up to a pixel off at the output scale.
            if "bbox" in annotation:
                annotation["bbox"] = [float(v) for v in annotation["bbox"]]
            if isinstance(annotation.get("segmentation"), list):
                annotation["segmentation"] = [np.array(p, dtype=np.float64) for p in annotation["segmentation"]]
            if annotation.get("keypoints") is not None:
                annotation["keypoints"] = np.array(annotation["keypoints"], dtype=np.float64)
            try:
                kept.append(utils.transform_instance_annotations(
                    annotation, transforms, image_shape, keypoint_hflip_indices=self.keypoint_hflip_indices))
            except Exception as e:  # noqa: BLE001  (any failure of one annotation must not stop training)
                self._drop(annotation, dataset_dict, f"its transform failed ({type(e).__name__}: {e})")
        instances = utils.annotations_to_instances(kept, image_shape, mask_format=self.instance_mask_format)
        if self.use_instance_mask and not kept:  # detectron2 adds no gt_masks field when nothing is left
            instances.gt_masks = PolygonMasks([]) if self.instance_mask_format == "polygon" else BitMasks(
                torch.zeros(0, *image_shape, dtype=torch.bool))
        if self.recompute_boxes:  # as detectron2's mapper: boxes from the (cropped) masks
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
