"""Parameter groups (learning rate and weight decay per parameter) for the optimizers.

MIMDet trains three parts at three speeds: the MAE-pretrained ViT encoder slowest
(``base_lr / m``), the randomly initialised ConvStem at ``base_lr``, and everything else
(the MAE decoder, FPN and heads) fastest (``base_lr * m``); biases, 1-D parameters and norm
weights get no weight decay, and parameters that do not train (``requires_grad=False``: the
fixed position tables) are left out. Benchmarking-ViT's groups are detectron2's
``get_default_optimizer_params`` (configs/common/optim.py). MAE pre-training uses MAE's two
groups and its learning-rate rule (``mae_param_groups``, ``scaled_lr``).
"""
import logging
from typing import Callable, Dict, Iterable, List, Set, Tuple

from torch import nn

__all__ = ["mimdet_param_groups", "mae_param_groups", "scaled_lr", "no_decay_parameter_names", "count_parameters"]

logger = logging.getLogger(__name__)

_NORM_TYPES: Tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _norm_parameter_names(model: nn.Module) -> Set[str]:
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES) or type(module).__name__ == "FrozenBatchNorm2d"
        if is_norm:
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
    return names


def no_decay_parameter_names(model: nn.Module, name_keys: Iterable[str] = ()) -> Set[str]:
    """Names of the parameters that take no weight decay.

    Biases, 1-D parameters, the parameters of norm layers, and any parameter whose name
    contains one of ``name_keys`` (e.g. "pos_embed", "relative_position_bias_table").
    """
    norm_names = _norm_parameter_names(model)
    keys = tuple(name_keys)
    return {
        name
        for name, param in model.named_parameters()
        if param.ndim <= 1 or name.endswith(".bias") or name in norm_names or any(k in name for k in keys)
    }


def _group(
    named: Iterable[Tuple[str, nn.Parameter]], key_of: Callable, settings_of: Callable
) -> List[Dict]:
    groups: Dict[Tuple, Dict] = {}
    for name, param in named:
        key = key_of(name)
        if key not in groups:
            groups[key] = {**settings_of(key), "params": [], "param_names": []}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def mimdet_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    multiplier: float,
    weight_decay_norm: float = 0.0,
    encoder_prefix: str = "backbone.bottom_up.encoder.",
    stem_prefix: str = "backbone.bottom_up.encoder.patch_embed.",
) -> List[Dict]:
    """MIMDet's groups: encoder at ``base_lr / m``, stem at ``base_lr``, the rest at ``base_lr * m``.

    Args:
        model: the detector (before DDP wrapping, so names carry no "module." prefix).
        base_lr: the optimizer's base learning rate.
        weight_decay: decay of weight matrices and conv kernels.
        multiplier: m (2.0 for ViT-B and ViT-L in the original configs); must be positive.
            The original code's argument name, so ``optimizer.params.multiplier=...`` works as there.
        weight_decay_norm: decay of norm-layer weights (biases and 1-D params get 0).
        encoder_prefix, stem_prefix: parameter-name prefixes of the ViT encoder and of
            its ConvStem (the stem sits inside the encoder, so it is matched first).

    Returns:
        a list of dicts for ``torch.optim`` (``params``, ``lr``, ``weight_decay``, and
        ``param_names`` for inspection).
    """
    if not multiplier > 0:
        raise ValueError(f"multiplier must be > 0, got {multiplier}")
    no_decay = no_decay_parameter_names(model)
    norm_names = _norm_parameter_names(model)
    lr_of_part = {"stem": base_lr, "encoder": base_lr / multiplier, "others": base_lr * multiplier}

    def key_of(name: str) -> Tuple[str, float]:
        if name.startswith(stem_prefix):
            part = "stem"
        elif name.startswith(encoder_prefix):
            part = "encoder"
        else:
            part = "others"
        if name in norm_names and not name.endswith(".bias"):
            decay = weight_decay_norm
        elif name in no_decay:
            decay = 0.0
        else:
            decay = weight_decay
        return part, decay

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = _group(trainable, key_of, lambda key: {"lr": lr_of_part[key[0]], "weight_decay": key[1]})
    _log_groups(groups)
    return groups


def mae_param_groups(model: nn.Module, *, weight_decay: float) -> List[Dict]:
    """MAE pre-training's groups (timm's ``add_weight_decay``, as MAE's ``main_pretrain.py``):
    biases and 1-D parameters (norm weights) take no decay, everything else ``weight_decay`` --
    the cls and mask tokens included; the fixed position tables do not train."""
    no_decay = no_decay_parameter_names(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = _group(trainable, lambda name: 0.0 if name in no_decay else weight_decay,
                    lambda decay: {"weight_decay": decay})
    _log_groups(groups)
    return groups


def scaled_lr(base_lr: float, total_batch_size: int) -> float:
    """MAE's linear scaling rule: ``lr = base_lr * total_batch_size / 256`` (1.5e-4 at 4096 -> 2.4e-3)."""
    lr = base_lr * total_batch_size / 256
    logger.info("learning rate %.3g = base %.3g x batch %d / 256", lr, base_lr, total_batch_size)
    return lr


def _log_groups(groups: List[Dict]) -> None:
    for group in groups:
        count = sum(p.numel() for p in group["params"])
        logger.info(
            "param group lr=%s weight_decay=%s: %d tensors, %d parameters",
            group.get("lr", "<optimizer lr>"), group["weight_decay"], len(group["params"]), count,
        )


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable and frozen (the count the MIMDet README's model table quotes)."""
    return sum(p.numel() for p in model.parameters())

