"""Any COCO-format dataset, registered from the config instead of code.

A config (or a command-line override) lists datasets under the top-level key
``datasets.register``, each ``dict(name=..., json_file=..., image_root=...)``; the launcher
registers them with detectron2's ``register_coco_instances`` before building anything, so
``dataloader.train.dataset.names=my_train`` just works. Builtin names (``coco_2017_train``,
``coco_2017_val``, ...) need no entry: detectron2 registers them under
``$DETECTRON2_DATASETS`` (default ``./datasets``).
"""
import logging
import os
from typing import Iterable, List, Mapping, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["register_coco_datasets", "thing_classes"]

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("name", "json_file", "image_root")


def register_coco_datasets(specs: Iterable[Mapping]) -> List[str]:
    """Register COCO-format datasets; return their names.

    Args:
        specs: mappings with ``name``, ``json_file`` (COCO instances json) and
            ``image_root`` (folder the json's ``file_name`` entries are relative to).

    A name registered before with the same files is left as it is; the same name with
    other files, a builtin name, a missing key or a missing file is an error.
    """
    names = []
    for spec in specs:
        missing = [k for k in _REQUIRED_KEYS if k not in spec]
        if missing:
            raise ValueError(f"datasets.register entry {dict(spec)} lacks {missing}; each needs {_REQUIRED_KEYS}")
        name, json_file, image_root = (str(spec[k]) for k in _REQUIRED_KEYS)
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"dataset '{name}': json_file {json_file} does not exist")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"dataset '{name}': image_root {image_root} is not a folder")
        if name in DatasetCatalog.list():
            registered = MetadataCatalog.get(name).get("json_file", None)
            if registered is None or os.path.abspath(registered) != os.path.abspath(json_file):
                raise ValueError(
                    f"dataset name '{name}' is already registered (with json_file {registered}); "
                    "choose another name"
                )
            logger.info("Dataset '%s' already registered with %s", name, json_file)
        else:
            register_coco_instances(name, {}, json_file, image_root)
            logger.info("Registered COCO-format dataset '%s': %s, images in %s", name, json_file, image_root)
        names.append(name)
    return names


def thing_classes(names: Union[str, Sequence[str]]) -> List[str]:
    """Class names of a registered dataset (the first of ``names``).

    COCO-format datasets learn their classes when their json is read, so the json is
    loaded here if the metadata does not have them yet.
    """
    name = names if isinstance(names, str) else names[0]
    if name not in DatasetCatalog.list():
        raise KeyError(
            f"dataset '{name}' is not registered; add it to datasets.register or use a builtin name "
            f"such as coco_2017_train"
        )
    metadata = MetadataCatalog.get(name)
    if not metadata.get("thing_classes", None):
        DatasetCatalog.get(name)  # load_coco_json fills metadata.thing_classes
    classes = metadata.get("thing_classes", None)
    if not classes:
        raise ValueError(f"dataset '{name}' has no thing_classes in its metadata")
    return list(classes)
