"""tools/benchmark.py: the whole table on the tiny config, the CPU memory tracker, bf16 autocast
of the backbone, and fvcore's count falling with the sample ratio."""
import os

import models  # noqa: F401  (detectron2 compatibility first)
import pytest
import torch
from detectron2.config import instantiate
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models.config import load_config
from tools import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "test", "tiny_mimdet.py")


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    cfg = load_config(TINY_CONFIG)
    return instantiate(cfg.model.backbone.bottom_up)


@pytest.fixture
def keep_num_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tool_prints_every_column_for_each_ratio_and_dtype(tmp_path, capsys, keep_num_threads):
    chart = tmp_path / "chart.png"
    # one thread: toy tensors gain nothing from two, and a busy machine slows two-thread ops a lot
    cells = benchmark.main(["--config-file", TINY_CONFIG, "--sample-ratios", "0.5", "1.0", "--dtypes", "fp32",
                            "bf16", "--height", "96", "--width", "128", "--repeats", "1", "--warmup", "0",
                            "--threads", "1", "--png", str(chart), "train.device=cpu"])
    assert torch.get_num_threads() == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("ratio"))
    for title in ("tokens", "GFLOPs", "fwd ms", "fwd+bwd ms", "peak MiB", "det train img/s", "det train peak MiB",
                  "det infer img/s"):
        assert title in header
    rows = [line for line in lines if line.lstrip().startswith(("0.5 |", "1 |"))]
    assert len(rows) == 4
    for row in rows:
        fields = [f.strip() for f in row.split("|")]
        assert len(fields) == 10 and "-" not in fields[3:]  # "-" marks a figure not measured
        assert all(f.endswith("x)") for f in fields[3:])  # every figure with its ratio to the reference
    assert rows[2].split("|")[3].strip().endswith("(1.00x)")  # sr 1.0 fp32 is the reference
    # 96x128 -> 6x8 = 48 tokens: int(48 * 0.5) kept at 0.5
    assert [(c.sample_ratio, c.dtype, c.tokens_kept, c.tokens_total) for c in cells] == [
        (0.5, "fp32", 24, 48), (0.5, "bf16", 24, 48), (1.0, "fp32", 48, 48), (1.0, "bf16", 48, 48)]
    for cell in cells:
        for value in (cell.gflops, cell.forward_s, cell.train_s, cell.peak_bytes, cell.detector_train_ips,
                      cell.detector_peak_bytes, cell.detector_infer_ips):
            assert value is not None and value > 0
    assert cells[0].gflops < cells[2].gflops
    targets = [line for line in lines if line.startswith("target ")]
    assert len(targets) == 4
    # timed cold (--warmup 0): the time targets are shown, not judged; memory is
    assert targets[0].endswith("not judged: timed without warm-up (--warmup 0)") or "n/a" in targets[0]
    assert "not judged" not in targets[3] and targets[3].endswith(" met")
    assert "GFLOPs by part at sample ratio 0.5: stem" in out
    assert "machine load (1-min load average" in out
    assert chart.stat().st_size > 0


def test_targets_report_met_not_met_and_missing_cells():
    Cell = benchmark.Cell
    cells = [Cell(0.5, "fp32", train_s=5.0, peak_bytes=60.0), Cell(0.5, "bf16", train_s=2.0),
             Cell(1.0, "fp32", train_s=10.0, peak_bytes=100.0)]
    lines = benchmark.target_lines(cells)
    assert lines[0].endswith("2.50x (target >= 1.8) met")
    assert "n/a" in lines[1]  # no sr 0.25 cell
    assert lines[2].endswith("0.50x (target <= 0.55) met")
    assert lines[3].endswith("0.60x (target <= 0.7) met")
    cells[0].peak_bytes = 80.0
    assert benchmark.target_lines(cells)[3].endswith("0.80x (target <= 0.7) NOT met")
    cold = benchmark.target_lines(cells, warmed_up=False)
    assert cold[0].endswith("2.50x (target >= 1.8) not judged: timed without warm-up (--warmup 0)")
    assert cold[3].endswith("0.80x (target <= 0.7) NOT met")  # memory needs no warm-up


def test_live_tensor_peak_counts_storages_once_and_frees_them():
    tracker = benchmark.LiveTensorPeak()
    with tracker:
        a = torch.ones(1024)  # 4 KiB
        view = a[:10]  # no new storage
        a.add_(1)  # in place: no new storage
        b = torch.ones(2048)  # 8 KiB, 12 KiB live
        del a, view
        c = b * 2  # 16 KiB live
        del b, c
    assert tracker.peak_bytes == 16 * 1024
    assert tracker.live_bytes == 0


def test_live_tensor_peak_ignores_views_of_tensors_made_before():
    weight = torch.randn(512, 512)  # 1 MiB, allocated outside
    tracker = benchmark.LiveTensorPeak()
    with tracker:
        transposed = weight.t()
        row = weight[0]
        weight.mul_(2)
        product = row @ transposed  # 2 KiB, the only new storage
    assert tracker.peak_bytes == product.numel() * 4 == 2048
    del transposed


def test_live_tensor_peak_sees_backward_allocations():
    weight = torch.randn(256, 256, requires_grad=True)  # allocated outside: not counted
    x = torch.randn(64, 256)
    tracker = benchmark.LiveTensorPeak()
    with tracker:
        (x @ weight).relu().sum().backward()
    assert weight.grad is not None
    assert tracker.peak_bytes >= weight.numel() * 4  # at least the gradient
    assert tracker.live_bytes == weight.numel() * 4  # the gradient outlives the step, the rest is freed


class _HeavyOpDtypes(TorchDispatchMode):
    """Records the floating dtypes of the inputs of matrix products, convolutions and attention."""

    HEAVY = ("mm", "addmm", "bmm", "baddbmm", "convolution", "scaled_dot_product")

    def __init__(self) -> None:
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(name.startswith(heavy) or name.startswith("_" + heavy) for heavy in self.HEAVY):
            dtypes = {a.dtype for a in tree_leaves(args) if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.setdefault(name.split(".")[0], set()).update(dtypes)
        return func(*args, **(kwargs or {}))


def test_bf16_autocast_forward_backward_of_tiny_backbone_is_finite(tiny_backbone):
    backbone = tiny_backbone.train()
    padded = benchmark.ImageList(torch.randn(2, 3, 96, 128), [(96, 128), (70, 100)])  # sampled, with padding
    backbone.zero_grad(set_to_none=True)
    recorder = _HeavyOpDtypes()
    with recorder:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = backbone(padded)
            loss = sum(f.float().square().mean() for f in features.values())
        loss.backward()
    assert features["c4"].dtype == torch.float32  # the residual stream stays fp32, as in the original
    # every matrix product, convolution and attention, forward and backward, ran in bf16 (the
    # attention of these short sequences as two batched matmuls, see models/backbones/attention.py)
    for op in ("addmm", "mm", "bmm", "convolution", "convolution_backward"):
        assert op in recorder.seen
    assert not any(op.startswith("_scaled_dot_product") for op in recorder.seen)
    not_bf16 = {op: dtypes for op, dtypes in recorder.seen.items() if dtypes != {torch.bfloat16}}
    assert not_bf16 == {}
    assert torch.isfinite(loss)
    assert all(torch.isfinite(f.float()).all() for f in features.values())
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_gflops_fall_with_the_sample_ratio(tiny_backbone):
    backbone = tiny_backbone.eval()
    images = torch.randn(1, 3, 128, 160)
    counts = {}
    for ratio in (0.5, 1.0):
        backbone.eval_sample_ratio = ratio
        counts[ratio], parts = benchmark.backbone_gflops(backbone, images)
        assert counts[ratio] == pytest.approx(sum(parts.values()), rel=1e-6)
    backbone.eval_sample_ratio = None
    assert counts[0.5] < counts[1.0]


def test_attention_is_counted():
    # one head, 10 queries, 12 keys, head dim 4: 10*12*4 (Q K^T) + 10*12*4 (P V)
    query, key = torch.randn(1, 1, 10, 4), torch.randn(1, 1, 12, 4)
    module = _SDPA()
    analysis = benchmark.FlopCountAnalysis(module, (query, key))
    analysis.set_op_handle("aten::scaled_dot_product_attention", benchmark._sdpa_flop_jit)
    assert analysis.total() == 2 * 10 * 12 * 4


class _SDPA(torch.nn.Module):
    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(query, key, key)


@pytest.mark.parametrize("argv, message", [
    (["--sample-ratios", "1.5"], "--sample-ratios must lie in"),
    (["--height", "100"], "--height must be a multiple of 32"),
    (["--width", "32"], "of at least 64"),
    (["--reference", "--png", "chart.png"], "--png: options of the table, which --reference replaces"),
    (["--reference", "--profile", "--skip-detector"], "--profile, --skip-detector: options of the table"),
    (["--profile", "-3"], "--profile takes a number of rows >= 1"),
    (["--profile", "0"], "--profile takes a number of rows >= 1, got 0"),
    (["--png", "/proc/chart.png"], "--png: cannot write /proc/chart.png: "),
    (["--png", "a" * 300 + ".png"], "--png: cannot write " + "a" * 300 + ".png: File name too long"),
    (["--config-file", os.path.join(benchmark.REPO, "configs", "mae", "mae_pretrain_vit_base.py")],
     "model.backbone.bottom_up has no sample_ratio; the benchmark needs a MIMDet backbone"),
    (["--dtypes", "fp16", "--device", "cpu"], "fp16 needs --device cuda"),
    (["--compile"], "--compile goes with --reference"),
    (["--png", "."], "--png: . is a folder; name the picture to write in it"),
    (["--png", "new_folder/"], "--png: new_folder/ is a folder; name the picture to write in it"),
    (["--png", "chart.txt"], "--png: chart.txt: matplotlib cannot write .txt pictures; use one of "),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--threads", "-3"], "--threads must be >= 0, got -3"),
    (["foo.bar=1"], "unknown config key 'foo.bar'"),
    (["model.backbone.bottom_up.fill_mode=zeros"], "model.backbone.bottom_up.fill_mode must be one of"),
    (["model.backbone.bottom_up.sample_ratio=0"],
     "model.backbone.bottom_up.sample_ratio must be a number in (0, 1], got 0"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_refused_run_makes_no_picture_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--png", str(tmp_path / "new" / "sub" / "chart.png"), "--profile", "0"])
    assert "--profile takes a number of rows >= 1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    chart = str(tmp_path / "new" / "chart.png")
    assert benchmark.parse_args(["--png", chart]).png == chart
    assert os.listdir(tmp_path / "new") == []  # the check leaves no file


def test_sample_ratios_are_measured_once_each_in_increasing_order():
    assert benchmark.parse_args(["--sample-ratios", "1.0", "0.25", "0.5", "0.25"]).sample_ratios == [0.25, 0.5, 1.0]


def test_more_threads_than_cores_are_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(benchmark.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(benchmark, "run_benchmark", lambda args: [])  # the warning comes before any timing
    monkeypatch.setattr(benchmark, "format_table", lambda cells, title: "")
    threads = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING", logger=benchmark.logger.name):
            benchmark.main(["--device", "cpu", "--threads", "3", "--skip-detector"])
    finally:
        torch.set_num_threads(threads)
    assert "--threads 3 on 2 cores: threads will share cores" in caplog.text


def test_running_out_of_memory_is_told_from_other_errors():
    assert benchmark.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:121] . DefaultCPUAllocator: "
                                                   "can't allocate memory: you tried to allocate 12288000000 bytes"))
    assert benchmark.is_out_of_memory(MemoryError())
    assert not benchmark.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.parametrize("native, argv, dtypes, warned", [
    (True, [], ["fp32", "bf16"], False),
    (False, [], ["fp32"], True),  # AVX2 only: bf16 is emulated, fp32 alone unless asked
    (False, ["--dtypes", "fp32", "bf16"], ["fp32", "bf16"], True),
    (False, ["--dtypes", "fp32"], ["fp32"], False),
])
def test_default_dtypes_follow_the_cpus_bf16_support(monkeypatch, caplog, native, argv, dtypes, warned):
    monkeypatch.setattr(benchmark, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level("WARNING", logger=benchmark.logger.name):
        assert benchmark.parse_args(["--device", "cpu", *argv]).dtypes == dtypes
    assert ("without native bf16" in caplog.text or "no native bf16" in caplog.text) == warned


def test_reference_backbone_has_the_same_layers_and_outputs_and_is_timed_beside_ours(tiny_backbone):
    backbone = tiny_backbone
    reference = benchmark.ReferenceBackbone(backbone)
    count = lambda module: sum(p.numel() for p in module.parameters() if p.requires_grad)  # noqa: E731
    # The same learnable layers; ours also holds the mask token and MAE's position tables (fixed).
    assert count(reference) == count(backbone)
    images = torch.randn(1, 3, 64, 96)
    backbone.sample_ratio = reference.sample_ratio = 0.5
    ours, theirs = backbone(images), reference(images)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    lines = benchmark.reference_comparison(backbone, images, [0.5], ["fp32"], torch.device("cpu"), 1, 0)
    assert len(lines) == 1 and "ours / reference = " in lines[0] and "sample ratio 0.5, fp32" in lines[0]
    assert lines[0].endswith("x (target <= 1.00) not judged: timed without warm-up (--warmup 0)")  # timed cold


def test_compiled_backbone_is_timed_beside_eager_or_said_unavailable(tiny_backbone, monkeypatch):
    images = torch.randn(1, 3, 64, 96)
    cpu = torch.device("cpu")
    calls = []

    real_compile = torch.compile

    def counting_compile(module):  # torch.compile with dynamo's tracing alone (no C++ compiler), counted
        compiled = real_compile(module, backend="eager")
        module.register_forward_pre_hook(lambda m, inputs: calls.append(inputs[0].shape))
        return compiled

    monkeypatch.setattr(torch, "compile", counting_compile)
    lines = benchmark.reference_comparison(tiny_backbone, images, [0.25, 0.5], ["fp32"], cpu, 2, 1,
                                           compile_backbone=True)
    assert len(lines) == 2 and all("under torch.compile" in line and "of eager (compiling took" in line
                                   for line in lines)
    # Per cell, eager: one warm-up and two timed steps; compiled: the compiling step too.
    assert len(calls) == 2 * ((1 + 2) + (1 + 1 + 2))
    assert "sample ratio 0.25" in lines[0] and "sample ratio 0.5" in lines[1]
    assert all(("x (target <= 1.00) met; ours under torch.compile" in line or
                "x (target <= 1.00) NOT met; ours under torch.compile" in line) for line in lines)

    def failing_compile(module):
        def run(x):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    lines = benchmark.reference_comparison(tiny_backbone, images, [0.5], ["fp32"], cpu, 1, 0, compile_backbone=True)
    assert lines[0] == ("torch.compile is unavailable here (RuntimeError: InvalidCxxCompiler: no working C++ "
                        "compiler found): eager figures only")
    assert len(lines) == 2 and "ours / reference = " in lines[1] and "torch.compile" not in lines[1]
