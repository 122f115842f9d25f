"""Mask R-CNN + FPN around the MIMDet ViT-B backbone: the "stronger" Mask R-CNN
of the MIMDet/ViTDet papers (SyncBN FPN, 2-conv RPN head, 4conv1fc box head and a mask head
with NaiveSyncBatchNorm). Other backbones replace ``model.backbone.bottom_up``."""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import (
    FastRCNNConvFCHead,
    FastRCNNOutputLayers,
    MaskRCNNConvUpsampleHead,
    StandardROIHeads,
)

from models.meta_arch import GeneralizedRCNNImageListForward, head_norm
from models.mimdet import MIMDetBackbone

model = L(GeneralizedRCNNImageListForward)(
    lsj_postprocess=False,
    backbone=L(FPN)(
        bottom_up=L(MIMDetBackbone)(
            img_size=800,  # 50x50 position tables, as in the released checkpoints
            patch_size=16,
            embed_dim=768,
            depth=12,
            num_heads=12,
            mlp_ratio=4.0,
            drop_path_rate=0.1,
            norm_eps=1e-5,
            decoder_embed_dim=512,
            decoder_depth=4,  # "4xdec": the first 4 of MAE's 8 decoder blocks
            decoder_num_heads=16,
            sample_ratio=0.5,  # training
            eval_sample_ratio=1.0,  # evaluation and inference see every token, as the paper evaluates
            fill_mode="mask_token",
            use_act_checkpoint=True,  # stem, encoder and decoder
            out_features=["c2", "c3", "c4", "c5"],
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        norm="SyncBN",
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=256, num_anchors=3, conv_dims=[-1, -1]),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[32], [64], [128], [256], [512]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 1000),
        post_nms_topk=(1000, 1000),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=80,
        batch_size_per_image=512,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(
            output_size=7,
            scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        box_head=L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm=head_norm,
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}",
        ),
        mask_in_features=["p2", "p3", "p4", "p5"],
        mask_pooler=L(ROIPooler)(
            output_size=14,
            scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        mask_head=L(MaskRCNNConvUpsampleHead)(
            input_shape=ShapeSpec(channels=256, width=14, height=14),
            num_classes="${..num_classes}",
            conv_dims=[256, 256, 256, 256, 256],  # 4 convs + the deconv's width
            conv_norm=head_norm,
        ),
    ),
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
)


def shrink(model, *, img_size: int, embed_dim: int, depth: int, num_heads: int, width: int,
           decoder_num_heads: int, box_convs: int, box_fc: int, mask_convs: int) -> None:
    """Scale the detector above down, in place, for CPU demos and tests: MIMDet's architecture
    with a narrower, shallower ViT, one ``width``-wide decoder block, and FPN and heads
    ``width`` channels wide (``box_convs`` convs and a ``box_fc`` fc in the box head,
    ``mask_convs`` convs before the mask head's deconv). No drop path, no activation
    checkpointing."""
    bottom_up = model.backbone.bottom_up
    bottom_up.update(img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, drop_path_rate=0.0,
                     decoder_embed_dim=width, decoder_depth=1, decoder_num_heads=decoder_num_heads,
                     use_act_checkpoint=False)
    model.backbone.out_channels = width
    model.proposal_generator.head.in_channels = width
    box_head = model.roi_heads.box_head
    box_head.input_shape = ShapeSpec(channels=width, height=7, width=7)
    box_head.conv_dims, box_head.fc_dims = [width] * box_convs, [box_fc]
    model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=box_fc)
    model.roi_heads.mask_head.input_shape = ShapeSpec(channels=width, height=14, width=14)
    model.roi_heads.mask_head.conv_dims = [width] * mask_convs
