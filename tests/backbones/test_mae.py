"""models/backbones/mae.py: MAE's pre-training model with the released checkpoints' names, its
masking and its loss, and MIMDet reading what it writes."""
import models  # noqa: F401  (before detectron2)
import pytest
import torch

from models.backbones.mae import MaskedAutoencoderViT
from models.backbones.mimdet import MIMDetBackbone
from models.checkpoint import load_mae_into_backbone

VIT_L = dict(embed_dim=1024, depth=24, num_heads=16)


def _tiny(**kwargs) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(img_size=64, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                                decoder_depth=1, decoder_num_heads=4, **kwargs)


@pytest.mark.parametrize("size, table", [("b", "mae_pretrain_vit_b_full.tsv"), ("l", "mae_pretrain_vit_l_full.tsv")])
def test_state_dict_has_the_released_names_and_shapes(interop, size, table):
    model = MaskedAutoencoderViT(**(VIT_L if size == "l" else {}))
    state = model.state_dict()
    released = interop(table).entries
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: shape for k, (shape, _) in released.items()}
    assert all(str(v.dtype).replace("torch.", "") == released[k][1] for k, v in state.items())


def test_mimdet_loads_what_it_writes_without_missing_encoder_or_decoder_keys(tmp_path):
    mae = MaskedAutoencoderViT(img_size=64, embed_dim=96, depth=2, num_heads=4, decoder_embed_dim=64,
                               decoder_depth=2, decoder_num_heads=4)
    torch.save({"model": mae.state_dict()}, tmp_path / "mae.pth")
    backbone = MIMDetBackbone(img_size=64, embed_dim=96, depth=2, num_heads=4, decoder_embed_dim=64,
                              decoder_depth=1, decoder_num_heads=4)
    report = load_mae_into_backbone(backbone, str(tmp_path / "mae.pth"))
    missing = [k for k in report.missing if k.startswith(("encoder.blocks", "encoder.norm", "decoder."))]
    assert missing == [] and report.loaded
    assert torch.equal(backbone.encoder.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    assert torch.equal(backbone.decoder.decoder_blocks[0].attn.qkv.weight, mae.decoder_blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_masking_keeps_int_l_times_one_minus_ratio_tokens(ratio):
    model = _tiny(mask_ratio=ratio)
    tokens = torch.randn(3, 16, 8)
    kept, mask, ids_restore = model.random_masking(tokens)
    assert kept.shape == (3, int(16 * (1 - ratio)), 8)
    assert (mask.sum(1) == 16 - int(16 * (1 - ratio))).all()
    for image in range(3):  # kept tokens are the visible ones, unchanged
        visible = tokens[image][mask[image] == 0]
        assert sorted(map(tuple, visible.tolist())) == sorted(map(tuple, kept[image].tolist()))
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(16).expand(3, -1))


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_the_loss_counts_hidden_patches_only(norm_pix_loss):
    model = _tiny(norm_pix_loss=norm_pix_loss)
    images = torch.randn(2, 3, 64, 64)
    target = model.patchify(images)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.zeros(2, 16)
    mask[:, ::3] = 1
    pred = target.clone()
    pred[mask == 0] += 100.0  # wrong everywhere the loss must not look
    assert model.forward_loss(images, pred, mask).item() == pytest.approx(0.0, abs=1e-6)
    pred = target.clone()
    pred[mask == 1] += 2.0  # off by 2 on every hidden pixel
    assert model.forward_loss(images, pred, mask).item() == pytest.approx(4.0, rel=1e-5)


def test_forward_gives_a_loss_and_a_prediction_per_patch():
    model = _tiny()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["pred"].shape == (2, 16, 16 * 16 * 3) and out["mask"].shape == (2, 16)
    assert out["mask"].sum().item() == 2 * (16 - int(16 * 0.25))
    out["loss_mae"].backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None and model.mask_token.grad is not None


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, "0.75", True])
def test_a_mask_ratio_outside_0_1_is_named(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must be a number in \(0, 1\), got "):
        _tiny(mask_ratio=ratio)


@pytest.mark.parametrize("ratio", [0.94, 0.999])
def test_a_mask_ratio_that_hides_every_patch_is_named(ratio):
    # 16 patches: int(16 * 0.06) = 0 visible
    with pytest.raises(ValueError, match=rf"mask_ratio {ratio} hides every one of the 16 patches"):
        _tiny(mask_ratio=ratio)
    assert _tiny(mask_ratio=0.93).random_masking(torch.randn(1, 16, 8))[0].shape[1] == 1


def test_unpatchify_inverts_patchify():
    model = _tiny()
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.unpatchify(model.patchify(images)), images)
