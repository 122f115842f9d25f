"""Images for masked-image pre-training: any folder of images, or registered COCO-format
datasets (their annotations unused), with MAE's augmentation.

MAE (He et al. 2022) trains on random resized crops of 20-100% of the image area, aspect
ratio 3/4-4/3, resized to 224x224 with bicubic interpolation, flipped horizontally with
probability 0.5 (``main_pretrain.py``). :class:`MAEAugmentation` does the same and also draws
the uniform noise that chooses each image's hidden patches, so that the whole sample is a
function of its place in the data stream (see ``models.data.resumable``).
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence, Tuple, Union

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image

__all__ = ["pretrain_images", "image_folder_records", "image_paths", "MAEAugmentation"]

logger = logging.getLogger(__name__)


def _image_size(path: str) -> Union[Tuple[int, int], str]:
    """(width, height) from the file's header, or why it cannot be read as an image."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # not an image, truncated header, ...
        return f"{type(e).__name__}: {e}"


def image_paths(folder: str) -> List[str]:
    """Files under ``folder``, recursively, sorted; hidden ones left out. Symbolic links are
    followed, but a folder or file reached twice (a link loop, two links to one place) is
    listed once."""
    seen_dirs, seen_files, paths = set(), set(), []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(parent, d))
                         not in seen_dirs)
        for name in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(parent, name)
            if os.path.realpath(path) not in seen_files:
                seen_files.add(os.path.realpath(path))
                paths.append(path)
    return sorted(paths)


def image_folder_records(folder: str, num_threads: int = 16) -> List[dict]:
    """``{"file_name", "width", "height"}`` for every image under ``folder`` (recursively, sorted by
    path; hidden files and folders are left out, each file is listed once).

    Each file's header is read once: files that are not readable images are skipped, and their
    count is logged with examples. A folder without a single image is an error. PIL refuses
    images over 178 megapixels (a decompression-bomb guard): such a file is skipped with the
    others, and the reason says so; cut large tiles into smaller images first.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"an image folder must be a path, got {folder!r}")
    if not os.path.exists(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"image folder {folder!r} is a file, not a folder")
    paths = image_paths(folder)
    with ThreadPoolExecutor(num_threads) as pool:  # header reads wait on the disk, not the CPU
        sizes = list(pool.map(_image_size, paths))
    records, unreadable = [], []
    for path, size in zip(paths, sizes):
        if isinstance(size, str):
            unreadable.append(f"{os.path.relpath(path, folder)} ({size})")
        else:
            records.append({"file_name": path, "width": size[0], "height": size[1]})
    if unreadable:
        logger.warning("%s: skipped %d of %d files that are not readable images, e.g. %s", folder, len(unreadable),
                       len(paths), "; ".join(unreadable[:3]))
    if not records:
        raise ValueError(f"image folder {folder!r} holds no readable image ({len(paths)} files)")
    logger.info("%s: %d images", folder, len(records))
    return records


def pretrain_images(folder: Union[str, Sequence[str], None] = None,
                    names: Union[str, Sequence[str], None] = None) -> List[dict]:
    """The pre-training images: those under ``folder`` (one or a list) and those of the
    registered datasets ``names`` (e.g. ``coco_2017_train`` or one added by
    ``datasets.register``), in that order."""
    if not folder and not names:
        raise ValueError("dataloader.train.dataset needs folder=<a folder of images> or names=<registered "
                         "datasets>; neither is set")
    records = []
    for one in [folder] if isinstance(folder, (str, os.PathLike)) else list(folder or []):
        records += image_folder_records(one)
    for name in [names] if isinstance(names, str) else list(names or []):
        for record in DatasetCatalog.get(name):
            records.append({key: record[key] for key in ("file_name", "width", "height") if key in record})
    return records


class MAEAugmentation:
    """Maps a record to ``{"file_name", "image" (3, S, S) uint8 RGB, "mask_noise" (L,)}``.

    Args:
        img_size: side ``S`` of the square crop (224 in MAE).
        scale, ratio: ranges of the crop's area fraction and aspect ratio.
        hflip: probability of a horizontal flip.
        patch_size: the model's patch side; ``L = (S / patch_size) ** 2``.

    Randomness comes from ``torch``'s global generator, which the resumable loader seeds per
    sample. Images are read as detectron2 reads them (EXIF orientation applied; grayscale,
    palette and RGBA files converted to RGB).
    """

    def __init__(self, img_size: int = 224, scale: Tuple[float, float] = (0.2, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, patch_size: int = 16) -> None:
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {tuple(scale)}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {tuple(ratio)}")
        if isinstance(hflip, bool) or not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip!r}")
        self.img_size, self.scale, self.ratio, self.hflip = img_size, tuple(scale), tuple(ratio), hflip
        self.num_patches = (img_size // patch_size) ** 2

    def __call__(self, record: Dict) -> Dict:
        image = torch.from_numpy(read_image(record["file_name"], format="RGB").copy()).permute(2, 0, 1)
        top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        image = F.resized_crop(image, top, left, height, width, [self.img_size, self.img_size],
                               interpolation=InterpolationMode.BICUBIC, antialias=True)
        if torch.rand(1).item() < self.hflip:
            image = F.horizontal_flip(image)
        return {"file_name": record["file_name"], "image": image.contiguous(),
                "mask_noise": torch.rand(self.num_patches)}
