"""MAE pre-training (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

A ViT sees a random 25% of the 16x16 patches of each image; an 8-block, 512-wide decoder
predicts the pixels of the others from the encoded patches and a shared mask token; the loss
is the mean squared error on the masked patches only, of per-patch normalised pixels by
default. Pre-training keeps MAE's 16x16 patchify embedding (MIMDet replaces it with its conv
stem when fine-tuning). The encoder blocks are built as MIMDet's encoder builds its own (timm
``Block``, ``init_vit_weights``), and the state-dict names and shapes are those of MAE's
released full pre-training checkpoints (``mae_pretrain_vit_base_full.pth``), so what this model
writes is read by ``mae_checkpoint.path`` as it is.
"""
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, PatchEmbed

from .attention import run_block, wants_fused_attention
from .encoder import init_vit_weights
from .pos_embed import sincos_table_mae

__all__ = ["MaskedAutoencoderViT", "MAEPretrainer", "check_mask_ratio"]


def check_mask_ratio(mask_ratio: float, num_patches: int) -> float:
    """``mask_ratio`` as a float, if it is in (0, 1) and leaves the encoder at least one of the
    ``num_patches`` patches; a ValueError naming it otherwise."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be a number in (0, 1), got {mask_ratio!r}")
    if int(num_patches * (1 - mask_ratio)) < 1:
        raise ValueError(f"mask_ratio {mask_ratio} hides every one of the {num_patches} patches (it keeps "
                         f"int({num_patches} x (1 - {mask_ratio})) = 0); the encoder needs at least one")
    return float(mask_ratio)


class MaskedAutoencoderViT(nn.Module):
    """MAE's pre-training model (MAE's ``models_mae.py`` layout and names).

    Args:
        img_size, patch_size, in_chans: square input side, patch side, image channels.
        embed_dim, depth, num_heads: encoder ViT (768/12/12 ViT-B, 1024/24/16 ViT-L).
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder (512/8/16 in MAE).
        mlp_ratio, norm_eps: MLP ratio and LayerNorm epsilon of all blocks.
        mask_ratio: fraction of patches hidden from the encoder, in (0, 1).
        norm_pix_loss: normalise each target patch by its own mean and variance (MAE's default).
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True) -> None:
        super().__init__()
        self.mask_ratio = check_mask_ratio(mask_ratio, (img_size // patch_size) ** 2)
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed 2-D sin-cos tables with a (zero) cls slot first, stored as MAE stores them.
        self.pos_embed = nn.Parameter(sincos_table_mae(embed_dim, grid, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth))
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_table_mae(decoder_embed_dim, grid, grid)[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth))
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)

        # MAE's initialisation: the patch projection as a Linear (xavier on its flattened
        # weight), cls and mask tokens N(0, 0.02), Linear xavier / LayerNorm ones-zeros.
        self.apply(init_vit_weights)
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels (row, col, channel)."""
        batch, channels, height, width = images.shape
        p = self.patch_size
        x = images.reshape(batch, channels, height // p, p, width // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, (height // p) * (width // p), p * p * channels)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W) for square images, the inverse of :meth:`patchify`."""
        batch, length, values = patches.shape
        p, side = self.patch_size, int(length ** 0.5)
        x = patches.reshape(batch, side, side, p, p, values // (p * p))
        return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, -1, side * p, side * p)

    def random_masking(self, tokens: torch.Tensor, noise: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep ``int(L * (1 - mask_ratio))`` random tokens per image: those of the smallest ``noise``
        (B, L), uniform noise drawn here if not given.

        Returns the kept tokens (B, len_keep, D), the mask (B, L; 1 = hidden) and the
        permutation that puts draw-ordered tokens back in image order (B, L).
        """
        batch, length, width = tokens.shape
        len_keep = int(length * (1 - self.mask_ratio))
        if noise is None:
            noise = torch.rand(batch, length, device=tokens.device)
        elif noise.shape != (batch, length):
            raise ValueError(f"mask noise of shape {tuple(noise.shape)} for {batch} images of {length} patches")
        ids_shuffle = torch.argsort(noise.to(tokens.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(tokens, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, width))
        mask = torch.ones(batch, length, device=tokens.device)
        mask[:, :len_keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches: (latent (B, 1 + len_keep, D) with the cls token, mask, ids_restore)."""
        tokens = self.patch_embed(images) + self.pos_embed[:, 1:]
        tokens, mask, ids_restore = self.random_masking(tokens, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        fused = wants_fused_attention(x)
        for block in self.blocks:
            x = run_block(block, x, fused)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch's pixels (B, L, p*p*C) from the latent and mask tokens."""
        x = self.decoder_embed(latent)
        batch, length = ids_restore.shape
        fill = self.mask_token.expand(batch, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], fill], dim=1)  # draw order
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # image order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        fused = wants_fused_attention(x)
        for block in self.decoder_blocks:
            x = run_block(block, x, fused)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the hidden patches only (per-patch normalised targets if asked)."""
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """(B, C, H, W) normalised images -> ``{"loss_mae", "pred" (B, L, p*p*C), "mask" (B, L)}``.
        ``noise`` (B, L) chooses the hidden patches (see :meth:`random_masking`)."""
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return {"loss_mae": self.forward_loss(images, pred, mask), "pred": pred, "mask": mask}


class MAEPretrainer(MaskedAutoencoderViT):
    """:class:`MaskedAutoencoderViT` as the launcher trains it: it takes detectron2's batched
    inputs and returns ``{"loss_mae"}`` in training.

    Each input holds ``"image"``, a (3, H, W) RGB tensor in 0-255 (``models.data.pretrain``'s
    mapper), normalised here by ImageNet's mean and std as MAE does, and optionally
    ``"mask_noise"`` (L,), which chooses the image's hidden patches. With the noise drawn by the
    mapper, each image's mask follows from its place in the data stream alone, so a run split
    over several processes, or resumed, hides the same patches as a single uninterrupted one.
    The mean and std are not saved: the state dict is exactly MAE's.

    In eval mode it returns ``{"loss_mae", "pred", "mask"}`` (:meth:`MaskedAutoencoderViT.forward`).
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 pixel_mean: Tuple[float, float, float] = (123.675, 116.28, 103.53),
                 pixel_std: Tuple[float, float, float] = (58.395, 57.12, 57.375)) -> None:
        # The arguments are spelled out (not **kwargs) so that a misspelt config key is refused
        # when the config is loaded, not inside a worker process.
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim,
                         decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
                         norm_eps=norm_eps, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, batched_inputs: List[dict]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Normalised images (B, 3, H, W) and the mask noise (B, L) if every input carries one."""
        images = torch.stack([x["image"].to(self.device, non_blocking=True) for x in batched_inputs]).float()
        images = (images - self.pixel_mean) / self.pixel_std
        noise = None
        if all("mask_noise" in x for x in batched_inputs):
            noise = torch.stack([x["mask_noise"] for x in batched_inputs]).to(self.device)
        return images, noise

    def forward(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        images, noise = self.preprocess(batched_inputs)
        outputs = super().forward(images, noise)
        return {"loss_mae": outputs["loss_mae"]} if self.training else outputs
