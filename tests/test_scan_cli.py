"""The scan command end to end, on real crops and a real ONNX session."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_3CLASS, fixture_images

from smearscan.cli import Environment, cli
from smearscan.exitstatus import ExitStatus
from smearscan.modelfile import default_model_path, file_sha256
from smearscan.preprocess import IMAGE_SUFFIXES


def run(args: list[str], stdin: str | None = None):
    stderr = io.StringIO()
    result = CliRunner().invoke(
        cli, args, obj=Environment(stderr=stderr, stderr_isatty=False), input=stdin
    )
    result.log = stderr.getvalue()
    return result


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def image_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def test_clean_scan_reports_every_cell(slide_tree, tmp_path):
    out = tmp_path / "out" / "report.csv"
    result = run(["scan", str(slide_tree), "--out", str(out)])
    assert result.exit_code == ExitStatus.SUCCESS, result.log
    table = rows(out)
    assert len(table) == len(image_files(slide_tree)) == 8
    assert list(table[0]) == ["path", "slide", "label", "p_all", "p_hem", "status", "error"]
    for row in table:
        assert row["status"] == "ok" and row["error"] == ""
        assert row["label"] in ("all", "hem")
        assert float(row["p_all"]) + float(row["p_hem"]) == pytest.approx(1.0, abs=1e-5)
        assert row["slide"] == row["path"].split("/")[0]
    assert [r["path"] for r in table] == sorted(r["path"] for r in table)
    summary = json.loads(out.with_name("report.summary.json").read_text())
    assert summary["overall"]["cells"] == 8 and summary["overall"]["errors"] == 0
    assert set(summary["slides"]) == {"patient_A", "patient_B"}
    assert summary["model"]["sha256"] == file_sha256(default_model_path())
    assert summary["execution_provider"] == "CPUExecutionProvider"
    for slide in summary["slides"].values():
        assert sum(slide["counts"].values()) == slide["cells"]
    assert out.with_name("report.html").stat().st_size > 1000
    assert "execution provider CPUExecutionProvider" in result.log
    assert "smearscan done: 8 files, 8 ok, 0 errors, 0 pending" in result.log


def test_messy_folder_gets_one_row_per_file_and_keeps_going(messy_tree, tmp_path):
    out = tmp_path / "report.csv"
    result = run(["scan", str(messy_tree), "--out", str(out)])
    assert result.exit_code == ExitStatus.SOME_UNREADABLE, result.log
    table = rows(out)
    assert len(table) == len(image_files(messy_tree))
    by_name = {row["path"].rsplit("/", 1)[-1]: row for row in table}
    assert by_name["empty.png"]["error"].startswith("empty file")
    assert by_name["truncated.png"]["status"] == "error"
    assert "not a decodable image" in by_name["notes.jpg"]["error"]
    for name in ["deep16.png", "gray.png", "alpha.png", "ünïcødé 細胞.png",
                 'comma, "quote".png', "new\nline.png"]:  # fmt: skip
        assert by_name[name]["status"] == "ok", by_name[name]
    assert by_name["=HYPERLINK(1).png"]["status"] == "ok"
    errors = [r for r in table if r["status"] == "error"]
    assert all(r["p_all"] == "" and r["label"] == "" for r in errors)
    summary = json.loads((tmp_path / "report.summary.json").read_text())
    assert summary["overall"]["errors"] == len(errors) == 3


def test_csv_neutralises_formula_cells(tmp_path, slide_tree):
    evil = slide_tree / "+cmd"
    evil.mkdir()
    source = next(image_files(slide_tree / "patient_A").__iter__())
    (evil / "@sum.png").write_bytes(source.read_bytes())
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)])
    row = next(r for r in rows(out) if "sum" in r["path"])
    assert row["path"] == "'+cmd/@sum.png" and row["slide"] == "'+cmd"


def test_jsonl_output_keeps_names_raw(tmp_path, messy_tree):
    out = tmp_path / "r.jsonl"
    result = run(["scan", str(messy_tree), "--out", str(out), "--format", "jsonl", "--no-html"])
    assert result.exit_code == ExitStatus.SOME_UNREADABLE
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(image_files(messy_tree))
    assert any(line["path"].endswith("=HYPERLINK(1).png") for line in lines)
    assert not (tmp_path / "r.html").exists()


def test_symlinks_never_leave_the_root_and_loops_end(tmp_path, slide_tree):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(next(iter(image_files(slide_tree))).read_bytes())
    (slide_tree / "escape_dir").symlink_to(outside, target_is_directory=True)
    (slide_tree / "patient_A" / "escape.png").symlink_to(secret)
    (slide_tree / "patient_A" / "loop").symlink_to(slide_tree, target_is_directory=True)
    (slide_tree / "patient_B" / "inside.png").symlink_to(
        next(iter(image_files(slide_tree / "patient_A")))
    )
    out = tmp_path / "r.csv"
    result = run(["scan", str(slide_tree), "--out", str(out)])
    table = rows(out)
    paths = [r["path"] for r in table]
    assert not any("escape_dir" in p or "secret" in p for p in paths)
    escape = next(r for r in table if r["path"] == "patient_A/escape.png")
    assert escape["status"] == "error" and "outside" in escape["error"]
    inside = next(r for r in table if r["path"] == "patient_B/inside.png")
    assert inside["status"] == "ok"
    assert len(paths) == len(set(paths)) == 10  # 8 crops + escape + inside, loop not followed
    assert result.exit_code == ExitStatus.SOME_UNREADABLE


def test_failed_run_leaves_previous_report_untouched(tmp_path, slide_tree):
    out = tmp_path / "r.csv"
    out.write_text("previous report\n")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    result = run(["scan", str(slide_tree), "--out", str(out), "--model", str(broken)])
    assert result.exit_code == ExitStatus.ERROR
    assert "cannot load model" in result.log
    assert out.read_text() == "previous report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx", "r.csv", "slides"]


def test_reports_are_not_world_readable(tmp_path, slide_tree):
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)])
    for name in ["r.csv", "r.summary.json", "r.html"]:
        assert (tmp_path / name).stat().st_mode & 0o007 == 0


def test_usage_errors_exit_2(tmp_path):
    assert run(["scan", "--out", str(tmp_path / "r.csv")]).exit_code == ExitStatus.USAGE
    missing = run(["scan", str(tmp_path / "nope"), "--out", str(tmp_path / "r.csv")])
    assert missing.exit_code == ExitStatus.USAGE
    assert run(["scan", str(tmp_path)]).exit_code == ExitStatus.USAGE  # no --out


def test_cuda_request_fails_loudly_without_cuda(tmp_path, slide_tree):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    result = run(["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "--device", "cuda"])
    assert result.exit_code == ExitStatus.ERROR
    assert "CUDA was requested" in result.log
    auto = run(["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "--device", "auto"])
    assert auto.exit_code == 0 and "CUDA not available; running on CPU" in auto.log


def test_files_from_stdin_reports_missing_files(tmp_path, slide_tree):
    listed = [str(p) for p in sorted(image_files(slide_tree))[:3]]
    listed.append(str(tmp_path / "gone.png"))
    out = tmp_path / "r.csv"
    result = run(["scan", "--files-from", "-", "--out", str(out)], stdin="\n".join(listed))
    assert result.exit_code == ExitStatus.SOME_UNREADABLE
    table = rows(out)
    assert [r["path"] for r in table] == listed
    assert table[-1]["error"] == "file not found"


def test_glob_and_slide_depth(tmp_path, slide_tree):
    nested = slide_tree / "patient_A" / "day2"
    nested.mkdir()
    for p in image_files(slide_tree / "patient_B"):
        (nested / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out), "--glob", "*.png", "--slide-depth", "1"])
    table = rows(out)
    assert table and all(r["path"].endswith(".png") for r in table)
    assert {r["slide"] for r in table} <= {"patient_A", "patient_B"}


def test_three_class_model_columns_come_from_metadata(tmp_path, slide_tree):
    out = tmp_path / "r.csv"
    result = run(["scan", str(slide_tree), "--out", str(out), "--model", str(TINY_3CLASS)])
    assert result.exit_code == 0, result.log
    table = rows(out)
    assert list(table[0])[2:6] == ["label", "p_all", "p_aml", "p_hem"]
    assert {r["label"] for r in table} <= {"all", "aml", "hem"}


def test_model_info_prints_metadata():
    result = run(["model", "info"])
    assert result.exit_code == 0
    assert "labels:           all, hem" in result.output
    assert "training_data" in result.output
    as_json = json.loads(run(["model", "info", "--json"]).output)
    assert json.loads(as_json["metadata"]["smearscan.preprocessing"]["crop"] and "1") == 1
    assert as_json["metadata"]["smearscan.labels"] == ["all", "hem"]


def test_environment_variables_set_defaults(tmp_path, slide_tree, monkeypatch):
    monkeypatch.setenv("SMEARSCAN_MODEL", str(TINY_3CLASS))
    out = tmp_path / "r.csv"
    assert run(["scan", str(slide_tree), "--out", str(out)]).exit_code == 0
    assert "p_aml" in out.read_text().splitlines()[0]


def test_examples_folder_scans(tmp_path):
    examples = Path(__file__).resolve().parents[1] / "examples" / "slides"
    if not examples.is_dir():
        pytest.fail("examples/slides is missing")
    out = tmp_path / "r.csv"
    result = run(["scan", str(examples), "--out", str(out)])
    assert result.exit_code == 0, result.log
    assert len(rows(out)) == len(image_files(examples)) == 8


def test_fixture_images_exist():
    assert len(fixture_images()) == 24
    assert os.access(default_model_path(), os.R_OK)


def test_padded_batches_give_the_same_probabilities(slide_tree):
    import numpy as np

    from smearscan.inference import load_classifier
    from smearscan.preprocess import load_and_preprocess

    classifier = load_classifier(device="cpu")
    batch = np.stack([load_and_preprocess(p, classifier.info.recipe)
                      for p in sorted(image_files(slide_tree))[:3]])  # fmt: skip
    plain = classifier.predict(batch)
    classifier.pad_to = 8
    padded = classifier.predict(batch)
    assert padded.shape == (3, 2) and np.allclose(plain, padded, atol=1e-6)


def test_discovery_is_lazy(tmp_path, monkeypatch):
    import smearscan.discover as discover_module

    source = fixture_images()[0].read_bytes()
    for i in range(30):
        folder = tmp_path / f"slide_{i:02d}"
        folder.mkdir()
        (folder / "cell.webp").write_bytes(source)
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(discover_module.os, "scandir",
                        lambda path: listed.append(path) or real_scandir(path))  # fmt: skip
    first = next(discover_module.discover([tmp_path]))
    assert first.rel == "slide_00/cell.webp"
    assert len(listed) <= 2  # the root and the first slide, not all 31 folders


def test_unreadable_file_gets_an_error_row(tmp_path, slide_tree):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    locked = sorted(image_files(slide_tree))[0]
    locked.chmod(0)
    out = tmp_path / "r.csv"
    result = run(["scan", str(slide_tree), "--out", str(out)])
    assert result.exit_code == ExitStatus.SOME_UNREADABLE
    row = next(r for r in rows(out) if r["path"] == str(locked.relative_to(slide_tree)))
    assert row["error"] == "permission denied"


def test_a_folder_named_like_an_image_is_reported_not_crashed_on(tmp_path, slide_tree):
    (slide_tree / "patient_A" / "scan.png").mkdir()
    (slide_tree / "patient_A" / "scan.png" / "inner.bmp").write_bytes(b"")
    out = tmp_path / "r.csv"
    result = run(["scan", str(slide_tree), "--out", str(out)])
    table = rows(out)
    assert len(table) == 9 and result.exit_code == ExitStatus.SOME_UNREADABLE
    assert next(r for r in table if r["path"].endswith("inner.bmp"))["error"].startswith("empty")


def test_log_file_gets_the_run_log(tmp_path, slide_tree):
    log_file = tmp_path / "scan.log"
    run(["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "--log-file", str(log_file)])
    text = log_file.read_text()
    assert "execution provider CPUExecutionProvider" in text
    assert text.strip().splitlines()[-1].endswith("exit 0 (success)")


@pytest.mark.parametrize(("workers", "batch_size"), [(1, 32), (2, 3), (3, 1)])
def test_parallel_batches_keep_order_and_match_one_big_batch(slide_tree, workers, batch_size):
    """Workers run whole batches concurrently on one session; results must come back in
    discovery order, each with the probabilities of its own image."""
    import numpy as np

    from smearscan.discover import discover
    from smearscan.inference import load_classifier
    from smearscan.preprocess import load_and_preprocess
    from smearscan.scan import ScanOptions, scan_paths

    (slide_tree / "patient_A" / "broken.png").write_bytes(b"not an image")
    classifier = load_classifier(device="cpu")
    found = list(discover([slide_tree]))
    options = ScanOptions(batch_size=batch_size, workers=workers, threshold=0.5)
    results = list(scan_paths(found, classifier, options))
    assert [r.path for r in results] == [f.rel for f in found]
    good = [f for f in found if not f.rel.endswith("broken.png")]
    reference = classifier.predict(np.stack([load_and_preprocess(f.path, classifier.info.recipe)
                                             for f in good]))  # fmt: skip
    by_path = {r.path: r for r in results}
    assert by_path["patient_A/broken.png"].status == "error"
    for item, expected in zip(good, reference, strict=True):
        assert np.allclose(by_path[item.rel].probabilities, expected, atol=1e-5)


def test_thread_options_do_not_change_results(slide_tree, tmp_path):
    default, tuned = tmp_path / "default.csv", tmp_path / "tuned.csv"
    assert run(["scan", str(slide_tree), "--out", str(default), "--no-html"]).exit_code == 0
    result = run(["scan", str(slide_tree), "--out", str(tuned), "--no-html", "--workers", "3",
                  "--threads", "2", "--batch-size", "3"])  # fmt: skip
    assert result.exit_code == 0
    for a, b in zip(rows(default), rows(tuned), strict=True):
        assert a["path"] == b["path"] and a["label"] == b["label"]
        assert abs(float(a["p_all"]) - float(b["p_all"])) < 1e-5
