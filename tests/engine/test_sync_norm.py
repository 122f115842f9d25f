"""models/engine/sync_norm.py: SyncBN on CPU processes normalises with the statistics of the whole batch."""
import json
from pathlib import Path

import torch
from torch import nn

import models  # noqa: F401  (before detectron2)
from detectron2.layers import NaiveSyncBatchNorm

from models.engine.launch import launch
from models.engine.sync_norm import sync_batchnorm_for_cpu


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.Sequential(nn.SyncBatchNorm(4)))
    model[1].running_var.fill_(2.0)
    return model


def test_swap_keeps_weights_and_statistics(caplog):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("INFO", logger="models.engine.sync_norm"):
        assert sync_batchnorm_for_cpu(model) == 2
    assert isinstance(model[1], NaiveSyncBatchNorm) and isinstance(model[2][0], NaiveSyncBatchNorm)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert caplog.text.count("SyncBN on CPU processes: 2") == 1


def _half_batch_statistics(out_dir):
    from detectron2.utils import comm

    model = _model()
    sync_batchnorm_for_cpu(model)
    batch = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    half = batch[comm.get_rank() * 4:(comm.get_rank() + 1) * 4]
    normalised = model[1](model[0](half))
    stats = dict(out=normalised.tolist(), mean=model[1].running_mean.tolist())
    Path(out_dir, f"rank{comm.get_rank()}.json").write_text(json.dumps(stats))


def test_two_gloo_processes_normalise_with_the_whole_batch(tmp_path):
    launch(_half_batch_statistics, num_gpus_per_machine=0, num_cpu_processes=2, args=(str(tmp_path),))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    model = _model()
    whole_batch_norm = nn.BatchNorm2d(4).train()
    whole_batch_norm.load_state_dict(model[1].state_dict())
    batch = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    expected = whole_batch_norm(model[0](batch))
    for rank, stats in enumerate(ranks):
        assert torch.allclose(torch.tensor(stats["out"]), expected[rank * 4:(rank + 1) * 4], atol=1e-5)
        assert torch.allclose(torch.tensor(stats["mean"]), whole_batch_norm.running_mean, atol=1e-6)
