"""A tiny MIMDet Mask R-CNN (same architecture, toy widths) for tests and quick CPU runs.

Point it at any registered dataset, e.g. with the overrides
``"datasets.register=[{name:toy,json_file:'toy.json',image_root:'images'}]"``
``dataloader.train.dataset.names=toy dataloader.test.dataset.names=toy``.
"""
from detectron2.layers import ShapeSpec

from ..mimdet.mimdet_vit_base_mask_rcnn_fpn_sr_0p5_800_1333_4xdec_coco_3x import (
    dataloader,
    datasets,
    lr_multiplier,
    mae_checkpoint,
    model,
    optimizer,
    train,
)

width = 64  # FPN and head channels

_bottom_up = model.backbone.bottom_up
_bottom_up.img_size = 128
_bottom_up.embed_dim = 96
_bottom_up.depth = 2
_bottom_up.num_heads = 4
_bottom_up.drop_path_rate = 0.0
_bottom_up.decoder_embed_dim = width
_bottom_up.decoder_depth = 1
_bottom_up.decoder_num_heads = 4
_bottom_up.checkpoint_stem = _bottom_up.checkpoint_encoder = _bottom_up.checkpoint_decoder = False

model.backbone.out_channels = width
model.proposal_generator.head.in_channels = width
model.proposal_generator.pre_nms_topk = (200, 100)
model.proposal_generator.post_nms_topk = (100, 50)
model.roi_heads.batch_size_per_image = 64
model.roi_heads.box_head.input_shape = ShapeSpec(channels=width, height=7, width=7)
model.roi_heads.box_head.conv_dims = [width]
model.roi_heads.box_head.fc_dims = [128]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=128)
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=width, height=14, width=14)
model.roi_heads.mask_head.conv_dims = [width, width]

dataloader.train.mapper.augmentations[-1].short_edge_length = (96, 112, 128)
dataloader.train.mapper.augmentations[-1].max_size = 160
dataloader.train.mapper.augmentations[1].prob = 0.0  # no crop: toy images are already small
dataloader.test.mapper.augmentations[0].short_edge_length = 128
dataloader.test.mapper.augmentations[0].max_size = 160
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
