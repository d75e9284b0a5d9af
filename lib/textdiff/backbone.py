"""Frozen diffusion backbone: a diffusers ``UNet2DModel`` seen as a multi-scale feature extractor.

Decoder numbering ("blocks")
----------------------------
The decoder is numbered exactly like OpenAI guided-diffusion's ``output_blocks``: each up block contributes
``layers_per_block + 1`` units, unit *j* being the last module of the j-th (resnet [+ attention] [+ upsampler]) group,
i.e. ``upsamplers[0]`` for the last group of a block that upsamples, else ``attentions[j]`` if the block has
attention, else ``resnets[j]``. So ADM indices from the paper (MoNuSeg 6,8,12,16; QaTa 4,6,8,12) can be given as they
are to a converted ADM checkpoint. ``decoder_units(unet)`` lists them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import priority
from .accel.backbone import FAST_PATH, use_fast_path

DEFAULT_STEPS = (50, 150, 250)
DEFAULT_NOISE_SEED = 0
SHIPPED_BACKBONES = Path(__file__).parent / "weights"
DEFAULT_BACKBONE = "default"
SHIPPED_DEFAULT = "he-cxr-h200"  # the folder "default" names (its recipe.json says how it was pretrained)
RANDOM_BACKBONE = "random"  # "random" or "random:FOLDER": same architecture, random initialisation


class BackboneLoadError(RuntimeError):
    pass


def _is_unet_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name") == "UNet2DModel"
    except (OSError, ValueError):
        return False


def _resolve_shipped(name: str) -> Path | None:
    if "/" in name or os.sep in name:
        return None
    folder = SHIPPED_BACKBONES / (SHIPPED_DEFAULT if name == DEFAULT_BACKBONE else name)
    return folder if _is_unet_folder(folder) else None


def load_unet(source: str | os.PathLike | None = None):
    """Load a UNet2DModel from the shipped default, a local ``save_pretrained`` folder or a hub id."""
    from diffusers import UNet2DModel
    from diffusers.utils import is_accelerate_available

    # diffusers asks for low_cpu_mem_usage by default and warns at every load when accelerate (not a dependency:
    # these backbones are small or loaded once) is missing
    options = {"low_cpu_mem_usage": is_accelerate_available()}
    source = str(source or DEFAULT_BACKBONE)
    if source == RANDOM_BACKBONE or source.startswith(RANDOM_BACKBONE + ":"):
        # the architecture of the shipped (or a given) backbone with seeded random weights: the ablation baseline
        template = load_unet(source.partition(":")[2] or DEFAULT_BACKBONE)
        torch.manual_seed(0)
        return UNet2DModel.from_config(template.config)
    shipped = _resolve_shipped(source)
    path = shipped or Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BackboneLoadError(f"backbone folder {path} has no config.json "
                                    "(expected a UNet2DModel save_pretrained folder)")
        return UNet2DModel.from_pretrained(str(path), **options)
    if source == DEFAULT_BACKBONE:
        raise BackboneLoadError(
            f"the shipped default backbone is missing from {SHIPPED_BACKBONES}; pass --backbone FOLDER "
            "or create one with `textdiff pretrain`")
    if not _looks_like_hub_id(source):
        raise BackboneLoadError(f"backbone folder {source!r} does not exist (and it is not a hub id like owner/name)")
    from .hub import hub_options

    online, offline = hub_options()  # offline: only the local hub cache, without minutes of retries
    try:
        return UNet2DModel.from_pretrained(source, subfolder=None, **options, **online)
    except Exception as error:  # hub unreachable, repo missing, not a UNet2DModel ...
        try:  # repos like google/ddpm-* keep the UNet in a subfolder
            return UNet2DModel.from_pretrained(source, subfolder="unet", **options, **online)
        except Exception:
            pass
        why = f"the model hub is not reachable: {offline}, and the local hub cache does not hold it" if offline \
            else f"the model hub did not provide it ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        raise BackboneLoadError(
            f"could not load backbone {source!r}: it is not a local folder and {why}. On a machine with internet run "
            f"`python -c \"from diffusers import UNet2DModel; UNet2DModel.from_pretrained('{source}')"
            f".save_pretrained('my_backbone')\"`, copy the folder here and pass --backbone my_backbone; "
            "or convert an OpenAI checkpoint with `textdiff convert-adm`.") from None


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) <= 2 and all(parts) and not source.startswith((".", "~", "/"))


def decoder_units(unet) -> list[tuple[str, nn.Module]]:
    """The decoder's units in ADM ``output_blocks`` order, as (qualified name, module)."""
    units = []
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        attentions = getattr(block, "attentions", None)
        upsamplers = getattr(block, "upsamplers", None)
        for j in range(n):
            if j == n - 1 and upsamplers:
                units.append((f"up_blocks.{i}.upsamplers.0", upsamplers[0]))
            elif attentions is not None and len(attentions) == n:
                units.append((f"up_blocks.{i}.attentions.{j}", attentions[j]))
            else:
                units.append((f"up_blocks.{i}.resnets.{j}", block.resnets[j]))
    return units


def default_blocks(unet, max_levels: int = 4) -> tuple[int, ...]:
    """One unit per resolution, finest ``max_levels``: the unit before each upsampler, and for full resolution the
    last upsampler's output. Taking full resolution there rather than after the last decoder level lets the early
    exit skip that level (the costliest per pixel): ~30% less backbone compute for the same scales (measured on
    MoNuSeg: Val Dice within noise of taking the final unit).

    Works for any UNet2DModel: it only relies on how many resnets each up block has and which ones upsample.
    """
    blocks, index, last_upsampler = [], 0, None
    for block in unet.up_blocks:
        n = len(block.resnets)
        last = index + n - 1
        if getattr(block, "upsamplers", None):
            blocks.append(last - 1 if n > 1 else last)
            last_upsampler = last
        index += n
    blocks.append(last_upsampler if last_upsampler is not None else index - 1)
    return tuple(sorted(set(blocks))[-max_levels:])


class _StopForward(Exception):
    """Raised by the deepest hook so nothing after it is computed."""


@dataclass(frozen=True)
class FeatureSpec:
    blocks: tuple[int, ...]
    channels: tuple[int, ...]  # per block, after concatenation over steps
    strides: tuple[int, ...]  # input size / feature size, per block
    upsample: tuple[bool, ...] = ()  # per block: an upsampler's input, which the head upsamples 2x itself


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    raise ValueError(f"unknown precision {precision!r} (fp32, bf16, fp16, auto)")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # CPUs with native bf16 (AVX512-BF16 / AMX) run it ~2x faster; elsewhere bf16 is emulated and slower.
    return "bf16" if cpu_has_bf16() else "fp32"


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class DiffusionFeatures(nn.Module):
    """Noise an image at a few steps with one fixed noise and return the hooked decoder activations.

    ``forward(x)`` takes images in [-1, 1], shape (B, C, H, W) with H, W divisible by the UNet's total
    downsampling, and returns one tensor per hooked block, shape (B, len(steps) * C_block, h, w), step-major,
    channels-last, in the type the backbone computed it in (bf16 under bf16 autocast; callers cast as they need).

    ``upsampler_input``: a hooked unit that ends with an upsampler gives the upsampler's *input* instead of its
    output. The output (nearest 2x + a 3x3 conv) holds no information its input lacks, at 4x the values: the head
    learns the 2x upsampling itself (``FeatureSpec.upsample``), the backbone stops before its costliest
    full-resolution convolution, and a cached feature map is 4x smaller.
    """

    def __init__(self, unet, blocks=None, steps=DEFAULT_STEPS, noise_seed=DEFAULT_NOISE_SEED,
                 precision: str = "fp32", early_exit: bool = True, include_image: bool = False,
                 upsampler_input: bool = False, fast_path: bool = True):
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = unet.eval().requires_grad_(False)
        self.fast_path = fast_path  # False: diffusers' own code throughout (the naive reference loop)
        if fast_path:
            use_fast_path(unet)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
        self.units = decoder_units(unet)
        self.blocks = tuple(int(b) for b in (blocks if blocks is not None else default_blocks(unet)))
        if not self.blocks:
            raise ValueError("at least one decoder block must be hooked")
        for b in self.blocks:
            if not 0 <= b < len(self.units):
                raise ValueError(f"decoder block {b} does not exist: this UNet has blocks 0..{len(self.units) - 1}")
        self.steps = tuple(int(t) for t in steps)
        if not self.steps or any(not 0 <= t < 1000 for t in self.steps):
            raise ValueError(f"diffusion steps must be in [0, 999], got {self.steps}")
        self.noise_seed = int(noise_seed)
        self.precision = precision
        self.early_exit = early_exit
        self.include_image = include_image  # append the clean input as one more full-resolution map
        self.upsampler_input = upsampler_input
        self.upsample = tuple(upsampler_input and self.units[b][0].endswith("upsamplers.0") for b in self.blocks)
        self._noise: dict[tuple, torch.Tensor] = {}

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def multiple(self) -> int:
        """Input sizes must be divisible by this (the UNet's total downsampling)."""
        return 2 ** sum(1 for b in self.unet.down_blocks if getattr(b, "downsamplers", None))

    def noise(self, shape, device) -> torch.Tensor:
        """One fixed noise per (C, H, W), shared by all steps and all images (the paper's recipe)."""
        key = (tuple(shape), str(device))
        if key not in self._noise:
            generator = torch.Generator().manual_seed(self.noise_seed)
            self._noise[key] = torch.randn(tuple(shape), generator=generator).to(device)
        return self._noise[key]

    def spec(self, size: int = 64) -> FeatureSpec:
        size = max(size, self.multiple)
        x = torch.zeros(1, self.in_channels, size, size, device=self.device)
        feats = self.forward(x)
        return FeatureSpec(self.blocks, tuple(f.shape[1] for f in feats), tuple(size // f.shape[-1] for f in feats),
                           self.upsample + ((False,) if self.include_image else ()))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def fingerprint(self) -> str:
        """Hash of everything that shapes the features (weights, blocks, steps, noise) for cache keys."""
        digest = weights_digest(self.unet).copy()
        fields = [self.blocks, self.steps, self.noise_seed, self.precision, self.include_image]
        fields += [self.upsample] if any(self.upsample) else []  # fingerprints of models hooking outputs unchanged
        digest.update(json.dumps(fields).encode())
        return digest.hexdigest()[:16]

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) images, got {tuple(x.shape)}")
        m = self.multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by {m} for this backbone")
        device = self.device
        x = x.to(device, torch.float32)
        batch, steps = x.shape[0], len(self.steps)
        noise = self.noise(x.shape[1:], device)
        t = torch.tensor(self.steps, device=device).repeat(batch)  # image-major: (b0t0, b0t1, ..., b1t0, ...)
        x_t = self.scheduler.add_noise(x.repeat_interleave(steps, 0), noise.expand(batch * steps, -1, -1, -1), t)
        x_t = x_t.contiguous(memory_format=torch.channels_last)

        captured: dict[int, torch.Tensor] = {}
        deepest = max(self.blocks)
        handles = []
        for b, before_upsampling in zip(self.blocks, self.upsample):
            def hook(_module, inputs, output=None, b=b):
                value = inputs[0] if output is None else output
                captured[b] = value[0] if isinstance(value, tuple) else value
                if self.early_exit and b == deepest:
                    raise _StopForward
            module = self.units[b][1]
            register = module.register_forward_pre_hook if before_upsampling else module.register_forward_hook
            handles.append(register(hook))
        if priority.yielding():  # a background pass gives way to requests before each ResNet block, attention and
            # resampler of the UNet (a whole up block took ~0.7 s in fp32 on a 2-core CPU: that long a request waited)
            handles += [unit.register_forward_pre_hook(lambda *_: priority.yield_point())
                        for unit in self.unet.modules() if type(unit).__name__ in YIELD_BEFORE]
        fast_token = FAST_PATH.set(self.fast_path)
        try:
            with _autocast(device, resolve_precision(self.precision, device)):
                self.unet(x_t, t)
        except _StopForward:
            pass
        finally:
            FAST_PATH.reset(fast_token)
            for h in handles:
                h.remove()
        out = []
        for b in self.blocks:
            f = captured[b]  # (batch * steps, C, h, w), image-major; channels-last from the convolutions
            n, c, h, w = f.shape
            # steps side by side along channels (step-major), channels-last: one pass moving whole pixel vectors
            # (a plain fp32 copy took ~3x as long, ~6 % of a forward: two passes, one a transposition)
            pixels = f.permute(0, 2, 3, 1).reshape(batch, steps, h, w, c).permute(0, 2, 3, 1, 4).contiguous()
            out.append(pixels.view(batch, h, w, steps * c).permute(0, 3, 1, 2))
        if self.include_image:
            out.append(x)
        return out


YIELD_BEFORE = {"ResnetBlock2D", "FrozenResnetBlock2D", "Attention", "Downsample2D", "Upsample2D"}


def weights_digest(unet):
    """Digest of a frozen UNet's weights, computed once per module (the shared backbone is rebuilt into a new model
    at every publish; hashing a large checkpoint each time would stall the server)."""
    cached = getattr(unet, "_textdiff_digest", None)
    if cached is None:
        # every byte of every weight: exact, and the same on every machine (a float sum, as before, changed with
        # the thread count); ~30 ms for the shipped backbone, ~1 s for ADM-256
        digest = hashlib.sha256()
        for name, tensor in sorted(unet.state_dict().items()):
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        cached = digest
        unet._textdiff_digest = cached  # frozen: requires_grad is off and nothing writes to it
    return cached  # a hashlib object: callers .copy() it before adding their own fields


def naive_features(unet, x: torch.Tensor, blocks, steps=DEFAULT_STEPS, noise_seed=DEFAULT_NOISE_SEED,
                   upsampler_input: bool = False) -> list[torch.Tensor]:
    """Reference loop (one full fp32 forward per step, hooks, no early exit): for tests and the benchmark."""
    per_step = [DiffusionFeatures(unet, blocks, (t,), noise_seed, "fp32", early_exit=False,
                                  upsampler_input=upsampler_input, fast_path=False)(x) for t in steps]
    return [torch.cat([p[i] for p in per_step], dim=1) for i in range(len(per_step[0]))]
