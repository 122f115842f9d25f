"""The MIMDet backbone (Fang et al. 2022, arXiv 2204.02964): conv stem + partially observing MAE encoder + MAE decoder,
as a detectron2 ``Backbone`` giving c2..c5 to an FPN (as its ``bottom_up``).
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.structures import ImageList

from .decoder import MAEDecoderCompletion
from .encoder import PartialObservationEncoder

__all__ = ["MIMDetBackbone"]

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("c2", "c3", "c4", "c5")
# c5 is c4 max-pooled once more; inputs must tile into whole stride-32 cells.
SIZE_DIVISIBILITY = 32


def _check_ratio(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


class MIMDetBackbone(Backbone):
    """MAE-pretrained ViT that sees ``sample_ratio`` of its tokens, completed by MAE's decoder.

    Outputs: c2 (stride 4, D/4 ch) and c3 (stride 8, D/2 ch) from the conv stem; c4
    (stride 16) the decoder's map; c5 (stride 32) c4 max-pooled. c4/c5 have
    ``decoder_embed_dim`` channels.

    Args:
        img_size: image side the fixed position tables are built for (their grid is
            img_size // patch_size; they are resized to each batch's grid).
        patch_size: token stride; 16 (implied by the 4-stage conv stem).
        embed_dim, depth, num_heads, mlp_ratio: encoder ViT (768/12/12 ViT-B, 1024/24/16 ViT-L).
        drop_path_rate: stochastic depth of the last encoder block (linear from 0).
        norm_eps: LayerNorm epsilon of encoder and decoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder (512 wide, 4 blocks, 16 heads).
        sample_ratio: fraction of tokens the encoder sees, in (0, 1].
        eval_sample_ratio: the fraction used when not training; None means ``sample_ratio``.
        fill_mode: "mask_token" (MAE's mask token) or "conv_feature" (projected stem features).
        use_act_checkpoint: recompute the stem stages, encoder blocks and decoder blocks in the
            backward pass instead of keeping their activations (training only).
        out_features: which of c2..c5 to return.
    """

    def __init__(self, *, img_size: int = 800, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, norm_eps: float = 1e-5,
                 decoder_embed_dim: int = 512, decoder_depth: int = 4, decoder_num_heads: int = 16,
                 sample_ratio: float = 0.5, eval_sample_ratio: Optional[float] = None, fill_mode: str = "mask_token",
                 use_act_checkpoint: bool = False,
                 out_features: Sequence[str] = OUTPUT_NAMES) -> None:
        super().__init__()
        unknown = [name for name in out_features if name not in OUTPUT_NAMES]
        if unknown or not out_features:
            raise ValueError(f"out_features must be a non-empty subset of {OUTPUT_NAMES}, got {list(out_features)}")
        self.sample_ratio = sample_ratio
        self.eval_sample_ratio = eval_sample_ratio
        self.encoder = PartialObservationEncoder(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, norm_eps=norm_eps,
            use_act_checkpoint=use_act_checkpoint)
        self.decoder = MAEDecoderCompletion(
            embed_dim=embed_dim, decoder_embed_dim=decoder_embed_dim, depth=decoder_depth,
            num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
            table_grid=self.encoder.table_grid, fill_mode=fill_mode, use_act_checkpoint=use_act_checkpoint)
        self._out_features = list(out_features)
        stem_channels = self.encoder.patch_embed.out_channels
        channels = {"c2": stem_channels[0], "c3": stem_channels[1], "c4": decoder_embed_dim, "c5": decoder_embed_dim}
        strides = {"c2": 4, "c3": 8, "c4": patch_size, "c5": patch_size * 2}
        self._out_feature_channels = {name: channels[name] for name in self._out_features}
        self._out_feature_strides = {name: strides[name] for name in self._out_features}
        logger.info("MIMDet backbone: ViT %d x %d wide, decoder %d x %d wide, sample ratio %s (eval %s), fill %s",
                    depth, embed_dim, decoder_depth, decoder_embed_dim, self.sample_ratio,
                    self.eval_sample_ratio if eval_sample_ratio is not None else "same", fill_mode)

    # How MAE's full pre-training checkpoint (MAE's models_mae.py names) maps onto this backbone:
    # the encoder takes blocks, norm and the position table; the decoder takes decoder_embed,
    # the first decoder_depth blocks, decoder_norm, the mask token and its position table.
    _MAE_TAKES = {"encoder.": ("blocks.", "norm.", "pos_embed"),
                  "decoder.": ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "mask_token", "decoder_pos_embed")}
    mae_pos_tables = {"pos_embed": 1, "decoder_pos_embed": 1}  # MAE's tables, one cls slot each: resized
    fixed_pos_tables = {"encoder.pos_embed": 1, "decoder.decoder_pos_embed": 1}  # ours, resized on loading

    @classmethod
    def mae_source(cls, name: str) -> Optional[str]:
        """The MAE checkpoint entry that state-dict entry ``name`` loads from (None: not from MAE)."""
        for scope, taken in cls._MAE_TAKES.items():
            rest = name[len(scope):]
            if name.startswith(scope) and any(rest == t or (t.endswith(".") and rest.startswith(t)) for t in taken):
                return rest
        return None

    @property
    def sample_ratio(self) -> float:
        """Fraction of tokens the encoder sees in training (and in eval if no eval ratio is set)."""
        return self._sample_ratio

    @sample_ratio.setter
    def sample_ratio(self, value: float) -> None:
        self._sample_ratio = _check_ratio("sample_ratio", value)

    @property
    def eval_sample_ratio(self) -> Optional[float]:
        """Fraction used when not training; None falls back to ``sample_ratio``."""
        return self._eval_sample_ratio

    @eval_sample_ratio.setter
    def eval_sample_ratio(self, value: Optional[float]) -> None:
        self._eval_sample_ratio = None if value is None else _check_ratio("eval_sample_ratio", value)

    @property
    def active_sample_ratio(self) -> float:
        """The ratio the next forward uses (depends on train/eval mode)."""
        if self.training or self.eval_sample_ratio is None:
            return self.sample_ratio
        return self.eval_sample_ratio

    @property
    def size_divisibility(self) -> int:
        """Padded inputs must be multiples of 32 (c5 is stride 32)."""
        return SIZE_DIVISIBILITY

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of each output, from the constructor's arguments."""
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}

    @staticmethod
    def _unpack(images: Union[ImageList, torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """The padded tensor and the true (h, w) of each image, after checking the input."""
        if isinstance(images, ImageList):
            tensor, image_sizes = images.tensor, [tuple(s) for s in images.image_sizes]
        elif isinstance(images, torch.Tensor):
            tensor = images
            image_sizes = [tuple(tensor.shape[-2:])] * tensor.shape[0] if tensor.dim() == 4 else []
        else:
            raise TypeError(f"MIMDetBackbone takes an ImageList or a (B, 3, H, W) tensor, got {type(images).__name__}")
        if tensor.dim() != 4 or tensor.shape[1] != 3:
            raise ValueError(
                f"MIMDetBackbone needs (B, 3, H, W) RGB images, got a tensor of shape {tuple(tensor.shape)}")
        height, width = tensor.shape[-2:]
        if height % SIZE_DIVISIBILITY or width % SIZE_DIVISIBILITY or min(height, width) < SIZE_DIVISIBILITY:
            raise ValueError(f"MIMDetBackbone needs a padded size that is a positive multiple of {SIZE_DIVISIBILITY} "
                             f"(at least {SIZE_DIVISIBILITY}) in each dimension, got {height}x{width}")
        return tensor, image_sizes

    def forward(self, images: Union[ImageList, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Padded batch (an ImageList, or a tensor whose pixels are all real) -> {name: map}."""
        tensor, image_sizes = self._unpack(images)
        encoded = self.encoder(tensor, image_sizes, self.active_sample_ratio)
        c2, c3, stem_c4 = encoded.stem_maps
        c4 = self.decoder(encoded.latent, stem_c4, encoded.ids_shuffle, encoded.ids_restore)
        features = {"c2": c2, "c3": c3, "c4": c4, "c5": F.max_pool2d(c4, kernel_size=2, stride=2)}
        return {name: features[name] for name in self._out_features}
