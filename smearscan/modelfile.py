"""Self-describing ONNX model files: the metadata keys and how to read them.

The export side writes these keys into ``metadata_props``; ``scan`` reads labels and the
preprocessing recipe from them, so a model file is all a scan needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from smearscan.preprocess import Recipe

#: Metadata schema version; bump when keys change meaning.
METADATA_VERSION = 1
DEFAULT_MODEL_NAME = "smearscan-vgg13.onnx"
INTENDED_USE = "research use only; not for diagnostic use"
#: A label is a short plain name: it becomes a CSV column (p_<label>), an HTML cell and a
#: folder name in evaluation, so it may not carry markup, separators or formula starts.
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,63}$")

KEY_SCHEMA = "smearscan.metadata_version"
KEY_LABELS = "smearscan.labels"
KEY_RECIPE = "smearscan.preprocessing"
KEY_ARCHITECTURE = "smearscan.architecture"
KEY_TRAINING_DATA = "smearscan.training_data"
KEY_METRICS = "smearscan.metrics"
KEY_CALIBRATION = "smearscan.calibration"
KEY_CREATED = "smearscan.created"
KEY_VERSION = "smearscan.version"
KEY_POSITIVE = "smearscan.positive_class"
KEY_QUANTIZATION = "smearscan.quantization"
KEY_DECISION = "smearscan.decision"
KEY_QC = "smearscan.qc"
KEY_ENSEMBLE = "smearscan.ensemble"
KEY_PARENT = "smearscan.parent"
KEY_INTENDED_USE = "smearscan.intended_use"


class ModelFileError(ValueError):
    """A model file that smearscan cannot use; the message says why."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about itself."""

    path: Path
    sha256: str
    labels: list[str]
    recipe: Recipe
    positive_class: str | None
    metadata: dict[str, str] = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def json_field(self, key: str) -> Any:
        """A JSON-valued metadata entry, parsed (any JSON value: the caller knows its key's
        shape, docs/model-file.md); None when absent."""
        text = self.metadata.get(key)
        return json.loads(text) if text else None

    def calibration(self) -> dict:
        """Temperature and operating threshold, when the export stored them."""
        value = self.json_field(KEY_CALIBRATION)
        return value if isinstance(value, dict) else {}


def default_model_path() -> Path:
    """The model shipped inside the package."""
    return Path(str(resources.files("smearscan") / "models" / DEFAULT_MODEL_NAME))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checked_labels(path: Path, text: str) -> list[str]:
    labels = json.loads(text)
    if not isinstance(labels, list) or len(labels) < 2:
        raise ModelFileError(f"{path}: labels must be a list of at least two names")
    if not all(isinstance(label, str) for label in labels):
        raise ModelFileError(f"{path}: labels must be strings, not {labels!r}")
    bad = [label for label in labels if not LABEL_PATTERN.match(label)]
    if bad:
        raise ModelFileError(
            f"{path}: unsafe label(s) {bad!r}: a label is 1-64 letters, digits, spaces or "
            "'_.+-', starting with a letter or digit"
        )
    if len({label.lower() for label in labels}) != len(labels):
        raise ModelFileError(f"{path}: labels must be distinct (ignoring case): {labels!r}")
    return labels


def _check_threshold(path: Path, name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFileError(f"{path}: {name} {value!r} is not a number")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ModelFileError(f"{path}: {name} {value!r} must be in [0, 1]")


#: The most cells a slide rule may ask for (a larger one would call no slide at all).
MAX_MIN_CELLS = 100_000


def _check_decision(path: Path, decision: dict) -> None:
    """The stored decision rule is consistent: objects where objects belong, a threshold
    rule that has its threshold, numbers in range."""
    cell, slide = decision.get("cell", {}), decision.get("slide", {})
    if not isinstance(cell, dict) or not isinstance(slide, dict):
        raise ModelFileError(f"{path}: the decision's 'cell' and 'slide' must be objects")
    if cell.get("rule") == "threshold" and "threshold" not in cell:
        raise ModelFileError(f"{path}: the cell rule 'threshold' has no threshold")
    _check_threshold(path, "decision threshold", cell.get("threshold"))
    _check_threshold(path, "slide cut-off", slide.get("cutoff"))
    if "rule" in slide and not isinstance(slide["rule"], str):
        raise ModelFileError(f"{path}: slide rule {slide['rule']!r} is not a name")
    cells = slide.get("min_cells")
    if cells is not None and (
        isinstance(cells, bool) or not isinstance(cells, int) or not 1 <= cells <= MAX_MIN_CELLS
    ):
        raise ModelFileError(
            f"{path}: min_cells {cells!r} must be a whole number in [1, {MAX_MIN_CELLS:,}]"
        )


def info_from_metadata(path: Path, metadata: dict[str, str]) -> ModelInfo:
    """Validate the smearscan metadata of a model file: every number a scan will use must
    be sane before any report is touched."""
    if KEY_LABELS not in metadata or KEY_RECIPE not in metadata:
        raise ModelFileError(
            f"{path} has no smearscan metadata (labels and preprocessing recipe); "
            "export it with `python -m export.to_onnx`"
        )
    try:
        schema = int(metadata.get(KEY_SCHEMA, "1"))
    except ValueError:
        raise ModelFileError(f"{path}: invalid metadata version") from None
    if schema > METADATA_VERSION:
        raise ModelFileError(
            f"{path} uses metadata version {schema}; this smearscan reads up to "
            f"{METADATA_VERSION}: upgrade smearscan"
        )
    try:
        labels = _checked_labels(path, metadata[KEY_LABELS])
        recipe = Recipe.from_json(metadata[KEY_RECIPE])
        calibration = json.loads(metadata.get(KEY_CALIBRATION) or "{}")
        decision = json.loads(metadata.get(KEY_DECISION) or "{}")
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path} has invalid smearscan metadata: {exc}") from None
    if not isinstance(calibration, dict) or not isinstance(decision, dict):
        raise ModelFileError(f"{path}: calibration and decision metadata must be objects")
    _check_decision(path, decision)
    _check_threshold(path, "calibration threshold", calibration.get("threshold"))
    positive = metadata.get(KEY_POSITIVE) or None
    if positive is not None and positive not in labels:
        raise ModelFileError(f"{path}: positive class {positive!r} is not one of {labels}")
    return ModelInfo(
        path=path,
        sha256=file_sha256(path),
        labels=labels,
        recipe=recipe,
        positive_class=positive,
        metadata=dict(metadata),
    )


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def describe(info: ModelInfo) -> str:
    """``smearscan model info`` for a person: what the file is, how it decides, what it was
    trained and validated on, with each number explained."""
    from smearscan.policy import policy_for_model

    def field_of(key: str) -> dict:
        value = info.json_field(key)
        return value if isinstance(value, dict) else {}

    policy = policy_for_model(info.labels, info.positive_class, info.metadata)
    recipe = info.recipe
    crop = {
        "window": f"a {recipe.window}x{recipe.window}-pixel window centred on the cell",
        "bbox": f"the cell's bounding box plus {recipe.margin:.0%} on each side (size-normalised)",
        "full": "the whole frame",
    }[recipe.crop]
    lines = [
        f"model        {info.path}",
        f"sha256       {info.sha256}",
        f"intended use {INTENDED_USE}",
        f"labels       {', '.join(info.labels)}"
        + (f" (positive class: {info.positive_class})" if info.positive_class else ""),
        f"input        {recipe.input_size}x{recipe.input_size} RGB: {crop}, resized with "
        f"{recipe.interpolation} interpolation"
        + (", Laplacian-of-Gaussian enhanced" if recipe.log_enhance else ""),
        f"cell rule    {policy.cell_rule_text()}",
    ]
    if policy.slide_rule_text():
        lines.append(f"slide rule   {policy.slide_rule_text()}")
    ensemble = field_of(KEY_ENSEMBLE)
    if ensemble:
        lines.append(
            f"ensemble     mean of {ensemble.get('members')} models "
            f"({ensemble.get('description', '')})"
        )
    architecture = field_of(KEY_ARCHITECTURE)
    if architecture:
        lines.append(
            f"network      {architecture.get('name')}, {architecture.get('params'):,} parameters"
        )
    calibration = info.calibration()
    if calibration:
        lines.append(
            f"calibration  temperature {calibration.get('temperature')} (divides the logits so "
            f"that P(class) matches observed frequencies; fitted on "
            f"{calibration.get('fitted_on', 'validation data')})"
        )
    metrics = field_of(KEY_METRICS)
    estimate = metrics.get("out_of_fold") or metrics.get("validation")
    if estimate:
        where = metrics.get("evaluated_on", "held-out patients")
        lines.append(f"validation   on {where}:")
        for key, text in (
            ("sensitivity", "share of ALL cells labelled positive (missed blasts: 1 - this)"),
            ("specificity", "share of normal cells labelled negative (false alarms: 1 - this)"),
            ("macro_specificity", "specificity averaged over normal donors, each donor once"),
            ("weighted_f1", "F1 of each class weighted by its cells"),
            ("roc_auc", "ranking quality, independent of the threshold"),
            ("slide_call_accuracy", "donors whose slide call was right"),
        ):
            if estimate.get(key) is not None:
                value = estimate[key]
                shown = _percent(value) if key != "roc_auc" else f"{value:.3f}"
                lines.append(f"  {key:<20} {shown:>7}  {text}")
    qc = field_of(KEY_QC)
    if qc:
        lines.append(
            f"quality      limits fitted on {qc.get('crops')} crops "
            f"({qc.get('fitted_on')}) with QC measurement version "
            f"{qc.get('version', 1)}; default range per feature:"
        )
        for name, (low, high) in qc.get("limits", {}).get("default", {}).items():
            low_text = "-" if low is None else f"{low:.4g}"
            high_text = "-" if high is None else f"{high:.4g}"
            lines.append(f"  {name:<11} {low_text:>9} .. {high_text:<9}")
        embedding = qc.get("embedding")
        if isinstance(embedding, dict):
            limit = embedding.get("limits", {}).get("default")
            shown = f"{limit:.4g}" if isinstance(limit, (int, float)) else "?"
            lines.append(f"  {'embedding':<11} {'-':>9} .. {shown:<9} (checked after inference)")
    else:
        lines.append("quality      no QC limits in this file: scans run without quality control")
    training = field_of(KEY_TRAINING_DATA)
    if training:
        lines.append(f"trained on   {training.get('description')}")
        if training.get("split"):
            lines.append(f"             {training['split']}")
    parent = field_of(KEY_PARENT)
    if parent:
        lines.append(f"fine-tuned   from {parent.get('name')} (sha256 {parent.get('sha256', '?')})")
    created = info.metadata.get(KEY_CREATED)
    if created:
        lines.append(f"created      {created} with smearscan {info.metadata.get(KEY_VERSION)}")
    return "\n".join(_shown(line) for line in lines)


#: The longest line ``model info`` prints from a file's metadata.
MAX_SHOWN = 500


def _shown(line: str) -> str:
    """A metadata line as a terminal may show it: control characters (escape sequences that
    would drive the terminal) escaped, and capped in length (a model file is not trusted)."""
    from smearscan.names import display_name

    line = display_name(line)
    if len(line) > MAX_SHOWN:
        return f"{line[:MAX_SHOWN]}… ({len(line) - MAX_SHOWN:,} more characters)"
    return line
