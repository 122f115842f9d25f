#!/usr/bin/env python
"""The built-in demo (``make demo``): MIMDet trained and evaluated end to end on a CPU.

    python tools/demo.py [--output output/demo] [--fresh] [key=value ...]

1. generates the synthetic shapes dataset in datasets/shapes if it is not there yet;
2. trains configs/demo/mimdet_shapes.py through lazyconfig_train_net.py (sample ratio 0.5),
   evaluating with COCOEvaluator at sample ratio 1.0 at the end;
3. plots the training curves (losses, lr, AP) to OUTPUT/metrics.png;
4. runs tools/infer.py on val images and tiles some of them into OUTPUT/predictions.png;
5. prints the AP table, the time taken and where the pictures are.

A demo that was interrupted continues from its last checkpoint; ``--fresh`` starts over.
Extra ``key=value`` arguments are config overrides for the launcher (e.g. ``train.max_iter=100``).

    python tools/demo.py --mae [--output output/demo_mae] [key=value ...]    (make mae-demo)

pre-trains the demo's ViT with MAE on the train images first (configs/mae/mae_pretrain_shapes.py,
into OUTPUT/pretrain; its loss curve is OUTPUT/mae_loss.png, its reconstructions of val images
OUTPUT/reconstruction.png), then fine-tunes MIMDet from that checkpoint (OUTPUT/finetune_mae)
and, for comparison, from random weights with the same recipe and iterations
(OUTPUT/finetune_scratch; 700 iterations each, under half the demo's), and prints both APs with
their times (also in OUTPUT/comparison.json).
The ``key=value`` overrides go to both fine-tuning runs, ``--pretrain-opt key=value`` to the
pre-training.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

STARTED = time.perf_counter()  # before torch and detectron2 are imported: "in all" counts their start-up too
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.interrupt import ctrl_c_in_one_line  # noqa: E402

if __name__ == "__main__":
    ctrl_c_in_one_line("demo.py")  # while the imports below take seconds

from PIL import Image  # noqa: E402

from models.config import load_config  # noqa: E402
from models.data.synthetic_shapes import ensure_shapes  # noqa: E402
from models.lifetime import kill_me_with_parent  # noqa: E402
from models.engine.run_folder import RunFolderBusy, hold_run_folder, previous_run_files  # noqa: E402
from tools import infer, mae_reconstruct  # noqa: E402
from tools.plot_metrics import plot_metrics, read_metrics  # noqa: E402

logger = logging.getLogger("mimdet.demo")

CONFIG = os.path.join(ROOT, "configs", "demo", "mimdet_shapes.py")
MAE_CONFIG = os.path.join(ROOT, "configs", "mae", "mae_pretrain_shapes.py")
LAUNCHER = os.path.join(ROOT, "lazyconfig_train_net.py")
DATA_ROOT = os.path.join(ROOT, "datasets", "shapes")
TARGETS = {"bbox": 50.0, "segm": 45.0}  # AP the demo is expected to reach (seeds 0 and 1 do)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="run folder (default output/demo, with --mae output/demo_mae)")
    parser.add_argument("--mae", action="store_true",
                        help="MAE pre-training first, then fine-tuning from it against fine-tuning from scratch")
    parser.add_argument("--fresh", action="store_true", help="discard a previous demo run in --output first")
    parser.add_argument("--num-pictures", type=int, default=6, help="val images tiled into predictions.png")
    parser.add_argument("--data", default=DATA_ROOT, help="where the shapes dataset is (generated if absent)")
    parser.add_argument("--num-train", type=int, default=600, help="train images to generate")
    parser.add_argument("--num-val", type=int, default=100, help="val images to generate")
    parser.add_argument("--pretrain-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="with --mae: a config override for the MAE pre-training (repeatable)")
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides for the launcher")
    args = parser.parse_args(argv)
    if os.path.exists(args.data) and not os.path.isdir(args.data):
        parser.error(f"--data {args.data} is a file; it takes a folder (the shapes are generated there if absent)")
    for name in ("num_pictures", "num_train", "num_val"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for opt in [*args.opts, *args.pretrain_opt]:
        if opt.partition("=")[0].strip().lstrip("+") == "train.output_dir":
            parser.error(f"'{opt}': the demo's run folder is --output (default output/demo)")
    return args


def quoted(path: str) -> str:
    """A path as a quoted override value, so that commas, brackets and quotes in it reach the
    config as they are."""
    return "'" + path.replace("'", "\\'") + "'"


def launch(config: str, output: str, opts: Sequence[str]) -> None:
    """Run the launcher with ``--resume`` (an interrupted demo run continues; without a
    checkpoint it starts anew)."""
    continuing = os.path.isfile(os.path.join(output, "last_checkpoint"))
    if continuing:
        logger.info("Continuing the demo run in %s (use --fresh to start over)", output)
    command = [sys.executable, LAUNCHER, "--config-file", config, "--resume", f"train.output_dir={quoted(output)}",
               *opts]
    logger.info("Running: %s", " ".join(command))
    # The launcher ends with the demo, however the demo ends (a SIGKILL included): an orphan
    # would train on and hold the run folder against the rerun.
    try:
        subprocess.run(command, cwd=ROOT, check=True, preexec_fn=kill_me_with_parent if os.name == "posix" else None)
    except subprocess.CalledProcessError as e:
        e.continuing = continuing  # main() explains --fresh only where a run was continued
        raise


def train(output: str, paths: Dict[str, Sequence[str]], opts: Sequence[str]) -> None:
    """Train and evaluate the demo detector through the launcher."""
    register = ",".join(f"{{name:shapes_{split},json_file:{quoted(json_file)},image_root:{quoted(image_root)}}}"
                        for split, (json_file, image_root) in paths.items())
    launch(CONFIG, output, [f"datasets.register=[{register}]", *opts])


# What a demo run writes besides the launcher's run files (previous_run_files).
_DEMO_FILES = ("log.txt", "config.yaml", "metrics.png", "predictions.png", "predictions", "inference",
               "coco_instances_results.json", "instances_predictions.pth", "demo_stage.json")


def clear_demo_run(output: str) -> None:
    """``--fresh``: delete what a demo run wrote in ``output``, and nothing else, while holding
    the folder's lock (so a live run there is never cleared)."""
    with hold_run_folder(output, resume=True, overwrite=False, eval_only=False):
        written = previous_run_files(output) + [os.path.join(output, name) for name in _DEMO_FILES]
        removed = 0
        for path in written:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
            else:
                continue
            removed += 1
    logger.info("--fresh: removed the previous demo run's %d files and folders in %s", removed, output)


def final_results(metrics_file: str) -> Dict[str, Dict[str, float]]:
    """The last evaluation in a run's metrics.json: {"bbox": {"AP": ..}, "segm": {..}}."""
    results: Dict[str, Dict[str, float]] = {}
    for record in read_metrics(metrics_file):
        for key, value in record.items():
            task, _, metric = key.partition("/")
            if task in TARGETS and metric in METRICS:
                results.setdefault(task, {})[metric] = value
    if not results:
        raise RuntimeError(f"{metrics_file} holds no evaluation; did training reach its end?")
    for task in TARGETS:  # COCOEvaluator writes no segm figures when the model detected nothing
        if task not in results or all(math.isnan(v) for v in results[task].values()):
            logger.warning("no %s AP: the model made no detections on the val images", task)
            results[task] = {metric: float("nan") for metric in METRICS}
    return results


def tile(paths: List[str], out_file: str, columns: int = 3, cell: int = 384) -> str:
    """Paste the pictures ``paths`` into a grid of ``cell``-px squares (aspect kept)."""
    rows = (len(paths) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for i, path in enumerate(paths):
        picture = Image.open(path).convert("RGB")
        picture.thumbnail((cell - 4, cell - 4))
        x, y = (i % columns) * cell + (cell - picture.width) // 2, (i // columns) * cell + (cell - picture.height) // 2
        sheet.paste(picture, (x, y))
    sheet.save(out_file)
    return out_file


def visualize(output: str, val_json: str, val_root: str, count: int, opts: Sequence[str] = ()) -> Tuple[str, int]:
    """Predictions of the final model on the first ``count`` val images, tiled into one PNG;
    ``opts`` are the run's config overrides (the model is built as it was trained). Returns the
    PNG and the number of detections drawn (score >= 0.5)."""
    with open(val_json) as f:
        names = sorted(image["file_name"] for image in json.load(f)["images"])[:count]
    folder = os.path.join(output, "predictions")
    shutil.rmtree(folder, ignore_errors=True)  # pictures of an earlier run's model would stay beside these
    results = infer.run(infer.parse_args([
        *(os.path.join(val_root, name) for name in names),
        "--config-file", CONFIG, "--checkpoint", os.path.join(output, "model_final.pth"),
        "--output", folder, "--coco-json", val_json, "--device", "cpu", "--draw-min-size", "384",
        *(["--opts", *opts] if opts else []),
    ]))
    pictures = [os.path.join(folder, os.path.splitext(name)[0] + ".png") for name in names]
    with open(results) as f:
        drawn = len(json.load(f))
    return tile(pictures, os.path.join(output, "predictions.png")), drawn


def sample_ratios(opts: Sequence[str]) -> Tuple[float, float]:
    """The training and evaluation sample ratios of the demo config with the run's overrides."""
    bottom_up = load_config(CONFIG, list(opts)).model.backbone.bottom_up
    return float(bottom_up.sample_ratio), float(bottom_up.eval_sample_ratio)


# COCOeval's object sizes (area in pixels); a size the val images lack has no AP (nan).
SIZE_RANGES = {"APs": "of area below 32x32 px", "APm": "of area 32x32 to 96x96 px", "APl": "of area above 96x96 px"}


def ap_table(results: Dict[str, Dict[str, float]]) -> str:
    lines = ["| task | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
    for task, values in results.items():
        lines.append(f"| {task} | " + " | ".join(f"{values.get(m, float('nan')):.1f}" for m in METRICS) + " |")
    missing = [metric for metric in SIZE_RANGES if any(math.isnan(values.get(metric, float("nan")))
                                                       for values in results.values())]
    if missing and not all(math.isnan(values.get("AP", float("nan"))) for values in results.values()):
        lines.append("\nnan: " + "; ".join(f"{metric}, no val object {SIZE_RANGES[metric]}" for metric in missing))
    return "\n".join(lines)


MAE_STAGES = ("pretrain", "finetune_mae", "finetune_scratch")
# Both fine-tunings run half the demo's length: where the start matters most, and the chain stays
# near 6 minutes. Their lr steps come at 75% and 92% of the run (iterations 525 and 642), where
# the comparison in the README was measured; the demo's own steps come later in its run.
MAE_FINETUNE_ITERS = 700
MAE_FINETUNE_SCHEDULE = ("lr_multiplier.scheduler.milestones=[27,33]", "lr_multiplier.scheduler.num_updates=36")


def run_stage(folder: str, settings: dict, stage: Callable[[], object]) -> float:
    """Run one stage of the ``--mae`` chain in ``folder``; return its wall time over every invocation.

    ``settings`` (the stage's overrides and the weights it starts from) are kept in the folder
    with the time. A rerun with the same settings continues an interrupted stage, adding to its
    time, and skips a finished one; with other settings the stage starts over, so the chain's
    results always belong together.
    """
    record = os.path.join(folder, "demo_stage.json")
    kept = {}
    if os.path.isfile(record):
        with open(record) as f:
            kept = json.load(f)
    if kept and kept.get("settings") != settings:
        logger.info("%s ran with other settings (%s); starting it over", folder, kept.get("settings"))
        clear_demo_run(folder)
        kept = {}
    seconds = float(kept.get("seconds", 0.0))
    if kept.get("finished") and os.path.isfile(os.path.join(folder, "model_final.pth")):
        logger.info("%s is finished with these settings; not rerun (--fresh starts over)", folder)
        return seconds
    start = time.perf_counter()
    finished = False
    try:
        stage()
        finished = True
    finally:  # also when interrupted: the next invocation adds to this time
        seconds += time.perf_counter() - start
        if os.path.isdir(folder):
            with open(record, "w") as f:
                json.dump({"settings": settings, "seconds": round(seconds, 1), "finished": finished}, f)
    return seconds


def file_digest(path: str) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_CHAIN_PICTURES = ("comparison.json", "mae_loss.png", "reconstruction.png")


def mae_chain(args: argparse.Namespace, output: str) -> int:
    """``--mae``: pre-train with MAE, draw its reconstructions, fine-tune from it and from scratch."""
    if args.fresh:
        for stage in MAE_STAGES:
            if os.path.isdir(os.path.join(output, stage)):
                clear_demo_run(os.path.join(output, stage))
        for name in _CHAIN_PICTURES:
            if os.path.isfile(os.path.join(output, name)):
                os.remove(os.path.join(output, name))
    paths = ensure_shapes(os.path.abspath(args.data), args.num_train, args.num_val)
    pretrain = os.path.join(output, "pretrain")
    pretrain_opts = [f"dataloader.train.dataset.folder={quoted(paths['train'][1])}", *args.pretrain_opt]
    seconds = {"pretrain": run_stage(pretrain, {"opts": pretrain_opts},
                                     partial(launch, MAE_CONFIG, pretrain, pretrain_opts))}
    mae_weights = os.path.join(pretrain, "model_final.pth")
    loss_curve = plot_metrics(os.path.join(pretrain, "metrics.json"), os.path.join(output, "mae_loss.png"),
                              smooth_window=1,  # each logged loss is already a 20-iteration median
                              title="MAE pre-training on the shapes train images")
    reconstruction = mae_reconstruct.run(mae_reconstruct.parse_args([
        paths["val"][1], "--config-file", MAE_CONFIG, "--checkpoint", mae_weights,
        "--output", os.path.join(output, "reconstruction.png"), "--max-images", "4", "--opts", *args.pretrain_opt]))
    results = {}
    for stage, start_from in (("finetune_mae", mae_weights), ("finetune_scratch", "scratch")):
        folder = os.path.join(output, stage)
        opts = [f"train.max_iter={MAE_FINETUNE_ITERS}", *MAE_FINETUNE_SCHEDULE, *args.opts,
                f"mae_checkpoint.path={quoted(start_from)}"]
        weights = file_digest(start_from) if start_from != "scratch" else "scratch"
        seconds[stage] = run_stage(folder, {"opts": opts, "weights": weights}, partial(train, folder, paths, opts))
        results[stage] = final_results(os.path.join(folder, "metrics.json"))
        plot_metrics(os.path.join(folder, "metrics.json"), os.path.join(folder, "metrics.png"), smooth_window=10,
                     title=f"MIMDet demo fine-tuned from {'MAE' if stage == 'finetune_mae' else 'scratch'}")
    summary = {stage: {"seconds": round(seconds[stage], 1), **{  # null for a metric COCOeval gives as NaN
        f"{task}/{metric}": round(value, 2) if math.isfinite(value) else None
        for task, values in results.get(stage, {}).items() for metric, value in values.items()}}
        for stage in MAE_STAGES}
    with open(os.path.join(output, "comparison.json"), "w") as f:
        json.dump(summary, f, indent=1)

    print(f"\nMIMDet demo fine-tuned from {seconds['pretrain'] / 60:.1f} min of MAE pre-training vs from random "
          "weights, same recipe\n")
    print("| start | box AP | mask AP | box AP50 | mask AP50 | fine-tuning time |\n|---|---|---|---|---|---|")
    for stage, name in (("finetune_mae", "MAE pre-trained"), ("finetune_scratch", "random weights")):
        box, mask = results[stage]["bbox"], results[stage]["segm"]
        print(f"| {name} | {box['AP']:.1f} | {mask['AP']:.1f} | {box['AP50']:.1f} | {mask['AP50']:.1f} | "
              f"{seconds[stage] / 60:.1f} min |")
    print(f"\nMAE pre-training: {seconds['pretrain'] / 60:.1f} min (the times of an interrupted stage and of the run "
          "that finishes it add up)")
    print(f"MAE loss curve:    {loss_curve}")
    print(f"Reconstructions:   {reconstruction}")
    print(f"Figures:           {os.path.join(output, 'comparison.json')}")
    return 0


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)  # SIGTERM (timeout, a scheduler): unwind, so stage times are kept


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _stop)
    try:
        return run(parse_args(argv))
    except subprocess.CalledProcessError as e:
        if e.returncode == 130:  # Ctrl-C reached the launcher first; it has said so
            logger.error("interrupted; run the same command again to continue")
            return 130
        hint = (" This demo run was continued from its checkpoint, with the settings it started with: for other "
                "settings add --fresh (or choose another --output).") if getattr(e, "continuing", False) else ""
        logger.error("the launcher stopped with exit status %d; its messages are above.%s", e.returncode, hint)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted; run the same command again to continue")
        return 130
    except RunFolderBusy as e:
        logger.error("%s", e)
        return 1


def run(args: argparse.Namespace) -> int:
    output = os.path.abspath(args.output or os.path.join("output", "demo_mae" if args.mae else "demo"))
    if args.mae:
        return mae_chain(args, output)
    if args.fresh and os.path.isdir(output):
        clear_demo_run(output)
    start = time.perf_counter()
    paths = ensure_shapes(os.path.abspath(args.data), args.num_train, args.num_val)
    train(output, paths, args.opts)
    trained = time.perf_counter()
    results = final_results(os.path.join(output, "metrics.json"))
    train_ratio, eval_ratio = sample_ratios(args.opts)
    curve = plot_metrics(os.path.join(output, "metrics.json"), os.path.join(output, "metrics.png"), smooth_window=10,
                         title=f"MIMDet demo: synthetic shapes, sample ratio {train_ratio} (eval {eval_ratio})")
    pictures, drawn = visualize(output, *paths["val"], args.num_pictures, args.opts)
    elapsed = time.perf_counter() - STARTED

    print(f"\nMIMDet demo: COCO AP on the synthetic shapes val split (sample ratio {eval_ratio})\n")
    print(ap_table(results))
    print(f"\nTime: {elapsed / 60:.1f} min in all, start-up included ({(trained - start) / 60:.1f} min data + "
          "training + evaluation)")
    print(f"Training curves:   {curve}")
    print(f"Predictions:       {pictures} (one PNG per image in {os.path.join(output, 'predictions')})")
    if not drawn:
        print("                   no detection scored 0.5 or more on these images, so they show none: the model "
              "needs more training")
    short = [f"{task} AP {results[task]['AP']:.1f} < {target}" for task, target in TARGETS.items()
             if not results[task]["AP"] >= target]  # NaN (no detections) is short too
    if short:
        print("Below the demo's targets: " + ", ".join(short))
    else:
        print("Targets met: " + ", ".join(f"{task} AP >= {target:g}" for task, target in TARGETS.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
