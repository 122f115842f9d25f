"""Run detectron2 0.6's Python sources on today's stack, touching nothing that works.

detectron2 0.6 (2021) meets four things that are gone or may be missing today:

* its compiled extension ``detectron2._C`` (absent from a pure-Python install);
* numpy's ``np.int/float/str/bool/object`` aliases (removed in numpy 1.24);
* Pillow's ``Image.LINEAR`` (removed in Pillow 10), read as a default argument at import;
* setuptools' ``pkg_resources`` (removed in setuptools 81), imported by ``model_zoo``.

:func:`apply` installs one import hook that fixes each of them only where it is missing,
and only inside detectron2: numpy and Pillow themselves are never modified, and a
detectron2 built from source keeps its real ``_C`` and its fast COCO evaluator. It must run
before detectron2 is first imported; ``import models`` does that.
"""
import functools
import importlib.abc
import importlib.machinery
import importlib.resources
import importlib.util
import logging
import sys
import types
from typing import Callable, Dict, Optional

import numpy

__all__ = ["apply", "has_compiled_ops", "CompiledOpUnavailable"]

logger = logging.getLogger(__name__)

_NUMPY_ALIASES = {"int": int, "float": float, "str": str, "bool": bool, "object": object}
_BUILD_HINT = (
    "this detectron2 is the pure-Python install, without compiled ops. MIMDet does not need "
    "them; to use them, build detectron2 from source (see README, 'detectron2 with compiled "
    "ops'): pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'"
)


class CompiledOpUnavailable(RuntimeError):
    """Raised when code calls an op of detectron2's compiled extension that is not built."""


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


_BEFORE: Dict[str, Callable[[], Optional[Callable[[], None]]]] = {}
_AFTER: Dict[str, Callable[[types.ModuleType], None]] = {
    "detectron2.evaluation.coco_evaluation": _coco_evaluator_without_fast_impl,
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
_FIXER = _Detectron2Fixer()


def apply() -> None:
    """Install the import hook (idempotent) and fix detectron2 modules already imported."""
    if _FIXER in sys.meta_path:
        return
    sys.meta_path.insert(0, _FIXER)
    for name, module in list(sys.modules.items()):
        if name.startswith("detectron2.") and isinstance(module, types.ModuleType):
            _after(name, module)
