"""Start one or many training processes: GPUs with NCCL, CPUs with gloo, or under torchrun.

detectron2 0.6's ``launch()`` always uses NCCL and CUDA. This one keeps its arguments and
adds: CPU processes over gloo (so DDP runs, and is tested, without GPUs), and the env://
rendezvous that ``torchrun`` and SLURM wrappers set up (RANK, LOCAL_RANK, WORLD_SIZE, ...).
"""
import logging
import os
import socket
from datetime import timedelta
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.utils import comm

from models.lifetime import die_with_parent, kill_me_with_parent

__all__ = ["launch", "check_num_gpus", "free_port_url", "kill_me_with_parent", "in_spawned_worker", "TORCHRUN_VARS",
           "WORKER_REFUSED"]

logger = logging.getLogger(__name__)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT = timedelta(minutes=30)
# Exit status of a worker process that refused to run and has printed why: the launching process
# then exits with an error of its own, without torch's report of the worker's traceback.
WORKER_REFUSED = 3
_spawned_worker = False


def in_spawned_worker() -> bool:
    """Whether this is one of the processes that :func:`launch` started."""
    return _spawned_worker


def free_port_url() -> str:
    """A tcp:// URL on a free localhost port, for single-machine multi-process runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def check_num_gpus(num_gpus: int) -> None:
    """Refuse to start more GPU processes than this machine has GPUs."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpus < 0:
        raise ValueError(f"--num-gpus must be >= 0, got {num_gpus}")
    if available == 0 and num_gpus > 1:
        raise SystemExit(
            f"--num-gpus {num_gpus} asked for, but this machine has no CUDA GPU. "
            f"Use --num-gpus 1 for one CPU process, or --num-cpu-processes {num_gpus} for gloo DDP on CPU."
        )
    if available and num_gpus > available:
        raise SystemExit(f"--num-gpus {num_gpus} asked for, but this machine has {available} CUDA GPU(s)")


def _set_local_group(num_per_machine: int, machine_rank: int) -> None:
    """detectron2's comm.get_local_rank() needs the group of processes on this machine."""
    num_machines = dist.get_world_size() // num_per_machine
    for i in range(num_machines):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _worker(local_rank: int, main_func: Callable, backend: str, world_size: int, num_per_machine: int,
            machine_rank: int, dist_url: str, args: Tuple, timeout: timedelta, parent_pid: int) -> None:
    global _spawned_worker
    _spawned_worker = True
    die_with_parent(parent_pid)  # an orphaned worker would train on, into a folder whose lock died
    rank = machine_rank * num_per_machine + local_rank
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size, rank=rank,
                            timeout=timeout)
    _set_local_group(num_per_machine, machine_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch(main_func: Callable, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: Optional[str] = None, args: Tuple = (), num_cpu_processes: int = 0,
           timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Run ``main_func(*args)`` in every process of the job.

    Args:
        num_gpus_per_machine: GPU processes per machine (NCCL). Ignored with ``num_cpu_processes``.
        num_machines, machine_rank, dist_url: as detectron2's ``launch`` ("auto": a free local port).
        num_cpu_processes: if > 0, that many CPU processes per machine over gloo.
    """
    if all(v in os.environ for v in TORCHRUN_VARS):  # started by torchrun / a SLURM wrapper
        backend = "nccl" if torch.cuda.is_available() and num_cpu_processes == 0 else "gloo"
        local_rank = int(os.environ["LOCAL_RANK"])
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        _set_local_group(local_size, dist.get_rank() // local_size)
        logger.info("torchrun: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
        try:
            main_func(*args)
        finally:
            dist.destroy_process_group()
        return

    if num_cpu_processes > 0:
        backend, per_machine = "gloo", num_cpu_processes
    else:
        check_num_gpus(num_gpus_per_machine)
        backend, per_machine = "nccl", num_gpus_per_machine
    world_size = per_machine * num_machines
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("--dist-url (or --master_addr/--master_port) is required with --num-machines > 1")
        dist_url = free_port_url()
    logger.info("Starting %d %s process(es) on this machine (world size %d, %s)", per_machine,
                "CPU" if backend == "gloo" else "GPU", world_size, backend)
    spawn_logger = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_logger.level
    spawn_logger.setLevel(logging.ERROR)  # not "Terminating process N via signal SIGTERM" after one failed
    try:
        mp.start_processes(_worker, nprocs=per_machine, start_method="spawn", daemon=False,
                           args=(main_func, backend, world_size, per_machine, machine_rank, dist_url, args, timeout,
                                 os.getpid()))
    except mp.ProcessExitedException as e:
        if e.exit_code == WORKER_REFUSED:  # the worker has said why
            raise SystemExit(1) from None
        raise
    finally:
        spawn_logger.setLevel(level)
