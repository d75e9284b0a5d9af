"""ADM -> diffusers conversion: the full 256x256 layout maps key for key and loads strictly; numerics on small
configs against a reference of ADM's attention (interleaved per-head qkv) and a full-model round trip."""
from __future__ import annotations

import json
import math

import pytest
import torch

from support import SHARED
from textdiff.cli import main
from textdiff.convert import ADM256_UNCOND_FLAGS as ADM256_FLAGS
from textdiff.convert import ConversionError, _split_qkv, convert_state_dict, parse_flags, plan


def layout():
    path = SHARED.parent / "reference" / "adm256_uncond_layout.json"
    if not path.is_file():
        pytest.skip("../shared/reference/adm256_uncond_layout.json not found")
    return json.loads(path.read_text())


def test_full_adm256_layout_converts_and_loads_strictly():
    from diffusers import UNet2DModel

    data = layout()
    the_plan = plan(parse_flags(ADM256_FLAGS))
    assert the_plan.config == data["diffusers_unet2d_config"] | {"sample_size": 256, "in_channels": 3}
    state = {e["key"]: torch.empty(e["shape"], dtype=getattr(torch, e["dtype_after_convert_to_fp16"]), device="meta")
             for e in data["state_dict"]}
    converted = convert_state_dict(state, the_plan)
    for entry in data["state_dict"]:  # every key lands where the reference layout says
        targets = entry["diffusers_key"] if isinstance(entry["diffusers_key"], list) else [entry["diffusers_key"]]
        assert all(t in converted for t in targets), entry["key"]
    with torch.device("meta"):
        unet = UNet2DModel(**the_plan.config)
    unet.load_state_dict(converted, strict=True, assign=True)
    assert sum(p.numel() for p in unet.parameters()) == data["total_parameters"]
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def test_refuses_what_it_cannot_convert():
    with pytest.raises(ConversionError, match="class-conditional"):
        plan(parse_flags(ADM256_FLAGS[:2] + ["--class_cond", "True"]))
    with pytest.raises(ConversionError, match="num_head_channels"):
        plan(parse_flags(["--image_size", "64", "--num_heads", "4", "--attention_resolutions", "16,8"]))
    with pytest.raises(ConversionError, match="unknown"):
        parse_flags(["--no_such_flag", "1"])


def _adm_attention(x, norm, qkv_w, qkv_b, proj_w, proj_b, heads):
    """ADM AttentionBlock with QKVAttentionLegacy, written from the paper code's semantics."""
    b, c, h, w = x.shape
    t = torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias, 1e-5).reshape(b, c, -1)
    qkv = torch.nn.functional.conv1d(t, qkv_w, qkv_b)  # (B, 3C, T)
    d = c // heads
    q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
    scale = 1 / math.sqrt(math.sqrt(d))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    return x + torch.nn.functional.conv1d(a, proj_w, proj_b).reshape(b, c, h, w)


def test_interleaved_qkv_matches_adm_attention_numerically():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    c, heads = 64, 4
    x = torch.randn(2, c, 8, 8)
    norm = torch.nn.GroupNorm(32, c)
    torch.nn.init.normal_(norm.weight)
    qkv_w, qkv_b = torch.randn(3 * c, c, 1) / 8, torch.randn(3 * c)
    proj_w, proj_b = torch.randn(c, c, 1) / 8, torch.randn(c)
    expected = _adm_attention(x, norm, qkv_w, qkv_b, proj_w, proj_b, heads)

    attention = Attention(c, heads=heads, dim_head=c // heads, norm_num_groups=32, residual_connection=True,
                          bias=True, upcast_softmax=True, _from_deprecated_attn_block=True, eps=1e-5)
    state = {"group_norm.weight": norm.weight, "group_norm.bias": norm.bias, "to_out.0.weight": proj_w.squeeze(-1),
             "to_out.0.bias": proj_b}
    for name, w_, b_ in zip(("to_q", "to_k", "to_v"), _split_qkv(qkv_w, heads, True), _split_qkv(qkv_b, heads, True)):
        state |= {f"{name}.weight": w_, f"{name}.bias": b_}
    attention.load_state_dict(state, strict=True)
    torch.testing.assert_close(attention(x), expected, rtol=1e-4, atol=1e-5)
    plain_chunk_q = qkv_w.squeeze(-1).chunk(3)[0]  # the wrong split for legacy checkpoints
    assert not torch.allclose(plain_chunk_q, state["to_q.weight"])


def _to_adm(unet, the_plan) -> dict:
    """Inverse of the conversion (diffusers -> ADM keys), to round-trip a random small model."""
    from textdiff.convert import RESNET_KEYS

    inverse_resnet = {v: k for k, v in RESNET_KEYS.items()}
    state, out = unet.state_dict(), {}
    for adm, target, kind in the_plan.mapping:
        for key in [k for k in state if k.startswith(target + ".")]:
            rest, value = key[len(target) + 1:], state[key]
            module, _, param = rest.rpartition(".")
            if kind == "copy":
                out[f"{adm}.{rest}"] = value
            elif kind == "resnet":
                out[f"{adm}.{inverse_resnet[module]}.{param}"] = value
            elif kind in ("conv_down", "conv_up"):
                out[f"{adm}.{'op' if kind == 'conv_down' else 'conv'}.{param}"] = value
            elif module == "group_norm":
                out[f"{adm}.norm.{param}"] = value
            elif module == "to_out.0":
                out[f"{adm}.proj_out.{param}"] = value[..., None] if param == "weight" else value
            elif module == "to_q":
                heads = the_plan.heads[adm]
                q, k, v = (state[f"{target}.to_{n}.{param}"] for n in "qkv")
                c = q.shape[0]
                stacked = torch.stack([t.reshape(heads, c // heads, *t.shape[1:]) for t in (q, k, v)], dim=1)
                fused = stacked.reshape(3 * c, *q.shape[1:])
                out[f"{adm}.qkv.{param}"] = fused[..., None] if param == "weight" else fused
    return out


@pytest.mark.parametrize("updown", ["True", "False"])
def test_small_config_round_trip_through_cli(tmp_path, updown, capsys):
    from diffusers import UNet2DModel

    flags = ["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1", "--attention_resolutions", "16,8",
             "--num_head_channels", "16", "--channel_mult", "1,2,2", "--resblock_updown", updown,
             "--learn_sigma", "True", "--use_scale_shift_norm", "True"]
    the_plan = plan(parse_flags(flags))
    torch.manual_seed(0)
    reference = UNet2DModel(**the_plan.config).eval()
    for p in reference.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, std=0.05)
    torch.save(_to_adm(reference, the_plan), tmp_path / "adm.pt")
    assert main(["convert-adm", str(tmp_path / "adm.pt"), str(tmp_path / "out"), *flags]) == 0
    converted = UNet2DModel.from_pretrained(tmp_path / "out").eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(converted(x, t).sample, reference(x, t).sample, rtol=1e-4, atol=1e-4)


def test_cli_refuses_mismatched_flags_clearly(tmp_path, capsys):
    torch.save({"time_embed.0.weight": torch.zeros(4, 4)}, tmp_path / "bad.pt")
    assert main(["convert-adm", str(tmp_path / "bad.pt"), str(tmp_path / "o"), "--image_size", "32",
                 "--num_head_channels", "16", "--channel_mult", "1,2"]) == 2
    assert "do not fit" in capsys.readouterr().err


def test_adm_benchmark_counts_the_limit_from_full_forwards_and_times_the_early_exit_path():
    from diffusers import UNet2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from textdiff.benchmark import bench_adm, table

    flags = ("--image_size 64 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 "
             "--num_head_channels 16 --channel_mult 1,2").split()
    result = bench_adm(torch.device("cpu"), flags=flags, blocks=(1, 2))
    with torch.device("meta"):
        unet = UNet2DModel.from_config(plan(parse_flags(flags)).config)
    with FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, 3, 64, 64, device="meta"), torch.tensor([50], device="meta"))
    assert result["adm_tflop_per_window_full"] * 1e12 == 3 * counter.get_total_flops()  # 3 steps, full forwards
    assert result["adm_tflop_per_window_run"] < result["adm_tflop_per_window_full"]  # block 3 and conv_out skipped
    peak = result["adm_peak_tflops_measured_matmul"]  # a CPU: no datasheet value
    assert result["adm_peak_tflops_datasheet"] is None and peak > 0
    assert result["adm_limit_windows_per_s"] == pytest.approx(peak / result["adm_tflop_per_window_full"])
    assert result["adm_fraction_of_limit"] == pytest.approx(result["adm_windows_per_s"] / result["adm_limit_windows_per_s"])
    assert "physical limit" in table(result)


def test_datasheet_peaks_match_the_most_specific_name():
    from textdiff.benchmark import datasheet_peak_tflops

    assert datasheet_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert datasheet_peak_tflops("NVIDIA H200") == 989.4
    assert datasheet_peak_tflops("NVIDIA A10G") == 70.0 and datasheet_peak_tflops("Some GPU") is None
