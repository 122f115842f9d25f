"""detectron2 0.6 on today's stack: the compatibility layer, and that it touches nothing that works."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import models  # noqa: F401  (applies the compatibility layer before detectron2 is imported)
from models import d2_compat

REPO = Path(__file__).resolve().parents[1]


def test_detectron2_imports_and_reports_version():
    import detectron2
    from detectron2.utils.collect_env import collect_env_info

    assert detectron2.__version__ == "0.6"
    info = collect_env_info()
    assert "detectron2" in info and "0.6" in info
    if not d2_compat.has_compiled_ops():
        assert "not compiled (pure-Python detectron2)" in info


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
    import torch

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


def test_layer_changes_nothing_on_a_stack_that_needs_nothing(tmp_path):
    """Simulate a stack with the numpy aliases, Image.LINEAR, pkg_resources and a compiled _C."""
    fake_c = tmp_path / "fake_c" / "detectron2"
    fake_c.mkdir(parents=True)
    (fake_c / "_C.py").write_text("def get_compiler_version():\n    return 'GCC 99'\n")
    (tmp_path / "pkg_resources.py").write_text(
        "import importlib.resources\n"
        "def resource_filename(p, r):\n    return str(importlib.resources.files(p).joinpath(r))\n"
    )
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import numpy, PIL.Image as Image
        for name, value in dict(int=int, float=float, str=str, bool=bool, object=object).items():
            setattr(numpy, name, value)
        Image.LINEAR = Image.BILINEAR
        import pkg_resources as real_pkg_resources
        import detectron2
        detectron2.__path__.append({str(fake_c)!r})
        import models
        import detectron2._C, detectron2.data.build, detectron2.model_zoo.model_zoo as mz
        from detectron2.evaluation import coco_evaluation, fast_eval_api
        from detectron2.evaluation import COCOEvaluator
        print(json.dumps(dict(
            real_c=detectron2._C.get_compiler_version() == "GCC 99",
            numpy_untouched=detectron2.data.build.np is numpy,
            pkg_resources_real=mz.pkg_resources is real_pkg_resources,
            fast_eval_kept=coco_evaluation.COCOeval_opt is fast_eval_api.COCOeval_opt,
            evaluator_unwrapped=not hasattr(COCOEvaluator.__init__, "__wrapped__"),
            linear_kept=hasattr(Image, "LINEAR"),
        )))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {key: True for key in result}, result
