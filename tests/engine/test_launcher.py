"""lazyconfig_train_net.py end to end on a generated COCO-format dataset, on the CPU.

train (4 iterations, checkpoints every 2) -> --resume to 6 iterations -> --eval-only prints
AP; plus the launcher's errors, and released-format checkpoints loading without leftovers.
"""
import copy
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import models  # noqa: F401  (before detectron2)
import portalocker
import pytest
import torch
import yaml
from detectron2.config import instantiate
from detectron2.utils.events import EventStorage

from models.checkpoint import SafeDetectionCheckpointer
from models.config import load_config
from models.engine import loops, trainer

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/test/tiny_mimdet.py"
VIT_B = "configs/mimdet/mimdet_vit_base_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x.py"


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_coco_writer, dataset_overrides):
    root = tmp_path_factory.mktemp("toy_coco")
    json_file = toy_coco_writer(root)
    overrides = [
        *dataset_overrides("toy", json_file, root / "images"),
        f"train.output_dir={root / 'out'}",
    ]
    return root / "out", overrides


def launch(*args: str) -> subprocess.CompletedProcess:
    # One thread: on 2 shared cores, OpenMP threads of concurrent processes wait on each other.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "lazyconfig_train_net.py", "--config-file", TINY, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def iterations(output_dir: Path) -> list:
    lines = (output_dir / "metrics.json").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if "total_loss" in line]


@pytest.fixture(scope="module")
def trained(toy):
    output_dir, overrides = toy
    result = launch("--num-gpus", "1", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_writes_checkpoints_and_metrics(toy, trained):
    output_dir, overrides = toy
    log = trained.stdout + trained.stderr
    assert "running on CPU" in log
    assert "num_classes 80 -> 2" in log
    # The run's config.yaml holds the config it ran with, fitted to this machine and the data.
    saved = yaml.unsafe_load((output_dir / "config.yaml").read_text())
    assert saved["model"]["roi_heads"]["num_classes"] == 2 and saved["train"]["device"] == "cpu"
    assert not list(output_dir.glob("*.partial"))
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint"} <= set(
        os.listdir(output_dir)
    )
    assert iterations(output_dir) == [0, 1, 2, 3]
    assert "eta:" in log  # detectron2's console writer
    # The checkpoints name the classes and their json category ids (tools/infer.py reports those).
    json_file = next(o for o in overrides if o.startswith("datasets.register=")).split("json_file:'")[1].split("'")[0]
    categories = sorted(json.loads(Path(json_file).read_text())["categories"], key=lambda c: c["id"])
    config = torch.load(output_dir / "model_final.pth", weights_only=True)["config"]
    assert (config["classes"], config["category_ids"]) == (repr([c["name"] for c in categories]),
                                                            repr([c["id"] for c in categories]))


def test_resume_continues_at_next_iteration(toy, trained):
    output_dir, overrides = toy
    result = launch("--num-gpus", "1", "--resume", *overrides, "train.max_iter=6", "train.checkpointer.max_to_keep=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model_final.pth" in result.stdout + result.stderr  # resumed from it
    assert ("--resume with a changed setting, which takes effect from here on: train.max_iter: 4 -> 6"
            in result.stdout + result.stderr)
    assert iterations(output_dir) == [0, 1, 2, 3, 4, 5]
    # The checkpoints of the first part count towards max_to_keep: the oldest one went.
    assert sorted(p.name for p in output_dir.glob("model_*.pth")) == [
        "model_0000003.pth", "model_0000005.pth", "model_final.pth"]


@pytest.mark.parametrize("change, messages", [
    ("optimizer.lr=0.05", ["--resume cannot apply these changes", "optimizer.lr: 0.0001 in the checkpoint, 0.05 now",
                           "train.init_checkpoint=<checkpoint> in another train.output_dir"]),
    ("train.seed=3", ["--resume cannot apply these changes", "in the checkpoint, 3 now"]),
    ("model.roi_heads.box_head.fc_dims=[16]", ["model_final.pth: checkpoint is for another architecture",
                                              "roi_heads.box_head.fc1.weight: checkpoint ("]),
    # a layer more, or a layer less, with every shared entry of the same shape
    ("model.roi_heads.box_head.fc_dims=[128,128]", ["was saved by another architecture",
                                                    "the model's roi_heads.box_head.fc2.* are not in it"]),
    ("model.roi_heads.mask_head.conv_dims=[64]", ["was saved by another architecture",
                                                  "it holds roi_heads.mask_head.mask_fcn1.*"]),
], ids=["lr", "seed", "architecture", "added-layer", "removed-layer"])
def test_resume_refuses_changes_that_cannot_take_effect_and_leaves_the_run_as_it_was(toy, trained, tmp_path, change,
                                                                                    messages):
    output_dir, overrides = toy
    shutil.copytree(output_dir, tmp_path / "run")
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("metrics.json", "config.yaml")}
    # train.max_iter=6: this folder's run has 4 or (resumed by the test above) 6 iterations
    result = launch("--num-gpus", "1", "--resume", *overrides, f"train.output_dir={tmp_path / 'run'}",
                    "train.max_iter=6", change)
    assert result.returncode == 1
    assert [m for m in messages if m not in result.stderr] == [], result.stderr[-1500:]
    # Refused while the run was set up: one line on the console, the traceback in its log file.
    assert "Traceback" not in result.stderr
    assert "The run was refused before it began:\nTraceback" in (tmp_path / "run" / "log.txt").read_text()
    # The run's record is untouched: its metrics (the final AP among them) and the config it ran with.
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(p.name for p in output_dir.iterdir())


def test_eval_only_prints_ap_and_writes_beside_the_training_run_not_over_it(toy, trained):
    output_dir, overrides = toy
    checkpoint = output_dir / "model_0000003.pth"
    # As if training were still going on there: a live process holds the run folder.
    with open(output_dir / ".lock", "a+") as held:
        portalocker.lock(held, portalocker.LOCK_EX | portalocker.LOCK_NB)
        held.seek(0), held.truncate(), held.write("4242"), held.flush()
        run_files = {p.name: p.read_bytes() for p in output_dir.iterdir() if p.is_file()}
        result = launch("--num-gpus", "1", "--eval-only", *overrides, f"train.init_checkpoint={checkpoint}",
                        "model.backbone.bottom_up.sample_ratio=1.0")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    assert "copypaste: Task: bbox" in log and "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    # The folder holds a training run: the evaluation's config, log and predictions go to eval/.
    assert f"--eval-only: the log, config.yaml and the evaluator's files go to {output_dir / 'eval'}" in log
    assert {"config.yaml", "log.txt", "coco_instances_results.json"} <= set(os.listdir(output_dir / "eval"))
    saved = yaml.unsafe_load((output_dir / "eval" / "config.yaml").read_text())
    assert saved["train"]["init_checkpoint"] == str(checkpoint)
    assert {name: (output_dir / name).read_bytes() for name in run_files} == run_files  # .lock too


def test_a_training_set_without_annotations_is_one_line(tmp_path, toy_coco_writer):
    """detectron2's loader asserts that a training set has annotations: refused while the run is
    set up, so one line, the traceback in the run's log.txt."""
    json_file = toy_coco_writer(tmp_path)
    data = json.loads(json_file.read_text())
    data["annotations"] = []
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(data))
    images = tmp_path / "images"
    result = launch("--num-gpus", "1", f"datasets.register=[{{name:no_annotations,json_file:'{empty}',"
                    f"image_root:'{images}'}},{{name:fine,json_file:'{json_file}',image_root:'{images}'}}]",
                    "dataloader.train.dataset.names=no_annotations", "dataloader.test.dataset.names=fine",
                    f"train.output_dir={tmp_path / 'out'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("lazyconfig_train_net.py: error: No valid data found in "
                                                      "no_annotations.")


def test_eval_only_names_an_eval_file_in_the_way(toy, trained, tmp_path):
    output_dir, overrides = toy
    shutil.copytree(output_dir, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    (tmp_path / "run" / "eval").write_text("notes")
    result = launch("--num-gpus", "1", "--eval-only", *overrides, f"train.output_dir={tmp_path / 'run'}",
                    f"train.init_checkpoint={output_dir / 'model_final.pth'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"train.output_dir {tmp_path / 'run' / 'eval'} cannot hold a run" in result.stderr, result.stderr[-1500:]


def test_a_drawn_seed_repeats_its_run_when_given(toy, trained, tmp_path):
    """train.seed=-1 draws a seed and logs it; train.seed=<it> trains the same weights (one thread)."""
    output_dir, overrides = toy
    drawn = re.search(r"train.seed=-1: this run's seed is (\d+)", trained.stdout + trained.stderr)
    assert drawn
    result = launch("--num-gpus", "1", *overrides, f"train.output_dir={tmp_path}", f"train.seed={drawn.group(1)}")
    assert result.returncode == 0, result.stderr[-3000:]
    again = torch.load(tmp_path / "model_0000003.pth", weights_only=True)
    first = torch.load(output_dir / "model_0000003.pth", weights_only=True)
    assert again["seed"] == first["seed"] == int(drawn.group(1))
    assert [k for k in first["model"] if not torch.equal(first["model"][k], again["model"][k])] == []
    # Resumed without repeating train.seed (-1, the default), the run keeps its own seed.
    result = launch("--num-gpus", "1", "--resume", *overrides, f"train.output_dir={tmp_path}", "train.max_iter=5")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert resumed["iteration"] == 4 and resumed["seed"] == int(drawn.group(1))
    assert resumed["config"]["train.seed"] == drawn.group(1)
    assert "this run's seed is" not in result.stdout + result.stderr  # only the run's own, kept one is named
    assert f"--resume: the run's seed is {drawn.group(1)}, from its checkpoint" in result.stdout + result.stderr
    # The -1 run's config.yaml names the drawn seed, and the run resumes with it given.
    assert yaml.unsafe_load((output_dir / "config.yaml").read_text())["train"]["seed"] == int(drawn.group(1))
    shutil.copytree(output_dir, tmp_path / "given", ignore=shutil.ignore_patterns("eval", ".lock"))
    result = launch("--num-gpus", "1", "--resume", *overrides, f"train.output_dir={tmp_path / 'given'}",
                    "train.max_iter=7", f"train.seed={drawn.group(1)}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "given" / "model_final.pth", weights_only=True)["iteration"] == 6


def test_more_gpus_than_available_is_a_clear_error(toy):
    result = launch("--num-gpus", "2", *toy[1])
    assert result.returncode != 0
    assert "--num-gpus 2 asked for, but this machine has no CUDA GPU" in result.stderr
    assert "--num-cpu-processes 2" in result.stderr


def test_unknown_override_key_is_named(toy):
    result = launch("--num-gpus", "1", *toy[1], "train.max_iters=3")
    assert result.returncode == 1
    # One line, not a traceback: the user's input is at fault, not the code.
    assert result.stderr.strip().splitlines()[-1].startswith(
        "lazyconfig_train_net.py: error: unknown config key 'train.max_iters'")
    assert "Traceback" not in result.stderr


def _ctrl_c_as_in_a_terminal() -> None:
    """Run by the child before exec: SIGINT back to its default action, so that Python raises
    KeyboardInterrupt for it. A job started in the background of a script (as CI may start the
    tests) inherits SIGINT ignored, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_training_is_one_line_and_exit_status_130(toy, tmp_path):
    output_dir = tmp_path / "interrupted"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "lazyconfig_train_net.py", "--config-file", TINY, "--num-gpus", "1", *toy[1],
         f"train.output_dir={output_dir}", "train.max_iter=100000"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=_ctrl_c_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 240
        while not (output_dir / "log.txt").is_file() or "Starting training" not in (output_dir / "log.txt").read_text():
            assert process.poll() is None and time.monotonic() < deadline, "the launcher did not start training"
            time.sleep(0.5)
        time.sleep(1.0)  # into the training steps
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "lazyconfig_train_net.py: interrupted; --resume continues from the last checkpoint")


def test_ctrl_c_while_the_launcher_loads_is_one_line_too(toy, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "lazyconfig_train_net.py", "--config-file", TINY, *toy[1],
         f"train.output_dir={tmp_path / 'never'}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=_ctrl_c_as_in_a_terminal)
    time.sleep(0.5)  # torch and detectron2 take seconds to import
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines() == ["lazyconfig_train_net.py: interrupted"]


def test_a_dataset_not_downloaded_is_named_before_the_run_folder_is_made(tmp_path):
    result = launch("--num-gpus", "1", f"train.output_dir={tmp_path / 'run'}", "train.max_iter=2",
                    "dataloader.train.dataset.names=coco_2017_train")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "lazyconfig_train_net.py: error: dataset 'coco_2017_train': annotation file ")
    assert not (tmp_path / "run").exists()


def test_a_value_the_model_refuses_is_named_before_launch(toy):
    result = launch("--num-gpus", "1", *toy[1], "model.backbone.bottom_up.sample_ratio=0")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-2:] == [
        "lazyconfig_train_net.py: error: config values the launcher cannot use:",
        "  model.backbone.bottom_up.sample_ratio must be a number in (0, 1], got 0"]
    assert "Traceback" not in result.stderr


def test_released_checkpoint_loads_without_missing_or_unexpected_keys(tmp_path, interop, random_weights):
    released = random_weights(interop("mimdet_vit_b_maskfill_grid50.tsv"))
    path = tmp_path / "mimdet_vit_base_released.pth"
    torch.save({"model": released}, path)

    model = instantiate(load_config(str(REPO / VIT_B)).model)
    SafeDetectionCheckpointer(model).load(str(path))
    state = model.state_dict()
    assert set(state) == set(released)
    mismatched = [k for k, v in released.items() if not torch.equal(state[k], v.to(state[k].dtype))]
    assert mismatched == []


def test_amp_settings_resolve_per_device_and_evaluation_is_fp32_unless_asked(monkeypatch):

    def dtypes(config, *overrides):
        cfg = load_config(config, ["train.device=cpu", *overrides])
        return loops.amp_dtype(cfg), loops.amp_dtype(cfg, evaluation=True)

    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert dtypes(VIT_B) == (torch.bfloat16, None)  # the COCO configs: autocast in training only
    assert dtypes(TINY) == (None, None)
    assert dtypes(TINY, "train.amp.enabled=True") == (torch.bfloat16, None)
    assert dtypes(TINY, "train.amp.enabled=True", "train.amp.eval=True") == (torch.bfloat16, torch.bfloat16)
    assert dtypes(TINY, "train.amp.eval=True", "train.amp.dtype=bf16") == (None, torch.bfloat16)
    # A CPU without native bf16 (AVX2 only) trains and evaluates in fp32 unless bf16 is named.
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    assert dtypes(VIT_B) == (None, None)
    assert dtypes(TINY, "train.amp.enabled=True", "train.amp.eval=True") == (None, None)
    assert dtypes(TINY, "train.amp.enabled=True", "train.amp.dtype=bf16") == (torch.bfloat16, None)
    assert dtypes(TINY, "train.amp.enabled=True", "train.amp.dtype=None") == (None, None)
    assert dtypes(TINY, "train.amp.enabled=True", "train.device=cuda") == (torch.float16, None)


def test_kernels_capped_below_bf16_make_the_demo_train_in_fp32():
    """Unpatched, in fresh processes: with oneDNN, ATen and MKL held to AVX2 (the kernels of a CPU
    without AVX512), or oneDNN alone to AVX512 without BF16 (those of Intel Skylake to Ice Lake),
    the demo config trains in fp32; without a cap the choice follows this CPU."""
    probe = ("import models; from models.config import load_config; from models.engine import loops, trainer; "
             "cfg = load_config('configs/demo/mimdet_shapes.py', ['train.device=cpu']); "
             "print(trainer.cpu_has_native_bf16(), loops.amp_dtype(cfg))")
    repo = Path(__file__).resolve().parents[2]

    def run(**caps):
        env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
        out = subprocess.run([sys.executable, "-c", probe], cwd=repo, env={**env, **caps}, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    avx2 = dict(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    assert run(**avx2) == ["False", "None"]
    assert run(ONEDNN_MAX_CPU_ISA="avx512_core") == ["False", "None"]
    native = run()
    assert native in (["True", "torch.bfloat16"], ["False", "None"])
    if torch.cpu._is_avx512_bf16_supported():  # this CPU's own bf16 kernels, named as the cap
        assert run(ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16") == ["True", "torch.bfloat16"]


@pytest.mark.parametrize("dtype, message", [
    (None, "running in fp32 (train.amp.dtype=bf16 forces bf16)"),
    ("bf16", "train.amp.dtype=bf16 on a CPU without native bf16"),
], ids=["default", "explicit_bf16"])
def test_prepare_says_what_a_cpu_without_native_bf16_runs(toy, monkeypatch, dtype, message):
    _, overrides = toy
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    cfg = load_config(TINY, [*overrides, "train.device=cpu", "train.amp.enabled=True", f"train.amp.dtype={dtype}"])
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    loops.logger.addHandler(handler)  # detectron2's logger does not propagate to pytest's caplog
    try:
        loops.prepare(cfg)
    finally:
        loops.logger.removeHandler(handler)
    assert len([w for w in warnings if message in w]) == 1
    assert cfg.train.amp.dtype == dtype  # "dtype=None" reaches the config as None, not the string 'None'


@pytest.mark.parametrize("asked", [None, "", "+", "++"], ids=["config_default", "command_line", "plus", "plus_plus"])
def test_a_class_count_asked_for_on_the_command_line_is_replaced_with_a_warning(toy, asked):
    """The classes follow the training json; an explicit model.roi_heads.num_classes=N that
    disagrees is named in a warning (with the json's classes), a config default in an info line."""
    _, overrides = toy
    extra = [] if asked is None else [f"{asked}model.roi_heads.num_classes=5"]
    cfg = load_config(TINY, [*overrides, "train.device=cpu", *extra])
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    level = loops.logger.level
    loops.logger.addHandler(handler)  # detectron2's logger does not propagate to pytest's caplog
    loops.logger.setLevel(logging.INFO)
    try:
        loops.prepare(cfg, overrides=[*overrides, *extra])
    finally:
        loops.logger.removeHandler(handler)
        loops.logger.setLevel(level)
    assert cfg.model.roi_heads.num_classes == 2
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING and "num_classes" in r.getMessage()]
    if asked is not None:
        assert len(warned) == 1 and "num_classes=5 on the command line is replaced by 2" in warned[0]
        assert "training set's json" in warned[0]
    else:
        assert warned == []
        assert any("num_classes 80 -> 2" in r.getMessage() for r in records)


@pytest.mark.parametrize("eval_autocast, dtype", [(None, torch.float32), (True, torch.bfloat16)],
                         ids=["default_fp32", "explicit_autocast"])
def test_evaluation_precision(toy, monkeypatch, eval_autocast, dtype):
    """Training under autocast evaluates in fp32, as the original; train.amp.eval=True opts in."""

    _, overrides = toy
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)  # bf16 by default, as with AVX512
    chosen = [] if eval_autocast is None else [f"train.amp.eval={eval_autocast}"]
    cfg = load_config(TINY, [*overrides, "train.device=cpu", "train.amp.enabled=True", *chosen,
                                      "model.roi_heads.box_predictor.test_topk_per_image=5"])
    loops.prepare(cfg, eval_only=True)
    model = loops.build_model(cfg)
    seen = []
    model.roi_heads.box_predictor.register_forward_hook(lambda module, inputs, out: seen.append(out[0].dtype))
    results = loops.do_test(cfg, model)
    assert seen == [dtype] * 8
    assert {"bbox", "segm"} <= set(results)


def test_cpu_models_store_convolution_weights_channels_last(toy):
    """train.channels_last on CPU: every conv weight channels-last, the same losses as NCHW weights."""
    _, overrides = toy
    cfg = load_config(TINY, [*overrides, "train.device=cpu", "dataloader.train.num_workers=0"])
    loops.prepare(cfg)
    assert not cfg.train.channels_last  # off by default
    default = loops.build_model(cfg)
    assert not default.backbone.fpn_output2.weight.is_contiguous(memory_format=torch.channels_last)
    cfg.train.channels_last = True
    model = loops.build_model(cfg)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert not nchw.backbone.fpn_output2.weight.is_contiguous(memory_format=torch.channels_last)
    batch = next(iter(loops.build_train_loader(cfg, seed=0, start_iter=0)))
    losses = []
    for net in (model, nchw):
        torch.manual_seed(0)  # the same kept tokens and sampled RoIs
        with EventStorage(0):
            losses.append(net(copy.deepcopy(batch)))
    assert losses[0].keys() == losses[1].keys()
    for name in losses[0]:
        torch.testing.assert_close(losses[0][name], losses[1][name], rtol=1e-4, atol=1e-5)


def test_resume_after_the_training_json_changed_warns(toy, trained, tmp_path, dataset_overrides):
    output_dir, overrides = toy
    shutil.copytree(output_dir, tmp_path / "run")
    json_file = next(o for o in overrides if o.startswith("datasets.register")).split("json_file:'")[1].split("'")[0]
    data = json.loads(Path(json_file).read_text())
    data["images"] = data["images"][:-2]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in {i["id"] for i in data["images"]}]
    (tmp_path / "edited.json").write_text(json.dumps(data))
    edited = dataset_overrides("toy", tmp_path / "edited.json", Path(json_file).parent / "images")
    result = launch("--num-gpus", "1", "--resume", *edited, f"train.output_dir={tmp_path / 'run'}",
                    f"train.max_iter={len(iterations(tmp_path / 'run')) + 1}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "which takes effect from here on: data.toy.json_sha256: " in result.stdout + result.stderr


def test_resume_with_fewer_iterations_than_done_is_named(toy, trained, tmp_path):
    output_dir, overrides = toy
    shutil.copytree(output_dir, tmp_path / "run")
    result = launch("--num-gpus", "1", "--resume", *overrides, f"train.output_dir={tmp_path / 'run'}",
                    "train.max_iter=2")
    assert result.returncode != 0
    done = len(iterations(tmp_path / "run"))  # 4, or 6 after the resume test
    assert (f"model_final.pth holds {done} iterations, more than train.max_iter=2; pass train.max_iter={done} or more"
            in result.stderr)


def test_eval_only_refuses_a_checkpoint_of_other_class_names(toy, trained, tmp_path):
    output_dir, overrides = toy
    cfg = load_config(TINY, overrides)
    loops.prepare(cfg, eval_only=True)
    extra = {"config": {"classes": "['blue', 'red']"}}
    with pytest.raises(ValueError, match=r"trained on the classes \['blue', 'red'\], the test set toy has \['red', "
                                         r"'blue'\]: its predictions would be scored under other names"):
        loops.check_classes(extra, cfg)
    loops.check_classes({"config": {"classes": "['red', 'blue']"}}, cfg)
    loops.check_classes({}, cfg)  # released checkpoints keep no classes


def test_environment_table_logs_no_cuda_warning_on_cpu():
    """detectron2's collect_env_info imports torch.utils.cpp_extension, which warns "No CUDA runtime
    is found" on a CPU machine with a CUDA toolkit folder; the run's log shows the table without it."""
    def stderr_of(call):
        code = f"import models\nfrom models.engine import loops\nloops.{call}()"
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stderr

    if "No CUDA runtime" not in stderr_of("collect_env_info"):
        pytest.skip("torch warns of no CUDA runtime only where it finds a CUDA toolkit and no GPU")
    assert "No CUDA runtime" not in stderr_of("environment_info")


def test_resume_over_only_damaged_checkpoints_is_one_line(toy, tmp_path):
    """--resume into a folder whose checkpoints all fail to read refuses to start over them, in one
    line, and leaves them where they are."""
    _, overrides = toy
    damaged = tmp_path / "model_final.pth"
    damaged.write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a zip cut after its first header
    result = launch("--resume", *overrides, f"train.output_dir={tmp_path}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"lazyconfig_train_net.py: error: --resume: none of the 1 checkpoint(s) in {tmp_path} can be read "
        "(model_final.pth); refusing to start from scratch over them. Move them away to start a new run.")
    assert damaged.read_bytes() == b"PK\x03\x04" + b"\0" * 100
