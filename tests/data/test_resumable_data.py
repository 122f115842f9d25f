"""The resumable training stream: a restart at iteration k yields what an uninterrupted run yields."""
import itertools

import numpy as np
import pytest
import torch

import models  # noqa: F401
from detectron2.data.detection_utils import SizeMismatchError
from models.data.resumable import GroupedBatchPlan, MappedBatches, StepSeeds, build_resumable_train_loader


def _records(n=23):
    rng = np.random.default_rng(0)
    return [{"file_name": f"{i}.png", "width": int(rng.integers(50, 100)), "height": int(rng.integers(50, 100)),
             "image_id": i} for i in range(n)]


def _augmenting_mapper(record):
    """Stands in for DatasetMapper: its augmentation draws from numpy's and torch's global RNGs."""
    if record["file_name"] == "missing.png":
        raise FileNotFoundError(record["file_name"])
    if record["file_name"] == "resized.png":  # detectron2's check of the file's size against the record's
        raise SizeMismatchError(f"Mismatched image shape for image {record['file_name']}")
    return {"image_id": record["image_id"], "flip": bool(np.random.rand() < 0.5), "noise": torch.rand(3)}


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert [x["image_id"] for x in a] == [x["image_id"] for x in b]
        assert [x["flip"] for x in a] == [x["flip"] for x in b]
        assert all(torch.equal(x["noise"], y["noise"]) for x, y in zip(a, b))


def test_plan_restarted_at_k_continues_the_uninterrupted_plan():
    wide = [r["width"] > r["height"] for r in _records()]
    full = list(itertools.islice(GroupedBatchPlan(wide, 4, seed=7), 40))
    resumed = list(itertools.islice(GroupedBatchPlan(wide, 4, seed=7, start_batch=17), 23))
    assert resumed == full[17:]
    for batch in full:  # aspect-ratio groups are homogeneous
        assert len({wide[i] for _, i in batch}) == 1 and len(batch) == 4
    other_seed = list(itertools.islice(GroupedBatchPlan(wide, 4, seed=8), 40))
    assert other_seed != full


def test_ranks_split_each_epoch_without_overlap():
    n = 24
    plans = [GroupedBatchPlan([True] * n, 3, seed=1, rank=r, world_size=2, group=False) for r in range(2)]
    first_epoch = [list(itertools.islice(iter(p), 4)) for p in plans]  # 2 ranks x 4 batches x 3 = 24
    indices = [i for batches in first_epoch for b in batches for _, i in b]
    assert sorted(indices) == list(range(n))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumed_at_k_yields_identical_batches_and_augmentations(num_workers):
    kwargs = dict(mapper=_augmenting_mapper, total_batch_size=4, seed=3, num_workers=num_workers)
    full = _take(build_resumable_train_loader(_records(), **kwargs), 12)
    resumed = _take(build_resumable_train_loader(_records(), start_iter=7, **kwargs), 5)
    _same(full[7:], resumed)
    assert len({b[0]["flip"] for b in full}) == 2  # the augmentation really is random


def test_mapping_leaves_the_callers_rng_untouched():
    batches = MappedBatches(_records(), _augmenting_mapper, seed=0)
    torch.manual_seed(0)
    np.random.seed(0)
    expected = torch.rand(2), np.random.rand()
    torch.manual_seed(0)
    np.random.seed(0)
    first = batches[[(0, 1), (1, 2)]]
    assert torch.equal(torch.rand(2), expected[0]) and np.random.rand() == expected[1]
    again = batches[[(0, 1), (1, 2)]]  # same positions, same augmentation
    assert [x["flip"] for x in first] == [x["flip"] for x in again]


def test_unreadable_images_are_skipped_or_raise():
    records = _records(8)
    records[3]["file_name"] = "missing.png"
    records[5]["file_name"] = "resized.png"
    loader = build_resumable_train_loader(records, mapper=_augmenting_mapper, total_batch_size=8,
                                          aspect_ratio_grouping=False)
    batch = _take(loader, 1)[0]
    assert sorted(x["image_id"] for x in batch) == [0, 1, 2, 4, 6, 7]
    strict = build_resumable_train_loader(records, mapper=_augmenting_mapper, total_batch_size=8,
                                          aspect_ratio_grouping=False, skip_unreadable=False)
    with pytest.raises((FileNotFoundError, SizeMismatchError), match=r"missing\.png|resized\.png"):
        _take(strict, 1)


def test_a_batch_of_unusable_images_is_filled_with_others_the_same_way_each_time():
    """One image per batch, one of them missing: its batch takes another image, drawn from the
    seed and position, so a resumed run gets the same one."""
    records = _records(8)
    records[3]["file_name"] = "missing.png"

    def loader(start_iter=0):
        return build_resumable_train_loader(records, mapper=_augmenting_mapper, total_batch_size=1, seed=4,
                                            start_iter=start_iter, aspect_ratio_grouping=False)

    batches = _take(loader(), 16)  # two epochs: record 3 comes up twice
    assert all(len(b) == 1 for b in batches)
    assert 3 not in {b[0]["image_id"] for b in batches}
    _same(batches[5:], _take(loader(start_iter=5), 11))
    nothing = [dict(r, file_name="missing.png") for r in records]
    with pytest.raises(RuntimeError, match=r"every image of a training batch, and 16 others drawn to replace them, "
                                           r"could not be used \(e\.g\. missing\.png\)"):
        _take(build_resumable_train_loader(nothing, mapper=_augmenting_mapper, total_batch_size=1), 1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="empty"):
        GroupedBatchPlan([], 2, seed=0)
    with pytest.raises(ValueError, match="got 0"):
        GroupedBatchPlan([True], 0, seed=0)


def test_step_seeds_make_model_randomness_a_function_of_the_iteration():
    class _Trainer:
        iter = 0

    hook = StepSeeds(seed=5)
    hook.trainer = _Trainer()
    draws = {}
    for it in (4, 9, 4):
        hook.trainer.iter = it
        hook.before_step()
        draws.setdefault(it, []).append(torch.rand(3))
    assert torch.equal(draws[4][0], draws[4][1])
    assert not torch.equal(draws[4][0], draws[9][0])
