"""ConvStem: stage layout, output strides/widths, activation checkpointing."""
import models  # noqa: F401  (before detectron2)
import pytest
import torch
from torch import nn

from models.backbones.conv_stem import ConvStem


def test_outputs_are_stride_4_8_16_with_quarter_half_full_width():
    stem = ConvStem(embed_dim=64)
    c2, c3, c4 = stem(torch.randn(2, 3, 64, 96))
    assert c2.shape == (2, 16, 16, 24)
    assert c3.shape == (2, 32, 8, 12)
    assert c4.shape == (2, 64, 4, 6)
    assert stem.out_channels == (16, 32, 64)


def test_stage_layout_matches_released_names():
    stem = ConvStem(embed_dim=64)
    shapes = {name: tuple(p.shape) for name, p in stem.state_dict().items()}
    assert shapes == {
        "proj.0.0.weight": (8, 3, 3, 3), "proj.0.1.weight": (8,), "proj.0.1.bias": (8,),
        "proj.1.0.weight": (16, 8, 3, 3), "proj.1.1.weight": (16,), "proj.1.1.bias": (16,),
        "proj.2.0.weight": (32, 16, 3, 3), "proj.2.1.weight": (32,), "proj.2.1.bias": (32,),
        "proj.3.0.weight": (64, 32, 3, 3), "proj.3.1.weight": (64,), "proj.3.1.bias": (64,),
        "proj.3.3.weight": (64, 64, 1, 1), "proj.3.3.bias": (64,),
    }
    for stage in stem.proj:
        conv, norm, act = stage[0], stage[1], stage[2]
        assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (2, 2), (1, 1), None)
        assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 1 and norm.eps == 1e-6
        assert isinstance(act, nn.GELU)


def test_embed_dim_must_split_in_eighths():
    with pytest.raises(ValueError, match=r"divisible by 8.*got 60"):
        ConvStem(embed_dim=60)


def test_checkpointing_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain, checkpointed = ConvStem(embed_dim=32), ConvStem(embed_dim=32, use_act_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(1, 3, 32, 64)
    grads = []
    for stem in (plain, checkpointed):
        stem.train()
        outputs = stem(images)
        sum(o.square().mean() for o in outputs).backward()
        grads.append([p.grad.clone() for p in stem.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(outputs, plain(images)))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
