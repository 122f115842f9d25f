"""Multi-process launch without GPUs: gloo processes, and torchrun's env:// rendezvous."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import models  # noqa: F401
from models.engine.launch import check_num_gpus, launch

REPO = Path(__file__).resolve().parents[2]


def _report(out_dir):
    """Runs in every process: rank facts and an all-reduce, written to a file per rank."""
    import torch
    import torch.distributed as dist

    from detectron2.utils import comm

    value = torch.tensor([float(comm.get_rank() + 1)])
    dist.all_reduce(value)
    facts = dict(rank=comm.get_rank(), world=comm.get_world_size(), local_rank=comm.get_local_rank(),
                 local_size=comm.get_local_size(), backend=dist.get_backend(), total=value.item())
    Path(out_dir, f"rank{comm.get_rank()}.json").write_text(json.dumps(facts))


def _check(out_dir, world):
    facts = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    assert [f["rank"] for f in facts] == list(range(world))
    assert all(f["world"] == world and f["local_size"] == world and f["backend"] == "gloo" for f in facts)
    assert [f["local_rank"] for f in facts] == list(range(world))
    assert all(f["total"] == world * (world + 1) / 2 for f in facts)


def test_cpu_processes_over_gloo(tmp_path):
    launch(_report, num_gpus_per_machine=0, num_cpu_processes=2, args=(str(tmp_path),))
    _check(tmp_path, 2)


def test_torchrun_env_rendezvous(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
        import models
        from models.engine.launch import launch
        from test_launch import _report
        launch(_report, num_gpus_per_machine=1, num_cpu_processes=1, args=({str(tmp_path)!r},))
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    _check(tmp_path, 2)


def test_more_gpus_than_present_is_a_clear_error():
    import torch

    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(SystemExit, match=f"--num-gpus {present + 2} asked for"):
        check_num_gpus(present + 2)
    with pytest.raises(ValueError, match="got -1"):
        check_num_gpus(-1)


_SLEEPER = """
import os, sys, time
sys.path.insert(0, {repo!r})
import models  # noqa: F401
from models.engine.launch import launch

def sleep(folder):
    open(os.path.join(folder, str(os.getpid())), "w").close()
    time.sleep(120)

if __name__ == "__main__":
    launch(sleep, num_gpus_per_machine=0, num_cpu_processes=2, args=({folder!r},))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_workers_end_with_a_killed_launcher(tmp_path, signal_name):
    """Orphaned workers would train on into a folder whose lock died with the launcher. The
    launcher starts with SIGINT ignored, as a shell script's background job (``cmd &``) does:
    torch's own parent-death signal (SIGINT) then does not end the workers."""
    import signal
    import time

    folder = tmp_path / "pids"
    folder.mkdir()
    script = tmp_path / "launcher.py"
    script.write_text(_SLEEPER.format(repo=str(REPO), folder=str(folder)))
    launcher = subprocess.Popen([sys.executable, str(script)],
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 120
        while len(list(folder.iterdir())) < 2 and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.1)
        workers = [int(p.name) for p in folder.iterdir()]
        assert len(workers) == 2 and all(map(_alive, workers))
        launcher.send_signal(getattr(signal, signal_name))
        launcher.wait(timeout=30)
        deadline = time.time() + 10
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), f"workers {workers} outlived the launcher"
    finally:
        launcher.kill()
        for pid in [int(p.name) for p in folder.iterdir()]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
