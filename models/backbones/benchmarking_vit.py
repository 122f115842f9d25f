"""Benchmarking-ViT (Li et al. 2021, arXiv 2111.11429), the baseline of the MIMDet paper.

A plain ViT/16 at a fixed square input (1024x1024: 64x64 tokens). Blocks come in groups of
``global_every``: all but the last of a group attend within non-overlapping windows, the last
attends globally. All windowed blocks share one relative-position-bias table, all global blocks
another. The outputs of the four depth quarters become a stride 4/8/16/32 pyramid through
small adaptors, for detectron2's FPN.

Output features (the FPN's ``in_features``): ``s0``, ``s1``, ``s2``, ``s3``, strides 4, 8, 16,
32 (for 16x16 patches), ``embed_dim`` channels each.
"""
from functools import partial
from typing import Dict, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.structures import ImageList
from einops import rearrange
from timm.layers import PatchEmbed, lecun_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from .encoder import init_vit_weights
from .pos_embed import resize_pos_table, sincos_table_mocov3

__all__ = ["BenchmarkingViT", "RelativePositionBias", "relative_position_index", "window_partition",
           "window_unpartition"]

FEATURE_NAMES = ("s0", "s1", "s2", "s3")
ADAPTOR_NORM_GROUPS = 32  # GroupNorm(32, C) of the stride-4 adaptor, as in the released checkpoint


def relative_position_index(size: int) -> torch.Tensor:
    """(size², size²) int64: for tokens i, j of a size x size grid (row-major), the row of a
    ((2*size-1)², heads) table that holds the bias of their offset (dy, dx) = pos_i - pos_j:
    ``(dy + size - 1) * (2 * size - 1) + (dx + size - 1)`` (the Swin/BEiT layout)."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + size - 1
    dx = xs[:, None] - xs[None, :] + size - 1
    return dy * (2 * size - 1) + dx


class RelativePositionBias(nn.Module):
    """A learned per-head bias for every 2D offset between two tokens of a size x size grid.

    Args:
        size: side of the largest grid (in tokens) the table serves.
        num_heads: attention heads, one bias each.
    """

    def __init__(self, size: int, num_heads: int) -> None:
        super().__init__()
        self.size = size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * size - 1) ** 2, num_heads))
        # Persistent: the released checkpoints hold it.
        self.register_buffer("relative_position_index", relative_position_index(size), persistent=True)

    def forward(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The (heads, h*w, h*w) additive attention bias for a grid_h x grid_w token grid."""
        if grid_h > self.size or grid_w > self.size:
            raise ValueError(f"token grid {grid_h}x{grid_w} exceeds the {self.size}x{self.size} "
                             "relative-position table")
        index = self.relative_position_index
        if (grid_h, grid_w) != (self.size, self.size):
            # A smaller grid is a top-left corner of the full one: same offsets, fewer tokens.
            ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
            keep = (ys * self.size + xs).flatten().to(index.device)
            index = index[keep[:, None], keep[None, :]]
        return self.relative_position_bias_table.t()[:, index]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window², C), zero-padding H and W up to multiples of window."""
    pad_h, pad_w = -x.shape[1] % window, -x.shape[2] % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=window, ww=window)


def window_unpartition(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of window_partition: (B * windows, window², C) -> (B, height, width, C), unpadded."""
    rows, cols = -(-height // window), -(-width // window)
    x = rearrange(windows, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=rows, nw=cols, wh=window)
    return x[:, :height, :width]


def _attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype q/k/v will have: scaled_dot_product_attention wants its float mask to match."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class BenchmarkingViT(Backbone):
    """Plain ViT with windowed + global attention and a four-level adaptor pyramid.

    Args:
        img_size: side of the (square, padded) input the position and global-bias tables are
            built for; inputs may be smaller (tables are resized/cropped) but never larger.
        patch_size: side of a patch; the feature strides are patch/4, patch/2, patch, 2*patch.
        embed_dim: token width, also the channels of every output feature.
        depth: number of transformer blocks; feature k is taken after quarter k of them.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / embed_dim.
        drop_path_rate: stochastic depth of the last block (linear from 0 at the first).
        norm_eps: LayerNorm epsilon.
        window_size: side, in tokens, of the attention windows of the windowed blocks.
        global_every: every global_every-th block (the last of each group) attends globally.
        use_act_checkpoint: recompute each block in the backward pass (training only).
        out_features: which of "s0".."s3" forward returns.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-6,
        window_size: int = 16,
        global_every: int = 3,
        use_act_checkpoint: bool = False,
        out_features: Iterable[str] = FEATURE_NAMES,
    ) -> None:
        super().__init__()
        if img_size % patch_size or patch_size % 4:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}, "
                             "itself a multiple of 4")
        if min(depth, global_every, window_size) < 1:
            raise ValueError(f"depth {depth}, global_every {global_every}, window_size {window_size}: must be >= 1")
        out_features = list(out_features)
        unknown = [name for name in out_features if name not in FEATURE_NAMES]
        if unknown or not out_features:
            raise ValueError(f"out_features {out_features}: choose from {list(FEATURE_NAMES)}")
        self.img_size, self.patch_size, self.window_size = img_size, patch_size, window_size
        self.grid_size = img_size // patch_size
        self.use_act_checkpoint = use_act_checkpoint

        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=3, embed_dim=embed_dim,
                                      flatten=False, output_fmt="NHWC", bias=True)
        table = sincos_table_mocov3(embed_dim, self.grid_size, self.grid_size)
        self.pos_embed = nn.Parameter(table.unsqueeze(0))  # trainable, as in the original
        drop_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rate, norm_layer=norm_layer)
            for rate in drop_rates
        )
        self.global_blocks = {i for i in range(depth) if (i + 1) % global_every == 0}
        self.windowed_rel_pos_bias = RelativePositionBias(window_size, num_heads)
        self.global_rel_pos_bias = RelativePositionBias(self.grid_size, num_heads)

        upsample = partial(nn.ConvTranspose2d, embed_dim, embed_dim, kernel_size=2, stride=2)
        self.ms_adaptor = nn.ModuleList([  # strides patch/4, patch/2, patch, 2*patch
            nn.Sequential(upsample(), nn.GroupNorm(ADAPTOR_NORM_GROUPS, embed_dim), nn.GELU(), upsample()),
            upsample(),
            nn.Identity(),
            nn.MaxPool2d(kernel_size=2),
        ])
        # Last block of each quarter (ceil((k+1) * depth / 4) - 1); a very shallow model may
        # take two features after the same block.
        self.feature_blocks = [-(-(k + 1) * depth // 4) - 1 for k in range(len(FEATURE_NAMES))]
        strides = [patch_size // 4, patch_size // 2, patch_size, patch_size * 2]
        self._out_features, self._out_feature_channels = out_features, {n: embed_dim for n in out_features}
        self._out_feature_strides = {name: strides[FEATURE_NAMES.index(name)] for name in out_features}
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.ms_adaptor.modules():  # as the original: LeCun-normal kernels, zero biases
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                lecun_normal_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.data.view(weight.shape[0], -1))  # as MAE: a linear map of the patch
        self.blocks.apply(init_vit_weights)  # MAE's: the same leaves in the same order as before

    # MAE -> this backbone: the blocks and the 16x16 patch embedding. MAE's position table is
    # not used: the MoCo-v3 table stays, as in the original.
    mae_pos_tables: Dict[str, int] = {}
    fixed_pos_tables = {"pos_embed": 0}  # trainable, but built for img_size: resized on loading

    @staticmethod
    def mae_source(name: str) -> Optional[str]:
        """The MAE checkpoint entry that state-dict entry ``name`` loads from (None: not from MAE)."""
        return name if name.startswith(("blocks.", "patch_embed.proj.")) else None

    @property
    def size_divisibility(self) -> int:
        """The s3 max-pool halves the patch grid, so inputs must be multiples of 2 * patch_size."""
        return 2 * self.patch_size

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def _check_input(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} must be a multiple of patch_size {self.patch_size}")
        if height > self.img_size or width > self.img_size:
            raise ValueError(f"image size {height}x{width} exceeds the maximum {self.img_size}x{self.img_size} "
                             f"(img_size) that the position and global relative-position tables cover")

    def _window_bias(self, batch: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """Bias for the windowed blocks: (heads, w², w²), or per window (B*windows, heads, w², w²)
        when the grid is padded, with the padding tokens masked out as keys."""
        bias = self.windowed_rel_pos_bias(self.window_size, self.window_size)
        if grid_h % self.window_size == 0 and grid_w % self.window_size == 0:
            return bias
        real = torch.ones(1, grid_h, grid_w, 1, device=bias.device)
        real = window_partition(real, self.window_size)[..., 0].bool()  # (windows, w²); padding is False
        key_mask = torch.zeros(real.shape, dtype=bias.dtype, device=bias.device).masked_fill(~real, float("-inf"))
        bias = bias.unsqueeze(0) + key_mask[:, None, None, :]  # (windows, heads, w², w²)
        return bias.repeat(batch, 1, 1, 1)

    def _run_block(self, index: int, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """One block on (B, H, W, C) tokens, within windows or over the whole grid."""
        block = self.blocks[index]
        batch, height, width, channels = x.shape
        if index in self.global_blocks:
            return block(x.reshape(batch, height * width, channels), attn_mask=bias).view_as(x)
        windows = block(window_partition(x, self.window_size), attn_mask=bias)
        return window_unpartition(windows, self.window_size, height, width)

    def forward(self, images: Union[ImageList, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) images (H, W multiples of patch_size, at most img_size) -> out_features,
        each (B, embed_dim, H / stride, W / stride)."""
        images = images.tensor if isinstance(images, ImageList) else images
        self._check_input(images)
        x = self.patch_embed(images)  # (B, h, w, C)
        batch, grid_h, grid_w, channels = x.shape
        pos = resize_pos_table(self.pos_embed, (self.grid_size, self.grid_size), (grid_h, grid_w), 0)
        x = x + pos.reshape(1, grid_h, grid_w, channels)

        # Each bias is built once a pass and shared by all blocks of its kind.
        dtype = _attention_dtype(x)
        window_bias = self._window_bias(batch, grid_h, grid_w).to(dtype)
        global_bias = self.global_rel_pos_bias(grid_h, grid_w).to(dtype)
        recompute = self.use_act_checkpoint and self.training and torch.is_grad_enabled()

        features: Dict[str, torch.Tensor] = {}
        for index in range(len(self.blocks)):
            bias = global_bias if index in self.global_blocks else window_bias
            x = (checkpoint(self._run_block, index, x, bias, use_reentrant=False) if recompute
                 else self._run_block(index, x, bias))
            for name, block_index in zip(FEATURE_NAMES, self.feature_blocks):
                if block_index == index and name in self._out_features:
                    feature = x.permute(0, 3, 1, 2)  # (B, C, h, w)
                    features[name] = self.ms_adaptor[FEATURE_NAMES.index(name)](feature)
        return features

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, window_size={self.window_size}, "
                f"global_blocks={sorted(self.global_blocks)}, feature_blocks={self.feature_blocks}")
