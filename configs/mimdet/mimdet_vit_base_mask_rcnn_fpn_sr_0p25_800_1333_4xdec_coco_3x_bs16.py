"""MIMDet ViT-B, sample ratio 0.25, total batch 16: lr halved and 4x the iterations
(1 epoch = 120000 / 16 = 7500 iter; 36 epochs = 270000 iter). The schedule is in epochs,
so its milestones and the 1/4-epoch warm-up follow train.max_iter."""
from .mimdet_vit_base_mask_rcnn_fpn_sr_0p25_800_1333_4xdec_coco_3x import (
    dataloader,
    datasets,
    lr_multiplier,
    mae_checkpoint,
    model,
    optimizer,
    train,
)

dataloader.train.total_batch_size = 16
optimizer.lr = 4e-5
train.max_iter = 270000
train.checkpointer.period = 7500
train.eval_period = 7500

train.output_dir = "output/mimdet_vit_base_mask_rcnn_fpn_sr_0p25_800_1333_4xdec_coco_3x_bs16"
