#!/usr/bin/env python
"""Train or evaluate a detector described by a LazyConfig python file, or pre-train its ViT
with MAE (configs/mae/: no evaluator, no classes; the checkpoint is MAE's format).

    python lazyconfig_train_net.py --config-file CONFIG --num-gpus N [key=value ...]
    python lazyconfig_train_net.py --config-file CONFIG --num-gpus N --eval-only train.init_checkpoint=MODEL
    python lazyconfig_train_net.py ... --num-machines M --node_rank R --master_addr A --master_port P

    python lazyconfig_train_net.py --config-file CONFIG --num-cpu-processes N ...   (gloo DDP, no GPU)
    torchrun --nproc_per_node N lazyconfig_train_net.py --config-file CONFIG ...

The config provides ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``,
``lr_multiplier``, ``train`` (configs/common/train.py), ``mae_checkpoint.path`` (MAE weights
loaded before ``train.init_checkpoint``, which wins) and ``datasets.register`` (extra
COCO-format datasets). Without CUDA it runs on the CPU; ``train.amp`` is bf16 autocast there.

``--resume`` continues from the newest readable checkpoint of ``train.output_dir`` exactly as
the run would have gone on (models/engine/resume.py); without one it starts a new run. A new
run into a folder holding a previous one needs ``--overwrite``; one folder holds one live run
(models/engine/run_folder.py). ``--eval-only`` into a folder holding a training run writes its
log, config.yaml and predictions to the folder's ``eval/``, leaving the run's own as they are.
"""
import contextlib
import logging
import os
import sys
import time
from typing import List, Optional

from tools.interrupt import ctrl_c_in_one_line

if __name__ == "__main__":
    ctrl_c_in_one_line("lazyconfig_train_net.py")  # while the imports below take seconds
# ruff: noqa: E402

import models  # noqa: F401  (first: makes detectron2 0.6 work on today's stack)
from detectron2.engine import default_argument_parser
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from models.checkpoint import SafeDetectionCheckpointer
from models.config import load_config
from models.engine.launch import TORCHRUN_VARS, WORKER_REFUSED, check_num_gpus, in_spawned_worker, launch
from models.engine.loops import (build_model, check_classes, check_data_files, check_start_weights, do_test, do_train,
                                 evaluation_folder, prepare, save_config, setup_run, work_started, wrap_ddp)
from models.engine.resume import NoReadableCheckpoint
from models.engine.run_folder import RunFolderBusy, hold_run_folder

logger = logging.getLogger("detectron2")

def main(args) -> Optional[dict]:
    cfg = load_config(args.config_file, args.opts)
    check_start_weights(cfg, args.config_file, resume=args.resume, eval_only=args.eval_only)
    if args.eval_only:  # an evaluation never replaces a training run's config and results
        cfg.train.output_dir = args.eval_output_dir
    seed = setup_run(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="models", abbrev_name="mimdet")
    if args.num_cpu_processes and cfg.train.device != "cpu":
        logger.info("--num-cpu-processes: running on CPU (train.device=cpu).")
        cfg.train.device = "cpu"
    prepare(cfg, eval_only=args.eval_only, overrides=args.opts)
    if not args.eval_only:
        do_train(args, cfg, seed)
        return None
    logger.info("--eval-only: the log, config.yaml and the evaluator's files go to %s", cfg.train.output_dir)
    if comm.is_main_process():
        save_config(cfg, os.path.join(cfg.train.output_dir, "config.yaml"))
    model = wrap_ddp(cfg, build_model(cfg))
    checkpointer = SafeDetectionCheckpointer(model, strict=True)  # every weight evaluated comes from the file
    check_classes(checkpointer.load(cfg.train.init_checkpoint), cfg)
    return do_test(cfg, model, seed)


def build_parser():
    """detectron2's parser plus the torchrun-style names MIMDet's README uses and CPU processes."""
    parser = default_argument_parser()
    parser.add_argument("--node_rank", dest="machine_rank", type=int, help="alias of --machine-rank")
    parser.add_argument("--master_addr", default="", help="address of the rank-0 machine")
    parser.add_argument("--master_port", default="", help="free port on the rank-0 machine")
    parser.add_argument("--num-cpu-processes", type=int, default=0,
                        help="CPU processes per machine (DDP over gloo, no GPU needed); overrides --num-gpus")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a train.output_dir that holds a previous one, deleting its "
                             "checkpoints and metrics first")
    return parser


def resolve_dist_url(args, parser) -> None:
    """``--master_addr/--master_port`` -> ``args.dist_url``; on one machine, a free port by default."""
    if args.master_addr or args.master_port:
        if not (args.master_addr and args.master_port):
            raise SystemExit("--master_addr and --master_port must be given together")
        args.dist_url = f"tcp://{args.master_addr}:{args.master_port}"
    elif args.num_machines == 1 and args.dist_url == parser.get_default("dist_url"):
        args.dist_url = "auto"


def cli(argv: Optional[List[str]] = None) -> None:
    """Parse the command line, check the config, start the processes (models/engine/launch.py)."""
    global _launched
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_cpu_processes < 0:
        raise SystemExit(f"--num-cpu-processes must be >= 0, got {args.num_cpu_processes}")
    resolve_dist_url(args, parser)
    cfg = load_config(args.config_file, args.opts)  # bad files and overrides fail here, before any process starts
    check_start_weights(cfg, args.config_file, resume=args.resume, eval_only=args.eval_only)
    if not args.num_cpu_processes and not all(v in os.environ for v in TORCHRUN_VARS):
        check_num_gpus(args.num_gpus)
    check_data_files(cfg, eval_only=args.eval_only)  # a dataset not downloaded is named before the run folder is made
    # An evaluation holds its own folder: it may run while training goes on in train.output_dir.
    args.eval_output_dir = evaluation_folder(cfg.train.output_dir) if args.eval_only else None
    # One process per run holds the output folder: the launching one (rank 0 under torchrun).
    holds_folder = args.machine_rank == 0 and os.environ.get("RANK", "0") == "0"
    starts_from = [str(cfg.train.get("init_checkpoint", "") or ""), str(cfg.get("mae_checkpoint", {}).get("path", ""))]
    folder = hold_run_folder(args.eval_output_dir or cfg.train.output_dir, resume=args.resume,
                             overwrite=args.overwrite, eval_only=args.eval_only,
                             keep=starts_from) if holds_folder else contextlib.nullcontext()
    with folder:
        _launched = True
        launch(worker_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,), num_cpu_processes=args.num_cpu_processes)


_launched = False


def log_traceback_to_files() -> None:
    """Write the exception being handled, with its traceback, to the run's log.txt only."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "The run was refused before it began:",
                               None, sys.exc_info())
    for handler in logger.handlers:
        if getattr(handler, "stream", None) not in (sys.stdout, sys.stderr):  # detectron2's log file handlers
            handler.handle(record)


# Errors that refuse a run before its work starts (bad overrides, configs, files, a busy folder,
# a --resume without a readable checkpoint):
# one line on the console, not a traceback.
REFUSALS = (ValueError, KeyError, OSError, RunFolderBusy, NoReadableCheckpoint, AssertionError)


def refusal_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error) or type(error).__name__
    rank = f" (process {comm.get_rank()})" if comm.get_world_size() > 1 and comm.get_rank() else ""
    return f"lazyconfig_train_net.py: error{rank}: {message}"


def worker_main(args) -> Optional[dict]:
    """``main`` in a process that launch() started: a run refused while it is set up prints one
    line, keeps the traceback in its log file and exits with ``WORKER_REFUSED``."""
    try:
        return main(args)
    except REFUSALS as e:
        if not in_spawned_worker() or work_started():
            raise
        log_traceback_to_files()
        if comm.get_rank():  # rank 0 likely refuses the same way: its line alone, unless it carries on
            time.sleep(2.0)  # (the launching process ends the others once one process has exited)
        print(refusal_line(e), file=sys.stderr, flush=True)
        sys.exit(WORKER_REFUSED)


if __name__ == "__main__":
    try:
        cli()
    except KeyboardInterrupt:  # Ctrl-C: the trainer has logged where it stopped; the last checkpoint stays
        print("lazyconfig_train_net.py: interrupted; --resume continues from the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except REFUSALS as e:
        if work_started() or (isinstance(e, AssertionError) and not _launched):  # perhaps a fault of the code
            raise
        if _launched:  # refused while the run was set up: its log file keeps the traceback
            log_traceback_to_files()
        sys.exit(refusal_line(e))
