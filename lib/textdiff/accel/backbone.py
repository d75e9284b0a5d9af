"""The backbone's fast path: diffusers' ResNet blocks and attention running the CPU kernels (``kernels.py``).

``DiffusionFeatures`` sets ``FAST_PATH`` while its own forward runs; anything else that runs the same UNet object
(the naive reference loop, training, another caller) gets diffusers' code. The blocks are diffusers' classes with
their forward specialised, so the fast path is tied to the diffusers versions it was tested with
(``TESTED_DIFFUSERS``); with another version the plain path runs, with a warning.
"""
from __future__ import annotations

import contextvars
import functools
import warnings

import torch
from torch import nn

from . import kernels

TESTED_DIFFUSERS = ((0, 30), (0, 43))  # [first, last) minor versions whose ResnetBlock2D/Attention this mirrors


def diffusers_tested() -> bool:
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return TESTED_DIFFUSERS[0] <= (major, minor) < TESTED_DIFFUSERS[1]


# True while DiffusionFeatures' fast path runs: only there do the UNet's ResNet blocks and attention take the CPU
# kernels below (the naive reference loop runs the same UNet object through diffusers' own code)
FAST_PATH = contextvars.ContextVar("textdiff_fast_path", default=False)


@functools.cache
def _frozen_resnet_class():
    """diffusers' ResnetBlock2D with, in the fast path, GroupNorm + SiLU as one kernel on CPU (kernels.group_norm_silu:
    as PyTorch ops, with autocast's casts, they took ~107 ms of a 1.6 s 4-window forward of the shipped backbone) and
    the residual sum in place, without the division by an output scale of 1. The same function as diffusers' forward
    for frozen inference, which runs for anything else (training, resampling blocks, scale-shift time embeddings)."""
    from diffusers.models.resnet import ResnetBlock2D

    class FrozenResnetBlock2D(ResnetBlock2D):
        def forward(self, input_tensor, temb, *args, **kwargs):
            if not (FAST_PATH.get() and not self.training and self.upsample is None and self.downsample is None
                    and self.time_embedding_norm == "default" and isinstance(self.nonlinearity, nn.SiLU)
                    and not args and not kwargs):
                return super().forward(input_tensor, temb, *args, **kwargs)
            hidden = self.conv1(kernels.group_norm_silu(input_tensor, self.norm1))
            if self.time_emb_proj is not None:
                temb = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))[:, :, None, None]
            if temb is not None:
                hidden = hidden + temb
            hidden = self.conv2(self.dropout(kernels.group_norm_silu(hidden, self.norm2)))
            shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
            if hidden.dtype == torch.promote_types(hidden.dtype, shortcut.dtype):
                hidden.add_(shortcut)  # conv2's fresh output: nothing else holds it
            else:
                hidden = hidden + shortcut
            return hidden if self.output_scale_factor == 1 else hidden / self.output_scale_factor

    return FrozenResnetBlock2D


class FastAttnProcessor:
    """diffusers' attention processor for the fast path: self-attention of a feature map through the CPU kernel
    (kernels.attention, ~2x PyTorch's CPU flash kernel at head size 32), the processor it wraps for anything else
    (outside the fast path, masks, cross-attention, extra norms, training, other types or devices)."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        bf16 = hidden_states.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                                          and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        plain = (not FAST_PATH.get() or attn.training or hidden_states.ndim != 4 or args or kwargs
                 or hidden_states.device.type != "cpu" or not bf16 or attn.to_q.out_features % attn.heads
                 or not kernels.attention_supported(attn.to_q.out_features // attn.heads)
                 or encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None
                 or attn.norm_q is not None or attn.norm_k is not None)
        out = None
        if not plain:
            batch, channels, height, width = hidden_states.shape
            tokens = hidden_states.view(batch, channels, height * width).transpose(1, 2)
            if attn.group_norm is not None:
                tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
            out = kernels.attention(attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens), attn.heads)
        if out is None:
            return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def use_fast_path(unet) -> None:
    """Give the UNet's ResNet blocks and attention the fast path's code (their class and processor only; weights and
    state dict unchanged); nothing on an untested diffusers version."""
    if not diffusers_tested():
        import diffusers

        warnings.warn(f"diffusers {diffusers.__version__} is outside the versions the backbone fast path was tested "
                      f"with ({TESTED_DIFFUSERS}); the backbone runs diffusers' own code (slower, same function)")
        return
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    for module in unet.modules():
        if type(module) is ResnetBlock2D:
            module.__class__ = _frozen_resnet_class()
        elif isinstance(module, Attention) and not isinstance(module.processor, FastAttnProcessor):
            module.set_processor(FastAttnProcessor(module.processor))
