"""The trainable part of TextDiff: per-scale report cross-attention, multi-scale fusion, a small conv classifier."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ReportCrossAttention(nn.Module):
    """Image tokens attend to report tokens (pre-norm), then a feed-forward; both residual."""

    def __init__(self, dim: int, text_dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        has_text = mask.any(dim=1)
        # A sample without a report gets one dummy key (avoids NaN from an all-masked softmax) and its update is
        # zeroed, so it takes exactly the no-text path (the block is skipped).
        key_padding = ~mask
        key_padding[~has_text, 0] = False
        attended, _ = self.attn(self.norm_q(tokens), text, text, key_padding_mask=key_padding, need_weights=False)
        fused = tokens + attended
        fused = fused + self.ff(self.norm_ff(fused))
        gate = has_text[:, None, None].to(fused.dtype)
        tokens = gate * fused + (1 - gate) * tokens
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class FusionHead(nn.Module):
    """features (one map per hooked block) [+ report tokens] -> logits (B, classes, H/stride0, W/stride0).

    The logits come out at the finest feature resolution; callers upsample them to the window size.
    """

    def __init__(self, in_channels: list[int], text_dim: int, num_classes: int = 2, dim: int = 64, heads: int = 4,
                 use_text: bool = True):
        super().__init__()
        self.use_text = use_text
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1), _norm(dim), nn.GELU()) for c in in_channels)
        self.fuse_text = nn.ModuleList(ReportCrossAttention(dim, text_dim, heads) for _ in in_channels)
        self.classifier = nn.Sequential(
            nn.Conv2d(dim * len(in_channels), dim, 1), _norm(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1), _norm(dim), nn.GELU(),
            nn.Conv2d(dim, num_classes, 1))

    def forward(self, features: list[torch.Tensor], text: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        size = max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
        maps = []
        for feature, project, fuse in zip(features, self.project, self.fuse_text):
            x = project(feature.to(project[0].weight.dtype))
            if self.use_text and text is not None:
                if mask is None:
                    mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
                x = fuse(x, text.to(x.dtype), mask)
            maps.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False) if x.shape[-2:] != size else x)
        return self.classifier(torch.cat(maps, dim=1))
