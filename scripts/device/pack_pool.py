"""Pack the pretraining pools as JPEG planes for the device tool (it carries at most 64 MiB with the repo).

The planes are exactly what `textdiff pretrain` builds from the folders (the engine's own preprocessing at each
folder's scale), quantised to 8 bits and JPEG-encoded: .gpu/pack/<name>/*.jpg. Usage (repo root):
    .venv/bin/python scripts/device/pack_pool.py [QUALITY=85]
"""
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, "lib")
from textdiff.pretrain import find_images, load_pool  # noqa: E402

q = int(sys.argv[1]) if len(sys.argv) > 1 else 85
D = str(Path(__file__).resolve().parents[3] / "shared" / "data") + "/"
sets = [("monuseg-train", D + "monuseg/Train_Folder/img", 0.5), ("monuseg-val", D + "monuseg/Val_Folder/img", 0.5),
        ("covid-train", D + "covid-qu-ex/Train_Folder/img", 1.0)]
total = 0; err = []
for name, folder, scale in sets:
    out = Path(".gpu/pack") / name; out.mkdir(parents=True, exist_ok=True)
    pool = load_pool(find_images([folder]), 3, scale, 128)
    for i, x in enumerate(pool):
        u8 = ((x.float() + 1) * 127.5).round().clamp(0, 255).byte()
        arr = u8[0].numpy() if bool((u8 == u8[:1]).all()) else u8.permute(1, 2, 0).numpy()
        buf = io.BytesIO(); Image.fromarray(arr).save(buf, "JPEG", quality=q); b = buf.getvalue()
        (out / f"{i:05d}.jpg").write_bytes(b); total += len(b)
        back = np.asarray(Image.open(io.BytesIO(b))).astype(np.float32)
        err.append(np.abs(back - arr.astype(np.float32)).mean())
    print(name, len(pool), tuple(pool[0].shape), flush=True)
print("MB", total / 2**20, "mean abs err (0-255)", float(np.mean(err)))
