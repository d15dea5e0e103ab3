"""Memory and incremental-rerun benchmarks (scripts, not tests).

    python bench/scale.py [--files 5000 50000] [--model PATH]

For each N: builds a share of N crop files (hard links to a pool of 200 real 450x450 BMP
crops, so that disk use stays small, spread over slides of 100), runs
``smearscan scan --state`` once (peak RSS of the whole process, images/s) and then again
with nothing changed (the no-op incremental rerun, files/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "cnmc"
FIXTURES = ROOT / "tests" / "fixtures" / "cnmc"


def build_share(root: Path, files: int, pool_size: int = 200) -> Path:
    marker = root / ".complete"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    pool = root / "pool"
    pool.mkdir(parents=True)
    sources = (
        sorted(SHARED.rglob("*.webp")) if SHARED.is_dir() else sorted(FIXTURES.rglob("*.webp"))
    )
    for i in range(pool_size):
        cv2.imwrite(str(pool / f"crop_{i:04d}.bmp"), cv2.imread(str(sources[i * 7 % len(sources)])))
    old = time.time() - 3600
    for i in range(files):
        slide = root / "slides" / f"slide_{i // 100:05d}"
        slide.mkdir(parents=True, exist_ok=True)
        os.link(pool / f"crop_{i % pool_size:04d}.bmp", slide / f"cell_{i:06d}.bmp")
    for crop in pool.iterdir():
        os.utime(crop, (old, old))
    marker.touch()
    return root


def run(command: list[str]) -> tuple[float, int, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return seconds, max(peak, before) // 1024, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {}
    for count in args.files:
        share = build_share(args.work / f"share-{count}", count)
        state = args.work / f"state-{count}.db"
        state.unlink(missing_ok=True)
        command = [sys.executable, "-m", "smearscan", "scan", str(share / "slides"), "--out",
                   str(args.work / f"scale-{count}.csv"), "--no-html", "-q", "--state",
                   str(state), "--min-age", "0"]  # fmt: skip
        if args.model:
            command += ["--model", str(args.model)]
        first_seconds, first_rss, first_line = run(command)
        rerun_seconds, rerun_rss, rerun_line = run(command)
        results[count] = {
            "first_run": {"seconds": round(first_seconds, 1),
                          "images_per_s": round(count / first_seconds, 1),
                          "peak_rss_mb": first_rss, "final_line": first_line},
            "noop_rerun": {"seconds": round(rerun_seconds, 2),
                           "files_per_s": round(count / rerun_seconds, 1),
                           "peak_rss_mb": rerun_rss, "final_line": rerun_line},
        }  # fmt: skip
        print(json.dumps({count: results[count]}, indent=2), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
