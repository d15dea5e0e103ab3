"""onnxruntime sessions for smearscan model files: device choice and batched prediction."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smearscan.modelfile import ModelFileError, ModelInfo, default_model_path, info_from_metadata

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(?::(\d+))?)$")


class DeviceError(RuntimeError):
    """The requested execution device cannot be used."""


@dataclass
class Classifier:
    """A loaded model: its metadata, its onnxruntime session and the provider really used."""

    info: ModelInfo
    session: object
    provider: str
    device_note: str = ""
    #: pad batches up to this size (CUDA: cuDNN re-tunes for every new input shape, so a
    #: short last batch would cost a re-tune); None leaves batches as they are
    pad_to: int | None = None

    @property
    def labels(self) -> list[str]:
        return self.info.labels

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    def predict_raw(self, batch: np.ndarray) -> np.ndarray:
        """Model probabilities for a float32 batch (N, S, S, 3), before calibration."""
        count = len(batch)
        batch = np.ascontiguousarray(batch, np.float32)
        if self.pad_to and count < self.pad_to:
            padding = np.zeros((self.pad_to - count, *batch.shape[1:]), np.float32)
            batch = np.concatenate([batch, padding])
        outputs = self.session.run(None, {self.input_name: batch})
        return np.asarray(outputs[0][:count], np.float64)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (temperature scaling stored in the model, if any)."""
        return apply_temperature(self.predict_raw(batch), self.temperature)

    @property
    def temperature(self) -> float:
        return float(self.info.calibration().get("temperature", 1.0))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the same as dividing the logits by T, since log p differs from the
    logits by a per-row constant."""
    if temperature == 1.0:
        return probabilities
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def parse_device(device: str) -> tuple[str, int]:
    match = DEVICE_PATTERN.match(device.strip().lower())
    if not match:
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    kind = match.group(1).split(":")[0]
    return kind, int(match.group(2) or 0)


def load_classifier(
    model_path: str | os.PathLike | None = None,
    device: str = "auto",
    threads: int = 1,
) -> Classifier:
    """Open a model file on the requested device.

    ``auto`` uses CUDA when onnxruntime offers it and falls back to CPU with a note;
    ``cuda`` fails loudly when CUDA is not usable. Without ``model_path`` the embedded model
    is used: its INT8 twin on CPU, fp32 on CUDA. ``threads`` sets onnxruntime's intra-op
    threads per run: 1 suits the scanner (one run per worker thread); a caller that runs
    one batch at a time gets more speed from the number of cores.
    """
    import onnxruntime as ort

    kind, device_id = parse_device(device)
    available = ort.get_available_providers()
    if model_path:
        path = Path(model_path)
    else:
        path = default_model_path(int8=kind == "cpu" or CUDA not in available)
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
    return Classifier(info=info, session=session, provider=used, device_note=note)
