#!/usr/bin/env python
"""Draw what an MAE pre-training checkpoint reconstructs: for each image, the original, what the
encoder sees (hidden patches grey), the reconstruction, and the reconstruction with the visible
patches pasted back (as in MAE's figures).

    python tools/mae_reconstruct.py IMAGES... --config-file configs/mae/mae_pretrain_vit_base.py \\
        --checkpoint output/mae/model_final.pth [--output reconstruction.png] [--mask-ratio 0.75] \\
        [--seed 0] [--device cpu|cuda] [--opts key=value ...]

IMAGES are files or folders (their images, sorted). Each image is resized (short side) and
centre-cropped to the model's square input. The hidden patches are drawn from ``--seed``, so a
picture can be redrawn for another checkpoint with the same masks. A model trained with the
normalised-pixel loss (MAE's default) predicts each hidden patch up to its mean and variance,
which it is not asked for: those two are taken from the original patch to draw it, so the
picture shows the structure the model predicts in the original's colours.
"""
import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402,F401  (detectron2 compatibility first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.config import instantiate  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402

from models.backbones.mae import MAEPretrainer, MaskedAutoencoderViT, check_mask_ratio  # noqa: E402
from models.checkpoint import SafeDetectionCheckpointer  # noqa: E402
from models.config import load_config  # noqa: E402
from models.data.pretrain import image_paths  # noqa: E402

logger = logging.getLogger("mimdet.mae_reconstruct")

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
TITLE_HEIGHT = 18


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--config-file", required=True, help="the MAE pre-training config the checkpoint was made by")
    parser.add_argument("--checkpoint", required=True, help="an MAE pre-training checkpoint (.pth)")
    parser.add_argument("--output", default="reconstruction.png", help="the picture to write")
    parser.add_argument("--mask-ratio", type=float, default=None, help="fraction of patches hidden (default: the "
                                                                         "config's)")
    parser.add_argument("--max-images", type=int, default=8, help="draw at most this many images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hidden patches")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu")
    if args.max_images < 1:
        parser.error(f"--max-images must be >= 1, got {args.max_images}")
    if os.path.isdir(args.output):
        parser.error(f"--output {args.output} is a folder; give the picture's file name, e.g. "
                     f"{os.path.join(args.output, 'reconstruction.png')}")
    parent = os.path.dirname(os.path.abspath(args.output))
    while not os.path.lexists(parent):  # the folders still to be made end at an existing path
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        parser.error(f"--output {args.output}: {parent} is not a folder, so no picture can be written below it")
    extension = os.path.splitext(args.output)[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        parser.error(f"--output {args.output}: {extension or 'no extension'} is not a picture format PIL writes; "
                     "use e.g. .png or .jpg")
    return args


def collect_images(inputs: Sequence[str]) -> List[str]:
    paths: List[str] = []
    for item in inputs:
        if os.path.isdir(item):  # its files, unread: those that are not images are skipped when drawn
            paths += image_paths(item)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return paths


def load_model(config_file: str, checkpoint: str, opts: Sequence[str], device: str) -> MAEPretrainer:
    if os.path.isdir(checkpoint):
        raise IsADirectoryError(f"--checkpoint {checkpoint} is a folder, not a checkpoint file (.pth)")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    model = instantiate(load_config(config_file, opts).model)
    if not isinstance(model, MAEPretrainer):
        raise ValueError(f"{config_file} builds a {type(model).__name__}, not an MAE pre-training model "
                         "(configs/mae/*.py)")
    try:
        SafeDetectionCheckpointer(model, strict=True).load(checkpoint)  # every weight drawn comes from the file
    except ValueError as e:
        if "differ in shape" not in str(e):  # not an MAE checkpoint of this config, or not a checkpoint
            raise
        raise ValueError(f"{e}\nWas the checkpoint pre-trained with model overrides? Pass the same ones with "
                         "--opts (the run's config.yaml holds its settings).") from None
    return model.to(device).eval()


def square_crop(path: str, side: int) -> torch.Tensor:
    """(3, side, side) uint8 RGB: short side resized to ``side``, centre crop."""
    image = torch.from_numpy(read_image(path, format="RGB").copy()).permute(2, 0, 1)
    image = F.resize(image, [side], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(image, [side, side])


@torch.no_grad()
def reconstruct(model: MAEPretrainer, crops: torch.Tensor, mask_ratio: float, seed: int) -> List[np.ndarray]:
    """The four panels of each image (H, W, 3 uint8 each), in :data:`COLUMNS` order."""
    model.mask_ratio = mask_ratio
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(crops.shape[0], model.patch_embed.num_patches, generator=generator)
    inputs = [{"image": crop, "mask_noise": n} for crop, n in zip(crops, noise)]
    images, noise = model.preprocess(inputs)
    outputs = MaskedAutoencoderViT.forward(model, images, noise)  # the tensor interface: pred and mask
    pred, mask = outputs["pred"].float(), outputs["mask"]
    target = model.patchify(images)
    if model.norm_pix_loss:  # the prediction is the patch normalised by its own mean and variance
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    hidden = mask[..., None].bool()
    panels = {
        "original": target,
        "masked": torch.where(hidden, torch.zeros_like(target), target),  # 0 = the mean colour: grey
        "reconstruction": pred,
        "reconstruction + visible": torch.where(hidden, pred, target),
    }
    std, mean = model.pixel_std.cpu(), model.pixel_mean.cpu()
    drawn = []
    for name in COLUMNS:
        pixels = model.unpatchify(panels[name].cpu()) * std + mean
        drawn.append(pixels.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy())
    return [np.stack([d[i] for d in drawn]) for i in range(crops.shape[0])]


def draw_sheet(rows: List[np.ndarray], out_file: str, scale: int = 1) -> str:
    """One row per image, one column per panel (each ``scale`` times enlarged), titled."""
    side = rows[0].shape[1] * scale
    sheet = Image.new("RGB", (len(COLUMNS) * side, TITLE_HEIGHT + len(rows) * side), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for column, name in enumerate(COLUMNS):
        pen.text((column * side + 4, 3), name, fill=(0, 0, 0))
    for row, panels in enumerate(rows):
        for column, panel in enumerate(panels):
            picture = Image.fromarray(panel).resize((side, side), Image.NEAREST)
            sheet.paste(picture, (column * side, TITLE_HEIGHT + row * side))
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    sheet.save(out_file)
    return out_file


def run(args: argparse.Namespace) -> str:
    model = load_model(args.config_file, args.checkpoint, args.opts, args.device)
    mask_ratio = model.mask_ratio if args.mask_ratio is None else args.mask_ratio
    check_mask_ratio(mask_ratio, model.patch_embed.num_patches)
    side = model.patch_embed.img_size[0]
    crops = []
    for path in collect_images(args.images):
        if len(crops) == args.max_images:
            break
        try:
            crops.append(square_crop(path, side))
        except OSError as e:  # not an image, truncated, ...: the next image takes its place
            logger.warning("skipping %s, which cannot be read as an image: %s", path, e)
    if not crops:
        raise ValueError(f"none of {args.images} could be read as an image")
    crops = torch.stack(crops)
    rows = reconstruct(model, crops, mask_ratio, args.seed)
    out = draw_sheet(rows, args.output, scale=-(-224 // side))  # panels drawn at least 224 px
    logger.info("%d images, %.0f%% of patches hidden: %s", len(crops), 100 * mask_ratio, out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    try:
        run(parse_args(argv))
    except (ValueError, OSError) as e:  # bad arguments, missing or unreadable files, an unwritable output
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
