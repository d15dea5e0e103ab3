"""Two model files, one scan: whole-process ``smearscan scan`` runs over the same N real crops,
alternating A and B so both see the same machine speed; the speed-up is the median of the
per-pair ratios (issue 26: one network must scan at least 2x faster than four).

    python bench/models_ab.py --b model.onnx [--a default] [--images 2000] [--pairs 5]
                              [--out bench/results-models-ab.json]

``default`` is the embedded model. Crops are written as BMP from ../shared/data/cnmc when
present, else from tests/fixtures (see ``bench/throughput.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from throughput import scan_command, timed_process, write_crops  # noqa: E402


def model_path(spec: str) -> Path | None:
    return None if spec == "default" else Path(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="default", help="model A ('default': the embedded one)")
    parser.add_argument("--b", required=True, help="model B")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--out", type=Path, help="write the results JSON here too")
    args = parser.parse_args(argv)
    data = write_crops(args.work / f"crops-{args.images}", args.images)
    models = {"a": model_path(args.a), "b": model_path(args.b)}
    timed_process(scan_command(data, models["a"], args.work, []))  # warm the page cache
    seconds: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(args.pairs):
        for name in ("a", "b"):
            seconds[name].append(timed_process(scan_command(data, models[name], args.work, []))[0])
    ratios = [a / b for a, b in zip(seconds["a"], seconds["b"], strict=True)]
    record = {
        "a": args.a,
        "b": args.b,
        "images": args.images,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "seconds_a": [round(s, 2) for s in seconds["a"]],
        "seconds_b": [round(s, 2) for s in seconds["b"]],
        "crops_per_second_a": round(args.images / statistics.median(seconds["a"]), 1),
        "crops_per_second_b": round(args.images / statistics.median(seconds["b"]), 1),
        "speedup_b_over_a_per_pair": [round(r, 3) for r in ratios],
        "speedup_b_over_a_median": round(statistics.median(ratios), 3),
    }
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
