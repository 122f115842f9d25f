"""MIMDet ViT-B, sample ratio 0.5, dropped tokens filled with projected ConvStem features
(the paper's v2, +0.2 AP) instead of MAE's mask token."""
from .mimdet_vit_base_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x import (
    dataloader,
    datasets,
    lr_multiplier,
    mae_checkpoint,
    model,
    optimizer,
    train,
)

model.backbone.bottom_up.fill_mode = "conv_feature"

train.output_dir = "output/mimdet_vit_base_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_convfill_coco_3x"
