"""The demo (tools/demo.py) end to end on a few generated images and iterations."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools import demo  # noqa: E402


# An override that changes the weights' shapes: the pictures must be drawn by the model trained.
SHALLOWER = "model.backbone.bottom_up.depth=2"


def _run_demo(tmp_path, *extra):
    command = [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--output", str(tmp_path / "run"),
               "--data", str(tmp_path / "shapes"), "--num-train", "8", "--num-val", "3", "--num-pictures", "2",
               "train.max_iter=2", "train.eval_period=2", "train.checkpointer.period=1", "train.log_period=1",
               "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
               "dataloader.test.num_workers=0", *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("demo")
    result = _run_demo(tmp_path, SHALLOWER)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path, result


def test_demo_trains_evaluates_and_draws(demo_run):
    tmp_path, result = demo_run
    run = tmp_path / "run"
    assert (run / "model_final.pth").is_file()
    # The AP table: a header and one row per task with six numbers.
    lines = result.stdout.splitlines()
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith(("| bbox", "| segm"))}
    assert set(rows) == {"bbox", "segm"}
    assert all(len(row.strip("|").split("|")) == 7 for row in rows.values())
    for name in ("metrics.png", "predictions.png"):
        assert str(run / name) in result.stdout
        with Image.open(run / name) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 200
    # One annotated picture per val image asked for, and COCO results next to them.
    assert sorted(os.listdir(run / "predictions")) == ["images.json", "results.json", "val_000000.png",
                                                       "val_000001.png"]
    # The launcher trained at sample ratio 0.5 and evaluated (at 1.0) at the last iteration.
    records = [json.loads(line) for line in open(run / "metrics.json")]
    assert len([r for r in records if "bbox/AP" in r and "segm/AP" in r]) == 1
    assert "sample ratio 0.5 (eval 1.0)" in result.stderr + result.stdout
    assert "COCO AP on the synthetic shapes val split (sample ratio 1.0)" in result.stdout
    # Pictures without a detection say why (two iterations rarely score 0.5).
    drawn = json.loads((run / "predictions" / "results.json").read_text())
    assert ("no detection scored 0.5 or more on these images" in result.stdout) == (not drawn)


def test_rerun_continues_and_fresh_starts_over(demo_run):
    tmp_path, _ = demo_run
    stale = tmp_path / "run" / "predictions" / "val_000099.png"  # as an earlier run with more pictures leaves
    stale.write_bytes(b"")
    again = _run_demo(tmp_path, SHALLOWER)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Continuing the demo run" in again.stderr
    assert sorted(os.listdir(tmp_path / "run" / "predictions")) == ["images.json", "results.json",
                                                                     "val_000000.png", "val_000001.png"]
    fresh = _run_demo(tmp_path, SHALLOWER, "--fresh")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "--fresh: removed the previous demo run's" in fresh.stderr


def test_paths_with_commas_brackets_and_quotes_reach_the_launchers_config(monkeypatch):
    from models.config import load_config

    commands = []
    monkeypatch.setattr(demo.subprocess, "run", lambda command, **kwargs: commands.append(command))
    odd = "/tmp/a,b [c] d'e"
    paths = {split: (f"{odd}/{split}.json", f"{odd}/{split}") for split in ("train", "val")}
    demo.train(f"{odd}/run", paths, ["train.seed=1"])
    (command,) = commands
    cfg = load_config(demo.CONFIG, command[command.index("--resume") + 1:])
    assert cfg.train.output_dir == f"{odd}/run" and cfg.train.seed == 1
    assert [(d.name, d.json_file, d.image_root) for d in cfg.datasets.register] == [
        ("shapes_train", f"{odd}/train.json", f"{odd}/train"), ("shapes_val", f"{odd}/val.json", f"{odd}/val")]


def test_fresh_while_another_run_holds_the_folder_is_refused_in_one_line(tmp_path, caplog):
    from models.engine.run_folder import hold_run_folder

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "log.txt").write_text("a live run's log\n")
    sigterm = signal.getsignal(signal.SIGTERM)  # demo.main installs its own handler
    try:
        with hold_run_folder(str(folder), resume=True, overwrite=False, eval_only=False):
            with caplog.at_level("ERROR", logger=demo.logger.name):
                assert demo.main(["--output", str(folder), "--fresh", "--data", str(tmp_path / "shapes")]) == 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert "in use by another run" in caplog.text
    assert (folder / "log.txt").read_text() == "a live run's log\n"  # nothing was cleared


def test_the_ap_table_says_why_a_size_has_no_ap():
    nan = float("nan")
    row = {"AP": 63.6, "AP50": 80.0, "AP75": 75.0, "APs": 68.0, "APm": 59.0, "APl": nan}
    table = demo.ap_table({"bbox": row, "segm": dict(row, AP=58.4)}).splitlines()
    assert table[2] == "| bbox | 63.6 | 80.0 | 75.0 | 68.0 | 59.0 | nan |"
    assert table[-1] == "nan: APl, no val object of area above 96x96 px"
    # Nothing detected at all: every figure is nan, for a reason the summary gives elsewhere.
    assert "no val object" not in demo.ap_table({"bbox": dict.fromkeys(demo.METRICS, nan)})


def test_sample_ratios_named_in_the_summary_follow_the_overrides():
    assert demo.sample_ratios([]) == (0.5, 1.0)
    assert demo.sample_ratios(["model.backbone.bottom_up.sample_ratio=0.25",
                               "model.backbone.bottom_up.eval_sample_ratio=0.5"]) == (0.25, 0.5)


def test_launcher_errors_suggest_fresh_only_for_a_continued_run(tmp_path, monkeypatch, caplog):
    def launcher_fails(*args, **kwargs):
        raise subprocess.CalledProcessError(1, "lazyconfig_train_net.py")

    monkeypatch.setattr(demo.subprocess, "run", launcher_fails)
    monkeypatch.setattr(demo, "run", lambda args: demo.launch(demo.CONFIG, str(tmp_path), []))
    sigterm = signal.getsignal(signal.SIGTERM)  # demo.main installs its own handler
    try:
        for continued in (False, True):
            if continued:
                (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
            caplog.clear()
            with caplog.at_level("ERROR", logger=demo.logger.name):
                assert demo.main([]) == 1
            assert "the launcher stopped with exit status 1" in caplog.text
            assert ("--fresh" in caplog.text) == continued
    finally:
        signal.signal(signal.SIGTERM, sigterm)


@pytest.mark.parametrize("argv, message", [
    (["--num-pictures", "0"], "--num-pictures must be at least 1, got 0"),
    (["--num-train", "-3"], "--num-train must be at least 1, got -3"),
    (["train.output_dir=/tmp/elsewhere"], "the demo's run folder is --output"),
    (["--mae", "--pretrain-opt", "train.output_dir=/tmp/x"], "the demo's run folder is --output"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        demo.parse_args(["--data", str(tmp_path / "shapes"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "shapes").exists()


def test_final_results_needs_an_evaluation(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"iteration": 0, "total_loss": 1.0}) + "\n")
    with pytest.raises(RuntimeError, match="holds no evaluation"):
        demo.final_results(str(metrics))
    metrics.write_text(metrics.read_text() + json.dumps({"iteration": 1, "bbox/AP": 12.5, "bbox/AP50": 30.0,
                                                         "segm/AP": 10.0}) + "\n")
    assert demo.final_results(str(metrics)) == {"bbox": {"AP": 12.5, "AP50": 30.0}, "segm": {"AP": 10.0}}


def test_a_model_without_detections_gets_nan_ap_not_a_crash(tmp_path):
    # COCOEvaluator writes NaN box figures and no mask figures when nothing was detected
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"iteration": 9, "bbox/AP": float("nan"), "bbox/AP50": float("nan")}) + "\n")
    results = demo.final_results(str(metrics))
    assert set(results) == {"bbox", "segm"}
    assert all(math.isnan(results[task][metric]) for task in results for metric in demo.METRICS)


def _pretrain_opts(*extra):
    opts = ["train.max_iter=3", "dataloader.train.total_batch_size=4", "dataloader.train.num_workers=0",
            "model.decoder_depth=1", *extra]  # the reconstruction is drawn by the model pre-trained, 1 decoder block
    return [arg for opt in opts for arg in ("--pretrain-opt", opt)]


def test_mae_chain_pretrains_draws_and_compares_two_fine_tunings(tmp_path):
    result = _run_demo(tmp_path, "--mae", *_pretrain_opts())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    assert "NaN" not in (run / "comparison.json").read_text()  # strict JSON: COCOeval's NaN (APl) is null
    summary = json.loads((run / "comparison.json").read_text())
    assert set(summary) == {"pretrain", "finetune_mae", "finetune_scratch"}
    for stage in ("finetune_mae", "finetune_scratch"):
        assert summary[stage]["seconds"] > 0 and 0 <= summary[stage]["bbox/AP"] <= 100
        assert (run / stage / "model_final.pth").is_file()
    pretrained = str(run / "pretrain" / "model_final.pth")
    assert f"mae_checkpoint.path='{pretrained}'" in (run / "finetune_mae" / "log.txt").read_text()  # quoted path
    assert "mae_checkpoint.path='scratch'" in (run / "finetune_scratch" / "log.txt").read_text()
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| MAE pre-trained", "| random weights"))]
    assert len(rows) == 2 and all(len(row.strip("|").split("|")) == 6 for row in rows)
    for name in ("reconstruction.png", "mae_loss.png"):
        with Image.open(run / name) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 200

    # A rerun with the same settings skips the finished stages; another pre-training redoes the
    # fine-tuning that started from it, not the one from scratch.
    again = _run_demo(tmp_path, "--mae", *_pretrain_opts())
    assert again.returncode == 0 and again.stderr.count("is finished with these settings; not rerun") == 3
    assert json.loads((run / "comparison.json").read_text()) == summary
    other = _run_demo(tmp_path, "--mae", *_pretrain_opts("train.max_iter=4"))
    assert other.returncode == 0, other.stderr[-3000:]
    assert f"{run / 'pretrain'} ran with other settings" in other.stderr
    assert f"{run / 'finetune_mae'} ran with other settings" in other.stderr
    assert f"{run / 'finetune_scratch'} is finished with these settings" in other.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def _children(pid: int) -> list:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as f:
                if f"\nPPid:\t{pid}\n" in f.read():
                    found.append(int(entry))
        except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError):
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_terminated_demo_takes_its_training_run_with_it(tmp_path):
    import signal
    import time

    command = [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--output", str(tmp_path / "run"),
               "--data", str(tmp_path / "shapes"), "--num-train", "8", "--num-val", "3", "train.max_iter=100000",
               "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0"]
    demo_process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        launchers = _children(demo_process.pid)
        assert launchers and all(map(_alive, launchers))
        demo_process.send_signal(signal.SIGTERM)
        assert demo_process.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 10
        while any(map(_alive, launchers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, launchers)), "the launcher outlived the demo"
    finally:
        demo_process.kill()
