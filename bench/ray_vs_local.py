"""The Ray engine's overhead on one machine (a script, not a test).

    python bench/ray_vs_local.py [--files 5000] [--repeats 3] [--model PATH] [--out FILE]

Scans the same N crops (hard links to real BMP crops) with ``--engine local`` and
``--engine ray`` (a local Ray instance started by the scan itself, as a user without a
cluster would get), alternating, and reports images/s, the ratio ray/local and each
process's peak memory. On one 2-core machine a cluster's gain cannot show: this measures
what Ray costs, the price paid before it pays off on several machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from scale import build_share  # noqa: E402


def tree_rss_mb(root: int) -> int:
    """Resident memory of a process and all its descendants now (Ray's raylet and workers
    are descendants of a scan that started its own local instance)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        current = frontier.pop()
        children = [pid for pid, parent in parents.items() if parent == current]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in tree) // (1024 * 1024)


def scan(share: Path, out: Path, engine: str, model: Path | None) -> tuple[float, int]:
    """Wall seconds and the peak memory of the whole process tree, sampled every 0.2 s."""
    command = [
        sys.executable,
        "-m",
        "smearscan",
        "scan",
        str(share),
        "--out",
        str(out),
        "--no-html",
        "-q",
        "--engine",
        engine,
    ]
    if model is not None:
        command += ["--model", str(model)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env
    )
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss_mb(child.pid))
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    if child.returncode not in (0, 3):
        assert child.stderr is not None  # piped above
        raise RuntimeError(child.stderr.read().decode()[-2000:])
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", type=Path, help="ONNX model (default: embedded)")
    args = parser.parse_args()
    share = build_share(args.work / f"share-{args.files}", args.files) / "slides"
    files = sum(1 for _ in share.rglob("*.bmp"))
    runs: dict[str, list[float]] = {"local": [], "ray": []}
    peaks: dict[str, int] = {}
    for _ in range(args.repeats):
        for engine in ("local", "ray"):
            seconds, peak = scan(share, args.work / f"{engine}.csv", engine, args.model)
            runs[engine].append(seconds)
            peaks[engine] = max(peaks.get(engine, 0), peak)
    ratios = [local / ray for local, ray in zip(runs["local"], runs["ray"], strict=True)]
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": str(args.model or "embedded"),
        "files": files,
        "seconds": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "images_per_s_median": {k: round(files / statistics.median(v), 1) for k, v in runs.items()},
        "ray_share_of_local_median": round(statistics.median(ratios), 3),
        "peak_tree_rss_mb": peaks,
        "note": "whole processes, Ray's start-up included (a local instance per run)",
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
