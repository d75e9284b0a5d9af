"""COVID-QU-Ex result runs (scripts/reproduce_results.py, unchanged recipe) on a lent GPU, several side by side.

A COVID-QU-Ex TextDiff run costs ~65-140 min on the 2-core CPU whatever its label count (a fixed 4500-step
budget), so the curves take many sessions there; on a GPU a run is minutes, and several processes share the GPU.
The device tool carries at most 64 MiB with the tree, and neither SimpleITK's wheel nor the report encoders (90-420
MB) fit, so:

    # here: images + masks of the runs (<= 300 labels: ~950 PNGs, 27 MB), the sheet, and the embeddings of the
    # 61 distinct reports for every encoder / token budget the runs use (computed by the real encoders, here)
    .venv/bin/python scripts/device/covid_runs_on_device.py pack [RUN_NAME ...]      # -> .gpu/covid
    # there (carry [".gpu/covid", ".whl"], .whl: diffusers, monai, openpyxl, et_xmlfile, importlib_metadata wheels;
    # move lib/textdiff/weights/he-cxr-cpu and apps/textdiff/sample/img out of the tree for the call: with them
    # the tree, the pack (33 MiB) and the wheels (8 MiB) exceed 64 MiB; without them ~58 MiB):
    pip install --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site DEADLINE_S=585 python3 scripts/device/covid_runs_on_device.py run
    # (--no-deps: the device has no index to resolve against, and without it pip installs nothing)
    # (measured on an H200, 12 workers: features 78 s; no-text runs 300-330 s, TextDiff runs > 425 s side by side,
    # so one wave per 600 s call; runs unfinished at the deadline are lost, hence a deadline close to the limit;
    # 4 runs with WORKERS=4 THREADS=3: features of 746 images 69 s, runs 201-283 s; 2 runs with THREADS=6: 260-277 s.
    # A worker starts a run only if RUN_EST_S x 1.1 fits before DEADLINE_S - 20: lower RUN_EST_S for a short call)
    # (WORKERS=12 processes of THREADS=1 share the GPU; a worker starts a run only if the slowest run so far,
    # or RUN_EST_S=300 before any ended, fits before the deadline; results and the gallery come back in $OUT)
    # back here: run files into docs/results/runs/, the gallery if a run redrew it, then --plots
    .venv/bin/python scripts/device/covid_runs_on_device.py unpack FILES_AT

There, images are read by a PIL stand-in for the few SimpleITK calls textdiff.data makes for 2D PNGs (`pack` checks
it reads every packed file as SimpleITK does), and the report encoder is a stand-in holding the packed embeddings.
Everything else is the engine's and the results script's own code path; each run file records the GPU in `machine`.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import numpy as np

T0 = float(os.environ.setdefault("T0", str(time.time())))  # the workers log on the parent's clock
ROOT = Path(__file__).resolve().parents[2]
PACK = ROOT / ".gpu" / "covid"
WORK = Path(os.environ.get("WORK_DIR", "/tmp/covid-runs"))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
# the runs still to do at 300 labels or fewer, in the order the curves need them (goal points first)
DEFAULT_RUNS = [f"covid-curve-{m}-n{n}-s{s}" for m in ("textdiff", "notext") for n in (10, 30, 100) for s in (0, 1, 2)] \
    + [f"covid-curve-{m}-n300-s{s}" for m in ("textdiff", "notext") for s in (1, 2)] \
    + [f"covid-ablation-{a}" for a in ("steps-single", "tokens-10", "no-position", "text-mpnet")]


def log(*parts):
    print(f"[{time.time() - T0:6.1f}s]", *parts, flush=True)


# ----- stand-ins ------------------------------------------------------------------------------------------------
def pil_simpleitk() -> types.ModuleType:
    """The SimpleITK calls textdiff.data makes for a 2D image file, through PIL (no geometry: PNGs have none)."""
    from PIL import Image as PILImage

    class Image2D:
        def __init__(self, array):
            self.array = array

        def GetDimension(self):
            return 2

        def GetSize(self):
            return self.array.shape[1], self.array.shape[0]

        def GetNumberOfComponentsPerPixel(self):
            return 1 if self.array.ndim == 2 else self.array.shape[2]

    class ImageFileReader:
        def SetFileName(self, name):
            self.name = name

        def ReadImageInformation(self):
            with PILImage.open(self.name) as image:
                self.size, self.bands = image.size, len(image.getbands())

        def GetSize(self):
            return self.size

        def GetNumberOfComponents(self):
            return self.bands

        def Execute(self):
            with PILImage.open(self.name) as image:
                return Image2D(np.array(image))  # a writable copy, as SimpleITK's arrays are

    module = types.ModuleType("SimpleITK")
    module.ImageFileReader, module.Image = ImageFileReader, Image2D
    module.GetArrayFromImage = lambda image: image.array
    return module


def encoder_key(source: str | None, max_tokens: int) -> str:
    return f"{Path(source).name if source and source != 'default' else 'default'}|{max_tokens}"


def install_stand_ins(embeddings: dict) -> None:
    """Report encoders that answer from the packed embeddings, and no encoder download."""
    import torch
    from textdiff import text

    class PackedModel(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.config = types.SimpleNamespace(hidden_size=dim)
            self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the encoder a device

    def load(cls, source=None, max_tokens=text.DEFAULT_MAX_TOKENS):
        key = encoder_key(source, max_tokens)
        if key not in embeddings:
            raise text.TextEncoderLoadError(f"no packed embeddings for encoder {key}; pack them with this script")
        cache = embeddings[key]

        def tokenizer(report, **_):
            raise KeyError(f"report not packed for encoder {key}: {report!r}")

        encoder = cls(PackedModel(next(iter(cache.values()))[0].shape[1]), tokenizer, max_tokens)
        encoder._cache.update(cache)
        return encoder

    text.ReportEncoder.load = classmethod(load)
    import fetch_text_encoder

    fetch_text_encoder.ensure_mpnet = lambda: Path(fetch_text_encoder.NAME)


# ----- run names -> what they need ---------------------------------------------------------------------------
def planned(names):
    import reproduce_results as R

    runs = {r[0]: r for r in R.plan("covid-")}
    unknown = [n for n in names if n not in runs]
    if unknown:
        raise SystemExit(f"not COVID-QU-Ex runs of reproduce_results.plan: {unknown}")
    return [runs[n] for n in names]


def needed_samples(runs):
    import reproduce_results as R

    train_all, val = R.splits("covid")
    chosen = {s.name: s for s in val}
    for _, _, (dataset, n, seed), _ in runs:
        chosen.update({s.name: s for s in R.subset(train_all, n, seed)})
    return train_all + val, chosen


def encoders_used(runs):
    from textdiff.model import ModelConfig

    keys = {("default", ModelConfig().max_tokens)}  # runs without text load the encoder too (its width)
    for _, _, _, kwargs in runs:
        if kwargs.get("use_text", True):
            keys.add((kwargs.get("text_encoder", "default"), kwargs.get("max_tokens", ModelConfig().max_tokens)))
    return keys


# ----- here: pack ------------------------------------------------------------------------------------------
def pack(names) -> None:
    import shutil

    import SimpleITK as sitk
    import torch
    from safetensors.torch import save_file

    import fetch_text_encoder
    import reproduce_results as R
    from textdiff.data import read_lvit
    from textdiff.text import ReportEncoder

    runs = planned(names or [n for n in DEFAULT_RUNS if not R.done(n)])
    every, chosen = needed_samples(runs)
    shutil.rmtree(PACK, ignore_errors=True)
    folder = PACK / "covid-qu-ex" / "Train_Folder"
    (folder / "img").mkdir(parents=True), (folder / "labelcol").mkdir()
    source = R.DATA / "covid-qu-ex" / "Train_Folder"
    shutil.copy(source / "Train_text.xlsx", folder)
    shim = pil_simpleitk()
    for sample in chosen.values():
        for path, sub in ((sample.image, "img"), (sample.mask, "labelcol")):
            shutil.copy(path, folder / sub / path.name)
            reader = shim.ImageFileReader()
            reader.SetFileName(str(path))
            if not np.array_equal(shim.GetArrayFromImage(reader.Execute()),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(path)))):
                raise SystemExit(f"the PIL stand-in reads {path} differently from SimpleITK")
    tensors, texts = {}, {}
    for encoder, max_tokens in sorted(encoders_used(runs)):
        source_path = str(fetch_text_encoder.ensure_mpnet()) if encoder == fetch_text_encoder.NAME else encoder
        model = ReportEncoder.load(source_path, max_tokens)
        key = encoder_key(source_path, max_tokens)
        for report in sorted({s.report for s in every if s.report}):
            model.embed(report)
        texts[key] = list(model._cache)
        for i, (tokens, mask) in enumerate(model._cache.values()):
            tensors[f"{key}|{i}|tokens"], tensors[f"{key}|{i}|mask"] = tokens.contiguous(), mask.to(torch.uint8)
    save_file(tensors, str(PACK / "reports.safetensors"))
    (PACK / "pack.json").write_text(json.dumps({
        "runs": [r[0] for r in runs], "texts": texts,
        "rows": [[s.image.name, s.mask.name] for s in read_lvit(source)]}, indent=1))
    size = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file())
    log(f"packed {len(runs)} runs, {len(chosen)} images, {len(tensors) // 2} report embeddings: {size / 2**20:.1f} MiB")


def load_pack() -> tuple[dict, dict]:
    from safetensors.torch import load_file

    manifest = json.loads((PACK / "pack.json").read_text())
    tensors = load_file(str(PACK / "reports.safetensors"))
    return manifest, {key: {text: (tensors[f"{key}|{i}|tokens"], tensors[f"{key}|{i}|mask"].bool())
                            for i, text in enumerate(texts)} for key, texts in manifest["texts"].items()}


def prepare_process() -> dict:
    """Every process there: stand-ins, the packed data as the results script's data folder."""
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        sys.modules["SimpleITK"] = pil_simpleitk()
    if os.environ.get("FORCE_STAND_INS") == "1":  # to try the device path here
        sys.modules["SimpleITK"] = pil_simpleitk()
    import reproduce_results as R

    R.DATA = PACK
    manifest, embeddings = load_pack()
    install_stand_ins(embeddings)
    R.CACHE_MAX_GB = None  # the whole set fits the device's disk
    if os.environ.get("SMOKE") == "1":  # plumbing check: a few steps, 8 evaluation images
        R.STEP_BUDGET["covid"] = 8
        splits = R.splits
        R.splits = lambda dataset: (splits(dataset)[0], splits(dataset)[1][:8])
    return manifest


# ----- there: run --------------------------------------------------------------------------------------------
def claim_next(queue: Path, estimate_s: float, deadline: float) -> str | None:
    """The next unclaimed run, if one is expected to finish before the deadline."""
    with open(queue.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(queue.read_text())
        walls = state["walls"] or [estimate_s]
        if not state["todo"] or time.time() + max(walls) * 1.1 > deadline:
            return None
        name = state["todo"].pop(0)
        queue.write_text(json.dumps(state))
        return name


def record_wall(queue: Path, wall: float) -> None:
    with open(queue.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(queue.read_text())
        state["walls"].append(wall)
        queue.write_text(json.dumps(state))


def worker(index: int, deadline: float) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    prepare_process()
    import reproduce_results as R

    queue = WORK / "queue.json"
    gallery_run = json.loads(queue.read_text())["gallery_run"]  # written before the workers start
    while (name := claim_next(queue, float(os.environ.get("RUN_EST_S", "300")), deadline)):
        (_, fn, args, kwargs), start = planned([name])[0], time.time()
        if name != gallery_run:  # one run draws the gallery, not two at once
            kwargs = {**kwargs, "gallery": 0}
        log(f"worker {index}: {name}")
        try:
            result = fn(*args, **kwargs) | {"machine": R.machine(), "note": "run on a lent GPU, several runs side "
                                            "by side (scripts/device/covid_runs_on_device.py)"}
        except Exception as error:  # the other runs go on
            log(f"worker {index}: {name} failed: {error!r}")
            continue
        (WORK / "results" / f"{name}.json").write_text(json.dumps(result, indent=1))
        record_wall(queue, time.time() - start)
        log(f"worker {index}: {name} dice {result['dice']:.4f} in {time.time() - start:.0f} s")


def run() -> None:
    deadline = T0 + float(os.environ.get("DEADLINE_S", "585")) - 20
    manifest = prepare_process()
    import reproduce_results as R
    from textdiff.model import ModelConfig, TextDiffModel
    from textdiff.train import FeatureCache

    folder = PACK / "covid-qu-ex" / "Train_Folder"
    for image, mask in manifest["rows"]:  # rows not packed: empty stand-ins, so the sheet's order (splits) holds
        for path in (folder / "img" / image, folder / "labelcol" / mask):
            if not path.exists():
                path.touch()
    names = [n for n in (sys.argv[2:] or manifest["runs"]) if not R.done(n)]
    runs = planned(names)
    _, chosen = needed_samples(runs)
    (WORK / "results").mkdir(parents=True, exist_ok=True)
    gallery_run = next((r[0] for r in runs if r[3].get("gallery")), None)
    (WORK / "queue.json").write_text(json.dumps({"todo": names, "walls": [], "gallery_run": gallery_run}))
    model = TextDiffModel.build(ModelConfig(labels={"background": 0, "lesion": 1}))
    cache = FeatureCache(model, R.FEATURE_CACHE, max_gb=None)
    for sample in chosen.values():  # once, before the runs share them
        cache.get(sample)
    del cache, model
    log(f"features of {len(chosen)} images; {len(names)} runs")
    # each worker's progress bars go to its own file: interleaved on one stream they garble the log lines
    bars = [WORK / f"worker-{i}.log" for i in range(int(os.environ.get("WORKERS", "12")))]
    workers = [subprocess.Popen([sys.executable, __file__, "worker", str(i), str(deadline)], stderr=open(path, "w"))
               for i, path in enumerate(bars)]
    while any(w.poll() is None for w in workers) and time.time() < deadline:
        time.sleep(2)
    for i, (w, path) in enumerate(zip(workers, bars)):
        if w.poll() is None:
            w.kill()
            last = path.read_text(errors="replace").replace("\r", "\n").strip().splitlines()
            log(f"worker {i} stopped at the deadline: {last[-1] if last else '(no output)'}")
        elif w.returncode:  # a crash outside a run (a run's own error is logged by the worker): its traceback
            tail = path.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-5:]
            log(f"worker {i} exited with {w.returncode}:\n" + "\n".join(tail))
    results = {p.stem: json.loads(p.read_text()) for p in sorted((WORK / "results").glob("*.json"))}
    unfinished = set(names) - set(json.loads((WORK / "queue.json").read_text())["todo"]) - set(results)
    if unfinished:
        log(f"started but not finished (lost): {sorted(unfinished)}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    gallery = R.OUT / "gallery" / "covid"
    if R.gallery_is_current("covid"):
        with tarfile.open(OUT / "gallery-covid.tar", "w") as tar:
            tar.add(gallery, arcname="covid")
    log(f"{len(results)} runs done: {sorted(results)}")


def unpack(folder: str) -> None:
    import reproduce_results as R

    folder = Path(folder)
    results = json.loads((folder / "results.json").read_text())
    # only runs of today's recipe land (a SMOKE run's 8-step budget does not), and none replaces a current run file
    stale = {name: R.stale_reasons(result, name) for name, result in results.items() if not R.is_current(result, name)}
    if stale:
        raise SystemExit(f"not of the current recipe, nothing written: {stale}")
    for name in [name for name in results if R.done(name)]:
        print(f"kept the current {name}.json already here")
        del results[name]
    for name, result in results.items():
        (R.OUT / "runs" / f"{name}.json").write_text(json.dumps(result, indent=1))
    if (folder / "gallery-covid.tar").is_file():
        gallery = R.OUT / "gallery"
        for old in (gallery / "covid").glob("*"):
            old.unlink()
        with tarfile.open(folder / "gallery-covid.tar") as tar:
            tar.extractall(gallery, filter="data")
    log(f"{len(results)} run files written: {sorted(results)}")


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "lib"), str(ROOT / "scripts")]
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "pack":
        pack(sys.argv[2:])
    elif command == "run":
        run()
    elif command == "worker":
        worker(int(sys.argv[2]), float(sys.argv[3]))
    elif command == "unpack":
        unpack(sys.argv[2])
    else:
        raise SystemExit(__doc__)
