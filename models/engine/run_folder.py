"""One run per output folder: a new run never writes over a previous one, and two launches never
share a folder.

A fresh run (no ``--resume``) into a folder that holds checkpoints or ``metrics.json`` would
overwrite ``model_final.pth`` and append its records to the old ones; it is refused unless
``--overwrite`` is given, which first deletes the previous run's checkpoints and metrics. For
the life of a run, the launching process holds an exclusive lock on ``<output_dir>/.lock``
(portalocker: ``flock`` on POSIX, ``LockFileEx`` on Windows), with its process id written in the
file; a second launch on the same folder fails at once, naming that process. The operating
system releases the lock when the process ends, however it ends, so no stale lock remains.
"""
import contextlib
import glob
import logging
import os
from typing import Iterator, List, Sequence

import portalocker

__all__ = ["previous_run_files", "hold_run_folder", "RunFolderBusy"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_RUN_FILES = ("model_*.pth", "last_checkpoint", "metrics.json", "events.out.tfevents.*", "DIVERGED.json")
# What marks a folder as holding a run: its checkpoints, or metrics it wrote. (A launch that
# failed before its first iteration leaves an empty metrics.json and event file: no run.)
_RUN_MARKS = ("model_*.pth", "last_checkpoint", "metrics.json")


class RunFolderBusy(RuntimeError):
    """Another process holds the output folder's lock."""


def previous_run_files(output_dir: str) -> List[str]:
    """Checkpoints, ``last_checkpoint``, ``metrics.json`` and event files a run left in
    ``output_dir``; empty if none of them shows a run (a checkpoint, or metrics written)."""
    marks = [path for pattern in _RUN_MARKS for path in glob.glob(os.path.join(output_dir, pattern))
             if os.path.getsize(path) > 0]
    if not marks:
        return []
    return sorted(path for pattern in _RUN_FILES for path in glob.glob(os.path.join(output_dir, pattern)))


@contextlib.contextmanager
def hold_run_folder(output_dir: str, *, resume: bool, overwrite: bool, eval_only: bool,
                    keep: Sequence[str] = ()) -> Iterator[None]:
    """Lock ``output_dir`` for the body's duration, after refusing (or, with ``overwrite``,
    clearing) a previous run in it when a fresh training run would write over it. ``keep``: files
    the run will read (its start weights); ``overwrite`` refuses to delete them.

    Raises:
        RunFolderBusy: another live process holds the folder.
        FileExistsError: a fresh run into a folder with a previous run, without ``overwrite``.
    """
    try:
        os.makedirs(output_dir, exist_ok=True)
        handle = open(os.path.join(output_dir, LOCK_NAME), "a+")
    except OSError as e:
        raise ValueError(f"train.output_dir {output_dir} cannot hold a run: {e.strerror or e}") from None
    try:
        try:
            portalocker.lock(handle, portalocker.LOCK_EX | portalocker.LOCK_NB)
        except portalocker.exceptions.LockException:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunFolderBusy(
                f"train.output_dir {output_dir} is in use by another run (process {holder}); wait for it to "
                "end, or choose another train.output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        if not (resume or eval_only):
            previous = previous_run_files(output_dir)
            if previous and not overwrite:
                names = ", ".join(os.path.basename(p) for p in previous[:4]) + (", ..." if len(previous) > 4 else "")
                raise FileExistsError(
                    f"train.output_dir {output_dir} holds a previous run ({names}). Pass --resume to continue it, "
                    "--overwrite to delete it and start over there, or choose another train.output_dir")
            kept = {os.path.realpath(k) for k in keep if k}
            needed = [p for p in previous if os.path.realpath(p) in kept]
            if needed:
                raise FileExistsError(f"--overwrite would delete {needed[0]}, which this run starts from; copy it "
                                      "out of train.output_dir first, or choose another train.output_dir")
            for stale in previous:
                os.remove(stale)
            if previous:
                logger.warning("--overwrite: deleted the previous run's %d files in %s", len(previous), output_dir)
        yield
    finally:
        with contextlib.suppress(Exception):
            portalocker.unlock(handle)
        handle.close()
