"""The CUDA measurement of smearscan on a GPU machine (a script, not a test).

    python bench/gpu.py pack-crops [--per-call 180 --last 720]   # here: real crops to carry
    python bench/gpu.py measure --out DIR                         # there: the whole measurement

``pack-crops`` copies real C-NMC crops (lossless WebP, every donor) into ``.gpucrops/c1 ..
c6`` (git-ignored), one folder per device call so that each call carries one part of the
onnxruntime-gpu wheel and a share of the crops within the 64 MiB a call may carry.
``measure`` runs on the GPU machine after the wheel is installed into ``/tmp/site`` and
writes ``gpu-results.json`` and ``gpu-log.txt`` to ``--out``:

1. packaging: with the CPU and GPU builds both installed smearscan refuses to run (they
   share one module); with the GPU build alone ``--device auto`` picks CUDA and says so;
2. end to end: ``smearscan scan --device cuda --workers 16`` over >= 20,000 crops (the
   carried crops decoded once and hard-linked) at several batch sizes, BMP and WebP, and
   ``--device cpu`` for reference; images/s and the per-stage profile;
3. the CPU stage alone (decode, QC, preprocess) in 16 threads and in 16 processes: whether
   the threads scale or the interpreter lock holds them;
4. the model alone: batch 32/128/512, fp32 and fp16, plain ``run`` and IOBinding with the
   input already on the GPU, one fixed shape per batch;
5. the fp16 gate: fp16 ships only if it gives the fp32 label at the stored threshold on
   >= 99.5 % of the real crops.
docs/performance.md ("GPU") holds the figures of the run and the recipe that sends the parts.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "cnmc"
#: where pack-crops puts the crops here; on the machine each call copies its share to
#: $GPU_CROPS (outside the synced tree), which measure then reads
CARRY = Path(os.environ.get("GPU_CROPS", ROOT / ".gpucrops"))
CALLS = 6
FP16_AGREEMENT = 0.995
WORKERS = 16
#: --dry-run: the same steps on CPU (checks the script where there is no GPU)
DEVICE = {"name": "cuda"}


def pack_crops(per_call: int, last: int) -> None:
    """Every k-th crop of the manifest (all donors, both classes), as they are (lossless
    WebP), split over the device calls; slides are donors."""
    with open(SHARED / "manifest.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: r["path"])
    total = per_call * (CALLS - 1) + last
    step = max(1, len(rows) // total)
    chosen = rows[::step][:total]
    shutil.rmtree(CARRY, ignore_errors=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    if "/.gpucrops/" not in exclude.read_text().split():
        with open(exclude, "a") as handle:
            handle.write("/.gpucrops/\n")
    for index, row in enumerate(chosen):
        call = min(index // per_call + 1, CALLS)
        target = CARRY / f"c{call}" / f"donor_{row['patient']}" / Path(row["path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED / row["path"], target)
    for call in range(1, CALLS + 1):
        folder = CARRY / f"c{call}"
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"{folder}: {sum(1 for _ in folder.rglob('*.webp'))} crops, {size / 1e6:.1f} MB")


# -- on the GPU machine ------------------------------------------------------------------


class Log:
    """Prints a line and appends it to the log file (kept even if the run is cut short)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in ("/tmp/site", str(ROOT)) if p)
    return env


def smearscan(args: list[str], timeout: float = 300) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "smearscan", *args],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=timeout,
        cwd=ROOT,
    )
    return done.returncode, done.stderr[-3000:], time.perf_counter() - start


def packaging(out: Path, log: Log) -> dict:
    """The two-builds refusal, then the GPU build alone picking CUDA under --device auto."""
    result: dict = {}
    code, err, _ = smearscan(
        ["scan", "examples/slides", "--out", str(out / "both.csv"), "--no-html", "-q"]
    )
    result["both_builds_installed"] = {"exit": code, "says": err.strip().splitlines()[-2:]}
    log("both builds:", code, err.strip().splitlines()[-2:])
    removed = subprocess.run(
        [sys.executable, "-m", "pip", "uninstall", "-y", "onnxruntime"],
        capture_output=True,
        text=True,
    )
    result["cpu_build_removed"] = removed.returncode == 0
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import onnxruntime as o; o.preload_dlls(); "
            "print(o.__version__, o.get_available_providers())",
        ],
        capture_output=True,
        text=True,
        env=environment(),
    )
    result["providers"] = (probe.stdout + probe.stderr).strip()[-500:]
    log("providers:", result["providers"])
    code, err, wall = smearscan(
        ["scan", "examples/slides", "--out", str(out / "auto.csv"), "--no-html", "--device", "auto"]
    )
    summary = json.loads((out / "auto.summary.json").read_text()) if code in (0, 3) else {}
    result["device_auto"] = {
        "exit": code,
        "execution_provider": summary.get("execution_provider"),
        "log": [line for line in err.splitlines() if "provider" in line][-2:],
        "seconds": round(wall, 2),
    }
    log("device auto:", result["device_auto"])
    for name in ("both.csv", "auto.csv", "auto.summary.json"):
        (out / name).unlink(missing_ok=True)
    return result


def make_crops(work: Path, minimum: int, log: Log) -> dict:
    """The carried crops as WebP (as carried) and as BMP (what lab scanners write), each
    decoded once and hard-linked into copies until there are at least ``minimum`` files."""
    import cv2

    from smearscan.preprocess import read_image

    sources = sorted(CARRY.glob("c*/donor_*/*.webp"))
    base = {"webp": work / "base-webp", "bmp": work / "base-bmp"}
    for source in sources:
        donor = source.parent.name
        for folder in base.values():
            (folder / donor).mkdir(parents=True, exist_ok=True)
        os.link(source, base["webp"] / donor / source.name)
        image = read_image(source, order="bgr")
        cv2.imwrite(str(base["bmp"] / donor / (source.stem + ".bmp")), image)
    copies = -(-minimum // len(sources))
    trees = {}
    for kind, folder in base.items():
        tree = work / kind
        for copy in range(copies):
            for file in folder.rglob(f"*.{kind}"):
                target = tree / f"site_{copy:02d}" / file.parent.name / file.name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(file, target)
        trees[kind] = tree
        for file in folder.rglob("*"):  # into the page cache, as on a warm share
            if file.is_file():
                file.read_bytes()
    info = {"distinct_crops": len(sources), "copies": copies, "files": len(sources) * copies}
    log("crops:", info)
    return {"trees": {k: str(v) for k, v in trees.items()}, **info}


def end_to_end(tree: str, out: Path, name: str, options: list[str], log: Log) -> dict:
    report = out / f"{name}.csv"
    code, err, wall = smearscan(
        ["scan", tree, "--out", str(report), "--no-html", "-q", "--workers", str(WORKERS), *options]
    )
    summary_path = out / f"{name}.summary.json"
    if not summary_path.exists():
        log(name, "failed", code, err[-800:])
        return {"exit": code, "error": err[-800:]}
    summary = json.loads(summary_path.read_text())
    files = summary["overall"]["files"]
    figures = {
        "options": options,
        "exit": code,
        "files": files,
        "ok": summary["overall"]["cells"],
        "provider": summary["execution_provider"],
        "scan_seconds": summary["seconds"],
        "scan_files_per_second": summary["files_per_second"],
        "process_seconds": round(wall, 2),
        "process_files_per_second": round(files / wall, 1),
        "profile": summary.get("profile"),
    }
    log(name, {k: v for k, v in figures.items() if k != "profile"})
    if summary.get("profile"):
        log("  ", {s: v["share_of_worker_time"] for s, v in summary["profile"]["stages"].items()})
    report.unlink(missing_ok=True)
    summary_path.unlink()
    return figures


@functools.cache
def _stage_config():
    from smearscan.inference import load_classifier
    from smearscan.modelfile import KEY_QC
    from smearscan.qc import QualityControl
    from smearscan.stages import StageConfig

    info = load_classifier(device="cpu").info
    return StageConfig(
        info.recipe, QualityControl.from_metadata(info.metadata.get(KEY_QC), "default")
    )


def _prepare_paths(paths: list[str]) -> int:
    from smearscan.discover import Found
    from smearscan.stages import prepare_item

    config = _stage_config()
    for path in paths:
        prepare_item(Found(path, path, "s"), config)
    return len(paths)


def cpu_stage(tree: str, log: Log) -> dict:
    """Decode + QC + preprocess alone over the tree: 16 threads vs 16 processes."""
    paths = sorted(str(p) for p in Path(tree).rglob("*.bmp"))
    chunks = [paths[i : i + 64] for i in range(0, len(paths), 64)]
    result: dict[str, object] = {"files": len(paths)}
    for kind, pool_type in (("threads", ThreadPoolExecutor), ("processes", ProcessPoolExecutor)):
        with pool_type(max_workers=WORKERS) as pool:
            list(pool.map(_prepare_paths, chunks[:WORKERS]))  # warm up (imports, model)
            start = time.perf_counter()
            done = sum(pool.map(_prepare_paths, chunks))
            seconds = time.perf_counter() - start
        result[kind] = {"seconds": round(seconds, 2), "files_per_second": round(done / seconds)}
        log("cpu stage", kind, result[kind])
    return result


def real_inputs(log: Log):
    """The distinct carried crops, preprocessed as the scanner does."""
    import numpy as np

    from smearscan.inference import load_classifier
    from smearscan.preprocess import load_and_preprocess

    recipe = load_classifier(device="cpu").info.recipe
    sources = sorted(CARRY.glob("c*/donor_*/*.webp"))
    batch = np.stack([load_and_preprocess(str(p), recipe) for p in sources]).astype(np.float32)
    log("real inputs:", batch.shape)
    return batch


def model_only(inputs, work: Path, log: Log) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from smearscan.modelfile import default_model_path

    fp32 = default_model_path()
    fp16 = work / "model-fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(fp16))
    gpu = DEVICE["name"] == "cuda"
    providers: list[str | tuple[str, dict]] = (
        [("CUDAExecutionProvider", {"device_id": 0})] if gpu else []
    )
    providers.append("CPUExecutionProvider")
    result: dict = {}
    for precision, path in (("fp32", fp32), ("fp16", fp16)):
        session = ort.InferenceSession(str(path), providers=providers)
        name, output = session.get_inputs()[0].name, session.get_outputs()[0].name
        for batch_size in (32, 128, 512):
            reps = -(-batch_size // len(inputs))
            x = np.ascontiguousarray(np.concatenate([inputs] * reps)[:batch_size])
            for _ in range(5):
                session.run(None, {name: x})
            runs = max(20, 20_000 // batch_size) if gpu else 2
            start = time.perf_counter()
            for _ in range(runs):
                session.run(None, {name: x})
            plain = runs * batch_size / (time.perf_counter() - start)
            binding = session.io_binding()
            place = "cuda" if gpu else "cpu"
            on_gpu = ort.OrtValue.ortvalue_from_numpy(x, place, 0)
            binding.bind_ortvalue_input(name, on_gpu)
            binding.bind_output(output, place)
            for _ in range(5):
                session.run_with_iobinding(binding)
            start = time.perf_counter()
            for _ in range(runs):
                session.run_with_iobinding(binding)
            bound = runs * batch_size / (time.perf_counter() - start)
            key = f"{precision}_b{batch_size}"
            result[key] = {
                "plain_images_per_second": round(plain),
                "iobinding_images_per_second": round(bound),
            }
            log("model only", key, result[key])
    return result


def fp16_gate(inputs, work: Path, log: Log) -> dict:
    """fp16 against fp32 labels at the stored threshold, through the scanner's own classes."""
    import numpy as np

    from smearscan.inference import load_classifier
    from smearscan.policy import policy_for_model

    labels: dict[str, Any] = {}
    for precision, path in (("fp32", None), ("fp16", work / "model-fp16.onnx")):
        classifier = load_classifier(path, device=DEVICE["name"])
        info = classifier.info
        policy = policy_for_model(info.labels, info.positive_class, info.metadata)
        probabilities = np.concatenate(
            [classifier.predict(inputs[i : i + 128]) for i in range(0, len(inputs), 128)]
        )
        labels[precision] = [policy.cell_label(list(row)) for row in probabilities]
        labels[precision + "_p"] = probabilities
    agree = float(np.mean([a == b for a, b in zip(labels["fp32"], labels["fp16"], strict=True)]))
    delta = float(np.abs(labels["fp32_p"] - labels["fp16_p"]).max())
    result = {
        "crops": len(inputs),
        "label_agreement": round(agree, 5),
        "max_abs_probability_difference": delta,
        "gate": FP16_AGREEMENT,
        "passes": agree >= FP16_AGREEMENT,
    }
    log("fp16 gate:", result)
    return result


def machine() -> dict:
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except FileNotFoundError:
        smi = "no nvidia-smi"
    return {"gpu": smi, "cpus": os.cpu_count(), "python": platform.python_version()}


STEPS = ("packaging", "end_to_end", "cpu_stage", "model_only", "fp16_gate")


def measure(
    out: Path, minimum: int, steps: list[str], only: list[str] | None = None, dry_run: bool = False
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu-log.txt")
    results: dict = {"machine": machine(), "steps": steps}
    log("machine:", results["machine"])
    work = Path("/tmp/gpu-crops")
    shutil.rmtree(work, ignore_errors=True)
    if dry_run:
        DEVICE["name"] = "cpu"

    def save() -> None:
        (out / "gpu-results.json").write_text(json.dumps(results, indent=2))

    if "packaging" in steps and not dry_run:  # (it uninstalls the CPU build)
        results["packaging"] = packaging(out, log)
    results["crops"] = make_crops(work, minimum, log)
    save()
    trees = results["crops"]["trees"]
    cuda = ["--device", DEVICE["name"]]
    runs = {
        "cuda_bmp_threads_b32": (
            trees["bmp"],
            [*cuda, "--decode", "threads", "--batch-size", "32"],
        ),
        "cuda_bmp_b32": (trees["bmp"], [*cuda, "--decode", "processes", "--batch-size", "32"]),
        "cuda_bmp_b128": (trees["bmp"], [*cuda, "--decode", "processes", "--batch-size", "128"]),
        "cuda_bmp_b256": (trees["bmp"], [*cuda, "--decode", "processes", "--batch-size", "256"]),
        "cuda_bmp_b128_qc_off": (trees["bmp"], [*cuda, "--batch-size", "128", "--qc", "off"]),
        "cuda_webp_b128": (trees["webp"], [*cuda, "--batch-size", "128"]),
        "cpu_bmp_threads_b8": (trees["bmp"], ["--device", "cpu", "--batch-size", "8"]),
    }
    if "end_to_end" in steps:
        results["end_to_end"] = {}
        for name, (tree, options) in runs.items():
            if only and name not in only:
                continue
            try:
                results["end_to_end"][name] = end_to_end(tree, out, name, options, log)
            except subprocess.TimeoutExpired:
                results["end_to_end"][name] = {"error": "timed out"}
            save()
    inputs = real_inputs(log) if {"model_only", "fp16_gate"} & set(steps) else None
    later = {
        "cpu_stage": lambda: cpu_stage(trees["bmp"], log),
        "model_only": lambda: model_only(inputs, work, log),
        "fp16_gate": lambda: fp16_gate(inputs, work, log),
    }
    for name, step in later.items():
        if name not in steps:
            continue
        try:
            results[name] = step()
        except Exception as exc:  # noqa: BLE001  (keep what the other steps measured)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(name, "failed:", results[name])
        save()
    log("done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack-crops")
    pack.add_argument("--per-call", type=int, default=180)
    pack.add_argument("--last", type=int, default=720)
    run = commands.add_parser("measure")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--files", type=int, default=40_000, help="at least this many crops")
    run.add_argument("--dry-run", action="store_true", help="on CPU, to check the script")
    run.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of steps")
    run.add_argument("--runs", help="comma-separated end-to-end runs (default: all)")
    args = parser.parse_args()
    if args.command == "pack-crops":
        pack_crops(args.per_call, args.last)
    else:
        sys.path.insert(0, str(ROOT))
        only = args.runs.split(",") if args.runs else None
        measure(args.out, args.files, args.steps.split(","), only, args.dry_run)


if __name__ == "__main__":
    main()
