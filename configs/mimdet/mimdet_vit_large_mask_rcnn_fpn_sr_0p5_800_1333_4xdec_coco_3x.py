"""MIMDet ViT-L, sample ratio 0.5 (53.3 box AP / 47.5 mask AP at sample ratio 1.0).

As the original: the ViT-B sr 0.5 config with ViT-L's widths, depth, heads and drop path;
everything else, the lr multiplier m = 2.0 included, is inherited. Its fixed position tables
are built for 224x224 (14x14, MAE's pre-training grid) and resized to each batch's grid:
345,268,848 parameters in all, the original's 345.27M."""
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
model.backbone.bottom_up.img_size = 224
mae_checkpoint.needs = "MAE's full ViT-L pre-training checkpoint (encoder + decoder), mae_pretrain_vit_large_full.pth"

train.output_dir = "output/mimdet_vit_large_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x"
