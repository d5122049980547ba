"""A Vision Transformer encoder: timm's VisionTransformer (class token, learned position embeddings, pre-norm
blocks) without a head, so its state dict's keys are RETFound's (a ViT-L/16 MAE) and timm's.

The first seed calls a lightweight CNN with SparK "an efficient alternative to ViTs" with limited data; this
is the ViT that claim is measured against. Position embeddings are stored for a 224-px grid and resampled to
the input's grid (`dynamic_img_size`), so one checkpoint serves every profile's image size. Like the CNN
encoders it offers `feature_channels` and `forward_features(x)` (the patch tokens as one (B, D, H/16, W/16)
map, after the final norm), so `TaskModel` pools and heads it as any encoder; MAE pretraining encodes only
the visible patches (`tokens(x, keep)`)."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

# (embed dim, depth, heads) of the standard sizes; RETFound is vit_large with patch 16
VIT_SIZES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
PATCH = 16
BASE_SIZE = 224  # the grid the position embeddings are stored for (RETFound's)


class ViTEncoder(VisionTransformer):
    def __init__(self, arch: str) -> None:
        dim, depth, heads = VIT_SIZES[arch]
        super().__init__(
            img_size=BASE_SIZE,
            patch_size=PATCH,
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            num_classes=0,
            global_pool="",
            dynamic_img_size=True,
        )
        self.downsample_ratio = PATCH

    @property
    def feature_channels(self) -> list[int]:
        return [self.embed_dim]

    def tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + N, D) after the final norm: the class token and the patch tokens, only those at the indices
        `keep` (B, K) of the row-major patch grid when given (MAE's visible patches)."""
        x = self._pos_embed(self.patch_embed(x))
        if keep is not None:
            prefix = x[:, : self.num_prefix_tokens]
            patches = torch.gather(
                x[:, self.num_prefix_tokens :], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            )
            x = torch.cat([prefix, patches], dim=1)
        return self.norm(self.blocks(self.norm_pre(x)))

    def forward_features(self, x: torch.Tensor, mask: object = None) -> list[torch.Tensor]:  # type: ignore[override]
        """The patch tokens as a (B, D, H/16, W/16) map, in a list as the CNN encoders' scales."""
        if mask is not None:
            raise ValueError("a ViT has no sparse (SparK) path: pretrain it with pretrain.method: mae")
        b, _, h, w = x.shape
        patches = self.tokens(x)[:, self.num_prefix_tokens :]
        return [patches.transpose(1, 2).reshape(b, self.embed_dim, h // PATCH, w // PATCH)]
