"""Training defaults for lazyconfig_train_net.py: the 3x schedule at batch 64, the MAE
checkpoint to start from, and extra COCO-format datasets to register."""
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

# COCO train2017 ~120k images: 1 epoch = 120000 / 64 = 1875 iter; 3x = 36 epochs = 67500 iter.
train = dict(
    output_dir="./output",
    init_checkpoint="",  # a detectron2 checkpoint; loaded after (and over) the MAE weights
    max_iter=67500,
    # Mixed precision of the training step. dtype: "bf16" (CPU and CUDA, no grad scaler) or
    # "fp16" (CUDA only, with grad scaling); None: fp16 on CUDA as the original; on a CPU bf16
    # where it is native (AVX512-BF16 or AMX), fp32 elsewhere, where emulated bf16 is slower.
    # eval: autocast in evaluation too; False (the original's): evaluation runs in fp32.
    amp=dict(enabled=True, dtype=None, eval=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=True),
    checkpointer=dict(period=1875, max_to_keep=100),
    eval_period=1875,
    log_period=20,
    clip_grad_norm=None,  # max global L2 norm of the gradients; None: no clipping (as the original)
    device="cuda",  # the launcher falls back to "cpu" when CUDA is absent
    # On CPU, store conv weights channels-last so oneDNN convolutions need no layout reorders
    # (models/engine/loops.py: prefer_channels_last). It pays for small bf16 models (the demo's
    # step: 135 ms against 152 ms) but not for ViT-B's fp32 conv stem at 800x1216 (1.55 s
    # against 1.17 s), hence off by default.
    channels_last=False,
    # Data order, augmentation and token sampling derive from (seed, iteration), so --resume
    # continues a run exactly. -1: a random seed, drawn once per run and kept in its checkpoints.
    seed=-1,
)

# The schedule is written in epochs (the scheduler sees the fraction of train.max_iter done),
# so it follows train.max_iter: x0.1 at epochs 27 and 33 of 36, warm-up from 0 over 1/4 epoch.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[27, 33], num_updates=36),
    warmup_length=0.25 / 36,
    warmup_factor=0.0,
)

# The MAE pre-training checkpoint the backbone starts from. Training a COCO config without
# one is an error (unless --resume, --eval-only or train.init_checkpoint): the paper's numbers
# need it. path="scratch" starts from random weights on purpose. ``needs`` names the file.
mae_checkpoint = dict(
    path=None,
    needs="MAE's full ViT-B pre-training checkpoint (encoder + decoder), mae_pretrain_vit_base_full.pth",
)

# COCO-format datasets to register before building, e.g.
# "datasets.register=[{name:my_train,json_file:'data/train.json',image_root:'data/images'}]" (hydra syntax)
datasets = dict(register=[])
