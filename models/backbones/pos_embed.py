"""Fixed 2D sin-cos position tables, and their resizing to a batch's token grid.

Two layouts exist in the checkpoints we load:

* MAE (``models_mae.py``): a leading, unused cls slot (zeros); for each token the first
  half of the channels encodes its column (x), the second half its row (y), each as
  [sin, cos] over D/4 frequencies.
* MoCo v3 (used by Benchmarking-ViT, square grids): no cls slot; its meshgrid puts the row
  first, so channels are [sin(y), cos(y), sin(x), cos(x)].
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["sincos_table_mae", "sincos_table_mocov3", "resize_pos_table", "ResizedTableCache"]

TEMPERATURE = 10000.0


def _frequencies(embed_dim: int) -> torch.Tensor:
    if embed_dim % 4 != 0:
        raise ValueError(f"sin-cos position table needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    return 1.0 / TEMPERATURE ** (torch.arange(quarter, dtype=torch.float64) / quarter)


def _grid(grid_h: int, grid_w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of every token, row-major, as float64 vectors of length H*W."""
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    return ys.flatten(), xs.flatten()


def sincos_table_mae(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """MAE's table: (1 + H*W, D) float32, row 0 is the (zero) cls slot."""
    omega = _frequencies(embed_dim)
    ys, xs = _grid(grid_h, grid_w)
    x_angles, y_angles = torch.outer(xs, omega), torch.outer(ys, omega)
    table = torch.cat([x_angles.sin(), x_angles.cos(), y_angles.sin(), y_angles.cos()], dim=1)
    return torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table]).float()


def sincos_table_mocov3(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """MoCo v3's table: (H*W, D) float32, no cls slot."""
    omega = _frequencies(embed_dim)
    ys, xs = _grid(grid_h, grid_w)
    x_angles, y_angles = torch.outer(xs, omega), torch.outer(ys, omega)
    return torch.cat([y_angles.sin(), y_angles.cos(), x_angles.sin(), x_angles.cos()], dim=1).float()


def resize_pos_table(
    table: torch.Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int], num_prefix: int
) -> torch.Tensor:
    """Bicubically resize a (1, num_prefix + h*w, D) table to (1, num_prefix + H*W, D).

    The ``num_prefix`` leading slots (MAE's cls slot) are carried over unchanged.
    """
    (src_h, src_w), (dst_h, dst_w) = src_grid, dst_grid
    expected = num_prefix + src_h * src_w
    if table.dim() != 3 or table.shape[0] != 1 or table.shape[1] != expected:
        raise ValueError(
            f"position table of shape {tuple(table.shape)} does not fit a {src_h}x{src_w} grid "
            f"with {num_prefix} prefix slot(s): expected (1, {expected}, D)"
        )
    if (src_h, src_w) == (dst_h, dst_w):
        return table
    prefix, grid = table[:, :num_prefix], table[:, num_prefix:]
    grid = grid.reshape(1, src_h, src_w, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(dst_h, dst_w), mode="bicubic", align_corners=False)
    grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(1, dst_h * dst_w, -1)
    return torch.cat([prefix, grid], dim=1)


class ResizedTableCache:
    """Resized copies of a fixed table, one per token grid and dtype, so a forward pass never
    rebuilds or recasts them (a mixed-precision forward adds the table in bf16 or fp16).

    A plain object (not a module): the table itself stays a parameter of its owner, under the
    name the released checkpoints use. Entries are dropped when the table is changed in place
    (``load_state_dict``), moved or cast. A table that requires grad is resized every call.
    """

    def __init__(self) -> None:
        self._cache: Dict[tuple, torch.Tensor] = {}

    def __call__(self, table: torch.Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int],
                 num_prefix: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The table for ``dst_grid`` without its prefix slots, in ``dtype`` (default the table's): (1, H*W, D)."""
        dtype = dtype or table.dtype
        if table.requires_grad:
            return resize_pos_table(table, src_grid, dst_grid, num_prefix)[:, num_prefix:].to(dtype)
        identity = (table.device, table.dtype, table.data_ptr(), table._version)
        key = (tuple(dst_grid), dtype) + identity
        cached = self._cache.get(key)
        if cached is None:
            with torch.no_grad():
                resized = resize_pos_table(table, src_grid, dst_grid, num_prefix)[:, num_prefix:]
                cached = resized.to(dtype).contiguous()
            self._cache = {k: v for k, v in self._cache.items() if k[2:] == identity}
            self._cache[key] = cached
        return cached
