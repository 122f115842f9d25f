"""Run detectron2 0.6's Python sources on today's stack, touching nothing that works.

detectron2 0.6 (2021) meets things that are gone or may be missing today:

* its compiled extension ``detectron2._C`` (absent from a pure-Python install);
* numpy's ``np.int/float/str/bool/object`` aliases (removed in numpy 1.24);
* Pillow's ``Image.LINEAR`` (removed in Pillow 10), read as a default argument at import;
* setuptools' ``pkg_resources`` (removed in setuptools 81), imported by ``model_zoo``;
* ``random.sample`` of a set (removed in Python 3.11): ``data/common.py``'s ``MapDataset``
  draws its retry index that way whenever a mapper returns None (say, an image whose
  annotations were all cropped away), so that fallback raised TypeError;
* ``torch.optim.lr_scheduler._LRScheduler`` as the base of every scheduler (torch >= 2.0
  bases them on ``LRScheduler``; ``_LRScheduler`` is only a subclass kept for old code):
  ``hooks.LRScheduler`` saves and restores only ``_LRScheduler`` instances
  (``engine/hooks.py``), so a torch scheduler such as ``StepLR`` was silently not resumed;
  detectron2's own ``LRMultiplier`` still derives from ``_LRScheduler`` and was unaffected;
* caffe2 (no longer shipped with PyTorch; its Python package was deleted in 2024,
  pytorch/pytorch#125143): ``detectron2/export/__init__.py`` star-imports
  ``api.py``, which imports caffe2 at the top, so ``import detectron2.export`` failed, and
  with it ``TracingAdapter``, the TorchScript helpers and ``detectron2.utils.analysis``;
* ``panopticapi`` (not on PyPI), whose ``rgb2id`` the Panoptic-DeepLab project's dataset
  mapper imports at the top, so ``import detectron2.projects.panoptic_deeplab`` failed.

:func:`apply` installs one import hook that fixes each of them only where it is missing,
and only inside detectron2: numpy, Pillow, ``random`` and torch themselves are never
modified, and a detectron2 built from source keeps its real ``_C`` and its fast COCO
evaluator. Without caffe2, ``detectron2.export`` keeps everything that does not need it;
its caffe2 API (``Caffe2Tracer``, ``Caffe2Model``, ``add_export_config``, ...) raises
:class:`Caffe2ExportUnsupported`, which points to ``TracingAdapter`` + ``torch.jit.trace``
or ``torch.export``. It must run before detectron2 is first imported; ``import models``
does that.
"""
import collections.abc
import functools
import importlib.abc
import importlib.machinery
import importlib.resources
import importlib.util
import logging
import random
import sys
import types
from typing import Callable, Dict, Optional, Sequence

import numpy

__all__ = ["apply", "has_compiled_ops", "CompiledOpUnavailable", "Caffe2ExportUnsupported"]

logger = logging.getLogger(__name__)

_NUMPY_ALIASES = {"int": int, "float": float, "str": str, "bool": bool, "object": object}
_BUILD_HINT = (
    "this detectron2 is the pure-Python install, without compiled ops. MIMDet does not need "
    "them; to use them, build detectron2 from source (see README, 'detectron2 with compiled "
    "ops'): pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'"
)
_CAFFE2_HINT = (
    "caffe2 export is unsupported with this torch: caffe2 was removed from PyTorch. Export with "
    "detectron2.export.TracingAdapter and torch.jit.trace (see detectron2's tools/deploy/export_model.py, "
    "--export-method tracing), detectron2.export.scripting_with_instances, or torch.export instead"
)


class CompiledOpUnavailable(RuntimeError):
    """Raised when code calls an op of detectron2's compiled extension that is not built."""


class Caffe2ExportUnsupported(RuntimeError):
    """Raised by detectron2's caffe2 export API (``Caffe2Tracer``, ...) where caffe2 is absent."""


class _CompiledOpsPlaceholder(types.ModuleType):
    """Stands in for ``detectron2._C``: answers what ``collect_env`` asks, refuses the ops."""

    def __init__(self) -> None:
        super().__init__("detectron2._C", "Placeholder for detectron2's compiled extension.")

    @staticmethod
    def get_compiler_version() -> str:
        return "not compiled (pure-Python detectron2)"

    @staticmethod
    def get_cuda_version() -> str:
        return "not compiled (pure-Python detectron2)"

    @staticmethod
    def has_cuda() -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise CompiledOpUnavailable(f"detectron2 compiled op '{name}' is unavailable: {_BUILD_HINT}")

        unavailable.__name__ = name
        return unavailable


class _NumpyWithAliases(types.ModuleType):
    """numpy as detectron2 0.6 expects it: the real module plus the removed scalar aliases."""

    def __init__(self) -> None:
        super().__init__("numpy")
        self.__dict__.update(_NUMPY_ALIASES)

    def __getattr__(self, name: str):
        return getattr(numpy, name)


def _pkg_resources_shim() -> types.ModuleType:
    """The one ``pkg_resources`` function detectron2 0.6 uses, on ``importlib.resources``."""
    shim = types.ModuleType("pkg_resources", "Minimal pkg_resources for detectron2.model_zoo.")

    def resource_filename(package: str, resource: str) -> str:
        return str(importlib.resources.files(package).joinpath(resource))

    shim.resource_filename = resource_filename
    return shim


def _panopticapi_shim() -> Dict[str, types.ModuleType]:
    """``panopticapi.utils.rgb2id``, the one panopticapi function imported by a detectron2 module
    at its top (``projects/panoptic_deeplab/dataset_mapper.py``)."""
    package = types.ModuleType("panopticapi", "Minimal panopticapi for detectron2's Panoptic-DeepLab.")
    package.__path__ = []
    utils = types.ModuleType("panopticapi.utils")

    def rgb2id(color):
        """The segment id the COCO panoptic format stores as a colour: R + 256 * G + 256**2 * B.

        An (H, W, 3) array gives an (H, W) int32 array of ids; one colour gives an int.
        """
        if isinstance(color, numpy.ndarray) and color.ndim == 3:
            channels = color.astype(numpy.int32)  # uint8 would overflow
            return channels[:, :, 0] + 256 * channels[:, :, 1] + 256 * 256 * channels[:, :, 2]
        return int(color[0] + 256 * color[1] + 256 * 256 * color[2])

    utils.rgb2id = rgb2id
    package.utils = utils
    return {"panopticapi": package, "panopticapi.utils": utils}


class _SetSamplingRandom(random.Random):
    """``random.Random`` whose ``sample`` also takes a set, as Python <= 3.10 did (it sampled
    ``tuple(population)``, so the draws are those detectron2 got there)."""

    def sample(self, population, k, *, counts=None):
        if isinstance(population, collections.abc.Set):
            population = tuple(population)
        return super().sample(population, k, counts=counts)


class _RandomWithSetSampling(types.ModuleType):
    """``random`` as detectron2 0.6 expects it: the real module, with a ``Random`` that samples sets."""

    def __init__(self) -> None:
        super().__init__("random")
        self.Random = _SetSamplingRandom

    def __getattr__(self, name: str):
        return getattr(random, name)


def _sample_takes_sets() -> bool:
    try:
        random.Random(0).sample({0}, 1)
    except TypeError:
        return False
    return True


def _caffe2_is_missing(error: BaseException) -> bool:
    return isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "caffe2"


def _caffe2_unsupported_function(name: str) -> Callable:
    def unsupported(*args, **kwargs):
        raise Caffe2ExportUnsupported(f"detectron2.export.{name}: {_CAFFE2_HINT}")

    unsupported.__name__ = unsupported.__qualname__ = name
    unsupported.__doc__ = f"Unavailable: {_CAFFE2_HINT}."
    return unsupported


def _caffe2_unsupported_class(name: str, static_methods: Sequence[str] = ()) -> type:
    def __init__(self, *args, **kwargs):
        raise Caffe2ExportUnsupported(f"detectron2.export.{name}: {_CAFFE2_HINT}")

    namespace = {"__init__": __init__, "__doc__": f"Unavailable: {_CAFFE2_HINT}.",
                 "__module__": "detectron2.export.api"}
    for method in static_methods:
        namespace[method] = staticmethod(_caffe2_unsupported_function(f"{name}.{method}"))
    return type(name, (), namespace)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def has_compiled_ops() -> bool:
    """Whether detectron2's real compiled extension is importable."""
    module = sys.modules.get("detectron2._C")
    if module is not None:
        return not isinstance(module, _CompiledOpsPlaceholder)
    detectron2 = importlib.import_module("detectron2")
    return importlib.machinery.PathFinder.find_spec("detectron2._C", detectron2.__path__) is not None


# --- fixes, keyed by module; each returns nothing and is a no-op where nothing is missing ---

def _give_numpy_aliases(module: types.ModuleType) -> None:
    if module.__dict__.get("np") is numpy and not _numpy_has_aliases():
        module.np = _NUMPY_PROXY


def _numpy_has_aliases() -> bool:
    try:
        return all(getattr(numpy, name) is value for name, value in _NUMPY_ALIASES.items())
    except AttributeError:
        return False


def _coco_evaluator_without_fast_impl(module: types.ModuleType) -> None:
    if has_compiled_ops():
        return
    from pycocotools.cocoeval import COCOeval

    # Anyone calling _evaluate_predictions_on_coco(use_fast_impl=True) gets pycocotools.
    module.COCOeval_opt = COCOeval
    original_init = module.COCOEvaluator.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self._use_fast_impl:
            logger.info("COCOEvaluator: detectron2's compiled evaluator is absent; using pycocotools.")
            self._use_fast_impl = False

    module.COCOEvaluator.__init__ = __init__


def _map_dataset_samples_sets(module: types.ModuleType) -> None:
    """MapDataset's retry (data/common.py) is ``self._rng.sample(a_set, k=1)``, its ``_rng`` a
    ``random.Random(42)``: where sets cannot be sampled, that module's ``random`` gets a
    ``Random`` that samples them as Python <= 3.10 did."""
    if module.__dict__.get("random") is random and not _sample_takes_sets():
        module.random = _RANDOM_PROXY


def _lr_scheduler_hook_saves_torch2_schedulers(module: types.ModuleType) -> None:
    """hooks.LRScheduler (engine/hooks.py) saves and loads its scheduler's state only if it is a
    ``torch.optim.lr_scheduler._LRScheduler``. From torch 2.0 on, torch's own schedulers derive
    from ``LRScheduler`` instead, so the checkpoint held no scheduler state and a resumed run
    started its schedule over. Those schedulers (and only those) are saved and loaded here;
    ``_LRScheduler`` ones, such as detectron2's LRMultiplier, keep detectron2's path.
    """
    from torch.optim import lr_scheduler

    base = getattr(lr_scheduler, "LRScheduler", None)
    if base is None or issubclass(lr_scheduler.StepLR, lr_scheduler._LRScheduler):
        return  # torch < 2.0: every torch scheduler is an _LRScheduler, which the hook accepts
    hook = module.LRScheduler
    if hasattr(hook.state_dict, "__wrapped__"):
        return  # already done
    original_state_dict, original_load_state_dict = hook.state_dict, hook.load_state_dict

    def missed(scheduler) -> bool:
        return isinstance(scheduler, base) and not isinstance(scheduler, lr_scheduler._LRScheduler)

    @functools.wraps(original_state_dict)
    def state_dict(self):
        if missed(self.scheduler):
            return self.scheduler.state_dict()
        return original_state_dict(self)

    @functools.wraps(original_load_state_dict)
    def load_state_dict(self, state_dict):
        if missed(self.scheduler):
            logging.getLogger(module.__name__).info("Loading scheduler from state_dict ...")
            self.scheduler.load_state_dict(state_dict)
            return
        original_load_state_dict(self, state_dict)

    hook.state_dict, hook.load_state_dict = state_dict, load_state_dict


def _high_bit_depth_images_scale_to_8_bits(module: types.ModuleType) -> None:
    """detectron2's ``convert_PIL_to_numpy`` converts with Pillow's ``convert("RGB")``, which clips
    16-bit grayscale pixels (PNG modes ``I;16``, ``I``) at 255: such images came out all white, in
    training and in inference alike. They are scaled to 8 bits first (v / 257, 65535 -> 255)."""
    original = module.convert_PIL_to_numpy
    if getattr(original, "_scales_high_bit_depth", False):
        return
    from PIL import Image

    @functools.wraps(original)
    def convert_PIL_to_numpy(image, format):
        if image.mode.startswith("I;16") or image.mode == "I":
            values = numpy.asarray(image, dtype=numpy.float64) / 257.0
            image = Image.fromarray(numpy.clip(numpy.rint(values), 0, 255).astype(numpy.uint8))
        return original(image, format)

    convert_PIL_to_numpy._scales_high_bit_depth = True
    module.convert_PIL_to_numpy = convert_PIL_to_numpy


_BEFORE: Dict[str, Callable[[], Optional[Callable[[], None]]]] = {}
_AFTER: Dict[str, Callable[[types.ModuleType], None]] = {
    "detectron2.evaluation.coco_evaluation": _coco_evaluator_without_fast_impl,
    "detectron2.data.common": _map_dataset_samples_sets,
    "detectron2.engine.hooks": _lr_scheduler_hook_saves_torch2_schedulers,
    "detectron2.data.detection_utils": _high_bit_depth_images_scale_to_8_bits,
}


def _before(name: str):
    def register(fn):
        _BEFORE[name] = fn
        return fn

    return register


@_before("detectron2.data.transforms.transform")
def _pillow_linear():
    """Pillow >= 10 lacks Image.LINEAR, a default argument there: lend it for the import."""
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return None
    Image.LINEAR = Image.BILINEAR
    return lambda: delattr(Image, "LINEAR")


@_before("detectron2.model_zoo.model_zoo")
def _pkg_resources():
    """setuptools >= 81 lacks pkg_resources: lend a shim for the import of model_zoo."""
    if "pkg_resources" in sys.modules or _module_exists("pkg_resources"):
        return None
    sys.modules["pkg_resources"] = _pkg_resources_shim()
    return lambda: sys.modules.pop("pkg_resources", None)


@_before("detectron2.projects.panoptic_deeplab.dataset_mapper")
def _panopticapi():
    """panopticapi is not on PyPI: lend its rgb2id for the import of Panoptic-DeepLab's mapper.

    Lent only for that import: detectron2's panoptic evaluator, which needs panopticapi's
    ``pq_compute``, still reports it missing.
    """
    if "panopticapi" in sys.modules or _module_exists("panopticapi"):
        return None
    shim = _panopticapi_shim()
    sys.modules.update(shim)

    def undo() -> None:
        for name in shim:
            sys.modules.pop(name, None)

    return undo


# detectron2/export/*.py modules that import caffe2 at their top.
_CAFFE2_EXPORT_MODULES = "api c10 caffe2_export caffe2_inference caffe2_modeling caffe2_patch shared".split()


def _export_without_caffe2(module: types.ModuleType, error: ImportError) -> bool:
    """detectron2.export's caffe2 modules, when their import failed for want of caffe2.

    ``export/__init__.py`` does ``from .api import *``: ``api`` is completed with stand-ins for
    its ``__all__`` that raise :class:`Caffe2ExportUnsupported` when used, so the package (and
    ``TracingAdapter``, ``scripting_with_instances``, ``dump_torchscript_IR``) imports. The
    other caffe2 modules have nothing usable without caffe2: importing them raises a
    ModuleNotFoundError that says so. Any other error is left to propagate (returns False).
    """
    if not _caffe2_is_missing(error):
        return False
    if module.__name__ != "detectron2.export.api":
        raise ModuleNotFoundError(f"{module.__name__} needs caffe2: {_CAFFE2_HINT}", name=error.name) from error
    logger.debug("caffe2 is missing: detectron2.export's caffe2 API raises Caffe2ExportUnsupported.")
    stand_ins = {
        "add_export_config": _caffe2_unsupported_function("add_export_config"),
        "export_caffe2_model": _caffe2_unsupported_function("export_caffe2_model"),
        "export_onnx_model": _caffe2_unsupported_function("export_onnx_model"),
        "Caffe2Tracer": _caffe2_unsupported_class("Caffe2Tracer"),
        "Caffe2Model": _caffe2_unsupported_class("Caffe2Model", static_methods=("load_protobuf",)),
    }
    module.__dict__.update(stand_ins)
    module.__all__ = list(stand_ins)
    return True


# Modules whose import may fail for a missing dependency, and what to do then: complete the
# module without it (return True), raise a clearer error, or let the error propagate (False).
_ON_IMPORT_ERROR: Dict[str, Callable[[types.ModuleType, ImportError], bool]] = {
    f"detectron2.export.{name}": _export_without_caffe2 for name in _CAFFE2_EXPORT_MODULES
}


class _FixingLoader(importlib.abc.Loader):
    """Wraps a module's real loader to run the fixes around its execution."""

    def __init__(self, loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        before = _BEFORE.get(self._name)
        undo = before() if before else None
        try:
            self._loader.exec_module(module)
        except ImportError as error:
            rescue = _ON_IMPORT_ERROR.get(self._name)
            if rescue is None or not rescue(module, error):
                raise
        finally:
            if undo is not None:
                undo()
        _after(self._name, module)

    def __getattr__(self, name):  # get_source, get_resource_reader, ...
        return getattr(self._loader, name)


class _PlaceholderLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _CompiledOpsPlaceholder()

    def exec_module(self, module):
        logger.debug("detectron2._C is not built; using the placeholder.")


class _Detectron2Fixer(importlib.abc.MetaPathFinder):
    """Finds detectron2's modules through the other finders and wraps their loaders."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("detectron2."):
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None:
            if fullname == "detectron2._C":
                return importlib.machinery.ModuleSpec(fullname, _PlaceholderLoader())
            return None
        if spec.loader is not None and not isinstance(spec.loader, _FixingLoader):
            spec.loader = _FixingLoader(spec.loader, fullname)
        return spec


def _after(name: str, module: types.ModuleType) -> None:
    _give_numpy_aliases(module)
    fix = _AFTER.get(name)
    if fix is not None:
        fix(module)


_NUMPY_PROXY = _NumpyWithAliases()
_RANDOM_PROXY = _RandomWithSetSampling()
_FIXER = _Detectron2Fixer()


def apply() -> None:
    """Install the import hook (idempotent) and fix detectron2 modules already imported."""
    if _FIXER in sys.meta_path:
        return
    sys.meta_path.insert(0, _FIXER)
    for name, module in list(sys.modules.items()):
        if name.startswith("detectron2.") and isinstance(module, types.ModuleType):
            _after(name, module)
