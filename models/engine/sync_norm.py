"""SyncBN for CPU processes.

The COCO configs normalise the FPN with ``norm="SyncBN"``, which detectron2 builds as
``torch.nn.SyncBatchNorm``; that one syncs only CUDA tensors. detectron2's
``NaiveSyncBatchNorm`` syncs through ``all_reduce``, which gloo provides, and computes the
same statistics (the mean and mean square over all processes' batches).
"""
import logging

from detectron2.layers import NaiveSyncBatchNorm
from torch import nn

__all__ = ["sync_batchnorm_for_cpu"]

logger = logging.getLogger(__name__)


def _naive_copy(norm: nn.SyncBatchNorm) -> NaiveSyncBatchNorm:
    copy = NaiveSyncBatchNorm(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                              track_running_stats=norm.track_running_stats)
    copy.load_state_dict(norm.state_dict())  # weight, bias, running statistics
    return copy.train(norm.training)


def sync_batchnorm_for_cpu(model: nn.Module) -> int:
    """Replace every ``nn.SyncBatchNorm`` in a CPU ``model`` (in place) by a ``NaiveSyncBatchNorm``
    with the same weights and statistics; log it once. Returns the number replaced."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, _naive_copy(child))
                swapped += 1
    if swapped:
        logger.info("SyncBN on CPU processes: %d torch.nn.SyncBatchNorm layer(s) (CUDA-only) replaced by "
                    "detectron2's NaiveSyncBatchNorm, which syncs over gloo", swapped)
    return swapped
