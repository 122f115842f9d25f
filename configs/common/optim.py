"""AdamW with MIMDet's three learning rates, and Benchmarking-ViT's single one.
``optimizer.params.model`` is set to the model by the launcher before instantiation."""
import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from models.optim import mimdet_param_groups

AdamW_MIMDet = L(torch.optim.AdamW)(
    params=L(mimdet_param_groups)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm=0.0,
        multiplier=2.0,  # encoder base/m, ConvStem base, decoder/FPN/heads base*m
    ),
    lr=8e-5,  # at total batch 64
    betas=(0.9, 0.999),
    weight_decay=0.1,
)

# As the original: detectron2 0.6's default groups, so biases decay like weights (0.1) and
# norms do not; the position table and the relative-position bias tables take no decay.
AdamW_Benchmarking = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        weight_decay_norm=0.0,
        overrides={"pos_embed": {"weight_decay": 0.0}, "relative_position_bias_table": {"weight_decay": 0.0}},
    ),
    lr=8e-5,
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
