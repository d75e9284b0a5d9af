"""Drive a live TextDiff server the way a hostile client would, and say what got through.

Starts a server on a free loopback port over a copy of the bundled sample (or probes ``--url``), then sends:
path traversal in image ids, label tags and upload names; an overwrite of the annotator's label through infer
params; a server file as the image; a cross-origin preflight; a 2,000,000 x 1 PNG and a 1 x 1 x 200,000 NRRD;
NaN and huge training options; N distinct reports (server RSS before and after); and /info/ requests while a long
inference runs (their worst latency). Exit status 1 if any probe got through.

    .venv/bin/python scripts/hostile_probe.py                     # shipped model, 5000 reports (~35 min on 2 cores)
    .venv/bin/python scripts/hostile_probe.py --reports 500 --model MODEL_DIR
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk
from PIL import Image as PILImage

ROOT = Path(__file__).resolve().parents[1]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, model: str | None, port: int) -> subprocess.Popen:
    from textdiff.studies import import_lvit

    studies = work / "studies"
    import_lvit(ROOT / "apps" / "textdiff" / "sample", studies, labels=2)
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(ROOT / "apps" / "textdiff"),
               "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
               "--conf", "model_dir", str(work / "published")]
    if model:
        command += ["--conf", "model", model]
    env = dict(os.environ, MONAI_LABEL_TRACKING_ENABLED="false", MONAI_LABEL_AUTO_UPDATE_SCORING="false")
    return subprocess.Popen(command, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=work)


class Probe:
    def __init__(self, url: str):
        self.url = url
        self.rows: list[tuple[str, str, bool]] = []

    def check(self, name: str, response: requests.Response, refused=range(400, 500), extra: bool = True):
        ok = response.status_code in refused and extra
        self.rows.append((name, f"{response.status_code} {response.text[:90]!r}", ok))
        return ok

    def note(self, name: str, text: str, ok: bool):
        self.rows.append((name, text, ok))


def run(url: str, args, server_pid: int | None, studies: Path | None) -> int:
    p = Probe(url)
    outside = Path(tempfile.mkdtemp(prefix="probe-outside-"))
    objects = requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"]
    labeled = sorted(i for i, o in objects.items() if "final" in o.get("labels", {}))
    first = labeled[0] if labeled else sorted(objects)[0]  # an image whose final label must survive
    sample = png(np.full((64, 64, 3), 120, np.uint8))

    p.check("PUT image ?image=/abs/planted", requests.put(f"{url}/datastore/image?image={outside}/planted",
                                                          files={"file": ("a.png", sample)}), extra=True)
    p.check("PUT image ?image=../escaped", requests.put(f"{url}/datastore/image?image=../escaped",
                                                        files={"file": ("a.png", sample)}))
    p.check("PUT label tag=/abs/tagged", requests.put(f"{url}/datastore/label?image={first}&tag={outside}/tagged",
                                                      files={"label": ("l.png", png(np.zeros((8, 8), np.uint8)))}))
    p.note("nothing written outside the studies", str(sorted(os.listdir(outside))), not os.listdir(outside))
    shutil.rmtree(outside, ignore_errors=True)
    final = requests.get(f"{url}/datastore/label?label={first}&tag=final", timeout=30)
    p.check("infer params save_label/label_tag final", requests.post(
        f"{url}/infer/textdiff?image={first}&output=json",
        data={"params": json.dumps({"save_label": True, "label_tag": "final"})}))
    after = requests.get(f"{url}/datastore/label?label={first}&tag=final", timeout=30)
    p.note("final label untouched", f"{len(final.content)} -> {len(after.content)} bytes",
           final.content == after.content and (final.ok or not labeled))
    p.check("infer params image=/etc/hostname", requests.post(
        f"{url}/infer/textdiff?image={first}&output=json", data={"params": json.dumps({"image": "/etc/hostname"})}))
    p.check("infer ?image=/etc/hostname", requests.post(f"{url}/infer/textdiff?image=/etc/hostname&output=json"))
    preflight = requests.options(f"{url}/datastore/image", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"})
    p.check("CORS preflight from evil.example", preflight,
            extra="access-control-allow-origin" not in {k.lower() for k in preflight.headers})
    thin = png(np.zeros((1, 2_000_000), np.uint8))
    p.check("2,000,000 x 1 PNG", requests.post(f"{url}/infer/textdiff?output=json",
                                               files={"file": ("thin.png", thin)}, data={"params": "{}"}))
    with tempfile.TemporaryDirectory() as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((200_000, 1, 1), np.uint8)), f"{tmp}/v.nrrd")
        volume = Path(f"{tmp}/v.nrrd").read_bytes()
    p.check("1 x 1 x 200,000 NRRD", requests.post(f"{url}/infer/textdiff?output=json",
                                                  files={"file": ("v.nrrd", volume)}, data={"params": "{}"}))
    for options in ({"learning_rate": "nan"}, {"learning_rate": 1e30}, {"max_epochs": 10**12}, {"seed": "inf"}):
        p.check(f"POST /train {options}", requests.post(f"{url}/train/textdiff?run_sync=true", json=options))
    for options in ({"minutes": "nan"}, {"max_steps": 1e15}, {"crop_size": 10**6}):
        p.check(f"POST /train pretrain {options}", requests.post(f"{url}/train/textdiff_pretrain?run_sync=true",
                                                                 json=options))

    import psutil

    server = psutil.Process(server_pid) if server_pid else None
    rss = []
    started = time.time()
    small = png(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for i in range(args.reports):
        if server is not None and i % max(1, args.reports // 5) == 0:
            rss.append(server.memory_info().rss)
        response = requests.post(f"{url}/infer/textdiff?output=json", files={"file": ("r.png", small)},
                                 data={"params": json.dumps({"report": f"report {i}: nuclei dense upper {i % 97}"})})
        if response.status_code != 200:
            p.note(f"distinct report {i}", f"{response.status_code} {response.text[:90]!r}", False)
            break
    if server is not None:
        rss.append(server.memory_info().rss)
        growth = (rss[-1] - rss[1 if len(rss) > 2 else 0]) / 2**20
        p.note(f"{args.reports} distinct reports", f"RSS MB {[round(r / 2**20) for r in rss]} "
               f"({time.time() - started:.0f} s)", growth < args.rss_growth_mb)

    big = png(np.random.default_rng(1).integers(0, 255, (args.long_side, args.long_side, 3), dtype=np.uint8))
    done = threading.Event()
    worker = threading.Thread(target=lambda: (requests.post(f"{url}/infer/textdiff?output=json",
                                                            files={"file": ("big.png", big)}), done.set()))
    worker.start()
    time.sleep(1.0)
    latencies = []
    while not done.is_set():
        began = time.time()
        requests.get(f"{url}/info/", timeout=60)
        latencies.append(time.time() - began)
        time.sleep(0.5)
    worker.join()
    p.note("/info/ during a long infer", f"{len(latencies)} calls, worst {max(latencies, default=0):.2f} s",
           bool(latencies) and max(latencies) <= 2.0)

    width = max(len(name) for name, _, _ in p.rows)
    for name, what, ok in p.rows:
        print(f"{'refused' if ok else 'GOT THROUGH':11}  {name:{width}}  {what}")
    through = sum(not ok for _, _, ok in p.rows)
    print(f"{len(p.rows) - through} passed, {through} failed")
    return 1 if through else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="probe this running server instead of starting one (loopback only)")
    parser.add_argument("--model", help="model folder the started server serves (default: the shipped one)")
    parser.add_argument("--reports", type=int, default=5000, help="distinct reports sent (default 5000)")
    parser.add_argument("--rss-growth-mb", type=float, default=200.0, help="RSS growth allowed over the reports")
    parser.add_argument("--long-side", type=int, default=2000, help="side of the image of the long inference")
    args = parser.parse_args()
    if args.url:
        host = args.url.split("//", 1)[-1].split(":")[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            parser.error("probe servers on this machine only (127.0.0.1)")
        return run(args.url.rstrip("/"), args, None, None)
    with tempfile.TemporaryDirectory(prefix="probe-") as work:
        port = free_port()
        server = start_server(Path(work), args.model, port)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while time.time() < deadline:
                if server.poll() is not None:
                    print((Path(work) / "server.log").read_text()[-3000:])
                    return 2
                try:
                    if requests.get(f"{url}/info/", timeout=5).ok:
                        break
                except requests.ConnectionError:
                    time.sleep(1)
            return run(url, args, server.pid, Path(work) / "studies")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
