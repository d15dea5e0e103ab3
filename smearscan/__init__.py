"""smearscan: batch screening of white-cell crops for acute lymphoblastic leukemia
(research use only; not for diagnostic use).

The public API is small and imported lazily, so ``smearscan --help`` stays fast::

    from smearscan import load_classifier, run_scan, ScanRequest
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "Recipe": "smearscan.preprocess",
    "preprocess": "smearscan.preprocess",
    "read_image": "smearscan.preprocess",
    "load_and_preprocess": "smearscan.preprocess",
    "ImageDecodeError": "smearscan.preprocess",
    "load_classifier": "smearscan.inference",
    "BatchPredictor": "smearscan.inference",
    "Classifier": "smearscan.inference",
    "DeviceError": "smearscan.inference",
    "ModelInfo": "smearscan.modelfile",
    "ModelFileError": "smearscan.modelfile",
    "default_model_path": "smearscan.modelfile",
    "DecisionPolicy": "smearscan.policy",
    "QualityControl": "smearscan.qc",
    "CellResult": "smearscan.results",
    "ScanOptions": "smearscan.runner",
    "ScanRequest": "smearscan.runner",
    "run_scan": "smearscan.runner",
    "classification_metrics": "smearscan.metrics",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smearscan' has no attribute {name!r}")
