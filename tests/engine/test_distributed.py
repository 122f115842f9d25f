"""DDP without GPUs: lazyconfig_train_net.py with 2 gloo CPU processes, and under torchrun.

Both ranks hold identical weights after every step (tests/engine/fault_runner.py logs each rank's
digest of its model state); the FPN's SyncBN runs as NaiveSyncBatchNorm over gloo; the
evaluation gathers both ranks' predictions, and its AP equals a single-process evaluation of
the same checkpoint on the same data.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import models  # noqa: F401  (before detectron2)
import pytest


REPO = Path(__file__).resolve().parents[2]
TINY = "configs/test/tiny_mimdet.py"

ITERATIONS = 3


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_coco_writer, dataset_overrides):
    root = tmp_path_factory.mktemp("toy_ddp")
    json_file = toy_coco_writer(root)
    return [
        *dataset_overrides("toy", json_file, root / "images"),
        "train.seed=1",
        f"train.max_iter={ITERATIONS}",
        f"train.checkpointer.period={ITERATIONS}",
        "model.backbone.bottom_up.eval_sample_ratio=1.0",  # no random tokens: rank-independent predictions
    ]


def run(*args: str, replica_log: Path = None, module=("tests/engine/fault_runner.py",)) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    if replica_log:
        env["MIMDET_REPLICA_LOG"] = str(replica_log)
    return subprocess.run([sys.executable, *module, "--config-file", TINY, *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def copypaste(log: str) -> list:
    """detectron2's copy-paste result lines (task names, metric names, values)."""
    return [line.split("copypaste: ", 1)[1] for line in log.splitlines() if "copypaste: " in line]


def predictions(output_dir: Path) -> list:
    results = json.loads((output_dir / "coco_instances_results.json").read_text())
    return sorted((r["image_id"], r["category_id"], round(r["score"], 5), [round(v, 3) for v in r["bbox"]])
                  for r in results)


@pytest.fixture(scope="module")
def ddp_run(toy, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ddp")
    replica_log = output_dir / "replicas.jsonl"
    result = run("--num-cpu-processes", "2", *toy, f"train.output_dir={output_dir}", replica_log=replica_log)
    assert result.returncode == 0, result.stdout[-4000:]
    return output_dir, result.stdout, [json.loads(line) for line in replica_log.read_text().splitlines()]


def test_two_cpu_processes_keep_identical_weights_after_every_step(ddp_run):
    _, log, replicas = ddp_run
    assert "Rank of current process: 0. World size: 2" in log
    assert [r["iteration"] for r in replicas] == list(range(ITERATIONS))
    for record in replicas:
        assert len(record["digests"]) == 2 and record["digests"][0] == record["digests"][1], record
    assert replicas[0]["digests"][0] != replicas[-1]["digests"][0]  # the weights did change
    # Neither DDP's renamed broadcast_buffers nor detectron2's all_gather warns in every process.
    assert "FutureWarning" not in log and "TypedStorage is deprecated" not in log


def test_a_refused_resume_of_two_processes_is_one_line(ddp_run, toy):
    """A run refused while its processes set up: one error line (not torch's report of a worker's
    traceback, not one line per process), exit status 1; the traceback stays in the log file."""
    output_dir, _, _ = ddp_run
    log_before = (output_dir / "log.txt").read_text()
    result = run("--num-cpu-processes", "2", "--resume", *toy, f"train.output_dir={output_dir}",
                 "optimizer.lr=0.5", module=("lazyconfig_train_net.py",))
    assert result.returncode == 1, result.stdout[-4000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("lazyconfig_train_net.py: error")]
    assert len(errors) == 1 and "--resume cannot apply these changes" in errors[0], result.stdout[-4000:]
    assert "Traceback" not in result.stdout and "ProcessRaisedException" not in result.stdout
    assert "SIGTERM" not in result.stdout
    log_after = (output_dir / "log.txt").read_text()
    assert log_after.startswith(log_before) and "Traceback" in log_after[len(log_before):]


def test_syncbn_runs_over_gloo_with_one_log_line(ddp_run):
    _, log, _ = ddp_run
    lines = [line for line in log.splitlines() if "SyncBN on CPU processes" in line]
    assert len(lines) == 1 and "NaiveSyncBatchNorm" in lines[0]


def test_gathered_evaluation_equals_single_process_evaluation(ddp_run, toy, tmp_path):
    output_dir, log, _ = ddp_run
    assert "Start inference on 4 batches" in log  # each rank evaluated half of the 8 images
    single = run("--eval-only", *toy, f"train.output_dir={tmp_path}",
                 f"train.init_checkpoint={output_dir / 'model_final.pth'}")
    assert single.returncode == 0, single.stdout[-4000:]
    assert "Start inference on 8 batches" in single.stdout
    ap = copypaste(log)
    assert ap and ap == copypaste(single.stdout)
    assert float(ap[2].split(",")[1]) > 0  # bbox AP50: the comparison is not between two zeros
    gathered = predictions(output_dir)
    assert {image_id for image_id, *_ in gathered} == set(range(1, 9))
    assert gathered == predictions(tmp_path)


def test_starts_under_torchrun(toy, tmp_path):
    result = run(*toy, f"train.output_dir={tmp_path}", "train.max_iter=1", "dataloader.evaluator=null",
                 module=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "lazyconfig_train_net.py"))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Rank of current process: 0. World size: 2" in result.stdout
    assert "SyncBN on CPU processes" in result.stdout
    assert (tmp_path / "model_final.pth").exists()
