"""Benchmark MIMDet: what partial observation and mixed precision buy, in one table.

    python tools/benchmark.py [--config-file CONFIG] [--sample-ratios 0.25 0.5 0.75 1.0] \\
        [--dtypes fp32 bf16] [--height 800 --width 1216] [--batch-size 1] [--repeats 3] \\
        [--warmup 1] [--device cpu|cuda] [--threads N] [--activation-checkpointing] [--skip-detector] \\
        [--profile [ROWS]] [--png chart.png] [key=value ...]
    python tools/benchmark.py --reference [--compile] [same options]

For every (sample ratio, dtype) cell, on random images of the given size:

* backbone GFLOPs at that ratio (fvcore; one multiply-add counts as one flop, as fvcore does);
* backbone forward time (eval mode, no grad) and forward+backward time (train mode), the
  median of ``--repeats`` runs after ``--warmup`` runs, the runs going round-robin over all
  cells so that a machine whose load changes during the run slows every cell alike;
* peak memory of a backbone training step and of a detector training step, beyond the model
  and the optimizer's state: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak
  bytes of live tensors created during the step (activations, gradients, autocast weight
  copies), tracked storage by storage, which is the same quantity;
* whole-detector train images/s (forward, backward, the config's optimizer step) and
  inference images/s (eval mode at that ratio), unless ``--skip-detector``.

Every figure also shows its ratio to the sample-ratio-1.0 fp32 cell of the same run (or, if
that cell is not measured, to the cell of the largest ratio and the first dtype). Mixed
precision is ``torch.autocast`` with bf16 (CUDA, and CPUs where oneDNN computes it natively;
by default a CPU without it measures fp32 alone) or fp16 (CUDA). Activation checkpointing is
off unless ``--activation-checkpointing`` is given, whatever the config says.
The output ends with the machine's load average: on a CPU shared with other processes every
multi-threaded op can wait a scheduler slice for a preempted thread, so timings from a busy
machine are skewed (``--threads 1`` is steadier there).
``key=value`` overrides are applied to the config first, as in lazyconfig_train_net.py; put
them after ``--`` when they follow a list option (``--dtypes fp32 bf16 -- train.device=cpu``).
"""
import argparse
import contextlib
import functools
import logging
import math
import os
import statistics
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import models  # noqa: E402,F401  (detectron2 compatibility first)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from detectron2.config import instantiate  # noqa: E402
from detectron2.structures import BitMasks, Boxes, ImageList, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402
from tools.plot_metrics import picture_path  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from models.config import load_config  # noqa: E402
from models.engine.loops import check_model_arguments  # noqa: E402
from models.engine.trainer import cpu_has_native_bf16, resolve_amp_dtype  # noqa: E402

__all__ = ["Cell", "LiveTensorPeak", "run_benchmark", "format_table", "target_lines", "main"]

logger = logging.getLogger("mimdet.benchmark")

DEFAULT_CONFIG = os.path.join(REPO, "configs/mimdet/mimdet_vit_base_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x.py")
DTYPES = ("fp32", "bf16", "fp16")
BOXES_PER_IMAGE = 8  # synthetic ground truth of the detector's training step
MIB = 2.0 ** 20
# What partial observation and bf16 should buy (ViT-B backbone, forward+backward):
# (label, numerator cell, denominator cell, figure, bound).
# A speedup is denominator/numerator >= bound; the others are numerator/denominator <= bound.
TARGETS = (
    ("bf16 speedup at sr 0.5 (fp32 / bf16 fwd+bwd time)", (0.5, "bf16"), (0.5, "fp32"), "train_s", ">=", 1.8),
    ("sr 0.25 / sr 1.0 fwd+bwd time (fp32)", (0.25, "fp32"), (1.0, "fp32"), "train_s", "<=", 0.35),
    ("sr 0.5 / sr 1.0 fwd+bwd time (fp32)", (0.5, "fp32"), (1.0, "fp32"), "train_s", "<=", 0.55),
    ("sr 0.5 / sr 1.0 peak train memory (fp32)", (0.5, "fp32"), (1.0, "fp32"), "peak_bytes", "<=", 0.7),
)
# Said of a time target when no warm-up run came first: the times include one-off kernel set-up.
NOT_JUDGED = "not judged: timed without warm-up (--warmup 0)"
# Columns: (title, Cell attribute).
COLUMNS = (
    ("GFLOPs", "gflops"),
    ("fwd ms", "forward_s"),
    ("fwd+bwd ms", "train_s"),
    ("peak MiB", "peak_bytes"),
    ("det train peak MiB", "detector_peak_bytes"),
    ("det train img/s", "detector_train_ips"),
    ("det infer img/s", "detector_infer_ips"),
)
_SCALE = {"forward_s": 1e3, "train_s": 1e3, "peak_bytes": 1.0 / MIB, "detector_peak_bytes": 1.0 / MIB}


def _show(value: float) -> str:
    """Whole numbers from 100 up, three significant digits below."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


@dataclass
class Cell:
    """The measurements of one (sample ratio, dtype); None where not measured."""

    sample_ratio: float
    dtype: str
    tokens_kept: int = 0
    tokens_total: int = 0
    gflops: Optional[float] = None
    forward_s: Optional[float] = None
    train_s: Optional[float] = None
    peak_bytes: Optional[float] = None
    detector_train_ips: Optional[float] = None
    detector_peak_bytes: Optional[float] = None
    detector_infer_ips: Optional[float] = None
    gflops_by_part: Dict[str, float] = field(default_factory=dict)


class LiveTensorPeak(TorchDispatchMode):
    """CPU stand-in for ``torch.cuda.max_memory_allocated``: peak bytes of live tensor storages
    created while the mode is active (each storage counted once, until it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages: Dict[int, Tuple[weakref.ref, int]] = {}

    def _release(self, key: int, ref: weakref.ref) -> None:
        entry = self._storages.get(key)
        if entry is not None and entry[0] is ref:
            del self._storages[key]
            self.live_bytes -= entry[1]

    def _track(self, tensor: torch.Tensor, input_storages: set) -> None:
        if tensor.device.type == "meta" or tensor.is_sparse:
            return
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        # views and in-place results share an input's storage (a parameter's, say): nothing new
        if nbytes == 0 or key in self._storages or key in input_storages:
            return
        ref = weakref.ref(storage, lambda ref, key=key: self._release(key, ref))
        self._storages[key] = (ref, nbytes)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta" and not t.is_sparse}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf, inputs)
        return out


def _sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: Q K^T and softmax(.) V products."""
    query_shape, key_shape, value_shape = (inputs[i].type().sizes() for i in range(3))
    *batch, len_q, head_dim = query_shape
    len_k, value_dim = key_shape[-2], value_shape[-1]
    return math.prod(batch) * len_q * len_k * (head_dim + value_dim)


def backbone_gflops(backbone: torch.nn.Module, images: torch.Tensor) -> Tuple[float, Dict[str, float]]:
    """fvcore GFLOPs of one forward of ``backbone`` (in its current mode), and by child module."""
    analysis = FlopCountAnalysis(backbone, (images,))
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        total = analysis.total() / 1e9
    by_module = analysis.by_module()
    skipped = analysis.unsupported_ops()
    if skipped:
        logger.debug("fvcore skipped (no flop handle): %s", dict(skipped))
    parts = {name: by_module.get(name, 0) / 1e9 for name in ("encoder.patch_embed", "encoder", "decoder")}
    parts["encoder"] -= parts["encoder.patch_embed"]
    return total, {"stem": parts["encoder.patch_embed"], "encoder ViT": parts["encoder"], "decoder": parts["decoder"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(steps: Sequence[Callable[[], None]], device: torch.device, repeats: int,
                        warmup: int) -> List[float]:
    """Median wall time of each step. Runs go round-robin over the steps (warm-up rounds first),
    so a change in the machine's load during the run hits every step alike."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: List[List[float]] = [[] for _ in steps]
    for round_index in range(repeats):
        logger.info("Timed round %d/%d", round_index + 1, repeats)
        for step, step_times in zip(steps, times):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            step_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def peak_step_memory(fn: Callable[[], None], device: torch.device) -> float:
    """Bytes allocated by one run of ``fn`` at its peak, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    tracker = LiveTensorPeak()
    with tracker:
        fn()
    return float(tracker.peak_bytes)


def synthetic_images(batch: int, height: int, width: int, device: torch.device) -> ImageList:
    """Normalised random images, all pixels real."""
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(batch, 3, height, width, generator=generator).to(device)
    return ImageList(tensor, [(height, width)] * batch)


def synthetic_detector_inputs(batch: int, height: int, width: int, with_targets: bool) -> List[dict]:
    """detectron2 dataset dicts of random 0-255 RGB images, with boxes and box-filling masks."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, height, width), generator=generator).float()
        record = {"image": image, "height": height, "width": width}
        if with_targets:
            corners = torch.rand(BOXES_PER_IMAGE, 2, 2, generator=generator) * torch.tensor([width, height])
            low, high = corners.min(1).values, corners.max(1).values + 16  # at least 16 px a side
            boxes = torch.cat([low, torch.minimum(high, torch.tensor([width, height]))], dim=1)
            masks = torch.zeros(BOXES_PER_IMAGE, height, width, dtype=torch.bool)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
                mask[y0:y1, x0:x1] = True
            instances = Instances((height, width))
            instances.gt_boxes = Boxes(boxes)
            instances.gt_classes = torch.randint(0, 2, (BOXES_PER_IMAGE,), generator=generator)
            instances.gt_masks = BitMasks(masks)
            record["instances"] = instances
        inputs.append(record)
    return inputs


def load_benchmark_config(config_file: str, overrides: Sequence[str], checkpointing: bool):
    """The LazyConfig with overrides (the launcher's strict loader), activation checkpointing set as asked."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file}: no such file")
    cfg = load_config(config_file, overrides)
    bottom_up = cfg.get("model", {}).get("backbone", {}).get("bottom_up", {})
    if not hasattr(bottom_up, "keys") or "sample_ratio" not in bottom_up or "use_act_checkpoint" not in bottom_up:
        raise ValueError(f"{config_file}: model.backbone.bottom_up has no sample_ratio; the benchmark needs a "
                         f"MIMDet backbone")
    bottom_up.use_act_checkpoint = checkpointing
    return cfg


def _autocast(device: torch.device, dtype: str):
    amp_dtype = None if dtype == "fp32" else resolve_amp_dtype(True, dtype, device.type)
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


class ReferenceBackbone(torch.nn.Module):
    """A straightforward implementation of the same layers as a MIMDet backbone, for timing:
    the conv stem as a plain ``nn.Sequential`` per stage, timm ``Block``s over the kept tokens,
    MAE's decoder blocks over all tokens. Same widths, depths and token counts; no padding
    handling, no position-table cache, no checkpoint mapping."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        encoder, decoder = backbone.encoder, backbone.decoder
        width = encoder.pos_embed.shape[-1]
        decoder_width = decoder.decoder_pos_embed.shape[-1]
        heads = encoder.blocks[0].attn.num_heads
        decoder_heads = decoder.decoder_blocks[0].attn.num_heads
        widths = [3, width // 8, width // 4, width // 2, width]
        self.stem = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1, bias=False),
                                torch.nn.GroupNorm(1, widths[i + 1], eps=1e-6), torch.nn.GELU())
            for i in range(4))
        self.stem[3].append(torch.nn.Conv2d(width, width, 1))
        self.blocks = torch.nn.Sequential(*(Block(width, heads, 4.0, qkv_bias=True) for _ in encoder.blocks))
        self.norm = torch.nn.LayerNorm(width)
        self.decoder_embed = torch.nn.Linear(width, decoder_width)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.decoder_blocks = torch.nn.Sequential(
            *(Block(decoder_width, decoder_heads, 4.0, qkv_bias=True) for _ in decoder.decoder_blocks))
        self.decoder_norm = torch.nn.LayerNorm(decoder_width)
        self.sample_ratio = 1.0

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        maps, x = [], images
        for stage in self.stem:
            x = stage(x)
            maps.append(x)
        batch, width, grid_h, grid_w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + torch.zeros(1, grid_h * grid_w, width, device=x.device)  # a fixed position table
        keep = max(1, int(tokens.shape[1] * self.sample_ratio))
        ids_shuffle = torch.rand(batch, tokens.shape[1], device=x.device).argsort(1)
        ids_restore = ids_shuffle.argsort(1)
        kept = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, width))
        latent = self.decoder_embed(self.norm(self.blocks(kept)))
        full = torch.cat([latent, self.mask_token.expand(batch, tokens.shape[1] - keep, -1)], dim=1)
        full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, full.shape[-1]))
        c4 = self.decoder_norm(self.decoder_blocks(full)).transpose(1, 2).reshape(batch, -1, grid_h, grid_w)
        return {"c2": maps[1], "c3": maps[2], "c4": c4, "c5": F.max_pool2d(c4, 2)}


def reference_comparison(backbone: torch.nn.Module, images: torch.Tensor, ratios: Sequence[float],
                         dtypes: Sequence[str], device: torch.device, repeats: int, warmup: int,
                         compile_backbone: bool = False) -> List[str]:
    """Backbone fwd+bwd of ours against ``ReferenceBackbone``, interleaved; one line per cell.

    With ``compile_backbone``, ours under ``torch.compile`` is timed beside them (after one
    untimed compiling step per cell, whose time is reported). Where torch.compile fails (no
    C++ compiler, an unsupported platform), a line says why and the other figures stand.
    """
    torch.manual_seed(0)
    reference = ReferenceBackbone(backbone).to(device).train()

    def step(model, ratio: float, dtype: str, runner=None) -> None:
        model.sample_ratio = ratio
        model.train()
        model.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = sum(f.float().mean() for f in (model if runner is None else runner)(images).values())
        loss.backward()

    cells = [(ratio, dtype) for ratio in ratios for dtype in dtypes]
    runners = [(backbone, None), (reference, None)]
    lines, compile_seconds = [], {}
    if compile_backbone:
        compiled = torch.compile(backbone)
        try:
            for ratio, dtype in cells:
                start = time.perf_counter()
                step(backbone, ratio, dtype, compiled)
                _sync(device)
                compile_seconds[ratio, dtype] = time.perf_counter() - start
            runners.append((backbone, compiled))
        except Exception as e:  # torch.compile raises many kinds (no compiler, unsupported op, ...)
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            lines.append(f"torch.compile is unavailable here ({type(e).__name__}: {reason}): eager figures only")
            compile_seconds.clear()
    steps = [functools.partial(step, model, r, d, runner) for r, d in cells for model, runner in runners]
    medians = interleaved_medians(steps, device, repeats, warmup)
    backbone.zero_grad(set_to_none=True)
    for index, (ratio, dtype) in enumerate(cells):
        ours, theirs, *compiled_time = medians[index * len(runners):(index + 1) * len(runners)]
        verdict = ("met" if round(ours / theirs, 2) <= 1.0 else "NOT met") if warmup else NOT_JUDGED
        line = (f"backbone fwd+bwd at sample ratio {ratio:g}, {dtype}: ours {ours * 1e3:.0f} ms, plain reference "
                f"{theirs * 1e3:.0f} ms: ours / reference = {ours / theirs:.2f}x (target <= 1.00) {verdict}")
        if compiled_time:
            line += (f"; ours under torch.compile {compiled_time[0] * 1e3:.0f} ms = {compiled_time[0] / ours:.2f}x "
                     f"of eager (compiling took {compile_seconds[ratio, dtype]:.0f} s)")
        lines.append(line)
    return lines


def resident_bytes(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Tuple[float, float]:
    """Bytes that stay allocated between training steps: the parameters, and the optimizer's state
    (AdamW: two moments per parameter). A training step's peak comes on top of these."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = 0
    if optimizer is not None:
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
    return float(params), float(state)


def run_benchmark(args: argparse.Namespace) -> List[Cell]:
    """Measure every (sample ratio, dtype) cell of ``args`` (``args.cfg``: the config that
    ``parse_args`` loaded and checked); return the cells in order."""
    device = torch.device(args.device)
    cfg = args.cfg
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device)
    backbone = model.backbone.bottom_up
    optimizer = None
    if not args.skip_detector:
        if "optimizer" in cfg:
            cfg.optimizer.params.model = model
            optimizer = instantiate(cfg.optimizer)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = synthetic_images(args.batch_size, args.height, args.width, device)
    train_inputs = synthetic_detector_inputs(args.batch_size, args.height, args.width, with_targets=True)
    infer_inputs = synthetic_detector_inputs(args.batch_size, args.height, args.width, with_targets=False)

    # Each step sets its ratio and mode and enters autocast itself, as a training iteration does
    # (autocast's cache of cast weights lives for one step).
    def backbone_forward(ratio: float, dtype: str) -> None:
        backbone.sample_ratio = backbone.eval_sample_ratio = ratio
        backbone.eval()
        with torch.no_grad(), _autocast(device, dtype):
            backbone(images)

    def backbone_train_step(ratio: float, dtype: str) -> None:
        backbone.sample_ratio = ratio
        backbone.train()
        backbone.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            features = backbone(images)
            loss = sum(f.float().mean() for f in features.values())
        loss.backward()

    def detector_train_step(ratio: float, dtype: str) -> None:
        backbone.sample_ratio = ratio
        model.train()
        with _autocast(device, dtype):
            losses = model(train_inputs)
            loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def detector_inference(ratio: float, dtype: str) -> None:
        backbone.sample_ratio = backbone.eval_sample_ratio = ratio
        model.eval()
        with torch.no_grad(), _autocast(device, dtype):
            model(infer_inputs)

    figures = {"forward_s": backbone_forward, "train_s": backbone_train_step}
    if not args.skip_detector:
        figures.update(detector_train_ips=detector_train_step, detector_infer_ips=detector_inference)
    grid = (args.height // 16) * (args.width // 16)
    cells, jobs = [], []
    for ratio in args.sample_ratios:
        backbone.sample_ratio = backbone.eval_sample_ratio = ratio
        backbone.eval()
        gflops, parts = backbone_gflops(backbone, images.tensor)
        for dtype in args.dtypes:
            cell = Cell(ratio, dtype, max(1, int(grid * ratio)), grid, gflops, gflops_by_part=parts)
            cells.append(cell)
            jobs += [(cell, attr, functools.partial(step, ratio, dtype)) for attr, step in figures.items()]
    with EventStorage():  # detectron2's heads log to it in training
        medians = interleaved_medians([step for *_, step in jobs], device, args.repeats, args.warmup)
    for (cell, attr, _), seconds in zip(jobs, medians):
        setattr(cell, attr, args.batch_size / seconds if attr.endswith("_ips") else seconds)
    model.zero_grad(set_to_none=True)  # gradients exist only inside the measured steps
    for cell in cells:
        logger.info("Peak memory of a backbone training step, sample ratio %s, %s", cell.sample_ratio, cell.dtype)
        cell.peak_bytes = peak_step_memory(functools.partial(backbone_train_step, cell.sample_ratio, cell.dtype),
                                           device)
        model.zero_grad(set_to_none=True)
        if not args.skip_detector:
            with EventStorage():
                cell.detector_peak_bytes = peak_step_memory(
                    functools.partial(detector_train_step, cell.sample_ratio, cell.dtype), device)
            model.zero_grad(set_to_none=True)
        if args.profile:
            print(profile_table(functools.partial(backbone_train_step, cell.sample_ratio, cell.dtype), device,
                                cell.dtype, cell.sample_ratio, args.profile))
            model.zero_grad(set_to_none=True)
    params, state = resident_bytes(model, optimizer)
    logger.info("Resident between training steps (the peak columns come on top): parameters %.0f MiB, "
                "optimizer state %.0f MiB", params / MIB, state / MIB)
    return cells


def profile_table(step: Callable[[], None], device: torch.device, dtype: str, ratio: float, rows: int) -> str:
    """torch.profiler's top operators (by self time) of one backbone training step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step()  # warm-up, outside the trace
    with torch.profiler.profile(activities=activities) as prof:
        step()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=48)
    return f"\nProfile of one backbone fwd+bwd step, sample ratio {ratio}, {dtype}:\n{table}"


def reference_cell(cells: Sequence[Cell]) -> Cell:
    """The sample-ratio-1.0 fp32 cell, else the largest ratio in the first dtype."""
    for cell in cells:
        if cell.sample_ratio == 1.0 and cell.dtype == "fp32":
            return cell
    largest = max(c.sample_ratio for c in cells)
    return next(c for c in cells if c.sample_ratio == largest)


def _find(cells: Sequence[Cell], ratio: float, dtype: str) -> Optional[Cell]:
    return next((c for c in cells if c.sample_ratio == ratio and c.dtype == dtype), None)


def format_table(cells: Sequence[Cell], title: str = "") -> str:
    """One table: each figure with its ratio to the reference cell."""
    reference = reference_cell(cells)
    headers = ["ratio", "dtype", "tokens"] + [title for title, _ in COLUMNS]
    rows = []
    for cell in cells:
        row = [f"{cell.sample_ratio:g}", cell.dtype, f"{cell.tokens_kept}/{cell.tokens_total}"]
        for _, attr in COLUMNS:
            value, base = getattr(cell, attr), getattr(reference, attr)
            if value is None:
                row.append("-")
                continue
            shown = _show(value * _SCALE.get(attr, 1.0))
            row.append(f"{shown} ({value / base:.2f}x)" if base else shown)
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda items: " | ".join(s.rjust(w) for s, w in zip(items, widths))  # noqa: E731
    rule = "-+-".join("-" * w for w in widths)
    note = (f"(x) = ratio to sample ratio {reference.sample_ratio:g} {reference.dtype}; GFLOPs, fwd, fwd+bwd and "
            "peak: the backbone; det: the whole detector; images/s: larger is better, the rest: smaller is better")
    parts = [title] if title else []
    return "\n".join(parts + [line(headers), rule] + [line(r) for r in rows] + [note])


def target_lines(cells: Sequence[Cell], warmed_up: bool = True) -> List[str]:
    """The four speed and memory targets: measured value, bound, met or not (n/a where a cell is
    missing). Without warm-up runs the times include one-off costs (oneDNN and cuDNN pick and
    compile their kernels on a shape's first run), so the time targets are shown, not judged."""
    lines = []
    for label, (r1, d1), (r2, d2), attr, op, bound in TARGETS:
        first, second = _find(cells, r1, d1), _find(cells, r2, d2)
        if first is None or second is None or getattr(first, attr) is None or not getattr(second, attr):
            lines.append(f"target {label}: n/a (cells not measured in this run)")
            continue
        if op == ">=":
            value = getattr(second, attr) / getattr(first, attr)
            met = value >= bound
        else:
            value = getattr(first, attr) / getattr(second, attr)
            met = value <= bound
        verdict = NOT_JUDGED if not warmed_up and attr != "peak_bytes" else "met" if met else "NOT met"
        lines.append(f"target {label}: {value:.2f}x (target {op} {bound}) {verdict}")
    return lines


def part_lines(cells: Sequence[Cell]) -> List[str]:
    """Backbone GFLOPs by part at each ratio: what scales with the ratio and what does not."""
    seen, lines = set(), []
    for cell in cells:
        if cell.sample_ratio in seen or not cell.gflops_by_part:
            continue
        seen.add(cell.sample_ratio)
        parts = ", ".join(f"{name} {_show(value)}" for name, value in cell.gflops_by_part.items())
        lines.append(f"GFLOPs by part at sample ratio {cell.sample_ratio:g}: {parts}")
    return lines


def write_chart(cells: Sequence[Cell], path: str, title: str) -> None:
    """A PNG with one panel per figure against the sample ratio, one line per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [(t, a) for t, a in COLUMNS if any(getattr(c, a) is not None for c in cells)]
    columns = min(4, len(figures))
    rows = -(-len(figures) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.8 * columns, 3.2 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(figures):]:
        ax.set_visible(False)
    for ax, (label, attr) in zip(axes.flat, figures):
        top = 0.0
        for dtype in dict.fromkeys(c.dtype for c in cells):
            points = [(c.sample_ratio, getattr(c, attr) * _SCALE.get(attr, 1.0))
                      for c in cells if c.dtype == dtype and getattr(c, attr) is not None]
            ax.plot(*zip(*points), marker="o", label=dtype)
            top = max([top] + [y for _, y in points if math.isfinite(y)])
        ax.set_xlabel("sample ratio")
        ax.set_title(label)
        ax.set_ylim(0, top * 1.15 or 1.0)  # from 0, with room above: a constant series stays off the frame
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load_average() -> str:
    """Other processes' work skews CPU timings; the table reports how busy the machine was."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="LazyConfig .py file of a MIMDet detector")
    parser.add_argument("--sample-ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--dtypes", nargs="+", default=None, choices=DTYPES,
                        help="default: fp32 and bf16; fp32 alone on a CPU without native bf16 (x86 without "
                             "AVX512-BF16 or AMX), where bf16 is emulated and slower")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is shown)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0, the default: torch's choice, one per core)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="checkpoint stem, encoder and decoder activations (default: off)")
    parser.add_argument("--skip-detector", action="store_true", help="backbone figures only")
    parser.add_argument("--reference", action="store_true",
                        help="instead of the table: our backbone's fwd+bwd against a plain implementation of the "
                             "same layers (ReferenceBackbone), per sample ratio and dtype")
    parser.add_argument("--compile", action="store_true",
                        help="with --reference: also time our backbone under torch.compile (and say how long "
                             "compiling took); where torch.compile fails, a line says why")
    parser.add_argument("--profile", type=int, nargs="?", const=15, default=None, metavar="ROWS",
                        help="also print torch.profiler's top operators of a backbone step per cell")
    parser.add_argument("--png", help="write a chart of the figures against the sample ratio here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    for ratio in args.sample_ratios:
        if not 0.0 < ratio <= 1.0:
            parser.error(f"--sample-ratios must lie in (0, 1], got {ratio}")
    args.sample_ratios = sorted(set(args.sample_ratios))  # each measured once, in order along the chart's axis
    for name in ("height", "width"):
        if getattr(args, name) < 64 or getattr(args, name) % 32:
            parser.error(f"--{name} must be a multiple of 32 (the backbone's size divisibility) of at least 64 "
                         f"(the normalised stride-32 map needs more than one pixel), got {getattr(args, name)}")
    if args.compile and not args.reference:
        parser.error("--compile goes with --reference (it times the backbone step only)")
    if args.reference:
        table_only = [flag for flag, given in (("--png", args.png), ("--profile", args.profile is not None),
                                               ("--skip-detector", args.skip_detector)) if given]
        if table_only:
            parser.error(f"{', '.join(table_only)}: options of the table, which --reference replaces")
    if args.png:
        try:
            args.png = picture_path(args.png)
        except ValueError as e:
            parser.error(f"--png: {e}")
    if args.profile is not None and args.profile < 1:
        parser.error(f"--profile takes a number of rows >= 1, got {args.profile}")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1),
                             ("--warmup", args.warmup, 0), ("--threads", args.threads, 0)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu")
    native_bf16 = args.device == "cuda" or cpu_has_native_bf16()
    if args.dtypes is None:
        args.dtypes = ["fp32", "bf16"] if native_bf16 else ["fp32"]
        if not native_bf16:
            logger.warning("no native bf16 on this CPU (x86 needs AVX512-BF16 or AMX): measuring fp32 "
                           "only; --dtypes fp32 bf16 measures the emulated bf16 too")
    elif "bf16" in args.dtypes and not native_bf16:
        logger.warning("--dtypes bf16 on a CPU without native bf16 (x86 needs AVX512-BF16 or AMX): "
                       "bf16 is emulated here and slower than fp32")
    if "fp16" in args.dtypes and args.device != "cuda":
        parser.error("--dtypes fp16 needs --device cuda; on CPU use fp32, or bf16 where the CPU computes it natively")
    try:  # bad files, overrides and model values are named here, before minutes of timing
        args.cfg = load_benchmark_config(args.config_file, args.overrides, args.activation_checkpointing)
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
    problems = check_model_arguments(args.cfg.model)
    if problems:
        parser.error("; ".join(problems))
    if args.png:  # last, once nothing else refuses the run: this may make the picture's folder
        try:
            check_writable(args.png)
        except OSError as e:
            parser.error(f"--png: cannot write {args.png}: {e.strerror or e}")
    return args


def check_writable(path: str) -> None:
    """Raise OSError unless a file can be written at ``path`` (making its folder if needed), so
    that a bad path is refused before minutes of timing; leaves no file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    existed = os.path.exists(path)
    with open(path, "ab"):
        pass
    if not existed:
        os.remove(path)


def main(argv=None) -> List[Cell]:
    args = parse_args(argv)
    if args.threads:
        if args.threads > (os.cpu_count() or 1):  # more threads than cores wait on each other
            logger.warning("--threads %d on %d cores: threads will share cores, and times rise", args.threads,
                           os.cpu_count() or 1)
        torch.set_num_threads(args.threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    parts = "backbone" if args.skip_detector else "backbone and detector"
    title = (f"{os.path.basename(args.config_file)}: {parts}, batch {args.batch_size} x "
             f"{args.height}x{args.width}, {where}, activation checkpointing "
             f"{'on' if args.activation_checkpointing else 'off'}, median of {args.repeats} after {args.warmup} "
             f"warm-up")
    load_before = _load_average()
    if args.reference:
        device = torch.device(args.device)
        torch.manual_seed(0)
        backbone = instantiate(args.cfg.model).backbone.bottom_up.to(device)
        images = synthetic_images(args.batch_size, args.height, args.width, device).tensor
        lines = reference_comparison(backbone, images, args.sample_ratios, args.dtypes, device, args.repeats,
                                     args.warmup, compile_backbone=args.compile)
        print("\n".join([title.replace(parts, "backbone against a plain reference")] + lines +
                         [f"machine load (1-min load average, {os.cpu_count()} cores): {load_before} at start, "
                          f"{_load_average()} at end"]))
        return []
    cells = run_benchmark(args)
    load = (f"machine load (1-min load average, {os.cpu_count()} cores): {load_before} at start, "
            f"{_load_average()} at end")
    print("\n".join([format_table(cells, title)] + part_lines(cells) + target_lines(cells, args.warmup > 0) + [load]))
    if args.png:
        write_chart(cells, args.png, title)
        print(f"chart: {args.png}")
    return cells


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation that failed: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)


if __name__ == "__main__":
    try:
        main()
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        sys.exit(f"benchmark.py: out of memory: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                 "try a smaller --height, --width or --batch-size")
