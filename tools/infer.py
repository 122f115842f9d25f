"""Run a trained detector on images: annotated PNGs and COCO-format results.

    python tools/infer.py IMAGES... --config-file CONFIG.py --checkpoint MODEL.pth \\
        [--output DIR] [--score-threshold 0.5] [--device cpu|cuda] [--coco-json GT.json] \\
        [--skip-unreadable] [--draw-min-size 512] [--opts key=value ...]

IMAGES are files, folders (their images, not recursive) or quoted globs ("data/*.jpg"). Images
are resized like the config's test loader (``dataloader.test.mapper.augmentations``; short
side 800, max 1333 if it has none). Writes DIR/<image name>.png (masks, boxes, classes,
scores), DIR/results.json (COCO results: image_id, file_name, category_id, bbox XYWH, score,
segmentation RLE) and DIR/images.json (the images with their ids and drawings). A rerun into DIR
replaces the earlier run's drawings, those still as it wrote them; a run that stops at its first
image changes nothing. A drawing never replaces any other file: where DIR/photo.png is taken (an
input image, a file of the user's) it is numbered, photo_2.png. With --coco-json the ids
and categories are the ground truth's (an image is the one whose file_name ends like its path:
"a/x.jpg" is .../a/x.jpg) and file_name is the ground truth's too, so
``COCO(GT.json).loadRes(DIR/results.json)`` works; otherwise images are numbered 1, 2, ...
The number of classes follows the checkpoint.
"""
import argparse
import ast
import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402,F401  (detectron2 compatibility first)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.config import instantiate  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.evaluation.coco_evaluation import instances_to_coco_json  # noqa: E402
from detectron2.layers.mask_ops import paste_masks_in_image  # noqa: E402
from detectron2.structures import Instances  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.config import load_config  # noqa: E402
from models.engine.loops import check_model_arguments, prefer_channels_last  # noqa: E402
from models.visualize import draw_instances  # noqa: E402

from models.checkpoint import SafeDetectionCheckpointer as Checkpointer, load_checkpoint_file  # noqa: E402

logger = logging.getLogger("mimdet.infer")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CLS_SCORE_WEIGHT = "roi_heads.box_predictor.cls_score.weight"
MAX_DRAWING_SIDE = 2048  # larger images are drawn at this long side


class InferenceError(Exception):
    """A bad input, reported to the user without a traceback."""


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Image paths from files, folders and globs, in order, without duplicates."""
    paths: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n) for n in os.listdir(item) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise InferenceError(f"folder {item} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.isfile(item):
            found = [item]
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True)
                           if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise InferenceError(f"glob {item} matched no images")
        else:
            raise InferenceError(f"{item}: no such file or folder")
        paths.extend(p for p in found if p not in paths)
    return paths


def check_readable(paths: List[str], skip: bool) -> List[str]:
    """Paths whose headers PIL can read; an unreadable one is an error (or skipped with a warning)."""
    readable = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
            readable.append(path)
        except Exception as e:  # PIL raises several kinds for broken files
            if not skip:
                raise InferenceError(f"cannot read image {path}: {e} (use --skip-unreadable to skip it)") from e
            logger.warning("Skipping unreadable image %s: %s", path, e)
    if not readable:
        raise InferenceError("none of the images could be read")
    return readable


def _common_tail(first: List[str], second: List[str]) -> int:
    """How many trailing names ``first`` and ``second`` share: 2 for .../a/x.jpg and a/x.jpg."""
    count = 0
    while count < min(len(first), len(second)) and first[-1 - count] == second[-1 - count]:
        count += 1
    return count


def ground_truth_ids(paths: List[str], coco_json: str) -> Tuple[List[int], Dict[int, int], List[str], List[str]]:
    """Image ids and file_names, contiguous -> category id and class names from a COCO json.

    An input is the json image whose file_name shares the most trailing folder and file names
    with the input's absolute path: file_name "a/x.jpg" is the input .../a/x.jpg, not .../b/x.jpg.
    Bare file_names (COCO's "000000000139.jpg") are matched by the base name alone. An input that
    fits several json images equally well, and two inputs that would be one image, are errors:
    their results would be credited to the wrong image."""
    if not os.path.isfile(coco_json):
        raise InferenceError(f"--coco-json {coco_json}: no such file")
    try:
        with open(coco_json) as f:
            coco = json.load(f)
        by_name: Dict[str, List[Tuple[List[str], int, str]]] = {}  # base name -> (parts, id, file_name)
        for image in coco["images"]:
            # "./a//x.jpg", and "a\\x.jpg" as Windows tools write it
            parts = [part for part in re.split(r"[\\/]", image["file_name"]) if part not in ("", ".")]
            if parts:
                by_name.setdefault(parts[-1], []).append((parts, image["id"], image["file_name"]))
        categories = sorted(coco["categories"], key=lambda c: c["id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InferenceError(f"--coco-json {coco_json} is not a COCO annotation file (JSON with 'images' and "
                             f"'categories'): {type(e).__name__}: {e}") from None
    missing = [p for p in paths if os.path.basename(p) not in by_name]  # (what a link points to is not looked for)
    if missing:
        raise InferenceError(f"{len(missing)} images are not in {coco_json}, e.g. {missing[0]}")
    image_ids, file_names, owners = [], [], {}  # owners: image id -> the input given as that image
    for path in paths:
        # Its folders and name as given ("." and ".." resolved) and as stored (through links: a
        # linked folder "data" may be the json's "val2017"); a json image fits by the better one.
        given, stored = os.path.abspath(path).split(os.sep), os.path.realpath(path).split(os.sep)
        candidates = by_name[os.path.basename(path)]
        fits = [max(_common_tail(given, c[0]), _common_tail(stored, c[0])) for c in candidates]
        fitting = [c for c, fit in zip(candidates, fits) if fit == max(fits)]
        if len(fitting) > 1:
            raise InferenceError(f"{path} fits {len(fitting)} images of {coco_json} equally well "
                                 f"({', '.join(c[2] for c in fitting)}); give it by a path whose folders tell "
                                 "them apart")
        _, image_id, file_name = fitting[0]
        if image_id in owners:
            raise InferenceError(f"{owners[image_id]} and {path} are both image {image_id} ({file_name}) of "
                                 f"{coco_json}; give each image once")
        owners[image_id] = path
        image_ids.append(image_id)
        file_names.append(file_name)
    return (image_ids, {i: c["id"] for i, c in enumerate(categories)}, [c["name"] for c in categories],
            file_names)


def checkpoint_classes(state: Dict) -> Optional[List[str]]:
    """The class names a checkpoint of this project was trained on (None for other checkpoints)."""
    classes = (state.get("config") or {}).get("classes")
    return None if classes is None else list(ast.literal_eval(classes))


def checkpoint_category_ids(state: Dict) -> Optional[Dict[int, int]]:
    """Class index -> the training json's category id, as a checkpoint of this project keeps it
    (None for other checkpoints)."""
    ids = (state.get("config") or {}).get("category_ids")
    return None if ids is None else dict(enumerate(ast.literal_eval(ids)))


def config_classes(cfg, warn: bool = True) -> Tuple[Optional[List[str]], Optional[Dict[int, int]]]:
    """Class names and contiguous -> category id of the config's test set, if its datasets can be
    loaded (a warning says why not, or with ``warn=False`` an info line)."""
    try:
        from detectron2.data import MetadataCatalog

        from models.data.datasets import register_coco_datasets, thing_classes

        register_coco_datasets(cfg.get("datasets", {}).get("register", []) or [])
        names = OmegaConf.select(cfg, "dataloader.test.dataset.names")
        classes = thing_classes(names)
        metadata = MetadataCatalog.get(names if isinstance(names, str) else names[0])
        to_contiguous = metadata.get("thing_dataset_id_to_contiguous_id", None)
        return classes, ({v: k for k, v in to_contiguous.items()} if to_contiguous else None)
    except Exception as e:  # no test set in the config, or its files are not here
        (logger.warning if warn else logger.info)(
            "No class names from the config's datasets (%s)%s", e,
            "; pass --coco-json for them" if warn else "; the checkpoint's are used")
        return None, None


def build_model(cfg, checkpoint: str, device: str, score_threshold: float,
                sample_ratio: Optional[float] = 1.0, state: Optional[Dict] = None) -> torch.nn.Module:
    """The config's model with the checkpoint's weights, in eval mode; classes follow the checkpoint
    (``state``: the checkpoint already read, if the caller has it).

    A MIMDet backbone sees ``sample_ratio`` of the tokens (1.0, every token, as the paper
    evaluates: the same image always gives the same detections); None keeps the config's
    ``eval_sample_ratio``.
    """
    roi_heads = cfg.model.get("roi_heads", None)
    if roi_heads is not None and "num_classes" in roi_heads:
        state = load_checkpoint_file(checkpoint) if state is None else state
        weight = state.get("model", state).get(CLS_SCORE_WEIGHT, None)
        if weight is not None and weight.shape[0] - 1 != roi_heads.num_classes:
            logger.info("Checkpoint has %d classes: model.roi_heads.num_classes %d -> %d",
                        weight.shape[0] - 1, roi_heads.num_classes, weight.shape[0] - 1)
            roi_heads.num_classes = weight.shape[0] - 1
        del state
        predictor = roi_heads.get("box_predictor", None)
        if predictor is not None and "test_score_thresh" in predictor:
            predictor.test_score_thresh = min(predictor.test_score_thresh, score_threshold)
    model = instantiate(cfg.model).to(device).eval()
    Checkpointer(model, strict=True).load(checkpoint)  # no weight left random
    prefer_channels_last(model, cfg, device)  # as the config trains: the same values, faster on CPU
    bottom_up = getattr(getattr(model, "backbone", None), "bottom_up", None)
    if hasattr(bottom_up, "eval_sample_ratio"):
        source = "the config's eval_sample_ratio" if sample_ratio is None else "--sample-ratio"
        if sample_ratio is not None:
            bottom_up.eval_sample_ratio = sample_ratio
        sample_ratio = bottom_up.eval_sample_ratio
        logger.info("The ViT sees %s of the image tokens (%s)%s", sample_ratio, source,
                    "" if sample_ratio == 1.0 else ": a random subset, so detections vary from run to run")
    return model


def test_augmentations(cfg) -> T.AugmentationList:
    augs = OmegaConf.select(cfg, "dataloader.test.mapper.augmentations", default=None)
    if augs is None:
        return T.AugmentationList([T.ResizeShortestEdge(800, 1333)])
    return T.AugmentationList(list(instantiate(augs)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # "*", not "+": with every image after --opts, run() says where they went, not argparse
    parser.add_argument("inputs", nargs="*", help="image files, folders or quoted globs")
    parser.add_argument("--config-file", required=True, help="LazyConfig .py file")
    parser.add_argument("--checkpoint", required=True, help="trained weights (.pth)")
    parser.add_argument("--output", default="output/infer", help="folder for PNGs and results.json")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--sample-ratio", type=float, default=None,
                        help="fraction of tokens a MIMDet ViT sees, in (0, 1]; by default the config's "
                             "eval_sample_ratio (1.0 in every shipped config: every token, deterministic)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--coco-json", help="ground-truth COCO json: take image ids and categories from it")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="warn about images that cannot be read or processed, and go on")
    parser.add_argument("--draw-min-size", type=int, default=512,
                        help="upscale drawings of smaller images until their short side is at least this "
                             f"(0 to {MAX_DRAWING_SIDE})")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    """Run inference as described by ``args``; return the results json path."""
    for flag, path in (("--config-file", args.config_file), ("--checkpoint", args.checkpoint)):
        if not os.path.isfile(path):
            raise InferenceError(f"{flag} {path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
    if args.sample_ratio is not None and not 0 < args.sample_ratio <= 1:
        raise InferenceError(f"--sample-ratio must be in (0, 1], got {args.sample_ratio}")
    if not 0 <= args.score_threshold <= 1:  # NaN too: no score compares >= NaN
        raise InferenceError(f"--score-threshold must be in [0, 1] (scores are probabilities), "
                             f"got {args.score_threshold}")
    if not 0 <= args.draw_min_size <= MAX_DRAWING_SIDE:
        raise InferenceError(f"--draw-min-size must be in [0, {MAX_DRAWING_SIDE}] (pixels), got {args.draw_min_size}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InferenceError(f"--output {args.output} is a file; it takes a folder")
    parent = os.path.dirname(os.path.abspath(args.output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InferenceError(f"--output {args.output}: {parent} is a file, so the folder cannot be made")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InferenceError("--device cuda: CUDA is not available here; use --device cpu")
    not_overrides = [opt for opt in args.opts if "=" not in opt]
    if not_overrides:  # argparse gives --opts every word after it, images included
        raise InferenceError(f"--opts takes KEY=VALUE config overrides, got {not_overrides[0]!r}; put images "
                             "before --opts")
    if not args.inputs:
        raise InferenceError("no images given: name image files, folders or globs")
    record = earlier_run_record(args.output)
    check_output_files(args.output, record)
    previous = previous_drawings(args.output, record)  # an earlier run's pictures: not inputs, replaced by this run's
    paths = [path for path in collect_images(args.inputs) if os.path.realpath(path) not in previous]
    if not paths:
        raise InferenceError(f"the only images given are the drawings of an earlier run into {args.output}")
    paths = check_readable(paths, args.skip_unreadable)
    try:
        cfg = load_config(args.config_file, args.opts)  # the launcher's strict loader
    except (KeyError, ValueError) as e:
        raise InferenceError(f"cannot apply --opts {args.opts}: {e}") from e
    problems = check_model_arguments(cfg.model)  # what the model's constructors refuse, named here
    if problems:
        raise InferenceError(f"{args.config_file}{' with --opts ' + ' '.join(args.opts) if args.opts else ''}: "
                             + "; ".join(problems))
    try:
        state = load_checkpoint_file(args.checkpoint)
    except ValueError as e:
        raise InferenceError(f"--checkpoint: {e}") from e
    trained = checkpoint_classes(state)
    if args.coco_json:
        image_ids, category_ids, class_names, file_names = ground_truth_ids(paths, args.coco_json)
        if trained is not None and trained != class_names:
            raise InferenceError(f"the checkpoint was trained on the classes {trained}, --coco-json {args.coco_json} "
                                 f"has {class_names} (in category id order): its results would name other classes")
    else:
        image_ids = list(range(1, len(paths) + 1))
        file_names = [os.path.basename(path) for path in paths]
        class_names, category_ids = config_classes(cfg, warn=trained is None)
        if trained is not None and trained != class_names:
            logger.info("Class names from the checkpoint: %s", trained)
            class_names, category_ids = trained, checkpoint_category_ids(state)
    try:
        model = build_model(cfg, args.checkpoint, args.device, args.score_threshold, args.sample_ratio, state)
    except ValueError as e:  # a checkpoint of another architecture or class count
        reason = str(e).removeprefix(f"{args.checkpoint}: ")  # this message names the file already
        raise InferenceError(f"--checkpoint {args.checkpoint} does not fit {args.config_file}: {reason}") from e
    del state
    num_classes = model.roi_heads.num_classes if hasattr(model, "roi_heads") else len(class_names or [])
    if class_names is None or len(class_names) != num_classes:
        class_names = [f"class {i}" for i in range(num_classes)]
        category_ids = None
    category_ids = category_ids or {i: i + 1 for i in range(num_classes)}
    image_format = OmegaConf.select(cfg, "dataloader.test.mapper.image_format", default=None)
    image_format = image_format or cfg.model.get("input_format", "BGR")
    augmentations = test_augmentations(cfg)
    os.makedirs(args.output, exist_ok=True)
    inputs = {os.path.realpath(path) for path in paths}  # never drawn over
    results, images, used_names, finished = [], [], set(), False
    try:
        for path, image_id, file_name in zip(tqdm(paths, desc="infer", unit="img"), image_ids, file_names):
            try:
                rgb = read_image(path, format="RGB")
                instances = predict(model, rgb, augmentations, image_format, args.score_threshold)
                image_results = coco_results(instances, image_id, rgb.shape[:2])
                drawing = draw(rgb, instances, class_names, args.draw_min_size)
            except Exception as e:  # noqa: BLE001  (one image must not lose the results of the others)
                if not args.skip_unreadable:
                    raise InferenceError(f"cannot process image {path}: {type(e).__name__}: {e} (use "
                                         "--skip-unreadable to skip such images)") from e
                logger.warning("Skipping image %s: %s: %s", path, type(e).__name__, e)
                continue
            for result in image_results:
                result.update(category_id=category_ids[result["category_id"]], file_name=file_name)
            results += image_results
            name = drawing_name(path, args.output, used_names, inputs, previous)
            used_names.add(name)
            png = io.BytesIO()
            Image.fromarray(drawing).save(png, format="PNG")
            with open(os.path.join(args.output, f"{name}.png"), "wb") as f:
                f.write(png.getvalue())
            images.append({"id": image_id, "file_name": file_name, "height": rgb.shape[0],
                           "width": rgb.shape[1], "path": path, "drawing": f"{name}.png",
                           "drawing_sha256": hashlib.sha256(png.getvalue()).hexdigest()})
            del rgb, drawing
        finished = True
    finally:  # the results of every image that worked, also when a later one stops the run
        results_file = os.path.join(args.output, "results.json")
        if finished or images:  # a run stopped at its first image leaves the earlier run's files as they were
            write_run_files(args.output, results, images, class_names, category_ids, previous)
    return results_file


def write_run_files(output: str, results: List[dict], images: List[dict], class_names: Sequence[str],
                    category_ids: Dict[int, int], previous: Dict[str, str]) -> None:
    """results.json and images.json of this run; the earlier run's pictures it did not redraw are deleted."""
    drawn = {os.path.realpath(os.path.join(output, image["drawing"])) for image in images}
    for old in previous.keys() - drawn:
        with contextlib.suppress(FileNotFoundError):
            os.remove(old)
    text = json.dumps(results).encode()
    with open(os.path.join(output, "results.json"), "wb") as f:
        f.write(text)
    with open(os.path.join(output, "images.json"), "w") as f:
        json.dump({"images": images, "categories": [{"id": category_ids[i], "name": n}
                                                     for i, n in enumerate(class_names)],
                   "results_sha256": hashlib.sha256(text).hexdigest()}, f)


def drawing_name(path: str, output: str, used: set, inputs: set, previous: Dict[str, str]) -> str:
    """The drawing's file stem: the image's own, numbered (``photo_2``, ``photo_3``) until the name
    is not taken by another image of this run and ``output/<name>.png`` is either free or a drawing
    of the earlier run: an input image or any other file already there is never drawn over."""
    stem = name = os.path.splitext(os.path.basename(path))[0]
    number = 1
    while True:
        candidate = os.path.join(output, f"{name}.png")
        target = os.path.realpath(candidate)
        free = not (os.path.lexists(candidate) or os.path.lexists(target)) or (
            target in previous and target not in inputs and not os.path.islink(candidate))
        if name not in used and free:
            return name
        number += 1
        name = f"{stem}_{number}"


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def earlier_run_record(output: str) -> Optional[dict]:
    """``output/images.json`` as an earlier run of this tool wrote it (a dict with an ``images``
    list); None where there is none, or not one this tool wrote."""
    try:
        with open(os.path.join(output, "images.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("images"), list) else None


def check_output_files(output: str, record: Optional[dict]) -> None:
    """Refuse to replace a results.json or images.json that is a link, or that this tool did not
    write: an images.json that is not an earlier run's ``record``, or a results.json whose sha256
    is not the one that record holds (edited by hand, copied in, or of another run)."""
    for name in ("results.json", "images.json"):
        if os.path.islink(os.path.join(output, name)):
            raise InferenceError(f"--output {output}: its {name} is a link, which infer.py does not write through; "
                                 "choose another --output or move the link")
    if record is None and os.path.lexists(os.path.join(output, "images.json")):
        raise InferenceError(f"--output {output} holds an images.json that infer.py did not write; choose another "
                             "--output or move the file")
    results_file = os.path.join(output, "results.json")
    if os.path.lexists(results_file):
        recorded = (record or {}).get("results_sha256")
        if recorded is None or not os.path.isfile(results_file) or file_sha256(results_file) != recorded:
            raise InferenceError(f"--output {output} holds a results.json that is not the one an earlier infer.py "
                                 "run wrote there (written by someone else, or changed since); choose another "
                                 "--output or move the file")


def previous_drawings(output: str, record: Optional[dict]) -> Dict[str, str]:
    """The pictures an earlier run drew into ``output``: real path -> file name, for those its
    ``record`` names that are still the files it wrote (same sha256). They are left out of the
    inputs, may be drawn over, and those this run does not redraw are deleted at its end, so that
    the folder shows one run. Files replaced or edited since, and all others, are left alone."""
    drawings = {}
    for image in (record or {}).get("images", []):
        if not isinstance(image, dict) or not isinstance(image.get("drawing"), str):
            continue
        path = os.path.join(output, os.path.basename(image["drawing"]))
        if path.endswith(".png") and os.path.isfile(path) and not os.path.islink(path) and \
                image.get("drawing_sha256") == file_sha256(path):
            drawings[os.path.realpath(path)] = os.path.basename(path)
    return drawings


def predict(model, rgb: np.ndarray, augmentations: T.AugmentationList, image_format: str,
            score_threshold: float) -> Instances:
    """Detections of one RGB image (H, W, 3), on the CPU: boxes in the image's pixels, masks as
    the mask head's (N, 1, M, M) probabilities over their boxes, not yet pasted.

    Pasting every mask at the image's full size at once, as detectron2's postprocessing does,
    takes N x H x W bytes (6.4 GB for 100 masks of an 8000x8000 image); ``coco_results`` and
    ``draw`` paste one mask at a time, or at the drawing's size.
    """
    aug_input = T.AugInput(rgb)  # resized first, so that a BGR model's channel flip copies the small image
    try:
        augmentations(aug_input)
    except ValueError as e:  # a side that resizing would shrink below one pixel
        raise ValueError(f"the {rgb.shape[0]}x{rgb.shape[1]} (height x width) image cannot be resized for the "
                         f"model ({e})") from e
    image = aug_input.image if image_format == "RGB" else aug_input.image[:, :, ::-1]
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
    inputs = [{"image": tensor, "height": tensor.shape[1], "width": tensor.shape[2]}]
    with torch.no_grad():
        instances = model.inference(inputs, do_postprocess=False)[0].to("cpu")
    height, width = rgb.shape[:2]
    instances.pred_boxes.scale(width / tensor.shape[2], height / tensor.shape[1])
    instances.pred_boxes.clip((height, width))
    instances = instances[instances.pred_boxes.nonempty() & (instances.scores >= score_threshold)]
    return Instances((height, width), **instances.get_fields())


def _paste(instances: Instances, size: Tuple[int, int], scale: float = 1.0) -> torch.Tensor:
    boxes = instances.pred_boxes.clone()
    boxes.scale(scale, scale)
    return paste_masks_in_image(instances.pred_masks[:, 0], boxes, size, threshold=0.5)


def coco_results(instances: Instances, image_id: int, size: Tuple[int, int]) -> List[dict]:
    """COCO results (XYWH boxes, RLE masks at the image's size), pasting one mask at a time."""
    results = []
    for i in range(len(instances)):
        one = instances[i:i + 1]
        if one.has("pred_masks"):
            one = Instances(size, pred_boxes=one.pred_boxes, scores=one.scores, pred_classes=one.pred_classes,
                            pred_masks=_paste(one, size))
        results += instances_to_coco_json(one, image_id)
    return results


def draw(rgb: np.ndarray, instances: Instances, class_names: Sequence[str], min_size: int) -> np.ndarray:
    """The drawing of ``instances`` on ``rgb``; images beyond ``MAX_DRAWING_SIDE`` are drawn smaller."""
    scale = min(1.0, MAX_DRAWING_SIDE / max(rgb.shape[:2]))
    if scale < 1.0:
        size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    boxes = instances.pred_boxes.tensor.numpy() * scale
    masks = _paste(instances, rgb.shape[:2], scale).numpy() if instances.has("pred_masks") else None
    return draw_instances(rgb, boxes, instances.pred_classes.tolist(), class_names, instances.scores.tolist(),
                          masks, min_size)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        results_file = run(args)
    except InferenceError as e:
        sys.exit(f"infer.py: error: {e}")
    print(f"wrote {results_file} and annotated images to {args.output}")


if __name__ == "__main__":
    main()
