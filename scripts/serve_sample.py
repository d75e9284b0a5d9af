"""Import the bundled sample (once) and start the MONAI Label server on 127.0.0.1 with the TextDiff app."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", default=str(ROOT / "runs" / "sample-studies"))
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--labeled", type=int, default=2, help="sample masks imported as final labels")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = parser.parse_args()

    studies = Path(args.studies)
    if not (studies / "datastore_v2.json").is_file():
        from textdiff.studies import import_lvit

        result = import_lvit(ROOT / "apps" / "textdiff" / "sample", studies, labels=args.labeled)
        print(f"imported {result['images']} sample images ({result['labeled']} labeled) into {studies}")
    url = f"http://{args.host}:{args.port}"
    print(f"\nTextDiff MONAI Label server starting at {url}\n"
          f"In 3D Slicer: MONAI Label module -> MONAI Label server: {url}  (then Fetch/Next Sample, type a report in\n"
          f"Options -> report or leave it empty to use the stored one, Run; Submit Label; Train)\n", flush=True)
    os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(ROOT / "apps" / "textdiff"),
               "--studies", str(studies), "--host", args.host, "--port", str(args.port)]
    for key, value in args.conf:
        command += ["--conf", key, value]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    sys.exit(main())
