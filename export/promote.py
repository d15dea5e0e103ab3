"""Keep a cross-validation run in the repository as the default model's source.

    python -m export.promote runs/cv-NAME                # into export/default_model
    python -m export.to_onnx export/default_model --out smearscan/models/smearscan-vgg13.onnx

``runs/`` is not committed; the shipped model must stay reproducible and fine-tunable
(``export.train --init-from default``) from a clean clone. This copies what that needs and
nothing large: the CV and shift-suite reports, the out-of-fold predictions, and per fold
its config, history, metrics and weights (re-saved without the optimizer's state, which
is two thirds of a training checkpoint and useless to a parent).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from export.parents import cv_folds

log = logging.getLogger("export.promote")

DEFAULT_TARGET = Path(__file__).parent / "default_model"
REPORT_FILES = ("cv.json", "cv.md", "oof_predictions.csv", "shift.json", "shift.md")
FOLD_FILES = ("config.json", "history.csv", "metrics.json", "curves.png")


class PromoteError(Exception):
    """The source is not a finished cross-validation run."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.promote",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", type=Path, help="a finished `python -m export.cv` folder")
    parser.add_argument("--into", type=Path, default=DEFAULT_TARGET, help="target folder")
    return parser


def promote(run: Path, target: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    folds = cv_folds(run)
    missing = [
        str(run / name) for name in ("cv.json", "oof_predictions.csv") if not (run / name).is_file()
    ]
    missing += [str(f / "model.keras") for f in folds if not (f / "model.keras").is_file()]
    if not folds or missing:
        raise PromoteError(f"{run} is not a finished CV run (missing {', '.join(missing)})")
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in REPORT_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, staging / name)
    for fold in folds:
        (staging / fold.name).mkdir()
        for name in FOLD_FILES:
            if (fold / name).is_file():
                shutil.copy2(fold / name, staging / fold.name / name)
        model = keras.models.load_model(fold / "model.keras", compile=False)
        model.save(staging / fold.name / "model.keras")
        again = keras.models.load_model(staging / fold.name / "model.keras", compile=False)
        batch = np.random.default_rng(0).random((4, *model.input_shape[1:]), dtype=np.float32)
        if not np.array_equal(model.predict(batch, verbose=0), again.predict(batch, verbose=0)):
            raise PromoteError(f"{fold.name}: the re-saved weights predict differently")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    log.info("%s -> %s (%d folds)", run, target, len(folds))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        promote(args.run, args.into)
    except PromoteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
