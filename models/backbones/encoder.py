"""MIMDet's encoder: the MAE ViT run on a random subset of the conv stem's tokens.

Partial observation (the MIMDet paper): of the L tokens of the padded batch each image keeps
``int(L * sample_ratio)``, drawn uniformly from its real (non-padding) tokens first. The
kept tokens go through the ViT blocks; the decoder later puts them back in image order.
"""
from functools import partial
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .attention import run_block, wants_fused_attention
from .conv_stem import ConvStem
from .pos_embed import ResizedTableCache, sincos_table_mae

__all__ = ["PartialObservationEncoder", "EncoderOutput", "valid_token_mask", "sample_tokens", "init_vit_weights"]


# Noise given to padding tokens: above any uniform [0, 1) draw, so real tokens sort first.
PADDING_NOISE = 100.0


def init_vit_weights(module: nn.Module) -> None:
    """MAE's initialisation: Linear xavier_uniform with zero bias, LayerNorm ones/zeros."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def valid_token_mask(image_sizes: Sequence[Tuple[int, int]], grid: Tuple[int, int], patch_size: int,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """(B, H*W) bool, row-major: True for tokens inside each image's ceil(h/p) x ceil(w/p) region."""
    # Filled on the device from Python ints: a tensor of the sizes copied from the host would
    # make a CUDA forward wait for the work queued before it.
    valid = torch.zeros(len(image_sizes), *grid, dtype=torch.bool, device=device)  # (B, H, W)
    for image_valid, (height, width) in zip(valid, image_sizes):
        image_valid[: -(-height // patch_size), : -(-width // patch_size)] = True
    return valid.flatten(1)


def sample_tokens(valid: torch.Tensor, len_keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """MAE-style random sampling that draws real tokens before padding ones.

    Args:
        valid: (B, L) bool, True for real tokens.
        len_keep: tokens to keep per image.
    Returns:
        ids_shuffle: (B, L) token indices in draw order; ``ids_shuffle[:, :len_keep]`` are kept.
        ids_restore: (B, L) inverse permutation, to put draw-ordered tokens back in image order.
    """
    noise = torch.rand(valid.shape, device=valid.device)  # (B, L) in [0, 1)
    noise = noise.masked_fill(~valid, PADDING_NOISE)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle, ids_restore


class EncoderOutput(NamedTuple):
    """What the decoder and the backbone need from the encoder.

    ``latent`` (B, len_keep, D) normed ViT outputs in draw order; ``stem_maps`` the stem's
    stride 4/8/16 maps; ``ids_shuffle``/``ids_restore`` (B, L) or None when every token was
    kept in image order (sample ratio 1.0); ``grid`` the token grid (H, W).
    """

    latent: torch.Tensor
    stem_maps: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ids_shuffle: Optional[torch.Tensor]
    ids_restore: Optional[torch.Tensor]
    grid: Tuple[int, int]

    @property
    def ids_keep(self) -> Optional[torch.Tensor]:
        """(B, len_keep) image-order indices of the tokens the ViT saw."""
        return None if self.ids_shuffle is None else self.ids_shuffle[:, : self.latent.shape[1]]


class PartialObservationEncoder(nn.Module):
    """Conv stem + fixed sin-cos positions + MAE ViT blocks on a random subset of tokens.

    Args:
        img_size: image side the fixed table is built for (grid img_size // patch_size);
            the table is bicubically resized to each batch's grid.
        patch_size: stride of the stem (16; the 4-stage stem implies it).
        embed_dim, depth, num_heads, mlp_ratio: ViT width, blocks, heads, MLP ratio.
        drop_path_rate: stochastic depth of the last block (rises linearly from 0).
        norm_eps: LayerNorm epsilon of the blocks and the final norm.
        use_act_checkpoint: recompute the stem stages and the blocks in the backward pass
            (activation checkpointing; training only).
    """

    def __init__(self, *, img_size: int = 800, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, norm_eps: float = 1e-5,
                 use_act_checkpoint: bool = False) -> None:
        super().__init__()
        if patch_size != 16:
            raise ValueError(f"patch_size must be 16 (the conv stem has 4 stride-2 stages), got {patch_size}")
        if img_size < patch_size:
            raise ValueError(f"img_size must be at least patch_size={patch_size}, got {img_size}")
        self.patch_size = patch_size
        self.table_grid = (img_size // patch_size, img_size // patch_size)
        self.use_act_checkpoint = use_act_checkpoint
        self.patch_embed = ConvStem(embed_dim, use_act_checkpoint=use_act_checkpoint)
        table = sincos_table_mae(embed_dim, *self.table_grid)[None]  # (1, 1 + G*G, D), cls slot first
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self._pos_tables = ResizedTableCache()
        drop_path = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 -> rate
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr, norm_layer=norm_layer)
            for dpr in drop_path
        )
        self.norm = norm_layer(embed_dim)
        self.blocks.apply(init_vit_weights)
        self.norm.apply(init_vit_weights)

    def pos_table(self, grid: Tuple[int, int], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The fixed table resized to ``grid`` (and cast to ``dtype``), without its cls slot: (1, H*W, D)."""
        return self._pos_tables(self.pos_embed, self.table_grid, grid, 1, dtype)

    def embed(self, images: torch.Tensor) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
        """Stem maps (stride 4, 8, 16) and the position-encoded tokens (B, L, D) in image order.

        The fp32 table is added as it is: under autocast the stem's bf16/fp16 tokens become
        fp32, so the residual stream stays fp32 and only the blocks' matmuls run in low
        precision, as in the original code.
        """
        stem_maps = self.patch_embed(images)
        grid = tuple(stem_maps[2].shape[-2:])
        tokens = stem_maps[2].flatten(2).transpose(1, 2)  # (B, L, D), row-major
        return stem_maps, tokens + self.pos_table(grid)

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """ViT blocks and the final norm on (B, N, D) tokens."""
        use_checkpoint = self.use_act_checkpoint and self.training and torch.is_grad_enabled()
        fused = wants_fused_attention(tokens)
        for block in self.blocks:
            step = partial(run_block, block, fused=fused)
            tokens = activation_checkpoint(step, tokens, use_reentrant=False) if use_checkpoint else step(tokens)
        return self.norm(tokens)

    def forward(self, images: torch.Tensor, image_sizes: List[Tuple[int, int]], sample_ratio: float) -> EncoderOutput:
        """Encode a padded batch (B, 3, H, W), keeping ``int(L * sample_ratio)`` tokens per image."""
        stem_maps, tokens = self.embed(images)
        grid = tuple(stem_maps[2].shape[-2:])
        num_tokens, width = tokens.shape[1], tokens.shape[2]
        # At least one token, so a tiny batch at a tiny ratio still has something to attend to.
        len_keep = max(1, int(num_tokens * sample_ratio))
        if len_keep == num_tokens:
            # Everything is kept: attention is order-free, so skip the shuffle and unshuffle.
            return EncoderOutput(self.run_blocks(tokens), stem_maps, None, None, grid)
        valid = valid_token_mask(image_sizes, grid, self.patch_size, tokens.device)  # (B, L)
        ids_shuffle, ids_restore = sample_tokens(valid, len_keep)  # (B, L) each
        ids_keep = ids_shuffle[:, :len_keep]  # (B, len_keep)
        kept = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, width))  # (B, len_keep, D)
        return EncoderOutput(self.run_blocks(kept), stem_maps, ids_shuffle, ids_restore, grid)
