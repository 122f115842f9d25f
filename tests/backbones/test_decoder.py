"""MAE decoder completion: what fills the dropped positions, unshuffling, output layout."""
import models  # noqa: F401  (before detectron2)
import pytest
import torch

from models.backbones.decoder import MAEDecoderCompletion
from models.backbones.encoder import sample_tokens
from models.backbones.pos_embed import resize_pos_table

TINY = dict(embed_dim=64, decoder_embed_dim=32, depth=2, num_heads=4, table_grid=(8, 8))
GRID = (4, 6)
L = GRID[0] * GRID[1]


def _decoder_inputs(num_kept: int, seed: int = 0):
    torch.manual_seed(seed)
    stem_map = torch.randn(2, 64, *GRID)
    ids_shuffle, ids_restore = sample_tokens(torch.ones(2, L, dtype=torch.bool), num_kept)
    latent = torch.randn(2, num_kept, 64)
    return latent, stem_map, ids_shuffle, ids_restore


def _first_block_input(decoder, *inputs):
    seen = []
    handle = decoder.decoder_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        output = decoder(*inputs)
    handle.remove()
    return seen[0], output


@pytest.mark.parametrize("fill_mode", ["mask_token", "conv_feature"])
def test_kept_tokens_return_to_their_positions_and_dropped_ones_are_filled(fill_mode):
    decoder = MAEDecoderCompletion(**TINY, fill_mode=fill_mode).eval()
    latent, stem_map, ids_shuffle, ids_restore = _decoder_inputs(num_kept=10)
    block_input, output = _first_block_input(decoder, latent, stem_map, ids_shuffle, ids_restore)
    with torch.no_grad():
        pos = resize_pos_table(decoder.decoder_pos_embed, (8, 8), GRID, 1)[0, 1:]  # (L, C)
        stem_tokens = stem_map.flatten(2).transpose(1, 2)  # (B, L, D)
        for b in range(2):
            kept, dropped = ids_shuffle[b, :10], ids_shuffle[b, 10:]
            torch.testing.assert_close(block_input[b, kept], decoder.decoder_embed(latent[b]) + pos[kept])
            if fill_mode == "mask_token":
                fill = decoder.mask_token[0].expand(len(dropped), -1)
            else:
                fill = decoder.conv_feat_proj(stem_tokens[b, dropped])
            torch.testing.assert_close(block_input[b, dropped], fill + pos[dropped])
    assert output.shape == (2, 32, *GRID)


def test_fill_modes_own_exactly_their_parameters():
    names = {mode: set(MAEDecoderCompletion(**TINY, fill_mode=mode).state_dict()) for mode in
             ("mask_token", "conv_feature")}
    assert names["mask_token"] - names["conv_feature"] == {"mask_token"}
    assert names["conv_feature"] - names["mask_token"] == {"conv_feat_proj.weight", "conv_feat_proj.bias"}
    decoder = MAEDecoderCompletion(**TINY)
    assert decoder.decoder_pos_embed.shape == (1, 65, 32) and not decoder.decoder_pos_embed.requires_grad
    assert 0 < decoder.mask_token.std() < 0.05  # MAE's normal(std=0.02)


def test_no_ids_means_tokens_are_already_in_image_order():
    decoder = MAEDecoderCompletion(**TINY).eval()
    latent, stem_map, _, _ = _decoder_inputs(num_kept=L)
    block_input, _ = _first_block_input(decoder, latent, stem_map, None, None)
    pos = resize_pos_table(decoder.decoder_pos_embed, (8, 8), GRID, 1)[:, 1:]
    with torch.no_grad():
        torch.testing.assert_close(block_input, decoder.decoder_embed(latent) + pos)


def test_output_map_is_the_normed_tokens_in_row_major_order():
    decoder = MAEDecoderCompletion(**TINY).eval()
    normed = []
    decoder.decoder_norm.register_forward_hook(lambda module, args, out: normed.append(out))
    latent, stem_map, ids_shuffle, ids_restore = _decoder_inputs(num_kept=5)
    with torch.no_grad():
        output = decoder(latent, stem_map, ids_shuffle, ids_restore)
    row, col = 2, 5
    torch.testing.assert_close(output[:, :, row, col], normed[0][:, row * GRID[1] + col])


def test_unknown_fill_mode_is_refused():
    with pytest.raises(ValueError, match=r"fill_mode must be one of \('mask_token', 'conv_feature'\), got 'zeros'"):
        MAEDecoderCompletion(**TINY, fill_mode="zeros")
