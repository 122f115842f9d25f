"""MIMDet's convolutional stem: replaces ViT's 16x16 patchify layer and gives the detector
its high-resolution (stride 4 and 8) features.

Four stride-2 stages, each Conv3x3 (no bias) -> GroupNorm(1 group) -> GELU; channels
3 -> D/8 -> D/4 -> D/2 -> D; the last stage ends with a 1x1 conv D -> D (with bias) that
projects to the ViT's token width. It is randomly initialised (MAE has no such stem).
"""
from typing import Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

__all__ = ["ConvStem"]



def _stage(in_channels: int, out_channels: int, norm_eps: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
        nn.GroupNorm(1, out_channels, eps=norm_eps),
        nn.GELU(),
    )


class ConvStem(nn.Module):
    """Four-stage stride-16 conv stem; returns its stride 4, 8 and 16 feature maps.

    The stages are ``proj.0`` .. ``proj.3`` so that, inside the encoder as ``patch_embed``,
    parameter names match the released checkpoints (``encoder.patch_embed.proj.3.3.weight``
    is the final 1x1 conv).

    Args:
        embed_dim: D, the ViT width; must be divisible by 8 (the first stage has D/8 channels).
        in_channels: image channels (3, RGB).
        norm_eps: GroupNorm epsilon.
        use_act_checkpoint: recompute each stage in the backward pass (activation
            checkpointing) instead of storing its activations; training with grad only.
    """

    def __init__(self, embed_dim: int = 768, in_channels: int = 3, norm_eps: float = 1e-6,
                 use_act_checkpoint: bool = False) -> None:
        super().__init__()
        if embed_dim % 8 != 0:
            raise ValueError(f"ConvStem needs embed_dim divisible by 8 (widths D/8, D/4, D/2, D), got {embed_dim}")
        self.embed_dim = embed_dim
        self.in_channels = in_channels
        self.use_act_checkpoint = use_act_checkpoint
        widths = [in_channels, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        self.proj = nn.ModuleList(_stage(widths[i], widths[i + 1], norm_eps) for i in range(4))
        self.proj[3].append(nn.Conv2d(embed_dim, embed_dim, kernel_size=1))

    @property
    def out_channels(self) -> Tuple[int, int, int]:
        """Channels of the stride 4, 8 and 16 outputs."""
        return self.embed_dim // 4, self.embed_dim // 2, self.embed_dim

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images -> maps at stride 4 (D/4 ch), 8 (D/2 ch) and 16 (D ch)."""
        use_checkpoint = self.use_act_checkpoint and self.training and torch.is_grad_enabled()
        x, outputs = images, []
        for stage in self.proj:
            x = activation_checkpoint(stage, x, use_reentrant=False) if use_checkpoint else stage(x)
            outputs.append(x)
        return outputs[1], outputs[2], outputs[3]
