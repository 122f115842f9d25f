#!/usr/bin/env python
"""Train or evaluate a detector described by a LazyConfig python file.

    python lazyconfig_train_net.py --config-file CONFIG --num-gpus N [key=value ...]
    python lazyconfig_train_net.py --config-file CONFIG --num-gpus N --eval-only train.init_checkpoint=MODEL
    python lazyconfig_train_net.py ... --num-machines M --node_rank R --master_addr A --master_port P

The config provides ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``,
``lr_multiplier``, ``train`` (configs/common/train.py), ``mae_checkpoint.path`` (MAE weights
loaded before ``train.init_checkpoint``, which wins) and ``datasets.register`` (extra
COCO-format datasets). Without CUDA it runs in one process on the CPU, without AMP.
"""
import inspect
import logging
from typing import List, Optional

import models  # noqa: F401  (first: makes detectron2 0.6 work on today's stack)
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf

from models.checkpoint import SafeDetectionCheckpointer, load_mae_weights
from models.data import register_coco_datasets, thing_classes

logger = logging.getLogger("detectron2")

_MISSING = object()


def apply_overrides(cfg, overrides: List[str]):
    """``LazyConfig.apply_overrides`` that refuses unknown keys and wrongly typed values.

    A key must exist in the config, or name an argument of the callable its parent node
    builds (``_target_``). A number or bool may not become a string.
    """
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep:
            raise ValueError(f"override '{override}' is not of the form key=value")
        key = key.strip().lstrip("+")
        old = OmegaConf.select(cfg, key, default=_MISSING)
        if old is _MISSING:
            _check_new_key(cfg, key)
        try:
            LazyConfig.apply_overrides(cfg, [override])
        except Exception as e:
            raise ValueError(f"cannot apply override '{override}': {e}") from e
        new = OmegaConf.select(cfg, key)
        if isinstance(old, (bool, int, float)) and old is not None:
            if isinstance(new, str) or isinstance(old, bool) != isinstance(new, bool):
                raise ValueError(
                    f"override '{override}': {key} is {type(old).__name__} ({old!r}), got {new!r}"
                )
    return cfg


def _check_new_key(cfg, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    if OmegaConf.is_dict(parent):
        target = parent.get("_target_", None)
        if callable(target):
            params = inspect.signature(target).parameters
            if leaf in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
                return
        known = sorted(k for k in parent.keys() if k != "_target_")
        raise KeyError(f"unknown config key '{key}': '{parent_key or '<top level>'}' has keys {known}")
    raise KeyError(f"unknown config key '{key}': '{parent_key}' does not exist in the config")


def load_config(config_file: str, overrides: List[str]):
    """Load a LazyConfig file and apply command-line overrides."""
    cfg = LazyConfig.load(config_file)
    return apply_overrides(cfg, overrides)


def prepare(cfg, eval_only: bool = False) -> None:
    """Fit the config to this machine and to its datasets (call after default_setup).

    The number of classes follows the training set (the test set with ``eval_only``).
    """
    if not torch.cuda.is_available() and cfg.train.device != "cpu":
        logger.info("CUDA is not available: running on CPU (train.device=cpu).")
        cfg.train.device = "cpu"
    if cfg.train.device == "cpu" and cfg.train.amp.enabled:
        logger.info("AMP turned off: detectron2's AMPTrainer is CUDA fp16 only (train.amp.enabled=False).")
        cfg.train.amp.enabled = False
    register_coco_datasets(cfg.get("datasets", {}).get("register", []) or [])
    roi_heads = cfg.model.get("roi_heads", None)
    if roi_heads is not None and "num_classes" in roi_heads:
        names = cfg.dataloader["test" if eval_only else "train"].dataset.names
        classes = thing_classes(names)
        if len(classes) != roi_heads.num_classes:
            logger.info(
                "Dataset %s has %d classes: model.roi_heads.num_classes %d -> %d",
                names, len(classes), roi_heads.num_classes, len(classes),
            )
            roi_heads.num_classes = len(classes)


def do_test(cfg, model):
    """Evaluate on ``dataloader.test`` with ``dataloader.evaluator``; print detectron2's tables."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def build_model(cfg) -> torch.nn.Module:
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    logger.info("Parameters: %d", sum(p.numel() for p in model.parameters()))
    return model.to(cfg.train.device)


def do_train(args, cfg) -> None:
    """Train with the hooks of detectron2's lazyconfig_train_net (timer, lr, checkpoint, eval, writers)."""
    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = SafeDetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    main = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period
            )
            if main
            else None,
        ]
    )
    resuming = args.resume and checkpointer.has_checkpoint()
    if not resuming:
        load_mae_weights(_unwrap(model), cfg.mae_checkpoint.path)
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # The checkpoint holds the iteration that just finished: continue at the next one.
    start_iter = trainer.iter + 1 if resuming else 0
    trainer.train(start_iter, cfg.train.max_iter)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def main(args) -> Optional[dict]:
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="models", abbrev_name="mimdet")
    prepare(cfg, eval_only=args.eval_only)
    if not args.eval_only:
        do_train(args, cfg)
        return None
    model = create_ddp_model(build_model(cfg))
    SafeDetectionCheckpointer(model).load(cfg.train.init_checkpoint)
    return do_test(cfg, model)


def build_parser():
    """detectron2's parser plus the torchrun-style names MIMDet's README uses."""
    parser = default_argument_parser()
    parser.add_argument("--node_rank", dest="machine_rank", type=int, help="alias of --machine-rank")
    parser.add_argument("--master_addr", default="", help="address of the rank-0 machine")
    parser.add_argument("--master_port", default="", help="free port on the rank-0 machine")
    return parser


def resolve_processes(args) -> int:
    """Processes per machine; exits with a clear message when the GPUs asked for are absent."""
    if args.master_addr or args.master_port:
        if not (args.master_addr and args.master_port):
            raise SystemExit("--master_addr and --master_port must be given together")
        args.dist_url = f"tcp://{args.master_addr}:{args.master_port}"
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.num_gpus > available:
        if available == 0 and args.num_gpus == 1:
            return 1  # one CPU process (main() logs it)
        # A multi-process CPU (gloo) launch would go here; detectron2 0.6's launch is NCCL only.
        raise SystemExit(
            f"--num-gpus {args.num_gpus} asked for, but {available} CUDA GPU(s) available on this machine"
            + ("; without CUDA use --num-gpus 1 (one CPU process)" if available == 0 else "")
        )
    return max(args.num_gpus, 1)


if __name__ == "__main__":
    args = build_parser().parse_args()
    num_processes = resolve_processes(args)
    launch(
        main,
        num_processes,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
