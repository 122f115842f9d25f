"""Attention kernel choice: two matmuls for short sequences on a CPU under bf16 autocast, the
fused kernel everywhere else, and the same function either way."""
import models  # noqa: F401  (before detectron2)
import pytest
import torch
from timm.models.vision_transformer import Block

from models.backbones.attention import MAX_UNFUSED_TOKENS, wants_fused_attention
from models.backbones.decoder import MAEDecoderCompletion
from models.backbones.encoder import PartialObservationEncoder
from models.backbones.mae import MaskedAutoencoderViT


def test_short_sequences_on_a_cpu_under_bf16_take_two_matmuls():
    short, long = torch.zeros(2, MAX_UNFUSED_TOKENS, 8), torch.zeros(1, MAX_UNFUSED_TOKENS + 1, 8)
    assert wants_fused_attention(short)  # fp32: the fused kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not wants_fused_attention(short)
        assert wants_fused_attention(long)  # its (heads, N, N) matrix would be kept for backward
    with torch.autocast("cpu", dtype=torch.float16):
        assert wants_fused_attention(short)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert wants_fused_attention(short)


def test_both_kernels_compute_the_same_block():
    torch.manual_seed(0)
    block = Block(32, 4, qkv_bias=True).eval()
    tokens = torch.randn(2, 10, 32)
    outputs = []
    for fused in (True, False):
        block.attn.fused_attn = fused
        outputs.append(block(tokens))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast, expected", [(False, True), (True, False)])
def test_encoder_decoder_and_mae_choose_per_forward(autocast, expected):
    torch.manual_seed(0)
    encoder = PartialObservationEncoder(img_size=64, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
    decoder = MAEDecoderCompletion(embed_dim=32, decoder_embed_dim=16, depth=1, num_heads=2)
    mae = MaskedAutoencoderViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    for blocks in (encoder.blocks, decoder.decoder_blocks, mae.blocks, mae.decoder_blocks):
        for block in blocks:
            block.attn.fused_attn = not expected
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = encoder(torch.randn(1, 3, 64, 64), [(64, 64)], 0.5)
        decoder(out.latent, out.stem_maps[2], out.ids_shuffle, out.ids_restore)
        mae(torch.randn(1, 3, 32, 32))
    for blocks in (encoder.blocks, decoder.decoder_blocks, mae.blocks, mae.decoder_blocks):
        assert [block.attn.fused_attn for block in blocks] == [expected] * len(blocks)


def test_a_checkpointed_block_recomputes_with_the_kernel_of_its_own_forward():
    torch.manual_seed(0)
    encoder = PartialObservationEncoder(img_size=64, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0,
                                        use_act_checkpoint=True).train()
    images = torch.randn(1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = encoder(images, [(64, 64)], 0.5).latent  # short, bf16: two matmuls
    assert [block.attn.fused_attn for block in encoder.blocks] == [False, False]
    with torch.no_grad():  # another forward before the first one's backward, in fp32: fused
        encoder(images, [(64, 64)], 1.0)
    assert [block.attn.fused_attn for block in encoder.blocks] == [True, True]
    first.float().sum().backward()  # recomputes the blocks; a kernel other than the forward's would be refused
    grads = [p.grad for p in encoder.blocks.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
