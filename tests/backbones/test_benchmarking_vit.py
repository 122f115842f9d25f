"""Benchmarking-ViT backbone (models/backbones/benchmarking_vit.py): shapes, released names, attention
pattern against a naive reference, gradients and input errors. Tiny widths except one build of ViT-B."""

import models  # noqa: F401  (detectron2 compatibility layer first)
import pytest
import torch
from torch import nn
from detectron2.structures import ImageList

from models.backbones.benchmarking_vit import BenchmarkingViT, relative_position_index
from models.backbones.pos_embed import sincos_table_mocov3

PREFIX = "backbone.bottom_up."
TINY = dict(img_size=128, patch_size=16, embed_dim=64, depth=6, num_heads=4, drop_path_rate=0.0,
            window_size=4, global_every=3)  # 8x8 tokens, 2x2 windows of 4x4 tokens, blocks 2 and 5 global


def tiny(**overrides) -> BenchmarkingViT:
    torch.manual_seed(0)
    model = BenchmarkingViT(**dict(TINY, **overrides))
    with torch.no_grad():  # non-zero tables, so a wrong bias layout shows
        model.windowed_rel_pos_bias.relative_position_bias_table.normal_()
        model.global_rel_pos_bias.relative_position_bias_table.normal_()
    return model.eval()


def test_output_shapes_strides_and_channels():
    model = tiny()
    out = model(ImageList(torch.randn(2, 3, 128, 96), [(128, 96)] * 2))
    strides = {"s0": 4, "s1": 8, "s2": 16, "s3": 32}
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (2, 64, 128 // s, 96 // s) for k, s in strides.items()}
    assert {k: (v.channels, v.stride) for k, v in model.output_shape().items()} == {
        k: (64, s) for k, s in strides.items()}
    assert model.size_divisibility == 32
    assert model.feature_blocks == [1, 2, 4, 5] and model.global_blocks == {2, 5}
    subset = BenchmarkingViT(**dict(TINY, out_features=["s2", "s3"]))
    assert list(subset(torch.randn(1, 3, 64, 64))) == ["s2", "s3"] and list(subset.output_shape()) == ["s2", "s3"]


def test_vit_b_state_dict_matches_released_checkpoint(interop):
    expected = {name[len(PREFIX):]: entry for name, entry in interop("benchmarking_vit_b.tsv").entries.items()
                if name.startswith(PREFIX)}
    model = BenchmarkingViT()  # the original's defaults: ViT-B, 1024x1024
    state = model.state_dict()
    got = {name: (tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in state.items()}
    assert got == expected
    numel = sum(torch.Size(shape).numel() for shape, _ in expected.values())
    assert sum(t.numel() for t in state.values()) == numel
    assert model.global_blocks == {2, 5, 8, 11} and model.feature_blocks == [2, 5, 8, 11]
    assert model.blocks[0].drop_path1.__class__.__name__ == "Identity"
    assert model.blocks[11].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.blocks[0].norm1.eps == 1e-6
    assert not model.windowed_rel_pos_bias.relative_position_bias_table.any()  # zero-initialised


def test_relative_position_index_by_hand():
    # tokens (0,0) (0,1) (1,0) (1,1); index = (dy + 1) * 3 + (dx + 1), (dy, dx) = pos_i - pos_j
    assert relative_position_index(2).tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]


def naive_block(block, tokens, coords, table, size):
    """Block on (N, C) tokens at (N, 2) grid positions, attention spelt out with an explicit bias."""
    attn = block.attn
    heads = attn.num_heads
    q, k, v = attn.qkv(block.norm1(tokens)).reshape(len(tokens), 3, heads, -1).permute(1, 2, 0, 3)
    offset = coords[:, None, :] - coords[None, :, :] + size - 1  # (N, N, 2)
    bias = table[offset[..., 0] * (2 * size - 1) + offset[..., 1]].permute(2, 0, 1)  # (heads, N, N)
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias, dim=-1)
    x = tokens + attn.proj((weights @ v).transpose(0, 1).reshape(len(tokens), -1))
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("grid", [(8, 8), (6, 7)], ids=["exact", "padded"])
def test_attention_matches_naive_reference(grid):
    model, (h, w) = tiny(), grid
    x = torch.randn(2, h, w, 64)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([ys, xs], -1)  # (h, w, 2)
    with torch.no_grad():
        windowed = model._run_block(0, x, model._window_bias(2, h, w))
        table = model.windowed_rel_pos_bias.relative_position_bias_table
        for b in range(2):
            for top in range(0, h, 4):
                for left in range(0, w, 4):
                    region = (slice(top, top + 4), slice(left, left + 4))
                    c = coords[region].reshape(-1, 2)
                    ref = naive_block(model.blocks[0], x[b][region].reshape(-1, 64), c - c[0], table, 4)
                    torch.testing.assert_close(windowed[b][region].reshape(-1, 64), ref, atol=1e-5, rtol=0)
        whole = model._run_block(2, x, model.global_rel_pos_bias(h, w))
        table = model.global_rel_pos_bias.relative_position_bias_table
        for b in range(2):
            ref = naive_block(model.blocks[2], x[b].reshape(-1, 64), coords.reshape(-1, 2), table, 8)
            torch.testing.assert_close(whole[b].reshape(-1, 64), ref, atol=1e-5, rtol=0)


def test_only_global_blocks_mix_windows():
    model = tiny()
    outputs = {}
    for i, block in enumerate(model.blocks[:3]):
        block.register_forward_hook(lambda m, args, out, i=i: outputs.setdefault(i, []).append(out))
    image = torch.randn(1, 3, 128, 128)
    changed = image.clone()
    changed[0, :, 0, 0] += 1.0  # a pixel of window 0 (top-left)
    with torch.no_grad():
        model(image), model(changed)
    for i in (0, 1):  # windowed: (4 windows, 16 tokens, C); window 3 is bottom-right
        before, after = outputs[i]
        assert torch.equal(before[1:], after[1:]) and not torch.equal(before[0], after[0])
    before, after = (o.reshape(8, 8, 64)[4:, 4:] for o in outputs[2])  # global: (1, 64 tokens, C)
    assert (before - after).abs().max() > 1e-4


def test_gradients_reach_every_parameter():
    model = tiny().train()
    out = model(torch.randn(2, 3, 96, 112))  # 6x7 tokens: padded windows, cropped global table
    sum(v.square().mean() for v in out.values()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_activation_checkpointing_gives_same_outputs_and_gradients():
    image = torch.randn(1, 3, 64, 128)
    results = []
    for use in (False, True):
        model = tiny(use_act_checkpoint=use).train()
        loss = sum(v.sum() for v in model(image).values())
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, recomputed in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(plain, recomputed)


def test_bf16_autocast_is_close_to_float32():
    model, image = tiny(), torch.randn(1, 3, 96, 96)  # 6x6 tokens: the padded-window mask too
    with torch.no_grad():
        reference = model(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(image)
    for name, feature in out.items():
        assert torch.isfinite(feature).all(), name
        torch.testing.assert_close(feature.float(), reference[name], atol=0.15, rtol=0.05)


def test_pos_embed_is_a_trainable_mocov3_table():
    model = tiny()
    assert model.pos_embed.requires_grad
    assert torch.equal(model.pos_embed, sincos_table_mocov3(64, 8, 8).unsqueeze(0))


def test_adaptor_kernels_are_lecun_normal_with_zero_biases():
    """As the original: truncated normal kernels of variance 1 / fan_in, zero biases."""
    model = BenchmarkingViT(**dict(TINY, embed_dim=128))
    convs = [m for m in model.ms_adaptor.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 3
    for conv in convs:
        weight = conv.weight.detach()
        fan_in = weight.shape[1] * weight[0, 0].numel()  # torch's fan-in of a (in, out, k, k) kernel: out * k * k
        assert fan_in == 512
        assert weight.std().item() == pytest.approx(512 ** -0.5, rel=0.04)
        assert weight.abs().max().item() <= 2 * 512 ** -0.5 / 0.87962566103423978 + 1e-6  # cut at 2 sigma
        assert not conv.bias.any()
    norm = model.ms_adaptor[0][1]
    assert torch.equal(norm.weight, torch.ones(128)) and not norm.bias.any()


def test_bad_inputs_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 1, 64, 64\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="144x128 exceeds the maximum 128x128"):
        model(torch.randn(1, 3, 144, 128))
    with pytest.raises(ValueError, match="100x64 must be a multiple of patch_size 16"):
        model(torch.randn(1, 3, 100, 64))
    with pytest.raises(ValueError, match="exceeds the 8x8"):
        model.global_rel_pos_bias(9, 8)
    with pytest.raises(ValueError, match="out_features"):
        BenchmarkingViT(**dict(TINY, out_features=["p2"]))
