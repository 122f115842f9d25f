"""The launcher's work, as a library: fit a config to the machine and its data, check what a
run will start from, build the model, train with detectron2's hooks (resuming exactly), and
evaluate. ``lazyconfig_train_net.py`` parses arguments and calls these.
"""
import contextlib
import copy
import inspect
import json
import logging
import math
import os
import re
from typing import List, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf

from ..checkpoint import SCRATCH, load_mae_weights, write_atomic
from ..data.datasets import (category_ids, check_dataset_files, check_image_sizes, register_coco_datasets,
                             thing_classes, validate_coco_json)
from . import trainer as amp_support
from .trainer import MixedPrecisionTrainer, resolve_amp_dtype
from ..data.resumable import StepSeeds, build_resumable_train_loader, derive_seed
from .resume import (MetricHistory, ResumableCheckpointer, check_resumed_config, drop_metrics_after, flatten_config,
                     remove_partial_checkpoints)
from .run_folder import previous_run_files
from .sync_norm import sync_batchnorm_for_cpu


logger = logging.getLogger("detectron2")

# Set once this process starts its first training step or evaluation: an error before then is
# a refused input (a config value, a dataset, a checkpoint), which the launcher reports in one
# line; one after it may be a fault of the code, reported with its traceback.
_work_started = False


def work_started() -> bool:
    """Whether this process has begun training or evaluating (see :func:`do_train`, :func:`do_test`)."""
    return _work_started


def _start_work() -> None:
    global _work_started
    _work_started = True


DIVERGED = "DIVERGED.json"  # written into train.output_dir when a run stops on a non-finite loss


def check_not_diverged(output_dir: str) -> None:
    """Refuse to ``--resume`` a run that stopped on a non-finite loss: its newest checkpoint may
    hold diverging weights, and resuming would repeat the same steps from them."""
    path = os.path.join(output_dir, DIVERGED)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        record = json.load(f)
    raise RuntimeError(
        f"--resume: the run in {output_dir} stopped at iteration {record.get('iteration')} with a non-finite loss "
        f"({record.get('error')}). Its newest checkpoint may hold diverging weights, and resuming would repeat the "
        f"same steps. Start a new run from an earlier checkpoint with other settings (train.init_checkpoint="
        f"{output_dir}/model_<iteration>.pth and another train.output_dir), or delete {path} to resume anyway.")


def has_checkpoint(output_dir: str) -> bool:
    """Whether ``output_dir`` holds a checkpoint that ``--resume`` would continue from."""
    return os.path.isdir(output_dir) and any(
        name.startswith("model_") and name.endswith(".pth") for name in os.listdir(output_dir))


def periodic_checkpoints(output_dir: str, last_iteration: int) -> List[str]:
    """The periodic checkpoints ``model_<iteration>.pth`` in ``output_dir`` up to
    ``last_iteration``, oldest first: those a resumed run counts towards ``max_to_keep``."""
    found = []
    for name in os.listdir(output_dir):
        stem = name[len("model_"):-len(".pth")] if name.startswith("model_") and name.endswith(".pth") else ""
        if stem.isdigit() and int(stem) <= last_iteration:
            found.append((int(stem), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


# Parts of a config the launcher builds from: none of them may be null. A detector also needs
# model.backbone; an evaluator needs dataloader.test (MAE pre-training has neither).
_REQUIRED_GROUPS = ("model", "optimizer", "lr_multiplier", "dataloader", "dataloader.train", "train", "train.amp",
                    "train.checkpointer", "train.ddp")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_train_config(cfg) -> None:
    """Refuse, naming the key, values the launcher cannot use: they would otherwise fail with a
    TypeError or ZeroDivisionError somewhere inside a run, or be ignored."""
    required = list(_REQUIRED_GROUPS)
    if "backbone" in cfg.get("model", {}):
        required.append("model.backbone")
    if "dataloader" in cfg and cfg.dataloader.get("evaluator", None) is not None:
        required.append("dataloader.test")
    for key in required:
        if OmegaConf.select(cfg, key, default=None) is None:
            raise ValueError(f"{key} is missing or null; the launcher builds the run from it")
    if "backbone" in cfg.model and "bottom_up" in cfg.model.backbone and cfg.model.backbone.bottom_up is None:
        raise ValueError("model.backbone.bottom_up is null; the launcher builds the run from it")
    if "mae_checkpoint" in cfg and cfg.mae_checkpoint is None:
        raise ValueError("mae_checkpoint is null; to train from random weights set mae_checkpoint.path=scratch")
    train = cfg.train
    problems = []
    for key, low in (("max_iter", 1), ("log_period", 1), ("eval_period", 0)):
        value = train.get(key, None)
        if not _whole(value) or value < low:
            problems.append(f"train.{key} must be a whole number >= {low}, got {value!r}")
    period = train.checkpointer.get("period", None)
    if not _whole(period) or period < 1:
        problems.append(f"train.checkpointer.period must be a whole number >= 1, got {period!r}")
    keep = train.checkpointer.get("max_to_keep", None)
    if keep is not None and (not _whole(keep) or keep < 1):
        problems.append(f"train.checkpointer.max_to_keep must be null or a whole number >= 1, got {keep!r}")
    clip = train.get("clip_grad_norm", None)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        problems.append(f"train.clip_grad_norm must be null or a positive number, got {clip!r}")
    amp = train.get("amp", None) or {}
    try:  # checked whether or not autocast is on: a run resumed with it on would fail later
        cuda = str(train.get("device", "cpu")).startswith("cuda") and torch.cuda.is_available()
        resolve_amp_dtype(True, amp.get("dtype", None), "cuda" if cuda else "cpu")
    except ValueError as e:
        problems.append(str(e))
    if not isinstance(train.get("channels_last", False), bool):
        problems.append(f"train.channels_last must be true or false, got {train.get('channels_last')!r}")
    if not _whole(train.get("seed", -1)):
        problems.append(f"train.seed must be a whole number (-1: random), got {train.get('seed')!r}")
    if not isinstance(train.get("output_dir", None), str) or not train.output_dir.strip():
        problems.append(f"train.output_dir must be a folder path, got {train.get('output_dir', None)!r}")
    lr, decay = cfg.optimizer.get("lr", 1.0), cfg.optimizer.get("weight_decay", 0.0)
    lazy = OmegaConf.is_dict(lr) and "_target_" in lr  # computed when the optimizer is built (MAE's scaled lr)
    if not lazy and not (_number(lr) and lr > 0):  # null passes the optimizer's constructor, fails in its step
        problems.append(f"optimizer.lr must be a positive number, got {lr!r}")
    if not (_number(decay) and decay >= 0):
        problems.append(f"optimizer.weight_decay must be a number >= 0, got {decay!r}")
    batch = cfg.dataloader.train.get("total_batch_size", None)
    if batch is not None and (not _whole(batch) or batch < 1):
        problems.append(f"dataloader.train.total_batch_size must be a whole number >= 1, got {batch!r}")
    register = cfg.get("datasets", {}).get("register", []) if cfg.get("datasets", None) is not None else []
    if register is not None and not (OmegaConf.is_list(register) or isinstance(register, (list, tuple))):
        problems.append(f"datasets.register must be a list of dict(name=, json_file=, image_root=), got {register!r}")
    problems += check_model_arguments(cfg.model)
    if problems:
        raise ValueError("config values the launcher cannot use:\n  " + "\n  ".join(problems))


def check_model_arguments(model_cfg) -> List[str]:
    """What the model's constructors refuse (``sample_ratio=0``, an unknown ``fill_mode``, a width
    the conv stem cannot split), found by building the model on PyTorch's meta device: no memory,
    no weights, 0.05 s for ViT-L. Named here, before any process starts, instead of as a traceback
    from inside the run. A model that cannot be built without data is left to the run."""
    # detectron2's instantiate logs "Error when instantiating ..." before re-raising: the error
    # named here says more, so that line is held back while the model is built.
    instantiate_logger = logging.getLogger("detectron2.config.instantiate")
    level = instantiate_logger.level
    instantiate_logger.setLevel(logging.CRITICAL)
    try:
        with torch.device("meta"):
            instantiate(model_cfg)
    except (ValueError, TypeError) as e:
        try:
            return [_name_the_key(model_cfg, str(e))]
        except Exception:  # noqa: BLE001  (a config whose values cannot all be read: the message alone)
            return [f"model: {e}"]
    except (NotImplementedError, RuntimeError):
        pass
    finally:
        instantiate_logger.setLevel(level)
    return []


def _key_paths(node, prefix: str = ""):
    """Every key path under a config node ("backbone.bottom_up.sample_ratio", ...)."""
    if OmegaConf.is_dict(node) or isinstance(node, dict):
        items = node.items()
    elif OmegaConf.is_list(node) or isinstance(node, (list, tuple)):
        items = enumerate(node)
    else:
        return
    for key, value in items:
        if key != "_target_":
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from _key_paths(value, path)


def _name_the_key(model_cfg, message: str) -> str:
    """A constructor's message with the config key it is about: "sample_ratio must be ..." ->
    "model.backbone.bottom_up.sample_ratio must be ...", and "... unexpected keyword argument
    'foo'" -> "model.roi_heads.foo: ...", where exactly one key of the model has that name."""
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", message)
    leading = re.match(r"(\w+) ", message)
    name = unexpected.group(1) if unexpected else leading.group(1) if leading else None
    paths = [path for path in _key_paths(model_cfg) if path.rsplit(".", 1)[-1] == name] if name else []
    if len(paths) != 1:
        return f"model: {message}"
    if unexpected:
        return f"model.{paths[0]}: {message}"
    return f"model.{paths[0]}{message[len(name):]}"


def check_start_weights(cfg, config_file: str, resume: bool = False, eval_only: bool = False) -> None:
    """Refuse, before any work, to start from weights that are missing or not the intended ones.

    The COCO configs reach the paper's numbers only from MAE weights; a run that forgets
    ``mae_checkpoint.path`` would spend days of GPU time in vain. So training with it unset is
    an error naming the file the config needs, unless other weights are loaded (``--resume``
    with a checkpoint in ``train.output_dir``, ``train.init_checkpoint``).
    ``mae_checkpoint.path=scratch`` starts from random weights on purpose. ``--eval-only``
    needs ``train.init_checkpoint``; files that will be read must exist.
    """
    check_train_config(cfg)
    init = cfg.train.get("init_checkpoint", "") or ""
    if eval_only:
        if cfg.dataloader.get("evaluator", None) is None:
            raise ValueError(f"--eval-only: {config_file} has no dataloader.evaluator, nothing to evaluate "
                             "(MAE pre-training logs its loss while training; tools/mae_reconstruct.py draws what "
                             "a checkpoint reconstructs)")
        if not init:
            raise ValueError("--eval-only evaluates train.init_checkpoint, which is not set: "
                             "pass train.init_checkpoint=/path/to/model.pth")
    elif resume and has_checkpoint(cfg.train.output_dir):
        check_not_diverged(cfg.train.output_dir)
        return  # the checkpoint's weights are loaded; MAE and init weights are not read
    if init and not os.path.isfile(init):
        raise FileNotFoundError(f"train.init_checkpoint={init}: {_not_a_file(init)}")
    mae = cfg.get("mae_checkpoint", None)
    if eval_only or mae is None:
        return
    path = mae.get("path", None)
    if path == SCRATCH or (not path and init):
        return
    if not path:
        needs = mae.get("needs", None) or "an MAE pre-training checkpoint"
        again = f" (--resume found no checkpoint in {cfg.train.output_dir})" if resume else ""
        raise ValueError(
            f"mae_checkpoint.path is not set{again}: {config_file} trains from {needs}. Pass "
            f"mae_checkpoint.path=/path/to/it, or mae_checkpoint.path={SCRATCH} to train from random weights "
            f"on purpose (far below the paper's AP).")
    if not os.path.isfile(str(path)):
        hint = f" (mae_checkpoint.path={SCRATCH} trains from random weights)" if str(path).lower() in (
            SCRATCH, "none", "null") else ""
        raise FileNotFoundError(f"mae_checkpoint.path={path}: {_not_a_file(str(path))}{hint}")


def _not_a_file(path: str) -> str:
    """Why ``path`` is not a checkpoint file, naming the run's final checkpoint for a run folder."""
    if os.path.isdir(path):
        final = os.path.join(path, "model_final.pth")
        return f"a folder, not a checkpoint file (its final checkpoint would be {final})"
    return "no such file"


def check_classes(extra: dict, cfg) -> None:
    """With ``--eval-only``: the checkpoint's classes (kept by this project's checkpoints) must
    be the test set's, or its classifier's outputs would be reported under other names."""
    trained = (extra.get("config") or {}).get("classes")
    names = cfg.dataloader.test.dataset.names
    if trained is not None and trained != repr(thing_classes(names)):
        raise ValueError(f"the checkpoint was trained on the classes {trained}, the test set {names} has "
                         f"{thing_classes(names)}: its predictions would be scored under other names")


def amp_dtype(cfg, evaluation: bool = False) -> Optional[torch.dtype]:
    """The autocast dtype of training (or of evaluation), None for fp32."""
    enabled = cfg.train.amp.enabled
    if evaluation and cfg.train.amp.get("eval", None) is not None:
        enabled = cfg.train.amp.eval
    return resolve_amp_dtype(enabled, cfg.train.amp.get("dtype", None), torch.device(cfg.train.device).type)


def prepare(cfg, eval_only: bool = False, overrides: Sequence[str] = ()) -> None:
    """Fit the config to this machine and to its datasets (call after :func:`setup_run`).

    Checks the AMP settings and that the datasets' files exist; the number of classes
    follows the training set (the test set with ``eval_only``), with a warning where
    ``overrides`` (the command line's key=value list) asked for another number.
    """
    if not torch.cuda.is_available() and cfg.train.device != "cpu":
        logger.info("CUDA is not available: running on CPU (train.device=cpu).")
        cfg.train.device = "cpu"
    cfg.train.amp.dtype = amp_support.unset_as_none(cfg.train.amp.get("dtype", None))
    precision = [str(amp_dtype(cfg, evaluation=e) or "fp32").replace("torch.", "") for e in (False, True)]
    if precision != ["fp32", "fp32"]:
        logger.info("Mixed precision (train.amp) on %s: training %s, evaluation %s", cfg.train.device, *precision)
    if torch.device(cfg.train.device).type == "cpu" and not amp_support.cpu_has_native_bf16():
        asked = cfg.train.amp.enabled or cfg.train.amp.get("eval", None)
        if asked and cfg.train.amp.dtype is None:
            logger.warning("train.amp: no native bf16 on this CPU (x86 needs AVX512-BF16 or AMX), where bf16 "
                           "autocast trains slower than fp32: running in fp32 (train.amp.dtype=bf16 "
                           "forces bf16)")
        elif "bfloat16" in precision:
            logger.warning("train.amp.dtype=%s on a CPU without native bf16 (x86 needs AVX512-BF16 "
                           "or AMX): expect it to run slower than fp32, several times with AVX2 only "
                           "(train.amp.dtype=None picks fp32 here)", cfg.train.amp.dtype)
    splits = check_data_files(cfg, eval_only)
    validated = {}  # each json once, with the test set's stricter checks where it serves both
    for split in reversed(splits):
        if split == "train" and not is_detector(cfg):
            continue  # pre-training reads the images only, not the annotations
        for name in dataset_names(cfg, split):
            json_file = MetadataCatalog.get(name).get("json_file", None)
            if json_file and name not in validated:
                digest = validate_coco_json(name, json_file, for_evaluation=split == "test")
                MetadataCatalog.get(name).set(json_sha256=digest)
                validated[name] = split
    roi_heads = cfg.model.get("roi_heads", None)
    if roi_heads is not None and "num_classes" in roi_heads:
        names = cfg.dataloader["test" if eval_only else "train"].dataset.names
        classes = thing_classes(names)
        if len(classes) != roi_heads.num_classes:
            asked = any(item.split("=", 1)[0].strip().lstrip("+") == "model.roi_heads.num_classes"
                        for item in overrides)  # "+key=" and "++key=" set it too
            if asked:
                logger.warning(
                    "model.roi_heads.num_classes=%s on the command line is replaced by %d: a detector's "
                    "classes are those of its %s set's json (%s: %s)", roi_heads.num_classes, len(classes),
                    "test" if eval_only else "training", names, ", ".join(map(str, classes)),
                )
            else:
                logger.info(
                    "Dataset %s has %d classes: model.roi_heads.num_classes %d -> %d",
                    names, len(classes), roi_heads.num_classes, len(classes),
                )
            roi_heads.num_classes = len(classes)
    if cfg.dataloader.get("evaluator", None) is not None:  # detectron2's EvalHook also evaluates at the end
        check_test_set(cfg, eval_only)


def check_data_files(cfg, eval_only: bool = False) -> List[str]:
    """Register ``datasets.register`` and check that the json and image folder of every dataset
    the run reads exist (the launcher calls it before starting any process); return the splits
    that read registered datasets."""
    register_coco_datasets(cfg.get("datasets", {}).get("register", []) or [])
    splits = ["test"] if eval_only else ["train", "test"]
    splits = [split for split in splits if dataset_names(cfg, split)]
    for split in splits:
        check_dataset_files(cfg.dataloader[split].dataset.names)
    return splits


def save_config(cfg, path: str) -> None:
    """Write ``cfg`` as detectron2's LazyConfig yaml to ``path``, replacing it only once it is
    whole."""
    partial = path + ".partial"
    LazyConfig.save(cfg, partial)
    if os.path.isfile(partial):  # LazyConfig.save logs why, and writes a .pkl beside it, where yaml fails
        os.replace(partial, path)


def dataset_names(cfg, split: str) -> List[str]:
    """The registered datasets ``dataloader.<split>`` reads (none for a missing loader, or one
    that reads only an image folder, as MAE pre-training may)."""
    loader = cfg.dataloader.get(split, None)
    dataset = loader.get("dataset", None) if loader is not None else None
    names = dataset.get("names", None) if dataset is not None else None
    if not names:
        return []
    return [names] if isinstance(names, str) else list(names)


def is_detector(cfg) -> bool:
    """Whether the model has ROI heads whose classes come from the training set."""
    return cfg.model.get("roi_heads", None) is not None


def check_test_set(cfg, eval_only: bool) -> None:
    """Fail before training, not at the first evaluation hours later, if the test set cannot be
    evaluated: its classes differ from the training set's, some of its images are missing,
    unreadable or not the size its json says."""
    test_names = cfg.dataloader.test.dataset.names
    if not eval_only:
        train_classes, test_classes = thing_classes(cfg.dataloader.train.dataset.names), thing_classes(test_names)
        if train_classes != test_classes:
            raise ValueError(f"the test set {test_names} has classes {test_classes}, the training set "
                             f"{cfg.dataloader.train.dataset.names} {train_classes}: they must be the same")
    for name in [test_names] if isinstance(test_names, str) else test_names:
        check_image_sizes(name, DatasetCatalog.get(name))  # also names missing and unreadable images


def do_test(cfg, model, seed: int = 0):
    """Evaluate on ``dataloader.test`` with ``dataloader.evaluator``; print detectron2's tables.

    Runs under autocast if ``train.amp`` says so; random token sampling (eval sample ratio
    < 1) is seeded from ``seed``, so an evaluation gives the same result whenever it runs.
    """
    if cfg.dataloader.get("evaluator", None) is None:
        return {}
    seed_all_rng(derive_seed(seed, 3, comm.get_rank()))
    dtype = amp_dtype(cfg, evaluation=True)
    autocast = torch.autocast(torch.device(cfg.train.device).type, dtype=dtype) if dtype else contextlib.nullcontext()
    loader, evaluator = instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    _start_work()
    with autocast:
        results = inference_on_dataset(model, loader, evaluator)
    if comm.is_main_process():
        print_csv_format(results)
    return results


def build_model(cfg) -> torch.nn.Module:
    """The model on ``train.device`` (channels-last on CPU with ``train.channels_last``); SyncBN made
    gloo-capable for several CPU processes."""
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    logger.info("Parameters: %d", sum(p.numel() for p in model.parameters()))
    model = model.to(cfg.train.device)
    prefer_channels_last(model, cfg, cfg.train.device)
    if cfg.train.device == "cpu" and comm.get_world_size() > 1:
        sync_batchnorm_for_cpu(model)
    return model


def prefer_channels_last(model: torch.nn.Module, cfg, device: str) -> torch.nn.Module:
    """Store the model's 4-d weights channels-last (NHWC), in place, if ``train.channels_last``
    is set and ``device`` is a CPU; otherwise leave it as it is.

    With NCHW weights oneDNN reorders every convolution's input, weight and output to and
    from its NHWC blocked layout; with channels-last weights PyTorch runs the convolution
    channels-last and keeps its output so, and the next convolution needs no reorder. The
    values are the same; the demo's CPU training step takes 135 ms instead of 152 ms.
    """
    if torch.device(device).type == "cpu" and cfg.get("train", {}).get("channels_last", False):
        model.to(memory_format=torch.channels_last)
    return model


def wrap_ddp(cfg, model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel with ``train.ddp`` when there are several processes."""
    kwargs = dict(cfg.train.ddp)
    if cfg.train.device == "cpu":
        kwargs["device_ids"] = None  # DDP of a CPU module
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    if "broadcast_buffers" in kwargs and renamed:
        # PyTorch renamed it and warns on the old name. The new one also copies rank 0's buffers
        # once at the start (as DDP always does with the parameters), which changes nothing here:
        # the buffers (norm statistics, fixed position tables) are the same in every process then.
        kwargs["forward_sync_buffers"] = kwargs.pop("broadcast_buffers")
    return create_ddp_model(model, **kwargs)


def build_train_loader(cfg, seed: int, start_iter: int):
    """``dataloader.train``, starting at ``start_iter`` of the stream that ``seed`` defines."""
    loader = cfg.dataloader.train
    if loader._target_ in (build_resumable_train_loader, "models.data.resumable.build_resumable_train_loader"):
        loader.seed, loader.start_iter = seed, start_iter
    elif start_iter:
        logger.warning("dataloader.train is not build_resumable_train_loader: the resumed run sees other data "
                       "than an uninterrupted one would")
    return instantiate(loader)


def do_train(args, cfg, seed: int) -> None:
    """Train with the hooks of detectron2's lazyconfig_train_net (timer, lr, eval, writers, checkpoint),
    resuming exactly where the last readable checkpoint left off with ``--resume``.

    ``seed``: the run's seed (:func:`setup_run`); a resumed run keeps its checkpoint's. Nothing in
    ``train.output_dir`` changes until the resume point has passed every check; then
    ``config.yaml`` is written.
    """
    settings = flatten_config(cfg)  # kept in every checkpoint, compared on --resume
    if is_detector(cfg):
        settings["classes"] = repr(thing_classes(cfg.dataloader.train.dataset.names))
        ids = category_ids(cfg.dataloader.train.dataset.names)  # so results name the json's ids
        if ids is not None:
            settings["category_ids"] = repr(ids)
    for name in dataset_names(cfg, "train"):  # an edited json changes the data stream
        digest = MetadataCatalog.get(name).get("json_sha256", None)  # set by prepare()
        if digest:
            settings[f"data.{name}.json_sha256"] = digest
    recorded = copy.deepcopy(cfg)  # written as config.yaml once the checks below pass; before the model joins it
    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    model = wrap_ddp(cfg, model)
    checkpointer = ResumableCheckpointer(model, cfg.train.output_dir, config=settings, optimizer=optimizer)
    main = comm.is_main_process()
    resume = checkpointer.find_resume_point() if args.resume else None
    if resume:
        checkpointer.check_fits_model()  # first: a changed architecture is no setting to go on with
        saved = dict(resume.config or {})
        if saved.get("train.seed", "-1") == "-1" and resume.seed is not None:
            saved["train.seed"] = str(resume.seed)  # what a -1 run drew, as its log and config.yaml name it
        if settings.get("train.seed") == "-1" and saved.get("train.seed", "-1") != "-1":  # -1: the run's own
            settings["train.seed"] = saved["train.seed"]
        check_resumed_config(saved, settings)
        if resume.iteration + 1 > cfg.train.max_iter:
            raise ValueError(f"--resume: {resume.path} holds {resume.iteration + 1} iterations, more than "
                             f"train.max_iter={cfg.train.max_iter}; pass train.max_iter={resume.iteration + 1} "
                             "or more")
    if args.resume and resume is None:
        logger.info("--resume: no checkpoint in %s, starting a new run", cfg.train.output_dir)
        if main:  # records of an attempt that never reached a checkpoint are redone
            drop_metrics_after(cfg.train.output_dir, -1)
    if resume and main:  # before the writers open metrics.json
        remove_partial_checkpoints(cfg.train.output_dir)
        drop_metrics_after(cfg.train.output_dir, resume.iteration)
    if resume and resume.seed is not None and resume.seed != seed:
        logger.info("--resume: the run's seed is %d, from its checkpoint", resume.seed)
        seed = resume.seed
    checkpointer.seed = seed
    recorded.train.seed = seed  # a drawn seed too: train.seed=<it> repeats the run
    if main:  # the config as the run uses it: fitted to the machine and data, checked against the checkpoint
        save_config(recorded, os.path.join(cfg.train.output_dir, "config.yaml"))
    # The checkpoint holds the iteration that just finished: continue at the next one.
    start_iter = resume.iteration + 1 if resume else 0

    trainer = MixedPrecisionTrainer(model, build_train_loader(cfg, seed, start_iter), optimizer,
                                    amp_dtype=amp_dtype(cfg), device_type=torch.device(cfg.train.device).type,
                                    clip_grad_norm=cfg.train.get("clip_grad_norm", None))
    checkpointer.add_checkpointable("trainer", trainer)
    periodic = hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None
    if periodic is not None and resume:  # it counts towards max_to_keep only the files it writes itself
        periodic.recent_checkpoints = periodic_checkpoints(cfg.train.output_dir, resume.iteration)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            StepSeeds(seed),
            MetricHistory(),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model, seed)),
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                                 period=cfg.train.log_period) if main else None,
            # Last: a checkpoint is written once its step's evaluation and metrics are written.
            periodic,
        ]
    )
    if resume:
        checkpointer.load(resume.path)
    else:
        if "mae_checkpoint" in cfg:
            load_mae_weights(model, cfg.mae_checkpoint.path)
        checkpointer.load(cfg.train.init_checkpoint, checkpointables=[])
    _start_work()
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except FloatingPointError as e:  # detectron2's and our non-finite checks
        if main:
            record = {"iteration": trainer.iter, "error": str(e).splitlines()[0]}
            write_atomic(os.path.join(cfg.train.output_dir, DIVERGED), lambda f: f.write(json.dumps(record).encode()))
        raise


def environment_info() -> str:
    """detectron2's environment table, without the warning that torch.utils.cpp_extension logs
    when it is first imported on a machine without CUDA ("No CUDA runtime is found"): that import
    happens inside ``collect_env_info``, and on a CPU run the table already says there is no GPU."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        return collect_env_info()
    finally:
        cpp_logger.setLevel(level)


def setup_run(cfg, args) -> int:
    """detectron2's ``default_setup`` (log files in ``train.output_dir``, environment and arguments
    logged, random generators seeded per process), without its copy of the config: the launcher
    writes ``config.yaml`` once the run has passed its checks, so that a refused ``--resume``
    leaves the run's record as it was. Returns the run's seed (:func:`run_seed`): every process
    is seeded with seed + rank, a drawn seed as a given one, so ``train.seed=<the logged seed>``
    repeats a ``train.seed=-1`` run.
    """
    output_dir, rank = cfg.train.output_dir, comm.get_rank()
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank)
    logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    logger.info("Environment info:\n%s", environment_info())
    logger.info("Command line arguments: %s", args)
    with open(args.config_file) as f:
        logger.info("Contents of args.config_file=%s:\n%s", args.config_file, f.read())
    seed = run_seed(cfg.train.get("seed", -1), resume=args.resume)
    seed_all_rng(seed + rank)
    if not args.eval_only:
        torch.backends.cudnn.benchmark = bool(cfg.train.get("cudnn_benchmark", False))
    return seed


def evaluation_folder(output_dir: str) -> str:
    """Where ``--eval-only`` writes its log, ``config.yaml`` and the evaluator's files: ``output_dir``,
    or its ``eval`` subfolder where ``output_dir`` holds a training run, whose config and results
    an evaluation must not replace."""
    if not previous_run_files(output_dir):
        return output_dir
    return os.path.join(output_dir, "eval")


def run_seed(seed: int, resume: bool = False) -> int:
    """``train.seed``, or for -1 a random seed shared by all processes."""
    if seed >= 0:
        return seed
    seed = int(comm.shared_random_seed())
    if resume:
        logger.info("train.seed=-1: drew seed %d, for a new run; a resumed run goes on with its own", seed)
    else:
        logger.info("train.seed=-1: this run's seed is %d (kept in its checkpoints and config.yaml)", seed)
    return seed
