"""Behaviour of the engine with tiny models: features, head, tiling, cache, I/O."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from support import SHARED, need_shared, tiny_unet_model
from textdiff.accel import kernels as fused
from textdiff.backbone import (
    BackboneLoadError,
    DiffusionFeatures,
    decoder_units,
    default_blocks,
    load_unet,
    naive_features,
)
from textdiff.data import normalize_mask, read_image, read_lvit, read_mask, write_label
from textdiff.head import FusionHead
from textdiff.text import ReportEncoder, clean_report


# ----- backbone ---------------------------------------------------------------------------------------------------
def test_decoder_numbering_matches_adm_layout():
    """The ADM-256 layout's output_blocks -> diffusers mapping is reproduced by decoder_units."""
    import json
    from pathlib import Path

    layout = Path(SHARED).parent / "reference" / "adm256_uncond_layout.json"
    if not layout.is_file():
        pytest.skip("reference layout not found in ../shared/reference")
    from diffusers import UNet2DModel

    data = json.loads(layout.read_text())
    with torch.device("meta"):
        unet = UNet2DModel(**data["diffusers_unet2d_config"])
    names = [name for name, _ in decoder_units(unet)]
    assert names == [data["output_block_to_diffusers_module"][str(i)] for i in range(len(names))]
    assert default_blocks(unet) == (7, 10, 13, 14)  # 14: the last upsampler, at full resolution


def test_early_exit_and_batching_equal_full_naive_forward():
    unet = tiny_unet_model()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    blocks = default_blocks(unet)
    fast = DiffusionFeatures(unet, blocks, precision="fp32")(x)
    reference = naive_features(unet, x, blocks)
    assert [f.shape for f in fast] == [r.shape for r in reference]
    for f, r in zip(fast, reference):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-5)
    # step-major channels: the first C channels are step 50
    single = DiffusionFeatures(unet, blocks, steps=(50,), precision="fp32")(x)
    torch.testing.assert_close(fast[0][:, : single[0].shape[1]], single[0], rtol=1e-4, atol=1e-5)


def test_early_exit_skips_everything_after_deepest_block():
    unet = tiny_unet_model()
    calls = []
    unet.conv_out.register_forward_hook(lambda *a: calls.append("conv_out"))
    unet.up_blocks[1].register_forward_hook(lambda *a: calls.append("up1"))
    DiffusionFeatures(unet, blocks=[0], precision="fp32")(torch.zeros(1, 3, 32, 32))
    assert calls == []
    DiffusionFeatures(unet, blocks=[0], precision="fp32", early_exit=False)(torch.zeros(1, 3, 32, 32))
    assert calls == ["up1", "conv_out"]


def test_benchmark_extraction_agrees_and_accounts_for_the_skipped_work(tiny_model):
    from textdiff.benchmark import bench_extract, table

    windows = torch.rand(2, 3, 32, 32) * 2 - 1
    result = bench_extract(tiny_model, windows, repeats=1)
    assert result["feature_max_rel_diff"] < 1e-4  # fp32 fast path = reference loop
    # the default blocks stop before the last decoder level: the reference does strictly more work
    assert result["extract_flop_ratio"] > 1.05
    assert result["extract_fast_gflops_per_s"] > 0 and result["extract_naive_gflops_per_s"] > 0
    text = table(result)
    assert result["extract_speedup_bound"] > 0 and result["extract_peak_tflops"] > 0
    assert "work skipped by the early exit" in text and "GFLOP/s" in text and "matmul peak" in text


def test_bf16_features_close_to_fp32():
    unet = tiny_unet_model()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    a = DiffusionFeatures(unet, precision="fp32")(x)
    b = DiffusionFeatures(unet, precision="bf16")(x)
    for f, g in zip(a, b):
        assert (f - g).norm() / f.norm() < 0.05


def test_bad_blocks_steps_and_sources_are_refused(tmp_path):
    unet = tiny_unet_model()
    with pytest.raises(ValueError, match="does not exist"):
        DiffusionFeatures(unet, blocks=[99])
    with pytest.raises(ValueError, match="steps"):
        DiffusionFeatures(unet, steps=[1000])
    with pytest.raises(BackboneLoadError, match="does not exist"):
        load_unet(str(tmp_path / "nope"))
    with pytest.raises(BackboneLoadError, match="hub"):
        load_unet("someone/not-a-real-backbone")  # offline in tests: a clear message, no traceback soup


def test_an_unreachable_hub_is_detected_at_once(monkeypatch):
    import time

    from huggingface_hub import constants

    from textdiff.hub import hub_options, hub_unreachable_reason

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert "127.0.0.1:9 is not reachable" in hub_unreachable_reason()
    assert hub_options()[0] == {"local_files_only": True}  # offline: the local hub cache only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable_reason() == "HF_HUB_OFFLINE is set"
    start = time.perf_counter()
    with pytest.raises(BackboneLoadError, match="not reachable: HF_HUB_OFFLINE is set"):
        load_unet("someone/not-a-real-backbone")
    assert time.perf_counter() - start < 20  # no retries (they took ~54 s)


# ----- report encoder -----------------------------------------------------------------------------------------------
def test_report_cleaning():
    assert clean_report("  a\x00b\tc\n") == "a b c"
    assert clean_report("\x00\x01 ") is None
    assert clean_report(None) is None
    assert len(clean_report("x" * 100_000)) <= 4000
    assert clean_report("双侧肺部感染") == "双侧肺部感染"


def test_encoder_caches_and_truncates(tiny_encoder_dir):
    encoder = ReportEncoder.load(str(tiny_encoder_dir), max_tokens=16)
    tokens, mask = encoder.embed("Bilateral pulmonary infection, two infected areas, lower left lung and middle right lung.")
    assert tokens.shape == (16, 32) and mask.all()
    assert encoder.embed("Bilateral pulmonary infection, two infected areas, lower left lung and middle right lung.")[0] is tokens
    long_tokens, _ = encoder.embed("word " * 50_000)
    assert long_tokens.shape[0] == 16
    assert encoder.embed("") is None


def test_local_encoder_load_draws_no_progress_bar(tiny_encoder_dir, capfd):
    from transformers.utils import logging as hf_logging

    ReportEncoder.load(str(tiny_encoder_dir))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # switched back on for downloads and other users


def test_embedded_default_encoder_loads_offline():
    encoder = ReportEncoder.load()
    tokens, mask = encoder.embed("The nuclei density in the upper right is high.")
    assert tokens.shape[1] == 384 and mask.sum() >= 10


# ----- head -----------------------------------------------------------------------------------------------------------
def _features():
    torch.manual_seed(1)
    return [torch.randn(2, 12, 4, 4), torch.randn(2, 6, 16, 16)]


def test_text_changes_output_and_no_text_switch_removes_it():
    torch.manual_seed(0)
    head = FusionHead([12, 6], text_dim=32, dim=16, strides=[4, 1]).eval()
    feats = _features()
    text_a, text_b = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    out_a, out_b = head(feats, text_a), head(feats, text_b)
    assert out_a.shape == (2, 2, 16, 16)
    assert not torch.allclose(out_a, out_b)
    head.use_text = False
    torch.testing.assert_close(head(feats, text_a), head(feats, text_b))
    torch.testing.assert_close(head(feats, text_a), head(feats, None))
    # a sample with an all-masked report takes exactly the no-text path, without NaN
    head.use_text = True
    empty = torch.zeros(2, 5, dtype=torch.bool)
    torch.testing.assert_close(head(feats, text_a, empty), head(feats, None))


def test_a_batch_with_some_reports_missing_equals_each_sample_alone_and_trains_every_parameter():
    """Samples without a report skip the report attention (text dropout drops half of them in training): a mixed
    batch must give each sample what it gets alone, in channels-last layout, and a batch without any report must
    still give every attention parameter a (zero) gradient, as DistributedDataParallel requires."""
    torch.manual_seed(0)
    head = FusionHead([12, 6], text_dim=32, dim=16, strides=[4, 1], position=True)
    feats = [f.repeat(2, 1, 1, 1).contiguous(memory_format=torch.channels_last) for f in _features()]  # 4 samples
    text = torch.randn(4, 5, 32)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[[1, 2]] = False  # samples 1 and 2 have no report
    box = torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]])
    mixed = head(feats, text, mask, dihedral=(1, True), box=box)
    for k in range(4):
        alone = head([f[k:k + 1] for f in feats], text[k:k + 1], mask[k:k + 1], dihedral=(1, True), box=box[k:k + 1])
        torch.testing.assert_close(mixed[k:k + 1], alone)
    attention = head.fuse_text[0]
    projected = head.project[0](feats[0])
    assert attention(projected, text, mask, torch.rand(4, 2, 4, 4)).is_contiguous(memory_format=torch.channels_last)
    head.zero_grad()
    head(feats, text, torch.zeros(4, 5, dtype=torch.bool), box=box).sum().backward()
    grads = [p.grad for p in attention.parameters()]
    assert all(g is not None for g in grads) and all(float(g.abs().sum()) == 0 for g in grads)


def test_text_min_stride_selects_the_scales_that_attend():
    feats = _features()
    text_a, text_b = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    torch.manual_seed(0)
    coarse_only = FusionHead([12, 6], text_dim=32, dim=16, strides=[8, 1], text_min_stride=16).eval()
    torch.testing.assert_close(coarse_only(feats, text_a), coarse_only(feats, text_b))  # no scale attends
    torch.manual_seed(0)
    every_scale = FusionHead([12, 6], text_dim=32, dim=16, strides=[8, 1], text_min_stride=1).eval()
    assert every_scale.attends == [True, True]
    every_scale.fuse_text[0] = torch.nn.Identity()  # only the full-resolution scale attends now
    every_scale.attends[0] = False
    assert not torch.allclose(every_scale(feats, text_a), every_scale(feats, text_b))


def test_dihedral_augmentation_inside_the_head_equals_transforming_its_input():
    from textdiff.head import rotate_flip

    torch.manual_seed(0)
    head = FusionHead([12, 6], text_dim=32, dim=16, strides=[4, 1]).eval()
    feats, text = _features(), torch.randn(2, 5, 32)
    for turns, flip in ((1, False), (2, True), (3, True)):
        moved = head([rotate_flip(f, turns, flip) for f in feats], text)
        torch.testing.assert_close(head(feats, text, dihedral=(turns, flip)), moved, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(moved, head(feats, text), atol=1e-3)


def test_the_image_path_joins_the_head_turns_with_it_and_learns(tmp_path):
    """The trainable U-Net on the clean image (the last input) is part of the head: the dihedral augmentation
    still equals turning the inputs, its output changes the logits, and it gets gradients."""
    from textdiff.head import rotate_flip

    torch.manual_seed(0)
    head = FusionHead([40, 6, 3], text_dim=32, dim=16, strides=[4, 2, 1], upsample=[False, True, False],
                      image_path=[4, 8]).eval()
    plain = FusionHead([40, 6, 3], text_dim=32, dim=16, strides=[4, 2, 1], upsample=[False, True, False])
    assert head.image_path is not None and plain.image_path is None
    feats = [torch.randn(2, 40, 4, 4), torch.randn(2, 6, 8, 8), torch.randn(2, 3, 16, 16)]
    text = torch.randn(2, 5, 32)
    for turns, flip in ((1, False), (2, True), (3, True)):
        moved = head([rotate_flip(f, turns, flip) for f in feats], text)
        torch.testing.assert_close(head(feats, text, dihedral=(turns, flip)), moved, rtol=1e-4, atol=1e-5)
    before = head(feats, text)
    with torch.no_grad():
        last = [m for m in head.image_path.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
        last.weight.mul_(3.0)  # the path's output layer: its output moves the logits
    assert not torch.allclose(head(feats, text), before, atol=1e-4)
    head.train()
    head(feats, text).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.image_path.parameters())
    with pytest.raises(ValueError, match="image_path needs the clean image"):
        FusionHead([40, 6], text_dim=32, dim=16, strides=[4, 2], image_path=[4, 8])


def test_turning_inside_a_positional_head_equals_features_of_the_turned_image_mapped_back():
    """The training augmentation (features turned inside the head, the position grid with them) gives what features
    of the turned image give when their positions map back through ``variants``: every token keeps its place in
    the original image, at every scale (coarse, upsampled, the image)."""
    from textdiff.head import rotate_flip

    torch.manual_seed(0)
    head = FusionHead([40, 24, 6, 3], text_dim=32, dim=16, strides=[8, 4, 2, 1],
                      upsample=[False, False, True, False], position=True).eval()
    feats = [torch.randn(2, 40, 2, 2), torch.randn(2, 24, 4, 4), torch.randn(2, 6, 8, 8), torch.randn(2, 3, 16, 16)]
    text = torch.randn(2, 5, 32)
    for turns, flip in ((1, False), (2, True), (3, True)):
        moved = head([rotate_flip(f, turns, flip) for f in feats], text, variants=[(turns, flip)] * 2)
        torch.testing.assert_close(head(feats, text, dihedral=(turns, flip)), moved, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(moved, head(feats, text), atol=1e-3)


def test_group_norm_of_channels_last_maps_equals_the_plain_one_forward_and_backward():
    """The head's GroupNorm has its own backward for channels-last maps (CPU speed): the values, the gradients
    (input and affine) and the channels-last layout must be what plain GroupNorm gives; in bf16 its gradients must
    be as close to the fp32 ones as PyTorch's own bf16 kernel's are."""
    from textdiff.head import _group_norm

    torch.manual_seed(0)
    cl_format = torch.channels_last
    for channels in (16, 64):  # 2 and 8 channels per group
        plain = torch.nn.GroupNorm(8, channels)
        with torch.no_grad():
            plain.weight.normal_(), plain.bias.normal_()
        norm = copy.deepcopy(plain)
        norm.forward = lambda t, m=norm: _group_norm(t, 8, m.weight, m.bias, m.eps)
        x = torch.randn(2, channels, 8, 8) * 2 + 0.5
        cl, nchw = x.contiguous(memory_format=cl_format).requires_grad_(), x.clone().requires_grad_()
        y, reference = norm(cl), plain(nchw)
        assert y.is_contiguous(memory_format=cl_format) and not y.is_contiguous()
        torch.testing.assert_close(y, reference)
        grad = torch.randn_like(reference)
        y.backward(grad.contiguous(memory_format=cl_format))
        reference.backward(grad)
        assert cl.grad.is_contiguous(memory_format=cl_format)
        torch.testing.assert_close(cl.grad, nchw.grad)
        torch.testing.assert_close(norm.weight.grad, plain.weight.grad)
        torch.testing.assert_close(norm.bias.grad, plain.bias.grad)

        def bf16_input_grad(module):
            x16 = x.to(torch.bfloat16).contiguous(memory_format=cl_format).requires_grad_()
            module(x16).backward(grad.to(torch.bfloat16).contiguous(memory_format=cl_format))
            return x16.grad.float()

        ours, pytorch = bf16_input_grad(norm), bf16_input_grad(plain)  # plain: PyTorch's channels-last kernel
        assert (ours - nchw.grad).abs().max() <= 2 * (pytorch - nchw.grad).abs().max()


def _group_norm_gelu_step(module, x, grad, dtype=torch.bfloat16):
    """(output, input grad, weight grad, bias grad) of module on a channels-last copy of x in dtype, all as fp32."""
    module.zero_grad()
    xc = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = module(xc)
    y.backward(grad.to(dtype).contiguous(memory_format=torch.channels_last))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert xc.grad.is_contiguous(memory_format=torch.channels_last)
    return [y.float(), xc.grad.float(), module.weight.grad.clone(), module.bias.grad.clone()]


@pytest.mark.skipif(not fused._compiler() or not fused.platform_supported(),
                    reason="no C compiler, or not x86-64 Linux with PyTorch's OpenMP")
def test_fused_group_norm_gelu_kernel_is_as_exact_as_pytorch(monkeypatch):
    """The head's GroupNorm + GELU pairs run as one C kernel in CPU training (textdiff/accel/kernels.py). It builds wherever
    a C compiler is; in bf16 its values and gradients (input, weight, bias) must be at least as close to fp32
    PyTorch as PyTorch's own bf16 ops are, in fp32 equal to them -- for the head's widths (16, 32, 64: the kernel's
    specialised copies), another width (the generic copy), odd sizes, one sample."""
    from textdiff.head import _norm_gelu

    assert fused.library() is not None, "the kernel did not build"
    torch.manual_seed(0)
    for n, channels, h, w in ((4, 16, 32, 32), (3, 64, 7, 9), (1, 32, 16, 16), (2, 24, 5, 11)):
        module = _norm_gelu(channels)
        with torch.no_grad():
            module.weight.normal_(1, 0.5), module.bias.normal_(0, 0.5)
        x = torch.randn(n, channels, h, w) * 2 + 0.5
        grad = torch.randn(n, channels, h, w)
        for dtype in (torch.bfloat16, torch.float32):
            assert fused.applies(x.to(dtype).contiguous(memory_format=torch.channels_last), module.weight)
        x32 = x.clone().requires_grad_()
        reference = torch.nn.functional.gelu(torch.nn.functional.group_norm(x32, module.num_groups, module.weight,
                                                                             module.bias, module.eps))
        module.zero_grad()
        reference.backward(grad)
        exact = [reference.detach(), x32.grad, module.weight.grad.clone(), module.bias.grad.clone()]
        kernel = _group_norm_gelu_step(module, x, grad)
        with monkeypatch.context() as patch:  # the same module on PyTorch's ops
            patch.setattr(fused, "library", lambda: None)
            pytorch = _group_norm_gelu_step(module, x, grad)
        for ours, theirs, truth, name in zip(kernel, pytorch, exact, ("output", "input grad", "weight", "bias")):
            error, bound = (ours - truth).abs().max(), (theirs - truth).abs().max()
            assert error <= bound * 1.5 + 1e-6, (n, channels, name, float(error), float(bound))
            assert error < 0.05 * truth.abs().max(), (n, channels, name)  # and close in absolute terms
        for ours, truth in zip(_group_norm_gelu_step(module, x, grad, torch.float32), exact):
            torch.testing.assert_close(ours, truth, rtol=1e-4, atol=1e-4 * float(truth.abs().max()))


@pytest.mark.skipif(not fused._compiler() or not fused.platform_supported(),
                    reason="no C compiler, or not x86-64 Linux with PyTorch's OpenMP")
def test_fast_path_resnet_blocks_and_attention_compute_diffusers_function(monkeypatch):
    """The fast path's ResNet blocks run GroupNorm + SiLU as one C kernel on CPU (backbone.FrozenResnetBlock2D) and
    its self-attention a bf16 kernel (backbone.FastAttnProcessor): fp32 features must equal diffusers' own code, bf16
    ones be as close to fp32 as diffusers' bf16 code is, for group widths 2 and 4 (specialised kernel copies) and odd
    ones (concatenated skips: generic); the kernels must really run, and the naive reference loop must not use them."""
    from diffusers import UNet2DModel

    from textdiff.backbone import DiffusionFeatures, naive_features

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 64),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=32).to(memory_format=torch.channels_last)  # 2 heads of 32
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    blocks = (0, 3, 4)
    norms, attentions = [], []
    affine, attention = fused._affine, fused.attention
    monkeypatch.setattr(fused, "_affine", lambda *a: norms.append(a[0].shape) or affine(*a))
    monkeypatch.setattr(fused, "attention", lambda *a: attentions.append(attention(*a)) or attentions[-1])

    def features(fast_path, precision):
        return DiffusionFeatures(unet, blocks, (50, 250), precision=precision, fast_path=fast_path)(x)

    exact = features(False, "fp32")
    assert not norms and not attentions  # diffusers' code
    ours = features(True, "fp32")
    assert {shape[1] for shape in norms} >= {16, 32, 48, 64, 96, 128}, norms  # every width, the kernel each time
    for a, b in zip(exact, ours):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert not attentions  # fp32: PyTorch's attention
    bf16 = features(True, "bf16")
    if fused.attention_supported(32):
        assert len(attentions) == 4 and all(a is not None for a in attentions)  # down, mid, 2 up
    for a, b, c in zip(exact, bf16, features(False, "bf16")):
        error, bound = float((b.float() - a).norm() / a.norm()), float((c.float() - a).norm() / a.norm())
        assert error <= bound * 1.5 + 1e-4, (error, bound)
    norms.clear(), attentions.clear()
    naive_features(unet, x, blocks, (50, 250))
    assert not norms and not attentions


@pytest.mark.skipif(not fused._compiler() or not fused.attention_supported(32), reason="no AVX-512 BF16 kernel here")
def test_attention_kernel_is_as_exact_as_pytorchs_bf16_attention():
    """fused.attention against fp32 attention: at least as close as PyTorch's own bf16 SDPA, for head sizes 32 and
    64, lengths that are no multiple of the kernel's blocks, fewer or more keys than queries, one or several heads;
    refused (None) where it does not apply."""
    torch.manual_seed(0)
    for batch, heads, length, keys, dim in ((2, 3, 37, 53, 32), (1, 2, 130, 64, 64), (3, 1, 5, 200, 32)):
        q, k, v = (torch.randn(batch, n, heads * dim) * 1.5 for n in (length, keys, keys))

        def split(t):  # (B, N, heads * d) -> (B, heads, N, d)
            return t.view(batch, -1, heads, dim).transpose(1, 2)

        exact = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        pytorch = torch.nn.functional.scaled_dot_product_attention(*(split(t.bfloat16()) for t in (q, k, v))).float()
        with torch.no_grad():
            ours = fused.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads)
        assert ours.shape == q.shape and ours.dtype == torch.bfloat16
        error, bound = (split(ours.float()) - exact).abs().max(), (pytorch - exact).abs().max()
        assert error <= bound * 1.5 + 1e-6, (batch, heads, length, keys, dim, float(error), float(bound))
        error, bound = (split(ours.float()) - exact).norm(), (pytorch - exact).norm()  # and overall as close
        assert error <= bound * 1.1, (batch, heads, length, keys, dim, float(error), float(bound))
    with torch.no_grad():
        assert fused.attention(q, k, v, heads) is None  # fp32
        assert fused.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads * 2) is None  # head size 16
    assert fused.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads) is None  # gradients enabled


def test_fused_kernel_that_cannot_build_leaves_pytorch_ops_in_place(monkeypatch, tmp_path):
    """No compiler (or a broken one): a clear error from build(), a warning and None from library(), and the head
    still trains (on PyTorch's ops)."""
    from textdiff.head import _norm_gelu

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TEXTDIFF_NATIVE_CACHE", str(tmp_path / "cache"))
    with pytest.raises((RuntimeError, OSError)):
        fused.build()
    fused.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="kernel unavailable"):
            assert fused.library() is None
        module = _norm_gelu(16)
        x = torch.randn(2, 16, 8, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        assert not fused.applies(x, module.weight)
        x.requires_grad_()
        module(x).float().sum().backward()
        assert x.grad is not None and module.weight.grad is not None
    finally:
        fused.library.cache_clear()  # the next caller builds (or finds) the real kernel again


def test_a_training_step_on_channels_last_features_equals_one_on_plain_features():
    """Training batches are channels-last: the head's logits and every parameter's gradient must not depend on it."""
    torch.manual_seed(0)
    head = FusionHead([12, 6, 3], text_dim=32, dim=16, strides=[4, 2, 1], upsample=[False, True, False])
    feats = [torch.randn(2, 12, 4, 4), torch.randn(2, 6, 8, 8), torch.randn(2, 3, 16, 16)]
    text = torch.randn(2, 5, 32)
    grads = []
    for batch in (feats, [f.contiguous(memory_format=torch.channels_last) for f in feats]):
        head.zero_grad()
        logits = head(batch, text, dihedral=(3, True))
        (logits * torch.arange(logits.numel()).reshape(logits.shape).sin()).sum().backward()
        grads.append([logits.detach()] + [p.grad.clone() for p in head.parameters()])
    for plain, channels_last in zip(*grads):
        torch.testing.assert_close(channels_last, plain, rtol=1e-4, atol=1e-5)


def test_rotate_flip_is_rot90_then_a_flip_keeps_the_layout_and_is_undone():
    from textdiff.head import VARIANTS, rotate_flip, unrotate_flip

    x = torch.randn(2, 3, 5, 7)
    for turns, flip in VARIANTS + [(5, True), (-1, False)]:
        expected = torch.rot90(x, turns, dims=(-2, -1))
        expected = torch.flip(expected, dims=(-1,)) if flip else expected
        assert torch.equal(rotate_flip(x, turns, flip), expected)
        assert torch.equal(unrotate_flip(rotate_flip(x, turns, flip), turns, flip), x)
        turned = rotate_flip(x.contiguous(memory_format=torch.channels_last), turns, flip)
        assert torch.equal(turned, expected) and turned.is_contiguous(memory_format=torch.channels_last)


def test_report_attention_knows_where_the_window_lies_only_when_there_is_a_report():
    torch.manual_seed(0)
    head = FusionHead([12, 6], text_dim=32, dim=16, strides=[4, 1], position=True).eval()
    feats, text = _features(), torch.randn(2, 5, 32)
    left, right = torch.tensor([[0.0, 0.0, 1.0, 0.5]] * 2), torch.tensor([[0.0, 0.5, 1.0, 1.0]] * 2)
    assert not torch.allclose(head(feats, text, box=left), head(feats, text, box=right), atol=1e-4)
    torch.testing.assert_close(head(feats, None, box=left), head(feats, None, box=right))  # no report: no effect
    torch.testing.assert_close(head(feats, text), head(feats, text, box=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)))


def test_positions_follow_every_flip_and_turn_back_to_the_original_image():
    from textdiff.head import _position_grid, rotate_flip
    from textdiff.train import VARIANTS

    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    original = _position_grid(whole, (1, 1, 4, 6), None, "cpu")
    for turns, flip in VARIANTS:
        shape = (1, 1, 6, 4) if turns % 2 else (1, 1, 4, 6)
        # features of a turned image, positions given in its frame: mapped back, they equal the turned original grid
        variant = _position_grid(whole, shape, None, "cpu", [(turns, flip)])
        torch.testing.assert_close(variant, rotate_flip(original, turns, flip))
        # the training augmentation (features turned inside the head) turns the grid with them the same way
        torch.testing.assert_close(_position_grid(whole, shape, (turns, flip), "cpu"), variant)


def test_padding_tokens_do_not_change_result():
    torch.manual_seed(0)
    head = FusionHead([12, 6], text_dim=32, dim=16, strides=[4, 1]).eval()
    feats = _features()
    text = torch.randn(2, 5, 32)
    padded = torch.cat([text, torch.randn(2, 7, 32)], dim=1)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, :5] = True
    torch.testing.assert_close(head(feats, text, torch.ones(2, 5, dtype=torch.bool)), head(feats, padded, mask),
                               rtol=1e-5, atol=1e-6)


# ----- model: tiling, save/load ---------------------------------------------------------------------------------------
def test_tiling_returns_input_size_and_matches_single_window(tiny_model):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    probs = tiny_model.predict_proba(image, "nuclei are dense")
    with torch.inference_mode():
        x = tiny_model.prepare(image)[None]
        tokens, mask = tiny_model.text_tokens(["nuclei are dense"])
        direct = torch.softmax(tiny_model.head_logits(tiny_model.features(x), tokens, mask)[0], 0)
    torch.testing.assert_close(probs, direct, rtol=1e-4, atol=1e-5)
    odd = rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)
    assert tiny_model.predict_proba(odd, None).shape == (2, 45, 70)
    tiny_model.config.scale = 0.5
    assert tiny_model.predict_proba(odd, "x").shape == (2, 45, 70)


def test_test_time_variants_make_inference_equivariant_to_every_flip_and_turn(tiny_model):
    """Averaged over the whole dihedral group, inference commutes with flipping/turning the image (the fixed noise
    and the backbone do not); a variant undone the wrong way round breaks this."""
    from textdiff.head import VARIANTS, rotate_flip

    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # one tile, no padding

    def predict(pixels):
        return tiny_model.predict_proba(np.ascontiguousarray(pixels), None)

    moved = [rotate_flip(torch.from_numpy(image).permute(2, 0, 1), *v).permute(1, 2, 0).numpy() for v in VARIANTS]
    single = predict(image)
    assert max((predict(m) - rotate_flip(single, *v)).abs().max() for m, v in zip(moved, VARIANTS)) > 1e-3
    tiny_model.use_test_time_variants(8)
    averaged = predict(image)
    for pixels, variant in zip(moved, VARIANTS):
        torch.testing.assert_close(predict(pixels), rotate_flip(averaged, *variant), rtol=0, atol=1e-5)
    odd = np.random.default_rng(2).integers(0, 255, (45, 70, 3), dtype=np.uint8)  # turns swap its sides
    assert tiny_model.predict_proba(odd, "dense nuclei").shape == (2, 45, 70)
    for bad in (0, 9):
        with pytest.raises(ValueError, match="test-time variants must be in 1..8"):
            tiny_model.use_test_time_variants(bad)


def test_images_larger_than_a_tile_go_in_several_tiles(tiny_model, monkeypatch):
    seen = []
    forward = tiny_model.features.forward
    monkeypatch.setattr(tiny_model.features, "forward", lambda x: seen.extend([tuple(x.shape[-2:])] * len(x)) or forward(x))
    image = np.random.default_rng(0).integers(0, 255, (150, 100, 3), dtype=np.uint8)
    assert tiny_model.predict_proba(image, None).shape == (2, 150, 100)
    assert set(seen) == {(64, 64)} and len(seen) >= 4  # tile = 64 in the fixture
    seen.clear()
    tiny_model.predict_proba(image[:58, :37], None)
    assert seen == [(58, 38)]  # one forward, padded only to the backbone's multiple (2 here)


def test_save_load_roundtrip(tiny_model, tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    before = tiny_model.predict_proba(image, "dense nuclei")
    tiny_model.save(tmp_path / "m")
    from textdiff.model import TextDiffModel

    loaded = TextDiffModel.load(tmp_path / "m", "cpu")
    torch.testing.assert_close(loaded.predict_proba(image, "dense nuclei"), before)
    assert len(list((tmp_path / "m").glob("head-*.safetensors"))) == 1
    for _ in range(3):  # republish: config points at the new file, only the previous weights are kept
        tiny_model.head.classifier.bias.data += 1
        tiny_model.save(tmp_path / "m")
    assert len(list((tmp_path / "m").glob("head-*.safetensors"))) == 2
    current = TextDiffModel.load(tmp_path / "m", "cpu")
    torch.testing.assert_close(current.head.classifier.bias, tiny_model.head.classifier.bias)


# ----- data -----------------------------------------------------------------------------------------------------------
def test_mask_normalisation():
    assert normalize_mask(np.array([[0, 255]], np.uint8)).tolist() == [[0, 1]]
    assert normalize_mask(np.array([[0, 1]], np.uint8)).tolist() == [[0, 1]]
    assert normalize_mask(np.array([[0.0, 1.0]], np.float32)).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="not a label map"):
        normalize_mask(np.array([[0, 7]], np.uint8))
    with pytest.raises(ValueError, match="non-integer"):
        normalize_mask(np.array([[0, 0.5]], np.float32))


def test_slicer_label_with_trailing_dimension(tmp_path):
    array = np.zeros((1, 20, 30), np.uint8)  # sitk (x=30, y=20, z=1): what Slicer saves for a 2D image
    array[0, 5:10, 5:10] = 1
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "l.nii.gz"))
    mask = read_mask(tmp_path / "l.nii.gz")
    assert mask.shape == (20, 30) and mask.sum() == 25


def test_read_lvit_monuseg_and_covid():
    need_shared()
    samples = read_lvit(SHARED / "monuseg" / "Val_Folder")
    assert len(samples) == 6 and all(s.mask.is_file() and s.report for s in samples)
    covid = read_lvit(SHARED / "covid-qu-ex" / "Train_Folder")
    assert covid[0].image.name == "covid_1.png" and covid[0].mask.name == "mask_covid_1.png"
    image = read_image(covid[0].image)
    assert image.array.shape == (256, 256, 1) and not image.is_volume


def test_volume_inference_keeps_geometry(tiny_model, tmp_path):
    need_shared()
    image = read_image(SHARED / "volumes" / "ct-3slice-liver" / "ct-3slice")
    assert image.is_volume
    label = tiny_model.predict(image, "liver")
    assert label.shape == image.array.shape
    with pytest.raises(ValueError, match="a volume's label cannot be written as .png"):
        write_label(label, image, tmp_path / "label.png")
    out = write_label(label, image, tmp_path / "label.nrrd")
    written, ref = sitk.ReadImage(str(out)), image.reference
    assert written.GetSize() == ref.GetSize()
    assert np.allclose(written.GetSpacing(), ref.GetSpacing())
    assert np.allclose(written.GetOrigin(), ref.GetOrigin())
    assert np.allclose(written.GetDirection(), ref.GetDirection())


def test_shipped_model_loads_with_its_own_backbone():
    """The shipped head was trained on the shipped backbone: same fingerprint, no mismatch warning."""
    import json
    import warnings

    from textdiff.model import SHIPPED_MODEL, TextDiffModel

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = TextDiffModel.load("default", "cpu")
    stored = json.loads((SHIPPED_MODEL / "config.json").read_text())
    assert model.config.backbone_fingerprint == stored["backbone_fingerprint"]
    assert model.companion is not None and stored["companion"]  # the monuseg recipe's U-Net beside the head
    label = model.predict(read_image_array(np.zeros((64, 80, 3), np.uint8)))
    assert label.shape == (64, 80)


def read_image_array(array):
    from textdiff.data import Image

    return Image(array, sitk.GetImageFromArray(array, isVector=True), False)


def test_upsampler_input_is_what_the_upsampler_turns_into_its_output():
    unet = tiny_unet_model()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    blocks = default_blocks(unet)  # (0, 1): unit 1 is up block 0's upsampler
    name, upsampler = decoder_units(unet)[blocks[-1]]
    assert name.endswith("upsamplers.0")
    after = DiffusionFeatures(unet, blocks, precision="fp32")
    before = DiffusionFeatures(unet, blocks, precision="fp32", upsampler_input=True)
    assert before.spec().upsample == (False, True) and after.spec().upsample == (False, False)
    assert before.spec().strides[-1] == 2 * after.spec().strides[-1]
    pre, post = before(x), after(x)
    torch.testing.assert_close(pre[0], post[0])
    steps, width = len(before.steps), pre[-1].shape[1] // len(before.steps)
    with torch.no_grad():
        for s in range(steps):  # per step, the upsampler maps the hooked input onto the output it replaces
            chunk = slice(s * width, (s + 1) * width)
            torch.testing.assert_close(upsampler(pre[-1][:, chunk]), post[-1][:, chunk], rtol=1e-4, atol=1e-5)
    for f, r in zip(pre, naive_features(unet, x, blocks, upsampler_input=True)):  # fast path = reference loop
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-5)
    calls = []
    upsampler.register_forward_hook(lambda *a: calls.append(1))
    before(x)
    assert calls == []  # the early exit stops before the upsampling convolution
    after(x)
    assert calls == [1]


def test_learned_upsampling_head_and_its_augmentation():
    from textdiff.head import rotate_flip

    torch.manual_seed(0)
    head = FusionHead([12, 6], text_dim=32, dim=16, strides=[4, 2], upsample=[False, True]).eval()
    assert head.fine == [False, True]  # the upsampler's input joins at full resolution
    feats, text = [torch.randn(2, 12, 4, 4), torch.randn(2, 6, 8, 8)], torch.randn(2, 5, 32)
    assert head(feats, text).shape == (2, 2, 16, 16)
    for turns, flip in ((1, False), (2, True), (3, True)):
        moved = head([rotate_flip(f, turns, flip) for f in feats], text)
        torch.testing.assert_close(head(feats, text, dihedral=(turns, flip)), moved,
                                   rtol=1e-4, atol=1e-5)


def test_subpixel_head_has_no_full_resolution_map_and_turns_its_input_exactly():
    from textdiff.head import rotate_flip

    torch.manual_seed(0)
    # coarse scale, an upsampler's input (stride 2, would join at 1), the image (stride 1)
    head = FusionHead([12, 6, 3], text_dim=32, dim=16, strides=[4, 2, 1], upsample=[False, True, False],
                      subpixel=True).eval()
    feats = [torch.randn(2, 12, 4, 4), torch.randn(2, 6, 8, 8), torch.randn(2, 3, 16, 16)]
    text = torch.randn(2, 5, 32)
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]) if o.dim() == 4 else None)
             for m in head.modules() if not isinstance(m, (FusionHead, torch.nn.Sequential))]
    assert head(feats, text).shape == (2, 2, 16, 16)
    for hook in hooks:
        hook.remove()
    assert max(sizes[:-1]) == 8 and sizes[-1] == 16  # only the classifier's 2x2 unfolding is full size
    for turns, flip in ((1, False), (2, True), (3, True)):
        moved = head([rotate_flip(f, turns, flip) for f in feats], text)
        torch.testing.assert_close(head(feats, text, dihedral=(turns, flip)), moved, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(moved, head(feats, text), atol=1e-3)
    # channels-last input (what training batches are) gives the same logits
    cl = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    torch.testing.assert_close(head(cl, text, dihedral=(1, True)), head(feats, text, dihedral=(1, True)),
                               rtol=1e-4, atol=1e-5)
    # nothing at full resolution to fold: the plain head, and the config says so
    assert not FusionHead([12, 6], text_dim=32, dim=16, strides=[4, 2], subpixel=True).subpixel
    # the plain head keeps its full-resolution stage
    assert FusionHead([12, 6, 3], text_dim=32, dim=16, strides=[4, 2, 1], upsample=[False, True, False]).fine == \
        [False, True, True]


def test_a_model_config_of_another_format_is_refused_with_the_reason(tiny_model, tmp_path):
    from textdiff.model import FORMAT, ModelConfig, TextDiffModel

    tiny_model.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["format"] == FORMAT and ModelConfig.from_dict(saved) == tiny_model.config
    for other in ({k: v for k, v in saved.items() if k != "format"}, saved | {"format": FORMAT + 1}):
        (tmp_path / "m" / "config.json").write_text(json.dumps(other))
        with pytest.raises(ValueError, match=f"this textdiff reads format {FORMAT}.*train the head again"):
            TextDiffModel.load(tmp_path / "m", "cpu")


def test_backbone_fingerprint_is_exact_and_independent_of_the_thread_count():
    """The fingerprint keys the feature cache and flags a head loaded on another backbone: it must be the same on
    every machine (a float sum of the weights changes with the thread count) and see any change of any weight."""
    from diffusers import UNet2DModel

    from textdiff.backbone import weights_digest

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 128),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=32)
    with torch.no_grad():  # values whose float32 sum depends on the order it is taken in
        for p in unet.parameters():
            scales = torch.logspace(-4, 4, p.numel())[torch.randperm(p.numel())].reshape(p.shape)
            p.copy_(torch.randn_like(p) * scales)

    def digest(threads: int) -> str:
        unet.__dict__.pop("_textdiff_digest", None)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return weights_digest(unet).hexdigest()
        finally:
            torch.set_num_threads(before)

    first = digest(1)
    assert digest(2) == first == digest(4)
    weight = max(unet.parameters(), key=lambda p: p.numel())
    with torch.no_grad():
        weight.view(-1)[1] += 1e-3  # not one of every 4096th element
    assert digest(1) != first


@pytest.mark.skipif(not fused._compiler() or not fused.platform_supported(),
                    reason="no C compiler, or not x86-64 Linux with PyTorch's OpenMP")
def test_fused_kernel_builds_once_into_a_private_folder_only(monkeypatch, tmp_path):
    """The kernel is built into the user's cache folder and found there afterwards (no second compile); a folder or
    library that others can write is refused (no shared temp-folder fallback), and the PyTorch ops stay in place."""
    import os

    monkeypatch.setenv("TEXTDIFF_NATIVE_CACHE", str(tmp_path / "cache"))
    first = fused.build()
    assert first.parent == tmp_path / "cache" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert fused.build() == first and first.stat().st_mtime_ns == stamp
    os.chmod(first, 0o777)  # a planted or loosened library is not loaded
    with pytest.raises(RuntimeError, match="not private"):
        fused.build()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    monkeypatch.setenv("TEXTDIFF_NATIVE_CACHE", str(shared))
    with pytest.raises(RuntimeError, match="not private"):
        fused.build()
    assert not list(shared.iterdir())
    fused.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="not private"):
            assert fused.library() is None
    finally:
        fused.library.cache_clear()


def test_backbone_fast_path_only_on_tested_diffusers(tiny_unet_dir, monkeypatch):
    """The fast path re-implements diffusers' ResnetBlock2D forward: the installed diffusers must be a tested one
    (this fails on an unknown version, to be checked and added to TESTED_DIFFUSERS), and on another version the
    backbone keeps diffusers' own classes, with a warning."""
    import diffusers
    from diffusers.models.resnet import ResnetBlock2D

    from textdiff.accel import backbone as fast
    from textdiff.backbone import load_unet

    assert fast.diffusers_tested(), f"diffusers {diffusers.__version__} is not in {fast.TESTED_DIFFUSERS}"
    monkeypatch.setattr(fast, "TESTED_DIFFUSERS", ((0, 1), (0, 2)))
    unet = load_unet(str(tiny_unet_dir))
    with pytest.warns(UserWarning, match="outside the versions"):
        fast.use_fast_path(unet)
    assert any(type(m) is ResnetBlock2D for m in unet.modules())
    monkeypatch.undo()
    fast.use_fast_path(unet)
    assert not any(type(m) is ResnetBlock2D for m in unet.modules())
