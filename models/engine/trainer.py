"""Training step with mixed precision on CPU and CUDA.

detectron2 0.6's ``AMPTrainer`` knows only CUDA fp16 with a grad scaler. MIMDet also trains
in bf16, which needs no scaler and runs on CPU (AMX) as well as on CUDA.
"""
import logging
import math
import os
import platform
import time
from typing import Mapping, Optional

import torch
from detectron2.engine import SimpleTrainer, hooks
from detectron2.utils import comm

__all__ = ["MixedPrecisionTrainer", "cpu_has_native_bf16", "resolve_amp_dtype", "check_finite_losses"]

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# Values of oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, read by oneDNN at start-up) under which its
# kernels have no bf16 arithmetic: oneDNN's AVX512 bf16 kernels need AVX512-BF16 or AMX for that.
_ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively, so that bf16 autocast trains faster than fp32.

    On x86 that is oneDNN's bf16 support (PyTorch's test: AVX512 or AMX, within oneDNN's ISA cap)
    and the CPU's AVX512-BF16 or AMX instructions; on Arm the BF16 extension (PyTorch's test).
    Without them bf16 convolutions and matmuls convert to fp32 and back: the demo's step on a
    2-core AMD EPYC with AVX2 only took 2.18 s in bf16 against 0.26 s in fp32, and on an AMD
    EPYC with AVX512-BF16 held to oneDNN's AVX512 kernels without it (as on Intel Skylake to
    Ice Lake servers) 129 ms against 88 ms, where its own kernels take 66 ms in bf16.
    """
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
    if not onednn or platform.machine().lower() not in ("x86_64", "amd64"):
        return onednn  # Arm: PyTorch's test is the BF16 extension
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if None in probes:  # a PyTorch older than 2.3, without these probes: its test alone
        return onednn
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    return any(probe() for probe in probes) and cap not in _ONEDNN_ISAS_WITHOUT_BF16


def unset_as_none(dtype: Optional[str]) -> Optional[str]:
    """``train.amp.dtype`` with "None" / "null" as None: the command line's ``dtype=None`` reaches
    the config as the string 'None'."""
    return None if isinstance(dtype, str) and dtype.lower() in ("none", "null") else dtype


def resolve_amp_dtype(enabled: bool, dtype: Optional[str], device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype for ``train.amp``, or None for fp32.

    Args:
        enabled: ``train.amp.enabled``.
        dtype: "bf16" or "fp16". None: fp16 on CUDA, as in detectron2; on a CPU bf16 where it is
            native (:func:`cpu_has_native_bf16`), otherwise fp32.
        device_type: "cuda" or "cpu".
    """
    if not enabled:
        return None
    dtype = unset_as_none(dtype)
    if dtype is None:
        if device_type != "cuda" and not cpu_has_native_bf16():
            return None
        dtype = "fp16" if device_type == "cuda" else "bf16"
    if dtype not in _DTYPES:
        raise ValueError(f"train.amp.dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r} (fp32: "
                         "train.amp.enabled=False)")
    resolved = _DTYPES[dtype]
    if resolved is torch.float16 and device_type != "cuda":
        raise ValueError(f"train.amp.dtype={dtype!r} needs CUDA; on {device_type} leave it None (bf16 where the "
                         "CPU computes it natively, fp32 elsewhere) or set 'bf16'")
    return resolved


def check_finite_losses(loss_dict: Mapping[str, torch.Tensor], iteration: int) -> None:
    """Raise ``FloatingPointError`` on every process if any process's loss is NaN or infinite.

    detectron2 checks on the main process only, which leaves the other processes waiting in
    the next step's all-reduce. The message names the iteration, the non-finite terms and
    the values of all terms on the first process that saw them.
    """
    local = {name: float(value.detach()) for name, value in loss_dict.items()}
    per_rank = comm.all_gather(local) if comm.get_world_size() > 1 else [local]
    for rank, losses in enumerate(per_rank):
        bad = [name for name, value in losses.items() if not math.isfinite(value)]
        if bad:
            terms = ", ".join(f"{name}={value:.4g}" for name, value in losses.items())
            where = f" on rank {rank}" if len(per_rank) > 1 else ""
            raise FloatingPointError(
                f"non-finite loss at iteration {iteration}{where}: {', '.join(bad)} (all terms: {terms}). "
                "Training stopped before the weight update; no checkpoint was written from this state."
            )


class MixedPrecisionTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward runs under ``torch.autocast`` (bf16 or fp16).

    fp16 uses a ``GradScaler`` (saved with the trainer's state); bf16 has fp32's range and
    needs none. ``clip_grad_norm`` clips the global L2 norm of all gradients (after unscaling)
    and logs the norm before clipping as ``grad_norm``. With ``amp_dtype=None`` and no
    clipping this is exactly ``SimpleTrainer``.
    """

    def __init__(self, model, data_loader, optimizer, amp_dtype: Optional[torch.dtype] = None,
                 device_type: str = "cpu", clip_grad_norm: Optional[float] = None) -> None:
        super().__init__(model, data_loader, optimizer)
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"train.clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
        self.amp_dtype = amp_dtype
        self.device_type = device_type
        self.clip_grad_norm = clip_grad_norm
        use_scaler = amp_dtype is torch.float16
        self.grad_scaler = torch.amp.GradScaler(device_type, enabled=use_scaler) if use_scaler else None

    def train(self, start_iter: int, max_iter: int) -> None:
        self.stopped_by = None  # the exception that ended the training loop, if any
        super().train(start_iter, max_iter)

    def run_step(self) -> None:
        try:
            self._run_step()
        except BaseException as e:  # a non-finite loss, out of memory, Ctrl-C, ...
            self.stopped_by = e
            raise

    def after_step(self) -> None:
        try:
            super().after_step()
        except BaseException as e:  # a hook failed (a checkpoint of diverged weights, say)
            self.stopped_by = e
            raise

    def _run_step(self) -> None:
        assert self.model.training, "[MixedPrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            losses = sum(loss_dict.values())

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        check_finite_losses(loss_dict, self.iter)  # before any update, on every process
        self._write_metrics(loss_dict, data_time)
        if self.clip_grad_norm is not None:
            if self.grad_scaler is not None:
                self.grad_scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            if comm.is_main_process():
                self.storage.put_scalar("grad_norm", float(norm), smoothing_hint=True)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def after_train(self) -> None:
        # A run resumed from its final checkpoint starts at max_iter and runs no step, after which
        # detectron2 counts one past max_iter; its final evaluation belongs to max_iter, as in the
        # run that was interrupted.
        self.iter = min(self.iter, self.max_iter)
        if getattr(self, "stopped_by", None) is None:
            super().after_train()
            return
        # A step failed (at the last iteration too): the weights are not those of a finished
        # run, so there is no final evaluation and no final checkpoint to mistake for one.
        skipped = (hooks.EvalHook, hooks.PeriodicCheckpointer)
        logger.error("Training stopped at iteration %d by %s: no final evaluation and no final checkpoint",
                     self.iter, type(self.stopped_by).__name__)
        self.storage.iter = self.iter
        for hook in self._hooks:
            if isinstance(hook, skipped):
                continue
            try:  # the error that stopped training is the one to report, not a follow-on one
                hook.after_train()
            except Exception:  # noqa: BLE001
                logger.exception("%s could not finish after the error", type(hook).__name__)

    def state_dict(self):
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
