"""The way to and from a GPU machine (``export.gpu``): the pack carries the protocol's folds
and the crops, and weights in ``export.train_jax``'s files come back as a CV folder that
``export.cv`` reuses. JAX itself is not a test dependency: the GPU trainer's output is
written here with its own writers from a network built under TensorFlow."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CNMC, require_training_stack

from export import cv, gpu, train, train_jax
from export.config import config_from_options
from export.data import discover_dataset, grouped_folds
from export.pipeline import cached_arrays

pytestmark = pytest.mark.train

RECIPE = ["--crop", "bbox", "--margin", "0.08", "--folds", "3", "--workers", "2"]
NETWORK = ["--width", "0.0625", "--epochs", "2"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("pack")
    args = gpu.build_parser().parse_args(
        [
            "pack",
            "--data",
            str(CNMC),
            "--out",
            str(out / "pack.npz"),
            "--parts",
            "2",
            "--cache-dir",
            str(out / "cache"),
            *RECIPE,
        ]
    )
    meta = gpu.pack(config_from_options(args), args.quality, args.parts)
    return out, meta


def test_the_pack_keeps_the_protocols_folds_labels_and_crops(packed):
    out, meta = packed
    files = gpu.pack_files(out / "pack.npz", 2)
    assert [f.name for f in files] == ["pack-1of2.npz", "pack-2of2.npz"]
    with pytest.raises(ValueError, match="every part"):
        train_jax.Pack(files[:1], workers=2)
    pack = train_jax.Pack(files, workers=2)
    samples = discover_dataset(CNMC)
    folds = grouped_folds(samples, 3, 0)
    assert pack.paths == [str(s.path) for s in samples]
    for sample, fold in zip(samples, pack.fold_of, strict=True):
        assert sample.patient in folds[fold]
    assert pack.labels == ["all", "hem"]
    assert [pack.labels[k] for k in pack.y] == [s.label for s in samples]
    recipe = train.parse_config(["--data", "x", "--out", "y", *RECIPE]).recipe
    real, _ = cached_arrays(samples, recipe, out / "cache", 2)
    assert pack.x.shape == real.shape == (24, 128, 128, 3)
    assert np.array_equal(pack.x, real) and meta["mean_abs_error"] == 0  # lossless by default
    assert (pack.side > 50).all() and meta["crops"] == 24


def test_gpu_weights_come_back_as_a_cv_folder_that_export_cv_reuses(packed, tmp_path):
    require_training_stack()
    import keras

    from export.vgg import build_vgg

    out, _ = packed
    pack = train_jax.Pack(gpu.pack_files(out / "pack.npz", 2), workers=2)
    source = tmp_path / "gpu-out"
    source.mkdir()
    networks = {}
    for fold in range(3):
        keras.utils.set_random_seed(fold)
        model = build_vgg(2, width=0.0625, batch_norm=True)
        networks[fold] = model
        val = np.flatnonzero(pack.fold_of == fold)
        probabilities = model.predict(pack.x[val].astype(np.float32) / 255, verbose=0)
        weights = {v.path: np.asarray(v.numpy()) for v in model.weights}
        record = {"train_seconds": 1.0, "params": 1, "history": [{"epoch": 1, "loss": 0.7}]}
        train_jax.write_fold(
            source, "t", fold, pack, val, probabilities, record, {"device": "test", "args": {}}
        )
        if fold < 2:  # fold 2 comes back as predictions only
            train_jax.save_weights(weights, source / f"t-fold{fold}", "float16", max_mb=0.05)
    assert len(gpu.weight_files(source, "t", 0)) > 1  # split into parts

    run = tmp_path / "cv-t"
    options = ["--data", str(CNMC), *RECIPE, *NETWORK, "--cache-dir", str(out / "cache")]
    assert (
        gpu.main(["import", "--from", str(source), "--name", "t", "--out", str(run), *options]) == 0
    )
    restored = keras.models.load_model(run / "fold_0" / "model.keras", compile=False)
    for original, back in zip(networks[0].weights, restored.weights, strict=True):
        assert np.allclose(original.numpy(), back.numpy(), rtol=1e-3, atol=1e-4)
    config = json.loads((run / "fold_2" / "config.json").read_text())
    assert "no weights" in config["trained_by"]["predictions"]
    assert not (run / "fold_2" / "model.keras").exists()

    assert cv.main([*options, "--out", str(run), "--no-shift"]) == 0
    report = json.loads((run / "cv.json").read_text())
    assert report["cross_fitted"]["donors"] == len({s.patient for s in discover_dataset(CNMC)})
    # another recipe may not reuse these folds
    assert cv.main([*options, "--out", str(run), "--no-shift", "--lr", "0.01"]) == 2
