"""Benchmarking-ViT-B, 50 epochs (50.2 box AP / 44.9 mask AP)."""
from .benchmarking_mask_rcnn_base_FPN_100ep_LSJ_mae import (
    dataloader,
    datasets,
    lr_multiplier,
    mae_checkpoint,
    model,
    optimizer,
    train,
)

# 50 ep = 184375 // 2 = 92187 iter at batch 64; warm-up stays 1/4 epoch = 0.25 / 50 of training.
train.max_iter = 92187
lr_multiplier.warmup_length = 0.25 / 50

train.output_dir = "output/benchmarking_mask_rcnn_base_FPN_50ep_LSJ_mae"
