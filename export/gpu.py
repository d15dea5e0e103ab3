"""Carry a training set to a GPU machine and bring its models back into the CPU protocol.

    python -m export.gpu pack --data ../shared/data/cnmc --out pack.npz [--crop bbox ...]
    python -m export.gpu import --from DIR --name w0.25 --out runs/cv-gpu-w0.25 \\
        --data ../shared/data/cnmc [the training options the GPU run used]

``pack`` preprocesses every crop with the scanner's own function (the recipe's crop, at
the model's input size) and stores it as WebP with the folds of ``export.cv``'s split, the
labels and donors, and the side of each cell's box (for the scale augmentation), in one
file small enough for a machine that only takes a few tens of megabytes (lossless WebP
is 58 MB for C-NMC, quality 95 is 15 MB and differs by under one grey level on average).

``import`` rebuilds each fold's network under TensorFlow from the weights that
``export.train_jax`` wrote, saves it as a fold of a CV folder, and predicts that fold's
validation donors from the real crops here, so ``python -m export.cv`` with the same
options then reports it, shift suite included, exactly as a recipe trained on this machine.
Folds without weights take their predictions from the GPU run's ``oof.csv`` (made on the
packed crops) and are marked so.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from export import train as training
from export.config import TrainConfig, config_from_options
from export.cv import fold_config
from export.data import discover_dataset, patient_folds
from export.keras_utils import save_model
from export.pipeline import SplitArrays, cached_arrays, load_split
from smearscan.preprocess import unit_range

log = logging.getLogger("export.gpu")

#: WebP quality 101 is lossless: the only pack a model that ships may be trained on.
LOSSLESS = 101


def _decoded_rgb(encoded: bytes) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("a packed crop does not decode: the pack is damaged")
    return image[:, :, ::-1]


def pack(config: TrainConfig, quality: int = LOSSLESS, parts: int = 1) -> dict:
    """Write the pack to ``config.out`` in ``parts`` files (``config``: the crops'
    preprocessing and the split; ``quality``: WebP, 101 lossless); returns its metadata."""
    import cv2

    from smearscan.preprocess import cell_box, read_image

    recipe = config.recipe
    samples = discover_dataset(config.data)
    x, kept = cached_arrays(samples, recipe, config.cache_dir, config.workers)
    samples = [samples[i] for i in kept]
    labels = sorted({s.label for s in samples})
    split = config.split
    folds = patient_folds(samples, split.folds, split.seed, split.method, config.data)
    fold_of = np.array([next(k for k, f in enumerate(folds) if s.patient in f) for s in samples])

    def side_of(sample) -> float:
        image = read_image(sample.path, order="bgr")
        box = cell_box(image, recipe.background_threshold, "bgr")
        if box is None or recipe.crop != "bbox":
            return float(max(image.shape[:2]) if recipe.crop == "full" else recipe.window)
        return max(box[2], box[3]) * (1 + 2 * recipe.margin)

    def encode(image: np.ndarray) -> bytes:
        ok, data = cv2.imencode(".webp", image[:, :, ::-1], [cv2.IMWRITE_WEBP_QUALITY, quality])
        if not ok:
            raise ValueError("WebP encoding failed")
        return data.tobytes()

    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        sides = np.array(list(pool.map(side_of, samples)), np.float32)
        encoded = list(pool.map(encode, x))
    meta = {
        "data": str(config.data),
        "recipe": json.loads(recipe.to_json()),
        "folds": split.folds,
        "split_seed": split.seed,
        "split": split.method,
        "webp_quality": quality,
        "crops": len(samples),
    }
    columns = {
        "labels": np.array(labels),
        "paths": np.array([str(s.path) for s in samples]),
        "patients": np.array([s.patient for s in samples]),
        "y": np.array([labels.index(s.label) for s in samples], np.int64),
        "fold_of": fold_of,
        "side": sides,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    files = pack_files(config.out, parts)
    bounds = np.linspace(0, len(samples), len(files) + 1).round().astype(int)
    for path, start, stop in zip(files, bounds[:-1], bounds[1:], strict=True):
        part = encoded[start:stop]
        offsets = np.zeros(len(part) + 1, np.int64)
        offsets[1:] = np.cumsum([len(e) for e in part])
        arrays: dict[str, Any] = {  # Any: numpy's stub types **kwds like allow_pickle
            "encoded": np.frombuffer(b"".join(part), np.uint8),
            "offsets": offsets,
            "meta": np.array(json.dumps(meta)),
            **{k: v if k == "labels" else v[start:stop] for k, v in columns.items()},
        }
        np.savez(path, **arrays)
    decoded = np.stack([_decoded_rgb(e) for e in encoded])
    meta["mean_abs_error"] = float(np.abs(decoded.astype(np.int16) - x).mean())
    meta["files"] = [str(f) for f in files]
    meta["bytes"] = sum(f.stat().st_size for f in files)
    meta["boxes_below_input_at_min_scale"] = int(
        (sides * config.augmentation.scale_range[0] < recipe.input_size).sum()
    )
    log.info(
        "packed %d crops into %d file(s): %.1f MB, mean |error| %.2f grey levels",
        len(samples),
        len(files),
        meta["bytes"] / 1e6,
        meta["mean_abs_error"],
    )
    return meta


def pack_files(out: Path, parts: int) -> list[Path]:
    """``out`` itself, or ``<stem>-1of<parts>.npz``...: parts small enough for a transfer
    limit (``export.train_jax --pack`` takes them all, in order)."""
    if parts <= 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k}of{parts}.npz") for k in range(1, parts + 1)]


def weight_files(folder: Path, name: str, fold: int) -> list[Path]:
    """A fold's weight file, or its parts when ``export.train_jax`` split it; [] if none."""
    whole = folder / f"{name}-fold{fold}.npz"
    if whole.exists():
        return [whole]
    return sorted(
        folder.glob(f"{name}-fold{fold}-part*.npz"), key=lambda p: int(p.stem.rsplit("part", 1)[1])
    )


def load_weights(model, paths: list[Path]) -> None:
    """Set a Keras model's weights from ``export.train_jax`` files (by variable path)."""
    values: dict[str, np.ndarray] = {}
    for part in paths:
        with np.load(part) as stored:
            values.update({name: stored[name] for name in stored.files})
    path = paths[0]
    missing = [w.path for w in model.weights if w.path not in values]
    extra = sorted(set(values) - {w.path for w in model.weights})
    if missing or extra:
        raise ValueError(
            f"{path}: weights do not match the network (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    for variable in model.weights:
        value = values[variable.path]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"{path}: {variable.path} has shape {value.shape}, "
                f"the network {tuple(variable.shape)}"
            )
        variable.assign(value.astype(np.float32))


def write_fold_config(config: TrainConfig, split: SplitArrays, params: int, origin: dict) -> None:
    """The fold's config.json as ``export.train`` writes it, plus where the model came from."""
    network = config.network
    architecture = network.describe(f"vgg{network.depth}_w{network.width:g}", params)
    stored = training.run_config(
        config, split.labels, architecture, None, split.train_samples, split.val_samples
    )
    stored["trained_by"] = origin
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "config.json").write_text(json.dumps(stored, indent=2))


def import_run(config: TrainConfig, source: Path, name: str) -> None:
    """Turn run ``name`` of an ``export.train_jax`` output folder (``source``) into the folds
    of a CV folder."""
    import keras

    summary = json.loads((source / "summary.json").read_text())[name]
    gpu_predictions: dict[int, list[list[str]]] = {}
    with open(source / "oof.csv", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        for row in reader:
            if row[0] == name:
                gpu_predictions.setdefault(int(row[1]), []).append(row[2:])
    for fold in range(config.split.folds):
        fold_arguments = fold_config(config, config.out, fold)
        record = summary["folds"][str(fold)]
        weights = weight_files(source, name, fold)
        split = load_split(fold_arguments)
        out = fold_arguments.out
        origin = {
            "trainer": "export.train_jax (Keras 3, JAX backend)",
            "device": summary["device"],
            "train_seconds": record["train_seconds"],
        }
        if weights:
            keras.backend.clear_session()
            model = config.network.build(len(split.labels), config.recipe.input_size)
            load_weights(model, weights)
            out.mkdir(parents=True, exist_ok=True)
            save_model(model, out / "model.keras")
            probabilities = model.predict(unit_range(split.x_val), batch_size=64, verbose=0)
            rows = [
                [str(s.path), s.patient, s.label, *[f"{p:.6f}" for p in probs]]
                for s, probs in zip(split.val_samples, probabilities, strict=True)
            ]
            origin["predictions"] = "the real crops, on this machine (TensorFlow)"
            params = int(model.count_params())
        else:
            rows = gpu_predictions[fold]
            expected = [str(s.path) for s in split.val_samples]
            if [r[0] for r in rows] != expected:
                raise ValueError(f"fold {fold}: the GPU run's predictions are for other crops")
            origin["predictions"] = "the packed (WebP) crops, on the GPU machine; no weights"
            params = record["params"]
        write_fold_config(fold_arguments, split, params, origin)
        with open(out / "val_predictions.csv", "w", newline="") as handle:
            predictions = csv.writer(handle)
            predictions.writerow(header[2:])
            predictions.writerows(rows)
        history = record["history"]
        with open(out / "history.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
        (out / "metrics.json").write_text(
            json.dumps(
                {
                    "best_epoch": len(history),
                    "train_seconds": record["train_seconds"],
                    "selection": "last epoch",
                    "validation": history[-1],
                },
                indent=2,
            )
        )
        log.info("fold %d: %s -> %s (%s)", fold, name, out, origin["predictions"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.gpu", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    packer = commands.add_parser(
        "pack", parents=[training.build_parser(add_help=False)], help="pack the preprocessed crops"
    )
    packer.add_argument(
        "--quality",
        type=int,
        default=LOSSLESS,
        help="WebP quality; 101 is lossless. Lossy packs are not for models to ship: trained "
        "on quality 95, the GPU models' outputs moved by up to 0.05 on the real crops "
        "(docs/ablation.md)",
    )
    packer.add_argument("--parts", type=int, default=1, help="split the pack into this many files")
    importer = commands.add_parser(
        "import",
        parents=[training.build_parser(add_help=False)],
        help="bring a GPU run back as a CV folder",
    )
    importer.add_argument(
        "--from", dest="source", required=True, type=Path, help="the folder export.train_jax wrote"
    )
    importer.add_argument("--name", required=True, help="the run's name there (w<width>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        config = config_from_options(args)
        if args.command == "pack":
            print(json.dumps(pack(config, args.quality, args.parts), indent=2))
        else:
            import_run(config, args.source, args.name)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
