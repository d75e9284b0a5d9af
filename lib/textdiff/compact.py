"""Compact frozen features: a fixed linear projection of each hooked block's channels onto its principal directions.

The head's first operation on every block is a 1x1 map to ``head_dim`` channels, and the noise steps of one block
are strongly correlated, so most of a block's channels are redundant for it. Projecting each block (minus its mean)
onto its top-``k`` principal directions, fitted once on a few images' maps, shrinks what the feature cache and the
click memory hold by C/k. The projection is frozen and saved with the head (``compact.*`` tensors in its file).
"""
from __future__ import annotations

import hashlib

import torch

PIXELS_PER_MAP = 2_000  # pixel vectors sampled from each map for the fit (x 32 tiles: a stable covariance of <= 576
# channels, ~50 MB however large the images)


def sample_pixels(maps: list[torch.Tensor], blocks: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Up to ``PIXELS_PER_MAP`` random pixel vectors (N, C_b) of each of the first ``blocks`` maps (B, C_b, h, w)."""
    out = []
    for f in maps[:blocks]:
        pixels = f.detach().float().permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu()
        if pixels.shape[0] > PIXELS_PER_MAP:
            pixels = pixels[torch.randperm(pixels.shape[0], generator=generator)[:PIXELS_PER_MAP]]
        out.append(pixels)
    return out


class FeatureProjection(torch.nn.Module):
    """``forward(maps)``: each of the first ``len(channels)`` maps (B, C_b, h, w) -> (B, k_b, h, w); later maps
    (the clean image) pass unchanged. Unfitted, the bases are zero."""

    def __init__(self, channels: list[int], kept: list[int]):
        super().__init__()
        if len(channels) != len(kept) or any(not 1 <= k <= c for k, c in zip(kept, channels)):
            raise ValueError(f"compact channels {kept} must be one count per block, each 1..the block's channels "
                             f"{channels}")
        for b, (c, k) in enumerate(zip(channels, kept)):
            self.register_buffer(f"mean{b}", torch.zeros(c))
            self.register_buffer(f"basis{b}", torch.zeros(c, k))
        self.kept = list(kept)

    @property
    def fitted(self) -> bool:
        return any(bool(self.get_buffer(f"basis{b}").any()) for b in range(len(self.kept)))

    def digest(self) -> str:
        digest = hashlib.sha256()
        for _, tensor in sorted(self.state_dict().items()):
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    @torch.no_grad()
    def fit(self, pixels: list[torch.Tensor]) -> "FeatureProjection":
        """Principal directions of each block's pixel vectors (``pixels[b]``: (N, C_b), see ``sample_pixels``)."""
        for b, k in enumerate(self.kept):
            mean = pixels[b].double().mean(0)
            centred = pixels[b].double() - mean
            covariance = centred.T @ centred / max(1, centred.shape[0] - 1)
            _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
            basis = vectors[:, -k:].flip(1)
            # a deterministic sign per direction (eigh's is arbitrary): the largest loading positive
            signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
            self.get_buffer(f"mean{b}").copy_(mean.float())
            self.get_buffer(f"basis{b}").copy_((basis * signs).float())
        return self

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for b, f in enumerate(maps):
            if b >= len(self.kept):
                out.append(f)
                continue
            mean, basis = self.get_buffer(f"mean{b}"), self.get_buffer(f"basis{b}")
            projected = torch.nn.functional.conv2d(f.float() - mean.view(1, -1, 1, 1).to(f.device),
                                                   basis.T[:, :, None, None].to(f.device))
            out.append(projected.to(f.dtype).contiguous(memory_format=torch.channels_last))
        return out
