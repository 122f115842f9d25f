"""MIMDet ViT-B, sample ratio 0.5, Mask R-CNN FPN, 3x on COCO (51.5 box AP / 46.0 mask AP
evaluated at sample ratio 1.0)."""
from ..common.data.coco import dataloader
from ..common.models.mask_rcnn_mimdet_fpn import model
from ..common.optim import AdamW_MIMDet as optimizer
from ..common.train import datasets, lr_multiplier, mae_checkpoint, train

model.backbone.bottom_up.sample_ratio = 0.5

train.output_dir = "output/mimdet_vit_base_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x"
