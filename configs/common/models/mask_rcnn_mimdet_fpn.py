"""Mask R-CNN + FPN around the MIMDet ViT-B backbone: detectron2's model-zoo
``common/models/mask_rcnn_fpn.py`` with the "stronger" Mask R-CNN deltas of the MIMDet and
ViTDet papers. Other backbones replace ``model.backbone.bottom_up``."""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config

from models.meta_arch import GeneralizedRCNNImageListForward, head_norm
from models.backbones.mimdet import MIMDetBackbone
from models.roi_align import ROIPooler

model = get_config("common/models/mask_rcnn_fpn.py").model
model._target_ = GeneralizedRCNNImageListForward  # hands the ImageList (padding known) to the backbone
model.lsj_postprocess = False
model.backbone.bottom_up = L(MIMDetBackbone)(
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
)
# detectron2's pooler with a faster RoIAlign on CPU where the samples per bin are fixed
# (models/roi_align.py); on GPU, and with sampling_ratio=0 as here, it is torchvision's.
model.roi_heads.box_pooler._target_ = ROIPooler
model.roi_heads.mask_pooler._target_ = ROIPooler
model.pixel_mean = [123.675, 116.280, 103.530]  # RGB, as MAE pre-trains
model.pixel_std = [58.395, 57.120, 57.375]
model.input_format = "RGB"

# The "stronger" Mask R-CNN: normalised FPN, 2-conv RPN head, 4conv1fc box head and normalised
# mask head convs (NaiveSyncBatchNorm with stats_mode="N").
model.backbone.norm = "SyncBN"
model.proposal_generator.head.conv_dims = [-1, -1]
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.box_head.conv_norm = head_norm
model.roi_heads.mask_head.conv_norm = head_norm


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
