"""COCO loaders with large-scale jitter (as Benchmarking-ViT): scale 0.1-2.0 of 1024, a 1024x1024
crop (padded when smaller), flip. Test: short side 1024 (max 1024), padded to 1024x1024 --
the model maps predictions back with one scale factor (``lsj_postprocess``)."""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .coco import dataloader

image_size = 1024

dataloader.train.mapper.augmentations = [
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size)),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size)),
]
