"""Fixed sin-cos tables: the per-grid, per-dtype cache a forward pass reads them from."""
import models  # noqa: F401  (before detectron2)
import torch
from torch import nn

from models.backbones.pos_embed import ResizedTableCache, resize_pos_table, sincos_table_mae


def _table() -> nn.Parameter:
    return nn.Parameter(sincos_table_mae(32, 8, 8)[None], requires_grad=False)  # (1, 65, 32)


def test_cache_returns_the_resized_table_once_per_grid_and_dtype():
    table, cache = _table(), ResizedTableCache()
    resized = cache(table, (8, 8), (4, 6), 1)
    torch.testing.assert_close(resized, resize_pos_table(table, (8, 8), (4, 6), 1)[:, 1:], rtol=0, atol=0)
    assert cache(table, (8, 8), (4, 6), 1) is resized  # not rebuilt
    as_bf16 = cache(table, (8, 8), (4, 6), 1, torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16, resized.to(torch.bfloat16))
    assert cache(table, (8, 8), (4, 6), 1, torch.bfloat16) is as_bf16  # not recast
    assert cache(table, (8, 8), (4, 6), 1) is resized  # both dtypes kept
    assert cache(table, (8, 8), (8, 8), 1).shape == (1, 64, 32)


def test_cache_follows_in_place_changes_of_the_table():
    table, cache = _table(), ResizedTableCache()
    before = cache(table, (8, 8), (4, 6), 1, torch.bfloat16)
    with torch.no_grad():
        table.mul_(2)  # what load_state_dict does
    after = cache(table, (8, 8), (4, 6), 1, torch.bfloat16)
    assert after is not before
    torch.testing.assert_close(after.float(), 2 * before.float(), rtol=1e-2, atol=1e-2)


def test_trainable_table_is_resized_every_call_and_keeps_its_graph():
    table, cache = nn.Parameter(sincos_table_mae(32, 8, 8)[None]), ResizedTableCache()
    resized = cache(table, (8, 8), (4, 6), 1, torch.bfloat16)
    assert resized.dtype == torch.bfloat16 and resized.requires_grad
    resized.float().sum().backward()
    assert table.grad is not None
