"""MIMDet ViT-L, sample ratio 0.5 (53.3 box AP / 47.5 mask AP at sample ratio 1.0)."""
from .mimdet_vit_base_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x import (
    dataloader,
    datasets,
    lr_multiplier,
    mae_checkpoint,
    model,
    optimizer,
    train,
)

model.backbone.bottom_up.embed_dim = 1024
model.backbone.bottom_up.depth = 24
model.backbone.bottom_up.num_heads = 16
model.backbone.bottom_up.drop_path_rate = 0.4
optimizer.params.lr_multiplier = 3.5

train.output_dir = "output/mimdet_vit_large_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x"
