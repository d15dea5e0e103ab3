"""Self-describing ONNX model files: the metadata keys and how to read them.

The export side writes these keys into ``metadata_props``; ``scan`` reads labels and the
preprocessing recipe from them, so a model file is all a scan needs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from smearscan.preprocess import Recipe

#: Metadata schema version; bump when keys change meaning.
METADATA_VERSION = 1
DEFAULT_MODEL_NAME = "smearscan-vgg13.onnx"
#: Static INT8 twin of the default model, used on CPU (2-3.5x faster there); shipped only
#: when its argmax agreement with fp32 on the validation patients is >= 99.5 %.
DEFAULT_INT8_NAME = "smearscan-vgg13.int8.onnx"

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

    def json_field(self, key: str) -> dict | list | None:
        """A JSON-valued metadata entry, parsed; None when absent."""
        text = self.metadata.get(key)
        return json.loads(text) if text else None

    def calibration(self) -> dict:
        """Temperature and operating threshold, when the export stored them."""
        return self.json_field(KEY_CALIBRATION) or {}


def default_model_path(int8: bool = True) -> Path:
    """The model shipped inside the package: the INT8 twin when asked for and shipped
    (CPU), else fp32 (GPU, where INT8 brings nothing)."""
    models = Path(str(resources.files("smearscan") / "models"))
    if int8 and (models / DEFAULT_INT8_NAME).is_file():
        return models / DEFAULT_INT8_NAME
    return models / DEFAULT_MODEL_NAME


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def info_from_metadata(path: Path, metadata: dict[str, str]) -> ModelInfo:
    """Validate the smearscan metadata of a model file."""
    if KEY_LABELS not in metadata or KEY_RECIPE not in metadata:
        raise ModelFileError(
            f"{path} has no smearscan metadata (labels and preprocessing recipe); "
            "export it with `python -m export.to_onnx`"
        )
    schema = int(metadata.get(KEY_SCHEMA, "1"))
    if schema > METADATA_VERSION:
        raise ModelFileError(
            f"{path} uses metadata version {schema}; this smearscan reads up to "
            f"{METADATA_VERSION}: upgrade smearscan"
        )
    try:
        labels = json.loads(metadata[KEY_LABELS])
        recipe = Recipe.from_json(metadata[KEY_RECIPE])
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path} has invalid smearscan metadata: {exc}") from None
    if not isinstance(labels, list) or len(labels) < 2 or len(set(labels)) != len(labels):
        raise ModelFileError(f"{path}: labels must be a list of at least two distinct names")
    positive = metadata.get(KEY_POSITIVE) or None
    return ModelInfo(
        path=path,
        sha256=file_sha256(path),
        labels=[str(label) for label in labels],
        recipe=recipe,
        positive_class=positive if positive in labels else None,
        metadata=dict(metadata),
    )
