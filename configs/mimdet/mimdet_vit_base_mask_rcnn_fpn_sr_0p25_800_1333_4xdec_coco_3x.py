"""MIMDet ViT-B, sample ratio 0.25 (49.9 box AP / 44.7 mask AP at sample ratio 1.0)."""
from .mimdet_vit_base_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x import (
    dataloader,
    datasets,
    lr_multiplier,
    mae_checkpoint,
    model,
    optimizer,
    train,
)

model.backbone.bottom_up.sample_ratio = 0.25

train.output_dir = "output/mimdet_vit_base_mask_rcnn_fpn_sr_0p25_800_1333_4xdec_coco_3x"
