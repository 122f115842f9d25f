"""The demo: a small MIMDet Mask R-CNN trained from scratch on the synthetic shapes dataset
(``make demo``; data from ``datasets/generate_shapes.py``).

The architecture is MIMDet's (conv stem, ViT seeing a random half of its tokens, one MAE
decoder block completing the map, FPN, Mask R-CNN) at small widths, so it trains on a
laptop CPU in minutes. Trained at sample ratio 0.5, evaluated at 1.0.
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from ..common.data.coco import dataloader
from ..common.models.mask_rcnn_mimdet_fpn import model, shrink
from ..common.optim import AdamW_MIMDet as optimizer
from ..common.train import datasets, lr_multiplier, mae_checkpoint, train

root = "datasets/shapes"
datasets.register = [
    dict(name="shapes_train", json_file=f"{root}/annotations/instances_train.json", image_root=f"{root}/train"),
    dict(name="shapes_val", json_file=f"{root}/annotations/instances_val.json", image_root=f"{root}/val"),
]
dataloader.train.dataset.names = "shapes_train"
dataloader.test.dataset.names = "shapes_val"

# FPN, heads and the MAE decoder block 32 channels wide, a 3-block ViT, a 2conv1fc box head with
# BN and one 3x3 conv before the mask head's deconv: at these widths the detector learns faster
# per image than at 64 channels with 6 blocks and 4 box convs, and each step costs 25% less
# (docs/demo_recipe.md).
shrink(model, img_size=256, embed_dim=192, depth=3, num_heads=3, width=32, decoder_num_heads=4,
       box_convs=2, box_fc=256, mask_convs=2)
model.backbone.bottom_up.sample_ratio = 0.5
model.backbone.bottom_up.eval_sample_ratio = 1.0
model.proposal_generator.head.conv_dims = [-1]  # one 3x3 conv
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
# Square anchors only: the shapes' boxes are near-square (aspect 0.55-1.8), the box regression
# covers the rest, and a third of the anchors makes the RPN's matching and top-k 8 ms cheaper.
model.proposal_generator.anchor_generator.aspect_ratios = [[1.0]]
model.proposal_generator.head.num_anchors = 1
model.proposal_generator.pre_nms_topk = (200, 200)  # a few shapes per image: few proposals
model.proposal_generator.post_nms_topk = (200, 100)
model.roi_heads.num_classes = 5
# 64 RoIs per image, half of them foreground where there are enough: from scratch the box and
# mask heads learn from the foreground ones, so more of them per image is what speeds learning
# up (32 at a quarter: box AP 34.8 after 1,200 iterations; 64 at a half: 43.0).
model.roi_heads.batch_size_per_image = 64
model.roi_heads.positive_fraction = 0.5
# One bilinear sample per bin: fewer to sum, and a fixed count lets RoIAlign run as row sums
# on CPU (models/roi_align.py).
model.roi_heads.box_pooler.sampling_ratio = 1
model.roi_heads.mask_pooler.sampling_ratio = 1

# Images are 160-256 px: flip, then a short side of 144-192 (no crop); tested at the largest.
# A short side of 144-192 instead of 160-208 makes a step 12% cheaper (replayed batches: 95 ms
# against 108 ms) at box AP 56.2 / 56.1 for seeds 0 / 1 (docs/demo_recipe.md).
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeShortestEdge)(short_edge_length=(144, 160, 176, 192), sample_style="choice", max_size=288),
]
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=192, max_size=288)]
dataloader.train.total_batch_size = 4  # on a CPU, time per image is the same at 4 and 8: 4 gives twice the updates
# Images are loaded in the training process: a loader process would compete with the two
# compute threads for this machine's two cores, and cost each step twice its own 12 ms.
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0

optimizer.lr = 6e-4  # encoder 3e-4, stem 6e-4, decoder/FPN/heads 1.2e-3 (multiplier 2)
optimizer.betas = (0.9, 0.99)  # a shorter memory of the gradient scale than 0.999 suits a short run
optimizer.weight_decay = 0.05
optimizer.fused = True  # one kernel for all parameters (CPU and CUDA)

mae_checkpoint.path = "scratch"  # the demo trains from random weights
# 5,600 images, 9.3 epochs of the 600 train images. From scratch the detector needs a long run at
# the full lr, and little after each step down: the lr falls to a tenth at iteration 1,250 and to a
# hundredth at 1,350. Seeds 0 / 1 reach box AP 63.6 / 58.7, mask AP 58.4 / 53.2 (AMD EPYC, bf16),
# against 67.0 / 64.4 and 60.6 / 56.5 with 1,600 iterations and the steps at 75% and 92%, which
# take 14% more training time; 1,400 iterations with the steps at 75% and 92% gave seed 1 only
# 45.4 / 41.9 (docs/demo_recipe.md).
train.max_iter = 1400
lr_multiplier.scheduler.milestones = [1250, 1350]
# The milestones count out of num_updates, which the launcher maps onto train.max_iter: another
# train.max_iter scales them. To set them in iterations of another length, set num_updates to it too.
lr_multiplier.scheduler.num_updates = 1400
train.channels_last = True  # conv weights NHWC on CPU: 11% faster steps, 20% faster inference
train.clip_grad_norm = 1.0  # from random weights: keeps early updates in range
# bf16 autocast for training where the CPU computes bf16 natively (~1.5x faster than fp32 with
# AVX512-BF16), fp32 elsewhere (bf16 runs ~1.5x slower than fp32 with AVX512 alone, ~8x with AVX2
# only); CUDA fp16.
# Evaluation in fp32. train.amp.enabled=False trains in fp32 everywhere.
train.amp.enabled = True
train.amp.dtype = None
train.amp.eval = False
train.seed = 0  # the same data order, augmentation and token sampling on every machine
train.checkpointer.period = 350  # an interrupted demo loses at most a quarter of its run
train.checkpointer.max_to_keep = 2
train.eval_period = 0  # no periodic evaluation: detectron2's EvalHook evaluates the final model
train.log_period = 20
train.output_dir = "output/demo"
lr_multiplier.warmup_length = 0.05
