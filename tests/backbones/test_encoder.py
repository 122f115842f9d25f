"""Partial-observation encoder: valid-token mask, sampling order, kept-token count, ratio 1.0."""
import models  # noqa: F401  (before detectron2)
import pytest
import torch
from torch import nn

from models.backbones.encoder import PartialObservationEncoder, sample_tokens, valid_token_mask
from models.backbones.pos_embed import resize_pos_table, sincos_table_mae

TINY = dict(img_size=128, embed_dim=64, depth=2, num_heads=4, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return PartialObservationEncoder(**TINY).eval()


def test_valid_mask_covers_ceil_of_true_size():
    valid = valid_token_mask([(20, 40), (64, 64)], grid=(4, 4), patch_size=16).view(2, 4, 4)
    expected_small = torch.zeros(4, 4, dtype=torch.bool)
    expected_small[:2, :3] = True  # ceil(20/16) = 2 rows, ceil(40/16) = 3 columns
    assert torch.equal(valid[0], expected_small)
    assert valid[1].all()


def test_forward_builds_no_tensor_from_host_data(encoder, monkeypatch):
    # such a tensor is copied to the GPU on every forward, and the copy waits for the queued work
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was built from host data on the hot path")

    images = torch.randn(2, 3, 64, 96)
    encoder(images, [(64, 96), (30, 40)], 0.5)  # fill the position-table cache first
    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, refuse)
    with torch.no_grad():
        out = encoder(images, [(64, 96), (30, 40)], 0.5)
    assert out.latent.shape == (2, 12, 64)


def test_sampling_draws_real_tokens_first_and_restores_order():
    torch.manual_seed(1)
    valid = valid_token_mask([(20, 40), (64, 64)], grid=(4, 4), patch_size=16)  # 6 and 16 real tokens
    ids_shuffle, ids_restore = sample_tokens(valid, len_keep=8)
    arange = torch.arange(16).expand(2, -1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), arange)
    drawn_valid = torch.gather(valid, 1, ids_shuffle)  # (B, L) in draw order
    assert drawn_valid[0, :6].all() and not drawn_valid[0, 6:].any()
    assert drawn_valid[1].all()


def _count_block_inputs(encoder, images, image_sizes, ratio):
    seen = []
    handle = encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    with torch.no_grad():
        out = encoder(images, image_sizes, ratio)
    handle.remove()
    return seen[0], out


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.5, 0.9])
def test_exactly_int_L_times_ratio_tokens_enter_the_vit(encoder, ratio):
    images = torch.randn(2, 3, 96, 160)  # 6 x 10 = 60 tokens
    shape, out = _count_block_inputs(encoder, images, [(96, 160), (96, 160)], ratio)
    assert shape == (2, int(60 * ratio), 64)
    assert out.latent.shape == (2, int(60 * ratio), 64) and out.grid == (6, 10)
    assert out.ids_keep.shape == (2, int(60 * ratio))


def test_padding_is_never_sampled_while_real_tokens_remain(encoder):
    images = torch.randn(2, 3, 128, 128)  # 8 x 8 = 64 tokens
    sizes = [(40, 50), (128, 128)]  # image 0 has 3 x 4 = 12 real tokens
    valid = valid_token_mask(sizes, (8, 8), 16)
    for _ in range(3):
        _, small = _count_block_inputs(encoder, images, sizes, 0.125)  # 8 kept < 12 real
        assert valid[0][small.ids_keep[0]].all()
        _, large = _count_block_inputs(encoder, images, sizes, 0.5)  # 32 kept > 12 real
        kept = set(large.ids_keep[0].tolist())
        assert set(valid[0].nonzero().flatten().tolist()) <= kept


def test_ratio_one_skips_the_shuffle_and_equals_a_permuted_pass(encoder):
    images = torch.randn(2, 3, 64, 96)
    shape, out = _count_block_inputs(encoder, images, [(64, 96), (30, 40)], 1.0)
    assert shape == (2, 24, 64) and out.ids_shuffle is None and out.ids_restore is None
    with torch.no_grad():
        _, tokens = encoder.embed(images)
        permutation = torch.randperm(24)
        shuffled = encoder.run_blocks(tokens[:, permutation])
        restored = shuffled[:, torch.argsort(permutation)]
        manual = tokens
        for block in encoder.blocks:
            manual = block(manual)
        manual = encoder.norm(manual)
    torch.testing.assert_close(out.latent, restored, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.latent, manual, atol=1e-5, rtol=0)


def test_tokens_get_the_resized_fixed_table(encoder):
    assert encoder.pos_embed.shape == (1, 65, 64) and not encoder.pos_embed.requires_grad
    torch.testing.assert_close(encoder.pos_embed[0], sincos_table_mae(64, 8, 8))
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        (_, _, stem_c4), tokens = encoder.embed(images)
    table = resize_pos_table(encoder.pos_embed, (8, 8), (4, 6), num_prefix=1)[:, 1:]
    torch.testing.assert_close(tokens, stem_c4.flatten(2).transpose(1, 2) + table)


def test_blocks_follow_mae_init_and_linear_drop_path():
    enc = PartialObservationEncoder(**dict(TINY, depth=3, drop_path_rate=0.2, norm_eps=1e-5))
    assert [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in enc.blocks] == pytest.approx([0.0, 0.1, 0.2])
    linears = [m for m in enc.blocks.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in enc.modules() if isinstance(m, nn.LayerNorm)]
    assert all(m.bias is not None and not m.bias.any() for m in linears)
    assert all(m.weight.eq(1).all() and m.eps == 1e-5 for m in norms) and len(norms) == 3 * 2 + 1
    bound = (6 / (64 + 192)) ** 0.5  # xavier_uniform bound of qkv (64 -> 192)
    assert enc.blocks[0].attn.qkv.weight.abs().max() <= bound


def test_patch_size_other_than_16_is_refused():
    with pytest.raises(ValueError, match=r"patch_size must be 16.*got 8"):
        PartialObservationEncoder(**dict(TINY, patch_size=8))
