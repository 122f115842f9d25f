"""Checkpoint reading (weights only), atomic writing, MAE -> backbone mapping, detector checkpoints."""
import argparse
import errno
import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Dict

import models  # noqa: F401  (before detectron2)
import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from models import checkpoint as checkpoint_module
from models.backbones.benchmarking_vit import BenchmarkingViT
from models.checkpoint import (
    SafeDetectionCheckpointer,
    load_checkpoint_file,
    fixed_pos_tables,
    load_mae_into_backbone,
    load_mae_weights,
    save_checkpoint_atomic,
)
from models.backbones.mimdet import MIMDetBackbone
from models.backbones.pos_embed import resize_pos_table

TINY = dict(embed_dim=64, depth=2, decoder_dim=32, decoder_depth=8)


def mae_shapes(embed_dim=768, depth=12, decoder_dim=512, decoder_depth=8, grid=14, patch=16) -> Dict:
    """Names and shapes of MAE's full pre-training model (models_mae.py) state dict."""
    shapes = {"cls_token": (1, 1, embed_dim), "pos_embed": (1, 1 + grid * grid, embed_dim),
              "mask_token": (1, 1, decoder_dim), "decoder_pos_embed": (1, 1 + grid * grid, decoder_dim),
              "patch_embed.proj.weight": (embed_dim, 3, patch, patch), "patch_embed.proj.bias": (embed_dim,),
              "norm.weight": (embed_dim,), "norm.bias": (embed_dim,),
              "decoder_embed.weight": (decoder_dim, embed_dim), "decoder_embed.bias": (decoder_dim,),
              "decoder_norm.weight": (decoder_dim,), "decoder_norm.bias": (decoder_dim,),
              "decoder_pred.weight": (patch * patch * 3, decoder_dim), "decoder_pred.bias": (patch * patch * 3,)}
    for prefix, count, dim in (("blocks", depth, embed_dim), ("decoder_blocks", decoder_depth, decoder_dim)):
        layers = {"norm1": (dim, None), "attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim),
                  "norm2": (dim, None), "mlp.fc1": (4 * dim, dim), "mlp.fc2": (dim, 4 * dim)}
        for i in range(count):
            for layer, (out, inp) in layers.items():
                shapes[f"{prefix}.{i}.{layer}.weight"] = (out,) if inp is None else (out, inp)
                shapes[f"{prefix}.{i}.{layer}.bias"] = (out,)
    return shapes


def mae_state_dict(**dims) -> Dict[str, torch.Tensor]:
    """Random tensors in an MAE full pre-training state dict of the given dims."""
    return {name: torch.randn(shape) for name, shape in mae_shapes(**dims).items()}


def mae_file(tmp_path, **dims) -> Path:
    path = tmp_path / "mae_full.pth"
    torch.save({"model": mae_state_dict(**dims), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "epoch": 1599, "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_base_patch16")},
               path)
    return path


def _table(tokens: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(1, tokens, dim), requires_grad=False)


class StandInMIMDet(nn.Module):
    """MIMDetBackbone's state-dict names: encoder {pos_embed, patch_embed (conv stem), blocks, norm},
    decoder {decoder_embed, mask_token | conv_feat_proj, decoder_pos_embed, decoder_blocks, decoder_norm};
    and its MAE mapping and fixed tables, borrowed."""

    mae_source = MIMDetBackbone.mae_source
    mae_pos_tables, fixed_pos_tables = MIMDetBackbone.mae_pos_tables, MIMDetBackbone.fixed_pos_tables

    def __init__(self, embed_dim=64, depth=2, decoder_dim=32, img_size=64, fill_mode="mask_token"):
        super().__init__()
        self.img_size, grid = img_size, img_size // 16
        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.pos_embed = _table(1 + grid * grid, embed_dim)
        self.encoder.patch_embed = nn.Module()
        stem = [nn.Conv2d(3, embed_dim, 3, bias=False), nn.GroupNorm(1, embed_dim)]
        self.encoder.patch_embed.proj = nn.Sequential(*stem)
        self.encoder.blocks = nn.ModuleList(Block(embed_dim, 4, qkv_bias=True) for _ in range(depth))
        self.encoder.norm = nn.LayerNorm(embed_dim)
        self.decoder.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        if fill_mode == "mask_token":
            self.decoder.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        else:
            self.decoder.conv_feat_proj = nn.Linear(embed_dim, decoder_dim)
        self.decoder.decoder_pos_embed = _table(1 + grid * grid, decoder_dim)
        self.decoder.decoder_blocks = nn.ModuleList(Block(decoder_dim, 4, qkv_bias=True) for _ in range(4))
        self.decoder.decoder_norm = nn.LayerNorm(decoder_dim)


class StandInBenchmarkingViT(nn.Module):
    """BenchmarkingViT's names: patch_embed.proj, pos_embed (no cls slot), blocks, rel-pos table, adaptor;
    and its MAE mapping and fixed tables, borrowed."""

    mae_source = staticmethod(BenchmarkingViT.mae_source)
    mae_pos_tables, fixed_pos_tables = BenchmarkingViT.mae_pos_tables, BenchmarkingViT.fixed_pos_tables

    def __init__(self, embed_dim=64, depth=2, img_size=64):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, 16, 16)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // 16) ** 2, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, 4, qkv_bias=True) for _ in range(depth))
        self.windowed_rel_pos_bias = nn.Module()
        self.windowed_rel_pos_bias.relative_position_bias_table = nn.Parameter(torch.zeros(961, 4))
        self.ms_adaptor = nn.ModuleList([nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)])


class StandInDetector(nn.Module):
    def __init__(self, bottom_up: nn.Module):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.bottom_up = bottom_up
        self.head = nn.Linear(8, 2)


class Evil:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("size", ["b", "l"])
def test_mae_generator_matches_released_checkpoint(size, interop):
    expected = interop(f"mae_pretrain_vit_{size}_full.tsv").shapes()
    dims = dict(embed_dim=768, depth=12) if size == "b" else dict(embed_dim=1024, depth=24)
    generated = {name: tuple(shape) for name, shape in mae_shapes(**dims).items()}
    assert generated == expected


def test_reads_mae_checkpoint_with_namespace(tmp_path):
    data = load_checkpoint_file(mae_file(tmp_path, **TINY))
    assert data["args"].model == "mae_vit_base_patch16" and data["epoch"] == 1599
    assert data["model"]["pos_embed"].shape == (1, 197, 64)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint_file(tmp_path / "nope.pth")


@pytest.mark.parametrize("content", ["random", "text", "json", "empty", "zip"])
def test_non_checkpoints_are_refused(tmp_path, content):
    path = tmp_path / f"{content}.pth"
    if content == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("hello.txt", "hi")
    else:
        path.write_bytes({"random": os.urandom(4096), "text": b"hello world\n", "json": b'{"iteration": 1}\n',
                          "empty": b""}[content])
    with pytest.raises(ValueError, match=rf"{content}\.pth.*not a PyTorch checkpoint") as error:
        load_checkpoint_file(path)
    if content in ("text", "json", "empty"):  # not torch's advice to load with weights_only=False
        assert str(error.value).endswith("neither a zip archive (torch.save) nor a pickle (legacy torch.save)")


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("keep", [1, 10, 253, 2000, 3000, 3776, -10])
def test_truncated_checkpoints_are_named_as_such(tmp_path, legacy, keep):
    """A copy cut short (a full disk, an interrupted download) is called truncated, with its size,
    whichever of torch's two formats it has and wherever it was cut."""
    if keep == 1 and not legacy:
        pytest.skip("a zip's first byte alone does not say it is one")
    path = tmp_path / "cut.pth"
    # Forty tensors: cuts inside the legacy format's object pickle fall in many kinds of opcode.
    torch.save({"model": {f"w{i}": torch.randn(8, 8) for i in range(40)}}, path,
               _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    size = len(data[:keep])
    with pytest.raises(ValueError, match=rf"cut\.pth is truncated or damaged: .*\({size:,} bytes\)") as error:
        load_checkpoint_file(path)
    assert "weights_only" not in str(error.value)


def test_refusal_leaves_out_torchs_advice_to_load_unsafely(tmp_path):
    """A legacy pickle cut inside a global's name: the reason, not torch's paragraph that suggests
    weights_only=False."""
    path = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:300])
    refused = r"cut\.pth (is not a PyTorch checkpoint that can be read safely \(|is truncated)"
    with pytest.raises(ValueError, match=refused) as error:
        load_checkpoint_file(path)
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "pickle_p2", "pickle_p5"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, writer):
    marker, path = tmp_path / "PWNED", tmp_path / "evil.pth"
    payload = {"model": {"w": torch.ones(2)}, "args": Evil(marker)}
    if writer.startswith("torch"):
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch_zip")
    else:
        path.write_bytes(pickle.dumps({"args": Evil(marker)}, protocol=int(writer[-1])))
    with pytest.raises(ValueError, match=r"evil\.pth.*contains code.*posix\.system"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint_atomic({"v": torch.tensor([1.0])}, path)
    assert load_checkpoint_file(path)["v"].item() == 1.0

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint_atomic({"v": torch.tensor([2.0])}, path)
    monkeypatch.undo()
    assert load_checkpoint_file(path)["v"].item() == 1.0
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]


def test_a_full_disk_is_named_and_the_old_checkpoint_kept(tmp_path, monkeypatch):
    """torch.save's zip writer reports a short write as "unexpected pos ..."; with the disk full
    at that moment, the error says so, and the previous file survives whole."""
    path = tmp_path / "model_final.pth"
    save_checkpoint_atomic({"v": torch.tensor([1.0])}, path)

    def save_until_full(obj, f):
        f.write(b"\0" * 3 * 2**20)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3145856 vs 3145728")

    monkeypatch.setattr(torch, "save", save_until_full)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda d: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(OSError, match=r"no space left on the disk holding .* after 3 MiB of model_final\.pth were "
                                      r"written \(its previous contents are kept\); free some space") as raised:
        save_checkpoint_atomic({"v": torch.tensor([2.0])}, path)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    with pytest.raises(OSError, match=r"after 3 MiB of new\.pth were written \(no file was written\)"):
        save_checkpoint_atomic({"v": torch.tensor([2.0])}, tmp_path / "new.pth")
    monkeypatch.undo()
    assert load_checkpoint_file(path)["v"].item() == 1.0
    assert sorted(os.listdir(tmp_path)) == ["model_final.pth"]


@pytest.mark.parametrize("fill_mode", ["mask_token", "conv_feature"])
def test_mae_into_mimdet(tmp_path, caplog, fill_mode):
    path, backbone = mae_file(tmp_path, **TINY), StandInMIMDet(img_size=128, fill_mode=fill_mode)
    with caplog.at_level(logging.INFO, logger="models.checkpoint"):
        report = load_mae_into_backbone(backbone, path)
    mae, sd = load_checkpoint_file(path)["model"], backbone.state_dict()
    for i in range(2):
        assert torch.equal(sd[f"encoder.blocks.{i}.attn.qkv.weight"], mae[f"blocks.{i}.attn.qkv.weight"])
    for i in range(4):
        assert torch.equal(sd[f"decoder.decoder_blocks.{i}.mlp.fc2.bias"], mae[f"decoder_blocks.{i}.mlp.fc2.bias"])
    for name in ("norm.weight", "decoder_embed.weight", "decoder_norm.bias"):
        scope = "encoder" if name.startswith("norm") else "decoder"
        assert torch.equal(sd[f"{scope}.{name}"], mae[name])
    assert torch.equal(sd["encoder.pos_embed"], resize_pos_table(mae["pos_embed"], (14, 14), (8, 8), 1))
    assert torch.equal(sd["decoder.decoder_pos_embed"],
                       resize_pos_table(mae["decoder_pos_embed"], (14, 14), (8, 8), 1))
    assert sd["encoder.pos_embed"].shape == (1, 65, 64)
    assert all(name.startswith("encoder.patch_embed") or "conv_feat_proj" in name for name in report.missing)
    unused = {"cls_token", "patch_embed.proj.weight", "decoder_blocks.4.norm1.weight", "decoder_pred.bias"}
    assert unused <= set(report.unused) and ("mask_token" in report.unused) == (fill_mode == "conv_feature")
    if fill_mode == "mask_token":
        assert torch.equal(sd["decoder.mask_token"], mae["mask_token"])
    else:
        assert "decoder.conv_feat_proj.weight" in report.missing
    for text in ("decoder_blocks.4-7.*", "cls_token", "patch_embed.proj.*", "decoder_pred.*", "encoder.patch_embed"):
        assert text in caplog.text


def test_mae_from_memory_and_bare_state_dict():
    state = mae_state_dict(**TINY)
    for source in ({"model": state, "epoch": 3}, state):
        backbone = StandInMIMDet(img_size=224)  # 14x14: the table is taken as is
        load_mae_into_backbone(backbone, source)
        assert torch.equal(backbone.encoder.pos_embed, state["pos_embed"])


@pytest.mark.parametrize("case, message", [
    ("vit_l", r"blocks\.0\.attn\.qkv\.weight: checkpoint \(288, 96\) vs backbone \(192, 64\)"),
    ("shallow", r"lacks .*blocks\.1\.\*"),
    ("not_mae", r"not an MAE checkpoint.*lacks .*blocks\.0-1\.\*.*holds foo"),
    ("detector", r"train\.init_checkpoint"),
    ("encoder_only", r"lacks .*mask_token.*decoder_blocks\.0-3\.\*.*full pre-training checkpoint"),
])
def test_mae_mismatches_are_named(case, message):
    state = {"vit_l": lambda: mae_state_dict(embed_dim=96, depth=2, decoder_dim=32),
             "shallow": lambda: mae_state_dict(**dict(TINY, depth=1)),
             "not_mae": lambda: {"foo.weight": torch.ones(1)},
             "encoder_only": lambda: {k: v for k, v in mae_state_dict(**TINY).items()
                                      if not k.startswith("decoder") and k != "mask_token"},
             "detector": lambda: {f"backbone.bottom_up.encoder.{k}": v
                                  for k, v in mae_state_dict(**TINY).items()}}[case]()
    with pytest.raises(ValueError, match=message):
        load_mae_into_backbone(StandInMIMDet(), state)


def test_an_mae_file_that_does_not_fit_is_named(tmp_path):
    path = tmp_path / "not_mae.pth"
    torch.save({"model": {"foo.weight": torch.ones(1)}}, path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not an MAE checkpoint for this StandInMIMDet"):
        load_mae_weights(StandInMIMDet(), str(path))


def test_mae_into_benchmarking_vit(caplog):
    state, backbone = mae_state_dict(**TINY), StandInBenchmarkingViT()
    pos_before = backbone.pos_embed.detach().clone()
    with caplog.at_level(logging.INFO, logger="models.checkpoint"):
        report = load_mae_into_backbone(backbone, state)
    sd = backbone.state_dict()
    assert torch.equal(sd["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    assert torch.equal(sd["blocks.1.mlp.fc1.weight"], state["blocks.1.mlp.fc1.weight"])
    assert torch.equal(sd["pos_embed"], pos_before)
    assert {"pos_embed", "windowed_rel_pos_bias.relative_position_bias_table"} <= set(report.missing)
    assert {"pos_embed", "norm.weight", "cls_token", "decoder_blocks.0.norm1.bias"} <= set(report.unused)
    assert "decoder_blocks.0-7.*" in caplog.text


def test_load_mae_weights_dispatches(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="models.checkpoint"):
        assert load_mae_weights(StandInDetector(StandInMIMDet()), None) is None
    assert "no MAE checkpoint: backbone starts from random weights" in caplog.text
    path = mae_file(tmp_path, **TINY)
    mimdet, vit = StandInDetector(StandInMIMDet()), StandInDetector(StandInBenchmarkingViT())
    assert "encoder.norm.weight" in load_mae_weights(mimdet, str(path)).loaded
    assert "patch_embed.proj.weight" in load_mae_weights(vit, path).loaded
    assert "blocks.0.norm1.weight" in load_mae_weights(StandInBenchmarkingViT(), path).loaded
    with pytest.raises(TypeError, match=r"Linear declares no MAE mapping \(a mae_source\(name\) method\)"):
        load_mae_weights(nn.Linear(2, 2), path)
    assert fixed_pos_tables(mimdet) == {"backbone.bottom_up.encoder.pos_embed": 1,
                                        "backbone.bottom_up.decoder.decoder_pos_embed": 1}
    assert fixed_pos_tables(vit) == {"backbone.bottom_up.pos_embed": 0}


def _detector_file(tmp_path, model: nn.Module) -> Path:
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 5}, path)
    return path


def test_detector_checkpoint_loads_exactly(tmp_path):
    source = StandInDetector(StandInMIMDet(fill_mode="conv_feature"))
    for p in source.parameters():
        nn.init.normal_(p)
    path, target = _detector_file(tmp_path, source), StandInDetector(StandInMIMDet(fill_mode="conv_feature"))
    checkpointer = SafeDetectionCheckpointer(target)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(path)))
    assert not (incompatible.missing_keys or incompatible.unexpected_keys or incompatible.incorrect_shapes)
    assert SafeDetectionCheckpointer(target).load(str(path)) == {"iteration": 5}
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


@pytest.mark.parametrize("bottom_up", ["mimdet", "benchmarking"])
def test_detector_pos_tables_are_resized(tmp_path, bottom_up):
    def build(img_size):
        cls = StandInMIMDet if bottom_up == "mimdet" else StandInBenchmarkingViT
        return StandInDetector(cls(img_size=img_size))

    source = build(64)
    for p in source.parameters():
        nn.init.normal_(p)
    target = build(128)
    SafeDetectionCheckpointer(target).load(str(_detector_file(tmp_path, source)))
    tables = ({"encoder.pos_embed": 1, "decoder.decoder_pos_embed": 1} if bottom_up == "mimdet" else {"pos_embed": 0})
    for name, prefix in tables.items():
        key = f"backbone.bottom_up.{name}"
        assert target.state_dict()[key].shape[1] == prefix + 64
        expected = resize_pos_table(source.state_dict()[key], (4, 4), (8, 8), prefix)
        assert torch.equal(target.state_dict()[key], expected)


def test_detector_checkpointer_refuses_code_and_pkl(tmp_path):
    marker, model = tmp_path / "PWNED", StandInDetector(StandInMIMDet())
    torch.save({"model": model.state_dict(), "evil": Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="contains code"):
        SafeDetectionCheckpointer(model).load(str(tmp_path / "evil.pth"))
    (tmp_path / "zoo.pkl").write_bytes(pickle.dumps({"model": {}, "__author__": "x"}))
    with pytest.raises(ValueError, match=r"zoo\.pkl.*only PyTorch checkpoints"):
        SafeDetectionCheckpointer(model).load(str(tmp_path / "zoo.pkl"))
    assert not marker.exists()


def test_detector_checkpointer_saves_atomically_and_resumes(tmp_path, monkeypatch):
    model = StandInDetector(StandInMIMDet())
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    model.head(torch.ones(1, 8)).sum().backward()
    optimizer.step()
    checkpointer = SafeDetectionCheckpointer(model, str(tmp_path / "out"), optimizer=optimizer)
    checkpointer.save("model_0000004", iteration=4)
    assert (tmp_path / "out" / "last_checkpoint").read_text() == "model_0000004.pth"

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("model_0000009", iteration=9)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "out")) == ["last_checkpoint", "model_0000004.pth"]

    fresh_optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    resumed = SafeDetectionCheckpointer(model, str(tmp_path / "out"), optimizer=fresh_optimizer)
    assert resumed.resume_or_load("", resume=True) == {"iteration": 4}
    saved, restored = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys() == {0, 1}
    assert all(torch.equal(saved[k]["exp_avg"], restored[k]["exp_avg"]) for k in saved)


def test_pickled_module_is_refused(tmp_path):
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "whole_model.pth")
    with pytest.raises(ValueError, match=r"whole_model\.pth.*contains code.*torch\.nn\.modules\.linear\.Linear"):
        load_checkpoint_file(tmp_path / "whole_model.pth")


def test_real_mimdet_backbone_takes_mae_weights():
    """The project's MIMDet backbone at toy widths."""
    state = mae_state_dict(**TINY)
    for fill_mode in ("mask_token", "conv_feature"):
        backbone = MIMDetBackbone(
            img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, drop_path_rate=0.0,
            norm_eps=1e-5, decoder_embed_dim=32, decoder_depth=4, decoder_num_heads=4, sample_ratio=0.5,
            fill_mode=fill_mode, use_act_checkpoint=False,
            out_features=["c2", "c3", "c4", "c5"])
        report = load_mae_weights(backbone, state)
        assert all(n.startswith(("encoder.patch_embed.", "decoder.conv_feat_proj.")) for n in report.missing)
        assert ("decoder.mask_token" in report.loaded) == (fill_mode == "mask_token")
        assert torch.equal(backbone.encoder.pos_embed, resize_pos_table(state["pos_embed"], (14, 14), (8, 8), 1))
        assert torch.equal(backbone.decoder.decoder_blocks[3].mlp.fc2.weight, state["decoder_blocks.3.mlp.fc2.weight"])


def test_real_benchmarking_vit_takes_mae_weights():
    """The project's Benchmarking ViT at toy widths."""
    vit = BenchmarkingViT(
        img_size=128, patch_size=16, embed_dim=64, depth=8, num_heads=4, mlp_ratio=4.0, drop_path_rate=0.0,
        norm_eps=1e-6, window_size=4, global_every=2, use_act_checkpoint=False, out_features=["s0", "s1", "s2", "s3"])
    state = mae_state_dict(**dict(TINY, depth=8))
    pos_before = vit.pos_embed.detach().clone()
    report = load_mae_weights(vit, state)
    assert {"patch_embed.proj.weight", "blocks.7.mlp.fc2.weight"} <= set(report.loaded)
    assert torch.equal(vit.blocks[7].mlp.fc2.weight, state["blocks.7.mlp.fc2.weight"])
    assert "pos_embed" in report.missing and torch.equal(vit.pos_embed, pos_before)
