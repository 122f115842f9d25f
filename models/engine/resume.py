"""Crash-safe resume: a run killed at any moment and restarted with ``--resume`` ends exactly
as an uninterrupted one.

The data stream, augmentation and model randomness are functions of (seed, iteration)
(:mod:`models.data.resumable`), so a checkpoint needs only the weights, the optimizer, the
trainer's iteration and hook states, and the run's seed. This module adds:

* :class:`ResumableCheckpointer`: resumes from the newest checkpoint that can be read,
  falling back (with a warning) past truncated or corrupt ones, never silently from scratch;
  saves the run's seed in every checkpoint.
* :class:`MetricHistory`: carries the writers' recent scalar history through checkpoints, so
  the smoothed losses a resumed run writes are those of an uninterrupted run.
* :func:`drop_metrics_after`: removes from ``metrics.json`` the records of iterations the
  killed run wrote after its last checkpoint (the resumed run writes them again).
* :func:`check_resumed_config`: compares the config a checkpoint was written with to the
  resuming run's config. A resumed run keeps its optimizer state (learning rate, weight
  decay, betas, per-group multipliers), its seed and its classifier, so a change to
  ``optimizer.*``, ``train.seed``, ``model.roi_heads.num_classes`` or the training set's class
  names (``classes``) is an error that names the old and new value; every other change takes
  effect and is logged as a warning.
"""
import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from detectron2.engine import HookBase
from omegaconf import DictConfig, ListConfig

from ..checkpoint import (SafeDetectionCheckpointer, check_same_architecture, fixed_pos_tables, summarize_names,
                          write_atomic)

__all__ = ["ResumePoint", "NoReadableCheckpoint", "ResumableCheckpointer", "MetricHistory", "drop_metrics_after",
           "remove_partial_checkpoints", "flatten_config", "check_resumed_config"]

logger = logging.getLogger(__name__)

_CHECKPOINTS = "model_*.pth"
_PARTIAL_CHECKPOINTS = ".model_*.tmp"  # temporary files of interrupted atomic saves


# Settings a resumed run cannot change: the optimizer's state and the run's seed come from the
# checkpoint, and a classifier of another shape does not fit the optimizer's state.
_FIXED_ON_RESUME = ("optimizer.", "train.seed", "model.roi_heads.num_classes", "classes")
# Settings a resumed run does not read: its weights come from the checkpoint.
_UNREAD_ON_RESUME = ("train.init_checkpoint", "mae_checkpoint.", "train.output_dir", "dataloader.evaluator.output_dir")


def _leaf(value: Any) -> str:
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def flatten_config(cfg: Any, prefix: str = "") -> Dict[str, str]:
    """``{"optimizer.lr": "0.0001", ...}``: every leaf of a LazyConfig as a string (callables by
    their import path), the form in which checkpoints keep the config they were written with."""
    flat: Dict[str, str] = {}
    if isinstance(cfg, (DictConfig, Mapping)):
        items = ((str(k), cfg[k]) for k in cfg.keys())
    elif isinstance(cfg, (ListConfig, list, tuple)):
        items = ((str(i), v) for i, v in enumerate(cfg))
    else:
        return {prefix: _leaf(cfg)}
    for key, value in items:
        flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else key))
    return flat


def check_resumed_config(saved: Optional[Mapping[str, str]], current: Mapping[str, str]) -> List[str]:
    """Compare a checkpoint's config with the resuming run's; return the changed keys.

    Raises ValueError listing every change that cannot take effect on resume (optimizer
    settings, ``train.seed``, the classes); logs each other change as a warning.
    """
    if saved is None:
        logger.info("The checkpoint holds no config (written by an older version): settings are not compared")
        return []
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k)
                     and not k.startswith(_UNREAD_ON_RESUME))
    show = lambda key, config: config.get(key, "<absent>")  # noqa: E731
    fixed = [k for k in changed if k.startswith(_FIXED_ON_RESUME)]
    if fixed:
        lines = "\n  ".join(f"{k}: {show(k, saved)} in the checkpoint, {show(k, current)} now" for k in fixed)
        raise ValueError(
            f"--resume cannot apply these changes (the optimizer's state, the run's random seed and the classifier "
            f"come from the checkpoint):\n  {lines}\nRestore them to resume, or start a new run from the "
            f"checkpoint's weights with train.init_checkpoint=<checkpoint> in another train.output_dir.")
    for key in changed:
        logger.warning("--resume with a changed setting, which takes effect from here on: %s: %s -> %s",
                       key, show(key, saved), show(key, current))
    return changed


@dataclass
class ResumePoint:
    """A checkpoint to resume from: its path, the iteration it finished, the run's seed (None
    in checkpoints written without one) and its config (``flatten_config``; None if not kept)."""

    path: str
    iteration: int
    seed: Optional[int]
    config: Optional[Dict[str, str]] = None


class NoReadableCheckpoint(RuntimeError):
    """``--resume`` into a folder whose checkpoints all fail to read."""


class ResumableCheckpointer(SafeDetectionCheckpointer):
    """``SafeDetectionCheckpointer`` that finds a readable checkpoint to resume from.

    Args:
        model, save_dir, checkpointables: as detectron2's ``DetectionCheckpointer``.
        seed: the run's seed, written into every checkpoint (``ResumePoint.seed`` on resume).
        config: the run's ``flatten_config``, written into every checkpoint (``ResumePoint.config``).
    """

    def __init__(self, model, save_dir: str = "", *, seed: Optional[int] = None,
                 config: Optional[Dict[str, str]] = None, **checkpointables: Any) -> None:
        super().__init__(model, save_dir, **checkpointables)
        self.seed = seed
        self.config = config
        self._read: Optional[Tuple[str, Dict[str, Any]]] = None  # the checkpoint validated by find_resume_point

    def save(self, name: str, **kwargs: Any) -> None:
        extra = {"seed": self.seed} if self.config is None else {"seed": self.seed, "config": self.config}
        super().save(name, **{**extra, **kwargs})

    def resume_candidates(self) -> List[str]:
        """The file ``last_checkpoint`` names, then every ``model_*.pth`` of ``save_dir``, newest first."""
        found = sorted(glob.glob(os.path.join(self.save_dir, _CHECKPOINTS)), key=os.path.getmtime, reverse=True)
        folders = [path for path in found if os.path.isdir(path)]
        if folders:  # the run would train, then fail to write its checkpoint over it
            raise ValueError(f"--resume: {folders[0]} is a folder, where the run writes a checkpoint file: move it "
                             "away")
        if not self.has_checkpoint():
            return found
        try:
            last = self.get_checkpoint_file()
        except (OSError, UnicodeDecodeError) as e:
            logger.warning("%s cannot be read (%s): ignored, resuming from the newest model_*.pth",
                           os.path.join(self.save_dir, "last_checkpoint"), e)
            return found
        if os.path.basename(last) == "":
            logger.warning("%s is empty: ignored, resuming from the newest model_*.pth",
                           os.path.join(self.save_dir, "last_checkpoint"))
            return found
        if os.path.dirname(os.path.realpath(last)) != os.path.realpath(self.save_dir):
            logger.warning("last_checkpoint names %s, outside %s: ignored (a run resumes only its own "
                           "checkpoints)", last, self.save_dir)
            return found
        return [last] + [path for path in found if os.path.abspath(path) != os.path.abspath(last)]

    def find_resume_point(self) -> Optional[ResumePoint]:
        """The newest checkpoint that reads completely and holds a training state, or None if
        ``save_dir`` has no checkpoint at all.

        Unreadable ones are skipped with a warning; if there are checkpoints but none can be
        read, raises RuntimeError rather than start over them from scratch.
        """
        candidates = self.resume_candidates()
        skipped = []
        for path in candidates:
            try:
                data = self._load_file(path)
                iteration = int(data["iteration"])
            except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError) as e:
                reason = f"it has no training iteration ({e})" if isinstance(e, KeyError) else e
                logger.warning("Cannot resume from %s: %s", path, reason)
                skipped.append(os.path.basename(path))
                continue
            if skipped:
                logger.warning("Resuming from the previous good checkpoint %s (iteration %d), skipping %s",
                               path, iteration, ", ".join(skipped))
            absent = [name for name in self.checkpointables if name not in data]
            if absent:
                logger.warning("%s holds no %s state: %s afresh, so the run does not go on exactly as it would "
                               "have", path, " or ".join(absent), "they start" if len(absent) > 1 else "it starts")
            self._read = (path, data)
            return ResumePoint(path, iteration, data.get("seed"), data.get("config"))
        if candidates:
            raise NoReadableCheckpoint(
                f"--resume: none of the {len(candidates)} checkpoint(s) in {self.save_dir} can be read "
                f"({', '.join(skipped)}); refusing to start from scratch over them. Move them away to start "
                "a new run."
            )
        return None

    def check_fits_model(self) -> None:
        """Refuse the resume point :meth:`find_resume_point` found if its weights are of another
        architecture than the model, before the run changes anything in its folder (loading it,
        after the hooks are built, would find that only once ``metrics.json`` was cut back)."""
        if self._read is None:
            return
        path, data = self._read
        state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in data["model"].items()}
        model_state = self.model.state_dict()
        try:
            check_same_architecture(state, model_state, fixed_pos_tables(self.model))
        except ValueError as e:
            raise ValueError(f"--resume: {path}: {e}") from None
        # A run goes on with the model it saved: unlike fine-tuning, where detectron2 starts
        # missing layers from scratch, a layer added or removed since means another model.
        missing = [k for k in model_state if k not in state]
        unexpected = [k for k in state if k not in model_state]
        if missing or unexpected:
            parts = ([f"the model's {summarize_names(missing)} are not in it"] if missing else []) + \
                ([f"it holds {summarize_names(unexpected)}, which the model has not"] if unexpected else [])
            raise ValueError(f"--resume: {path} was saved by another architecture: {'; '.join(parts)}. "
                             "Resume with the run's own config (its config.yaml), or start a new run in "
                             "another folder")

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if self._read is not None and self._read[0] == filename:  # read once, by find_resume_point
            data, self._read = self._read[1], None
            return data
        return super()._load_file(filename)


def remove_partial_checkpoints(save_dir: str) -> int:
    """Delete the temporary files that interrupted checkpoint saves left in ``save_dir``."""
    partial = glob.glob(os.path.join(save_dir, _PARTIAL_CHECKPOINTS))
    for path in partial:
        os.remove(path)
    if partial:
        logger.info("Removed %d partial checkpoint file(s) of interrupted saves in %s", len(partial), save_dir)
    return len(partial)


class MetricHistory(HookBase):
    """Saves the last ``window`` values of every scalar with the trainer's checkpoint and puts
    them back into the event storage when a resumed run starts.

    detectron2's writers print and write the median over the last 20 iterations
    (``window`` default); without the history a resumed run would smooth over fewer values.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._restored: Dict[str, List[Tuple[float, int]]] = {}

    def state_dict(self) -> Dict[str, List[Tuple[float, int]]]:
        histories = self.trainer.storage.histories()
        return {name: [(float(v), int(i)) for v, i in buffer.values()[-self.window:]]
                for name, buffer in histories.items()}

    def load_state_dict(self, state_dict: Dict[str, List[Tuple[float, int]]]) -> None:
        self._restored = dict(state_dict)

    def before_train(self) -> None:
        histories = self.trainer.storage.histories()  # defaultdict(HistoryBuffer)
        for name, values in self._restored.items():
            for value, iteration in values:
                histories[name].update(value, iteration)
        self._restored = {}


def drop_metrics_after(output_dir: str, iteration: int) -> int:
    """Remove the ``metrics.json`` records of iterations after ``iteration`` (and a line cut
    short by a kill); returns how many were removed."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    dropped = len(lines) - len(kept)
    if dropped:
        write_atomic(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
        logger.info("metrics.json: removed %d record(s) after iteration %d; the resumed run writes them again",
                    dropped, iteration)
    return dropped
