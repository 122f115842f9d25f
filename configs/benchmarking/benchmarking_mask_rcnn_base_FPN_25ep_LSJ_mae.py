"""Benchmarking-ViT-B, 25 epochs (48.0 box AP / 43.0 mask AP)."""
from .benchmarking_mask_rcnn_base_FPN_100ep_LSJ_mae import (
    dataloader,
    datasets,
    lr_multiplier,
    mae_checkpoint,
    model,
    optimizer,
    train,
)

# 25 ep = 184375 // 4 = 46093 iter at batch 64; warm-up stays 1/4 epoch = 0.25 / 25 of training.
train.max_iter = 46093
lr_multiplier.warmup_length = 0.25 / 25

train.output_dir = "output/benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mae"
