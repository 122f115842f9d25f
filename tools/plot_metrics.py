"""Plot a training run's metrics.json: smoothed loss curves (and the learning rate) over
iterations, and the evaluation APs (bbox/AP, segm/AP, ...) when the run has any.

    python tools/plot_metrics.py OUTPUT_DIR/metrics.json --out curve.png [--smooth 20]

``metrics.json`` is what detectron2's JSONWriter writes: one JSON dict per line, each with
an "iteration"; losses are "total_loss" and "loss_*", evaluations "<task>/AP".
"""
import argparse
import json
import logging
import math
import os
import sys
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["read_metrics", "smooth", "plot_metrics", "picture_path"]

logger = logging.getLogger("mimdet.plot_metrics")

Series = Dict[str, Tuple[np.ndarray, np.ndarray]]  # name -> (iterations, values)


def picture_path(path: str) -> str:
    """The file a picture given as ``path`` is written to: matplotlib adds ".png" to a name
    without an extension, so the name is completed here and every message shows the real one.
    A folder, a path below a file (``model.pth/x.png``) and an extension matplotlib cannot write
    are refused before any work."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise ValueError(f"{path} is a folder; name the picture to write in it, e.g. {os.path.join(path, 'chart.png')}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the folders still to be made end at an existing path
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{path}: {parent} is a file, not a folder, so no picture can be written below it")
    extension = os.path.splitext(path)[1]
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if extension and extension[1:].lower() not in formats:
        raise ValueError(f"{path}: matplotlib cannot write {extension} pictures; use one of {', '.join(formats)}")
    return path if extension else path + ".png"


def read_metrics(path: str) -> List[dict]:
    """The records of a JSONWriter file; lines that are not JSON dicts (a run killed while
    writing) are skipped with a warning."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d is not JSON; skipped", path, number)
                continue
            if not (isinstance(record, dict) and "iteration" in record):
                continue
            iteration = record["iteration"]
            if not (isinstance(iteration, (int, float)) and not isinstance(iteration, bool)
                    and math.isfinite(iteration) and iteration == int(iteration)):
                logger.warning("%s:%d: iteration %r is not a whole number; skipped", path, number, iteration)
                continue
            records.append(record)
    return records


def _series(records: List[dict], keep) -> Series:
    """Each numeric key accepted by ``keep`` as (iterations, values), sorted by iteration; a
    resumed run's repeated iterations keep their last value."""
    values: Dict[str, Dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if keep(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(key, {})[int(record["iteration"])] = float(value)
    return {key: (np.array(sorted(v)), np.array([v[i] for i in sorted(v)])) for key, v in sorted(values.items())}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over up to ``window`` points (the first points average fewer).

    A record that is not a number (a NaN or infinite loss) stays a gap in the curve at its own
    point, where the reader sees it, and the windows around it average their other records:
    a running sum with the NaN in it would blank every later point of the curve instead. Each
    window is averaged on its own (a running sum would carry a spike's rounding error, 1e20
    say, into every later point), each value divided by the count before the sum, so values
    near the float limit do not overflow."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if window <= 1 or len(values) == 0:
        return np.where(finite, values, np.nan)
    padded = np.concatenate([np.full(window - 1, np.nan), np.where(finite, values, np.nan)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)  # row i: the window ending at i
    counts = np.maximum(np.isfinite(windows).sum(axis=1), 1)  # 0 only where the point itself is NaN
    means = np.nansum(windows / counts[:, None], axis=1)
    return np.where(finite, means, np.nan)


def _is_loss(key: str) -> bool:
    return key == "total_loss" or key.startswith("loss_")


def _is_ap(key: str) -> bool:
    return key.endswith("/AP")


def plot_metrics(metrics_file: str, out_file: str, smooth_window: int = 20, title: str = "") -> str:
    """Draw the losses, lr and APs of ``metrics_file`` into the PNG ``out_file``; return it.

    Raises FileNotFoundError for a missing file and ValueError when it has no losses.
    """
    records = read_metrics(metrics_file)
    losses = _series(records, _is_loss)
    if not losses:
        raise ValueError(f"{metrics_file} has no loss entries (total_loss or loss_*) in {len(records)} records")
    aps = _series(records, _is_ap)
    lr = _series(records, lambda key: key == "lr").get("lr")
    figure, axes = plt.subplots(2 if aps else 1, 1, figsize=(9, 8 if aps else 4.5), squeeze=False, sharex=True)
    loss_axis = axes[0, 0]
    highest = []
    for key, (iterations, values) in losses.items():
        smoothed = smooth(values, smooth_window)
        loss_axis.plot(iterations, smoothed, label=key,  # a marker shows a lone record
                       linewidth=2.0 if key == "total_loss" else 1.0, marker="o" if len(iterations) < 3 else None)
        highest += [float(np.nanmax(smoothed))] if np.isfinite(smoothed).any() else []
    window = min(smooth_window, max(len(values) for _, values in losses.values()))
    loss_axis.set_xlabel("iteration")
    loss_axis.set_ylabel(f"loss (moving average of {window} records)" if window > 1 else "loss")
    loss_axis.grid(alpha=0.3)
    if highest and max(highest) > 0:  # room above the curves for the legend
        loss_axis.set_ylim(top=max(highest) * 1.4)
    loss_axis.legend(loc="upper right", fontsize="small")  # losses fall: the upper right is mostly free
    if lr is not None:
        lr_axis = loss_axis.twinx()
        # Each record holds the lr of its iteration until the next record: steps, not ramps.
        lr_axis.plot(*lr, color="gray", linestyle="--", linewidth=1.0, drawstyle="steps-post")
        lr_axis.set_ylabel("learning rate (dashed)")
        top = float(np.nanmax(lr[1])) if np.isfinite(lr[1]).any() else 0.0
        if top > 0:  # the peak below the legend
            lr_axis.set_ylim(0, top * 1.6)
    if aps:
        ap_axis = axes[1, 0]
        for key, (iterations, values) in aps.items():
            ap_axis.plot(iterations, values, marker="o", label=f"{key} (last {values[-1]:.1f})")
        ap_axis.set_xlabel("iteration")
        ap_axis.set_ylabel("AP")
        ap_axis.set_ylim(0, 100)  # COCO AP in percent: one evaluation, or a few close ones, keep their scale
        ap_axis.grid(alpha=0.3)
        ap_axis.legend(loc="upper left", fontsize="small")
    figure.suptitle(title or metrics_file)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    figure.savefig(out_file, dpi=100)
    plt.close(figure)
    return out_file


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="a run's metrics.json, or its folder")
    parser.add_argument("--out", default=None, help="PNG to write (default: next to metrics.json)")
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window for losses")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.path.isdir(args.metrics):
        args.metrics = os.path.join(args.metrics, "metrics.json")
    if args.smooth < 1:
        parser.error(f"--smooth is a number of records to average, at least 1 (no smoothing), got {args.smooth}")
    try:
        out = picture_path(args.out) if args.out else os.path.join(os.path.dirname(os.path.abspath(args.metrics)),
                                                                    "metrics.png")
        plot_metrics(args.metrics, out, args.smooth, args.title)
    except (OSError, ValueError) as e:  # a missing file, a bad --out (a dangling link, a name too long)
        sys.exit(f"plot_metrics.py: error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
