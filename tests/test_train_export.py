"""Real training and export on the committed fixture crops (TensorFlow: the [train] extra)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CNMC
from test_scan_cli import rows, run

pytest.importorskip("tensorflow", reason="TensorFlow is in the [train] extra")
pytest.importorskip("tf2onnx", reason="tf2onnx is in the [train] extra")
pytestmark = pytest.mark.train

from export import to_onnx, train  # noqa: E402
from export.vgg import build_vgg  # noqa: E402
from smearscan.inference import load_classifier  # noqa: E402
from smearscan.preprocess import Recipe, load_and_preprocess  # noqa: E402


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    code = train.main([
        "--data", str(CNMC), "--out", str(out), "--width", "0.0625", "--epochs", "2",
        "--folds", "3", "--batch-size", "8", "--quiet", "--seed", "3",
        "--cache-dir", str(out.parent / "cache"),
    ])  # fmt: skip
    assert code == 0
    return out


def test_training_writes_the_run_folder(trained_run):
    for name in ["model.keras", "config.json", "history.csv", "curves.png", "metrics.json",
                 "val_predictions.csv"]:  # fmt: skip
        assert (trained_run / name).stat().st_size > 0, name
    config = json.loads((trained_run / "config.json").read_text())
    split = config["split"]
    assert not set(split["train_patients"]) & set(split["val_patients"])
    assert len(split["val_patients"]) == 2  # one patient per class in 3 folds of 3+3
    history = (trained_run / "history.csv").read_text().splitlines()
    assert len(history) == 3 and history[0].startswith("epoch,loss,accuracy,val_loss")
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ["sensitivity", "specificity", "accuracy", "weighted_f1", "roc_auc",
                "confusion_matrix"]:  # fmt: skip
        assert key in metrics["validation"]


def test_training_is_deterministic_for_a_seed(trained_run, tmp_path):
    again = tmp_path / "again"
    train.main(["--data", str(CNMC), "--out", str(again), "--width", "0.0625", "--epochs", "2",
                "--folds", "3", "--batch-size", "8", "--quiet", "--seed", "3",
                "--cache-dir", str(trained_run.parent / "cache")])  # fmt: skip
    first = (trained_run / "val_predictions.csv").read_text()
    assert (again / "val_predictions.csv").read_text() == first


def test_export_parity_metadata_and_scan(trained_run, tmp_path, slide_tree):
    model_path = tmp_path / "model.onnx"
    code = to_onnx.main([str(trained_run), "--out", str(model_path), "--int8",
                         "--parity-images", "8", "--calibration-images", "16",
                         "--int8-min-agreement", "0"])  # fmt: skip
    assert code == 0
    classifier = load_classifier(model_path, device="cpu")
    info = classifier.info
    config = json.loads((trained_run / "config.json").read_text())
    assert info.labels == ["all", "hem"] and info.positive_class == "all"
    assert info.recipe == Recipe(**config["recipe"])
    assert info.json_field("smearscan.architecture")["width"] == 0.0625
    assert "sensitivity" in info.json_field("smearscan.metrics")["validation"]
    assert classifier.temperature > 0
    shape = classifier.session.get_inputs()[0].shape
    assert shape[0] == "batch" and shape[1:] == [128, 128, 3]
    # parity against Keras on real crops, through the serving path
    import keras

    model = keras.models.load_model(trained_run / "model.keras")
    images = np.stack([load_and_preprocess(p, info.recipe) for p in sorted(CNMC.rglob("*"))
                       if p.is_file()][:5])  # fmt: skip
    assert np.abs(classifier.predict_raw(images) - model.predict(images, verbose=0)).max() < 1e-4
    # INT8 file carries the same labels and its measured agreement
    int8 = load_classifier(model_path.with_suffix(".int8.onnx"), device="cpu")
    quant = int8.info.json_field("smearscan.quantization")
    assert int8.info.labels == info.labels and 0.0 <= quant["argmax_agreement_vs_fp32"] <= 1.0
    ops = {node.op_type for node in __import__("onnx").load(str(int8.info.path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # scan loads the exported model with --model
    out = tmp_path / "r.csv"
    assert run(["scan", str(slide_tree), "--out", str(out), "--model", str(model_path)]
               ).exit_code == 0  # fmt: skip
    assert len(rows(out)) == 8


def test_int8_below_the_agreement_gate_is_not_written(trained_run, tmp_path):
    model_path = tmp_path / "model.onnx"
    code = to_onnx.main([str(trained_run), "--out", str(model_path), "--int8",
                         "--parity-images", "4", "--calibration-images", "8",
                         "--int8-min-agreement", "1.01"])  # fmt: skip
    assert code == 0 and model_path.exists()
    assert not model_path.with_suffix(".int8.onnx").exists()


def test_export_refuses_a_model_that_breaks_parity(trained_run, tmp_path, monkeypatch):
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
    assert to_onnx.main([str(trained_run), "--out", str(out), "--parity-images", "8"]) == 1
    assert not out.exists()


def test_three_classes_from_folder_names(tmp_path):
    data = tmp_path / "three"
    layout = {"all": ["UID_1_", "UID_3_"], "hem": ["UID_H6_", "UID_H7_"],
              "aml": ["UID_19_", "UID_H8_"]}  # fmt: skip
    for label, prefixes in layout.items():
        (data / label).mkdir(parents=True)
        for source in sorted(CNMC.rglob("*.webp")):
            if source.name.startswith(tuple(prefixes)):
                shutil.copy(source, data / label / source.name)
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--width", "0.0625",
                       "--epochs", "1", "--folds", "2", "--batch-size", "8", "--quiet",
                       "--cache-dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    assert json.loads((out / "config.json").read_text())["labels"] == ["all", "aml", "hem"]
    model = tmp_path / "three.onnx"
    assert to_onnx.main([str(out), "--out", str(model), "--parity-images", "4"]) == 0
    assert load_classifier(model, device="cpu").labels == ["all", "aml", "hem"]


def test_one_class_dataset_fails_clearly(tmp_path):
    (tmp_path / "all").mkdir()
    shutil.copy(next(CNMC.rglob("*.webp")), tmp_path / "all")
    assert train.main(["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


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


def test_table1_quick_path(tmp_path):
    from export import table1

    out = tmp_path / "table1.md"
    work = tmp_path / "work"
    args = ["--data", str(CNMC), "--out", str(out), "--work", str(work), "--width", "0.0625",
            "--epochs", "1", "--folds", "3", "--per-patient", "4",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert table1.main([*args, "--only", "KNN,SVM,VGG16,VGG16+RF"]) == 0
    text = out.read_text()
    for name in ["KNN", "SVM", "VGG16", "VGG16+RF"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert "not run" not in row and "86.23" in text
    assert "| VGG19 | not run" in text
    results = json.loads((work / "results.json").read_text())
    assert set(results) == {"KNN", "SVM", "VGG16", "VGG16+RF"}
    assert json.loads((tmp_path / "table1-results.json").read_text()) == results
    # resumable: a second call reuses finished rows instead of retraining
    stamp = (work / "vgg16" / "model.keras").stat().st_mtime_ns
    assert table1.main([*args, "--only", "KNN,VGG16"]) == 0
    assert (work / "vgg16" / "model.keras").stat().st_mtime_ns == stamp


def test_cv_summary_over_patient_folds(trained_run, tmp_path, capsys):
    import csv

    from export import summarize_runs

    other = tmp_path / "fold1"
    code = train.main(["--data", str(CNMC), "--out", str(other), "--width", "0.0625",
                       "--epochs", "1", "--folds", "3", "--fold", "1", "--batch-size", "8",
                       "--quiet", "--cache-dir", str(trained_run.parent / "cache")])  # fmt: skip
    assert code == 0
    fold0 = json.loads((trained_run / "config.json").read_text())["split"]["val_patients"]
    fold1 = json.loads((other / "config.json").read_text())["split"]["val_patients"]
    assert not set(fold0) & set(fold1)  # different patients validate each fold
    assert summarize_runs.main(["--cv", str(trained_run), str(other)]) == 0
    table = capsys.readouterr().out.splitlines()
    last = []
    for run_dir in (trained_run, other):
        with open(run_dir / "history.csv", newline="") as handle:
            last.append(float(list(csv.DictReader(handle))[-1]["val_weighted_f1"]))
    mean_row = next(line for line in table if line.startswith("| **mean**"))
    assert mean_row.split("|")[4].strip() == f"{sum(last) / 2:.4f}"
    assert sum(line.startswith("| `") for line in table) == 2
