"""Which attention kernel timm's ViT blocks use, chosen per forward pass.

timm's ``Attention`` calls ``F.scaled_dot_product_attention`` when its ``fused_attn`` is set,
and otherwise computes softmax(q k^T / sqrt(d)) v with two matmuls. On a CPU under bf16
autocast the fused kernel is the slower of the two for short sequences. Forward+backward of
one timm ``Block`` (bf16 autocast, 2-core AVX512-BF16 CPU, median of 30 runs, of 5 and 3 for ViT-B):

    width 192, 3 heads, 4 x 126 tokens (the demo's encoder):   fused 7.9 ms, two matmuls 4.3 ms
    width 768, 12 heads, 1 x 950 tokens (ViT-B at ratio 0.25): fused 113 ms, two matmuls 89 ms
    width 768, 12 heads, 1 x 1900 tokens (ViT-B at ratio 0.5): fused 286 ms, two matmuls 274 ms

Beyond ~1000 tokens the two are level, and the two-matmul form keeps the (heads, N, N)
attention matrix for the backward pass (75 MB a block for ViT-B at 1024 tokens), so it is
used only up to ``MAX_UNFUSED_TOKENS``. In fp32 and on CUDA the fused kernel is as fast or
faster and needs no such matrix, so it stays on there. Both compute the same function.
"""
import torch
import torch.nn as nn

__all__ = ["MAX_UNFUSED_TOKENS", "wants_fused_attention", "run_block"]

MAX_UNFUSED_TOKENS = 1024


def wants_fused_attention(tokens: torch.Tensor) -> bool:
    """Whether timm blocks should take the fused kernel for ``tokens`` (B, N, D)."""
    short_cpu_bf16 = (
        tokens.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and tokens.shape[1] <= MAX_UNFUSED_TOKENS
    )
    return not short_cpu_bf16


def run_block(block: nn.Module, tokens: torch.Tensor, fused: bool) -> torch.Tensor:
    """Run the timm ``block`` on ``tokens`` with the fused kernel or without.

    The choice is set on the block right before it runs, inside the function that activation
    checkpointing recomputes in the backward pass: the recomputation uses the kernel of its own
    forward even if another forward in between (an evaluation, a longer sequence) chose the
    other one.
    """
    block.attn.fused_attn = fused
    return block(tokens)
