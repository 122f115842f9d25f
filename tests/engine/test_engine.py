"""The mixed-precision training step."""
import itertools

import pytest
import torch
from torch import nn

import models  # noqa: F401
from models.engine import trainer
from models.engine.trainer import MixedPrecisionTrainer, resolve_amp_dtype


class _Regressor(nn.Module):
    """Returns detectron2-style loss dicts and records the dtype its matmul ran in."""

    def __init__(self, poison_at: int = -1):
        super().__init__()
        self.linear = nn.Linear(8, 1)
        self.seen_dtypes = []
        self.calls = 0
        self.poison_at = poison_at

    def forward(self, batch):
        x, y = batch
        out = self.linear(x)
        self.seen_dtypes.append(out.dtype)
        loss = ((out.float() - y) ** 2).mean()
        self.calls += 1
        if self.calls - 1 == self.poison_at:
            loss = loss * float("nan")
        return {"loss_mse": loss, "loss_zero": loss * 0}


def _data():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    return itertools.repeat((x, x.sum(dim=1, keepdim=True)))


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_training_runs_in_the_requested_precision_and_learns(amp_dtype):
    model = _Regressor()
    trainer = MixedPrecisionTrainer(model, _data(), torch.optim.SGD(model.parameters(), lr=0.05),
                                    amp_dtype=amp_dtype, device_type="cpu")
    trainer.train(0, 30)
    assert set(model.seen_dtypes) == {amp_dtype or torch.float32}
    first, last = (trainer.storage.history("loss_mse").values()[i][0] for i in (0, -1))
    assert torch.isfinite(torch.tensor(last)) and last < 0.2 * first
    assert model.linear.weight.dtype == torch.float32  # master weights stay fp32


def test_non_finite_loss_stops_before_the_update_naming_iteration_and_terms():
    model = _Regressor(poison_at=3)
    trainer = MixedPrecisionTrainer(model, _data(), torch.optim.SGD(model.parameters(), lr=0.05),
                                    amp_dtype=torch.bfloat16, device_type="cpu")
    with pytest.raises(FloatingPointError, match=r"iteration 3: loss_mse, loss_zero \(all terms: loss_mse=nan"):
        trainer.train(0, 10)
    assert torch.isfinite(model.linear.weight).all()


def test_amp_dtype_resolution_and_errors(monkeypatch):
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp_dtype(False, "bf16", "cpu") is None
    assert resolve_amp_dtype(True, None, "cpu") is torch.bfloat16
    assert resolve_amp_dtype(True, None, "cuda") is torch.float16
    assert resolve_amp_dtype(True, "bf16", "cuda") is torch.bfloat16
    with pytest.raises(ValueError, match="'fp16' needs CUDA"):
        resolve_amp_dtype(True, "fp16", "cpu")
    with pytest.raises(ValueError, match=r"one of \['bf16'.* or None, got 'int8'"):
        resolve_amp_dtype(True, "int8", "cpu")
    # Without native bf16 the default is fp32 on a CPU; an explicit bf16 and CUDA are unchanged.
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    assert resolve_amp_dtype(True, None, "cpu") is None
    assert resolve_amp_dtype(True, "bf16", "cpu") is torch.bfloat16
    assert resolve_amp_dtype(True, None, "cuda") is torch.float16


@pytest.mark.parametrize("machine, onednn, avx512_bf16, amx, cap, native", [
    ("x86_64", True, True, False, "", True),  # AMD Zen 4, Intel Cooper Lake
    ("x86_64", True, False, True, "", True),  # AMX
    ("x86_64", True, False, False, "", False),  # AVX512 alone: Intel Skylake to Ice Lake
    ("x86_64", False, False, False, "", False),  # AVX2 only
    ("x86_64", True, True, False, "AVX512_CORE_VNNI", False),  # oneDNN held below its bf16 kernels
    ("x86_64", True, True, True, "avx512_core_amx", True),
    ("aarch64", True, False, False, "", True),  # Arm: oneDNN's (PyTorch's) test alone
    ("aarch64", False, False, False, "", False),
])
def test_native_bf16_needs_bf16_arithmetic_not_just_avx512(monkeypatch, machine, onednn, avx512_bf16, amx, cap,
                                                           native):
    monkeypatch.setattr(trainer.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert trainer.cpu_has_native_bf16() is native


def test_gradient_clipping_bounds_the_update_and_logs_the_norm():
    """With lr 1 and SGD the update is the gradient itself: its global norm equals max_norm."""
    updates = {}
    for clip in (None, 0.01):
        torch.manual_seed(1)  # the same initial weights, so the same first gradient
        model = _Regressor()
        before = model.linear.weight.detach().clone(), model.linear.bias.detach().clone()
        trainer = MixedPrecisionTrainer(model, _data(), torch.optim.SGD(model.parameters(), lr=1.0),
                                        device_type="cpu", clip_grad_norm=clip)
        trainer.train(0, 1)
        step = torch.cat([(model.linear.weight - before[0]).flatten(), model.linear.bias - before[1]]).detach()
        updates[clip] = step.norm().item()
        logged = trainer.storage.history("grad_norm").values() if clip else []
        if clip:
            assert len(logged) == 1 and logged[0][0] == pytest.approx(updates[None], rel=1e-5)
    assert updates[None] > 1.0  # the unclipped gradient is far above the threshold
    assert updates[0.01] == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_gradient_clipping_rejects_a_non_positive_norm(bad):
    model = _Regressor()
    with pytest.raises(ValueError, match=r"train.clip_grad_norm must be a positive number or None, got"):
        MixedPrecisionTrainer(model, _data(), torch.optim.SGD(model.parameters(), lr=1.0), clip_grad_norm=bad)
