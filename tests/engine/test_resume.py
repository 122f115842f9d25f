"""models/engine/resume.py: choosing the checkpoint to resume from, the run's seed, the metric
history and metrics.json after a kill."""
import json
import logging
import pickle

import pytest
import torch
from torch import nn

import models  # noqa: F401  (before detectron2)
from detectron2.utils.events import EventStorage

from models.engine.resume import (MetricHistory, NoReadableCheckpoint, ResumableCheckpointer, drop_metrics_after,
                                  remove_partial_checkpoints)


def _checkpointer(directory, seed=None):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return ResumableCheckpointer(model, str(directory), seed=seed), model


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creates the marker file when unpickled


def test_falls_back_past_truncated_and_code_carrying_checkpoints(tmp_path, caplog):
    checkpointer, model = _checkpointer(tmp_path, seed=42)
    checkpointer.save("model_0000001", iteration=1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpointer.save("model_0000003", iteration=3)
    newest = tmp_path / "model_0000003.pth"
    newest.write_bytes(newest.read_bytes()[:100])
    marker = tmp_path / "code_ran"
    with open(tmp_path / "model_0000005.pth", "wb") as f:
        pickle.dump({"model": {}, "iteration": 5, "x": _RunsCode(marker)}, f)
    (tmp_path / "last_checkpoint").write_text("model_0000005.pth")

    resumed, resumed_model = _checkpointer(tmp_path)
    with torch.no_grad():
        resumed_model.weight.zero_()
    with caplog.at_level(logging.WARNING, logger="models.engine.resume"):
        point = resumed.find_resume_point()
    assert (point.path, point.iteration, point.seed) == (str(tmp_path / "model_0000001.pth"), 1, 42)
    assert not marker.exists()
    assert caplog.text.count("Cannot resume from") == 2
    assert "previous good checkpoint" in caplog.text and "skipping model_0000005.pth, model_0000003.pth" in caplog.text
    assert resumed.load(point.path) == {"iteration": 1, "seed": 42}
    assert all(torch.equal(resumed_model.state_dict()[k], v) for k, v in saved.items())


def test_no_checkpoint_is_a_new_run_but_unreadable_ones_are_never_overwritten(tmp_path):
    checkpointer, _ = _checkpointer(tmp_path)
    assert checkpointer.find_resume_point() is None
    (tmp_path / "model_0000001.pth").write_bytes(b"not a checkpoint")
    torch.save({"model": {}}, tmp_path / "model_final.pth")  # weights, but no training state
    with pytest.raises(NoReadableCheckpoint, match=r"none of the 2 checkpoint\(s\) .* refusing to start from scratch"):
        checkpointer.find_resume_point()


@pytest.mark.parametrize("content", [b"\xff\xfe not text", b"", b"\n"], ids=["not_utf8", "empty", "blank"])
def test_an_unreadable_last_checkpoint_file_falls_back_to_the_newest_checkpoint(tmp_path, caplog, content):
    checkpointer, _ = _checkpointer(tmp_path, seed=7)
    checkpointer.save("model_0000003", iteration=3)
    (tmp_path / "last_checkpoint").write_bytes(content)
    with caplog.at_level(logging.WARNING):
        point = checkpointer.find_resume_point()
    assert (point.path, point.iteration) == (str(tmp_path / "model_0000003.pth"), 3)
    assert "last_checkpoint" in caplog.text and "ignored, resuming from the newest model_*.pth" in caplog.text


def test_partial_saves_are_removed(tmp_path):
    (tmp_path / ".model_0000005.pth.abc.tmp").write_bytes(b"PK")
    (tmp_path / "model_0000003.pth").write_bytes(b"kept")
    assert remove_partial_checkpoints(str(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model_0000003.pth"]


class _Trainer:
    def __init__(self, storage):
        self.storage = storage


def test_metric_history_gives_a_resumed_run_the_same_smoothed_values():
    with EventStorage(0) as uninterrupted:
        for it in range(30):
            uninterrupted.iter = it
            uninterrupted.put_scalar("loss", float((it * 7) % 11))
        hook = MetricHistory(window=20)
        hook.trainer = _Trainer(uninterrupted)
        state = hook.state_dict()
    assert [i for _, i in state["loss"]] == list(range(10, 30))

    with EventStorage(30) as resumed:
        hook = MetricHistory(window=20)
        hook.trainer = _Trainer(resumed)
        hook.load_state_dict(state)
        hook.before_train()
        assert resumed.history("loss").median(20) == uninterrupted.history("loss").median(20)
        assert resumed.history("loss").latest() == uninterrupted.history("loss").latest()


def test_metrics_after_the_checkpoint_and_a_cut_line_are_dropped(tmp_path):
    lines = [json.dumps({"iteration": i, "loss": i / 10}) for i in range(6)] + ['{"iteration": 6, "lo']
    (tmp_path / "metrics.json").write_text("\n".join(lines))
    assert drop_metrics_after(str(tmp_path), 3) == 3
    assert (tmp_path / "metrics.json").read_text().splitlines() == lines[:4]
    assert drop_metrics_after(str(tmp_path / "absent"), 3) == 0


def _flip_tensor_bytes(path, count=16):
    """Flip ``count`` bytes in the middle of the largest tensor record of a torch zip checkpoint."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = (int.from_bytes(raw[info.header_offset + k:info.header_offset + k + 2], "little")
                                 for k in (26, 28))
    start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    for k in range(start, start + count):
        raw[k] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_bit_flipped_checkpoint_is_skipped_on_resume_and_refused_as_weights(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    checkpointer = ResumableCheckpointer(model, str(tmp_path), seed=7)
    checkpointer.save("model_0000001", iteration=1)
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpointer.save("model_0000003", iteration=3)
    newest = tmp_path / "model_0000003.pth"
    _flip_tensor_bytes(newest)
    # Without the checksum the damage would pass: the file still reads, with one tensor changed.
    damaged = torch.load(newest, weights_only=True)
    assert not torch.equal(damaged["model"]["weight"], model.weight)

    with caplog.at_level(logging.WARNING, logger="models.engine.resume"):
        point = ResumableCheckpointer(nn.Linear(64, 64), str(tmp_path)).find_resume_point()
    assert (point.iteration, point.seed) == (1, 7)
    assert "do not match the checksum written with them" in caplog.text and "skipping model_0000003.pth" in caplog.text
    with pytest.raises(ValueError, match=r"model_0000003.pth: its contents do not match the checksum"):
        ResumableCheckpointer(nn.Linear(64, 64)).load(str(newest))  # --eval-only, train.init_checkpoint


def test_checkpoints_without_a_checksum_still_load_and_a_model_that_is_not_a_dict_is_named(tmp_path):
    torch.manual_seed(0)
    source = nn.Linear(3, 2)
    torch.save({"model": source.state_dict()}, tmp_path / "released.pth")
    target = nn.Linear(3, 2)
    ResumableCheckpointer(target).load(str(tmp_path / "released.pth"))
    assert torch.equal(target.weight, source.weight)
    for bad in ([1, 2], torch.zeros(3)):
        torch.save({"model": bad}, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match=r"bad.pth: 'model' should map parameter names to tensors, found "):
            ResumableCheckpointer(nn.Linear(3, 2)).load(str(tmp_path / "bad.pth"))


def test_resumed_config_changes_are_errors_or_warnings_key_by_key(caplog):
    from models.config import load_config
    from models.engine.resume import check_resumed_config, flatten_config

    tiny = "configs/test/tiny_mimdet.py"
    saved = flatten_config(load_config(tiny))
    assert saved["optimizer.lr"] == "0.0001" and saved["model.roi_heads.num_classes"] == "80"
    assert saved["dataloader.train.mapper.augmentations.0._target_"].endswith("RandomFlip")
    for change, key in [("model.roi_heads.num_classes=3", "model.roi_heads.num_classes: 80 in the checkpoint, 3 now"),
                        ("optimizer.weight_decay=0.5", "optimizer.weight_decay: 0.1 in the checkpoint, 0.5 now")]:
        with pytest.raises(ValueError, match=key):
            check_resumed_config(saved, flatten_config(load_config(tiny, [change])))
    changes = ["train.max_iter=8", "train.clip_grad_norm=2.0", "train.init_checkpoint=/x.pth", "train.output_dir=/y"]
    with caplog.at_level(logging.WARNING, logger="models.engine.resume"):
        changed = check_resumed_config(saved, flatten_config(load_config(tiny, changes)))
    assert changed == ["train.clip_grad_norm", "train.max_iter"]  # weights' sources and the folder are not read
    assert "train.clip_grad_norm: None -> 2.0" in caplog.text and "train.max_iter: 4 -> 8" in caplog.text
    assert check_resumed_config(None, saved) == []  # a checkpoint of an older version: nothing to compare


def test_non_finite_weights_are_never_written(tmp_path):
    checkpointer, model = _checkpointer(tmp_path)
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"not writing model_0000002.pth: the weights are not finite "
                                                 r"or beyond 1e\+12 \(in bias\)"):
        checkpointer.save("model_0000002", iteration=2)
    assert not list(tmp_path.iterdir())


def test_weights_beyond_any_trained_network_count_as_diverged(tmp_path):
    checkpointer, model = _checkpointer(tmp_path)
    with torch.no_grad():
        model.weight[0, 0] = 2e30  # what optimizer.lr=1e30 makes of a weight in one step
    with pytest.raises(FloatingPointError, match=r"not finite or beyond 1e\+12 \(in weight\)"):
        checkpointer.save("model_0000001", iteration=1)


def test_strict_loading_names_weights_a_checkpoint_lacks(tmp_path):
    from models.checkpoint import SafeDetectionCheckpointer

    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = source.state_dict()
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("1.")}}, tmp_path / "partial.pth")
    torch.save({"model": {**state, "1.weight": torch.zeros(5, 4), "1.bias": torch.zeros(5)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"every weight of the model, which would stay random: missing 1\."):
        SafeDetectionCheckpointer(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), strict=True).load(
            str(tmp_path / "partial.pth"))
    with pytest.raises(ValueError, match=r"2 entries differ in shape: 1.weight: checkpoint \(5, 4\) vs model"):
        SafeDetectionCheckpointer(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), strict=True).load(
            str(tmp_path / "other.pth"))
    SafeDetectionCheckpointer(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))).load(str(tmp_path / "partial.pth"))


def test_changed_class_names_cannot_resume():
    from models.engine.resume import check_resumed_config

    with pytest.raises(ValueError, match=r"classes: \['red', 'green'\] in the checkpoint, \['green', 'red'\] now"):
        check_resumed_config({"classes": "['red', 'green']"}, {"classes": "['green', 'red']"})


def test_a_last_checkpoint_outside_the_folder_is_ignored(tmp_path, caplog):
    other, _ = _checkpointer(tmp_path / "other")
    other.save("model_0000009", iteration=9)
    checkpointer, _ = _checkpointer(tmp_path / "run")
    checkpointer.save("model_0000001", iteration=1)
    (tmp_path / "run" / "last_checkpoint").write_text(str(tmp_path / "other" / "model_0000009.pth"))
    with caplog.at_level(logging.WARNING, logger="models.engine.resume"):
        point = _checkpointer(tmp_path / "run")[0].find_resume_point()
    assert point.iteration == 1 and "outside" in caplog.text and "ignored" in caplog.text


def test_a_folder_with_a_checkpoints_name_is_refused(tmp_path):
    checkpointer, _ = _checkpointer(tmp_path, seed=7)
    checkpointer.save("model_0000003", iteration=3)
    (tmp_path / "model_final.pth").mkdir()
    with pytest.raises(ValueError, match=r"model_final\.pth is a folder, where the run writes a checkpoint file"):
        checkpointer.find_resume_point()


def test_a_checkpoint_without_the_optimizer_state_resumes_with_a_warning(tmp_path, caplog):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    ResumableCheckpointer(model, str(tmp_path), seed=7).save("model_0000003", iteration=3)  # weights only
    checkpointer = ResumableCheckpointer(model, str(tmp_path), seed=7, optimizer=optimizer)
    with caplog.at_level(logging.WARNING):
        point = checkpointer.find_resume_point()
    assert point.iteration == 3
    assert "model_0000003.pth holds no optimizer state: it starts afresh" in caplog.text
