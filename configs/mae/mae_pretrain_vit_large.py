"""MAE pre-training of a ViT-L/16: configs/mae/mae_pretrain_vit_base.py with ViT-L's widths
(1024 wide, 24 blocks, 16 heads; the same 8-block 512-wide decoder). Writes the names and
shapes of ``mae_pretrain_vit_large_full.pth``."""
from .mae_pretrain_vit_base import dataloader, datasets, lr_multiplier, model, optimizer, train

model.update(embed_dim=1024, depth=24, num_heads=16)
train.output_dir = "output/mae_pretrain_vit_large"

__all__ = ["dataloader", "datasets", "lr_multiplier", "model", "optimizer", "train"]
