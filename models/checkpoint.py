"""Checkpoints, safely: weights-only reads that refuse pickled code, atomic writes, a checksum
of the contents in every checkpoint written here (verified on every read), MAE weights
mapped onto the MIMDet / Benchmarking-ViT backbones by state-dict name (the released files' names), and
:class:`SafeDetectionCheckpointer`, detectron2's checkpointer with all of that plus resizing
of fixed position tables to the model's grid. The launcher calls :func:`load_mae_weights`
with ``mae_checkpoint.path``, then ``SafeDetectionCheckpointer`` with ``train.init_checkpoint``.
"""
import argparse
import contextlib
import errno
import hashlib
import logging
import math
import os
import pickletools
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _strip_prefix_if_present
from torch import nn

from .backbones.pos_embed import resize_pos_table

__all__ = [
    "LoadReport", "load_checkpoint_file", "content_checksum", "CHECKSUM_KEY", "save_checkpoint_atomic",
    "write_atomic", "summarize_names",
    "load_mae_into_backbone", "fixed_pos_tables", "load_mae_weights",
    "resize_pos_tables", "check_same_architecture", "SafeDetectionCheckpointer", "SCRATCH",
]

logger = logging.getLogger(__name__)

PathOrState = Union[str, os.PathLike, Mapping[str, Any]]
SCRATCH = "scratch"  # mae_checkpoint.path that starts from random weights on purpose
_SAFE_GLOBALS = [argparse.Namespace]
_ALLOWED_GLOBAL_NAMES = {"argparse.Namespace"}
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict")  # what torch's legacy format needs for tensors
_FEW = 5
# A parameter beyond this magnitude (or not finite) means training diverged: no trained network
# has such weights, and a checkpoint of them is not written.
DIVERGED_WEIGHT = 1e12
# Key of the sha256 of a checkpoint's other contents (content_checksum), written by this project.
CHECKSUM_KEY = "content_sha256"
# Entries whose shape follows the number of classes: they may differ when fine-tuning on other data.
_CLASS_DEPENDENT = ("roi_heads.box_predictor.", "roi_heads.mask_head.predictor.")
# A detector checkpoint must cover at least this fraction of the model's values to be loaded.
_MIN_COVERAGE = 0.5


@dataclass
class LoadReport:
    """What an MAE load did: backbone names set, backbone names left as initialised, file names unused."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)


def _few(items: List[str]) -> str:
    shown = ", ".join(items[:_FEW])
    return shown + (f" (and {len(items) - _FEW} more)" if len(items) > _FEW else "")


def _pickle_globals(path: str, max_pickles: int = 4) -> List[str]:
    """Globals named by the leading pickles of a file (torch's legacy format has four in a row),
    read with pickletools, so nothing is executed; a pickle that does not parse adds nothing."""
    found: List[str] = []
    with open(path, "rb") as f:
        for _ in range(max_pickles):
            names, strings = [], []
            try:
                for opcode, arg, _ in pickletools.genops(f):
                    if opcode.name in ("GLOBAL", "INST"):
                        names.append(str(arg).replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL":
                        names.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
                    elif isinstance(arg, str) and "UNICODE" in opcode.name:
                        strings.append(arg)
            except Exception:  # not (or no longer) a complete pickle
                break
            found += names
    return found


def _refuse_code(path: str, names: Iterable[str]) -> None:
    bad = sorted(set(names) - _ALLOWED_GLOBAL_NAMES)
    if bad:
        raise ValueError(
            f"{path}: refusing to load: the file contains code (disallowed pickle globals: {', '.join(bad)}); "
            "only tensors, plain containers and argparse.Namespace are allowed. Nothing from it was run."
        )


def _feed(digest, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, Mapping):
        digest.update(f"dict {len(obj)};".encode())
        for key in sorted(obj, key=repr):
            digest.update(f"{key!r}:".encode())
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__} {len(obj)};".encode())
        for item in obj:
            _feed(digest, item)
    else:
        digest.update(f"{obj!r};".encode())


def content_checksum(data: Mapping[str, Any]) -> str:
    """sha256 of a checkpoint's contents (every tensor's bytes, dtype and shape, every other value's
    repr, dict keys in sorted order), without its own ``CHECKSUM_KEY`` entry. A flipped bit in any
    tensor changes it; unlike a hash of the file, it is the same however torch lays the file out."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in data.items() if key != CHECKSUM_KEY})
    return digest.hexdigest()


def _legacy_pickles_cut(path: str, count: int = 5) -> bool:
    """Whether the file ends inside one of its first ``count`` pickles (torch's legacy format
    starts with five: magic number, protocol, system info, the object, its storage keys)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        for _ in range(count):
            if f.tell() >= size:  # ended between pickles
                return False
            try:
                for _ in pickletools.genops(f):
                    pass
            except Exception:  # noqa: BLE001  (a pickle that does not parse: cut if it reached the end)
                return f.tell() >= size
    return False


def _load_error_message(path: str, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, without torch's advice to load the file with
    ``weights_only=False`` (which runs whatever code the file holds)."""
    text = str(error).strip()
    cut = isinstance(error, EOFError) or any(s in text for s in ("unexpected EOF", "truncated", "wrong byte size"))
    if cut or (not zipfile.is_zipfile(path) and _legacy_pickles_cut(path)):
        return (f"{path} is truncated or damaged: its data ends early or does not read back "
                f"({os.path.getsize(path):,} bytes); copy or download it again")
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:  # the reason, after torch's paragraph of advice
            text = line.split("WeightsUnpickler error:", 1)[1].split(" Please use", 1)[0].strip()
            break
    reason = text.splitlines()[0] if text else type(error).__name__
    return f"{path} is not a PyTorch checkpoint that can be read safely ({reason})"


def load_checkpoint_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a torch checkpoint on the CPU with ``weights_only=True``, allowing ``argparse.Namespace``.

    A checkpoint written by this project carries ``CHECKSUM_KEY``; it is verified and removed.
    Files without one (released checkpoints, other projects') load as they are.

    Raises FileNotFoundError if ``path`` is missing, ValueError if it is not a PyTorch
    checkpoint, holds code (pickle globals other than tensors/containers/Namespace), is not a
    dict, or its contents do not match their checksum.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":  # a zip's first entry, without the directory a zip ends with
            raise ValueError(f"{path} is truncated or damaged: it starts as a zip archive (torch.save) but its "
                             f"end is missing or unreadable ({os.path.getsize(path):,} bytes); copy or download "
                             "it again")
        if head[:1] != b"\x80":  # every pickle torch writes starts with its PROTO opcode
            raise ValueError(f"{path} is not a PyTorch checkpoint: neither a zip archive (torch.save) nor a pickle "
                             "(legacy torch.save)")
    if is_zip:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:
            raise ValueError(f"{path} is not a PyTorch checkpoint: {e}") from e
        _refuse_code(path, names)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not is_zip:  # a legacy/plain pickle: name what it would have imported, beyond tensor rebuilding
            _refuse_code(path, [n for n in _pickle_globals(path) if not n.startswith(_TENSOR_GLOBALS)])
        raise ValueError(_load_error_message(path, e)) from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found {type(data).__name__}")
    if CHECKSUM_KEY in data:
        expected = data.pop(CHECKSUM_KEY)
        found = content_checksum(data)
        if found != expected:
            raise ValueError(f"{path}: its contents do not match the checksum written with them (sha256 "
                             f"{str(expected)[:12]}... expected, {found[:12]}... found): the file was damaged or "
                             "changed after it was saved")
    return data


# A failed write with less than this much room left on the disk is reported as the disk being full:
# torch.save's zip writer turns a short write into "unexpected pos ..." rather than ENOSPC.
_FULL_DISK_BYTES = 64 * 2**20


def _ran_out_of_space(error: BaseException, directory: str) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return isinstance(error, Exception) and shutil.disk_usage(directory).free < _FULL_DISK_BYTES
    except OSError:
        return False


def write_atomic(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temp file beside ``path``, fsync, then rename it over ``path``.

    On any failure the temp file is removed and ``path`` keeps its previous contents; a disk that
    filled up on the way is named as such (an ``OSError`` with ``errno.ENOSPC``).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        full, written = _ran_out_of_space(e, directory), 0
        with contextlib.suppress(OSError):
            written = os.path.getsize(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full:
            kept = "its previous contents are kept" if os.path.exists(path) else "no file was written"
            raise OSError(errno.ENOSPC, f"no space left on the disk holding {directory} after "
                          f"{written / 2**20:.0f} MiB of {os.path.basename(path)} were written ({kept}); "
                          "free some space and run again", path) from e
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint_atomic(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save(obj, path)`` that leaves either the old file or the complete new one."""
    write_atomic(os.fspath(path), lambda f: torch.save(obj, f))


def summarize_names(names: Iterable[str]) -> str:
    """Compact listing: ``decoder_blocks.4.norm1.weight`` ... -> ``decoder_blocks.4-7.*``."""
    groups: Dict[str, set] = {}
    for name in names:
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit() and i > 0), None)
        if idx is not None:
            groups.setdefault(".".join(parts[:idx]), set()).add(int(parts[idx]))
        else:
            groups.setdefault(".".join(parts[:-1]) + ".*" if len(parts) > 1 else name, set())
    out = []
    for key, indices in groups.items():
        runs: List[List[int]] = []
        for i in sorted(indices):
            if runs and i == runs[-1][1] + 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        spans = ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in runs)
        out.append(f"{key}.{spans}.*" if runs else key)
    return ", ".join(out) if out else "(none)"


def _square_side(table: torch.Tensor, num_prefix: int) -> Optional[int]:
    if table.dim() != 3 or table.shape[0] != 1 or table.shape[1] <= num_prefix:
        return None
    side = math.isqrt(table.shape[1] - num_prefix)
    return side if side * side == table.shape[1] - num_prefix else None


def _fit_table(value: torch.Tensor, target: torch.Tensor, num_prefix: int) -> Optional[torch.Tensor]:
    """``value`` resized to ``target``'s square grid, or None if the two tables cannot correspond."""
    src, dst = _square_side(value, num_prefix), _square_side(target, num_prefix)
    if src is None or dst is None or value.shape[-1] != target.shape[-1]:
        return None
    return resize_pos_table(value, (src, src), (dst, dst), num_prefix)


def _mae_state(path_or_state: PathOrState) -> Mapping[str, Any]:
    if isinstance(path_or_state, (str, os.PathLike)):
        path_or_state = load_checkpoint_file(path_or_state)
    model = path_or_state.get("model")
    return model if isinstance(model, Mapping) else path_or_state


def _load_mapped(backbone: nn.Module, path_or_state: PathOrState, source_of: Callable[[str], Optional[str]],
                 pos_tables: Dict[str, int], what: str) -> LoadReport:
    """Copy ``state[source_of(name)]`` into each backbone entry that has a source; check, then log."""
    state, target = _mae_state(path_or_state), backbone.state_dict()
    plan = {name: source_of(name) for name in target}
    plan = {name: src for name, src in plan.items() if src is not None}
    absent = [src for src in plan.values() if src not in state]
    if absent:
        hint = ""
        if any(k.startswith("backbone.") for k in state):
            hint = "; it looks like a detector checkpoint: load it with train.init_checkpoint="
        elif all(src.startswith("decoder") or src == "mask_token" for src in absent):
            hint = "; MIMDet needs MAE's full pre-training checkpoint (with the decoder), e.g. *_full.pth"
        raise ValueError(
            f"not an MAE checkpoint for this {what}: it lacks {len(absent)} entries the backbone needs: "
            f"{summarize_names(absent)} (the checkpoint holds {summarize_names(list(state))}){hint}"
        )
    new, mismatched = {}, []
    for name, src in plan.items():
        value = state[src]
        if not isinstance(value, torch.Tensor):
            mismatched.append(f"{src}: checkpoint holds a {type(value).__name__}")
            continue
        if src in pos_tables:
            value = _fit_table(value, target[name], pos_tables[src])
        if value is None or value.shape != target[name].shape:
            mismatched.append(f"{src}: checkpoint {tuple(state[src].shape)} vs backbone {tuple(target[name].shape)}")
        else:
            new[name] = value
    if mismatched:
        raise ValueError(f"MAE checkpoint does not fit this {what} ({len(mismatched)} entries): {_few(mismatched)}")
    with torch.no_grad():
        backbone.load_state_dict(new, strict=False)
    used = set(plan.values())
    report = LoadReport(loaded=list(new), missing=[n for n in target if n not in new],
                        unused=[k for k in state if k not in used])
    logger.info("MAE weights -> %s: loaded %d entries: %s", what, len(report.loaded), summarize_names(report.loaded))
    logger.info("%s entries not in MAE (kept as initialised): %s", what, summarize_names(report.missing))
    logger.info("MAE checkpoint entries unused by %s: %s", what, summarize_names(report.unused))
    return report


def load_mae_into_backbone(backbone: nn.Module, path_or_state: PathOrState) -> LoadReport:
    """Load an MAE pre-training checkpoint (file, ``{"model": sd, ...}`` or a state dict) into a
    backbone that declares its mapping, as timm keeps a ``checkpoint_filter_fn`` beside each model:

    * ``backbone.mae_source(name)``: the MAE entry its state-dict entry ``name`` loads from, or None;
    * ``backbone.mae_pos_tables``: MAE position tables it takes, with their leading (cls) slots;
      they are resized from the checkpoint's grid to the backbone's.

    Raises ValueError if the checkpoint lacks an entry the backbone needs or its shapes belong
    to another model; logs what was loaded, missing and unused.
    """
    if not callable(getattr(backbone, "mae_source", None)):
        raise TypeError(f"{type(backbone).__name__} declares no MAE mapping (a mae_source(name) method): expected "
                        "a MIMDetBackbone or a BenchmarkingViT")
    return _load_mapped(backbone, path_or_state, backbone.mae_source, dict(getattr(backbone, "mae_pos_tables", {})),
                        type(backbone).__name__)


def fixed_pos_tables(model: nn.Module) -> Dict[str, int]:
    """State-dict names of the fixed position tables that the model's modules declare in
    ``fixed_pos_tables`` (name -> leading cls slots), e.g. ``backbone.bottom_up.encoder.pos_embed``."""
    tables = {}
    for prefix, module in model.named_modules():
        for name, slots in getattr(module, "fixed_pos_tables", {}).items():
            tables[f"{prefix}.{name}" if prefix else name] = slots
    return tables


def load_mae_weights(model: nn.Module, path: Optional[PathOrState]) -> Optional[LoadReport]:
    """Load ``mae_checkpoint.path`` into a detector's ``backbone.bottom_up`` (or a bare backbone).

    ``SCRATCH`` ("scratch") keeps the random initialisation on purpose; None or "" too, with a
    warning (the launcher refuses that for training unless other weights are loaded).
    """
    if isinstance(path, str) and path == SCRATCH:
        logger.info("mae_checkpoint.path=%s: the backbone starts from random weights", SCRATCH)
        return None
    if not path:
        logger.warning("no MAE checkpoint: backbone starts from random weights")
        return None
    module = getattr(model, "module", model)  # (Distributed)DataParallel
    backbone = getattr(module, "backbone", module)
    bottom_up = getattr(backbone, "bottom_up", backbone)
    with _naming_file(path):
        return load_mae_into_backbone(bottom_up, path)


@contextlib.contextmanager
def _naming_file(path: Any):
    """Prefix a ValueError's message with the checkpoint file it is about, unless it names it."""
    try:
        yield
    except ValueError as e:
        if isinstance(path, (str, os.PathLike)) and os.fspath(path) not in str(e):
            raise ValueError(f"{os.fspath(path)}: {e}") from e
        raise


def resize_pos_tables(state: Dict[str, Any], model_state: Mapping[str, torch.Tensor],
                      tables: Mapping[str, int]) -> List[str]:
    """Resize, in ``state``, each fixed position table whose grid differs from ``model_state``'s.

    ``tables``: the model's fixed tables and their leading slots (:func:`fixed_pos_tables`).
    Returns the resized names; a table that cannot be resized (other width, non-square grid)
    is a ValueError, never dropped.
    """
    resized = []
    for key, value in list(state.items()):
        num_prefix = tables.get(key)
        if num_prefix is None or key not in model_state or tuple(value.shape) == tuple(model_state[key].shape):
            continue
        fitted = _fit_table(torch.as_tensor(value), model_state[key], num_prefix)
        if fitted is None:
            raise ValueError(f"position table {key}: checkpoint {tuple(value.shape)} cannot be resized to the "
                             f"model's {tuple(model_state[key].shape)} (needs the same width and square grids)")
        logger.info("resized %s from %s to %s", key, tuple(value.shape), tuple(fitted.shape))
        state[key] = fitted
        resized.append(key)
    return resized


def check_same_architecture(state: Mapping[str, Any], model_state: Mapping[str, torch.Tensor],
                            tables: Mapping[str, int] = ()) -> None:
    """Refuse a checkpoint made for another architecture.

    Raises ValueError, naming entries and shapes, if an entry the two share differs in shape
    (except the class-dependent predictors, which detectron2 skips when fine-tuning on other
    classes, and the fixed position tables, which :func:`resize_pos_tables` resizes), or if
    the checkpoint covers less than half of the model's values.
    """
    def may_differ(key: str) -> bool:
        return key.startswith(_CLASS_DEPENDENT) or key in tables

    shared = [k for k in model_state if k in state and hasattr(state[k], "shape")]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
                  for k in shared if tuple(state[k].shape) != tuple(model_state[k].shape) and not may_differ(k)]
    if mismatched:
        raise ValueError(f"checkpoint is for another architecture: {len(mismatched)} entries differ in shape: "
                         f"{_few(mismatched)}")
    total = sum(v.numel() for v in model_state.values())
    covered = sum(model_state[k].numel() for k in shared)
    if total and covered < _MIN_COVERAGE * total:
        absent = [k for k in model_state if k not in state]
        hint = " (an MAE checkpoint goes to mae_checkpoint.path)" if any(k.startswith("blocks.") for k in state) else ""
        raise ValueError(
            f"checkpoint is for another architecture{hint}: it has {100 * covered / total:.0f}% of the model's "
            f"values; the model's {summarize_names(absent)} are not in it, which holds {summarize_names(list(state))}"
        )


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """detectron2's DetectionCheckpointer that reads with ``weights_only=True``, resizes fixed
    position tables to the model's grid, refuses checkpoints of other architectures
    (:func:`check_same_architecture`) and writes checkpoints and ``last_checkpoint`` atomically.

    Detectron/Caffe2 ``.pkl`` files are refused: plain pickles can run code. With ``strict``
    (evaluation and inference), a checkpoint that leaves any model weight missing or of another
    shape is an error instead of a warning: those weights would stay random.
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = False, **checkpointables: Any) -> None:
        super().__init__(model, save_dir, **checkpointables)
        self.strict = strict

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        with _naming_file(path):
            return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            raise ValueError(f"{filename}: .pkl (Detectron/Caffe2 pickle) files are not supported, they can "
                             "run code when read; only PyTorch checkpoints (.pth/.pt) are")
        loaded = load_checkpoint_file(filename)
        if "model" not in loaded:
            loaded = {"model": loaded}
        if not isinstance(loaded["model"], Mapping):
            raise ValueError(f"{filename}: 'model' should map parameter names to tensors, found "
                             f"{type(loaded['model']).__name__}")
        return loaded

    def _load_model(self, checkpoint: Dict[str, Any]):
        _strip_prefix_if_present(checkpoint["model"], "module.")
        model_state, tables = self.model.state_dict(), fixed_pos_tables(self.model)
        check_same_architecture(checkpoint["model"], model_state, tables)
        resize_pos_tables(checkpoint["model"], model_state, tables)
        incompatible = super()._load_model(checkpoint)
        if self.strict and incompatible is not None and (incompatible.missing_keys or incompatible.incorrect_shapes):
            wrong = [f"{key} {tuple(found)} in the file, {tuple(wanted)} in the model"
                     for key, found, wanted in incompatible.incorrect_shapes]
            missing = [k for k in incompatible.missing_keys if k not in {w[0] for w in incompatible.incorrect_shapes}]
            raise ValueError("the checkpoint does not hold every weight of the model, which would stay random: "
                             + "; ".join(filter(None, [f"missing {summarize_names(missing)}" if missing else "",
                                                       f"other shapes: {_few(wrong)}" if wrong else ""])))
        return incompatible

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically, then point ``last_checkpoint`` at it."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        diverged = [k for k, v in self.model.named_parameters()
                    if not torch.isfinite(v).all() or v.detach().abs().max() > DIVERGED_WEIGHT]
        if diverged:
            raise FloatingPointError(f"not writing {name}.pth: the weights are not finite or beyond "
                                     f"{DIVERGED_WEIGHT:g} (in {_few(diverged)}); training has diverged")
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        data[CHECKSUM_KEY] = content_checksum(data)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info("Saving checkpoint to %s", save_file)
        save_checkpoint_atomic(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        write_atomic(os.path.join(self.save_dir, "last_checkpoint"),
                      lambda f: f.write(last_filename_basename.encode()))
