"""MIMDet's decoder: completes the partially observed token map with MAE's decoder.

The encoder saw a random subset of tokens; the decoder fills the dropped positions, puts
every token back in image order, adds a fixed position table and runs the first blocks of
MAE's pre-trained decoder ("4xdec"), giving a dense stride-16 feature map.
"""
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn as nn
from einops import rearrange
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .attention import run_block, wants_fused_attention
from .encoder import init_vit_weights
from .pos_embed import ResizedTableCache, sincos_table_mae

__all__ = ["MAEDecoderCompletion", "FILL_MODES"]


# mask_token: MAE's learned mask token (MIMDet v1, the released configs'); conv_feature: a projection of
# the stem's stride-16 features at the dropped positions (MIMDet v2).
FILL_MODES = ("mask_token", "conv_feature")


class MAEDecoderCompletion(nn.Module):
    """Fill dropped tokens, unshuffle, and run MAE decoder blocks to a (B, C, H, W) map.

    Args:
        embed_dim: encoder width D.
        decoder_embed_dim: decoder width C (512 in MAE).
        depth, num_heads, mlp_ratio: decoder blocks (4 of MAE's 8), heads, MLP ratio.
        norm_eps: LayerNorm epsilon.
        table_grid: grid (G, G) of the fixed position table, resized to each batch's grid.
        fill_mode: one of ``FILL_MODES``; ``conv_feature`` adds ``conv_feat_proj``
            (Linear D -> C) and has no ``mask_token``.
        use_act_checkpoint: activation checkpointing of the blocks (training only).
    """

    def __init__(self, *, embed_dim: int = 768, decoder_embed_dim: int = 512, depth: int = 4, num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_eps: float = 1e-5, table_grid: Tuple[int, int] = (50, 50),
                 fill_mode: str = "mask_token", use_act_checkpoint: bool = False) -> None:
        super().__init__()
        if fill_mode not in FILL_MODES:
            raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
        self.fill_mode = fill_mode
        self.table_grid = tuple(table_grid)
        self.use_act_checkpoint = use_act_checkpoint
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        if fill_mode == "mask_token":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        else:
            self.conv_feat_proj = nn.Linear(embed_dim, decoder_embed_dim)
        table = sincos_table_mae(decoder_embed_dim, *self.table_grid)[None]  # (1, 1 + G*G, C)
        self.decoder_pos_embed = nn.Parameter(table, requires_grad=False)
        self._pos_tables = ResizedTableCache()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.apply(init_vit_weights)
        if fill_mode == "mask_token":
            nn.init.normal_(self.mask_token, std=0.02)  # as MAE

    def pos_table(self, grid: Tuple[int, int], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The fixed table resized to ``grid`` (and cast to ``dtype``), without its cls slot: (1, H*W, C)."""
        return self._pos_tables(self.decoder_pos_embed, self.table_grid, grid, 1, dtype)

    def fill_tokens(self, stem_tokens: torch.Tensor, ids_dropped: torch.Tensor) -> torch.Tensor:
        """(B, L - N, C) tokens for the dropped image positions ``ids_dropped`` (B, L - N)."""
        batch, num_dropped = ids_dropped.shape
        if self.fill_mode == "mask_token":
            return self.mask_token.expand(batch, num_dropped, -1)
        index = ids_dropped[..., None].expand(-1, -1, stem_tokens.shape[-1])
        return self.conv_feat_proj(torch.gather(stem_tokens, 1, index))

    def forward(self, latent: torch.Tensor, stem_map: torch.Tensor, ids_shuffle: Optional[torch.Tensor],
                ids_restore: Optional[torch.Tensor]) -> torch.Tensor:
        """Complete the token map.

        Args:
            latent: (B, N, D) encoder outputs, in draw order (image order when N = L).
            stem_map: (B, D, H, W) stride-16 stem features (read by ``conv_feature`` fill).
            ids_shuffle, ids_restore: (B, L) from the encoder's sampling, or both None when
                all tokens were kept in image order.
        Returns:
            (B, C, H, W) feature map.
        """
        grid_h, grid_w = stem_map.shape[-2:]
        x = self.decoder_embed(latent)  # (B, N, C)
        if ids_restore is not None:
            num_kept = latent.shape[1]
            stem_tokens = stem_map.flatten(2).transpose(1, 2)  # (B, L, D), image order
            fill = self.fill_tokens(stem_tokens, ids_shuffle[:, num_kept:])
            x = torch.cat([x, fill], dim=1)  # (B, L, C), draw order; promoted to the wider dtype
            x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # image order
        # The fp32 table keeps the residual stream, and so c4, in fp32 under autocast (as the original).
        x = x + self.pos_table((grid_h, grid_w))
        use_checkpoint = self.use_act_checkpoint and self.training and torch.is_grad_enabled()
        fused = wants_fused_attention(x)
        for block in self.decoder_blocks:
            step = partial(run_block, block, fused=fused)
            x = activation_checkpoint(step, x, use_reentrant=False) if use_checkpoint else step(x)
        x = self.decoder_norm(x)
        return rearrange(x, "b (h w) c -> b c h w", h=grid_h, w=grid_w)
