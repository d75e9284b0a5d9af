"""The trainable part of TextDiff: per-scale report cross-attention, multi-scale fusion, a small conv classifier."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ReportCrossAttention(nn.Module):
    """Image tokens attend to report tokens (pre-norm), then a feed-forward; both residual.

    Written with two matmuls rather than SDPA: with ~10-60 report tokens against up to 65k image tokens the
    fused CPU kernels are several times slower than a plain (N x L) softmax.
    """

    def __init__(self, dim: int, text_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(text_dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads, d = self.heads, c // self.heads
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        q = self.to_q(self.norm_q(tokens)).reshape(b, -1, heads, d).transpose(1, 2)  # (B, h, N, d)
        k, v = self.to_kv(text).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)  # (B, h, L, d) each
        has_text = mask.any(dim=1)
        # A sample without a report gets one dummy key (no NaN from an all-masked softmax) and its update is
        # zeroed, so it takes exactly the no-text path (the block is skipped).
        keep = mask.clone()
        keep[~has_text, 0] = True
        bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        scores = (q @ k.transpose(-1, -2)) * d ** -0.5 + bias[:, None, None, :]
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, -1, c)
        fused = tokens + self.to_out(attended)
        fused = fused + self.ff(self.norm_ff(fused))
        gate = has_text[:, None, None].to(fused.dtype)
        tokens = gate * fused + (1 - gate) * tokens
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class FusionHead(nn.Module):
    """features (one map per hooked block) [+ report tokens] -> logits at the finest feature resolution.

    Every scale is projected (1x1). Scales with stride >= ``text_min_stride`` attend to the report (cross-attention +
    feed-forward); the paper attends at every scale, but at stride 1-2 that is 16k-65k image tokens per window for
    the coarse, positional information a report carries, so by default only the coarse scales do (1 = paper).
    Coarse scales (stride > 1) are summed at the finest coarse resolution and refined by a 3x3 conv; a full-resolution
    scale, when hooked, joins last through a narrow (``fine_dim``) 3x3 block. Every 1x1 map is applied *before*
    resizing (the two commute), so nothing wide is ever upsampled: the head trains ~4x faster on CPU than a
    concatenate-then-convolve head of the same shape. Callers upsample the logits to the window size.

    A scale flagged in ``upsample`` is a backbone upsampler's input (see ``DiffusionFeatures``): its projection is a
    learned 2x upsampling (a 1x1 conv to 4x the width + pixel shuffle: one linear map per output sub-pixel, as a
    stride-2 2x2 transposed conv, which oneDNN runs ~3x slower) and it joins at half its stride, as the upsampler's
    output would have.
    """

    def __init__(self, in_channels: list[int], text_dim: int, num_classes: int = 2, dim: int = 64, heads: int = 4,
                 use_text: bool = True, strides: list[int] | None = None, text_min_stride: int = 4,
                 fuse_dim: int = 32, fine_dim: int = 16, upsample: list[bool] | None = None):
        super().__init__()
        self.use_text = use_text
        self.upsample = list(upsample) if upsample else [False] * len(in_channels)
        strides = list(strides) if strides is not None else [2] * len(in_channels)
        strides = [s // 2 if up else s for s, up in zip(strides, self.upsample)]  # where each scale joins
        self.fine = [s == 1 for s in strides]
        if all(self.fine):  # nothing coarse: treat every scale as coarse
            self.fine = [False] * len(strides)
        dims = [fine_dim if f else dim for f in self.fine]
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, 4 * d, 1), nn.PixelShuffle(2), _norm(d), nn.GELU()) if up else
            nn.Sequential(nn.Conv2d(c, d, 1), _norm(d), nn.GELU())
            for c, d, up in zip(in_channels, dims, self.upsample))
        self.fuse_text = nn.ModuleList(
            ReportCrossAttention(d, text_dim, max(1, min(heads, d // 16))) if s >= text_min_stride else nn.Identity()
            for d, s in zip(dims, strides))
        self.attends = [s >= text_min_stride for s in strides]
        # one linear map per scale into the fused width (a 1x1 conv of the concatenation, split per scale)
        self.to_fused = nn.ModuleList(
            nn.Conv2d(d, fine_dim if f else fuse_dim, 1, bias=False) for d, f in zip(dims, self.fine))
        self.coarse = nn.Sequential(_norm(fuse_dim), nn.GELU(), nn.Conv2d(fuse_dim, fuse_dim, 3, padding=1),
                                    _norm(fuse_dim), nn.GELU())
        if any(self.fine):
            self.coarse_to_fine = nn.Conv2d(fuse_dim, fine_dim, 1)
            self.refine = nn.Sequential(_norm(fine_dim), nn.GELU(), nn.Conv2d(fine_dim, fine_dim, 3, padding=1),
                                        _norm(fine_dim), nn.GELU())
            out_dim = fine_dim
        else:
            self.coarse_to_fine = self.refine = None
            out_dim = fuse_dim
        self.classifier = nn.Conv2d(out_dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor], text: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, dihedral: tuple[int, bool] | None = None) -> torch.Tensor:
        """``dihedral`` = (quarter turns, horizontal flip) rotates/flips the features for training augmentation.
        It is applied right after each scale's 1x1 conv, which commutes with it (as do GroupNorm and GELU, and a
        pixel shuffle applied after the turn): the same result as transforming the input, on 64 channels instead of
        up to 576."""
        coarse, fine = [], []
        for i, feature in enumerate(features):
            if not torch.is_autocast_enabled(feature.device.type):  # under autocast the conv casts (once)
                feature = feature.to(self.project[i][0].weight.dtype)
            x = self.project[i][0](feature)
            if dihedral is not None:
                x = rotate_flip(x, *dihedral)
            x = self.project[i][1:](x)
            if self.attends[i] and self.use_text and text is not None:
                if mask is None:
                    mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
                x = self.fuse_text[i](x, text.to(x.dtype), mask)
            (fine if self.fine[i] else coarse).append(self.to_fused[i](x))
        size = max((c.shape[-2:] for c in coarse), key=lambda s: s[0] * s[1])
        x = self.coarse(sum(_resize(c, size) for c in coarse))
        if self.refine is not None:
            size = fine[0].shape[-2:]
            x = self.refine(_resize(self.coarse_to_fine(x), size) + sum(_resize(f, size) for f in fine))
        return self.classifier(x)


def rotate_flip(x: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, turns, dims=(-2, -1)) if turns else x
    return torch.flip(x, dims=(-1,)) if flip else x


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
