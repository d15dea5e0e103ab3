"""Real training, cross-validation, shift suite, fine-tuning and export on the committed fixture
crops (TensorFlow: the [train] extra). One tiny model is trained once per session
(``tiny_run`` in conftest) and shared."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    CNMC,
    ROOT,
    TINY,
    read_bgr,
    require_training_stack,
    rows,
    run,
    train_unchanged_child,
)

require_training_stack()
pytestmark = pytest.mark.train

from export import summarize_runs, to_onnx, train  # noqa: E402
from export.vgg import build_vgg  # noqa: E402
from smearscan.exitstatus import ExitStatus  # noqa: E402
from smearscan.inference import load_classifier  # noqa: E402
from smearscan.preprocess import Recipe, load_and_preprocess  # noqa: E402


def test_training_writes_the_run_folder(tiny_run):
    for name in [
        "model.keras",
        "config.json",
        "history.csv",
        "curves.png",
        "metrics.json",
        "val_predictions.csv",
    ]:
        assert (tiny_run / name).stat().st_size > 0, name
    config = json.loads((tiny_run / "config.json").read_text())
    split = config["split"]
    assert not set(split["train_patients"]) & set(split["val_patients"])
    assert len(split["val_patients"]) == 2  # one patient per class in 3 folds of 3+3
    assert config["args"]["augment"] == "flips,scale,photometric,stain,focus"
    assert config["args"]["balance"] == "donors" and config["args"]["ema"] == 0.99
    # the code that trained it: options and seed alone do not fix the weights
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    trained_with = config["trained_with"]
    assert trained_with["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert trained_with["versions"]["tensorflow"] and trained_with["versions"]["keras"]
    # and the machine: another CPU's kernels train other weights from the same code
    assert trained_with["machine"]["cores"] == os.cpu_count()
    assert set(trained_with["machine"]["isa"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
    history = (tiny_run / "history.csv").read_text().splitlines()
    assert len(history) == 3 and history[0].startswith("epoch,loss,accuracy,val_loss")
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and metrics["selection"] == "last epoch"
    for key in [
        "sensitivity",
        "specificity",
        "accuracy",
        "weighted_f1",
        "roc_auc",
        "confusion_matrix",
    ]:
        assert key in metrics["validation"]


def test_training_is_deterministic_for_a_seed(tiny_run, tmp_path):
    again = tmp_path / "again"
    assert (
        train.main(
            [
                "--data",
                str(CNMC),
                "--out",
                str(again),
                "--epochs",
                "2",
                "--seed",
                "3",
                *TINY,
                "--cache-dir",
                str(tiny_run.parent / "cache"),
            ]
        )
        == 0
    )
    first = (tiny_run / "val_predictions.csv").read_text()
    assert (again / "val_predictions.csv").read_text() == first


def test_donor_balanced_epochs_give_every_donor_the_same_draws():
    from export.config import Sampling
    from export.sampling import epoch_indices

    patients = np.array(["a"] * 3 + ["b"] * 300 + ["c"] * 50 + ["d"] * 10)
    y = np.array([0] * 303 + [1] * 60)
    indices = epoch_indices(patients, y, Sampling("donors", 20), np.random.default_rng(0))
    drawn = {p: int((patients[indices] == p).sum()) for p in "abcd"}
    assert drawn == {"a": 20, "b": 20, "c": 20, "d": 20}  # small donors drawn with replacement
    assert (y[indices] == 0).sum() == (y[indices] == 1).sum()


def test_area_matched_epochs_draw_the_classes_at_the_same_sizes():
    from sklearn.metrics import roc_auc_score

    from export.config import Sampling
    from export.sampling import epoch_indices

    rng = np.random.default_rng(0)
    patients = np.repeat(["a", "b", "c", "d"], [300, 100, 200, 50])
    y = np.repeat([0, 0, 1, 1], [300, 100, 200, 50])
    areas = rng.normal(24_000, 5_000, size=len(y)) * np.where(y == 0, 1.5, 1.0)
    matched = epoch_indices(patients, y, Sampling("donors-area", 20), rng, areas)
    plain = epoch_indices(patients, y, Sampling("donors", 20), rng)
    assert len(matched) == len(plain) == 80 and (y[matched] == 0).sum() == 40
    assert roc_auc_score(y[plain] == 0, areas[plain]) > 0.8
    assert roc_auc_score(y[matched] == 0, areas[matched]) < 0.7
    with pytest.raises(ValueError, match="cell area"):
        epoch_indices(patients, y, Sampling("donors-area", 20), rng)


def test_jpeg_augmentation_is_asked_for_by_name_and_recompresses_raw_crops():
    from conftest import CNMC

    from export.augment import parse_groups
    from export.data import discover_dataset

    assert parse_groups("full") == ("flips", "scale", "photometric", "stain", "focus")
    assert parse_groups("full,jpeg")[-1] == "jpeg" and "jpeg" not in parse_groups("full")
    with pytest.raises(ValueError, match="unknown"):
        parse_groups("full,jpg")
    samples = discover_dataset(CNMC)[:1]
    from export.pipeline import RawRescaler

    plain = RawRescaler(samples, Recipe(), (1, 1))
    lossy = RawRescaler(samples, Recipe(), (1, 1), jpeg=True)
    changed = [not np.array_equal(plain(0, seed), lossy(0, seed)) for seed in range(20)]
    assert 3 <= sum(changed) <= 17  # about half the draws are recompressed
    first = next(seed for seed, c in enumerate(changed) if c)
    difference = np.abs(plain(0, first).astype(int) - lossy(0, first)).mean()
    assert 0 < difference < 5  # the same cell, with the codec's loss


def test_donor_colour_augmentation_gives_every_class_the_colours_of_every_class():
    """``colour``: a crop takes the colour of a donor drawn class first, so over the draws
    its colour says nothing of its label; the cell is recoloured, the background kept."""
    from collections import Counter

    from export.augment import DonorColours, colour_transfer, parse_groups
    from export.config import Augmentation
    from export.data import discover_dataset
    from export.pipeline import RawRescaler

    groups = parse_groups("full,colour")
    assert groups[-1] == "colour" and "colour" not in parse_groups("full")
    augmentation = Augmentation(groups=groups)
    assert "colour" not in augmentation.on_input and augmentation.decodes_raw
    samples = discover_dataset(CNMC)
    colours = DonorColours.measure(samples, per_donor=4)
    assert set(colours.stats) == {s.patient for s in samples}
    # three ALL donors and one normal donor: the normal donor still gets half the draws
    kept = colours.by_class["all"] + colours.by_class["hem"][:1]
    uneven = DonorColours({d: colours.stats[d] for d in kept}, {d: colours.labels[d] for d in kept})
    rng = np.random.default_rng(0)
    drawn = Counter(uneven.labels[uneven.draw(rng)] for _ in range(4000))
    assert sorted(drawn) == ["all", "hem"]
    assert all(abs(n / 4000 - 0.5) < 0.03 for n in drawn.values())  # classes alike
    sample = samples[0]
    image = read_bgr(sample.path)
    target = colours.draw(np.random.default_rng(5))
    expected = colour_transfer(image, colours.stats[sample.patient], colours.stats[target])
    assert np.array_equal(colours.apply(image, sample.patient, np.random.default_rng(5)), expected)
    plain = RawRescaler([sample], Recipe(), (1, 1))
    recoloured = RawRescaler([sample], Recipe(), (1, 1), colours=colours)
    first, second = plain(0, 1), recoloured(0, 1)
    assert first.shape == second.shape and not np.array_equal(first, second)
    assert ((first.max(axis=2) == 0) == (second.max(axis=2) == 0)).mean() > 0.99


def test_a_run_trains_with_the_donor_colour_group_and_records_it(tmp_path):
    out = tmp_path / "colour"
    args = ["--data", str(CNMC), "--out", str(out), *TINY, "--epochs", "1"]
    assert train.main([*args, "--augment", "full,colour", "--cache-dir", str(tmp_path)]) == 0
    assert "colour" in json.loads((out / "config.json").read_text())["args"]["augment"]
    assert (out / "model.keras").exists()


def test_a_slide_colour_run_trains_on_normalised_crops_and_its_export_is_refused(tmp_path):
    """--slide-colour: every donor, validating ones included, mapped from its own colour
    statistics to the training donors' mean; the reference is kept; no model file is made
    while the scanner cannot normalise slides."""
    from export.config import TrainConfig
    from export.pipeline import load_split
    from smearscan.colour import EDGE_MARGIN, SlideColour, colour_stats, mean_stats, slide_sample
    from smearscan.preprocess import preprocess, read_image, stored_uint8

    out, cache = tmp_path / "slide", tmp_path / "cache"
    args = ["--data", str(CNMC), "--out", str(out), *TINY, "--epochs", "1", "--slide-colour"]
    assert train.main([*args, "--cache-dir", str(cache)]) == 0
    stored = json.loads((out / "config.json").read_text())
    colour = SlideColour.from_record(stored["slide_colour"])
    assert colour is not None
    config = TrainConfig.of_run(out)
    split = load_split(config)
    stats = split.normalise.stats if split.normalise else {}
    assert set(stats) == {s.patient for s in split.samples}  # validating donors too
    reference = mean_stats(stats[d] for d in stored["split"]["train_patients"])
    assert np.allclose(colour.mean, reference[0]) and np.allclose(colour.spread, reference[1])
    first = split.val_samples[0]
    # each donor measured without its cells' rim, as the reference was
    assert colour.margin == config.slide_colour_margin == EDGE_MARGIN
    sampled = slide_sample(sorted(s.path for s in split.samples if s.patient == first.patient), 40)
    own = colour_stats([read_image(p, order="bgr") for p in sampled], EDGE_MARGIN)
    assert np.allclose(stats[first.patient][1], own[1])
    normalised = colour.normalise(read_image(first.path, order="bgr"), stats[first.patient])
    assert np.array_equal(
        split.x_val[0], stored_uint8(preprocess(normalised, config.recipe, "bgr"))
    )
    assert not np.array_equal(
        split.x_val[0], stored_uint8(load_and_preprocess(first.path, config.recipe))
    )
    assert to_onnx.main([str(out), "--out", str(tmp_path / "m.onnx")]) != 0
    assert not (tmp_path / "m.onnx").exists()


def test_export_options_are_checked_before_any_work(tmp_path, capsys):
    """The library's export takes a typed, validated ExportOptions; the command line
    builds one and refuses values the export could only fail on later."""
    options = to_onnx.parse_args([str(tmp_path), "--out", str(tmp_path / "m.onnx")])
    assert isinstance(options, to_onnx.ExportOptions)
    assert options.weights == "ensemble" and options.min_cells == 10 and options.run == tmp_path
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.min_cells = 3  # type: ignore[misc]
    for bad in (
        {"min_cells": 0},
        {"slide_rule": "median"},
        {"operating_point": "sensitivity:2"},
        {"int8_min_agreement": -0.1},
    ):
        with pytest.raises(ValueError):
            dataclasses.replace(options, **bad)
    with pytest.raises(SystemExit) as stopped:
        to_onnx.parse_args([str(tmp_path), "--out", "m.onnx", "--operating-point", "best"])
    assert stopped.value.code == 2
    assert "operating point must be" in capsys.readouterr().err


def test_export_parity_metadata_and_scan(tiny_run, tmp_path, slide_tree):
    model_path = tmp_path / "model.onnx"
    assert to_onnx.main([str(tiny_run), "--out", str(model_path), "--parity-images", "8"]) == 0
    classifier = load_classifier(model_path, device="cpu")
    info = classifier.info
    config = json.loads((tiny_run / "config.json").read_text())
    assert info.labels == ["all", "hem"] and info.positive_class == "all"
    assert info.recipe == Recipe.from_json(json.dumps(config["recipe"]))
    assert info.json_field("smearscan.architecture")["width"] == 0.0625
    assert "weighted_f1" in info.json_field("smearscan.metrics")["validation"]
    decision = info.json_field("smearscan.decision")
    assert decision["cell"]["rule"] == "threshold" and decision["slide"]["rule"] == "mean"
    assert decision["version"] == 1
    # the threshold is stored once, in the rule; the calibration holds the temperature
    assert set(info.json_field("smearscan.calibration")) == {"temperature", "fitted_on"}
    documented = (ROOT / "docs" / "model-file.md").read_text(encoding="utf-8")
    assert all(f"| `{key}` |" in documented for key in info.metadata)
    qc = info.json_field("smearscan.qc")
    assert qc["crops"] == len(config["split"]["train_patients"]) * 4  # every training crop
    # the default focus range covers the training crops under the validated focus shifts
    from export.shift import FOCUS_SHIFTS

    assert tuple(qc["shifted"]) == FOCUS_SHIFTS
    low, high = qc["limits"]["default"]["focus"]
    for under in qc["shifted"].values():
        assert low <= under["focus"]["p0.05"] and under["focus"]["p99.95"] <= high
    assert qc["limits"]["strict"]["focus"] == [
        qc["percentiles"]["focus"]["p0.5"],
        qc["percentiles"]["focus"]["p99.5"],
    ]
    assert info.metadata["smearscan.intended_use"].startswith("research use only")
    shape = classifier.session.get_inputs()[0].shape
    assert shape[0] == "batch" and shape[1:] == [128, 128, 3]
    import keras

    model = keras.models.load_model(tiny_run / "model.keras")
    images = np.stack(
        [load_and_preprocess(p, info.recipe) for p in sorted(CNMC.rglob("*")) if p.is_file()][:5]
    )
    assert np.abs(classifier.predict_raw(images) - model.predict(images, verbose=0)).max() < 1e-4
    # the graph's second output is the embedding distance the QC limits were fitted on:
    # numpy's whitening of the Keras embedding gives the same, and the limits bound the
    # training crops' own distances
    from export.embedding import Whitening, embeddings_of

    assert [o.name for o in classifier.session.get_outputs()] == ["probabilities", EMBEDDING]
    _, distances = classifier.run(images, distances=True)
    embedding = qc["embedding"]
    assert qc["version"] == 4 and embedding["output"] == EMBEDDING
    assert embedding["crops"] == qc["crops"]
    assert 0 < embedding["limits"]["strict"] < embedding["limits"]["default"]
    assert embedding["percentiles"]["p99.95"] < embedding["limits"]["default"]
    from export.data import discover_dataset

    trained_on = set(config["split"]["train_patients"])
    train_images = np.stack(
        [
            load_and_preprocess(sample.path, info.recipe)
            for sample in discover_dataset(CNMC)
            if sample.patient in trained_on
        ]
    )
    whitening = Whitening.fit(embeddings_of([model], train_images))
    reference = whitening.distances(embeddings_of([model], images))
    assert distances is not None and np.allclose(distances, reference, rtol=1e-3, atol=1e-4)
    out = tmp_path / "r.csv"
    run(
        ["scan", str(slide_tree), "--out", str(out), "--model", str(model_path)],
        expect=(0, ExitStatus.SOME_UNUSABLE),
    )
    assert len(rows(out)) == 8


EMBEDDING = "embedding_distance"


def test_int8_gate_judges_the_labels_the_scanner_would_give(tiny_run, tmp_path):
    """A twin that answers every crop alike must fail the gate, whatever its argmax
    agreement on one class (a constant output once passed as '100 % agreement')."""
    import onnx
    from onnx import TensorProto, helper

    model_path = tmp_path / "model.onnx"
    assert to_onnx.main([str(tiny_run), "--out", str(model_path), "--parity-images", "4"]) == 0
    fp32 = load_classifier(model_path, device="cpu")
    nodes = [
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "two"], ["out_shape"], axis=0),
        helper.make_node("Expand", ["constant", "out_shape"], ["probabilities"]),
    ]
    initializers = [
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("two", TensorProto.INT64, [1], [2]),
        helper.make_tensor("constant", TensorProto.FLOAT, [2], [0.6, 0.4]),
    ]
    graph = helper.make_graph(
        nodes,
        "constant",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 128, 128, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        initializers,
    )
    constant = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for entry in onnx.load(str(model_path)).metadata_props:
        constant.metadata_props.add(key=entry.key, value=entry.value)
    constant_path = tmp_path / "constant.onnx"
    onnx.save(constant, str(constant_path))
    images = np.stack(
        [load_and_preprocess(p, fp32.info.recipe) for p in sorted(CNMC.rglob("*.webp"))]
    )
    y = np.array([0 if p.parent.name == "all" else 1 for p in sorted(CNMC.rglob("*.webp"))])
    report = to_onnx.int8_agreement(fp32, load_classifier(constant_path, device="cpu"), images, y)
    assert report["label_agreement_min"] < 0.995 and report["max_abs_prob_diff"] > 0
    assert set(report["label_agreement_per_class"]) == {"all", "hem"}
    gated = tmp_path / "gated.onnx"
    code = to_onnx.main(
        [
            str(tiny_run),
            "--out",
            str(gated),
            "--int8",
            "--parity-images",
            "4",
            "--calibration-images",
            "8",
            "--int8-min-agreement",
            "1.01",
        ]
    )
    assert code == 0
    assert gated.exists() and not gated.with_suffix(".int8.onnx").exists()


def test_export_refuses_a_model_that_breaks_parity(tiny_run, tmp_path, monkeypatch):
    original = to_onnx.convert

    def corrupted(model, size):
        proto = original(model, size)
        for tensor in proto.graph.initializer:
            if tensor.name.endswith("kernel") or "conv" in tensor.name.lower():
                import onnx.numpy_helper as nh

                array = nh.to_array(tensor) * 1.5
                tensor.CopyFrom(nh.from_array(array.astype(np.float32), tensor.name))
                break
        return proto

    monkeypatch.setattr(to_onnx, "convert", corrupted)
    out = tmp_path / "bad.onnx"
    assert to_onnx.main([str(tiny_run), "--out", str(out), "--parity-images", "8"]) == 1
    assert not out.exists()


def test_three_classes_from_folder_names_and_a_chosen_positive(tmp_path, slide_tree):
    data = tmp_path / "three"
    layout = {
        "all": ["UID_1_", "UID_3_"],
        "hem": ["UID_H6_", "UID_H7_"],
        "aml": ["UID_19_", "UID_H8_"],
    }
    for label, prefixes in layout.items():
        (data / label).mkdir(parents=True)
        for source in sorted(CNMC.rglob("*.webp")):
            if source.name.startswith(tuple(prefixes)):
                shutil.copy(source, data / label / source.name)
    out = tmp_path / "run"
    assert (
        train.main(
            [
                "--data",
                str(data),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--folds",
                "2",
                "--width",
                "0.0625",
                "--batch-size",
                "8",
                "--per-patient",
                "8",
                "--quiet",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["labels"] == ["all", "aml", "hem"]
    model = tmp_path / "three.onnx"
    assert (
        to_onnx.main([str(out), "--out", str(model), "--parity-images", "4", "--positive", "aml"])
        == 0
    )
    classifier = load_classifier(model, device="cpu")
    assert classifier.labels == ["all", "aml", "hem"] and classifier.info.positive_class == "aml"
    assert classifier.info.json_field("smearscan.decision")["cell"]["rule"] == "argmax"
    result = run(
        [
            "scan",
            str(slide_tree),
            "--out",
            str(tmp_path / "r.csv"),
            "--model",
            str(model),
            "--threshold",
            "0.4",
        ],
        expect=ExitStatus.USAGE,
    )
    assert "applies only to a two-class model" in result.log
    assert to_onnx.main([str(out), "--out", str(model), "--positive", "blast"]) == 1


def test_training_refuses_bad_input_clearly(tmp_path):
    (tmp_path / "all").mkdir()
    shutil.copy(next(CNMC.rglob("*.webp")), tmp_path / "all")
    assert train.main(["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        train.parse_config(["--data", str(CNMC), "--out", str(tmp_path / "o"), "--epochs", "0"])
    assert exit_info.value.code == 2
    # a value of the right type that no trainer can use: refused by the typed config
    assert train.main(["--data", str(CNMC), "--out", str(tmp_path / "o"), "--ema", "1.5"]) == 2
    assert not (tmp_path / "o").exists()


def test_help_shows_defaults_and_runs_from_the_repository_root():
    for module in (
        "export.train",
        "export.cv",
        "export.to_onnx",
        "export.shift",
        "export.summarize_runs",
        "export.finetune_probe",
        "export.promote",
        "export.table1",
        "export.align",
    ):
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "(default:" in done.stdout, module


def test_summarize_runs_without_runs_is_a_message(tmp_path, capsys):
    assert summarize_runs.main([str(tmp_path / "nothing")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_vgg_architecture_follows_the_paper():
    model = build_vgg(2, width=0.25)
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [16, 16, 32, 32, 64, 64, 128, 128, 128, 128]
    pools = [
        layer.__class__.__name__ for layer in model.layers if "Pool" in layer.__class__.__name__
    ]
    assert pools == ["MaxPooling2D"] * 4 + ["GlobalAveragePooling2D"]
    assert model.output_shape == (None, 2)
    assert build_vgg(3, depth=19, width=0.125).output_shape == (None, 3)


def test_fine_tuning_starts_from_the_parent_and_records_it(tiny_run, tmp_path):
    """With a vanishing learning rate the fine-tuned model is its parent; the parent is
    recorded in the run and in the exported file."""
    child = tmp_path / "child"
    assert (
        train_unchanged_child(tiny_run, child, tiny_run.parent / "cache", "--bn-recalibrate", "0")
        == 0
    )
    config = json.loads((child / "config.json").read_text())
    assert config["parent"]["path"].endswith("model.keras") and config["parent"]["name"] == "tiny"
    parent_rows = rows(tiny_run / "val_predictions.csv")
    child_rows = rows(child / "val_predictions.csv")
    assert [r["path"] for r in parent_rows] == [r["path"] for r in child_rows]
    import keras

    parent_model = keras.models.load_model(tiny_run / "model.keras")
    child_model = keras.models.load_model(child / "model.keras")

    # the learned weights are the parent's, matched by name: freezing batch norm changes
    # which weights are trainable, and moving statistics move with any training
    def learned(model) -> dict[str, np.ndarray]:
        return {
            w.path: np.asarray(w)
            for w in model.weights
            if not w.path.endswith(("moving_mean", "moving_variance"))
        }

    mine, theirs = learned(child_model), learned(parent_model)
    assert mine.keys() == theirs.keys() and len(mine) > 10
    for path, value in mine.items():
        assert np.abs(value - theirs[path]).max() < 1e-6, path
    model = tmp_path / "child.onnx"
    assert to_onnx.main([str(child), "--out", str(model), "--parity-images", "4"]) == 0
    parent = load_classifier(model, device="cpu").info.json_field("smearscan.parent")
    assert parent["name"] == "tiny"
    other = tmp_path / "other"
    assert (
        train.main(
            [
                "--data",
                str(CNMC),
                "--out",
                str(other),
                "--epochs",
                "1",
                *TINY,
                "--init-from",
                str(tiny_run),
                "--crop",
                "full",
                "--cache-dir",
                str(tiny_run.parent / "cache"),
            ]
        )
        == 2
    )


def test_table1_options_are_typed_and_train_as_published():
    """The table's VGG rows train with the flags docs/table1.md publishes, and a row
    the table does not have is refused before any work."""
    from export import table1, train

    options = table1.parse_args(
        ["--data", "d", "--out", "t.md", "--width", "0.0625", "--epochs", "3", "--seed", "2"]
    )
    assert isinstance(options, table1.Table1Options) and options.only == tuple(table1.ORDER)
    published = train.parse_config(
        ["--data", "d", "--out", "runs/table1/vgg19", "--depth", "19", "--width", "0.0625"]
        + ["--epochs", "3", "--batch-norm", "--lr", "1e-3", "--batch-size", "32"]
        + ["--per-patient", "100", "--folds", "4", "--fold", "0", "--seed", "2"]
        + ["--split-seed", "2", "--crop", "window", "--window", "320", "--augment", "flips"]
        + ["--balance", "weights", "--ema", "0", "--bn-recalibrate", "0", "--select", "best"]
        + ["--quiet"]
    )
    assert options.vgg_config(19) == published
    with pytest.raises(ValueError, match="unknown row"):
        table1.parse_args(["--data", "d", "--out", "t.md", "--only", "KNN,VGG11"])


def test_table1_quick_path(tmp_path):
    from export import table1

    out = tmp_path / "table1.md"
    work = tmp_path / "work"
    args = [
        "--data",
        str(CNMC),
        "--out",
        str(out),
        "--work",
        str(work),
        "--width",
        "0.0625",
        "--epochs",
        "1",
        "--folds",
        "3",
        "--per-patient",
        "4",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert table1.main([*args, "--only", "KNN,SVM,VGG16"]) == 0
    text = out.read_text()
    for name in ["KNN", "SVM", "VGG16"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert "not run" not in row and "86.23" in text
    assert "| VGG19 | not run" in text
    results = json.loads((work / "results.json").read_text())
    assert set(results) == {"KNN", "SVM", "VGG16"}
    assert json.loads((tmp_path / "table1-results.json").read_text()) == results
    stamp = (work / "vgg16" / "model.keras").stat().st_mtime_ns
    assert table1.main([*args, "--only", "KNN,VGG16"]) == 0  # resumable: no retraining
    assert (work / "vgg16" / "model.keras").stat().st_mtime_ns == stamp
