"""MAE pre-training of a ViT-B/16 (He et al. 2022) on your own images, through
lazyconfig_train_net.py. What it writes is MAE's full pre-training checkpoint (same names and
shapes as ``mae_pretrain_vit_base_full.pth``): fine-tune MIMDet from it with
``mae_checkpoint.path=<output_dir>/model_final.pth``.

    python lazyconfig_train_net.py --config-file configs/mae/mae_pretrain_vit_base.py --num-gpus 8 \\
        dataloader.train.dataset.folder=/data/my_images train.max_iter=... train.output_dir=output/mae

``dataloader.train.dataset`` takes ``folder=`` (every image under it, recursively; unreadable
files are skipped with a count) and/or ``names=`` (registered COCO-format datasets, e.g.
``coco_2017_train``, or ones added by ``datasets.register``; annotations are not used).

MAE's recipe (``main_pretrain.py`` and the paper): mask ratio 0.75, normalised-pixel loss,
8-block 512-wide decoder, random resized crop (0.2-1) to 224 and flip, AdamW betas (0.9, 0.95),
weight decay 0.05, lr = 1.5e-4 x batch / 256 at batch 4096, cosine schedule after a linear
warm-up of 40 of 800 epochs. The schedule follows ``train.max_iter``; the default is 800 epochs
of ImageNet-1k (1,281,167 images). For another dataset set ``train.max_iter`` to
epochs x images / batch.
"""
import torch
from detectron2.config import LazyCall as L
from fvcore.common.param_scheduler import CompositeParamScheduler, CosineParamScheduler, LinearParamScheduler
from omegaconf import OmegaConf

from models.backbones.mae import MAEPretrainer
from models.data.pretrain import MAEAugmentation, pretrain_images
from models.data.resumable import build_resumable_train_loader
from models.optim import mae_param_groups, scaled_lr

from ..common.train import datasets, train

model = L(MAEPretrainer)(
    img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    mask_ratio=0.75, norm_pix_loss=True,
)

dataloader = OmegaConf.create()
dataloader.train = L(build_resumable_train_loader)(
    dataset=L(pretrain_images)(folder=None, names=None),
    mapper=L(MAEAugmentation)(img_size="${model.img_size}", patch_size="${model.patch_size}",
                              scale=(0.2, 1.0), hflip=0.5),
    total_batch_size=4096,
    num_workers=8,
    aspect_ratio_grouping=False,  # every crop is square
    skip_unreadable=True,
)
dataloader.test = None  # nothing to evaluate: the reconstruction loss is logged while training
dataloader.evaluator = None

optimizer = L(torch.optim.AdamW)(
    params=L(mae_param_groups)(weight_decay="${..weight_decay}"),
    lr=L(scaled_lr)(base_lr=1.5e-4, total_batch_size="${dataloader.train.total_batch_size}"),
    betas=(0.9, 0.95),
    weight_decay=0.05,
)

# As MAE's lr_sched.py: linear from 0 over the warm-up, then a half cosine from 1 to 0 over the
# rest of the run (detectron2's WarmupParamScheduler would lay the cosine over the whole run).
EPOCHS, WARMUP_EPOCHS = 800, 40
lr_multiplier = L(CompositeParamScheduler)(
    schedulers=[L(LinearParamScheduler)(start_value=0.0, end_value=1.0),
                L(CosineParamScheduler)(start_value=1.0, end_value=0.0)],
    lengths=[WARMUP_EPOCHS / EPOCHS, 1 - WARMUP_EPOCHS / EPOCHS],
    interval_scaling=["rescaled", "rescaled"],
)

ITERS_PER_EPOCH = 1281167 // 4096  # 312 at MAE's batch
train.max_iter = EPOCHS * ITERS_PER_EPOCH
train.checkpointer.period = 20 * ITERS_PER_EPOCH  # MAE saves every 20 epochs
train.checkpointer.max_to_keep = 3
train.eval_period = 0
train.clip_grad_norm = None  # MAE pre-trains without clipping
train.output_dir = "output/mae_pretrain_vit_base"
