"""DDPM pretraining of a backbone on unlabeled images (epsilon prediction, linear betas, EMA), DDP-ready.

Runs as is under ``torchrun --nproc_per_node N`` (gloo on CPU, NCCL on GPU). Checkpoints to
``OUT/checkpoint.pt`` (tensors and plain values only, read back with ``weights_only=True``) and resumes from it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed, preprocess
from .backbone import _autocast, resolve_precision
from .data import IMAGE_SUFFIXES, ImageReadError, read_image

# A CPU-sized default: 4 levels, attention only at the coarsest, 7 M parameters; features of one 256x256 window at
# 3 steps take ~1 s on 2 CPU cores in bf16.
SMALL_UNET = dict(
    in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 128, 192),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    attention_head_dim=32, norm_num_groups=16)


def unet_config(channels: list[int]) -> dict:
    """SMALL_UNET's shape (attention at the coarsest level only) with other widths."""
    groups = math.gcd(*channels) if len(channels) > 1 else channels[0]
    return dict(SMALL_UNET, block_out_channels=tuple(channels), norm_num_groups=min(16, groups),
                attention_head_dim=min(32, channels[-1]),
                down_block_types=("DownBlock2D",) * (len(channels) - 1) + ("AttnDownBlock2D",),
                up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (len(channels) - 1))


@dataclass
class PretrainConfig:
    images: list[str]  # folders; each is sampled equally often, whatever its number of images
    out: str
    size: int = 256
    scale: list[float] = field(default_factory=lambda: [1.0])  # one for all folders, or one per folder
    steps: int = 20000
    batch_size: int = 8
    lr: float = 2e-4
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 200
    minutes: float | None = None  # stop (after checkpointing) when this much wall time has passed in this run
    precision: str = "auto"
    unet: dict = field(default_factory=lambda: dict(SMALL_UNET))
    init: str | None = None  # start from this backbone's weights and architecture (folder, hub id or "default")


def find_images(folders: list[str]) -> list[Path]:
    """Image files under the folders; ``labels``/``labelcol`` subfolders (MONAI Label / LViT masks) are skipped."""
    found = []
    for folder in folders:
        root = Path(folder)
        if root.is_file():
            found.append(root)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"{folder} does not exist")
        for path in sorted(root.rglob("*")):
            parts = set(path.relative_to(root).parts[:-1])
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not parts & {"labels", "labelcol"}:
                found.append(path)
    if not found:
        raise ValueError(f"no images found under {folders}")
    return found


def load_pool(paths: list[Path], in_channels: int, scale: float, size: int) -> list[torch.Tensor]:
    """All images at the working scale as uint8-range tensors in [-1, 1] (fp16 to keep the pool small)."""
    pool = []
    for path in paths:
        try:
            image = read_image(path)
        except ImageReadError:
            continue
        planes = image.array if image.is_volume else [image.array]
        for plane in planes:
            x = preprocess.prepare(plane, in_channels, scale, preprocess.intensity_range(image.array))
            if min(x.shape[-2:]) < size:
                x = F.interpolate(x[None], scale_factor=size / min(x.shape[-2:]) + 1e-6, mode="bilinear")[0]
            pool.append(x.half())
    return pool


def random_crops(pools, size, batch, generator) -> torch.Tensor:
    out = []
    for _ in range(batch):
        pool = pools[int(torch.randint(len(pools), (1,), generator=generator))]
        x = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        i = int(torch.randint(x.shape[-2] - size + 1, (1,), generator=generator))
        j = int(torch.randint(x.shape[-1] - size + 1, (1,), generator=generator))
        crop = x[:, i:i + size, j:j + size].float()
        turns = int(torch.randint(4, (1,), generator=generator))
        crop = torch.rot90(crop, turns, dims=(-2, -1))
        out.append(torch.flip(crop, dims=(-1,)) if torch.rand(1, generator=generator) < 0.5 else crop)
    return torch.stack(out)


def ema_with_warmup(decay: float):
    """EMA whose decay grows as min(decay, (1 + n) / (10 + n)) over its first updates. A plain 0.999 EMA of a short
    CPU run is mostly its random init (0.999^1200 = 30 % after 1200 steps), so the backbone it saves is barely
    trained; with the warm-up it follows the weights early on and averages over ~1000 steps later."""
    def update(ema_params, params, num_averaged):
        n = float(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))
    return update


def pretrain(config: PretrainConfig, resume: bool = False, progress: bool = True) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    rank, world, device = distributed.setup()
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)  # the init too is part of the recipe (DDP copies rank 0's anyway)
    start_from = None
    if config.init:  # adapt an existing backbone: its architecture replaces config.unet
        from .backbone import load_unet, weights_digest

        start_from = load_unet(None if config.init == "default" else config.init)
        config.unet = {k: v for k, v in start_from.config.items() if not k.startswith("_") and k != "sample_size"}
    unet = UNet2DModel(sample_size=config.size, **config.unet)
    if start_from is not None:
        unet.load_state_dict(start_from.state_dict())
        init_digest = weights_digest(start_from).hexdigest()[:12]
    unet = unet.to(device)
    ema = torch.optim.swa_utils.AveragedModel(unet, multi_avg_fn=ema_with_warmup(config.ema_decay))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    step, wall_before = 0, 0.0
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, wall_before = int(state["step"]), float(state["wall_s"])
    model = torch.nn.parallel.DistributedDataParallel(unet) if world > 1 else unet

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    scales = config.scale if len(config.scale) == len(config.images) else config.scale[:1] * len(config.images)
    if len(config.scale) not in (1, len(config.images)):
        raise ValueError("give one --scale, or one per --images folder")
    pools = [load_pool(find_images([folder]), unet.config.in_channels, scale, config.size)
             for folder, scale in zip(config.images, scales)]
    if not all(pools):
        raise ValueError("a folder given to --images holds no readable image")
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank + step)  # new stream after a resume
    noise_generator = generator
    if device.type == "cuda":
        # crops and noise made on the CPU starve a GPU (~5 steps/s at batch 128 on an H200): keep the pool on the
        # GPU when it fits easily and draw the noise there
        pool_bytes = sum(x.numel() * x.element_size() for pool in pools for x in pool)
        if pool_bytes < 0.25 * torch.cuda.mem_get_info(device)[0]:
            pools = [[x.to(device) for x in pool] for pool in pools]
        noise_generator = torch.Generator(device).manual_seed(config.seed * 1000 + rank + step)
    precision = resolve_precision(config.precision, device)
    started = time.time()

    def save(final: bool):
        if rank != 0:
            return
        state = {"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "wall_s": wall_before + time.time() - started}
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, checkpoint_path)
        ema.module.save_pretrained(out)  # the EMA weights are the backbone
        started_from = {"init_digest": init_digest} if start_from is not None else {}
        recipe = asdict(config) | started_from | {
            "ema_warmup": True, "step": step, "world_size": world, "device": str(device), "precision": precision,
            "planes": [len(p) for p in pools], "wall_s": round(wall_before + time.time() - started, 1), "final": final}
        (out / "recipe.json").write_text(json.dumps(recipe, indent=2))

    bar = tqdm(total=config.steps, initial=step, desc="pretrain", unit="step", disable=not progress or rank != 0)
    while step < config.steps:
        x0 = random_crops(pools, config.size, config.batch_size, generator).to(device)
        noise = torch.randn(x0.shape, generator=noise_generator, device=device)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=generator).to(device)
        with _autocast(device, precision):
            prediction = model(scheduler.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update_parameters(unet)
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        out_of_time = config.minutes is not None and time.time() - started > config.minutes * 60
        if world > 1:  # every rank must stop at the same step
            flag = torch.tensor([float(out_of_time)], device=device)
            dist.all_reduce(flag)
            out_of_time = bool(flag.item())
        if step % config.checkpoint_every == 0 or out_of_time:
            save(final=False)
        if out_of_time:
            break
    bar.close()
    save(final=step >= config.steps)
    distributed.teardown()
    return out


BACKBONE_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "recipe.json")


def publish_backbone(work: str | Path, versions: str | Path) -> Path:
    """Copy the backbone that ``pretrain`` keeps rewriting in ``work`` into a new, never-changed folder
    ``versions/NNNN`` (written aside, then renamed into place: readers see all of it or nothing). Heads name that
    folder, so a later pretraining never changes the features a published head reads."""
    work, versions = Path(work), Path(versions)
    versions.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=versions))
    try:
        for name in BACKBONE_FILES:
            shutil.copy2(work / name, staging / name)
        while True:
            target = versions / f"{len(published_backbones(versions)) + 1:04d}"
            try:
                os.rename(staging, target)  # fails if another publisher took the number: take the next
                return target
            except OSError:
                if not target.exists():
                    raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def published_backbones(versions: str | Path) -> list[Path]:
    """The complete versions in ``versions``, oldest first."""
    folder = Path(versions)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.isdigit() and (p / "config.json").is_file())
