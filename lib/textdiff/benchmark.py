"""``textdiff benchmark``: speed and memory ratios, all measured in one run on one machine and one backbone.

- extract: the naive reference loop (one full fp32 forward per step, hooks, no early exit) against the engine's
  path (all steps in one batch, early exit, inference_mode, bf16/fp16 autocast where supported), on the same
  windows; also the largest relative difference of the features (Frobenius norm, per block).
- train: the reference few-shot loop (features re-extracted every epoch, batch 1, fp32) against ``train()``
  (cached fp16 features, batches, bf16 head) for the same epochs and images. Every epoch of either loop repeats the
  same work, so both are measured on part of the run and totalled for ``epochs``: the reference loop on
  ``reference_steps`` steps after an untimed warm-up step; the fast path runs ``measured_epochs`` epochs for real
  (feature extraction included, in a child process whose peak RSS is reported) and adds, for the remaining epochs,
  the mean time of its measured epochs after the first (the first also warms up oneDNN's kernels and the heap: ~1 s
  slower; it is counted in the total as it ran, as the reference loop's warm-up step is left out). The ratio over the
  measured epochs alone is reported too.
- infer: median wall time of REST ``POST /infer`` of one 1000x1000 H&E tile on a warm in-process server, and of a
  click round on the same tile (``textdiff_interactive``, the served model) after the first.
- adm (only when asked, ``--adm``): 256x256 windows per second of the engine's extraction on the full ADM-256
  layout (the paper's backbone, random weights built from the converter's config: no checkpoint needed) with the
  paper's MoNuSeg blocks, against the physical limit: the device's peak bf16/fp16 rate over 3 x 2.24 TFLOP per
  window. The peak is both the datasheet value (known GPUs) and a measured large matmul.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from .backbone import DiffusionFeatures, naive_features, resolve_precision
from .data import Sample, read_image, read_lvit
from .model import CONFIG_NAME, ModelConfig, TextDiffModel, resolve_model_dir
from .priority import LINGER_S

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "monuseg"
DEFAULT_POOL_DATA = DEFAULT_DATA.parent / "covid-qu-ex" / "Train_Folder"


def _windows(samples: list[Sample], model: TextDiffModel, count: int) -> torch.Tensor:
    crops = []
    window = model.config.window
    for sample in samples:
        x = model.prepare(read_image(sample.image).array)
        for i in range(0, x.shape[-2] - window + 1, window):
            for j in range(0, x.shape[-1] - window + 1, window):
                crops.append(x[:, i:i + window, j:j + window])
                if len(crops) == count:
                    return torch.stack(crops)
    return torch.stack(crops)


def bench_extract(model: TextDiffModel, windows: torch.Tensor, repeats: int = 2) -> dict:
    unet, c = model.features.unet, model.config
    fast = DiffusionFeatures(unet, c.blocks, c.steps, c.noise_seed, precision=c.precision,
                             upsampler_input=c.upsampler_input)
    fast(windows[:1])  # warm-up (allocator, autocast caches)
    naive_features(unet, windows[:1], c.blocks, c.steps, c.noise_seed, c.upsampler_input)

    def timed(fn):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for k in range(windows.shape[0]):
                out = fn(windows[k:k + 1])
            best = min(best, time.perf_counter() - start)
        return best, out

    naive_s, _ = timed(lambda x: naive_features(unet, x, c.blocks, c.steps, c.noise_seed, c.upsampler_input))
    fast_s, _ = timed(fast)
    diffs = []
    for k in range(windows.shape[0]):
        a = naive_features(unet, windows[k:k + 1], c.blocks, c.steps, c.noise_seed, c.upsampler_input)
        b = fast(windows[k:k + 1])
        diffs += [float((x - y).norm() / x.norm()) for x, y in zip(a, b)]
    n = windows.shape[0]
    naive_flops = _flops(lambda: naive_features(unet, windows[:1], c.blocks, c.steps, c.noise_seed,
                                                c.upsampler_input))
    fast_flops = _flops(lambda: fast(windows[:1]))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(c.precision, model.device),
                                                               torch.float32)
    peak = measured_peak_tflops(model.device, dtype) * 1e12
    return {"extract_naive_s_per_window": naive_s / n, "extract_fast_s_per_window": fast_s / n,
            "extract_speedup": naive_s / fast_s, "feature_max_rel_diff": max(diffs),
            "precision": resolve_precision(c.precision, model.device),
            # what the early exit saves (the rest of the speed-up is precision and batching): with it the time
            # ratio splits into work skipped x speed of the work done
            "extract_flop_ratio": naive_flops / fast_flops,
            "extract_naive_gflops_per_s": naive_flops / 1e9 / (naive_s / n),
            "extract_fast_gflops_per_s": fast_flops / 1e9 / (fast_s / n),
            # the speed-up if the fast path's work ran at this device's large-matmul peak: no implementation of
            # these techniques on this device and backbone gets past it
            "extract_peak_tflops": peak / 1e12, "extract_speedup_bound": (naive_s / n) / (fast_flops / peak)}


ADM_PAPER_BLOCKS = (6, 8, 12, 16)  # MoNuSeg, in ADM output_blocks numbering
# dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; matched by name, longest first
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4,
                         "A100": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0}


def datasheet_peak_tflops(device_name: str) -> float | None:
    for key in sorted(DATASHEET_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return DATASHEET_BF16_TFLOPS[key]
    return None


def cpu_name() -> str:
    """The CPU's model name (timings differ by 2-3x between CPUs with and without native bf16)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best rate of a large square matmul: what this device's matrix units really deliver."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(3 if device.type == "cuda" else 2):
        _sync(device)
        start = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 2):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / (10 if device.type == "cuda" else 2))
    return 2 * n**3 / best / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_adm(device: torch.device, flags: list[str] | None = None, blocks=ADM_PAPER_BLOCKS,
              windows: int | None = None, repeats: int | None = None) -> dict:
    """Windows/s of the engine's extraction on an ADM layout (default ADM-256 with the paper's MoNuSeg blocks,
    random weights) against the limit: peak rate / FLOPs of ``len(steps)`` full forwards (3 x 2.24 TFLOP here)."""
    from diffusers import UNet2DModel

    from .convert import ADM256_UNCOND_FLAGS, parse_flags, plan

    config = plan(parse_flags(list(flags or ADM256_UNCOND_FLAGS))).config
    size = config["sample_size"]
    with torch.device("meta"):  # FLOPs from shapes alone: no compute, no memory
        shapes = UNet2DModel.from_config(config)
    probe = torch.zeros(1, 3, size, size, device="meta")
    full = _flops(lambda: DiffusionFeatures(shapes, blocks, early_exit=False)(probe))
    run = _flops(lambda: DiffusionFeatures(shapes, blocks)(probe))

    torch.manual_seed(0)
    unet = UNet2DModel.from_config(config).to(device)
    precision = resolve_precision("auto", device)
    features = DiffusionFeatures(unet, blocks, precision=precision)
    cuda = device.type == "cuda"
    batch, repeats = windows or (16 if cuda else 1), repeats or (5 if cuda else 1)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    features(x)  # warm-up (cuDNN/oneDNN kernel choice)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        features(x)
    _sync(device)
    windows_per_s = batch * repeats / (time.perf_counter() - start)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16 if precision == "bf16" else torch.float32
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    measured = measured_peak_tflops(device, dtype)
    datasheet = datasheet_peak_tflops(name) if cuda else None
    peak = datasheet or measured
    return {"adm_device": name, "adm_precision": precision, "adm_blocks": list(blocks), "adm_batch": batch,
            "adm_windows_per_s": windows_per_s,
            "adm_tflop_per_window_full": full / 1e12,  # len(steps) full forwards: the limit's basis
            "adm_tflop_per_window_run": run / 1e12,  # what the early exit leaves
            "adm_achieved_tflops": windows_per_s * run / 1e12,
            "adm_peak_tflops_measured_matmul": measured, "adm_peak_tflops_datasheet": datasheet,
            "adm_limit_windows_per_s": peak * 1e12 / full,
            "adm_fraction_of_limit": windows_per_s * full / (peak * 1e12)}


def _flops(fn) -> int:
    """Floating-point operations of one call (convolutions, matmuls, attention; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _reference_train_steps(model: TextDiffModel, samples: list[Sample], steps: int) -> float:
    """Seconds per window of the reference loop: extract (fp32, per step) + head step, batch 1; timed over ``steps``
    steps after one untimed warm-up step."""
    from monai.losses import DiceCELoss

    from . import preprocess
    from .data import read_mask

    c = model.config
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1.5)
    head = model.head
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    model.config.precision = "fp32"
    done, start = 0, None
    for sample in samples:
        image = read_image(sample.image)
        x = model.prepare(image.array)
        y = preprocess.prepare_mask(read_mask(sample.mask), c.scale)[0]
        for i in range(0, x.shape[-2] - c.window + 1, c.window):
            for j in range(0, x.shape[-1] - c.window + 1, c.window):
                window = x[None, :, i:i + c.window, j:j + c.window]
                feats = naive_features(model.features.unet, window, c.blocks, c.steps, c.noise_seed,
                                       c.upsampler_input)
                feats += [window] if c.include_image else []
                tokens, mask = model.text_tokens([sample.report])
                logits = model.head_logits(feats, tokens, mask)
                loss = loss_fn(logits, y[None, None, i:i + c.window, j:j + c.window])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if start is None:  # the first step builds oneDNN's kernels (~15 % of a step): untimed
                    start = time.perf_counter()
                    continue
                done += 1
                if done == steps:
                    return (time.perf_counter() - start) / done
    if not done:
        raise ValueError("the reference loop needs at least 2 training windows (one untimed warm-up step)")
    return (time.perf_counter() - start) / done


def steady_epoch_s(history: list[dict]) -> float:
    """Mean time of the epochs after the first, which also warms up (the only one, if only one ran)."""
    times = [h["train_s"] for h in history]
    return statistics.mean(times[1:] or times)


def _fast_train_child(config_dict: dict, train_dir: str, val_dir: str, epochs: int, queue) -> None:
    config_dict = dict(config_dict, feature_channels=None, backbone_fingerprint=None, weights=None)
    from .train import TrainConfig, train

    torch.manual_seed(0)
    model = TextDiffModel.build(ModelConfig.from_dict(config_dict))
    samples = read_lvit(train_dir) + read_lvit(val_dir)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = train(model, samples, [], out, TrainConfig(epochs=epochs), progress=False)
    queue.put({"train_fast_s": time.perf_counter() - start, "windows": summary["windows"],
               "features_s": summary["features_s"],
               "epoch_s": steady_epoch_s(summary["history"]),
               "first_epoch_s": summary["history"][0]["train_s"],
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


def bench_train(config: ModelConfig, data: Path, epochs: int, measured_epochs: int, reference_steps: int) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_fast_train_child, args=(config.to_dict(), str(data / "Train_Folder"),
                                                            str(data / "Val_Folder"), measured_epochs, queue))
    child.start()
    fast = queue.get()
    child.join()
    model = TextDiffModel.build(ModelConfig.from_dict(config.to_dict()))
    samples = read_lvit(data / "Train_Folder") + read_lvit(data / "Val_Folder")
    per_window = _reference_train_steps(model, samples, reference_steps)
    reference_epoch_s = per_window * fast["windows"]
    fast_total_s = fast["train_fast_s"] + max(0, epochs - measured_epochs) * fast["epoch_s"]
    return {"train_reference_s": reference_epoch_s * epochs, "train_reference_measured_steps": reference_steps,
            "train_fast_s": fast_total_s, "train_speedup": reference_epoch_s * epochs / fast_total_s,
            "train_epochs": epochs, "train_measured_epochs": measured_epochs,
            "train_speedup_measured_epochs": reference_epoch_s * measured_epochs / fast["train_fast_s"],
            "train_fast_features_s": fast["features_s"], "train_fast_epoch_s": fast["epoch_s"],
            "train_fast_first_epoch_s": fast["first_epoch_s"], "train_images": len(samples),
            "peak_rss_gb": fast["peak_rss_gb"]}


def bench_companion(model_dir: str, tile: Path, repeats: int = 3) -> dict:
    """In-process inference of one tile by the model with and without its companion U-Net, alternately (the two
    medians share the machine's state), and their ratio; {} for a model without a companion."""
    model = TextDiffModel.load(model_dir)
    if model.companion is None:
        return {}
    image = read_image(tile)
    partner = model.companion
    times: dict[str, list[float]] = {"with": [], "head": []}
    for _ in range(repeats + 1):  # the first pair warms up and is not counted
        for kind in ("with", "head"):
            model.companion = partner if kind == "with" else None
            start = time.perf_counter()
            model.predict_image_proba(image)
            times[kind].append(time.perf_counter() - start)
    model.companion = partner
    with_s, head_s = (statistics.median(times[k][1:]) for k in ("with", "head"))
    return {"infer_model_with_companion_s": with_s, "infer_model_head_only_s": head_s,
            "companion_infer_ratio": with_s / head_s}


def bench_infer(model_dir: str, tile: Path, requests: int = 5, background_images: int = 40) -> dict:
    """Median REST infer time of one tile on a warm in-process MONAI Label server (the shipped app): idle, and while
    the server scores a pool of ``background_images`` in its background process (0: not measured)."""
    import os
    import shutil

    from fastapi.testclient import TestClient
    from monailabel.config import settings

    app_dir = Path(__file__).resolve().parents[2] / "apps" / "textdiff"
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        studies = Path(tmp) / "studies"
        studies.mkdir()
        shutil.copy(tile, studies / "tile.png")
        pixels = np.array(PILImage.open(tile).convert("RGB"))
        for index in range(background_images):  # a pool for the background scoring to work through: each copy
            pixels[0, 0, 0] = index % 256  # differs in a pixel, so the feature cache cannot answer for the others
            PILImage.fromarray(pixels).save(studies / f"pool_{index:03d}.png")
        settings.MONAI_LABEL_APP_DIR, settings.MONAI_LABEL_STUDIES = str(app_dir), str(studies)
        settings.MONAI_LABEL_APP_CONF = {"model": model_dir, "model_dir": str(Path(tmp) / "published")}
        # MONAI Label's background processes read the app from the environment, as `start_server` sets it
        os.environ.update(MONAI_LABEL_APP_DIR=str(app_dir), MONAI_LABEL_STUDIES=str(studies),
                          MONAI_LABEL_APP_CONF=json.dumps(settings.MONAI_LABEL_APP_CONF))
        settings.MONAI_LABEL_AUTO_UPDATE_SCORING = False
        settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False  # no file watcher racing the clean-up
        os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
        from monailabel.app import app

        times = []
        with TestClient(app) as client:
            params = {"data": {"params": json.dumps({"report": "The nuclei are evenly distributed."})}}
            assert client.post("/infer/textdiff?image=tile&output=image", **params).status_code == 200  # warm-up
            for _ in range(requests):
                start = time.perf_counter()
                response = client.post("/infer/textdiff?image=tile&output=image", **params)
                times.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"infer failed: {response.text[:300]}")
            busy = []
            if background_images:  # the uncertainty scoring of the pool runs in MONAI Label's subprocess
                assert client.post("/scoring/textdiff_uncertainty").status_code == 200
                index = studies / "datastore_v2.json"  # the scoring process writes its scores here
                deadline = time.time() + 300
                while "textdiff_uncertainty" not in index.read_text():
                    if time.time() > deadline:  # a busy machine gives a nice-19 process nothing
                        raise RuntimeError("the background scoring scored nothing within 300 s: is the machine "
                                           "busy with other work?")
                    time.sleep(0.5)  # until the background process is scoring, not loading
                for _ in range(requests):
                    # after a request the background pauses a while (textdiff.priority.LINGER_S): wait until it works
                    # again, so that each request arrives while a background window runs
                    time.sleep(LINGER_S + 1)
                    start = time.perf_counter()
                    response = client.post("/infer/textdiff?image=tile&output=image", **params)
                    busy.append(time.perf_counter() - start)
                running = client.get("/scoring/", params={"check_if_running": True}).status_code == 200
                client.delete("/scoring/")
                if not running:
                    raise RuntimeError("the background scoring ended before the busy requests did: measure with "
                                       "a larger pool")
            # the served model takes clicks as regions: the first click round computes the tile's backbone maps,
            # the next ones reuse them
            config = ModelConfig.from_dict(json.loads((resolve_model_dir(model_dir) / CONFIG_NAME).read_text()))
            label = next(name for name, index in config.labels.items() if index)
            height, width = read_image(tile).size_hw
            clicked = []
            for round_ in range(requests + 1):  # each round one more click, as an annotator's corrections
                points = {label: [[width // 2 + k, height // 2] for k in range(round_ + 1)], "background": [[1, 1]],
                          "report": "The nuclei are evenly distributed."}
                start = time.perf_counter()
                response = client.post("/infer/textdiff_interactive?image=tile&output=image",
                                       data={"params": json.dumps(points)})
                clicked.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"click round failed: {response.text[:300]}")
    busy_s = {"infer_busy_1000px_s": statistics.median(busy), "infer_busy_1000px_all_s": busy,
              "infer_busy_ratio": statistics.median(busy) / statistics.median(times)} if busy else {}
    return busy_s | {"infer_1000px_s": statistics.median(times), "infer_1000px_all_s": times,
            "click_round_1000px_s": statistics.median(clicked[1:]), "click_first_round_1000px_s": clicked[0],
            "click_rounds_all_s": clicked}


def bench_pool(folder: Path, sizes: list[int], recipe_name: str = "chest-xray", bits: int = 16,
               compact: list[int] | None = None) -> dict:
    """The annotation loop's pool work at each pool size: backbone extraction per image, cache bytes per image, and
    rescoring the whole pool from the cache after a new head (a fresh head of the recipe: timing needs no trained
    weights). Each size runs in its own process, so peak RSS is that size's."""
    available = len(read_lvit(folder, require_masks=False))
    if not sizes or min(sizes) < 1 or max(sizes) > available:
        raise ValueError(f"pool sizes must be 1..{available} ({folder} holds {available} images), got {sizes}")
    context = mp.get_context("spawn")
    out = {"pool_recipe": recipe_name, "pool_cache_bits": bits, "pool_compact": compact, "pool": {}}
    for size in sizes:
        queue = context.Queue()
        child = context.Process(target=_pool_child, args=(str(folder), size, recipe_name, bits, compact, queue))
        child.start()
        measured = queue.get()
        child.join()
        if "error" in measured:
            raise RuntimeError(f"pool of {size}: {measured['error']}")
        out["pool"][str(size)] = measured
    return out


def _pool_child(folder: str, size: int, recipe_name: str, bits: int, compact, queue) -> None:
    try:
        queue.put(_pool_measure(folder, size, recipe_name, bits, compact))
    except Exception as error:  # the parent waits on the queue: an error must reach it
        queue.put({"error": f"{type(error).__name__}: {error}"})


def _pool_measure(folder: str, size: int, recipe_name: str, bits: int, compact) -> dict:
    from . import recipes
    from .campaign import score_pool
    from .train import HEAD_BATCH, FeatureCache, fit_projection

    samples = read_lvit(folder, require_masks=False)[:size]
    model = TextDiffModel.build(ModelConfig(**recipes.load(recipe_name)["model"], compact=compact), seed=0)
    if compact:
        fit_projection(model, samples)
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        score_pool(model, samples, FeatureCache(model, cache_dir, bits=bits))  # extraction + head
        extract_s = time.perf_counter() - start
        cache_bytes = sum(p.stat().st_size for p in Path(cache_dir).glob("*.safetensors"))
        fresh = TextDiffModel.build(model.config, seed=1)  # a new head of the same backbone maps: cache hits
        if compact:
            fresh.projection.load_state_dict(model.projection.state_dict())
        start = time.perf_counter()  # the app saves the first batch's scores at once: the next sample can use them
        score_pool(fresh, samples[:HEAD_BATCH], FeatureCache(fresh, cache_dir, bits=bits))
        first_batch_s = time.perf_counter() - start
        start = time.perf_counter()
        score_pool(fresh, samples, FeatureCache(fresh, cache_dir, bits=bits))
        rescore_s = time.perf_counter() - start
    return {"images": size, "extract_and_score_s_per_image": extract_s / size,
            "cache_mb_per_image": cache_bytes / size / 2**20, "rescore_first_batch_s": first_batch_s,
            "rescore_pool_s": rescore_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run(backbone: str = "default", data: Path = DEFAULT_DATA, model_dir: str = "default", windows: int = 4,
        epochs: int = 50, measured_epochs: int = 3, reference_steps: int = 24, skip: tuple[str, ...] = (),
        adm: bool = False, blocks: list[int] | None = None, pool: list[int] | None = None,
        pool_data: Path | None = None, pool_bits: int = 16, pool_compact: list[int] | None = None) -> dict:
    if not (data / "Train_Folder").is_dir():
        raise FileNotFoundError(f"benchmark data not found: {data} (MoNuSeg LViT folders)")
    counts = {"windows": windows, "measured epochs": measured_epochs, "reference steps": reference_steps}
    if min(counts.values()) < 1 or epochs < measured_epochs:
        raise ValueError(f"need windows, measured epochs and reference steps >= 1 and epochs >= measured epochs, "
                         f"got {counts} and {epochs} epochs")
    torch.manual_seed(0)
    # the served model's recipe (blocks, steps, scale, head), with a fresh head on the chosen backbone; ``blocks``
    # replaces its blocks for extraction and training (the early exit's saving depends on the deepest one). The
    # training comparison is the head's (the paper's loop): a companion U-Net's fixed steps are no part of it
    recipe = json.loads((resolve_model_dir(model_dir) / CONFIG_NAME).read_text())
    if blocks:
        recipe["blocks"] = list(blocks)
    config = ModelConfig.from_dict(dict(recipe, backbone=backbone, feature_channels=None, backbone_fingerprint=None,
                                        weights=None, companion=None))
    model = TextDiffModel.build(config)
    samples = read_lvit(data / "Train_Folder")
    result: dict = {"device": f"{model.device.type} ({cpu_name()}, {torch.get_num_threads()} threads, "
                              f"{resolve_precision(config.precision, model.device)})", "backbone": backbone,
                    "blocks": list(model.config.blocks)}
    parts = {"extract": lambda: bench_extract(model, _windows(samples, model, windows)),
             "train": lambda: bench_train(config, data, epochs, measured_epochs, reference_steps),
             "infer": lambda: bench_infer(model_dir, samples[0].image) | bench_companion(model_dir, samples[0].image)}
    if adm:
        parts["adm"] = lambda: bench_adm(model.device)
    if pool:
        parts["pool"] = lambda: bench_pool(pool_data or DEFAULT_POOL_DATA, pool, bits=pool_bits, compact=pool_compact)
    for name, measure in parts.items():
        if name not in skip:
            result |= measure()
            print(f"benchmark {name}: {json.dumps(result)}", file=sys.stderr, flush=True)  # partial results survive
    return result


def table(result: dict) -> str:
    rows = [("feature extraction speed-up (vs naive loop)", "extract_speedup", "{:.1f}x", "goal >= 4x"),
            ("  naive / fast s per 256x256 window", None, None, None),
            ("  of which work skipped by the early exit (FLOPs)", "extract_flop_ratio", "{:.2f}x", ""),
            ("  naive / fast GFLOP/s", None, None, None),
            ("  bound: fast path at this device's matmul peak", "extract_speedup_bound", "{:.1f}x", ""),
            ("feature max relative difference", "feature_max_rel_diff", "{:.2%}", "goal <= 2%"),
            ("few-shot training speed-up (vs reference loop)", "train_speedup", "{:.1f}x", "goal >= 20x"),
            ("  the same over the measured epochs only", "train_speedup_measured_epochs", "{:.1f}x", ""),
            ("REST infer, 1000x1000 tile, median", "infer_1000px_s", "{:.2f} s", "goal <= 3 s"),
            ("REST infer, same, while the pool is scored", "infer_busy_1000px_s", "{:.2f} s", ""),
            ("  busy / idle", "infer_busy_ratio", "{:.2f}x", "goal <= 1.3x"),
            ("REST click round, same tile again, median", "click_round_1000px_s", "{:.2f} s", "goal <= 0.5 s"),
            ("  its first click round (backbone maps computed)", "click_first_round_1000px_s", "{:.2f} s", ""),
            ("in-process infer with / without the companion U-Net", "companion_infer_ratio", "{:.2f}x", ""),
            ("peak RSS, training on 30 MoNuSeg images", "peak_rss_gb", "{:.2f} GB", "goal <= 8 GB"),
            ("ADM-256 layout, 256x256 windows/s (bf16/fp16)", "adm_windows_per_s", "{:.2f}", ""),
            ("  physical limit (peak rate / 3 full forwards)", "adm_limit_windows_per_s", "{:.2f}", ""),
            ("  fraction of the limit", "adm_fraction_of_limit", "{:.1%}", "")]
    lines = [f"device: {result.get('device')}  backbone: {result.get('backbone')}  blocks: {result.get('blocks')}", ""]
    for size, measured in result.get("pool", {}).items():
        lines.append(f"pool of {size}: extraction {measured['extract_and_score_s_per_image']:.2f} s/image, cache "
                     f"{measured['cache_mb_per_image']:.1f} MB/image, rescoring after a new head "
                     f"{measured['rescore_pool_s']:.1f} s (its first batch {measured['rescore_first_batch_s']:.2f} s), "
                     f"peak RSS {measured['peak_rss_gb']:.2f} GB")
    for label, key, fmt, goal in rows:
        if key is None:
            pair = {"s per": ("extract_naive_s_per_window", "extract_fast_s_per_window", "{:.2f}"),
                    "GFLOP": ("extract_naive_gflops_per_s", "extract_fast_gflops_per_s", "{:.0f}")}
            naive, fast, fmt = next(v for k, v in pair.items() if k in label)
            if naive in result:
                lines.append(f"{label:48s} {fmt.format(result[naive])} / {fmt.format(result[fast])}")
            continue
        if key in result:
            lines.append(f"{label:48s} {fmt.format(result[key]):>10s}   {goal}")
    return "\n".join(lines)
