"""Benchmarking-ViT-B (Li et al. 2021) Mask R-CNN FPN, MAE-initialised, LSJ at 1024, 100 epochs
(50.4 box AP / 44.9 mask AP)."""
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

from models.backbones.benchmarking_vit import BenchmarkingViT

from ..common.data.coco_lsj import dataloader
from ..common.models.mask_rcnn_mimdet_fpn import model
from ..common.optim import AdamW_Benchmarking as optimizer
from ..common.train import datasets, mae_checkpoint, train

mae_checkpoint.needs = ("MAE's ViT-B encoder checkpoint, mae_pretrain_vit_base.pth "
                        "(the full pre-training checkpoint works too: its decoder is not used)")
model.lsj_postprocess = True
model.backbone.bottom_up = L(BenchmarkingViT)(
    img_size=1024,
    patch_size=16,
    embed_dim=768,
    depth=12,
    num_heads=12,
    mlp_ratio=4.0,
    drop_path_rate=0.1,
    norm_eps=1e-6,
    window_size=16,
    global_every=3,
    use_act_checkpoint=False,
    out_features=["s0", "s1", "s2", "s3"],
)

# 100 ep = 184375 iter * 64 images/iter / 118000 images/ep; warm-up 1/4 epoch from 0.001.
train.max_iter = 184375
train.checkpointer.period = 1844
train.eval_period = 1844
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=0.25 / 100,
    warmup_factor=0.001,
)

train.output_dir = "output/benchmarking_mask_rcnn_base_FPN_100ep_LSJ_mae"
