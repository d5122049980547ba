"""MAE (He et al., CVPR 2022) for the ViT baseline of the first seed's study (RETFound is a ViT-L MAE).

Per image, `mask_ratio` of the 16-px patches are hidden at random; the encoder sees only the visible ones; a
light transformer decoder puts a shared mask token at every hidden place, adds position embeddings and
predicts every patch's pixels. The loss is the mean squared error over the hidden patches only, each target
normalised by its own patch's mean and variance (MAE's `norm_pix_loss`), so it is the structure of a patch
that is predicted, not its brightness. The decoder's position embeddings are learned (MAE fixes them to
sine-cosine; at our grid sizes either works)."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from shared.config import ExperimentConfig
from shared.models import build_encoder
from shared.models.vit import PATCH, ViTEncoder

NORM_EPS = 1e-6  # MAE's: inside the per-patch variance's square root


def patchify(images: torch.Tensor, p: int = PATCH) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p * p * C): the row-major grid of p x p patches, each flattened (row, column,
    channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def random_keep(
    batch: int, patches: int, ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the indices of the patches kept visible (B, K), K = patches x (1 - ratio) rounded down,
    and the mask (B, N): 1 where a patch is hidden."""
    keep = int(patches * (1 - ratio))
    order = torch.rand(batch, patches, generator=generator).argsort(dim=1)
    kept = order[:, :keep]
    mask = torch.ones(batch, patches)
    mask.scatter_(1, kept, 0.0)
    return kept, mask


def mae_loss(
    pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """Mean over hidden patches of each patch's mean squared error, the target per-patch normalised."""
    target = patchify(images)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_EPS) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAE(nn.Module):
    def __init__(
        self, encoder: ViTEncoder, image_size: int, mask_ratio: float, decoder_width: int, decoder_depth: int
    ) -> None:
        super().__init__()
        if not isinstance(encoder, ViTEncoder):
            raise TypeError("MAE pretrains a ViT encoder (model.arch: vit_*)")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.patches = (image_size // PATCH) ** 2
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.decoder_pos = nn.Parameter(torch.zeros(1, 1 + self.patches, decoder_width))
        # heads of 32 channels or more, as many as divide the width (MAE's decoder: 512 wide, 16 heads)
        heads = max((h for h in range(1, decoder_width // 32 + 1) if decoder_width % h == 0), default=1)
        self.decoder = nn.Sequential(*(Block(decoder_width, heads) for _ in range(decoder_depth)))
        self.decoder_norm = nn.LayerNorm(decoder_width)
        self.decoder_pred = nn.Linear(decoder_width, PATCH * PATCH * 3)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator, fov: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, predicted patches (B, N, p * p * 3), mask (B, N), 1 = hidden). SparK's call shape, so
        `spark_method` trains it too; `fov` is unused (MAE scores every hidden patch, as MAE does)."""
        b = images.shape[0]
        if (images.shape[-2] // PATCH) * (images.shape[-1] // PATCH) != self.patches:
            raise ValueError(f"MAE was built for {self.patches} patches; got images of {tuple(images.shape)}")
        kept, mask = random_keep(b, self.patches, self.mask_ratio, generator)
        kept, mask = kept.to(images.device), mask.to(images.device)
        visible = self.decoder_embed(self.encoder.tokens(images, kept))
        prefix = self.encoder.num_prefix_tokens
        grid = self.mask_token.expand(b, self.patches, -1).clone()
        grid = grid.scatter(1, kept.unsqueeze(-1).expand(-1, -1, grid.shape[-1]), visible[:, prefix:])
        x = torch.cat([visible[:, :prefix], grid], dim=1) + self.decoder_pos
        pred = self.decoder_pred(self.decoder_norm(self.decoder(x)))[:, prefix:]
        return mae_loss(pred.float(), images.float(), mask), pred, mask


def build_mae(cfg: ExperimentConfig, encoder: nn.Module | None = None) -> MAE:
    p = cfg.pretrain
    return MAE(
        encoder if encoder is not None else build_encoder(cfg.model),  # type: ignore[arg-type]
        cfg.data.image_size,
        p.mask_ratio,
        p.decoder_width,
        p.decoder_depth,
    )
