"""Generate the synthetic shapes dataset (COCO format) and, optionally, previews of it.

    python datasets/generate_shapes.py --out datasets/shapes [--num-train 600 --num-val 100 --seed 0]
    python datasets/generate_shapes.py --out datasets/shapes --preview 4   # + annotated PNGs

Writes ``OUT/{train,val}/*.png`` and ``OUT/annotations/instances_{train,val}.json``. The data
are a function of the random seed and the sizes only; existing up-to-date splits are kept unless ``--force``.
"""
import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402,F401  (detectron2 compatibility first)
import numpy as np  # noqa: E402
import pycocotools.mask as mask_util  # noqa: E402
from PIL import Image  # noqa: E402

from models.data.synthetic_shapes import (  # noqa: E402
    SHAPE_CLASSES, RenderingProcessDied, ensure_shapes, load_split,
)
from models.visualize import draw_instances  # noqa: E402

PREVIEW_MIN_SIZE = 512


def write_previews(json_file: str, image_root: str, out_dir: str, count: int) -> None:
    """Draw the ground truth (masks decoded from the stored polygons) of the first ``count`` images."""
    coco = load_split(json_file)
    os.makedirs(out_dir, exist_ok=True)
    for image in coco["images"][:count]:
        pixels = np.asarray(Image.open(os.path.join(image_root, image["file_name"])).convert("RGB"))
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], image["height"],
                                                                        image["width"]))) for a in anns]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        drawing = draw_instances(pixels, boxes, [a["category_id"] - 1 for a in anns], SHAPE_CLASSES,
                                 masks=np.array(masks, bool) if masks else None, min_size=PREVIEW_MIN_SIZE)
        Image.fromarray(drawing).save(os.path.join(out_dir, image["file_name"]))
    print(f"previews of {min(count, len(coco['images']))} images in {out_dir}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="datasets/shapes", help="output folder")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if the data are up to date")
    parser.add_argument("--processes", type=int, default=None,
                        help="processes that render images side by side (default: one per available CPU; "
                             "the data are the same bytes whatever the number)")
    parser.add_argument("--preview", type=int, default=0, metavar="N",
                        help="also draw the annotations of the first N val images into OUT/preview")
    args = parser.parse_args(argv)
    for name in ("num_train", "num_val"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0 (numpy seeds are non-negative), got {args.seed}")
    if args.processes is not None and args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if args.preview < 0:
        parser.error(f"--preview takes a number of val images >= 0, got {args.preview}")
    if not args.out.strip():
        parser.error("--out is empty; give the folder to write the dataset into")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file; it takes a folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        paths = ensure_shapes(args.out, args.num_train, args.num_val, args.seed, processes=args.processes,
                              force=args.force)
    except KeyboardInterrupt:
        # The split being written has no json yet, so the next run generates it again.
        print("generate_shapes.py: interrupted; run it again to finish the dataset", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        sys.exit(f"generate_shapes.py: cannot write the dataset into {args.out}: {e}")
    except RenderingProcessDied as e:
        sys.exit(f"generate_shapes.py: {e}")
    print(f"shapes dataset ready in {time.perf_counter() - start:.1f}s: "
          + ", ".join(f"{split} {json_file}" for split, (json_file, _) in paths.items()))
    if args.preview > 0:
        write_previews(*paths["val"], os.path.join(args.out, "preview"), args.preview)


if __name__ == "__main__":
    main()
