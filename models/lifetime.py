"""Child processes that end with their parent, however the parent ends.

A parent killed with SIGKILL (by the out-of-memory killer, say) or SIGTERM (as ``timeout`` and
job schedulers send) runs no clean-up, and a child it started would run on as an orphan: a
training worker writing into a folder whose lock died with its launcher, or a rendering worker
waiting forever for its next job. Only the standard library is imported here, so that light
tools can use it before torch is loaded.
"""
import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["kill_me_with_parent", "die_with_parent"]


def kill_me_with_parent() -> bool:
    """Ask the kernel for a SIGKILL when this process's parent dies (Linux's
    ``prctl(PR_SET_PDEATHSIG)``; it survives ``exec``, so it also serves as a ``preexec_fn``).
    Returns False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    return ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) == 0


def die_with_parent(parent_pid: int) -> None:
    """End this process when the process ``parent_pid`` that started it ends.

    On Linux the kernel kills it (``kill_me_with_parent``); elsewhere a thread checks the
    parent's pid every second. A parent that died before this call (the request would come too
    late) ends this process at once.
    """
    if not kill_me_with_parent():
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)
