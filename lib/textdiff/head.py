"""The trainable part of TextDiff: per-scale report cross-attention, multi-scale fusion, a small conv classifier."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

from .accel import kernels


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """GroupNorm of a channels-last map with a backward written as a few vectorised passes over the pixel-major
    memory: PyTorch's own channels-last CPU backward is slow at every group width (bf16, per training step:
    [4, 64, 128, 128] 8.1 ms against 4.5; with 2 channels per group, [4, 16, 256, 256], ~30 ms). The forward and its
    statistics are PyTorch's. Same values and gradients up to rounding (sums accumulate in fp32)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        n, c = x.shape[:2]
        out, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        pixels = h * w
        tokens = x.permute(0, 2, 3, 1).reshape(n, pixels, c)  # views of the channels-last memory
        grad = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n, pixels, c)
        sum_dy_x = (grad * tokens).sum(1, dtype=torch.float32)  # (N, C)
        sum_dy = grad.sum(1, dtype=torch.float32)
        a, b, k, dweight, dbias = kernels.group_norm_backward_terms(sum_dy_x, sum_dy, weight, mean, rstd, pixels)
        dx = torch.addcmul(k[:, None].to(x.dtype), tokens, b[:, None].to(x.dtype))  # dx = a * dy + b * x + k
        dx.addcmul_(grad, a[:, None].to(x.dtype))
        return dx.view(n, h, w, c).permute(0, 3, 1, 2), dweight, dbias, None, None


def _group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """F.group_norm; on CPU, training on a channels-last map, with the backward above."""
    if x.device.type != "cpu" or not torch.is_grad_enabled() or x.is_contiguous() or weight is None:
        return F.group_norm(x, groups, weight, bias, eps)
    with torch.autocast("cpu", enabled=False):  # CPU autocast leaves group_norm's types alone as well
        return _ChannelsLastGroupNorm.apply(x, weight, bias, groups, eps)


class _GroupNormGELU(nn.GroupNorm):
    """GroupNorm then GELU, one module so that CPU training runs the pair as one kernel (accel/kernels.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.applies(x, self.weight):
            return kernels.group_norm_gelu(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.gelu(_group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


def _norm_gelu(channels: int) -> nn.Module:
    return _GroupNormGELU(min(8, channels), channels)


class ReportCrossAttention(nn.Module):
    """Image tokens attend to report tokens (pre-norm), then a feed-forward; both residual.

    Written with two matmuls rather than SDPA: with ~10-60 report tokens against up to 65k image tokens the
    fused CPU kernels are several times slower than a plain (N x L) softmax.
    """

    def __init__(self, dim: int, text_dim: int, heads: int, position: bool = False):
        super().__init__()
        self.heads = heads
        # where each image token lies in the whole image: reports speak of places ("upper right", "lower left
        # lung"), which a window or a flipped/rotated training sample cannot tell by itself
        self.position = nn.Linear(2 * len(_FREQUENCIES) * 2 + 2, dim) if position else None
        self.norm_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(text_dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                grid: torch.Tensor | None = None) -> torch.Tensor:
        """``grid`` (B, 2, h, w): each token's (y, x) in the whole image, 0..1 (needed when built with position).
        A sample without a report (an all-False ``mask`` row) skips the block: its map passes unchanged."""
        has_text = mask.any(dim=1)
        if bool(has_text.all()):
            return self._attend(x, text, mask, grid)
        # Training drops half the reports (text dropout): attending for those samples only to discard the result
        # was about half of this block's time. The subset may be empty; the block then runs on no samples, which
        # keeps its parameters in the graph (DistributedDataParallel expects every one to get a gradient).
        index = has_text.nonzero().squeeze(1)
        part = self._attend(x[index], text[index], mask[index], None if grid is None else grid[index])
        return x.clone().index_copy_(0, index, part.to(x.dtype))  # out-of-place index_copy drops channels-last

    def _attend(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, grid: torch.Tensor | None):
        b, c, h, w = x.shape
        heads, d = self.heads, c // self.heads
        pixels, length = h * w, text.shape[1]  # explicit sizes: b may be 0
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        queries = self.norm_q(tokens)
        if self.position is not None:  # position steers what a token asks of the report, nothing else
            queries = queries + self.position(_fourier(grid.flatten(2).transpose(1, 2)).to(queries.dtype))
        q = self.to_q(queries).reshape(b, pixels, heads, d).transpose(1, 2)  # (B, h, N, d)
        k, v = self.to_kv(text).reshape(b, length, 2, heads, d).permute(2, 0, 3, 1, 4)  # (B, h, L, d) each
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        scores = (q @ k.transpose(-1, -2)) * d ** -0.5 + bias[:, None, None, :]
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, pixels, c)
        fused = tokens + self.to_out(attended)
        fused = fused + self.ff(self.norm_ff(fused))
        return fused.transpose(1, 2).reshape(b, c, h, w)


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

    ``subpixel``: no map at full resolution; the last stage works on 2x2 pixel blocks (see ``__init__``).
    """

    def __init__(self, in_channels: list[int], text_dim: int, num_classes: int = 2, dim: int = 64, heads: int = 4,
                 use_text: bool = True, strides: list[int] | None = None, text_min_stride: int = 4,
                 fuse_dim: int = 32, fine_dim: int = 16, upsample: list[bool] | None = None,
                 position: bool = False, subpixel: bool = False, image_path: list[int] | None = None):
        super().__init__()
        self.use_text = use_text
        self.upsample = list(upsample) if upsample else [False] * len(in_channels)
        strides = list(strides) if strides is not None else [2] * len(in_channels)
        strides = [s // 2 if up else s for s, up in zip(strides, self.upsample)]  # where each scale joins
        # subpixel: nothing runs at full resolution. A full-resolution input is folded into 2x2 pixel blocks
        # (space-to-depth), an upsampler's input joins at its own resolution, and the classifier predicts each
        # block's 4 pixels. On CPU the 16-channel full-resolution maps are memory-bound, about half of a training
        # step (~1.2x faster head epochs; MoNuSeg Val -0.01 Dice, so it is an option: README).
        self.subpixel = subpixel and 1 in strides and max(strides) > 1
        self.fold = [self.subpixel and s == 1 and not up for s, up in zip(strides, self.upsample)]
        if self.subpixel:
            in_channels = [4 * c if f else c for c, f in zip(in_channels, self.fold)]
            self.upsample = [up and s > 1 for up, s in zip(self.upsample, strides)]
            strides = [max(s, 2) for s in strides]
        self.fine = [s == 1 for s in strides]
        if all(self.fine):  # nothing coarse: treat every scale as coarse
            self.fine = [False] * len(strides)
        dims = [fine_dim if f else dim for f in self.fine]
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, 4 * d, 1), nn.PixelShuffle(2), _norm_gelu(d)) if up else
            nn.Sequential(nn.Conv2d(c, d, 1), _norm_gelu(d))
            for c, d, up in zip(in_channels, dims, self.upsample))
        self.fuse_text = nn.ModuleList(
            ReportCrossAttention(d, text_dim, max(1, min(heads, d // 16)), position) if s >= text_min_stride
            else nn.Identity()
            for d, s in zip(dims, strides))
        self.attends = [s >= text_min_stride for s in strides]
        # one linear map per scale into the fused width (a 1x1 conv of the concatenation, split per scale)
        self.to_fused = nn.ModuleList(
            nn.Conv2d(d, fine_dim if f else fuse_dim, 1, bias=False) for d, f in zip(dims, self.fine))
        self.coarse = nn.Sequential(_norm_gelu(fuse_dim),
                                    nn.Conv2d(fuse_dim, fuse_dim, 3, padding=1), _norm_gelu(fuse_dim))
        if any(self.fine):
            self.coarse_to_fine = nn.Conv2d(fuse_dim, fine_dim, 1)
            self.refine = nn.Sequential(_norm_gelu(fine_dim),
                                        nn.Conv2d(fine_dim, fine_dim, 3, padding=1), _norm_gelu(fine_dim))
            out_dim = fine_dim
        else:
            self.coarse_to_fine = self.refine = None
            out_dim = fuse_dim
        # image_path: a small trainable U-Net on the clean image (the last input, full resolution), joined to the
        # fine stage. The frozen features carry the head with few labels; with many, this path lets the model learn
        # what a U-Net trained on the same labels would, which the frozen features alone cap
        self.image_path = None
        if image_path:
            if not any(self.fine) or not self.fine[-1] or self.subpixel:
                raise ValueError("image_path needs the clean image as the head's last, full-resolution input "
                                 "(include_image) and no subpixel head")
            self.image_path = UNet(2, in_channels[-1], fine_dim, channels=list(image_path),
                                   strides=[2] * (len(image_path) - 1), num_res_units=2)
        # the folded image's projection also reaches the classifier directly: where in its 2x2 block an edge
        # lies is pixel detail that the fused 3x3 stage, shared by every scale, blurs
        skip = sum(d for d, f in zip(dims, self.fold) if f)
        self.classifier = (nn.Sequential(nn.Conv2d(out_dim + skip, 4 * num_classes, 1), nn.PixelShuffle(2))
                           if self.subpixel else nn.Conv2d(out_dim, num_classes, 1))

    def forward(self, features: list[torch.Tensor], text: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, dihedral: tuple[int, bool] | None = None,
                box: torch.Tensor | None = None, variants: list[tuple[int, bool]] | None = None) -> torch.Tensor:
        """``dihedral`` = (quarter turns, horizontal flip) rotates/flips the features for training augmentation.
        It is applied right after each scale's 1x1 conv, which commutes with it (as do GroupNorm and GELU, and a
        pixel shuffle applied after the turn): the same result as transforming the input, on 64 channels instead of
        up to 576. ``box`` (B, 4): where the window lies in the whole image, (top, left, bottom, right) as fractions
        of its height/width; None = the window is the whole image. The position grid turns with the features, so a
        flipped sample's "upper right" still points where the report meant. ``variants``: per sample, the
        (turns, flip) its image was transformed by before feature extraction; positions are mapped back through it."""
        coarse, fine, folded = [], [], []
        if self.image_path is not None:
            image = features[-1]
            if not torch.is_autocast_enabled(image.device.type):
                image = image.to(next(self.image_path.parameters()).dtype)
            fine.append(self.image_path(rotate_flip(image, *dihedral) if dihedral is not None else image))
        for i, feature in enumerate(features):
            if not torch.is_autocast_enabled(feature.device.type):  # under autocast the conv casts (once)
                feature = feature.to(self.project[i][0].weight.dtype)
            # turn the input rather than the 1x1 map's output when folding (turning the blocks would not turn
            # within them) or when it is the narrower of the two (the image: 3 channels, not 16)
            turn_input = dihedral is not None and (self.fold[i] or (
                not self.upsample[i] and feature.shape[1] < self.project[i][0].out_channels))
            if turn_input:
                feature = rotate_flip(feature, *dihedral)
            x = self.project[i][0](F.pixel_unshuffle(feature, 2) if self.fold[i] else feature)
            if dihedral is not None and not turn_input:
                x = rotate_flip(x, *dihedral)
            x = self.project[i][1:](x)
            if self.attends[i] and self.use_text and text is not None:
                if mask is None:
                    mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
                grid = None
                if self.fuse_text[i].position is not None:
                    grid = _position_grid(box, x.shape, dihedral, x.device, variants)
                x = self.fuse_text[i](x, text.to(x.dtype), mask, grid)
            if self.fold[i]:
                folded.append(x)
            (fine if self.fine[i] else coarse).append(self.to_fused[i](x))
        size = max((c.shape[-2:] for c in coarse), key=lambda s: s[0] * s[1])
        x = self.coarse(sum(_resize(c, size) for c in coarse))
        if self.refine is not None:
            size = fine[0].shape[-2:]
            x = self.refine(_resize(self.coarse_to_fine(x), size) + sum(_resize(f, size) for f in fine))
        if folded:
            x = torch.cat([x] + [_resize(f, x.shape[-2:]) for f in folded], dim=1)
        return self.classifier(x)


_FREQUENCIES = (1.0, 2.0)


def _fourier(coords: torch.Tensor) -> torch.Tensor:
    """(..., 2) positions in 0..1 -> smooth features that a linear map turns into "upper", "left", "middle"."""
    centred = coords.float() * 2 - 1
    waves = [f(torch.pi * k * centred) for k in _FREQUENCIES for f in (torch.sin, torch.cos)]
    return torch.cat([centred] + waves, dim=-1)


def _position_grid(box: torch.Tensor | None, shape, dihedral, device, variants=None) -> torch.Tensor:
    """(B, 2, h, w) pixel-centre positions in the whole (untransformed) image of a map of ``shape`` that was turned
    by ``dihedral``; ``box`` is in the frame of the image each sample's features were extracted from (``variants``)."""
    b, _, h, w = shape
    turns = dihedral[0] if dihedral is not None else 0
    h0, w0 = (w, h) if turns % 2 else (h, w)  # the map's shape before it was turned
    if box is None:
        box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(b, 4)
    box = box.to(device, torch.float32)
    ys = (torch.arange(h0, dtype=torch.float32, device=device) + 0.5) / h0
    xs = (torch.arange(w0, dtype=torch.float32, device=device) + 0.5) / w0
    y = box[:, 0, None] + ys[None] * (box[:, 2] - box[:, 0])[:, None]  # (B, h0)
    x = box[:, 1, None] + xs[None] * (box[:, 3] - box[:, 1])[:, None]  # (B, w0)
    grid = torch.stack([y[:, :, None].expand(b, h0, w0), x[:, None, :].expand(b, h0, w0)], dim=1)
    if variants is not None:
        grid = torch.stack([_undo_positions(g, *v) for g, v in zip(grid, variants)])
    return rotate_flip(grid, *dihedral) if dihedral is not None else grid


def _undo_positions(grid: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """Positions (2, ...) in an image transformed by ``rotate_flip(., turns, flip)`` -> positions in the original.
    A quarter turn (torch.rot90) moves the point (y, x) to (1 - x, y)."""
    y, x = grid[0], grid[1]
    if flip:
        x = 1 - x
    for _ in range(turns % 4):
        y, x = x, 1 - y
    return torch.stack([y, x])


# The dihedral variants of an image: (number of 90° turns, horizontal flip); the identity first.
VARIANTS = [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True), (3, False), (3, True)]


def rotate_flip(x: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """``torch.rot90(x, turns)`` then a horizontal flip, as one flip and a transpose: rot90 and flip one after the
    other copy the map up to 3 times, and a flip of the turned (transposed) channels-last map is ~15x slower."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    turns %= 4
    dims = {1: {-1}, 2: {-2, -1}, 3: {-2}}.get(turns, set())  # rot90 = these flips, then a transpose if odd
    if flip:  # the turned map's last axis is the original's -2 when the turn transposed it
        dims ^= {-2 if turns % 2 else -1}
    x = torch.flip(x, dims=sorted(dims)) if dims else x
    x = x.transpose(-2, -1) if turns % 2 else x
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def unrotate_flip(x: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """The inverse of ``rotate_flip(., turns, flip)``."""
    x = torch.flip(x, dims=(-1,)) if flip else x
    return torch.rot90(x, -turns, dims=(-2, -1)) if turns else x


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
