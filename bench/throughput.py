"""Throughput benchmarks for smearscan (scripts, not tests).

    python bench/throughput.py [--images 2000] [--model PATH] [--keras-run DIR] [--out FILE]
    python bench/throughput.py --qc-only --repeats 7 --out bench/results-qc.json

Measures, on this machine, in one run:
  1. end-to-end ``smearscan scan`` images/s over N real 450x450 BMP crops, against the
     baseline a user would otherwise run (the same weights in Keras ``model.predict`` over
     ``tf.keras.utils.image_dataset_from_directory`` with the same resize), when TensorFlow
     and the model's Keras run folder are available;
  2. the parts limit: onnxruntime model-only images/s at the best batch size and
     preprocess-only images/s (decode, quality control and preprocessing: the whole CPU
     stage), combined for the machine's cores, and end-to-end as a share of it;
  3. the cost of quality control: per crop (ms) and end to end, ``--qc default`` against
     ``--qc off`` in alternating whole-process runs;
  4. ``smearscan --help`` wall time.
``--qc-only`` runs 3 alone (and the per-crop cost of the CPU stage), for a check of quality
control's cost that does not need the rest.
Crops are written from ../shared/data/cnmc when present, else from tests/fixtures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# smearscan before cv2, as in the CLI: it sets OpenCV's header pixel limit, which spares
# the slower Pillow header check
from smearscan.discover import Found  # noqa: E402
from smearscan.inference import load_classifier  # noqa: E402
from smearscan.preprocess import framed_and_resized, gray_of, read_image  # noqa: E402
from smearscan.qc import QualityControl, measure  # noqa: E402
from smearscan.stages import StageConfig, prepare_item  # noqa: E402

# isort: split
import cv2  # noqa: E402
import numpy as np  # noqa: E402

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
        cv2.imwrite(str(folder / f"{i:06d}_{source.stem}.bmp"), read_image(source, order="bgr"))
    marker.touch()
    return target


def timed_process(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (MB) of this one child process (``wait4``, so that other
    children such as the Keras runs do not count)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(child.pid, 0)
    child.returncode = 0  # reaped above
    return time.perf_counter() - started, usage.ru_maxrss // 1024


def scan_command(data: Path, model: Path | None, out_dir: Path, extra: list[str]) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "smearscan",
        "scan",
        str(data),
        "--out",
        str(out_dir / "bench.csv"),
        "--no-html",
        "-q",
        *extra,
    ]
    return command + (["--model", str(model)] if model else [])


KERAS_BASELINE = """
import sys, time, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, sys.argv[3])
import tensorflow as tf
from export.parents import load_parent, resolve_parent
model = load_parent(resolve_parent(sys.argv[2]))  # a CV folder: its folds averaged, as shipped
started = time.perf_counter()
ds = tf.keras.utils.image_dataset_from_directory(
    sys.argv[1], labels=None, image_size=(128, 128), interpolation="area", batch_size=32,
    shuffle=False)
ds = ds.map(lambda x: x / 255.0)
p = model.predict(ds, verbose=0)
print("RESULT", len(p), time.perf_counter() - started)
"""


def keras_run(data: Path, keras_model: Path) -> tuple[float, int]:
    """Wall seconds and image count of one whole-process Keras run of a run folder (a CV
    folder's fold models are averaged)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", KERAS_BASELINE, str(data), str(keras_model), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1:])
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
    return seconds, int(line.split()[1])


def paired_e2e(data: Path, command: list[str], keras_model: Path | None, repeats: int) -> dict:
    """smearscan and the Keras baseline in turn (A B A B ...), so that both see the same
    machine speed; the speed-up is the median of the per-pair ratios (these VMs drift)."""
    files = sum(1 for _ in data.rglob("*.bmp"))
    scans, rss, kerases, in_run = [], 0, [], []
    summary = Path(command[command.index("--out") + 1]).with_suffix(".summary.json")
    for _ in range(repeats):
        seconds, peak = timed_process(command)
        scans.append(seconds)
        rss = max(rss, peak)
        if keras_model is not None:
            kerases.append(keras_run(data, keras_model)[0])
        in_run.append(json.loads(summary.read_text())["seconds"])
    scan_s = statistics.median(scans)
    out: dict = {
        "smearscan_e2e": {
            "seconds": round(scan_s, 2),
            "images_per_s": round(files / scan_s, 1),
            "all_seconds": [round(x, 2) for x in scans],
            "peak_rss_mb": rss,
            "in_run_images_per_s": round(files / statistics.median(in_run), 1),
            "command": " ".join(command[1:]),
        },
    }
    if kerases:
        keras_s = statistics.median(kerases)
        out["keras_baseline"] = {
            "seconds": round(keras_s, 2),
            "images_per_s": round(files / keras_s, 1),
            "all_seconds": [round(x, 2) for x in kerases],
            "note": "whole process, TensorFlow import and model load included, as a user "
            "would run it",
        }
        ratios = [k / s for s, k in zip(scans, kerases, strict=True)]
        out["speedup_vs_keras"] = round(statistics.median(ratios), 2)
        out["speedup_per_pair"] = [round(r, 2) for r in ratios]
    return out


def model_only(model: Path | None, cores: int) -> dict:
    """Model-only images/s by batch size, the best of two ways to use the cores: one stream
    with ``cores`` onnxruntime threads, or ``cores`` concurrent streams of one thread each
    (the scanner's way)."""
    single = load_classifier(model, device="cpu", threads=cores)
    shared = load_classifier(model, device="cpu", threads=1)
    rates: dict = {"one_stream": {}, "concurrent_streams": {}}
    for batch in (1, 8, 32, 64, 128):
        x = np.random.default_rng(0).random((batch, 128, 128, 3), dtype=np.float32)
        repeats = max(4, 512 // batch)
        single.predict_raw(x)
        started = time.perf_counter()
        for _ in range(repeats):
            single.predict_raw(x)
        rates["one_stream"][batch] = round(batch * repeats / (time.perf_counter() - started), 1)

        def stream(_: int, x=x, repeats=repeats) -> None:
            for _ in range(repeats // cores):
                shared.predict_raw(x)

        shared.predict_raw(x)
        with ThreadPoolExecutor(cores) as pool:
            started = time.perf_counter()
            list(pool.map(stream, range(cores)))
        done = batch * (repeats // cores) * cores
        rates["concurrent_streams"][batch] = round(done / (time.perf_counter() - started), 1)
    mode, batch = max(((m, b) for m in rates for b in rates[m]), key=lambda k: rates[k[0]][k[1]])
    return {
        "images_per_s_by_batch": rates,
        "best_mode": mode,
        "best_batch": batch,
        "best_images_per_s": rates[mode][batch],
        "provider": single.provider,
    }


def preprocess_only(data: Path, model: Path | None, cores: int, limit: int = 1000) -> dict:
    """The CPU stage's throughput with every core busy (``cores`` threads, as when scanning:
    cores share caches and memory bandwidth, so one thread's speed times the cores would
    overstate it); best of 3 passes, so the limit is not understated. Also the cost of the
    quality-control measurements alone, per crop on one thread."""
    info = load_classifier(model, device="cpu").info
    qc = QualityControl.from_metadata(info.metadata.get("smearscan.qc"), "default")
    config = StageConfig(info.recipe, qc)
    files = [Found(str(p), p.name, "s") for p in sorted(data.rglob("*.bmp"))[:limit]]
    shares = [files[i::cores] for i in range(cores)]

    def work(share: list[Found]) -> None:
        for item in share:
            prepare_item(item, config)

    rates = []
    with ThreadPoolExecutor(cores) as pool:
        for _ in range(3):
            started = time.perf_counter()
            list(pool.map(work, shares))
            rates.append(len(files) / (time.perf_counter() - started))
    started = time.perf_counter()
    work(files)
    one_core = (time.perf_counter() - started) / len(files)
    images = [read_image(f.path, order="bgr") for f in files[:200]]
    grays = [gray_of(image, "bgr") for image in images]
    resized = [
        framed_and_resized(image, info.recipe, "bgr", gray)
        for image, gray in zip(images, grays, strict=True)
    ]
    started = time.perf_counter()
    for _ in range(5):
        for gray, crop in zip(grays, resized, strict=True):
            measure(gray, crop, info.recipe.background_threshold)
    qc_ms = (time.perf_counter() - started) / (5 * len(images)) * 1000
    return {
        "images_per_s_all_cores": round(max(rates), 1),
        "ms_per_image_one_thread_alone": round(one_core * 1000, 3),
        "qc_measure_ms_per_image": round(qc_ms, 3),
        "stage": "read + decode + QC + preprocess (stages.prepare_item)",
    }


def qc_cost(data: Path, model: Path | None, work: Path, repeats: int) -> dict:
    """End-to-end scans with quality control on and off, alternating, so both see the same
    machine speed; the slowdown is the median of the per-pair ratios."""
    on, off = [], []
    for _ in range(repeats):
        on.append(timed_process(scan_command(data, model, work, ["--qc", "default"]))[0])
        off.append(timed_process(scan_command(data, model, work, ["--qc", "off"]))[0])
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    return {
        "seconds_qc_default": [round(x, 2) for x in on],
        "seconds_qc_off": [round(x, 2) for x in off],
        "slowdown_per_pair": [round(r - 1, 4) for r in ratios],
        "slowdown_median": round(statistics.median(ratios) - 1, 4),
    }


def help_time() -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "smearscan", "--help"], check=True, stdout=subprocess.DEVNULL
        )
        times.append(time.perf_counter() - started)
    return round(min(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", type=Path, help="ONNX model (default: embedded)")
    parser.add_argument(
        "--keras-run",
        type=Path,
        default=ROOT / "export" / "default_model",
        help="run or CV folder of the model for the Keras baseline",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--out", type=Path, help="write the results JSON here too")
    parser.add_argument("--scan-args", default="", help="extra smearscan scan arguments")
    parser.add_argument(
        "--repeats", type=int, default=3, help="whole-process runs of each (medians)"
    )
    parser.add_argument(
        "--qc-only", action="store_true", help="measure only the cost of quality control"
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    data = write_crops(args.work / f"crops-{args.images}", args.images)
    results: dict = {
        "machine": f"{platform.machine()}, {cores} cores, {platform.python_version()}",
        "images": args.images,
    }
    if args.qc_only:
        results["preprocess_only"] = preprocess_only(data, args.model, cores)
        results["quality_control_cost"] = qc_cost(data, args.model, args.work, args.repeats)
        emit(results, args.out)
        return
    keras_model = args.keras_run
    have_tf = importlib.util.find_spec("tensorflow") is not None
    command = scan_command(data, args.model, args.work, args.scan_args.split())
    results.update(
        paired_e2e(
            data, command, keras_model if have_tf and keras_model.exists() else None, args.repeats
        )
    )
    model = model_only(args.model, cores)
    pre = preprocess_only(data, args.model, cores)
    results["model_only"] = model
    results["preprocess_only"] = pre
    # both stages share all the cores: per image, the model needs 1/R_model s of them and
    # preprocessing 1/R_pre s
    limit = 1.0 / (1.0 / model["best_images_per_s"] + 1.0 / pre["images_per_s_all_cores"])
    results["parts_limit_images_per_s"] = round(limit, 1)
    e2e = results["smearscan_e2e"]
    results["e2e_share_of_limit"] = round(e2e["images_per_s"] / limit, 3)
    results["in_run_share_of_limit"] = round(e2e["in_run_images_per_s"] / limit, 3)
    results["quality_control_cost"] = qc_cost(data, args.model, args.work, max(3, args.repeats))
    results["help_seconds_min_of_5"] = help_time()
    emit(results, args.out)


def emit(results: dict, out: Path | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
