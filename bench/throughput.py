"""Throughput benchmarks for smearscan (scripts, not tests).

    python bench/throughput.py [--images 2000] [--model PATH] [--keras-run DIR] [--out FILE]

Measures, on this machine, in one run:
  1. end-to-end ``smearscan scan`` images/s over N real 450x450 BMP crops, against the
     baseline a user would otherwise run (the same weights in Keras ``model.predict`` over
     ``tf.keras.utils.image_dataset_from_directory`` with the same resize), when TensorFlow
     and the model's Keras run folder are available;
  2. the parts limit: onnxruntime model-only images/s at the best batch size and
     preprocess-only images/s, combined for the machine's cores, and end-to-end as a share
     of it;
  3. ``smearscan --help`` wall time.
Crops are written from ../shared/data/cnmc when present, else from tests/fixtures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smearscan.inference import load_classifier  # noqa: E402
from smearscan.preprocess import load_and_preprocess, read_image  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cnmc"
FIXTURES = ROOT / "tests" / "fixtures" / "cnmc"


def write_crops(target: Path, count: int) -> Path:
    """N real crops as BMP (the format labs' scanners write), in label folders so the Keras
    baseline can read them with image_dataset_from_directory."""
    marker = target / f".complete-{count}"
    if marker.exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    sources = sorted(SHARED.rglob("*.webp")) if SHARED.is_dir() else sorted(FIXTURES.rglob("*"))
    sources = [s for s in sources if s.is_file()]
    rng = np.random.default_rng(0)
    picks = rng.choice(len(sources), size=count, replace=count > len(sources))
    for i, index in enumerate(picks):
        source = sources[index]
        folder = target / source.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:06d}_{source.stem}.bmp"), cv2.imread(str(source)))
    marker.touch()
    return target


def timed_process(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (MB) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) // 1024


def smearscan_e2e(data: Path, model: Path | None, out_dir: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "smearscan", "scan", str(data), "--out",
               str(out_dir / "bench.csv"), "--no-html", "-q", *extra]  # fmt: skip
    if model:
        command += ["--model", str(model)]
    seconds, rss = timed_process(command)
    files = sum(1 for _ in data.rglob("*.bmp"))
    return {"seconds": round(seconds, 2), "images_per_s": round(files / seconds, 1),
            "peak_rss_mb": rss, "command": " ".join(command[1:])}  # fmt: skip


KERAS_BASELINE = """
import sys, time, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, tensorflow as tf
model = keras.models.load_model(sys.argv[2])
started = time.perf_counter()
ds = tf.keras.utils.image_dataset_from_directory(
    sys.argv[1], labels=None, image_size=(128, 128), interpolation="area", batch_size=32,
    shuffle=False)
ds = ds.map(lambda x: x / 255.0)
p = model.predict(ds, verbose=0)
print("RESULT", len(p), time.perf_counter() - started)
"""


def keras_baseline(data: Path, keras_model: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", KERAS_BASELINE, str(data), str(keras_model)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:]}
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
    count = int(line.split()[1])
    return {"seconds": round(seconds, 2), "images_per_s": round(count / seconds, 1),
            "note": "whole process, TensorFlow import and model load included, as a user "
            "would run it"}  # fmt: skip


def model_only(model: Path | None, threads: int) -> dict:
    classifier = load_classifier(model, device="cpu", threads=threads)
    rates = {}
    for batch in (1, 8, 32, 64, 128):
        x = np.random.default_rng(0).random((batch, 128, 128, 3), dtype=np.float32)
        classifier.predict_raw(x)
        repeats = max(2, 256 // batch)
        started = time.perf_counter()
        for _ in range(repeats):
            classifier.predict_raw(x)
        rates[batch] = round(batch * repeats / (time.perf_counter() - started), 1)
    best = max(rates, key=rates.get)
    return {"images_per_s_by_batch": rates, "best_batch": best, "best_images_per_s": rates[best],
            "provider": classifier.provider}  # fmt: skip


def preprocess_only(data: Path, model: Path | None, limit: int = 400) -> dict:
    recipe = load_classifier(model, device="cpu").info.recipe
    files = sorted(data.rglob("*.bmp"))[:limit]
    started = time.perf_counter()
    for path in files:
        load_and_preprocess(path, recipe)
    per_image = (time.perf_counter() - started) / len(files)
    decode_started = time.perf_counter()
    for path in files:
        read_image(path)
    decode = (time.perf_counter() - decode_started) / len(files)
    return {"ms_per_image_one_core": round(per_image * 1000, 3),
            "decode_ms": round(decode * 1000, 3),
            "images_per_s_one_core": round(1 / per_image, 1)}  # fmt: skip


def help_time() -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "smearscan", "--help"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        times.append(time.perf_counter() - started)
    return round(min(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", type=Path, help="ONNX model (default: embedded)")
    parser.add_argument("--keras-run", type=Path, default=ROOT / "export" / "default_run",
                        help="run folder with model.keras for the baseline")  # fmt: skip
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--out", type=Path, help="write the results JSON here too")
    parser.add_argument("--scan-args", default="", help="extra smearscan scan arguments")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    data = write_crops(args.work / f"crops-{args.images}", args.images)
    results: dict = {
        "machine": f"{platform.machine()}, {cores} cores, {platform.python_version()}",
        "images": args.images,
    }
    results["smearscan_e2e"] = smearscan_e2e(data, args.model, args.work, args.scan_args.split())
    keras_model = args.keras_run / "model.keras"
    try:
        import tensorflow  # noqa: F401

        have_tf = True
    except ImportError:
        have_tf = False
    if have_tf and keras_model.exists():
        results["keras_baseline"] = keras_baseline(data, keras_model)
        if "images_per_s" in results["keras_baseline"]:
            results["speedup_vs_keras"] = round(
                results["smearscan_e2e"]["images_per_s"]
                / results["keras_baseline"]["images_per_s"], 2)  # fmt: skip
    model = model_only(args.model, threads=cores)
    pre = preprocess_only(data, args.model)
    results["model_only"] = model
    results["preprocess_only"] = pre
    # both stages share the cores: per image, the model needs 1/R_model s of all cores and
    # preprocessing (ms/1000)/cores s of them
    limit = 1.0 / (1.0 / model["best_images_per_s"] + pre["ms_per_image_one_core"] / 1000 / cores)
    results["parts_limit_images_per_s"] = round(limit, 1)
    results["e2e_share_of_limit"] = round(results["smearscan_e2e"]["images_per_s"] / limit, 3)
    results["help_seconds_min_of_5"] = help_time()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
