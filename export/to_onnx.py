"""Export a training run to a self-describing ONNX model (and optionally static INT8).

    python -m export.to_onnx runs/NAME --out model.onnx [--int8 [--calibration DIR]]

The export fails (and leaves no file) if the ONNX model's outputs differ from Keras' by more
than 1e-4 on real validation images.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from export.data import Sample, discover_dataset, load_arrays
from smearscan import __version__
from smearscan import modelfile as mf
from smearscan.inference import apply_temperature, load_classifier
from smearscan.metrics import classification_metrics, expected_calibration_error
from smearscan.preprocess import Recipe

log = logging.getLogger("export.to_onnx")

OPSET = 17
PARITY_TOLERANCE = 1e-4
CNMC_DESCRIPTION = (
    "C-NMC 2019 (ISBI 2019 ALL challenge) training set, Gupta & Gupta, The Cancer Imaging "
    "Archive, doi:10.7937/tcia.2019.dc64i46r, CC BY 3.0"
)


class ExportError(RuntimeError):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.to_onnx", description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="training run folder (python -m export.train --out)")
    p.add_argument("--out", required=True, type=Path, help="ONNX file to write")
    p.add_argument("--data", type=Path, help="training data folder (default: the run's)")
    p.add_argument("--int8", action="store_true", help="also write <out>.int8.onnx (static QDQ)")
    p.add_argument("--calibration", type=Path, help="images for INT8 calibration")
    p.add_argument("--calibration-images", type=int, default=256)
    p.add_argument(
        "--int8-min-agreement",
        type=float,
        default=0.995,
        help="write the INT8 file only if its argmax agrees with fp32 on at least this share "
        "of validation images",
    )
    p.add_argument("--parity-images", type=int, default=64)
    p.add_argument("--target-sensitivity", type=float, default=0.95)
    p.add_argument("--description", help="training data description for the metadata")
    return p.parse_args(argv)


def convert(keras_model, input_size: int):
    """Keras -> ONNX ModelProto with a named, dynamic batch axis."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, input_size, input_size, 3), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(keras_model, input_signature=spec, opset=OPSET)
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def fit_temperature(y: np.ndarray, probabilities: np.ndarray) -> float:
    """Temperature minimising validation negative log-likelihood (grid then refine)."""

    def nll(t: float) -> float:
        p = apply_temperature(probabilities, t)
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))

    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))
    best = min(grid, key=nll)
    fine = np.linspace(best * 0.93, best * 1.07, 29)
    return float(min(fine, key=nll))


def threshold_for_sensitivity(
    positive_true: np.ndarray, scores: np.ndarray, target: float
) -> float:
    """Largest threshold on P(positive) whose sensitivity on validation is >= target."""
    positives = np.sort(scores[positive_true])[::-1]
    if len(positives) == 0:
        return 0.5
    k = int(np.ceil(target * len(positives))) - 1
    return float(positives[min(max(k, 0), len(positives) - 1)])


def read_val_predictions(run: Path, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with open(run / "val_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    y = np.array([labels.index(r["label"]) for r in rows])
    p = np.array([[float(r[f"p_{c}"]) for c in labels] for r in rows])
    return y, p


def write_atomic_model(proto, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        os.chmod(tmp, 0o644)  # a model file is not sensitive; mkstemp made it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_metadata(proto, entries: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            item = proto.metadata_props.add()
            item.key, item.value = key, value


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    method: str = "minmax",
    exclude_ops: tuple[str, ...] = (),
) -> None:
    """Static INT8, QDQ format, per-channel weights, calibrated on real images.

    ``method``: minmax, percentile or entropy activation ranges; ``exclude_ops``: operator
    types left in fp32 (e.g. the dense layers, which cost little and are sensitive)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray, input_name: str) -> None:
            self.batches = iter(
                [{input_name: images[i : i + 16]} for i in range(0, len(images), 16)]
            )

        def get_next(self):
            return next(self.batches, None)

    import onnx

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    input_name = graph.input[0].name
    excluded = [node.name for node in graph.node if node.op_type in exclude_ops]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_path),
            Reader(calibration, input_name),
            quant_format=QuantFormat.QDQ,
            calibrate_method=methods[method],
            nodes_to_exclude=excluded,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )


def export(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import onnx

    run = args.run
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    labels: list[str] = config["labels"]
    recipe = Recipe(**config["recipe"])
    positive = "all" if "all" in labels else labels[0]
    model = keras.models.load_model(run / "model.keras")

    data_root = args.data or Path(config["data"])
    samples = discover_dataset(data_root)
    val_patients = set(config["split"]["val_patients"])
    val_samples = [s for s in samples if s.patient in val_patients]
    train_samples = [s for s in samples if s.patient not in val_patients]
    rng = np.random.default_rng(0)

    def pick(pool: list[Sample], n: int) -> list[Sample]:
        order = rng.permutation(len(pool))[:n]
        return [pool[i] for i in sorted(order)]

    parity_x, _ = load_arrays(pick(val_samples, args.parity_images), recipe)
    parity_x = parity_x.astype(np.float32) / np.float32(255.0)

    # calibration and operating threshold, fitted on the validation patients' predictions
    y_val, p_val = read_val_predictions(run, labels)
    temperature = fit_temperature(y_val, p_val)
    calibrated = apply_temperature(p_val, temperature)
    pos = labels.index(positive)
    threshold = threshold_for_sensitivity(y_val == pos, calibrated[:, pos], args.target_sensitivity)
    at_threshold = classification_metrics(
        y_val, calibrated, labels, positive,
        y_pred=np.where(calibrated[:, pos] >= threshold, pos, 1 - pos) if len(labels) == 2
        else None,
    )  # fmt: skip
    calibration_info = {
        "temperature": round(temperature, 4),
        "ece_before": round(expected_calibration_error(y_val, p_val), 4),
        "ece_after": round(expected_calibration_error(y_val, calibrated), 4),
        "threshold": round(threshold, 4),
        "threshold_rule": f"P({positive}) >= threshold gives sensitivity >= "
        f"{args.target_sensitivity:.2f} on the validation patients",
        "fitted_on": "validation patients",
        "at_threshold": {
            k: round(at_threshold[k], 4)
            for k in ("sensitivity", "specificity", "accuracy", "weighted_f1")
        },
    }

    proto = convert(model, recipe.input_size)
    description = args.description or (
        CNMC_DESCRIPTION if "cnmc" in str(data_root).lower() else f"folder {data_root.name}"
    )
    entries = {
        mf.KEY_SCHEMA: str(mf.METADATA_VERSION),
        mf.KEY_LABELS: json.dumps(labels),
        mf.KEY_POSITIVE: positive,
        mf.KEY_RECIPE: recipe.to_json(),
        mf.KEY_ARCHITECTURE: json.dumps(config["architecture"]),
        mf.KEY_TRAINING_DATA: json.dumps(
            {
                "description": description,
                "split": config["split"]["method"],
                "train_patients": len(config["split"]["train_patients"]),
                "val_patients": sorted(val_patients),
                "train_images": config["split"]["train_images"],
                "val_images": config["split"]["val_images"],
            }
        ),
        mf.KEY_METRICS: json.dumps(
            {"validation": metrics["validation"], "best_epoch": metrics["best_epoch"]}
        ),
        mf.KEY_CALIBRATION: json.dumps(calibration_info),
        mf.KEY_CREATED: datetime.now(timezone.utc).isoformat(timespec="seconds"),
        mf.KEY_VERSION: __version__,
        mf.KEY_QUANTIZATION: "fp32",
    }
    set_metadata(proto, entries)
    proto.producer_name = "smearscan"
    onnx.checker.check_model(proto)

    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "model.onnx"
        onnx.save_model(proto, str(candidate))
        classifier = load_classifier(candidate, device="cpu")
        onnx_out = classifier.predict_raw(parity_x)
        keras_out = model.predict(parity_x, verbose=0)
        parity = float(np.abs(onnx_out - keras_out).max())
        log.info("parity on %d real images: max |keras - onnx| = %.2e", len(parity_x), parity)
        if not parity <= PARITY_TOLERANCE:
            raise ExportError(f"ONNX differs from Keras by {parity:.2e} > {PARITY_TOLERANCE}")
        write_atomic_model(proto, args.out)
    report = {"out": str(args.out), "parity_max_abs_diff": parity, "calibration": calibration_info}

    if args.int8:
        report["int8"] = export_int8(
            args, recipe, labels, positive, train_samples, val_samples, rng
        )
    log.info("wrote %s", args.out)
    return report


def export_int8(args, recipe, labels, positive, train_samples, val_samples, rng) -> dict:
    """Write <out>.int8.onnx and measure it against fp32 on every validation image."""
    import onnx

    if args.calibration:
        pool = [
            Sample(p, p.parent.name, "") for p in sorted(args.calibration.rglob("*")) if p.is_file()
        ]
    else:
        pool = train_samples
    order = rng.permutation(len(pool))[: args.calibration_images]
    calibration_x, _ = load_arrays([pool[i] for i in sorted(order)], recipe)
    if len(calibration_x) == 0:
        raise ExportError("no readable calibration images")
    calibration_x = calibration_x.astype(np.float32) / np.float32(255.0)
    int8_path = args.out.with_suffix(".int8.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "int8.onnx"
        quantize_int8(args.out, raw, calibration_x)
        fp32 = load_classifier(args.out, device="cpu")
        proto = onnx.load(str(raw))
        # quantize_static keeps metadata_props; check and mark it
        val_x, kept = load_arrays(val_samples, recipe)
        val_x = val_x.astype(np.float32) / np.float32(255.0)
        y_val = np.array([labels.index(val_samples[i].label) for i in kept])
        candidate = load_classifier(raw, device="cpu")
        p32 = np.concatenate(
            [fp32.predict_raw(val_x[i : i + 64]) for i in range(0, len(val_x), 64)]
        )
        p8 = np.concatenate(
            [candidate.predict_raw(val_x[i : i + 64]) for i in range(0, len(val_x), 64)]
        )
        agreement = float((p32.argmax(1) == p8.argmax(1)).mean())
        m32 = classification_metrics(y_val, p32, labels, positive=positive)
        m8 = classification_metrics(y_val, p8, labels, positive=positive)
        quant = {
            "format": "static QDQ int8, per-channel weights",
            "calibration_images": int(len(calibration_x)),
            "argmax_agreement_vs_fp32": round(agreement, 5),
            "weighted_f1_fp32": round(m32["weighted_f1"], 5),
            "weighted_f1_int8": round(m8["weighted_f1"], 5),
            "max_abs_prob_diff": round(float(np.abs(p32 - p8).max()), 5),
            "evaluated_on": f"{len(val_x)} validation-patient images",
        }
        if agreement < args.int8_min_agreement:
            log.warning("INT8 not written: agreement %.4f < %.4f", agreement,
                        args.int8_min_agreement)  # fmt: skip
            return {"path": None, "written": False, **quant}
        set_metadata(proto, {**dict(fp32.info.metadata), mf.KEY_QUANTIZATION: json.dumps(quant)})
        write_atomic_model(proto, int8_path)
    log.info("INT8: %s", quant)
    return {"path": str(int8_path), "written": True, **quant}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        report = export(args)
    except (ExportError, FileNotFoundError, ValueError) as exc:
        log.error("export failed: %s", exc)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
