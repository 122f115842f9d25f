"""lazyconfig_train_net.py with faults injected, for the crash and distributed tests.

    python tests/engine/fault_runner.py <the launcher's arguments>

The faults are read from environment variables at import, so the processes the launcher
spawns (which import this module again) carry them too:

* ``MIMDET_KILL_AT=<iteration>:<moment>``: SIGKILL this process (a real kill: no cleanup,
  no ``finally``) at ``step`` (start of that iteration's step), ``save`` (halfway through
  writing that iteration's checkpoint, before its rename) or ``eval`` (start of an
  evaluation at that iteration).
* ``MIMDET_NAN_AT=<iteration>``: ``loss_mask`` is NaN at that iteration.
* ``MIMDET_REPLICA_LOG=<file>``: after every step, rank 0 appends the iteration and every
  rank's digest of its model state (parameters and buffers) as one JSON line.
"""
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import models  # noqa: E402,F401  (before detectron2)
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.events import get_event_storage  # noqa: E402

import lazyconfig_train_net as launcher  # noqa: E402
from models import checkpoint as checkpoint_module  # noqa: E402
from models.engine import loops  # noqa: E402
from models.engine.trainer import MixedPrecisionTrainer  # noqa: E402
from models.meta_arch import GeneralizedRCNNImageListForward  # noqa: E402


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(iteration: int, moment: str) -> None:
    if moment == "step":
        run_step = MixedPrecisionTrainer.run_step

        def killing_run_step(self):
            if self.iter == iteration:
                _die()
            run_step(self)

        MixedPrecisionTrainer.run_step = killing_run_step
    elif moment == "save":
        save = checkpoint_module.save_checkpoint_atomic

        def killing_save(obj, path):
            if obj.get("iteration") == iteration:
                checkpoint_module.write_atomic(path, lambda f: (f.write(b"PK\x03\x04 half a checkpoint"), _die()))
            save(obj, path)

        checkpoint_module.save_checkpoint_atomic = killing_save
    elif moment == "eval":
        do_test = loops.do_test

        def killing_do_test(*args, **kwargs):
            if get_event_storage().iter == iteration:
                _die()
            return do_test(*args, **kwargs)

        loops.do_test = killing_do_test
    else:
        raise ValueError(f"MIMDET_KILL_AT moment must be step, save or eval, got {moment!r}")


def _nan_at(iteration: int) -> None:
    forward = GeneralizedRCNNImageListForward.forward

    def poisoned_forward(self, batched_inputs):
        out = forward(self, batched_inputs)
        if self.training and get_event_storage().iter == iteration:
            out["loss_mask"] = out["loss_mask"] * float("nan")
        return out

    GeneralizedRCNNImageListForward.forward = poisoned_forward


def _log_replicas(path: str) -> None:
    run_step = MixedPrecisionTrainer.run_step

    def logging_run_step(self):
        run_step(self)
        digest = hashlib.sha256()
        for name, value in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        digests = comm.all_gather(digest.hexdigest())
        if comm.is_main_process():
            with open(path, "a") as f:
                f.write(json.dumps({"iteration": self.iter, "digests": digests}) + "\n")

    MixedPrecisionTrainer.run_step = logging_run_step


if "MIMDET_KILL_AT" in os.environ:
    _iteration, _moment = os.environ["MIMDET_KILL_AT"].split(":")
    _kill_at(int(_iteration), _moment)
if "MIMDET_NAN_AT" in os.environ:
    _nan_at(int(os.environ["MIMDET_NAN_AT"]))
if "MIMDET_REPLICA_LOG" in os.environ:
    _log_replicas(os.environ["MIMDET_REPLICA_LOG"])

if __name__ == "__main__":
    launcher.cli()
