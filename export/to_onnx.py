"""Export a training run, or a cross-validated recipe, to a self-describing ONNX model.

    python -m export.to_onnx runs/NAME --out model.onnx                  # one training run
    python -m export.to_onnx runs/cv-NAME --out model.onnx               # the folds' ensemble
    python -m export.to_onnx runs/cv-NAME --weights runs/all-NAME --out model.onnx

From a cross-validation folder (``python -m export.cv``) the file gets the rules fitted on
the pooled out-of-fold predictions of every donor (temperature, cell threshold, slide rule)
and the out-of-fold metrics; its weights are the fold models averaged inside one graph
(``--weights ensemble``, the default) or one run trained on every donor with the same
recipe. From a single run, the rules are fitted on that run's validation patients.

Every file carries its labels, preprocessing, decision rule, quality-control limits
(percentiles of its training crops), provenance and intended use. The export fails, and
leaves no file, if ONNX differs from Keras by more than 1e-4 on real crops.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from export.config import default_positive
from export.data import Sample, discover_dataset, load_arrays
from export.donors import Rules, fit_rules, parse_operating_point, read_predictions
from export.embedding import Whitening, embeddings_of, members_of, with_distance
from export.parents import cv_folds
from export.shift import FOCUS_SHIFTS, shifts
from smearscan import __version__, qc
from smearscan import modelfile as mf
from smearscan.inference import apply_temperature, load_classifier
from smearscan.metrics import classification_metrics
from smearscan.policy import SLIDE_RULES, DecisionPolicy
from smearscan.preprocess import Recipe, framed_and_resized, gray_of, read_image, unit_range

log = logging.getLogger("export.to_onnx")

OPSET = 17
PARITY_TOLERANCE = 1e-4
#: Relative difference allowed between Keras's and ONNX's embedding distances (float32
#: sums over a few hundred units).
DISTANCE_TOLERANCE = 1e-3
CNMC_DESCRIPTION = (
    "C-NMC 2019 (ISBI 2019 ALL challenge) training set, Gupta & Gupta, The Cancer Imaging "
    "Archive, doi:10.7937/tcia.2019.dc64i46r, CC BY 3.0"
)


class ExportError(RuntimeError):
    pass


DEFAULT_WORKERS = os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What one export is asked to do: the library's input, so that a caller other than
    the command line (a test, a lab's script) passes checked values, not a namespace."""

    run: Path
    out: Path
    #: with a CV folder: 'ensemble' (the fold models averaged in one graph) or a run folder
    #: trained on every donor with the same recipe
    weights: str = "ensemble"
    data: Path | None = None
    positive: str | None = None
    #: single runs only (a CV folder brings its own): 'balanced' or 'sensitivity:X'
    operating_point: str = "balanced"
    slide_rule: str = "mean"
    min_cells: int = 10
    int8: bool = False
    calibration: Path | None = None
    calibration_images: int = 256
    int8_min_agreement: float = 0.995
    parity_images: int = 64
    qc_images: int = 0
    description: str | None = None
    workers: int = DEFAULT_WORKERS

    def __post_init__(self) -> None:
        parse_operating_point(self.operating_point)
        checks = (
            (self.slide_rule in SLIDE_RULES, f"slide_rule must be one of {SLIDE_RULES}"),
            (self.min_cells >= 1, "min_cells must be at least 1"),
            (self.calibration_images >= 1, "calibration_images must be at least 1"),
            (
                self.int8_min_agreement >= 0.0,
                "int8_min_agreement must be 0 or more (above 1: never)",
            ),
            (self.parity_images >= 1, "parity_images must be at least 1"),
            (self.qc_images >= 0, "qc_images must be 0 (all) or more"),
            (self.workers >= 1, "workers must be at least 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def parse_args(argv: list[str] | None = None) -> ExportOptions:
    p = argparse.ArgumentParser(
        prog="python -m export.to_onnx",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", type=Path, help="a training run folder or an export.cv folder")
    p.add_argument("--out", required=True, type=Path, help="ONNX file to write")
    p.add_argument(
        "--weights",
        default=ExportOptions.weights,
        help="with a CV folder: 'ensemble' (the fold models averaged in one graph) or a run "
        "folder trained on every donor with the same recipe",
    )
    p.add_argument("--data", type=Path, help="training data folder (default: the run's)")
    p.add_argument("--positive", help="the positive class (default: 'all' if present)")
    p.add_argument(
        "--operating-point",
        default=ExportOptions.operating_point,
        help="single runs: 'balanced' or 'sensitivity:X' (a CV folder brings its own)",
    )
    p.add_argument(
        "--slide-rule",
        default=ExportOptions.slide_rule,
        choices=SLIDE_RULES,
        help="single runs: the slide score (a CV folder brings its own)",
    )
    p.add_argument(
        "--min-cells",
        type=int,
        default=ExportOptions.min_cells,
        help="fewer usable cells: 'insufficient'",
    )
    p.add_argument("--int8", action="store_true", help="also write <out>.int8.onnx (static QDQ)")
    p.add_argument("--calibration", type=Path, help="images for INT8 calibration")
    p.add_argument("--calibration-images", type=int, default=ExportOptions.calibration_images)
    p.add_argument(
        "--int8-min-agreement",
        type=float,
        default=ExportOptions.int8_min_agreement,
        help="write the INT8 file only if, on every class of validation crops, at least this "
        "share get the label the fp32 model gives (calibrated, at the stored threshold)",
    )
    p.add_argument("--parity-images", type=int, default=ExportOptions.parity_images)
    p.add_argument(
        "--qc-images",
        type=int,
        default=ExportOptions.qc_images,
        help="training crops measured for QC limits (0 = all)",
    )
    p.add_argument("--description", help="training data description for the metadata")
    p.add_argument("--workers", type=int, default=ExportOptions.workers)
    namespace = p.parse_args(argv)
    try:
        return ExportOptions(**vars(namespace))
    except ValueError as exc:
        p.error(str(exc))


def convert(keras_model, input_size: int):
    """Keras -> ONNX ModelProto with a named, dynamic batch axis."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, input_size, input_size, 3), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(keras_model, input_signature=spec, opset=OPSET)
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


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


def qc_features(
    samples: list[Sample], recipe: Recipe, workers: int
) -> dict[str, list[qc.QCFeatures]]:
    """The QC measurements of training crops, through the scanner's own functions: as they
    are (``"none"``) and under each of the shift suite's :data:`export.shift.FOCUS_SHIFTS`,
    which the default focus limits must pass."""
    shifted = {name: shifts(0)[name] for name in FOCUS_SHIFTS}

    def measured(image: np.ndarray) -> qc.QCFeatures:
        gray = gray_of(image, "bgr")
        return qc.measure(
            gray, framed_and_resized(image, recipe, "bgr", gray), recipe.background_threshold
        )

    def one(sample: Sample) -> dict[str, qc.QCFeatures] | None:
        try:
            image = read_image(sample.path, order="bgr")
        except ValueError:
            return None
        return {"none": measured(image)} | {
            name: measured(shift(image)) for name, shift in shifted.items()
        }

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = [f for f in pool.map(one, samples) if f is not None]
    return {name: [f[name] for f in found] for name in ("none", *FOCUS_SHIFTS)}


#: Name prefix of an averaged ensemble's Keras model (followed by the member count).
ENSEMBLE_PREFIX = "ensemble_of_"


def load_keras(path: Path):
    import keras

    return keras.models.load_model(path, compile=False)


def ensemble_model(members: list, input_size: int):
    """One Keras graph averaging ``members``' probabilities: one file, one session."""
    import keras

    inputs = keras.Input((input_size, input_size, 3), name="image")
    outputs = []
    for index, member in enumerate(members):
        renamed = keras.Model(member.input, member.output, name=f"member_{index}")
        outputs.append(renamed(inputs))
    averaged = keras.layers.Average(name="probabilities")(outputs)
    return keras.Model(inputs, averaged, name=f"{ENSEMBLE_PREFIX}{len(members)}")


def read_recipe(config: dict) -> Recipe:
    return Recipe.from_json(json.dumps(config["recipe"]))


class Source:
    """What an export starts from: weights, labels, recipe, rules and metrics."""

    def __init__(self, args: ExportOptions) -> None:
        run = args.run
        self.cv = (run / "cv.json").exists()
        if self.cv:
            self.report = json.loads((run / "cv.json").read_text())
            folds = cv_folds(run)
            self.config = json.loads((folds[0] / "config.json").read_text())
            if args.weights == "ensemble":
                self.members = [f / "model.keras" for f in folds]
                self.weights_config = None
            else:
                weights = Path(args.weights)
                self.members = [weights / "model.keras"]
                self.weights_config = json.loads((weights / "config.json").read_text())
                if read_recipe(self.weights_config) != read_recipe(self.config):
                    raise ExportError(f"{weights} was trained with another preprocessing")
        else:
            self.report = None
            self.config = json.loads((run / "config.json").read_text())
            self.members = [run / "model.keras"]
            self.weights_config = None
        if self.config.get("slide_colour"):
            raise ExportError(
                f"{run} was trained with per-slide colour normalisation (--slide-colour), "
                "which the scanner does not run yet: its model file would be scanned without it"
            )
        self.labels: list[str] = self.config["labels"]
        self.recipe = read_recipe(self.config)
        self.positive = (
            args.positive or self.config.get("positive_class") or default_positive(self.labels)
        )
        if self.positive not in self.labels:
            raise ExportError(f"--positive {self.positive!r} is not one of {self.labels}")

    def training_patients(self, samples: list[Sample]) -> list[Sample]:
        """The crops the shipped weights saw (QC limits come from them)."""
        if self.cv and self.weights_config is None:
            return samples  # the folds together saw every donor
        config = self.weights_config or self.config
        validation = set(config["split"]["val_patients"])
        return [s for s in samples if s.patient not in validation]

    def rules_and_metrics(self, args: ExportOptions) -> tuple[Rules, dict, str]:
        if self.cv:
            final = self.report["rules_on_all_donors"]
            rules = Rules(
                final["temperature"], final["threshold"], final["slide_rule"], final["slide_cutoff"]
            )
            fitted = self.report["cross_fitted"]
            metrics = {
                "evaluated_on": f"out-of-fold predictions of all {fitted['donors']} donors "
                "(grouped cross-validation; each donor predicted by the fold model that never "
                "saw it; thresholds cross-fitted)",
                "out_of_fold": {
                    **fitted["pooled"],
                    "macro_sensitivity": fitted["macro_sensitivity"],
                    "macro_specificity": fitted["macro_specificity"],
                    "worst_sensitivity": fitted["worst_sensitivity"],
                    "worst_specificity": fitted["worst_specificity"],
                    "slide_call_accuracy": fitted["slide_call_accuracy"],
                },
                "recipe": self.report.get("recipe"),
            }
            where = "pooled out-of-fold predictions of every donor"
            return rules, metrics, where
        predictions = read_predictions(args.run / "val_predictions.csv", self.labels)
        rules = fit_rules(
            predictions, self.positive, parse_operating_point(args.operating_point), args.slide_rule
        )
        calibrated = apply_temperature(predictions.probabilities, rules.temperature)
        policy = DecisionPolicy(
            tuple(self.labels),
            self.positive,
            rules.threshold,
            rules.slide_rule,
            rules.slide_cutoff,
            1,
        )
        from export.donors import summarize

        summary = summarize(predictions, calibrated, policy)
        metrics = {
            "evaluated_on": f"{summary['donors']} validation patients of one split "
            "(rules fitted on the same patients: optimistic)",
            "validation": {
                **summary["pooled"],
                "macro_specificity": summary["macro_specificity"],
                "macro_sensitivity": summary["macro_sensitivity"],
                "slide_call_accuracy": summary["slide_call_accuracy"],
            },
        }
        return rules, metrics, "validation patients of one split"


def export(args: ExportOptions) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import onnx

    source = Source(args)
    labels, recipe, positive = source.labels, source.recipe, source.positive
    members = [load_keras(path) for path in source.members]
    model = members[0] if len(members) == 1 else ensemble_model(members, recipe.input_size)
    networks = members if len(members) > 1 else members_of(members[0])

    data_root = args.data or Path(source.config["data"])
    samples = discover_dataset(data_root)
    rng = np.random.default_rng(0)

    def pick(pool: list[Sample], n: int) -> list[Sample]:
        order = rng.permutation(len(pool))[:n]
        return [pool[i] for i in sorted(order)]

    parity_x, _ = load_arrays(pick(samples, args.parity_images), recipe)
    parity_x = unit_range(parity_x)

    rules, metrics, fitted_on = source.rules_and_metrics(args)
    trained_on = source.training_patients(samples)
    qc_samples = pick(trained_on, args.qc_images) if args.qc_images else trained_on
    qc_x, _ = load_arrays(qc_samples, recipe, args.workers)
    embeddings = embeddings_of(networks, unit_range(qc_x))
    del qc_x
    whitening = Whitening.fit(embeddings)
    exported = with_distance(networks, recipe.input_size, whitening)
    measured = qc_features(qc_samples, recipe, args.workers)
    qc_metadata = qc.fit(
        measured.pop("none"),
        f"{len(qc_samples)} training crops",
        embedding_distances=whitening.distances(embeddings),
        embedding_method=whitening.method,
        shifted=measured,
    )
    policy = DecisionPolicy(
        tuple(labels),
        positive,
        rules.threshold if len(labels) == 2 else None,
        rules.slide_rule,
        rules.slide_cutoff,
        args.min_cells,
    )
    decision_text = policy.to_metadata(
        fitted_on=fitted_on,
        operating_point=(source.report or {}).get("operating_point", args.operating_point),
    )
    decision = json.loads(decision_text)
    # the temperature only: the threshold is part of the decision rule, stored once there
    calibration_info = {"temperature": round(rules.temperature, 4), "fitted_on": fitted_on}

    proto = convert(exported, recipe.input_size)
    description = args.description or (
        CNMC_DESCRIPTION if "cnmc" in str(data_root).lower() else f"folder {data_root.name}"
    )
    split = source.config["split"]
    if source.cv and source.weights_config is not None:
        how = (
            "grouped cross-validation over donors chose the recipe and the rules; the weights "
            "are one network trained on every donor with that recipe"
        )
    elif source.cv and len(members) > 1:
        how = (
            "grouped cross-validation over donors; the weights are the average of the "
            f"{len(members)} fold models"
        )
    else:
        how = split["method"]
    training = {
        "description": description,
        "donors": len({s.patient for s in trained_on}),
        "crops": len(trained_on),
        "split": how,
        "val_patients": [] if source.cv else split["val_patients"],
    }
    entries = {
        mf.KEY_SCHEMA: str(mf.METADATA_VERSION),
        mf.KEY_LABELS: json.dumps(labels),
        mf.KEY_POSITIVE: positive,
        mf.KEY_RECIPE: recipe.to_json(),
        mf.KEY_ARCHITECTURE: json.dumps(source.config["architecture"]),
        mf.KEY_TRAINING_DATA: json.dumps(training),
        mf.KEY_METRICS: json.dumps(metrics),
        mf.KEY_CALIBRATION: json.dumps(calibration_info),
        mf.KEY_DECISION: decision_text,
        mf.KEY_QC: json.dumps(qc_metadata),
        mf.KEY_CREATED: datetime.now(timezone.utc).isoformat(timespec="seconds"),
        mf.KEY_VERSION: __version__,
        mf.KEY_QUANTIZATION: "fp32",
        mf.KEY_INTENDED_USE: mf.INTENDED_USE,
    }
    if len(members) > 1:
        entries[mf.KEY_ENSEMBLE] = json.dumps(
            {
                "members": len(members),
                "description": "the probabilities of the fold models of a grouped "
                "cross-validation, averaged inside this graph",
                "member_sha256": [
                    hashlib.sha256(p.read_bytes()).hexdigest() for p in source.members
                ],
            }
        )
    elif model.name.startswith(ENSEMBLE_PREFIX):  # a fine-tuned ensemble stays one
        entries[mf.KEY_ENSEMBLE] = json.dumps(
            {
                "members": int(model.name.removeprefix(ENSEMBLE_PREFIX)),
                "description": "an averaged ensemble fine-tuned as one graph",
            }
        )
    parent = source.config.get("parent")
    if parent:
        entries[mf.KEY_PARENT] = json.dumps(parent)
    set_metadata(proto, entries)
    proto.producer_name = "smearscan"
    onnx.checker.check_model(proto)

    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "model.onnx"
        onnx.save_model(proto, str(candidate))
        classifier = load_classifier(candidate, device="cpu")
        onnx_out, onnx_distances = classifier.run(parity_x, distances=True)
        keras_out, keras_distances = exported.predict(parity_x, verbose=0)
        parity = float(np.abs(onnx_out - keras_out).max())
        log.info("parity on %d real images: max |keras - onnx| = %.2e", len(parity_x), parity)
        if not parity <= PARITY_TOLERANCE:
            raise ExportError(f"ONNX differs from Keras by {parity:.2e} > {PARITY_TOLERANCE}")
        drift = float(
            np.max(np.abs(onnx_distances - keras_distances) / np.maximum(keras_distances, 1.0))
        )
        if not drift <= DISTANCE_TOLERANCE:
            raise ExportError(f"ONNX's embedding distances differ from Keras's by {drift:.2e}")
        write_atomic_model(proto, args.out)
    report = {
        "out": str(args.out),
        "parity_max_abs_diff": parity,
        "calibration": calibration_info,
        "decision": decision,
        "qc_default_limits": qc_metadata["limits"]["default"],
    }
    if args.int8:
        validation = [s for s in samples if s.patient in set(split["val_patients"])] or samples
        report["int8"] = export_int8(args, recipe, labels, trained_on, validation, rng)
    log.info("wrote %s", args.out)
    return report


def int8_agreement(fp32, int8, images: np.ndarray, y: np.ndarray) -> dict:
    """How an INT8 twin changes what the scanner would report: the labels it gives
    (calibrated, at the stored decision rule) per true class, and max |delta P|."""
    from smearscan.policy import policy_for_model

    info = fp32.info
    policy = policy_for_model(info.labels, info.positive_class, info.metadata)
    p32 = np.concatenate([fp32.predict(images[i : i + 64]) for i in range(0, len(images), 64)])
    p8 = np.concatenate([int8.predict(images[i : i + 64]) for i in range(0, len(images), 64)])
    l32, l8 = policy.label_indices(p32), policy.label_indices(p8)
    per_class = {
        label: round(float((l32[y == i] == l8[y == i]).mean()), 5) if (y == i).any() else None
        for i, label in enumerate(info.labels)
    }
    m32 = classification_metrics(y, p32, info.labels, info.positive_class, l32)
    m8 = classification_metrics(y, p8, info.labels, info.positive_class, l8)
    return {
        "label_agreement_per_class": per_class,
        "label_agreement_min": min(v for v in per_class.values() if v is not None),
        "max_abs_prob_diff": round(float(np.abs(p32 - p8).max()), 5),
        "weighted_f1_fp32": round(m32["weighted_f1"], 5),
        "weighted_f1_int8": round(m8["weighted_f1"], 5),
        "evaluated_on": f"{len(images)} crops",
    }


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> None:
    """Static INT8, QDQ format, per-channel weights, calibrated on real images."""
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

    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_path),
            Reader(calibration, input_name),
            quant_format=QuantFormat.QDQ,
            calibrate_method=CalibrationMethod.MinMax,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )


def export_int8(
    args: ExportOptions,
    recipe: Recipe,
    labels: list[str],
    train_samples: list[Sample],
    val_samples: list[Sample],
    rng: np.random.Generator,
) -> dict:
    """Write <out>.int8.onnx only if the scanner would report the same labels with it."""
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
    calibration_x = unit_range(calibration_x)
    int8_path = args.out.with_suffix(".int8.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "int8.onnx"
        quantize_int8(args.out, raw, calibration_x)
        fp32 = load_classifier(args.out, device="cpu")
        proto = onnx.load(str(raw))
        set_metadata(proto, dict(fp32.info.metadata))
        onnx.save_model(proto, str(raw))
        candidate = load_classifier(raw, device="cpu")
        val_x, kept = load_arrays(val_samples, recipe)
        val_x = unit_range(val_x)
        y_val = np.array([labels.index(val_samples[i].label) for i in kept])
        quant = {
            "format": "static QDQ int8, per-channel weights",
            "calibration_images": int(len(calibration_x)),
            **int8_agreement(fp32, candidate, val_x, y_val),
        }
        if quant["label_agreement_min"] < args.int8_min_agreement:
            log.warning(
                "INT8 not written: label agreement %.4f < %.4f on some class",
                quant["label_agreement_min"],
                args.int8_min_agreement,
            )
            return {"path": None, "written": False, **quant}
        set_metadata(proto, {mf.KEY_QUANTIZATION: json.dumps(quant)})
        write_atomic_model(proto, int8_path)
    log.info("INT8: %s", quant)
    return {"path": str(int8_path), "written": True, **quant}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        report = export(args)
    except (ExportError, FileNotFoundError, ValueError, KeyError) as exc:
        log.error("export failed: %s", exc)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
