"""onnxruntime sessions for smearscan model files: runtime and device choice, validation of
what the file says, and batched prediction.

:class:`BatchPredictor` is the unit every engine uses: it opens the session once in
``__init__`` and maps a batch of preprocessed crops to calibrated probabilities in
``__call__``, the shape of a Ray Data ``map_batches`` callable class.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from smearscan.modelfile import ModelFileError, ModelInfo, default_model_path, info_from_metadata
from smearscan.qc import EMBEDDING_OUTPUT

if TYPE_CHECKING:  # imported when a session opens: `smearscan --help` stays fast
    import onnxruntime as ort

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(?::(\d+))?)$")
#: Row sums of a softmax output must be within this of 1.
SUM_TOLERANCE = 1e-3


class DeviceError(RuntimeError):
    """The requested execution device cannot be used."""


class RuntimeMissing(ImportError):
    """No usable onnxruntime is installed (or two that shadow each other)."""


def import_onnxruntime():
    """onnxruntime, with a clear message when it is missing or when both the CPU and the GPU
    builds are installed (they share the module name and the CPU build wins, silently)."""
    installed = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            package_metadata.version(dist)
            installed.add(dist)
        except package_metadata.PackageNotFoundError:
            pass
    if installed == {"onnxruntime", "onnxruntime-gpu"}:
        raise RuntimeMissing(
            "both onnxruntime (CPU) and onnxruntime-gpu are installed; they share one module "
            "and the CPU build hides CUDA. Keep one: `pip uninstall -y onnxruntime "
            "onnxruntime-gpu && pip install 'smearscan[gpu]'` (or '[cpu]')"
        )
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeMissing(
            "no onnxruntime is installed: `pip install 'smearscan[cpu]'` (or '[gpu]' on a "
            "machine with an NVIDIA GPU)"
        ) from None
    return onnxruntime


def parse_device(device: str) -> tuple[str, int]:
    match = DEVICE_PATTERN.match(device.strip().lower())
    if not match:
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    kind = match.group(1).split(":")[0]
    return kind, int(match.group(2) or 0)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the same as dividing the logits by T, since log p differs from the
    logits by a per-row constant."""
    if temperature == 1.0:
        return probabilities
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def valid_rows(probabilities: np.ndarray) -> np.ndarray:
    """Rows that are a probability distribution (finite, non-negative, summing to 1): a
    broken model's NaN or negative outputs become error rows, never labels."""
    finite = np.isfinite(probabilities).all(axis=1)
    with np.errstate(invalid="ignore"):
        return (
            finite
            & (probabilities >= 0).all(axis=1)
            & (np.abs(probabilities.sum(axis=1) - 1.0) <= SUM_TOLERANCE)
        )


@dataclass
class Classifier:
    """A loaded model: its metadata, its onnxruntime session and the provider really used."""

    info: ModelInfo
    session: ort.InferenceSession
    provider: str
    device_note: str = ""

    @property
    def labels(self) -> list[str]:
        return self.info.labels

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    @property
    def temperature(self) -> float:
        return float(self.info.calibration().get("temperature", 1.0))

    @property
    def has_embedding_distance(self) -> bool:
        """Whether the graph computes each crop's embedding distance (QC version 4)."""
        return EMBEDDING_OUTPUT in _output_names(self.session)

    def run(
        self, batch: np.ndarray, pad_to: int | None = None, distances: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Model outputs for a float32 batch (N, S, S, 3), before calibration, and with
        ``distances`` each crop's embedding distance. Only the outputs asked for are
        computed. ``pad_to`` pads a short batch to a fixed shape (CUDA: cuDNN re-tunes for
        every new shape)."""
        count = len(batch)
        batch = np.ascontiguousarray(batch, np.float32)
        if pad_to and count < pad_to:
            padding = np.zeros((pad_to - count, *batch.shape[1:]), np.float32)
            batch = np.concatenate([batch, padding])
        names = _output_names(self.session)[:1] + ([EMBEDDING_OUTPUT] if distances else [])
        outputs = self.session.run(names, {self.input_name: batch})
        found = np.asarray(outputs[1][:count], np.float64).reshape(count) if distances else None
        return np.asarray(outputs[0][:count], np.float64), found

    def predict_raw(self, batch: np.ndarray, pad_to: int | None = None) -> np.ndarray:
        """Model outputs for a float32 batch (N, S, S, 3), before calibration."""
        return self.run(batch, pad_to)[0]

    def predict(self, batch: np.ndarray, pad_to: int | None = None) -> np.ndarray:
        """Calibrated class probabilities (temperature scaling stored in the model, if any)."""
        return apply_temperature(self.predict_raw(batch, pad_to), self.temperature)


def _output_names(session) -> list[str]:
    return [output.name for output in session.get_outputs()]


@dataclass(frozen=True)
class Answers:
    """What the model says of a batch: calibrated probabilities (N, classes) and, when QC
    asked for them, the crops' embedding distances (N,)."""

    probabilities: np.ndarray
    distances: np.ndarray | None = None


def tta_views(batch: np.ndarray) -> list[np.ndarray]:
    """Flips and 90-degree rotations of an NHWC batch (the training augmentations)."""
    views = []
    for k in range(4):
        rotated = np.rot90(batch, k, axes=(1, 2))
        views.append(rotated)
        views.append(rotated[:, :, ::-1])
    return [np.ascontiguousarray(v) for v in views]


class BatchPredictor:
    """Preprocessed crops -> calibrated probabilities; the session opens once, here.

    Picklable by its arguments, so a Ray actor (or any process) builds its own session.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        device: str = "auto",
        threads: int = 1,
        tta: bool = False,
        pad_to: int | None = None,
        classifier: Classifier | None = None,
        distances: bool = False,
    ) -> None:
        self.classifier = classifier or load_classifier(model_path, device, threads)
        self.tta = tta
        self.pad_to = pad_to if self.classifier.provider == CUDA else None
        self.distances = distances
        if distances and not self.classifier.has_embedding_distance:
            raise ModelFileError(
                f"{self.classifier.info.path}: its QC limits check the embedding distance, "
                f"but the graph has no {EMBEDDING_OUTPUT!r} output"
            )

    def __call__(self, batch: np.ndarray) -> Answers:
        """Calibrated probabilities (averaged over the views with TTA) and, when asked,
        the embedding distances of the crops as they are (the first view)."""
        views = tta_views(batch) if self.tta else [batch]
        raw, distances = self.classifier.run(views[0], self.pad_to, self.distances)
        temperature = self.classifier.temperature
        probabilities = apply_temperature(raw, temperature)
        if len(views) > 1:
            others = [self.classifier.predict(view, self.pad_to) for view in views[1:]]
            probabilities = np.mean([probabilities, *others], axis=0)
        return Answers(probabilities, distances)

    def __reduce__(self):
        info = self.classifier.info
        device = "cpu" if self.classifier.provider == CPU else "auto"
        arguments = (str(info.path), device, self.tta, self.pad_to, self.distances)
        return (_rebuild_predictor, arguments)


def _rebuild_predictor(
    path: str, device: str, tta: bool, pad_to: int | None, distances: bool
) -> BatchPredictor:
    return BatchPredictor(path, device=device, tta=tta, pad_to=pad_to, distances=distances)


def _preload_cuda_libraries(ort) -> None:
    """Load CUDA and cuDNN from NVIDIA's pip wheels (onnxruntime-gpu's [cuda,cudnn] extras)
    when they are installed, so no system CUDA toolkit is needed; a machine with a system
    installation is unaffected."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # noqa: BLE001  (missing wheels: the system libraries may do)
        log.debug("preload_dlls: %s", exc)


def _check_shapes(session, info: ModelInfo) -> None:
    """The graph must take (batch, S, S, 3) for the recipe's S and give one output per
    label: a file whose metadata disagrees with its graph is refused, not half-used."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ModelFileError(f"{info.path}: the model has {len(inputs)} inputs, expected 1")
    size = info.recipe.input_size
    shape = list(inputs[0].shape)
    expected = [size, size, 3]
    if len(shape) != 4 or any(
        isinstance(dim, int) and dim != want for dim, want in zip(shape[1:], expected, strict=True)
    ):
        raise ModelFileError(
            f"{info.path}: input shape {shape} does not match the recipe's "
            f"[batch, {size}, {size}, 3]"
        )
    extra = [o.name for o in outputs[1:] if o.name != EMBEDDING_OUTPUT]
    if extra:
        raise ModelFileError(
            f"{info.path}: unexpected model output(s) {', '.join(extra)} (the probabilities "
            f"come first; the only other output allowed is {EMBEDDING_OUTPUT!r})"
        )
    out_shape = list(outputs[0].shape)
    classes = out_shape[-1] if out_shape else None
    if len(out_shape) != 2 or (isinstance(classes, int) and classes != len(info.labels)):
        raise ModelFileError(
            f"{info.path}: output shape {out_shape} does not match its {len(info.labels)} labels"
        )
    if not isinstance(classes, int):  # the graph knows its width only when it runs: try it
        probe = np.zeros((1, size, size, 3), np.float32)
        width = session.run(None, {inputs[0].name: probe})[0].shape[-1]
        if width != len(info.labels):
            raise ModelFileError(
                f"{info.path}: the model gives {width} outputs per crop for its "
                f"{len(info.labels)} labels"
            )


def load_classifier(
    model_path: str | os.PathLike | None = None,
    device: str = "auto",
    threads: int = 1,
) -> Classifier:
    """Open a model file on the requested device.

    ``auto`` uses CUDA when onnxruntime offers it and falls back to CPU with a note;
    ``cuda`` fails loudly when CUDA is not usable. Without ``model_path`` the embedded model
    is used. ``threads`` sets onnxruntime's intra-op threads per run: 1 suits the scanner
    (one run per worker thread); a caller that runs one batch at a time gets more speed
    from the number of cores.
    """
    ort = import_onnxruntime()
    kind, device_id = parse_device(device)
    available = ort.get_available_providers()
    path = Path(model_path) if model_path else default_model_path()
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # the scanner runs one inference per worker thread, a worker per core, so by default each
    # run uses one thread: more would oversubscribe the cores (and onnxruntime's threads
    # spin while they wait). Callers that run one batch at a time can ask for more.
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    if threads > 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    note = ""
    if kind != "cpu" and CUDA in available:
        _preload_cuda_libraries(ort)
    if kind == "cpu":
        providers: list = [CPU]
    elif CUDA in available:
        providers = [(CUDA, {"device_id": device_id}), CPU]
    elif kind == "cuda":
        raise DeviceError(
            "CUDA was requested but this onnxruntime has no CUDA provider "
            f"(available: {', '.join(available)}); install smearscan[gpu]"
        )
    else:
        providers = [CPU]
        note = "CUDA not available; running on CPU"
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        if kind == "cuda":
            raise DeviceError(f"could not start CUDA session: {exc}") from None
        raise ModelFileError(f"cannot load model {path}: {exc}") from None
    used = session.get_providers()[0]
    if kind == "cuda" and used != CUDA:
        raise DeviceError(f"CUDA was requested but onnxruntime chose {used}")
    if kind == "auto" and CUDA in available and used != CUDA:
        note = "CUDA provider failed to initialise; running on CPU"
    metadata = session.get_modelmeta().custom_metadata_map
    info = info_from_metadata(path, metadata)
    _check_shapes(session, info)
    temperature = info.calibration().get("temperature", 1.0)
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ModelFileError(f"{path}: calibration temperature {temperature!r} must be > 0")
    return Classifier(info=info, session=session, provider=used, device_note=note)
