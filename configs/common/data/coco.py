"""COCO loaders with MIMDet's augmentation (the original configs): flip; with p=0.5 a short side of
400/500/600 and an absolute random crop of 384..600; then a short side of 480..800 (max
1333). Test: short side 800, max 1333. RGB, instance masks, total batch 64.

The train loader is the resumable one (models/data/resumable.py): the launcher gives it the
run's seed and the iteration to start at, so a resumed run sees the batches and
augmentations an uninterrupted one would."""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from models.data.datasets import InstanceDatasetMapper
from models.data.resumable import build_resumable_train_loader

dataloader = OmegaConf.create()

dataloader.train = L(build_resumable_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(InstanceDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.RandomFlip)(horizontal=True),
            L(T.RandomApply)(
                tfm_or_aug=L(T.AugmentationList)(
                    augs=[
                        L(T.ResizeShortestEdge)(short_edge_length=(400, 500, 600), sample_style="choice"),
                        L(T.RandomCrop)(crop_type="absolute_range", crop_size=(384, 600)),
                    ]
                ),
                prob=0.5,
            ),
            L(T.ResizeShortestEdge)(
                short_edge_length=(480, 512, 544, 576, 608, 640, 736, 768, 800),
                sample_style="choice",
                max_size=1333,
            ),
        ],
        image_format="RGB",
        use_instance_mask=True,
        recompute_boxes=False,  # as the original: boxes are the annotation's, clipped by the crop
    ),
    total_batch_size=64,
    num_workers=4,
    skip_unreadable=True,  # an image that cannot be read is skipped with a warning; False: stop
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(InstanceDatasetMapper)(  # detectron2's DatasetMapper, naming an image it cannot read
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${...train.output_dir}",
)
