"""MAE pre-training at the demo's ViT width (configs/demo/mimdet_shapes.py: 192 wide, 3 blocks,
3 heads; a 32-wide decoder with 4 heads, whose first block the demo's MIMDet takes) on the
synthetic shapes train images, a few minutes on a CPU (``tools/demo.py --mae``).

MAE's recipe otherwise, with two changes for a run of minutes instead of days: the crops are
128x128 (the shapes images are 160-256 px; 64 patches, 16 of them visible) and the base
learning rate is 10x MAE's (1.5e-3 x batch / 256), as the schedule is 1000 times shorter.
"""
from .mae_pretrain_vit_base import dataloader, datasets, lr_multiplier, model, optimizer, train

model.update(img_size=128, embed_dim=192, depth=3, num_heads=3, decoder_embed_dim=32, decoder_depth=2,
             decoder_num_heads=4)
dataloader.train.dataset.folder = "datasets/shapes/train"
dataloader.train.total_batch_size = 64
dataloader.train.num_workers = 1
optimizer.lr.base_lr = 1.5e-3
train.max_iter = 600
train.amp.enabled = True
train.amp.dtype = None  # bf16 where the CPU computes it natively, fp32 elsewhere; CUDA fp16
train.seed = 0
train.checkpointer.period = 200
train.checkpointer.max_to_keep = 2
train.log_period = 20
train.output_dir = "output/demo_mae/pretrain"

__all__ = ["dataloader", "datasets", "lr_multiplier", "model", "optimizer", "train"]
