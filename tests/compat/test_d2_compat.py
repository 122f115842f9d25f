"""detectron2 0.6 on today's stack: the compatibility layer, and that it touches nothing that works."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import models  # noqa: F401  (applies the compatibility layer before detectron2 is imported)
from models.compat import detectron2_06 as d2_compat

REPO = Path(__file__).resolve().parents[2]


def test_detectron2_imports_and_reports_version():
    import detectron2
    from detectron2.utils.collect_env import collect_env_info

    assert detectron2.__version__ == "0.6"
    info = collect_env_info()
    assert "detectron2" in info and "0.6" in info
    if not d2_compat.has_compiled_ops():
        assert "not compiled (pure-Python detectron2)" in info


def test_starting_a_tool_prints_no_jit_or_meshgrid_warnings():
    """fvcore scripts its losses at import, and detectron2's anchor generator calls torch.meshgrid
    without ``indexing``: PyTorch's warnings about both are hidden, other warnings are not."""
    code = textwrap.dedent("""
        import warnings
        import torch
        import models, detectron2.modeling, fvcore.nn
        from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
        anchors = DefaultAnchorGenerator(sizes=[[32]], aspect_ratios=[[1.0]], strides=[4])
        assert anchors([torch.zeros(1, 1, 4, 4)])[0].tensor.shape == (16, 4)
        torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")
        warnings.warn("a warning of the user's own")
    """)
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.jit.script" not in done.stderr and "meshgrid" not in done.stderr
    assert "a warning of the user's own" in done.stderr


def test_removed_numpy_aliases_are_served_to_detectron2_only():
    import detectron2.data.build as build
    from detectron2.structures.masks import polygons_to_bitmask

    assert build.np.int is int and build.np.float is float and build.np.bool is bool
    assert build.np.zeros is np.zeros  # everything else is numpy's own
    mask = polygons_to_bitmask([np.array([0, 0, 10, 0, 10, 10], dtype=float)], 16, 16)
    assert mask.dtype == bool and 40 < mask.sum() < 70  # right triangle of legs 10
    if not hasattr(np, "int"):  # numpy >= 1.24: numpy itself stays untouched
        with pytest.raises(AttributeError):
            np.int  # noqa: B018


def test_class_histogram_of_a_training_set():
    """data/build.py's histogram uses np.int: the path taken when a training set is loaded."""
    from detectron2.data.build import print_instances_class_histogram

    dicts = [{"annotations": [{"category_id": 0}, {"category_id": 1, "iscrowd": 0}]}]
    print_instances_class_histogram(dicts, ["a", "b"])


def test_pillow_linear_is_lent_only_for_detectron2_import():
    import PIL
    from PIL import Image

    from detectron2.data.transforms.transform import ExtentTransform

    assert ExtentTransform.__init__.__defaults__[0] == Image.BILINEAR
    if int(PIL.__version__.split(".")[0]) >= 10:  # Pillow itself stays untouched
        assert not hasattr(Image, "LINEAR")


def test_model_zoo_finds_its_configs_without_pkg_resources():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert Path(path).is_file()
    cfg = model_zoo.get_config("common/models/mask_rcnn_fpn.py")
    assert cfg.model.roi_heads.num_classes == 80


@pytest.mark.skipif(d2_compat.has_compiled_ops(), reason="detectron2 has its compiled ops")
def test_compiled_op_raises_a_clear_error():
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[10.0, 10.0, 4.0, 4.0, 30.0]])
    with pytest.raises(d2_compat.CompiledOpUnavailable, match="'box_iou_rotated'.*build detectron2 from source"):
        pairwise_iou_rotated(boxes, boxes)


@pytest.mark.skipif(d2_compat.has_compiled_ops(), reason="detectron2 has its compiled ops")
def test_coco_evaluator_falls_back_to_pycocotools():
    from pycocotools.cocoeval import COCOeval

    from detectron2.evaluation import COCOEvaluator, coco_evaluation

    assert coco_evaluation.COCOeval_opt is COCOeval
    assert hasattr(COCOEvaluator.__init__, "__wrapped__")


def _fake_packages(root: Path) -> None:
    """Stand-ins for what an older or fuller stack has: panopticapi, and caffe2 (whose modules
    answer any attribute, enough for detectron2.export to import)."""
    (root / "pkg_resources.py").write_text(
        "import importlib.resources\n"
        "def resource_filename(p, r):\n    return str(importlib.resources.files(p).joinpath(r))\n"
    )
    (root / "panopticapi").mkdir()
    (root / "panopticapi" / "__init__.py").write_text("")
    (root / "panopticapi" / "utils.py").write_text("def rgb2id(color):\n    return 'real'\n")
    answer_anything = "def __getattr__(name):\n    return type(name, (), {})\n"
    for package in ("caffe2", "caffe2/proto", "caffe2/python", "caffe2/python/onnx"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    for module in ("proto/caffe2_pb2", "python/core", "python/net_drawer", "python/workspace", "python/utils",
                   "python/onnx/backend"):
        (root / "caffe2" / f"{module}.py").write_text(answer_anything)


def test_layer_changes_nothing_on_a_stack_that_needs_nothing(tmp_path):
    """Simulate a stack with the numpy aliases, Image.LINEAR, pkg_resources, a compiled _C,
    sampling of sets (Python <= 3.10), torch schedulers that are _LRScheduler subclasses
    (torch < 2.0), caffe2 and panopticapi."""
    fake_c = tmp_path / "fake_c" / "detectron2"
    fake_c.mkdir(parents=True)
    (fake_c / "_C.py").write_text("def get_compiler_version():\n    return 'GCC 99'\n")
    _fake_packages(tmp_path)
    script = textwrap.dedent(
        f"""
        import collections.abc, json, random, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import numpy, PIL.Image as Image
        for name, value in dict(int=int, float=float, str=str, bool=bool, object=object).items():
            setattr(numpy, name, value)
        Image.LINEAR = Image.BILINEAR
        sample = random.Random.sample
        def sample_sets_too(self, population, k, *, counts=None):
            if isinstance(population, collections.abc.Set):
                population = tuple(population)
            return sample(self, population, k, counts=counts)
        random.Random.sample = sample_sets_too
        from torch.optim import lr_scheduler
        for scheduler in (lr_scheduler.StepLR, lr_scheduler.MultiStepLR):
            scheduler.__bases__ = (lr_scheduler._LRScheduler,)
        import pkg_resources as real_pkg_resources
        import detectron2
        detectron2.__path__.append({str(fake_c)!r})
        import models
        import detectron2._C, detectron2.data.build, detectron2.model_zoo.model_zoo as mz
        from detectron2.evaluation import coco_evaluation, fast_eval_api
        from detectron2.evaluation import COCOEvaluator
        import detectron2.data.common, detectron2.engine.hooks as hooks
        import detectron2.export, detectron2.export.api
        from detectron2.projects.panoptic_deeplab import dataset_mapper
        print(json.dumps(dict(
            real_c=detectron2._C.get_compiler_version() == "GCC 99",
            numpy_untouched=detectron2.data.build.np is numpy,
            pkg_resources_real=mz.pkg_resources is real_pkg_resources,
            fast_eval_kept=coco_evaluation.COCOeval_opt is fast_eval_api.COCOeval_opt,
            evaluator_unwrapped=not hasattr(COCOEvaluator.__init__, "__wrapped__"),
            linear_kept=hasattr(Image, "LINEAR"),
            random_untouched=detectron2.data.common.random is random,
            lr_hook_unwrapped=not hasattr(hooks.LRScheduler.state_dict, "__wrapped__"),
            caffe2_tracer_real=hasattr(detectron2.export.Caffe2Tracer, "export_caffe2"),
            panopticapi_real=dataset_mapper.rgb2id([0, 0, 0]) == "real",
        )))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {key: True for key in result}, result


def test_map_dataset_retries_another_index_when_the_mapper_returns_none():
    """A mapper returning None makes MapDataset retry a random other index (data/common.py);
    it drew it with ``random.sample`` of a set, a TypeError from Python 3.11 on."""
    import random

    from detectron2.data.common import MapDataset

    bad = {0, 3, 4, 7}

    def items(global_seed: int) -> list:
        random.seed(global_seed)  # MapDataset draws from its own Random(42): this must not matter
        dataset = MapDataset(list(range(8)), lambda x: None if x in bad else x * 10)
        return [dataset[i] for i in range(8)]

    first = items(0)
    assert first == items(1)
    assert [first[i] for i in (1, 2, 5, 6)] == [10, 20, 50, 60]
    assert all(value is not None and value // 10 not in bad for value in first)
    # Index 0 retries what Python <= 3.10 drew, whose sample() took tuple(the set): index 6.
    assert random.Random(42).sample(tuple(set(range(8)) - {0}), k=1) == [6] and first[0] == 60


class _Weights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, batch: torch.Tensor) -> dict:
        return {"loss": (self.weight * batch).sum()}


def _step_lr_trainer(model: torch.nn.Module, lr: float, lrs: list):
    """A SimpleTrainer with detectron2's LRScheduler hook around a torch StepLR (x0.1 every 5
    iterations), recording the lr of each iteration into ``lrs``."""
    from detectron2.engine import HookBase, SimpleTrainer, hooks

    class RecordLr(HookBase):
        def before_step(self):
            lrs.append(self.trainer.optimizer.param_groups[0]["lr"])

    def batches():
        while True:
            yield torch.ones(2)

    optimizer = torch.optim.SGD(model.parameters(), lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)
    trainer = SimpleTrainer(model, batches(), optimizer)
    trainer.register_hooks([hooks.LRScheduler(scheduler=scheduler), RecordLr()])
    return trainer, scheduler


def test_lr_scheduler_hook_resumes_a_torch_scheduler(tmp_path):
    """detectron2's test_checkpoint_resume (tests/test_engine.py): torch >= 2.0 schedulers are not
    ``_LRScheduler`` subclasses, which is all hooks.LRScheduler saved, so they restarted at 0.
    Resumed at iteration 12, such a restart would decay at 17 instead of 15."""
    from detectron2.checkpoint import Checkpointer
    from detectron2.engine import hooks

    uninterrupted: list = []
    _step_lr_trainer(_Weights(), 0.1, uninterrupted)[0].train(0, 18)

    model, before = _Weights(), []
    trainer, scheduler = _step_lr_trainer(model, 0.1, before)
    checkpointer = Checkpointer(model, str(tmp_path), optimizer=trainer.optimizer, trainer=trainer)
    trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, 10)])  # saves model_final at the end
    trainer.train(0, 12)
    assert scheduler.last_epoch == 12
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)

    after: list = []
    trainer, scheduler = _step_lr_trainer(model, 999.0, after)  # lr and schedule come from the checkpoint
    Checkpointer(model, str(tmp_path), optimizer=trainer.optimizer, trainer=trainer).resume_or_load("absent.pth")
    assert trainer.iter == 11  # the last iteration done
    assert scheduler.last_epoch == 12  # scheduler.step() calls so far
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    trainer.train(trainer.iter + 1, 18)
    assert before + after == pytest.approx(uninterrupted)
    assert scheduler.last_epoch == 18


@pytest.mark.skipif(d2_compat._module_exists("caffe2"), reason="caffe2 is installed")
def test_detectron2_export_imports_without_caffe2():
    """export/__init__.py star-imports api.py, whose first lines import caffe2."""
    import detectron2.export as export
    from detectron2.export.flatten import TracingAdapter
    from detectron2.export.torchscript import dump_torchscript_IR, scripting_with_instances
    from detectron2.utils.analysis import FlopCountAnalysis  # noqa: F401  (imports detectron2.export)

    assert export.TracingAdapter is TracingAdapter
    assert export.dump_torchscript_IR is dump_torchscript_IR
    assert export.scripting_with_instances is scripting_with_instances


@pytest.mark.skipif(d2_compat._module_exists("caffe2"), reason="caffe2 is installed")
def test_caffe2_export_api_raises_a_clear_error():
    from detectron2 import export

    clear = r"caffe2 export is unsupported with this torch.*removed from PyTorch.*TracingAdapter.*torch\.export"
    calls = {
        "Caffe2Tracer": lambda: export.Caffe2Tracer(None, torch.nn.Identity(), []),
        "Caffe2Model": lambda: export.Caffe2Model(None, None),
        "Caffe2Model.load_protobuf": lambda: export.Caffe2Model.load_protobuf("model_dir"),
        "add_export_config": lambda: export.add_export_config(None),
        "export_caffe2_model": lambda: export.export_caffe2_model(None, None, None),
        "export_onnx_model": lambda: export.export_onnx_model(None, None, None),
    }
    for name, call in calls.items():
        with pytest.raises(d2_compat.Caffe2ExportUnsupported, match=rf"detectron2\.export\.{name}: {clear}"):
            call()
    with pytest.raises(ModuleNotFoundError, match=rf"caffe2_modeling needs caffe2: {clear}"):
        import detectron2.export.caffe2_modeling  # noqa: F401


# --- detectron2 with OpenCV, and its projects ---


def test_visualizer_draws_instance_predictions():
    """Visualizer draws boxes, labels and masks (OpenCV finds the mask's contours)."""
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.visualizer import ColorMode, Visualizer

    image = np.zeros((100, 120, 3), dtype=np.uint8)
    instances = Instances((100, 120))
    instances.pred_boxes = Boxes(torch.tensor([[20.0, 30.0, 80.0, 90.0]]))  # x0, y0, x1, y1
    instances.scores = torch.tensor([0.9])
    instances.pred_classes = torch.tensor([0])
    instances.pred_masks = torch.zeros(1, 100, 120, dtype=torch.bool)
    instances.pred_masks[0, 45:80, 30:70] = True
    # A red class colour (jittered, its red stays 1.0), so every drawn pixel differs from black.
    metadata = MetadataCatalog.get("d2_compat_visualizer").set(thing_classes=["cat"], thing_colors=[(255, 0, 0)])
    drawn = Visualizer(image, metadata, instance_mode=ColorMode.SEGMENTATION).draw_instance_predictions(instances)
    out = drawn.get_image()

    assert out.shape == image.shape and out.dtype == np.uint8
    changed = np.any(out != image, axis=2)
    assert changed[30, 20:81].all() and changed[90, 20:81].all()  # top and bottom edges of the box
    assert changed[30:91, 20].all() and changed[30:91, 80].all()  # left and right edges
    assert changed[50:75, 35:65].all()  # inside the mask
    assert not changed[95:, :].any() and not changed[:, 90:].any()  # far from the box
    assert out[60, 50, 0] > out[60, 50, 1:].max()  # the mask is red


def test_random_rotation_rotates_image_and_boxes():
    """RandomRotation / RotationTransform (cv2.warpAffine): 90 degrees counter-clockwise with
    ``expand`` maps (x, y) of a 60x40 (w x h) image to (y, 60 - x) of a 40x60 one."""
    from detectron2.data import transforms as T

    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[5:15, 10:30] = 255  # the box below, filled
    boxes = np.array([[10.0, 5.0, 30.0, 15.0]])
    expected = np.array([[5.0, 30.0, 15.0, 50.0]])

    aug_input = T.AugInput(image, boxes=boxes)
    transform = T.RandomRotation(angle=[90, 90], expand=True, sample_style="range")(aug_input)
    assert isinstance(transform, T.RotationTransform)
    assert aug_input.image.shape == (60, 40, 3)
    np.testing.assert_allclose(aug_input.boxes, expected, atol=1e-4)
    ys, xs = np.nonzero(aug_input.image[..., 0] > 127)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (5, 15, 30, 50)

    rotation = T.RotationTransform(40, 60, 90, expand=True)
    np.testing.assert_allclose(rotation.apply_box(boxes), expected, atol=1e-4)
    np.testing.assert_array_equal(rotation.apply_image(image), aug_input.image)


def test_detectron2_projects_import():
    import detectron2.projects.deeplab as deeplab
    import detectron2.projects.panoptic_deeplab as panoptic_deeplab
    import detectron2.projects.point_rend as point_rend

    assert callable(point_rend.add_pointrend_config)
    assert callable(deeplab.add_deeplab_config)
    assert callable(panoptic_deeplab.add_panoptic_deeplab_config)


@pytest.mark.skipif(d2_compat._module_exists("panopticapi"), reason="panopticapi is installed")
def test_panoptic_deeplab_gets_rgb2id_only_for_its_import():
    """Panoptic-DeepLab's dataset mapper imports panopticapi.utils.rgb2id (panopticapi is not on PyPI)."""
    import sys

    from detectron2.projects.panoptic_deeplab import dataset_mapper

    colors = np.array([[[1, 2, 3], [255, 255, 255]]], dtype=np.uint8)
    ids = dataset_mapper.rgb2id(colors)
    np.testing.assert_array_equal(ids, [[1 + 2 * 256 + 3 * 256**2, 256**3 - 1]])
    assert dataset_mapper.rgb2id([1, 2, 3]) == 1 + 2 * 256 + 3 * 256**2
    assert "panopticapi" not in sys.modules and "panopticapi.utils" not in sys.modules


@pytest.mark.parametrize("writer", ["pillow", "opencv"])
def test_16_bit_grayscale_images_are_scaled_not_clipped_to_white(tmp_path, writer):
    from detectron2.data.detection_utils import read_image
    from PIL import Image

    import cv2

    values = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    path = tmp_path / "sixteen_bit.png"
    Image.fromarray(values).save(path) if writer == "pillow" else cv2.imwrite(str(path), values)
    assert Image.open(path).mode in ("I;16", "I")
    expected = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    for image_format in ("BGR", "RGB"):
        image = read_image(str(path), format=image_format)
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8
        assert all(np.array_equal(image[..., c], expected) for c in range(3))
    assert (image == 255).mean() < 0.01  # detectron2 alone clipped every pixel above 255 to white


@pytest.mark.parametrize("given, kept", [(None, "16384"), ("99", "99")])
def test_importing_models_makes_room_for_onednn_primitives_unless_told_otherwise(given, kept):
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if given is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = given
    code = "import os, models; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == kept
