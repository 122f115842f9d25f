"""AdamW with MIMDet's three learning rates, and Benchmarking-ViT's single one (SPEC §4-5).
``optimizer.params.model`` is set to the model by the launcher before instantiation."""
import torch
from detectron2.config import LazyCall as L

from models.optim import benchmarking_param_groups, mimdet_param_groups

AdamW_MIMDet = L(torch.optim.AdamW)(
    params=L(mimdet_param_groups)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm=0.0,
        lr_multiplier=2.0,  # encoder base/m, ConvStem base, decoder/FPN/heads base*m
    ),
    lr=8e-5,  # at total batch 64
    betas=(0.9, 0.999),
    weight_decay=0.1,
)

AdamW_Benchmarking = L(torch.optim.AdamW)(
    params=L(benchmarking_param_groups)(
        weight_decay="${..weight_decay}",
        no_decay_keys=("pos_embed", "relative_position_bias_table"),
    ),
    lr=8e-5,
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
