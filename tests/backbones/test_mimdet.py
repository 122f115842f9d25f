"""MIMDetBackbone: outputs, released state-dict names, parameter counts, sample ratios, errors."""
import math

import models  # noqa: F401  (before detectron2)
import pytest
import torch
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.structures import ImageList

from models.backbones.encoder import sample_tokens
from models.backbones.mimdet import MIMDetBackbone

TINY = dict(img_size=128, embed_dim=64, depth=2, num_heads=4, drop_path_rate=0.0, decoder_embed_dim=32,
            decoder_depth=2, decoder_num_heads=4)
VIT_L = dict(embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.4)
# Whole ViT-L detector with 14x14 tables (img_size 224), the original's 345.27M, and its
# non-backbone part relative to ViT-B's: only FPN's lateral 1x1 convs differ (c2/c3 inputs
# 256/512 instead of 192/384, 256 outputs, no bias).
VIT_L_DETECTOR_PARAMS = 345_268_848
VIT_L_EXTRA_LATERAL_PARAMS = 256 * ((256 - 192) + (512 - 384))


def _two_images(height: int = 200, width: int = 300) -> ImageList:
    torch.manual_seed(0)
    images = [torch.randn(3, height, width), torch.randn(3, height * 3 // 4, width + 30)]
    return ImageList.from_tensors(images, size_divisibility=32)


@pytest.mark.parametrize("dims, channels", [({}, [192, 384, 512, 512]), (VIT_L, [256, 512, 512, 512])])
def test_c2_to_c5_shapes_for_vit_b_and_vit_l_widths(dims, channels):
    backbone = MIMDetBackbone(**dict(dims, depth=1)).eval()
    images = _two_images()
    assert images.tensor.shape[-2:] == (224, 352)
    with torch.no_grad():
        features = backbone(images)
    specs = backbone.output_shape()
    assert list(features) == list(specs) == ["c2", "c3", "c4", "c5"]
    for (name, feature), width in zip(features.items(), channels):
        stride = specs[name].stride
        assert stride == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}[name]
        assert specs[name].channels == width
        assert feature.shape == (2, width, 224 // stride, 352 // stride)
    assert backbone.size_divisibility == 32


@pytest.mark.parametrize("fill_mode, tsv", [("mask_token", "mimdet_vit_b_maskfill_grid50.tsv"),
                                            ("conv_feature", "mimdet_vit_b_convfill_grid50.tsv")])
def test_vit_b_state_dict_matches_released_checkpoint(fill_mode, tsv, interop):
    table = interop(tsv)
    expected, detector_total = table.shapes("backbone.bottom_up."), table.total
    with torch.device("meta"):  # names and shapes only: no need to initialise 100M weights
        backbone = MIMDetBackbone(img_size=800, fill_mode=fill_mode)
    state = {name: tuple(t.shape) for name, t in backbone.state_dict().items()}
    assert state == expected
    numel = sum(math.prod(shape) for shape in state.values())
    assert numel == sum(math.prod(shape) for shape in expected.values())
    assert detector_total == {"mask_token": 127_561_552, "conv_feature": 127_954_768}[fill_mode]  # whole detector


def test_vit_l_parameter_count_is_the_originals(interop):
    table = interop("mimdet_vit_b_maskfill_grid50.tsv")
    vit_b, vit_b_total = table.shapes("backbone.bottom_up."), table.total
    vit_b_rest = vit_b_total - sum(math.prod(shape) for shape in vit_b.values())  # FPN and heads of ViT-B
    with torch.device("meta"):
        backbone = MIMDetBackbone(img_size=224, **VIT_L)
    numel = sum(t.numel() for t in backbone.state_dict().values())
    assert numel == VIT_L_DETECTOR_PARAMS - vit_b_rest - VIT_L_EXTRA_LATERAL_PARAMS
    assert backbone.encoder.blocks[23].drop_path1.drop_prob == pytest.approx(0.4)


def test_fixed_tables_are_frozen_and_names_nest_under_fpn():
    backbone = MIMDetBackbone(**TINY)
    assert not backbone.encoder.pos_embed.requires_grad and not backbone.decoder.decoder_pos_embed.requires_grad
    fpn = FPN(bottom_up=backbone, in_features=["c2", "c3", "c4", "c5"], out_channels=16,
              top_block=LastLevelMaxPool()).eval()
    assert {"bottom_up.encoder.pos_embed", "bottom_up.decoder.mask_token"} <= set(fpn.state_dict())
    with torch.no_grad():
        pyramid = fpn(_two_images(100, 120))  # FPN hands the ImageList on to bottom_up
    assert {name: tuple(p.shape[-2:]) for name, p in pyramid.items()} == {
        "p2": (32, 40), "p3": (16, 20), "p4": (8, 10), "p5": (4, 5), "p6": (2, 3)}


def _tokens_seen(backbone, images):
    seen = []
    handle = backbone.encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        backbone(images)
    handle.remove()
    return seen[0]


def test_train_uses_sample_ratio_and_eval_uses_eval_sample_ratio():
    images = torch.randn(1, 3, 128, 160)  # 8 x 10 = 80 tokens
    backbone = MIMDetBackbone(**TINY, sample_ratio=0.25, eval_sample_ratio=0.5)
    assert _tokens_seen(backbone.train(), images) == 20
    assert _tokens_seen(backbone.eval(), images) == 40
    backbone.eval_sample_ratio = None  # falls back to sample_ratio, as the original's --eval-only override expects
    assert _tokens_seen(backbone, images) == 20
    backbone.sample_ratio = 1.0
    assert _tokens_seen(backbone, images) == 80


def test_ratio_one_equals_the_shuffled_path():
    torch.manual_seed(0)
    backbone = MIMDetBackbone(**TINY, sample_ratio=1.0).eval()
    images = _two_images(64, 90)
    with torch.no_grad():
        direct = backbone(images)
        encoder = backbone.encoder
        (c2, c3, stem_c4), tokens = encoder.embed(images.tensor)
        ids_shuffle, ids_restore = sample_tokens(torch.ones(tokens.shape[:2], dtype=torch.bool), tokens.shape[1])
        shuffled = torch.gather(tokens, 1, ids_shuffle[..., None].expand_as(tokens))
        c4 = backbone.decoder(encoder.run_blocks(shuffled), stem_c4, ids_shuffle, ids_restore)
    torch.testing.assert_close(direct["c4"], c4, atol=1e-5, rtol=0)
    torch.testing.assert_close(direct["c5"], torch.nn.functional.max_pool2d(c4, 2), atol=1e-5, rtol=0)
    assert torch.equal(direct["c2"], c2) and torch.equal(direct["c3"], c3)


def test_plain_tensor_means_every_pixel_is_real():
    backbone = MIMDetBackbone(**TINY, sample_ratio=0.5).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.manual_seed(3)
        from_tensor = backbone(images)
        torch.manual_seed(3)
        from_list = backbone(ImageList(images, [(64, 96), (64, 96)]))
    assert all(torch.equal(from_tensor[k], from_list[k]) for k in from_tensor)


def test_fill_modes_differ_only_in_the_completed_maps():
    torch.manual_seed(0)
    mask_fill = MIMDetBackbone(**TINY, fill_mode="mask_token").eval()
    conv_fill = MIMDetBackbone(**TINY, fill_mode="conv_feature").eval()
    incompatible = conv_fill.load_state_dict(mask_fill.state_dict(), strict=False)
    assert set(incompatible.missing_keys) == {"decoder.conv_feat_proj.weight", "decoder.conv_feat_proj.bias"}
    images = _two_images(64, 90)
    outputs = []
    for backbone in (mask_fill, conv_fill):
        torch.manual_seed(1)
        with torch.no_grad():
            outputs.append(backbone(images))
    assert torch.equal(outputs[0]["c2"], outputs[1]["c2"])
    assert not torch.allclose(outputs[0]["c4"], outputs[1]["c4"], atol=1e-3)


@pytest.mark.parametrize("fill_mode", ["mask_token", "conv_feature"])
def test_gradients_reach_stem_encoder_and_decoder(fill_mode):
    backbone = MIMDetBackbone(**TINY, fill_mode=fill_mode, use_act_checkpoint=True).train()
    features = backbone(_two_images(64, 90))
    sum(f.square().mean() for f in features.values()).backward()
    fill = backbone.decoder.mask_token if fill_mode == "mask_token" else backbone.decoder.conv_feat_proj.weight
    for param in (backbone.encoder.patch_embed.proj[0][0].weight, backbone.encoder.blocks[0].attn.qkv.weight,
                  backbone.encoder.norm.weight, backbone.decoder.decoder_embed.weight,
                  backbone.decoder.decoder_blocks[1].mlp.fc2.weight, fill):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert backbone.encoder.pos_embed.grad is None


@pytest.mark.parametrize("images, message", [
    (torch.randn(1, 1, 64, 64), r"\(B, 3, H, W\) RGB images.*\(1, 1, 64, 64\)"),
    (torch.randn(3, 64, 64), r"\(B, 3, H, W\) RGB images.*\(3, 64, 64\)"),
    (torch.randn(1, 3, 48, 64), r"multiple of 32.*got 48x64"),
    (torch.randn(1, 3, 0, 64), r"at least 32.*got 0x64"),
    ([torch.randn(3, 64, 64)], r"ImageList or a \(B, 3, H, W\) tensor, got list"),
])
def test_bad_images_are_refused(images, message):
    backbone = MIMDetBackbone(**TINY)
    with pytest.raises((ValueError, TypeError), match=message):
        backbone(images)


@pytest.mark.parametrize("overrides, message", [
    (dict(sample_ratio=0.0), r"sample_ratio must be a number in \(0, 1\], got 0\.0"),
    (dict(sample_ratio=1.5), r"sample_ratio must be a number in \(0, 1\], got 1\.5"),
    (dict(eval_sample_ratio=-0.1), r"eval_sample_ratio must be a number in \(0, 1\], got -0\.1"),
    (dict(fill_mode="zeros"), r"fill_mode must be one of .*got 'zeros'"),
    (dict(patch_size=14), r"patch_size must be 16.*got 14"),
    (dict(out_features=["c2", "p3"]), r"out_features must be a non-empty subset.*'p3'"),
])
def test_bad_arguments_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        MIMDetBackbone(**dict(TINY, **overrides))


def test_ratio_set_later_is_checked_too():
    backbone = MIMDetBackbone(**TINY)
    with pytest.raises(ValueError, match=r"sample_ratio must be a number in \(0, 1\], got 2"):
        backbone.sample_ratio = 2


@pytest.mark.parametrize("fill_mode", ["mask_token", "conv_feature"])
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_residual_stream_and_c4_stay_fp32_under_autocast(fill_mode, ratio):
    """As the original: the fp32 position tables keep the tokens in fp32; only matmuls (and the
    stem's convolutions) run in bf16."""
    backbone = MIMDetBackbone(**TINY, fill_mode=fill_mode, sample_ratio=ratio)
    seen = {}

    def record(key: str, tensor: torch.Tensor) -> None:  # hooks must return None
        seen.setdefault(key, tensor.dtype)

    for name, block in [("encoder", backbone.encoder.blocks[-1]), ("decoder", backbone.decoder.decoder_blocks[0])]:
        block.register_forward_pre_hook(lambda module, args, name=name: record(f"{name} in", args[0]))
        block.register_forward_hook(lambda module, args, out, name=name: record(f"{name} out", out))
    backbone.encoder.blocks[0].attn.qkv.register_forward_hook(lambda module, args, out: record("qkv", out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = backbone(_two_images(96, 128))
    assert seen == {"encoder in": torch.float32, "encoder out": torch.float32, "decoder in": torch.float32,
                    "decoder out": torch.float32, "qkv": torch.bfloat16}
    assert {name: f.dtype for name, f in features.items()} == {
        "c2": torch.bfloat16, "c3": torch.bfloat16, "c4": torch.float32, "c5": torch.float32}
