"""Crash safety of lazyconfig_train_net.py, with real SIGKILLs (tests/engine/fault_runner.py).

A run of the tiny config is killed four times -- at the start of a step, halfway through
writing a checkpoint, at a random moment from outside, and during its final evaluation --
and once has its newest checkpoint corrupted; restarted with ``--resume`` each time, it ends
with exactly the weights and metrics of a run that was never interrupted. A non-finite loss
stops training with an error naming the iteration and the terms, before any checkpoint of
that state.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import models  # noqa: F401  (before detectron2)
import pytest
import torch

from models.checkpoint import load_checkpoint_file

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/test/tiny_mimdet.py"

MAX_ITER = 10
TIMING = {"time", "data_time", "eta_seconds"}  # wall-clock measurements differ between any two runs


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_coco_writer, dataset_overrides):
    root = tmp_path_factory.mktemp("toy_crash")
    json_file = toy_coco_writer(root)
    return [
        *dataset_overrides("toy", json_file, root / "images"),
        "train.seed=5",
        f"train.max_iter={MAX_ITER}",
        "train.checkpointer.period=2",
        "train.eval_period=5",
        "model.roi_heads.box_predictor.test_topk_per_image=10",
    ]


def _command(output_dir: Path, overrides, resume: bool):
    return [sys.executable, "tests/engine/fault_runner.py", "--config-file", TINY, *(["--resume"] if resume else []),
            *overrides, f"train.output_dir={output_dir}"]


def _env(**faults):
    # One thread per process: bit-identical runs need the same thread count, and 2 cores shared
    # with other processes make OpenMP threads wait on each other.
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **faults}


def run(output_dir: Path, overrides, resume: bool = True, **faults) -> subprocess.CompletedProcess:
    """Run the launcher; ``.log`` holds its whole output (detectron2 logs to stdout)."""
    result = subprocess.run(_command(output_dir, overrides, resume), cwd=REPO, env=_env(**faults),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    result.log = result.stdout
    return result


def kill_from_outside(output_dir: Path, overrides, after_iteration: int, log: Path) -> int:
    """Start a resumed run; SIGKILL it at a random moment once metrics.json reaches ``after_iteration``."""
    with open(log, "w") as out:
        process = subprocess.Popen(_command(output_dir, overrides, True), cwd=REPO, env=_env(),
                                   stdout=out, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None and max(iterations(output_dir), default=-1) < after_iteration:
                time.sleep(0.05)
            time.sleep(random.Random().uniform(0.0, 0.2))
            process.send_signal(signal.SIGKILL)
            return process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()


def iterations(output_dir: Path) -> list:
    path = output_dir / "metrics.json"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line)["iteration"])
        except ValueError:  # a line being written
            pass
    return records


def metrics(output_dir: Path) -> list:
    """metrics.json records without wall-clock timings, as comparable JSON strings."""
    lines = (output_dir / "metrics.json").read_text().splitlines()
    return [json.dumps({k: v for k, v in json.loads(line).items() if k not in TIMING}, sort_keys=True)
            for line in lines]


def last_checkpoint(output_dir: Path) -> str:
    return (output_dir / "last_checkpoint").read_text().strip()


def killed(result) -> bool:
    return result.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def uninterrupted(toy, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run(output_dir, toy, resume=True)  # --resume on an empty folder: a new run
    assert result.returncode == 0, result.log[-3000:]
    assert "--resume: no checkpoint in" in result.log and "starting a new run" in result.log
    return output_dir


def test_four_kills_and_a_corrupt_checkpoint_end_exactly_as_an_uninterrupted_run(toy, uninterrupted, tmp_path):
    output_dir = tmp_path / "killed"
    kills = 0

    result = run(output_dir, toy, resume=False, MIMDET_KILL_AT="2:step")
    assert killed(result), result.log[-3000:]
    kills += 1
    assert last_checkpoint(output_dir) == "model_0000001.pth"

    result = run(output_dir, toy, MIMDET_KILL_AT="5:save")
    assert killed(result), result.log[-3000:]
    kills += 1
    assert "Starting training from iteration 2" in result.log
    assert last_checkpoint(output_dir) == "model_0000003.pth"
    assert list(output_dir.glob(".model_0000005.pth.*.tmp")), "the kill should leave a half-written file"

    code = kill_from_outside(output_dir, toy, after_iteration=6, log=tmp_path / "outside.log")
    assert code == -signal.SIGKILL, (tmp_path / "outside.log").read_text()[-3000:]
    kills += 1
    outside_log = (tmp_path / "outside.log").read_text()
    assert "Starting training from iteration 4" in outside_log
    assert "Removed 1 partial checkpoint file(s)" in outside_log

    newest = output_dir / last_checkpoint(output_dir)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a disk that lost its tail
    result = run(output_dir, toy, MIMDET_KILL_AT=f"{MAX_ITER}:eval")
    assert killed(result), result.log[-3000:]
    kills += 1
    assert f"Cannot resume from {newest}" in result.log
    assert "Resuming from the previous good checkpoint" in result.log
    assert last_checkpoint(output_dir) == "model_final.pth"

    result = run(output_dir, toy)  # only the final evaluation is left
    assert result.returncode == 0, result.log[-3000:]
    assert f"Starting training from iteration {MAX_ITER}" in result.log
    assert kills == 4

    final, expected = (load_checkpoint_file(d / "model_final.pth") for d in (output_dir, uninterrupted))
    assert final["iteration"] == expected["iteration"] == MAX_ITER - 1
    assert final["model"].keys() == expected["model"].keys()
    different = [k for k, v in expected["model"].items() if not torch.equal(final["model"][k], v)]
    assert different == []
    assert metrics(output_dir) == metrics(uninterrupted)
    assert [json.loads(r)["iteration"] for r in metrics(output_dir)] == [*range(MAX_ITER), MAX_ITER]


def test_non_finite_loss_stops_naming_iteration_and_terms_and_keeps_the_last_checkpoint(toy, tmp_path):
    output_dir = tmp_path / "nan"
    result = run(output_dir, toy, resume=False, MIMDET_NAN_AT="2")
    assert result.returncode != 0
    assert "FloatingPointError: non-finite loss at iteration 2: loss_mask (all terms: " in result.log
    assert "loss_cls=" in result.log
    assert sorted(p.name for p in output_dir.glob("*model_*")) == ["model_0000001.pth"]
    assert last_checkpoint(output_dir) == "model_0000001.pth"
    good = load_checkpoint_file(output_dir / "model_0000001.pth")
    assert good["iteration"] == 1 and all(torch.isfinite(v).all() for v in good["model"].values())


def test_a_non_finite_loss_at_the_last_iteration_writes_no_final_evaluation_or_checkpoint(toy, tmp_path):
    output_dir = tmp_path / "nan_last"
    result = run(output_dir, toy, resume=False, MIMDET_NAN_AT=str(MAX_ITER - 1))
    assert result.returncode != 0
    assert f"non-finite loss at iteration {MAX_ITER - 1}" in result.log
    assert f"Training stopped at iteration {MAX_ITER - 1} by FloatingPointError: no final evaluation" in result.log
    assert result.log.count("Evaluation results for bbox") == 1  # the periodic one at iteration 5 only
    assert not (output_dir / "model_final.pth").exists() and last_checkpoint(output_dir) == "model_0000007.pth"
    records = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records if "bbox/AP" in r] == [4]


def test_a_diverged_run_is_not_resumed_from_its_diverging_checkpoint(toy, tmp_path):
    output_dir = tmp_path / "diverged"
    result = run(output_dir, [*toy, "optimizer.lr=1e30", "train.checkpointer.period=1"], resume=False)
    assert result.returncode != 0 and "FloatingPointError" in result.log
    record = json.loads((output_dir / "DIVERGED.json").read_text())
    assert record["iteration"] >= 1 and record["error"]
    checkpoints = sorted(output_dir.glob("model_*.pth"))
    assert checkpoints  # written while the loss was still finite
    resumed = run(output_dir, [*toy, "optimizer.lr=1e30", "train.checkpointer.period=1"], resume=True)
    assert resumed.returncode != 0
    assert (f"--resume: the run in {output_dir} stopped at iteration {record['iteration']} with a non-finite loss"
            in resumed.log)
    assert "Starting training" not in resumed.log and sorted(output_dir.glob("model_*.pth")) == checkpoints
