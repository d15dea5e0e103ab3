"""Memory and incremental-rerun benchmarks (scripts, not tests).

    python bench/scale.py [--files 5000 50000] [--model PATH]

For each N: builds a share of N crop files (hard links to a pool of 200 real 450x450 BMP
crops, so that disk use stays small, spread over slides of 100), runs
``smearscan scan --state`` once (peak RSS of the whole process, images/s) and then again
with nothing changed (the no-op incremental rerun, files/s; median of ``--reruns`` runs, as
these shared VMs vary by ±20 % from run to run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2

from smearscan.preprocess import read_image

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
        source = sources[i * 7 % len(sources)]
        cv2.imwrite(str(pool / f"crop_{i:04d}.bmp"), read_image(source, order="bgr"))
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
    """Wall seconds, peak RSS (MB) of this one child (``wait4``) and its last stderr line."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None  # piped above
    stderr = child.stderr.read()
    _, _, usage = os.wait4(child.pid, 0)
    child.returncode = 0  # reaped above
    seconds = time.perf_counter() - started
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return seconds, usage.ru_maxrss // 1024, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reruns", type=int, default=7, help="no-op reruns (median)")
    args = parser.parse_args()
    results = {}
    for count in args.files:
        share = build_share(args.work / f"share-{count}", count)
        state = args.work / f"state-{count}.db"
        state.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "smearscan",
            "scan",
            str(share / "slides"),
            "--out",
            str(args.work / f"scale-{count}.csv"),
            "--no-html",
            "-q",
            "--state",
            str(state),
            "--min-age",
            "0",
        ]
        if args.model:
            command += ["--model", str(args.model)]
        first_seconds, first_rss, first_line = run(command)
        reruns = [run(command) for _ in range(args.reruns)]
        rerun_seconds = statistics.median(r[0] for r in reruns)
        rerun_rss, rerun_line = max(r[1] for r in reruns), reruns[-1][2]
        results[count] = {
            "first_run": {
                "seconds": round(first_seconds, 1),
                "images_per_s": round(count / first_seconds, 1),
                "peak_rss_mb": first_rss,
                "final_line": first_line,
            },
            "noop_rerun": {
                "seconds": round(rerun_seconds, 2),
                "files_per_s": round(count / rerun_seconds, 1),
                "all_seconds": [round(r[0], 2) for r in reruns],
                "peak_rss_mb": rerun_rss,
                "final_line": rerun_line,
            },
        }
        print(json.dumps({count: results[count]}, indent=2), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
