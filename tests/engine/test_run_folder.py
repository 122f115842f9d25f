"""models/engine/run_folder.py and the launcher: a fresh run never writes over a previous run,
and a second launch on a folder in use fails at once, naming the process that holds it."""
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import models  # noqa: F401  (before detectron2)
import pytest

import lazyconfig_train_net as launcher
from models.engine.run_folder import RunFolderBusy, hold_run_folder

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/test/tiny_mimdet.py"


@contextlib.contextmanager
def held_by_another_process(folder: Path, resume: bool):
    """A live process holding ``folder``'s lock for the body's duration; yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         f"sys.path.insert(0, {str(REPO)!r})\n"
         "from models.engine.run_folder import hold_run_folder\n"
         f"with hold_run_folder({str(folder)!r}, resume={resume}, overwrite=False, eval_only=False):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def _previous_run(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"model_final.pth": b"weights", "last_checkpoint": b"model_final.pth",
             "metrics.json": b'{"iteration": 3}\n'}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def test_a_fresh_run_over_a_previous_one_is_refused_and_leaves_it_untouched(tmp_path):
    files = _previous_run(tmp_path)
    with pytest.raises(FileExistsError, match=r"holds a previous run \(last_checkpoint, metrics.json, model_final.pth\)"
                                              r"\. Pass --resume to continue it, --overwrite"):
        with hold_run_folder(str(tmp_path), resume=False, overwrite=False, eval_only=False):
            pass
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    for resume, eval_only in ((True, False), (False, True)):  # continuing it or evaluating in it is fine
        with hold_run_folder(str(tmp_path), resume=resume, overwrite=False, eval_only=eval_only):
            pass
    assert {name: (tmp_path / name).read_bytes() for name in files} == files


def test_overwrite_deletes_the_previous_run_first(tmp_path):
    _previous_run(tmp_path)
    (tmp_path / "log.txt").write_text("kept")
    with hold_run_folder(str(tmp_path), resume=False, overwrite=True, eval_only=False):
        assert sorted(os.listdir(tmp_path)) == [".lock", "log.txt"]


@pytest.fixture
def toy_data(tmp_path_factory, toy_coco_writer, dataset_overrides):
    """Overrides that register a small COCO-format set: the launcher checks that a run's data exist
    before it takes the run folder."""
    root = tmp_path_factory.mktemp("run_folder_data")
    return dataset_overrides(f"run_folder_{root.name}", toy_coco_writer(root), root / "images")


def test_the_launcher_refuses_before_any_work(tmp_path, toy_data):
    _previous_run(tmp_path)
    with pytest.raises(FileExistsError, match="holds a previous run"):
        launcher.cli(["--config-file", TINY, f"train.output_dir={tmp_path}", *toy_data])
    assert (tmp_path / "model_final.pth").read_bytes() == b"weights"
    assert launcher.build_parser().parse_args(["--overwrite"]).overwrite


def test_a_second_launch_on_a_folder_in_use_fails_at_once_naming_the_holder(tmp_path, toy_data):
    with held_by_another_process(tmp_path, resume=False) as pid:
        start = time.perf_counter()
        with pytest.raises(RunFolderBusy, match=rf"{tmp_path} is in use by another run \(process {pid}\)"):
            launcher.cli(["--config-file", TINY, "--resume", f"train.output_dir={tmp_path}", *toy_data])
        assert time.perf_counter() - start < 30
    # the operating system released the killed holder's lock: the folder is free again
    with hold_run_folder(str(tmp_path), resume=False, overwrite=False, eval_only=False):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_the_command_line_names_a_folder_in_use_in_one_line(tmp_path, toy_data):
    with held_by_another_process(tmp_path, resume=False) as pid:
        done = subprocess.run([sys.executable, "lazyconfig_train_net.py", "--config-file", TINY, "--resume",
                               f"train.output_dir={tmp_path}", *toy_data], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"lazyconfig_train_net.py: error: train.output_dir {tmp_path} is in use by another run (process {pid})")


def test_overwrite_never_deletes_the_weights_the_run_starts_from(tmp_path):
    _previous_run(tmp_path)
    with pytest.raises(FileExistsError, match=r"--overwrite would delete .*model_final.pth, which this run starts "
                                              r"from; copy it out of train.output_dir first"):
        with hold_run_folder(str(tmp_path), resume=False, overwrite=True, eval_only=False,
                             keep=[str(tmp_path / "model_final.pth")]):
            pass
    assert (tmp_path / "model_final.pth").read_bytes() == b"weights"


def test_a_launch_that_failed_before_training_leaves_no_run_behind(tmp_path):
    (tmp_path / "metrics.json").write_text("")  # opened by the writers, nothing written
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"")
    (tmp_path / "log.txt").write_text("Traceback ...")
    with hold_run_folder(str(tmp_path), resume=False, overwrite=False, eval_only=False):
        pass


def test_the_start_weights_are_kept_through_symlinks_too(tmp_path):
    run = tmp_path / "run"
    _previous_run(run)
    (tmp_path / "start.pth").symlink_to(run / "model_final.pth")
    (tmp_path / "run_link").symlink_to(run)
    for folder, start in ((run, tmp_path / "start.pth"), (tmp_path / "run_link", run / "model_final.pth")):
        with pytest.raises(FileExistsError, match="which this run starts from"):
            with hold_run_folder(str(folder), resume=False, overwrite=True, eval_only=False, keep=[str(start)]):
                pass
    assert (run / "model_final.pth").read_bytes() == b"weights"


def test_an_output_folder_that_cannot_hold_a_run_is_named(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match=rf"train.output_dir {tmp_path / 'a_file'} cannot hold a run: "):
        with hold_run_folder(str(tmp_path / "a_file"), resume=False, overwrite=False, eval_only=False):
            pass


def test_demo_fresh_clears_only_a_demo_run_and_never_a_live_one(tmp_path):
    from tools.demo import clear_demo_run

    _previous_run(tmp_path)
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "a.png").write_bytes(b"png")
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "photos").mkdir()
    clear_demo_run(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".lock", "notes.txt", "photos"]
    with held_by_another_process(tmp_path, resume=True) as pid:
        _previous_run(tmp_path)
        with pytest.raises(RunFolderBusy, match=rf"process {pid}"):
            clear_demo_run(str(tmp_path))
        assert (tmp_path / "model_final.pth").exists()
