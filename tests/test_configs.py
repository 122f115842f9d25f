"""Every COCO config (the original project's MIMDet and Benchmarking configs): loads, builds the
full-size detector with the released layout, trains a step.

Full-size models are built (a second or two each); forward/backward passes run on two small
generated images with fewer RoIs, so the suite stays within CPU minutes.
"""
import math
from pathlib import Path

import models  # noqa: F401  (before detectron2)
import pytest
import torch
from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from models.config import load_config
from models.optim import count_parameters

REPO = Path(__file__).resolve().parents[1]
MIMDET = "configs/mimdet/mimdet_vit_{}_mask_rcnn_fpn_sr_{}_800_1333_4xdec_{}coco_3x{}.py"
BENCH = "configs/benchmarking/benchmarking_mask_rcnn_base_FPN_{}ep_LSJ_mae.py"
VIT_B_05, VIT_B_025 = MIMDET.format("base", "0p5", "", ""), MIMDET.format("base", "0p25", "", "")
VIT_B_025_BS16 = MIMDET.format("base", "0p25", "", "_bs16")
VIT_B_CONV = MIMDET.format("base", "0p5", "convfill_", "")
VIT_L, VIT_L_CONV = MIMDET.format("large", "0p5", "", ""), MIMDET.format("large", "0p5", "convfill_", "")
BENCHMARKING = [BENCH.format(e) for e in (25, 50, 100)]
MIMDET_CONFIGS = [VIT_B_05, VIT_B_025, VIT_B_025_BS16, VIT_B_CONV, VIT_L, VIT_L_CONV]
ALL_CONFIGS = MIMDET_CONFIGS + BENCHMARKING

# (config, released checkpoint's table or None, whole-detector parameter count)
FULL_SIZE = [
    (VIT_B_05, "mimdet_vit_b_maskfill_grid50.tsv", 127_561_552),
    (VIT_B_CONV, "mimdet_vit_b_convfill_grid50.tsv", 127_954_768),
    (VIT_L, None, 345_268_848),  # 14x14 position tables, as the original ViT-L
    (BENCHMARKING[2], "benchmarking_vit_b.tsv", 118_674_184),
]


def load(config: str, *overrides: str):
    return load_config(str(REPO / config), list(overrides))


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_config_loads_with_launcher_keys(config):
    cfg = load(config)
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train", "mae_checkpoint", "datasets"} <= set(cfg)
    assert cfg.mae_checkpoint.path is None and list(cfg.datasets.register) == []
    assert cfg.dataloader.train.total_batch_size == (16 if config == VIT_B_025_BS16 else 64)
    assert cfg.dataloader.train.mapper.image_format == "RGB" and cfg.dataloader.train.mapper.use_instance_mask
    assert cfg.dataloader.test.dataset.filter_empty is False
    assert cfg.model.input_format == "RGB" and cfg.train.amp.enabled


def test_mimdet_config_deltas():
    assert load(VIT_B_05).model.backbone.bottom_up.sample_ratio == 0.5
    assert load(VIT_B_025).model.backbone.bottom_up.sample_ratio == 0.25
    bottom_up = load(VIT_L).model.backbone.bottom_up
    assert (bottom_up.embed_dim, bottom_up.depth, bottom_up.num_heads, bottom_up.drop_path_rate) == (1024, 24, 16, 0.4)
    assert load(VIT_B_CONV).model.backbone.bottom_up.fill_mode == "conv_feature"
    assert load(VIT_L_CONV).model.backbone.bottom_up.fill_mode == "conv_feature"
    assert load(VIT_B_05).model.backbone.bottom_up.img_size == 800


def lr_at(cfg, iteration: int) -> float:
    return instantiate(cfg.lr_multiplier)(iteration / cfg.train.max_iter)


@pytest.mark.parametrize("config, batch, lr, iters_per_epoch",
                         [(VIT_B_05, 64, 8e-5, 1875), (VIT_B_025_BS16, 16, 4e-5, 7500)])
def test_3x_schedule(config, batch, lr, iters_per_epoch):
    cfg = load(config)
    assert cfg.optimizer.lr == pytest.approx(lr) and cfg.optimizer.weight_decay == 0.1
    assert cfg.train.max_iter == 36 * iters_per_epoch
    assert cfg.train.checkpointer.period == cfg.train.eval_period == iters_per_epoch
    warmup_end = iters_per_epoch // 4
    assert lr_at(cfg, 0) == 0.0 and lr_at(cfg, warmup_end // 2) == pytest.approx(0.5, abs=0.01)
    assert lr_at(cfg, warmup_end + 1) == 1.0
    assert lr_at(cfg, 27 * iters_per_epoch - 1) == 1.0 and lr_at(cfg, 27 * iters_per_epoch) == pytest.approx(0.1)
    assert lr_at(cfg, 33 * iters_per_epoch) == pytest.approx(0.01)


@pytest.mark.parametrize("epochs, max_iter", [(25, 46093), (50, 92187), (100, 184375)])
def test_benchmarking_schedule(epochs, max_iter):
    cfg = load(BENCH.format(epochs))
    assert cfg.train.max_iter == max_iter and cfg.train.checkpointer.period == cfg.train.eval_period == 1844
    assert lr_at(cfg, 0) == pytest.approx(0.001)
    warmup_end = math.ceil(0.25 * 184375 / 100)  # 1/4 epoch whatever the length
    assert lr_at(cfg, warmup_end) == pytest.approx(1.0, abs=1e-3)
    assert lr_at(cfg, max_iter) == pytest.approx(0.0, abs=1e-9)
    assert cfg.model.lsj_postprocess and cfg.dataloader.test.mapper.augmentations[1].crop_size == (1024, 1024)


@pytest.mark.parametrize("config, tsv, count", FULL_SIZE, ids=["vit_b", "vit_b_convfill", "vit_l", "benchmarking"])
def test_full_size_parameters_and_names(config, tsv, count, interop):
    model = instantiate(load(config).model)
    assert count_parameters(model) == count
    if tsv is not None:
        expected = interop(tsv).shapes()
        actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert sorted(actual) == sorted(expected)
        assert actual == expected


def toy_batch(num_classes: int = 80) -> list:
    """Two images (128x160, 160x128) with a couple of boxes and polygon masks each."""
    torch.manual_seed(0)
    batch = []
    for h, w in [(128, 160), (160, 128)]:
        instances = Instances((h, w))
        boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 40.0, 120.0, 110.0]])
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.tensor([1, num_classes - 1])
        instances.gt_masks = PolygonMasks([[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes.tolist()])
        image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


SMALL_HEADS = (
    "model.roi_heads.batch_size_per_image=32",
    "model.proposal_generator.post_nms_topk=[64,32]",
    "model.proposal_generator.pre_nms_topk=[256,128]",
)


@pytest.mark.parametrize("config", [VIT_B_05, VIT_B_025, VIT_B_CONV])
def test_full_size_vit_b_trains_and_infers(config):
    cfg = load(config, *SMALL_HEADS)
    model = instantiate(cfg.model)
    with EventStorage():
        losses = model(toy_batch())
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    sum(losses.values()).backward()
    stem_grad = model.backbone.bottom_up.encoder.patch_embed.proj[0][0].weight.grad
    assert stem_grad is not None and torch.isfinite(stem_grad).all()
    model.eval()
    with torch.no_grad():
        outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in toy_batch()])
    assert [o["instances"].image_size for o in outputs] == [(128, 160), (160, 128)]


def test_vit_l_forward():
    model = instantiate(load(VIT_L, *SMALL_HEADS).model)
    with EventStorage():
        losses = model(toy_batch()[:1])
    assert all(torch.isfinite(v) for v in losses.values())


def test_benchmarking_trains_shrunk_and_maps_back_with_one_scale():
    shrink = ("model.backbone.bottom_up.img_size=128", "model.backbone.bottom_up.window_size=4",
              "model.backbone.bottom_up.depth=3", "model.backbone.bottom_up.global_every=3")
    cfg = load(BENCHMARKING[0], *SMALL_HEADS, *shrink)
    model = instantiate(cfg.model)
    batch = toy_batch()
    for item in batch:  # LSJ inputs are padded to the fixed square
        image = torch.zeros(3, 128, 128, dtype=torch.uint8)
        h, w = item["image"].shape[1:]
        image[:, : min(h, 128), : min(w, 128)] = item["image"][:, :128, :128]
        item["image"] = image
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": 256, "width": 160}])[0]["instances"]
    assert out.image_size == (256, 160) and (out.pred_boxes.tensor[:, 3] <= 256).all()


def test_overrides_apply_and_reject_bad_input():
    cfg = load(VIT_B_05, "model.backbone.bottom_up.sample_ratio=1.0", "dataloader.train.total_batch_size=8",
               "mae_checkpoint.path=/tmp/mae.pth", "model.backbone.bottom_up.eval_sample_ratio=1.0")
    assert cfg.model.backbone.bottom_up.sample_ratio == 1.0 and cfg.dataloader.train.total_batch_size == 8
    assert cfg.mae_checkpoint.path == "/tmp/mae.pth" and cfg.model.backbone.bottom_up.eval_sample_ratio == 1.0
    with pytest.raises(KeyError, match="model.backbone.bottom_up.sample_rate"):
        load(VIT_B_05, "model.backbone.bottom_up.sample_rate=1.0")
    with pytest.raises(KeyError, match="train.max_iters"):
        load(VIT_B_05, "train.max_iters=10")
    with pytest.raises(ValueError, match="train.max_iter"):
        load(VIT_B_05, "train.max_iter=ten")
    with pytest.raises(ValueError, match="key=value"):
        load(VIT_B_05, "train.max_iter")
    # None as Python spells it, for a key that holds None: None, not the string 'None' (which
    # detectron2 would also write into the run's config.yaml).
    assert cfg.train.amp.dtype is None
    assert load(VIT_B_05, "train.amp.dtype=None").train.amp.dtype is None
    assert load(VIT_B_05, "train.amp.dtype=null").train.amp.dtype is None
    assert load(VIT_B_05, "train.amp.dtype=none").train.amp.dtype is None
    assert load(VIT_B_05, "train.output_dir=None").train.output_dir == "None"  # a folder named None


def built_optimizer(config: str, *overrides: str):
    """(model, optimizer) as the launcher builds them, and {parameter name: its group}."""
    cfg = load(config, *overrides)
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    group_of_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    groups = {name: group_of_param[id(p)] for name, p in model.named_parameters() if id(p) in group_of_param}
    return model, optimizer, groups


# lr and weight decay per parameter at batch 64, as the original configs build them: encoder
# base/2, stem base, decoder, FPN and heads base*2 (m = 2.0 for ViT-B and ViT-L alike).
MIMDET_GROUPS = {
    "backbone.bottom_up.encoder.blocks.0.attn.qkv.weight": (4e-5, 0.1),
    "backbone.bottom_up.encoder.blocks.0.attn.qkv.bias": (4e-5, 0.0),
    "backbone.bottom_up.encoder.blocks.0.norm1.weight": (4e-5, 0.0),
    "backbone.bottom_up.encoder.patch_embed.proj.0.0.weight": (8e-5, 0.1),
    "backbone.bottom_up.encoder.patch_embed.proj.0.1.weight": (8e-5, 0.0),
    "backbone.bottom_up.decoder.decoder_blocks.0.mlp.fc1.weight": (1.6e-4, 0.1),
    "backbone.fpn_lateral2.weight": (1.6e-4, 0.1),
    "backbone.fpn_lateral2.norm.weight": (1.6e-4, 0.0),
    "roi_heads.box_head.fc1.bias": (1.6e-4, 0.0),
    "proposal_generator.rpn_head.conv.conv0.weight": (1.6e-4, 0.1),
}


@pytest.mark.parametrize("config", [VIT_B_05, VIT_L], ids=["vit_b", "vit_l"])
def test_mimdet_parameter_groups(config):
    model, _, groups = built_optimizer(config)
    for name, (lr, decay) in MIMDET_GROUPS.items():
        assert (groups[name]["lr"], groups[name]["weight_decay"]) == (pytest.approx(lr), decay), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(groups) == trainable and "backbone.bottom_up.encoder.pos_embed" not in groups


def test_the_original_multiplier_key_sets_the_three_learning_rates():
    _, _, groups = built_optimizer(VIT_B_05, "optimizer.params.multiplier=4.0")
    lrs = [groups[f"backbone.bottom_up.{name}"]["lr"] for name in
           ("encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.0.0.weight", "decoder.decoder_embed.weight")]
    assert lrs == [pytest.approx(2e-5), pytest.approx(8e-5), pytest.approx(3.2e-4)]


def test_benchmarking_parameter_groups():
    """detectron2 0.6's default groups, as the original: biases decay, norms and tables do not."""
    _, optimizer, groups = built_optimizer(BENCHMARKING[2])
    assert {g.get("lr", optimizer.defaults["lr"]) for g in optimizer.param_groups} == {8e-5}
    expect = {
        "backbone.bottom_up.pos_embed": 0.0,
        "backbone.bottom_up.windowed_rel_pos_bias.relative_position_bias_table": 0.0,
        "backbone.bottom_up.global_rel_pos_bias.relative_position_bias_table": 0.0,
        "backbone.bottom_up.blocks.0.norm1.weight": 0.0,
        "backbone.bottom_up.blocks.0.norm1.bias": 0.0,
        "backbone.bottom_up.ms_adaptor.0.1.weight": 0.0,  # GroupNorm
        "backbone.fpn_lateral2.norm.weight": 0.0,
        "backbone.bottom_up.blocks.0.attn.qkv.weight": 0.1,
        "backbone.bottom_up.blocks.0.attn.qkv.bias": 0.1,
        "backbone.bottom_up.patch_embed.proj.bias": 0.1,
        "backbone.bottom_up.ms_adaptor.0.0.bias": 0.1,
        "roi_heads.box_predictor.cls_score.bias": 0.1,
    }
    for name, decay in expect.items():
        assert groups[name].get("weight_decay", optimizer.defaults["weight_decay"]) == decay, name


def test_lsj_postprocess_uses_one_scale_for_both_axes():
    from models.meta_arch import lsj_detector_postprocess

    results = Instances((1024, 1024))  # a 640x480 image resized by 1.6 to 1024x768, padded to 1024x1024
    results.pred_boxes = Boxes(torch.tensor([[160.0, 80.0, 960.0, 720.0]]))
    results.scores = torch.tensor([0.9])
    results.pred_classes = torch.tensor([3])
    results.pred_masks = torch.ones(1, 1, 28, 28)
    out = lsj_detector_postprocess(results, 480, 640)
    assert out.image_size == (480, 640)
    assert out.pred_boxes.tensor.tolist() == [[100.0, 50.0, 600.0, 450.0]]
    assert out.pred_masks.shape == (1, 480, 640) and out.pred_masks[0, 60:440, 110:590].all()
    assert out.pred_masks.sum() == out.pred_masks[0, 50:450, 100:600].sum()  # nothing outside the box


def test_mimdet_configs_train_on_a_subset_and_evaluate_on_every_token():
    """The paper's protocol: a random subset of tokens in training, all of them in evaluation, so
    two evaluations of one image agree exactly. (The tiny config inherits the ratios of the ViT-B
    sr 0.5 config; every MIMDet config shares them from configs/common/models.)"""
    for config in MIMDET_CONFIGS:
        assert load(config).model.backbone.bottom_up.eval_sample_ratio == 1.0, config
    torch.manual_seed(0)
    backbone = instantiate(load("configs/test/tiny_mimdet.py").model.backbone.bottom_up)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        trained = [backbone.train()(images)["c4"] for _ in range(2)]
        evaluated = [backbone.eval()(images)["c4"] for _ in range(2)]
    assert not torch.equal(*trained)  # half the tokens, drawn anew each time
    assert torch.equal(*evaluated)


LAUNCHER_KEYS = {"model", "dataloader", "optimizer", "lr_multiplier", "train", "mae_checkpoint", "datasets"}


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*/*.py")
                                          if p.parent.name != "common"), ids=lambda c: Path(c).stem)
def test_every_top_level_key_is_one_the_launcher_reads(config):
    """A stray top-level key (say ``bottom_up = model.backbone.bottom_up``) would accept
    overrides such as ``bottom_up.sample_ratio=0.25`` that change nothing."""
    pretraining = config.startswith("configs/mae/")  # starts from random weights: no mae_checkpoint group
    assert set(load(config)) == LAUNCHER_KEYS - ({"mae_checkpoint"} if pretraining else set())


def test_mae_configs_follow_maes_recipe():
    base, large = load("configs/mae/mae_pretrain_vit_base.py"), load("configs/mae/mae_pretrain_vit_large.py")
    assert (base.model.embed_dim, base.model.depth, large.model.embed_dim, large.model.depth) == (768, 12, 1024, 24)
    assert base.model.mask_ratio == 0.75 and base.model.norm_pix_loss and base.model.decoder_depth == 8
    assert tuple(base.dataloader.train.mapper.scale) == (0.2, 1.0) and base.dataloader.train.mapper.img_size == 224

    cfg = load("configs/mae/mae_pretrain_shapes.py", "dataloader.train.total_batch_size=32")
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert optimizer.defaults["lr"] == pytest.approx(1.5e-3 * 32 / 256)  # follows the batch size
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert {"cls_token", "mask_token", "blocks.0.attn.qkv.weight"} <= decay[0.05]  # MAE decays the tokens
    assert {"blocks.0.attn.qkv.bias", "norm.weight", "decoder_norm.bias"} <= decay[0.0]
    assert "pos_embed" not in decay[0.0] | decay[0.05]  # fixed sin-cos tables do not train

    schedule = instantiate(cfg.lr_multiplier)  # linear warm-up over 5%, then a half cosine to 0 (MAE's)
    assert [schedule(w) for w in (0.0, 0.025)] == pytest.approx([0.0, 0.5])
    assert [schedule(w) for w in (0.05, 0.525, 0.9999)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)
