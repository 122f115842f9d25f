"""Fixtures shared by the test modules: the repository root, the released checkpoints' tables,
and small generated COCO-format datasets.

Everything a test reads lives in this repository: ``tests/interop/*.tsv`` list every
state-dict entry (name, shape, dtype) of the released MIMDet and Benchmarking-ViT detectors
and of MAE's full pre-training checkpoints; their first line gives the entry count and the
parameter count.
"""
import argparse
import ast
import json
import math
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import models  # noqa: F401  (first: makes detectron2 0.6 work on today's stack)
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

REPO = Path(__file__).resolve().parents[1]
INTEROP = Path(__file__).resolve().parent / "interop"
sys.path.insert(0, str(REPO))  # lazyconfig_train_net.py is a script at the repository root


@dataclass
class InteropTable:
    """One released checkpoint's state dict: ``{name: (shape, dtype)}`` and its parameter count
    (the whole model's trainable and fixed parameters, buffers not included)."""

    entries: Dict[str, Tuple[Tuple[int, ...], str]]
    total: int

    def shapes(self, prefix: str = "") -> Dict[str, Tuple[int, ...]]:
        """``{name: shape}`` of the entries under ``prefix``, with the prefix removed."""
        return {name[len(prefix):]: shape for name, (shape, _) in self.entries.items() if name.startswith(prefix)}


def read_interop_table(name: str) -> InteropTable:
    """Parse ``tests/interop/<name>``: a ``# N entries; ...: TOTAL`` line, then
    ``name<TAB>(shape)<TAB>dtype`` rows. A missing file is an error, never a skip."""
    lines = (INTEROP / name).read_text().splitlines()
    header, rows = lines[0], [line.split("\t") for line in lines[1:] if line.strip()]
    entries = {key: (tuple(ast.literal_eval(shape)), dtype) for key, shape, dtype in rows}
    assert header.startswith(f"# {len(entries)} entries"), f"{name}: header {header!r} != {len(entries)} rows"
    # The detector tables count parameters (buffers such as BN statistics are rows but not
    # parameters); the MAE tables, which hold parameters only, state no count.
    total = int(header.rsplit(":", 1)[1]) if ":" in header else sum(math.prod(s) for s, _ in entries.values())
    return InteropTable(entries, total)


# --- disk: a passed test's tmp_path goes as soon as the test ends ------------------------------
# The full-size tests write checkpoints of about 1 GB each; kept to the end of the session (pytest's
# default), the suite's files would need several GB of free disk at once. A failed test's folder
# stays for inspection; pytest.ini keeps only the latest session's folders.

_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.stash[_PASSED] = report.passed


@pytest.fixture(autouse=True)
def _remove_tmp_path_of_passed_test(request):
    yield
    tmp_path = request.node.funcargs.get("tmp_path")
    if tmp_path is not None and request.node.stash.get(_PASSED, False):
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def interop() -> Callable[[str], InteropTable]:
    """``interop("mimdet_vit_b_maskfill_grid50.tsv")`` -> the released checkpoint's table."""
    return read_interop_table


def random_state_dict(table: InteropTable, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random tensors with a table's names, shapes and dtypes (small ints for int64 entries)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randint(0, 9, shape, generator=generator) if dtype == "int64"
            else torch.randn(shape, generator=generator) * 0.02
            for name, (shape, dtype) in table.entries.items()}


@pytest.fixture(scope="session")
def random_weights() -> Callable[..., Dict[str, torch.Tensor]]:
    """``random_weights(table, seed=0)`` -> a state dict with the table's names and shapes."""
    return random_state_dict


@pytest.fixture(scope="session")
def mae_vit_b_file(tmp_path_factory) -> Path:
    """A full-size MAE ViT-B pre-training file (random weights, the released names and layout:
    ``model``, ``optimizer``, ``epoch``, ``scaler``, ``args`` as an argparse.Namespace)."""
    path = tmp_path_factory.mktemp("mae") / "mae_pretrain_vit_base_full.pth"
    torch.save({"model": random_state_dict(read_interop_table("mae_pretrain_vit_b_full.tsv")),
                "epoch": 1599, "scaler": {"scale": 65536.0},
                "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75)}, path)
    return path


# --- a toy set: grey squares with red and blue rectangles -----------------------------------

_TOY_COLOURS = {1: (220, 40, 40), 2: (40, 60, 220)}


def write_toy_coco(root: Path, num_images: int = 8, size: int = 128) -> Path:
    """8 grey 128x128 images with 1-3 red or blue rectangles each; polygon masks; 2 classes."""
    rng = random.Random(0)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image = Image.new("RGB", (size, size), (90, 90, 90))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            category = rng.choice(list(_TOY_COLOURS))
            w, h = rng.randint(24, 60), rng.randint(24, 60)
            x, y = rng.randint(0, size - w - 1), rng.randint(0, size - h - 1)
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=_TOY_COLOURS[category])
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=category,
                                    bbox=[x, y, w, h], area=w * h, iscrowd=0, segmentation=[polygon]))
        file_name = f"{image_id:03d}.png"
        image.save(root / "images" / file_name)
        images.append(dict(id=image_id, file_name=file_name, width=size, height=size))
    categories = [dict(id=1, name="red"), dict(id=2, name="blue")]
    json_file = root / "toy.json"
    json_file.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return json_file


@pytest.fixture(scope="session")
def toy_coco_writer() -> Callable[..., Path]:
    """``write_toy_coco(root)`` -> json path; images in ``root/images``."""
    return write_toy_coco


def register_overrides(name: str, json_file: Path, image_root: Path) -> List[str]:
    """Launcher overrides that register a COCO-format set and train and test on it."""
    return [f"datasets.register=[{{name:{name},json_file:'{json_file}',image_root:'{image_root}'}}]",
            f"dataloader.train.dataset.names={name}", f"dataloader.test.dataset.names={name}"]


@pytest.fixture(scope="session")
def dataset_overrides() -> Callable[[str, Path, Path], List[str]]:
    """``dataset_overrides(name, json_file, image_root)`` -> the launcher overrides that register
    that COCO-format set and train and test on it."""
    return register_overrides


# --- a set with real COCO's quirks -----------------------------------------------------------

QUIRK_CATEGORIES = [dict(id=1, name="disc"), dict(id=7, name="bar"), dict(id=90, name="arch")]
_QUIRK_COLOURS = {1: (230, 60, 50), 7: (40, 170, 60), 90: (50, 80, 230)}
EXIF_ORIENTATION = 0x0112


def _disc(cx: float, cy: float, rx: float, ry: float, points: int = 16) -> List[float]:
    return [v for k in range(points) for v in (cx + rx * math.cos(2 * math.pi * k / points),
                                               cy + ry * math.sin(2 * math.pi * k / points))]


def _rect(x: float, y: float, w: float, h: float) -> List[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _arch(x: float, y: float, w: float, h: float, t: float) -> List[float]:
    """An upside-down U: a crop through its legs leaves two pieces of one object."""
    return [x, y, x + w, y, x + w, y + h, x + w - t, y + h, x + w - t, y + t, x + t, y + t, x + t, y + h, x, y + h]


def _bowtie(x: float, y: float, w: float, h: float) -> List[float]:
    """Self-intersecting (two unequal lobes): not a valid polygon, as some crowd-sourced COCO
    outlines are not; fvcore's crop repairs it with shapely's ``buffer(0)``."""
    return [x, y, x + w, y + h, x + w, y + 0.3 * h, x, y + h]


def _polygon_area(polygon: List[float]) -> float:
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    return 0.5 * abs(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))


def _bbox(polygons: List[List[float]]) -> List[float]:
    xy = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons])
    (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def write_coco_quirks(root: Path) -> Path:
    """Seven images with what real COCO has and toy sets lack; returns the json path.

    * category ids 1, 7, 90 (not contiguous);
    * a two-part object (two polygons, one annotation) and arches that crops cut in two;
    * a crowd region stored as compressed RLE (``iscrowd=1``);
    * a self-intersecting polygon;
    * a grayscale JPEG, an RGBA PNG and a JPEG whose EXIF orientation rotates it;
    * landscape and portrait sizes, and an image without annotations.
    """
    (root / "images").mkdir(parents=True)
    specs = [  # file, PIL mode, (width, height), objects as (category, [polygons]) or ("crowd", category)
        ("landscape.jpg", "RGB", (320, 208), [(90, [_arch(20, 30, 120, 150, 30)]),
                                              (7, [_rect(170, 20, 40, 60), _rect(230, 120, 70, 40)]),
                                              (1, [_disc(250, 60, 30, 24)]), ("crowd", 1)]),
        ("portrait.jpg", "RGB", (176, 288), [(1, [_disc(60, 70, 40, 50)]), (90, [_arch(30, 150, 120, 120, 35)]),
                                             (7, [_rect(110, 20, 50, 110)])]),
        ("gray.jpg", "L", (224, 224), [(1, [_disc(70, 70, 50, 50)]), (7, [_rect(130, 30, 70, 160)]),
                                       (90, [_arch(20, 140, 100, 70, 25)])]),
        ("rgba.png", "RGBA", (240, 160), [(1, [_disc(60, 80, 45, 45)]), (7, [_bowtie(130, 30, 90, 100)])]),
        ("exif_rotated.jpg", "RGB", (200, 260), [(90, [_arch(20, 40, 150, 180, 40)])]),
        ("empty.jpg", "RGB", (192, 192), []),
        ("crowd_and_bar.jpg", "RGB", (256, 192), [("crowd", 1), (7, [_rect(20, 110, 200, 50)])]),
    ]
    images, annotations = [], []
    for image_id, (file_name, mode, (width, height), objects) in enumerate(specs, start=1):
        picture = Image.new("RGB", (width, height), (120, 110, 100))
        draw = ImageDraw.Draw(picture)
        for obj in objects:
            annotation = dict(id=len(annotations) + 1, image_id=image_id)
            if obj[0] == "crowd":  # a cluster of small discs, one RLE region
                cluster = np.zeros((height, width), dtype=np.uint8)
                crowd = Image.fromarray(cluster)
                for k in range(6):
                    ImageDraw.Draw(crowd).ellipse([10 + 22 * k, height - 40, 28 + 22 * k, height - 22], fill=1)
                    draw.ellipse([10 + 22 * k, height - 40, 28 + 22 * k, height - 22], fill=_QUIRK_COLOURS[obj[1]])
                rle = mask_util.encode(np.asfortranarray(np.array(crowd, dtype=np.uint8)))
                annotation.update(category_id=obj[1], iscrowd=1, area=float(mask_util.area(rle)),
                                  bbox=[float(v) for v in mask_util.toBbox(rle)],
                                  segmentation=dict(size=rle["size"], counts=rle["counts"].decode("ascii")))
            else:
                category, polygons = obj
                for polygon in polygons:
                    draw.polygon(polygon, fill=_QUIRK_COLOURS[category])
                annotation.update(category_id=category, iscrowd=0, bbox=_bbox(polygons),
                                  area=sum(_polygon_area(p) for p in polygons), segmentation=polygons)
            annotations.append(annotation)
        path = root / "images" / file_name
        if file_name == "exif_rotated.jpg":  # stored rotated; orientation 6 turns it back 90 degrees clockwise
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = 6
            picture.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
        elif mode == "RGBA":
            rgba = picture.convert("RGBA")
            rgba.putalpha(Image.new("L", (width, height), 200))
            rgba.save(path)
        else:
            picture.convert(mode).save(path, quality=95)
        images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
    json_file = root / "quirks.json"
    json_file.write_text(json.dumps(dict(images=images, annotations=annotations, categories=QUIRK_CATEGORIES)))
    return json_file


@pytest.fixture(scope="session")
def coco_quirks(tmp_path_factory) -> Tuple[Path, Path]:
    """(json file, image folder) of the COCO-quirks set, written once per session."""
    root = tmp_path_factory.mktemp("coco_quirks")
    return write_coco_quirks(root), root / "images"
