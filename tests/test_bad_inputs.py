"""Bad input to lazyconfig_train_net.py: each a clear error naming the value (or, for images
that vanish mid-training, a counted warning), checked through the launcher's own functions.

Elsewhere: ``--resume`` with no checkpoint (test_crash_resume.py), unreadable checkpoints and
pickles that would run code (test_resume.py, test_checkpoint.py), degenerate annotations
(test_data.py), the unknown override key through a real launch (test_launcher.py).
"""
import itertools
import logging

import pytest
import torch
from detectron2.config import instantiate

import lazyconfig_train_net as launcher
from models.checkpoint import SafeDetectionCheckpointer
from models.config import load_config
from models.engine import loops

TINY = "configs/test/tiny_mimdet.py"


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_coco_writer, dataset_overrides):
    root = tmp_path_factory.mktemp("toy_bad")
    json_file = toy_coco_writer(root)
    return root, [
        *dataset_overrides("toy_bad", json_file, root / "images"),
        f"train.output_dir={root / 'out'}",
    ]


@pytest.mark.parametrize("argv, error, message", [
    (["--config-file", "configs/no_such_config.py"], FileNotFoundError,
     r"config file not found: 'configs/no_such_config.py'"),
    (["--config-file", "configs/demo"], FileNotFoundError,
     r"config file 'configs/demo' is a folder; give one of its .py files, e.g. configs/demo/mimdet_shapes.py"),
    (["--config-file", TINY, "train.max_iter=3", "--resume"], ValueError,
     r"'--resume' comes after the key=value overrides, which take every word after them; put options before"),
    (["--config-file", TINY, "train.max_iters=3"], KeyError, r"unknown config key 'train.max_iters'"),
    (["--config-file", TINY, "train.max_iter=three"], ValueError, r"train.max_iter is int \(4\), got 'three'"),
    (["--config-file", TINY, "--num-gpus", "2"], SystemExit,
     r"--num-gpus 2 asked for, but this machine has no CUDA GPU.* --num-cpu-processes 2"),
    (["--config-file", TINY, "--num-cpu-processes", "-1"], SystemExit, r"--num-cpu-processes must be >= 0, got -1"),
])
def test_command_line_errors_come_before_any_process_starts(argv, error, message):
    if error is SystemExit and "--num-gpus" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(error, match=message):
        launcher.cli(argv)


@pytest.mark.parametrize("override, message", [
    ("datasets.register=[{name:gone,json_file:'/nonexistent/gone.json',image_root:'/tmp'}]",
     r"dataset 'gone': json_file /nonexistent/gone.json does not exist"),
    ("datasets.register=[{name:gone,json_file:'" + __file__ + "',image_root:'/nonexistent/images'}]",
     r"dataset 'gone': image_root /nonexistent/images is not a folder"),
])
def test_missing_dataset_files_are_named(override, message):
    cfg = load_config(TINY, [override, "dataloader.train.dataset.names=gone"])
    with pytest.raises(FileNotFoundError, match=message):
        loops.prepare(cfg)


def test_sample_ratio_out_of_range_is_named(toy):
    cfg = load_config(TINY, [*toy[1], "model.backbone.bottom_up.sample_ratio=1.5"])
    with pytest.raises(ValueError, match=r"sample_ratio must be a number in \(0, 1\], got 1\.5"):
        loops.build_model(cfg)


def test_fp16_on_cpu_is_named(toy):
    cfg = load_config(TINY, [*toy[1], "train.amp.enabled=True", "train.amp.dtype=fp16", "train.device=cpu"])
    with pytest.raises(ValueError, match=r"train.amp.dtype='fp16' needs CUDA; on cpu leave it None \(bf16 where"):
        loops.prepare(cfg)


def test_checkpoint_of_another_architecture_is_refused(toy, tmp_path):
    cfg = load_config(TINY, toy[1])
    model = instantiate(cfg.model)
    wider = instantiate(load_config(TINY, [*toy[1], "model.backbone.bottom_up.embed_dim=64"]).model)
    torch.save({"model": wider.state_dict()}, tmp_path / "wider.pth")
    with pytest.raises(ValueError, match=r"wider\.pth: checkpoint is for another architecture: \d+ entries differ in "
                                         r"shape: backbone\."
                                         r"fpn_lateral2\.weight: checkpoint \(64, 16, 1, 1\) vs model \(64, 24"):
        SafeDetectionCheckpointer(model).load(str(tmp_path / "wider.pth"))
    mae_like = {k.replace("backbone.bottom_up.encoder.", ""): v for k, v in model.state_dict().items()
                if k.startswith("backbone.bottom_up.encoder.blocks.")}
    torch.save({"model": mae_like}, tmp_path / "mae_like.pth")
    with pytest.raises(ValueError, match=r"mae_like\.pth: checkpoint is for another architecture \(an MAE checkpoint "
                                         r"goes to mae_checkpoint.path\): "
                                         r"it has 0% of the model's values"):
        SafeDetectionCheckpointer(model).load(str(tmp_path / "mae_like.pth"))
    fewer_classes = load_config(TINY, [*toy[1], "model.roi_heads.num_classes=5"]).model
    torch.save({"model": instantiate(fewer_classes).state_dict()}, tmp_path / "other_classes.pth")
    SafeDetectionCheckpointer(model).load(str(tmp_path / "other_classes.pth"))  # fine-tuning: predictors differ


def test_images_that_vanish_or_break_mid_training_are_skipped_and_counted_or_stop(toy, caplog):
    root, overrides = toy
    cfg = load_config(TINY, [*overrides, "dataloader.train.aspect_ratio_grouping=False",
                                      "dataloader.train.total_batch_size=4"])
    loops.prepare(cfg)
    loader = loops.build_train_loader(cfg, seed=0, start_iter=0)
    (root / "images" / "002.png").unlink()  # the records are read: the files go after
    (root / "images" / "005.png").write_bytes(b"\x89PNG but not really")
    with caplog.at_level(logging.WARNING, logger="models.data.resumable"):
        batches = list(itertools.islice(iter(loader), 2))  # one epoch: the 8 images
    assert sorted(len(b) for b in batches) == [2, 4] or sorted(len(b) for b in batches) == [3, 3]
    assert sorted(x["image_id"] for b in batches for x in b) == [1, 3, 4, 6, 7, 8]
    assert "Skipping unusable training image" in caplog.text and "002.png" in caplog.text
    assert "005.png" in caplog.text and "(2 skipped by this loader process)" in caplog.text

    strict = load_config(TINY, [*overrides, "dataloader.train.skip_unreadable=False"])
    with pytest.raises(OSError, match=r"00[25]\.png"):
        list(itertools.islice(iter(loops.build_train_loader(strict, seed=0, start_iter=0)), 4))


COCO_CONFIGS = {  # config -> the MAE file its error names
    "configs/mimdet/mimdet_vit_base_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x.py": "mae_pretrain_vit_base_full.pth",
    "configs/mimdet/mimdet_vit_large_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x.py": "mae_pretrain_vit_large_full.pth",
    "configs/benchmarking/benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mae.py": "mae_pretrain_vit_base.pth",
}


@pytest.mark.parametrize("config", list(COCO_CONFIGS), ids=["vit_b", "vit_l", "benchmarking"])
def test_training_a_seed_config_without_mae_weights_is_an_error(config):
    needs = COCO_CONFIGS[config].replace(".", r"\.")
    with pytest.raises(ValueError, match=rf"mae_checkpoint.path is not set: .*{needs}.*mae_checkpoint.path=scratch"):
        launcher.cli(["--config-file", config])


def _check(config, *argv):
    args = launcher.build_parser().parse_args(["--config-file", config, *argv])
    cfg = load_config(config, args.opts)
    loops.check_start_weights(cfg, config, resume=args.resume, eval_only=args.eval_only)


def test_the_mae_check_lets_other_starts_through_and_checks_files_first(tmp_path):
    config = next(iter(COCO_CONFIGS))
    weights, out = tmp_path / "weights.pth", tmp_path / "out"
    weights.write_bytes(b"")  # only its existence is checked before the run
    for argv in (["mae_checkpoint.path=scratch"], [f"mae_checkpoint.path={weights}"],
                 [f"train.init_checkpoint={weights}"], ["--eval-only", f"train.init_checkpoint={weights}"]):
        _check(config, *argv)  # no error
    out.mkdir()
    with pytest.raises(ValueError, match=r"mae_checkpoint.path is not set \(--resume found no checkpoint in .*out\)"):
        _check(config, "--resume", f"train.output_dir={out}")  # a fresh folder: --resume would start from scratch
    (out / "model_0000099.pth").write_bytes(b"")
    _check(config, "--resume", f"train.output_dir={out}")  # continues from it: no MAE file needed
    cases = {
        "--eval-only evaluates train.init_checkpoint, which is not set": ["--eval-only"],
        r"train.init_checkpoint=/no/model\.pth: no such file": ["train.init_checkpoint=/no/model.pth"],
        r"mae_checkpoint.path=/no/mae\.pth: no such file$": ["mae_checkpoint.path=/no/mae.pth"],
        r"mae_checkpoint.path=Scratch: no such file \(mae_checkpoint.path=scratch trains":
            ["mae_checkpoint.path=Scratch"],
        r"mae_checkpoint.path=.*out: a folder, not a checkpoint file \(its final checkpoint would be .*out/model_final":
            [f"mae_checkpoint.path={out}"],
    }
    for message, argv in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            _check(config, *argv)


@pytest.mark.parametrize("override, key", [("mae_checkpoint=/tmp/mae.pth", "mae_checkpoint.path"),
                                           ("lr_multiplier=3.5", "lr_multiplier.scheduler")])
def test_a_value_for_a_group_of_keys_is_named(override, key):
    with pytest.raises(ValueError, match=rf"is a group of keys .* not a value; did you mean {key}=\.\.\.\?"):
        load_config(TINY, [override])
    assert load_config(TINY, ["dataloader.evaluator=null"]).dataloader.evaluator is None  # turns it off


def test_demo_and_test_configs_start_from_scratch_on_purpose(caplog):
    from models.checkpoint import load_mae_weights

    for config in (TINY, "configs/demo/mimdet_shapes.py"):
        cfg = load_config(config, [])
        assert cfg.mae_checkpoint.path == "scratch"
        loops.check_start_weights(cfg, config)
    with caplog.at_level(logging.INFO, logger="models.checkpoint"):
        assert load_mae_weights(torch.nn.Linear(2, 2), "scratch") is None
    assert "mae_checkpoint.path=scratch: the backbone starts from random weights" in caplog.text


def test_a_test_set_that_cannot_be_evaluated_is_named_before_training(tmp_path, toy_coco_writer):
    import json

    train_json = toy_coco_writer(tmp_path / "train")
    val = json.loads(train_json.read_text())
    val["categories"] = val["categories"][:1]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] == 1]
    (tmp_path / "one_class.json").write_text(json.dumps(val))
    images = tmp_path / "train" / "images"
    register = (f"datasets.register=[{{name:bad_val_train,json_file:'{train_json}',image_root:'{images}'}},"
                f"{{name:bad_val_one,json_file:'{tmp_path}/one_class.json',image_root:'{images}'}}]")
    cfg = load_config(TINY, [register, "dataloader.train.dataset.names=bad_val_train",
                                      "dataloader.test.dataset.names=bad_val_one"])
    with pytest.raises(ValueError, match=r"the test set bad_val_one has classes \['red'\], the training set "
                                         r"bad_val_train \['red', 'blue'\]: they must be the same"):
        loops.prepare(cfg)
    cfg = load_config(TINY, [register, "dataloader.train.dataset.names=bad_val_train",
                                      "dataloader.test.dataset.names=bad_val_train"])
    (tmp_path / "train" / "images" / "003.png").unlink()
    with pytest.raises(ValueError, match=r"dataset 'bad_val_train': evaluation needs every one of its 8 images, "
                                         r"readable and at its annotated size:\n  1 x images that do not exist "
                                         r"\(e\.g\. .*003\.png\)"):
        loops.prepare(cfg)


@pytest.mark.parametrize("override, message", [
    ("train.max_iter=3.5", r"train.max_iter is int \(4\), got 3.5"),
    ("dataloader.train.total_batch_size=2.5", r"dataloader.train.total_batch_size is int \(2\), got 2.5"),
])
def test_a_fraction_for_a_whole_number_is_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, [override])
    assert load_config(TINY, ["optimizer.lr=1"]).optimizer.lr == 1  # a whole number for a float is fine


@pytest.mark.parametrize("max_iter", [0, -5])
def test_training_for_no_iterations_is_an_error(max_iter):
    cfg = load_config(TINY, [f"train.max_iter={max_iter}"])
    with pytest.raises(ValueError, match=rf"train.max_iter must be a whole number >= 1, got {max_iter}"):
        loops.check_start_weights(cfg, TINY)


@pytest.mark.parametrize("override, message", [
    ("=5", r"override '=5' has an empty key"),
    ("train..seed=5", r"override 'train..seed=5' has an empty key"),
    ("train.max_iter=[1,2]", r"train.max_iter is int \(4\), got \[1, 2\]"),
    ("train.channels_last=yes", r"train.channels_last is bool \(False\), got 'yes'"),
])
def test_overrides_without_a_key_or_with_a_list_for_a_number_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, [override])


@pytest.mark.parametrize("override, message", [
    ("train.checkpointer.period=0", r"train.checkpointer.period must be a whole number >= 1, got 0"),
    ("train.log_period=0", r"train.log_period must be a whole number >= 1, got 0"),
    ("train.eval_period=-1", r"train.eval_period must be a whole number >= 0, got -1"),
    ("train.clip_grad_norm=abc", r"train.clip_grad_norm must be null or a positive number, got 'abc'"),
    ("train.clip_grad_norm=-1.0", r"train.clip_grad_norm must be null or a positive number, got -1.0"),
    ("datasets.register=abc", r"datasets.register must be a list of dict\(name=, json_file=, image_root=\), got 'abc'"),
    ("train.output_dir=null", r"train.output_dir must be a folder path, got None"),
    # checked with autocast off too (the tiny config's): a resumed run could turn it on
    ("train.amp.dtype=bogus", r"train.amp.dtype must be one of \['bf16'.* or None, got 'bogus' \(fp32: "),
    ("train.amp.dtype=fp16", r"train.amp.dtype='fp16' needs CUDA"),
    ("train.checkpointer.max_to_keep=0", r"train.checkpointer.max_to_keep must be null or a whole number >= 1"),
    ("dataloader.train.total_batch_size=0", r"dataloader.train.total_batch_size must be a whole number >= 1, got 0"),
    ("optimizer=null", r"optimizer is missing or null; the launcher builds the run from it"),
    ("optimizer.lr=null", r"optimizer.lr must be a positive number, got None"),
    ("optimizer.lr=0", r"optimizer.lr must be a positive number, got 0"),
    ("optimizer.lr=nan", r"optimizer.lr must be a positive number, got nan"),
    ("optimizer.weight_decay=-0.1", r"optimizer.weight_decay must be a number >= 0, got -0.1"),
    ("lr_multiplier=null", r"lr_multiplier is missing or null"),
    ("model.backbone.bottom_up=null", r"model.backbone.bottom_up is null"),
    ("mae_checkpoint=null", r"mae_checkpoint is null; to train from random weights set mae_checkpoint.path=scratch"),
    # refused by the model's constructors, found by building it on the meta device
    ("model.backbone.bottom_up.sample_ratio=1.5",
     r"model.backbone.bottom_up.sample_ratio must be a number in \(0, 1\], got 1.5"),
    ("model.backbone.bottom_up.eval_sample_ratio=0",
     r"model.backbone.bottom_up.eval_sample_ratio must be a number in \(0, 1\], got 0"),
    ("model.backbone.bottom_up.fill_mode=zeros", r"model.backbone.bottom_up.fill_mode must be one of .*, got 'zeros'"),
    ("model.roi_heads.foo=1", r"model.roi_heads.foo: .*got an unexpected keyword argument 'foo'"),
    ("model.backbone.bottom_up.embed_dim=100", r"model: ConvStem needs embed_dim divisible by 8"),
])
def test_config_values_the_launcher_cannot_use_are_named_before_any_work(override, message):
    cfg = load_config(TINY, [override])
    with pytest.raises(ValueError, match=message):
        launcher.cli(["--config-file", TINY, override])
    with pytest.raises(ValueError, match=message):
        loops.check_start_weights(cfg, TINY, eval_only=True)


def test_channels_last_set_to_a_string_in_a_config_file_is_named():
    cfg = load_config(TINY)
    cfg.train.channels_last = "yes"
    with pytest.raises(ValueError, match="train.channels_last must be true or false, got 'yes'"):
        loops.check_start_weights(cfg, TINY)


def test_all_problems_of_a_config_are_listed_together():
    cfg = load_config(TINY, ["train.log_period=0", "train.checkpointer.period=0", "train.clip_grad_norm=abc"])
    with pytest.raises(ValueError) as error:
        loops.check_start_weights(cfg, TINY)
    assert str(error.value).count("\n  ") == 3
