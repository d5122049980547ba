"""SparK: BERT-style masked image modelling for a CNN (Tian et al., ICLR 2023), on any encoder that offers
`downsample_ratio`, `feature_channels` and `forward_features(x, mask)`.

forward, in SparK's steps:
  1. mask: per sample, round(f^2 (1 - r)) of the f x f patches stay visible (f = H / 32);
  2. encode the masked input sparsely: features at 5 scales, exactly 0 at masked positions;
  3. densify each scale (smallest first): norm over visible positions, fill masked positions with a learned
     per-scale mask token, project to the decoder's width;
  4. decode with the light UNet decoder;
  5. loss on MASKED patches only, against per-patch normalised targets (unbiased variance, eps inside the
     square root), patch vectors ordered (row, col, channel).

Documented deviation from SparK (docs/spark.md): with a field-of-view mask, each masked patch is normalised
and scored over its in-disc pixels only, and patches mostly outside the disc are left out. At 128 px 12 of the
16 patches straddle the rim, whose black-to-retina step would explain most of their normalised target
(measured: 81% median), a task solved without looking at the retina; and the black border alone would blow
JPEG noise up to unit variance, an irreducible floor. Pass `fov=None` to get SparK's loss exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.spark.decoder import LightDecoder
from shared.spark.mask import random_mask
from shared.spark.sparse import MaskedGroupNorm, SparseMask, sparse

EPS = 1e-6
MIN_DISC = 0.25  # with a FOV mask, a patch counts when at least this fraction of it lies in the disc


class SparK(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        decoder_width: int = 768,
        mask_ratio: float = 0.6,
        *,
        norm: str = "bn",
        loss_reduction: str = "batch",
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.loss_reduction = loss_reduction
        self.downsample_ratio = encoder.downsample_ratio
        enc_ch = encoder.feature_channels[::-1]  # smallest map first
        dec_ch = [max(decoder_width // 2**i, 1) for i in range(len(enc_ch))]
        self.densify_norms = nn.ModuleList(
            nn.BatchNorm2d(e) if norm == "bn" else MaskedGroupNorm(e) for e in enc_ch
        )
        self.densify_projs = nn.ModuleList(
            nn.Identity()
            if i == 0 and e == d
            else nn.Conv2d(e, d, 1 if i == 0 else 3, padding=0 if i == 0 else 1)
            for i, (e, d) in enumerate(zip(enc_ch, dec_ch, strict=True))
        )
        # Mask token i is the weight (e_i, 1, 1, 1) of a 1x1 depthwise conv applied to the hidden-position
        # indicator: token * (1 - M). Same function as SparK's bare Parameter, but held by a standard
        # single-input module, so Opacus computes its per-sample gradients.
        self.mask_tokens = nn.ModuleList(nn.Conv2d(e, e, 1, groups=e, bias=False) for e in enc_ch)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token.weight, std=0.02, a=-0.02, b=0.02)
        self.decoder = LightDecoder(decoder_width, blocks=len(enc_ch), norm=norm)

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        fov: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, reconstruction, mask) for normalised `images` (B, 3, H, W).

        `mask` (B, 1, f, f) bool, True = visible, is drawn from `generator` when None. `fov` (B, 1, H, W) bool
        restricts the loss to the retina. The reconstruction shows visible pixels
        from the input and masked ones from the prediction (for pictures, not metrics).
        `fov` also makes the loss an in-disc one (see `masked_patch_loss`).
        """
        active_b1ff = self.draw_mask(images, generator) if mask is None else mask.to(images.device)
        m = SparseMask(active_b1ff)
        feats = self.encoder.forward_features(images * m.like(images), m)[::-1]
        to_dec = []
        for feat, norm, token, proj in zip(
            feats, self.densify_norms, self.mask_tokens, self.densify_projs, strict=True
        ):
            hidden = (1 - m.like(feat)).expand(-1, feat.shape[1], -1, -1)
            to_dec.append(proj(sparse(norm, feat, m) + token(hidden)))  # the sparse norm is 0 where hidden
        rec_bchw = self.decoder(to_dec)
        loss = masked_patch_loss(images, rec_bchw, active_b1ff, fov=fov, reduction=self.loss_reduction)
        with torch.no_grad():
            shown = reconstruction(images, rec_bchw.detach().to(images.dtype), active_b1ff)
        return loss, shown, active_b1ff

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """The sparse encoder features (largest map first) of `images` under `mask`."""
        m = SparseMask(mask.to(images.device))
        return self.encoder.forward_features(images * m.like(images), m)

    def draw_mask(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = images.shape
        if h != w or h % self.downsample_ratio:
            raise ValueError(
                f"SparK needs square inputs whose side is a multiple of {self.downsample_ratio}, got {h}x{w}"
            )
        return random_mask(b, h // self.downsample_ratio, self.mask_ratio, generator).to(images.device)


def patchify(x_bchw: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major, each vector ordered (row, col, channel)."""
    b, c, h, w = x_bchw.shape
    x = x_bchw.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x_bln: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    b, n, _ = x_bln.shape
    f = round(n**0.5)
    x = x_bln.reshape(b, f, f, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, f * p, f * p)


def masked_patch_loss(
    images: torch.Tensor,
    rec_bchw: torch.Tensor,
    active_b1ff: torch.Tensor,
    *,
    fov: torch.Tensor | None = None,
    reduction: str = "batch",
) -> torch.Tensor:
    """MSE between the prediction and per-patch normalised targets, over masked patches only.

    `fov=None`: SparK's loss exactly (every pixel of a patch counts). With a field-of-view mask (B, 1, H, W)
    each patch is normalised and scored over its in-disc pixels only, and patches less than `MIN_DISC`
    inside the disc are left out: the rim's black-to-retina step would otherwise dominate the target.
    "batch": SparK's mean over all counted patches of the batch. "sample": each sample's mean over its own
    counted patches, then the mean over samples (per-sample decomposable, as DP-SGD requires).
    """
    p = images.shape[-1] // active_b1ff.shape[-1]
    target = patchify(images, p)
    pred = patchify(rec_bchw, p).to(target.dtype)
    weight = (~active_b1ff).flatten(1).to(target.dtype)  # (B, L)
    if fov is None:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as SparK
        per_patch = (pred - (target - mean) / (var + EPS) ** 0.5).pow(2).mean(dim=-1)  # (B, L)
    else:
        inside = patchify(fov.to(target.dtype).expand_as(images), p)  # (B, L, p*p*C), 1 in the disc
        n = inside.sum(dim=-1, keepdim=True)
        mean = (inside * target).sum(dim=-1, keepdim=True) / n.clamp(min=1)
        var = (inside * (target - mean).pow(2)).sum(dim=-1, keepdim=True) / (n - 1).clamp(min=1)
        error = inside * (pred - (target - mean) / (var + EPS) ** 0.5).pow(2)
        per_patch = (error.sum(dim=-1) / n.squeeze(-1).clamp(min=1)).nan_to_num()
        weight = weight * (n.squeeze(-1) >= MIN_DISC * target.shape[-1]).to(weight.dtype)
    if reduction == "sample":
        return ((per_patch * weight).sum(1) / (weight.sum(1) + 1e-8)).mean()
    return (per_patch * weight).sum() / (weight.sum() + 1e-8)


def reconstruction(images: torch.Tensor, rec_bchw: torch.Tensor, active_b1ff: torch.Tensor) -> torch.Tensor:
    """Visible pixels from the input, masked patches from the prediction de-normalised with each patch's true
    mean and standard deviation (as SparK's visualisation does)."""
    p = images.shape[-1] // active_b1ff.shape[-1]
    target = patchify(images, p)
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + EPS) ** 0.5
    rec = unpatchify(patchify(rec_bchw, p) * std + mean, p, images.shape[1])
    visible = active_b1ff.repeat_interleave(p, 2).repeat_interleave(p, 3)
    return torch.where(visible, images, rec)
