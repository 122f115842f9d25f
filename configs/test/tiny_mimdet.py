"""A tiny MIMDet Mask R-CNN (same architecture, toy widths) for tests and quick CPU runs.

Point it at any registered dataset, e.g. with the overrides
``"datasets.register=[{name:toy,json_file:'toy.json',image_root:'images'}]"``
``dataloader.train.dataset.names=toy dataloader.test.dataset.names=toy``.
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from ..common.models.mask_rcnn_mimdet_fpn import shrink
from ..mimdet.mimdet_vit_base_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x import (
    dataloader,
    datasets,
    lr_multiplier,
    mae_checkpoint,
    model,
    optimizer,
    train,
)

shrink(model, img_size=128, embed_dim=96, depth=2, num_heads=4, width=64, decoder_num_heads=4,
       box_convs=1, box_fc=128, mask_convs=2)
model.proposal_generator.pre_nms_topk = (200, 100)
model.proposal_generator.post_nms_topk = (100, 50)
model.roi_heads.batch_size_per_image = 64

# Toy images are already small: flip and a short side of 96-128, no crop.
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeShortestEdge)(short_edge_length=(96, 112, 128), sample_style="choice", max_size=160),
]
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=128, max_size=160)]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = dataloader.test.num_workers = 0

optimizer.lr = 1e-4
mae_checkpoint.path = "scratch"  # random weights on purpose: no MAE checkpoint at toy widths
train.amp.enabled = False
train.max_iter = 4
train.checkpointer.period = 2
train.eval_period = 0
train.log_period = 1
train.output_dir = "output/tiny_mimdet"
