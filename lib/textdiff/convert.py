"""OpenAI guided-diffusion (ADM) UNet checkpoint -> diffusers ``UNet2DModel`` folder.

The flags are those guided-diffusion's README prints (``--attention_resolutions 32,16,8 --image_size 256 ...``).
The key mapping is derived from the flags by walking ADM's block structure, so any flag set that diffusers'
UNet2DModel can express converts; the rest is refused with the reason.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

# The flags guided-diffusion's README gives for 256x256_diffusion_uncond.pt (the paper's backbone)
ADM256_UNCOND_FLAGS = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
                       "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
                       "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True").split()

# guided-diffusion's defaults (script_util.model_and_diffusion_defaults)
ADM_DEFAULTS = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                    num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
                    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
                    use_fp16=False, use_new_attention_order=False, learn_sigma=False, diffusion_steps=1000,
                    noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
                    rescale_timesteps=False, rescale_learned_sigmas=False, in_channels=3)
DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
                        32: (1, 2, 2, 2)}


class ConversionError(ValueError):
    pass


def _bool(text) -> bool:
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("true", "1", "yes"):
        return True
    if str(text).lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False, got {text!r}")


def parse_flags(argv: list[str]) -> dict:
    """guided-diffusion MODEL_FLAGS / DIFFUSION_FLAGS -> dict (unknown flags are an error)."""
    parser = argparse.ArgumentParser(prog="textdiff convert-adm FLAGS", add_help=False)
    for name, default in ADM_DEFAULTS.items():
        kind = _bool if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name}", type=kind, default=default)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConversionError(f"unknown guided-diffusion flags: {' '.join(unknown)}")
    return vars(args)


@dataclass
class Plan:
    config: dict  # diffusers UNet2DModel config
    mapping: list[tuple[str, str | list[str], str]]  # (adm key prefix, diffusers prefix(es), kind)
    heads: dict[str, int]  # adm attention prefix -> number of heads
    legacy_attention: bool


def plan(flags: dict) -> Plan:
    f = dict(ADM_DEFAULTS) | flags
    if f["class_cond"]:
        raise ConversionError("class-conditional checkpoints (--class_cond True) are not supported: TextDiff uses "
                              "unconditional backbones (diffusers' UNet2DModel has no ADM label embedding here)")
    size = int(f["image_size"])
    if f["channel_mult"]:
        mult = tuple(float(m) if "." in m else int(m) for m in str(f["channel_mult"]).split(","))
    elif size in DEFAULT_CHANNEL_MULT:
        mult = DEFAULT_CHANNEL_MULT[size]
    else:
        raise ConversionError(f"no default channel_mult for image_size {size}; give --channel_mult")
    base = int(f["num_channels"])
    channels = [int(base * m) for m in mult]
    attention_ds = {size // int(r) for r in str(f["attention_resolutions"]).split(",") if r}
    attn_levels = [2 ** level in attention_ds for level in range(len(mult))]
    attn_channels = {c for c, a in zip(channels, attn_levels) if a} | {channels[-1]}  # the middle block attends too
    if int(f["num_head_channels"]) > 0:
        head_dim = int(f["num_head_channels"])
    else:
        heads_up = int(f["num_heads_upsample"]) if int(f["num_heads_upsample"]) > 0 else int(f["num_heads"])
        if heads_up != int(f["num_heads"]) or len(attn_channels) > 1:
            raise ConversionError("a fixed --num_heads over attention levels of different widths cannot be expressed "
                                  "by diffusers' UNet2DModel (one head size for all blocks); use a checkpoint made "
                                  "with --num_head_channels")
        head_dim = next(iter(attn_channels)) // int(f["num_heads"])
    updown = _bool(f["resblock_updown"])
    plain_down = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    down_types = ["AttnDownBlock2D" if a else plain_down for a in attn_levels]
    up_types = ["AttnUpBlock2D" if a else plain_up for a in reversed(attn_levels)]
    in_ch = int(f["in_channels"])
    config = dict(sample_size=size, in_channels=in_ch, out_channels=in_ch * (2 if f["learn_sigma"] else 1),
                  layers_per_block=int(f["num_res_blocks"]), block_out_channels=channels,
                  down_block_types=down_types, up_block_types=up_types, attention_head_dim=head_dim,
                  resnet_time_scale_shift="scale_shift" if f["use_scale_shift_norm"] else "default",
                  attn_norm_num_groups=32, downsample_type="resnet" if updown else "conv",
                  upsample_type="resnet" if updown else "conv", norm_num_groups=32, norm_eps=1e-5,
                  time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0, num_class_embeds=None,
                  dropout=float(f["dropout"]))

    mapping: list[tuple[str, object, str]] = [("time_embed.0", "time_embedding.linear_1", "copy"),
                                              ("time_embed.2", "time_embedding.linear_2", "copy"),
                                              ("input_blocks.0.0", "conv_in", "copy")]
    heads: dict[str, int] = {}
    n = int(f["num_res_blocks"])
    k = 1
    for level, ch in enumerate(channels):
        for j in range(n):
            mapping.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if attn_levels[level]:
                mapping.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", "attention"))
                heads[f"input_blocks.{k}.1"] = ch // head_dim
            k += 1
        if level < len(channels) - 1:
            kind = "resnet" if updown else "conv_down"
            mapping.append((f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", kind))
            k += 1
    mapping += [("middle_block.0", "mid_block.resnets.0", "resnet"),
                ("middle_block.1", "mid_block.attentions.0", "attention"),
                ("middle_block.2", "mid_block.resnets.1", "resnet")]
    heads["middle_block.1"] = channels[-1] // head_dim
    k = 0
    for i, level in enumerate(reversed(range(len(channels)))):
        ch = channels[level]
        for j in range(n + 1):
            mapping.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            sub = 1
            if attn_levels[level]:
                mapping.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
                heads[f"output_blocks.{k}.1"] = ch // head_dim
                sub = 2
            if level > 0 and j == n:
                mapping.append((f"output_blocks.{k}.{sub}", f"up_blocks.{i}.upsamplers.0",
                                "resnet" if updown else "conv_up"))
            k += 1
    mapping += [("out.0", "conv_norm_out", "copy"), ("out.2", "conv_out", "copy")]
    return Plan(config, mapping, heads, legacy_attention=not f["use_new_attention_order"])


RESNET_KEYS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
               "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _split_qkv(tensor: torch.Tensor, heads: int, legacy: bool) -> list[torch.Tensor]:
    """ADM's fused qkv (3C, C, 1) / (3C,) -> q, k, v as (C, C) / (C,).

    Legacy attention (QKVAttentionLegacy, the released checkpoints) interleaves per head: (heads, 3, d, ...);
    the new order (QKVAttention) stacks q, k, v first: (3, heads, d, ...).
    """
    t = tensor.squeeze(-1) if tensor.ndim == 3 else tensor
    channels = t.shape[0] // 3
    rest = t.shape[1:]
    if legacy:
        parts = t.reshape(heads, 3, channels // heads, *rest)
        return [parts[:, i].reshape(channels, *rest) for i in range(3)]
    return list(t.reshape(3, channels, *rest).unbind(0))


def convert_state_dict(state: dict[str, torch.Tensor], the_plan: Plan) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    used = set()
    for adm, target, kind in the_plan.mapping:
        keys = [k for k in state if k.startswith(adm + ".")]
        for key in keys:
            rest = key[len(adm) + 1:]
            used.add(key)
            value = state[key].float()
            if kind == "copy":
                out[f"{target}.{rest}"] = value
            elif kind == "resnet":
                prefix, _, param = rest.rpartition(".")
                out[f"{target}.{RESNET_KEYS[prefix]}.{param}"] = value
            elif kind in ("conv_down", "conv_up"):
                out[f"{target}.conv.{rest.split('.')[-1]}"] = value
            elif kind == "attention":
                module, _, param = rest.rpartition(".")
                if module == "norm":
                    out[f"{target}.group_norm.{param}"] = value
                elif module == "qkv":
                    q, k, v = _split_qkv(value, the_plan.heads[adm], the_plan.legacy_attention)
                    out.update({f"{target}.to_q.{param}": q, f"{target}.to_k.{param}": k, f"{target}.to_v.{param}": v})
                elif module == "proj_out":
                    out[f"{target}.to_out.0.{param}"] = value.squeeze(-1) if value.ndim == 3 else value
                else:
                    raise ConversionError(f"unexpected attention parameter {key}")
    unused = sorted(set(state) - used)
    if unused:
        raise ConversionError(f"{len(unused)} checkpoint keys have no place in the diffusers model, e.g. {unused[:3]}; "
                              "do the flags match the checkpoint?")
    return out


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path, flags: list[str] | dict) -> Path:
    from diffusers import UNet2DModel

    the_plan = plan(parse_flags(flags) if isinstance(flags, list) else flags)
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if any(k.startswith("label_emb") for k in state):
        raise ConversionError("this checkpoint is class-conditional (label_emb.*): not supported")
    converted = convert_state_dict(state, the_plan)
    unet = UNet2DModel(**the_plan.config)
    try:
        unet.load_state_dict(converted, strict=True)
    except RuntimeError as error:
        raise ConversionError(f"the converted weights do not fit the model built from the flags: "
                              f"{str(error).splitlines()[0][:300]}") from None
    unet.save_pretrained(out_dir)
    return Path(out_dir)
