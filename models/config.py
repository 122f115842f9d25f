"""Loading a LazyConfig file with command-line overrides, strictly.

detectron2's ``LazyConfig.apply_overrides`` accepts any key and any value: a typo such as
``train.max_iters=3`` silently adds a key that nothing reads. Here an unknown key, a number
or bool given a string, and a value given to a group of keys are errors that name them. The
launcher, ``tools/infer.py`` and ``tools/benchmark.py`` all load configs this way.
"""
import glob
import inspect
import os
from typing import List, Sequence

from detectron2.config import LazyConfig
from omegaconf import OmegaConf

__all__ = ["apply_overrides", "load_config"]

_MISSING = object()


def apply_overrides(cfg, overrides: List[str]):
    """``LazyConfig.apply_overrides`` that refuses unknown keys and wrongly typed values.

    A key must exist in the config, or name an argument of the callable its parent node
    builds (``_target_``). A number or bool may not become a string. ``key=None`` sets None
    where the key holds None or is new (the grammar alone would store the string 'None').
    """
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep and override.startswith("-"):  # argparse gave it to the overrides, which take every word after them
            raise ValueError(f"'{override}' comes after the key=value overrides, which take every word after "
                             "them; put options before the overrides")
        if not sep:
            raise ValueError(f"override '{override}' is not of the form key=value")
        key = key.strip().lstrip("+")
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"override '{override}' has an empty key (or key part); write key.subkey=value")
        old = OmegaConf.select(cfg, key, default=_MISSING)
        if old is _MISSING:
            _check_new_key(cfg, key)
        try:
            LazyConfig.apply_overrides(cfg, [override])
        except Exception as e:
            raise ValueError(f"cannot apply override '{override}': {e}") from e
        new = OmegaConf.select(cfg, key)
        if isinstance(new, str) and new.lower() == "none" and (old is None or old is _MISSING):
            # Python's None, which the override grammar reads as the string 'None' (it spells
            # None "null"): a key that holds None, or a new one, takes None itself.
            OmegaConf.update(cfg, key, None, merge=False)
            new = None
        if OmegaConf.is_dict(old) and new is not None and not OmegaConf.is_dict(new):  # null turns a part off
            keys = sorted(k for k in old.keys() if k != "_target_")
            likely = "path" if "path" in keys else (keys[0] if keys else "<key>")
            raise ValueError(f"override '{override}': {key} is a group of keys {keys}, not a value; "
                             f"did you mean {key}.{likely}=...?")
        if isinstance(old, (bool, int, float)) and old is not None:
            whole = isinstance(old, int) and not isinstance(old, bool)
            if (isinstance(new, str) or OmegaConf.is_config(new) or isinstance(old, bool) != isinstance(new, bool)
                    or (whole and isinstance(new, float))):  # e.g. train.max_iter=3.5
                shown = OmegaConf.to_container(new) if OmegaConf.is_config(new) else new
                raise ValueError(
                    f"override '{override}': {key} is {type(old).__name__} ({old!r}), got {shown!r}"
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


def load_config(config_file: str, overrides: Sequence[str] = ()):
    """Load a LazyConfig file and apply command-line overrides."""
    if os.path.isdir(config_file):
        found = sorted(glob.glob(os.path.join(config_file, "**", "*.py"), recursive=True))[:3]
        raise FileNotFoundError(f"config file {config_file!r} is a folder; give one of its .py files"
                                + (f", e.g. {', '.join(found)}" if found else ""))
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file!r} (see configs/ for the available ones)")
    cfg = LazyConfig.load(config_file)
    return apply_overrides(cfg, list(overrides))
