"""A training data stream that a restarted run continues exactly where the killed one stopped.

detectron2 0.6's train loader restarts its sampler and re-seeds its workers on resume, so a
resumed run sees other images, other augmentations and other token samples than an
uninterrupted one. Here everything random is a function of (seed, position) instead of
hidden state:

* the sample order: epoch ``e`` is a permutation drawn from ``seed + e``; position ``q`` of the
  global stream is sample ``perm_e[q % N]``, and rank ``r`` of ``W`` takes positions ``r, r+W, ...``;
* the batches: like detectron2's aspect-ratio grouping (two buckets, w > h and w <= h, by the
  record's width/height), replayed from position 0 on resume -- integer work only;
* the augmentation: every sample is mapped with ``random``/``numpy``/``torch`` seeded from its
  position, whichever worker maps it;
* the model's own randomness (MIMDet's token sampling, drop path): :class:`StepSeeds` seeds
  the RNGs from (seed, iteration, rank) before every step.
"""
import hashlib
import logging
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from detectron2.data.detection_utils import SizeMismatchError
from detectron2.engine import HookBase
from detectron2.utils import comm

from .datasets import drop_degenerate_annotations

__all__ = ["derive_seed", "GroupedBatchPlan", "MappedBatches", "build_resumable_train_loader", "StepSeeds"]

logger = logging.getLogger(__name__)

Batch = List[Tuple[int, int]]  # [(stream position, dataset index)]


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class GroupedBatchPlan:
    """The infinite sequence of this rank's batches, starting at batch ``start_batch``.

    Args:
        aspect_wide: per dataset record, whether width > height (grouping key).
        batch_size: images per batch on this rank.
        seed: base seed of the sample order.
        rank, world_size: this process's shard of the stream.
        start_batch: batches already consumed (the iteration to resume at).
        group: group by aspect ratio (as detectron2's ``aspect_ratio_grouping``).
    """

    def __init__(self, aspect_wide: Sequence[bool], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0, group: bool = True) -> None:
        if len(aspect_wide) == 0:
            raise ValueError("the training set is empty: no records to sample from")
        if batch_size < 1:
            raise ValueError(f"batch size per process must be >= 1, got {batch_size}")
        self.aspect_wide = np.asarray(aspect_wide, dtype=bool)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_batch, self.group = start_batch, group

    def _positions(self) -> Iterator[Tuple[int, int]]:
        n = len(self.aspect_wide)
        epoch, perm = -1, None
        local = 0
        while True:
            q = local * self.world_size + self.rank  # position in the global stream
            if q // n != epoch:
                epoch = q // n
                perm = np.random.default_rng(derive_seed(self.seed, epoch)).permutation(n)
            yield q, int(perm[q % n])
            local += 1

    def _batches(self) -> Iterator[Batch]:
        buckets: Dict[bool, Batch] = {False: [], True: []}
        for position, index in self._positions():
            bucket = buckets[bool(self.aspect_wide[index]) and self.group]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self) -> Iterator[Batch]:
        batches = self._batches()
        for _ in range(self.start_batch):  # replay: indices only, no images are read
            next(batches)
        yield from batches


# Replacement draws for a batch none of whose images could be used, before giving up.
_REPLACEMENT_TRIES = 16


class MappedBatches(Dataset):
    """Maps a planned batch of (position, index) to model inputs, each sample seeded by position.

    Samples the mapper cannot use (``OSError``: unreadable; ``SizeMismatchError``: the file's
    size differs from the annotation's; or the mapper returns None) are skipped with a warning
    and counted in ``self.skipped``; with ``skip_unreadable=False`` they raise. A batch left
    empty is filled with other images, drawn from (seed, position), so a resumed run draws
    the same ones.
    """

    def __init__(self, records: Sequence[dict], mapper: Callable[[dict], Optional[dict]], seed: int,
                 skip_unreadable: bool = True) -> None:
        self.records, self.mapper, self.seed = records, mapper, seed
        self.skip_unreadable = skip_unreadable
        self.skipped = 0

    def _map_seeded(self, position: int, index: int) -> Optional[dict]:
        sample_seed = derive_seed(self.seed, 1, position)
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        torch.manual_seed(sample_seed)
        try:
            return self.mapper(dict(self.records[index]))
        except (OSError, SizeMismatchError) as e:
            if not self.skip_unreadable:
                raise
            self.skipped += 1
            logger.warning("Skipping unusable training image %s (%d skipped by this loader process): %s",
                           self.records[index].get("file_name"), self.skipped, e)
            return None
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])

    def __getitem__(self, batch: Batch) -> List[dict]:
        mapped = []
        for position, index in batch:
            sample = self._map_seeded(position, index)
            if sample is None:
                continue
            mapped.append(sample)
        position = batch[0][0]
        for attempt in range(_REPLACEMENT_TRIES if not mapped else 0):
            index = derive_seed(self.seed, 2, position, attempt) % len(self.records)
            sample = self._map_seeded(position, index)
            if sample is not None:
                mapped.append(sample)
                break
        if not mapped:
            names = [self.records[i].get("file_name") for _, i in batch]
            raise RuntimeError(f"every image of a training batch, and {_REPLACEMENT_TRIES} others drawn to replace "
                               f"them, could not be used (e.g. {names[0]}): is the dataset's image folder right?")
        return mapped

    def __len__(self) -> int:  # the plan is infinite; DataLoader never asks with batch_size=None
        raise TypeError("MappedBatches is indexed by planned batches, it has no length")


def build_resumable_train_loader(dataset: Sequence[dict], *, mapper: Callable, total_batch_size: int,
                                 seed: int = 0, start_iter: int = 0, num_workers: int = 0,
                                 aspect_ratio_grouping: bool = True, skip_unreadable: bool = True) -> DataLoader:
    """A train loader that yields, from ``start_iter`` on, exactly the batches of an uninterrupted run.

    Arguments follow detectron2's ``build_detection_train_loader``; ``dataset`` is the list of
    records (e.g. ``get_detection_dataset_dicts(...)``), whose degenerate annotations are
    dropped with a warning (:func:`models.data.datasets.drop_degenerate_annotations`).
    """
    world_size = comm.get_world_size()
    if total_batch_size % world_size != 0:
        raise ValueError(f"total_batch_size {total_batch_size} is not divisible by the {world_size} processes")
    records = drop_degenerate_annotations(list(dataset), need_masks=getattr(mapper, "use_instance_mask", False))
    plan = GroupedBatchPlan([r["width"] > r["height"] for r in records], total_batch_size // world_size,
                            seed, comm.get_rank(), world_size, start_iter, aspect_ratio_grouping)
    batches = MappedBatches(records, mapper, seed, skip_unreadable)
    return DataLoader(batches, sampler=plan, batch_size=None, num_workers=num_workers,
                      collate_fn=_as_is, persistent_workers=num_workers > 0)


def _as_is(batch: List[dict]) -> List[dict]:
    return batch


class StepSeeds(HookBase):
    """Seeds ``random``, ``numpy`` and ``torch`` from (seed, iteration, rank) before every step."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def before_step(self) -> None:
        step_seed = derive_seed(self.seed, 2, self.trainer.iter, comm.get_rank())
        random.seed(step_seed)
        np.random.seed(step_seed)
        torch.manual_seed(step_seed)
