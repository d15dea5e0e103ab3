"""The scan command end to end, on real crops and a real ONNX session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CNMC, TINY_3CLASS, fixture_images, image_files, rows, run

from smearscan.exitstatus import ExitStatus
from smearscan.modelfile import default_model_path, file_sha256
from smearscan.qc import QC_VERSION

ROOT = Path(__file__).resolve().parents[1]


def test_clean_scan_reports_every_cell(slide_tree, tmp_path):
    out = tmp_path / "out" / "report.csv"
    result = run(["scan", str(slide_tree), "--out", str(out)])
    table = rows(out)
    assert len(table) == len(image_files(slide_tree)) == 8
    assert list(table[0]) == [
        "path",
        "slide",
        "label",
        "p_all",
        "p_hem",
        "status",
        "reason",
        "decided_by",
    ]
    for row in table:
        assert row["status"] == "ok" and row["reason"] == ""
        assert row["label"] in ("all", "hem")
        assert float(row["p_all"]) + float(row["p_hem"]) == pytest.approx(1.0, abs=1e-5)
        assert row["slide"] == row["path"].split("/")[0]
        assert row["decided_by"].startswith("P(all) >= ")
    assert [r["path"] for r in table] == sorted(r["path"] for r in table)
    summary = json.loads(out.with_name("report.summary.json").read_text())
    assert summary["overall"]["cells"] == 8 and summary["overall"]["errors"] == 0
    assert summary["intended_use"] == "research use only; not for diagnostic use"
    assert set(summary["slides"]) == {"patient_A", "patient_B"}
    assert summary["model"]["sha256"] == file_sha256(default_model_path())
    assert summary["execution_provider"] == "CPUExecutionProvider"
    for slide in summary["slides"].values():
        assert sum(slide["counts"].values()) == slide["cells"]
        assert slide["call"] == "insufficient"  # 4 cells each: fewer than the 10 a call needs
    assert out.with_name("report.html").stat().st_size > 1000
    assert "execution provider CPUExecutionProvider" in result.log
    # a CPU-only machine is normal, not a warning; the tree's two JPEG crops are
    warnings = [line for line in result.log.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "2 of 8 files are JPEG" in warnings[0]
    assert summary["overall"]["jpeg_files"] == 2 and summary["model"]["is_default"]
    assert "the default model, trained on lossless crops" in warnings[0]
    assert 'id="jpeg"' in out.with_name("report.html").read_text()
    assert (
        result.log.strip()
        .splitlines()[-1]
        .startswith("smearscan done: 8 files, 8 ok, 0 failed QC, 0 errors, 0 pending")
    )


def test_the_jpeg_notice_does_not_pin_the_default_models_figure_on_another(tmp_path, slide_tree):
    """Issue 21: under --model the notice named "the default model" as if it were this one."""
    out = tmp_path / "r.csv"
    result = run(["scan", str(slide_tree), "--out", str(out), "--model", str(TINY_3CLASS)])
    assert "this model's JPEG behaviour is unmeasured" in result.log
    assert "behaviour on JPEG is unmeasured" in out.with_name("r.html").read_text()
    assert json.loads(out.with_name("r.summary.json").read_text())["model"]["is_default"] is False


def test_lossless_crops_get_no_jpeg_notice(tmp_path):
    out = tmp_path / "r.csv"
    result = run(["scan", str(CNMC), "--out", str(out)])  # lossless WebP
    assert json.loads(out.with_name("r.summary.json").read_text())["overall"]["jpeg_files"] == 0
    assert "JPEG" not in result.log
    assert 'id="jpeg"' not in out.with_name("r.html").read_text()


def test_messy_folder_gets_one_row_per_file_and_keeps_going(messy_tree, tmp_path):
    out = tmp_path / "report.csv"
    result = run(["scan", str(messy_tree), "--out", str(out)], expect=ExitStatus.SOME_UNUSABLE)
    table = rows(out)
    assert len(table) == len(image_files(messy_tree))
    by_name = {row["path"].rsplit("/", 1)[-1]: row for row in table}
    assert by_name["empty.png"]["reason"].startswith("empty file")
    assert by_name["truncated.png"]["status"] == "error"
    assert "not a decodable image" in by_name["notes.jpg"]["reason"]
    for name in [
        "deep16.png",
        "alpha.png",
        "ünïcødé 細胞.png",
        'comma, "quote".png',
        "new\\nline.png",
    ]:
        assert by_name[name]["status"] == "ok", by_name[name]
    assert by_name["=HYPERLINK(1).png"]["status"] == "ok"
    assert by_name["gray.png"]["status"] == "qc"
    assert "grayscale" in by_name["gray.png"]["reason"]
    unusable = [r for r in table if r["status"] != "ok"]
    assert all(r["p_all"] == "" and r["label"] == "" and r["decided_by"] == "" for r in unusable)
    summary = json.loads((tmp_path / "report.summary.json").read_text())
    assert summary["overall"]["errors"] == 3 and summary["overall"]["qc_failed"] == 1
    assert "1 failed QC, 3 errors" in result.log.strip().splitlines()[-1]


def test_csv_neutralises_formula_cells(tmp_path, slide_tree):
    evil = slide_tree / "+cmd"
    evil.mkdir()
    source = next(iter(image_files(slide_tree / "patient_A")))
    (evil / "@sum.png").write_bytes(source.read_bytes())
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)])
    row = next(r for r in rows(out) if "sum" in r["path"])
    assert row["path"] == "'+cmd/@sum.png" and row["slide"] == "'+cmd"


def test_jsonl_is_chosen_by_the_extension_and_keeps_names(tmp_path, messy_tree):
    out = tmp_path / "r.jsonl"
    run(["scan", str(messy_tree), "--out", str(out), "--no-html"], expect=ExitStatus.SOME_UNUSABLE)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(image_files(messy_tree))
    assert any(line["path"].endswith("=HYPERLINK(1).png") for line in lines)
    ok = next(line for line in lines if line["status"] == "ok")
    assert isinstance(ok["p_all"], float) and ok["label"] in ("all", "hem")
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
    run(["scan", str(slide_tree), "--out", str(out)], expect=ExitStatus.SOME_UNUSABLE)
    table = rows(out)
    paths = [r["path"] for r in table]
    assert not any("escape_dir" in p or "secret" in p for p in paths)
    escape = next(r for r in table if r["path"] == "patient_A/escape.png")
    assert escape["status"] == "error" and "outside" in escape["reason"]
    inside = next(r for r in table if r["path"] == "patient_B/inside.png")
    assert inside["status"] == "ok"
    assert len(paths) == len(set(paths)) == 10  # 8 crops + escape + inside, loop not followed


def test_failed_run_leaves_previous_report_untouched(tmp_path, slide_tree):
    out = tmp_path / "r.csv"
    out.write_text("previous report\n")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    result = run(
        ["scan", str(slide_tree), "--out", str(out), "--model", str(broken)],
        expect=ExitStatus.ERROR,
    )
    assert "cannot load model" in result.log
    assert result.log.strip().splitlines()[-1].startswith("smearscan failed:")
    assert out.read_text() == "previous report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx", "r.csv", "slides"]


def test_reports_are_not_world_readable(tmp_path, slide_tree):
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)])
    for name in ["r.csv", "r.summary.json", "r.html"]:
        assert (tmp_path / name).stat().st_mode & 0o007 == 0


def test_usage_errors_exit_2(tmp_path, slide_tree):
    usage = ExitStatus.USAGE
    run(["scan", "--out", str(tmp_path / "r.csv")], expect=usage)
    run(["scan", str(tmp_path / "nope"), "--out", str(tmp_path / "r.csv")], expect=usage)
    run(["scan", str(tmp_path)], expect=usage)  # no --out
    run(
        ["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "--device", "tpu"], expect=usage
    )
    for extra in (["--min-age", "5"], ["--new-only"], ["--wait", "1"], ["--verify", "content"]):
        result = run(
            ["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), *extra], expect=usage
        )
        assert "need --state" in result.output


def test_cuda_request_fails_loudly_without_cuda(tmp_path, slide_tree):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    result = run(
        ["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "--device", "cuda"],
        expect=ExitStatus.ERROR,
    )
    assert "CUDA was requested" in result.log
    auto = run(["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "--device", "auto"])
    assert "CUDA not available; running on CPU" in auto.log
    assert not [line for line in auto.log.splitlines() if "WARNING" in line and "JPEG" not in line]


def test_files_from_stdin_reports_missing_files(tmp_path, slide_tree):
    listed = [str(p) for p in sorted(image_files(slide_tree))[:3]]
    listed.append(str(tmp_path / "gone.png"))
    out = tmp_path / "r.csv"
    run(
        ["scan", "--files-from", "-", "--out", str(out)],
        stdin="\n".join(listed),
        expect=ExitStatus.SOME_UNUSABLE,
    )
    table = rows(out)
    assert [r["path"] for r in table] == listed
    assert table[-1]["reason"] == "file not found"


def test_glob_is_case_insensitive_and_slide_depth(tmp_path, slide_tree):
    nested = slide_tree / "patient_A" / "day2"
    nested.mkdir()
    for p in image_files(slide_tree / "patient_B"):
        (nested / p.name.replace(".png", ".PNG")).write_bytes(p.read_bytes())
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out), "--glob", "*.png", "--slide-depth", "1"])
    table = rows(out)
    assert any(r["path"].endswith(".PNG") for r in table)
    assert table and all(r["path"].lower().endswith(".png") for r in table)
    assert {r["slide"] for r in table} <= {"patient_A", "patient_B"}
    run(["scan", str(slide_tree), "--out", str(out), "--glob", "*.png", "--glob-case-sensitive"])
    assert not any(r["path"].endswith(".PNG") for r in rows(out))


def test_three_class_model_columns_come_from_metadata(tmp_path, slide_tree):
    out = tmp_path / "r.csv"
    result = run(["scan", str(slide_tree), "--out", str(out), "--model", str(TINY_3CLASS)])
    table = rows(out)
    assert list(table[0])[3:6] == ["p_all", "p_aml", "p_hem"]
    assert all(r["label"] in ("all", "aml", "hem") for r in table)
    assert all(r["decided_by"] == "most probable class" for r in table)
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["decision"]["cell_rule"] == "argmax"
    assert "quality control is off" in result.log  # an older file without QC limits


def test_model_info_is_readable_and_json_is_complete():
    text = run(["model", "info"]).output
    for phrase in (
        "research use only",
        "cell rule",
        "slide rule",
        "quality",
        "sensitivity",
        "missed blasts",
        "false alarms",
    ):
        assert phrase in text, phrase
    as_json = json.loads(run(["model", "info", "--json"]).output)
    assert as_json["metadata"]["smearscan.labels"] == ["all", "hem"]
    assert "limits" in as_json["metadata"]["smearscan.qc"]
    assert as_json["metadata"]["smearscan.qc"]["version"] == QC_VERSION
    assert f"QC measurement version {QC_VERSION}" in text
    assert as_json["intended_use"].startswith("Research use only")


def test_environment_variables_set_defaults(tmp_path, slide_tree, monkeypatch):
    monkeypatch.setenv("SMEARSCAN_MODEL", str(TINY_3CLASS))
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)])
    assert "p_aml" in out.read_text().splitlines()[0]


def test_examples_folder_scans_with_calls(tmp_path):
    examples = ROOT / "examples" / "slides"
    out = tmp_path / "r.csv"
    run(["scan", str(examples), "--out", str(out)])
    assert len(rows(out)) == len(image_files(examples)) == 24
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["slides"]["slide_01"]["call"] == "all-suspect"
    assert summary["slides"]["slide_02"]["call"] == "not-flagged"
    assert summary["slides"]["slide_02"]["margin"] < 0 < summary["slides"]["slide_01"]["margin"]


def test_fixture_images_exist():
    assert len(fixture_images()) == 24
    assert os.access(default_model_path(), os.R_OK)


def test_padded_batches_give_the_same_probabilities(slide_tree):
    from smearscan.inference import load_classifier
    from smearscan.preprocess import load_and_preprocess

    classifier = load_classifier(device="cpu")
    batch = np.stack(
        [
            load_and_preprocess(p, classifier.info.recipe)
            for p in sorted(image_files(slide_tree))[:3]
        ]
    )
    plain = classifier.predict(batch)
    padded = classifier.predict(batch, pad_to=8)
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

    def listing(path):
        listed.append(path)
        return real_scandir(path)

    monkeypatch.setattr(discover_module.os, "scandir", listing)
    first = next(discover_module.discover([tmp_path]))
    assert first.rel == "slide_00/cell.webp"
    assert len(listed) <= 2  # the root and the first slide, not all 31 folders


def test_a_folder_named_like_an_image_is_reported_not_crashed_on(tmp_path, slide_tree):
    (slide_tree / "patient_A" / "scan.png").mkdir()
    (slide_tree / "patient_A" / "scan.png" / "inner.bmp").write_bytes(b"")
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)], expect=ExitStatus.SOME_UNUSABLE)
    table = rows(out)
    assert len(table) == 9
    assert next(r for r in table if r["path"].endswith("inner.bmp"))["reason"].startswith("empty")


def test_log_file_gets_the_run_log_privately(tmp_path, slide_tree):
    log_file = tmp_path / "logs" / "deeper" / "scan.log"  # a folder that does not exist yet
    run(["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "--log-file", str(log_file)])
    text = log_file.read_text()
    assert "execution provider CPUExecutionProvider" in text
    assert text.strip().splitlines()[-1].endswith("exit 0 (success)")
    assert log_file.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("workers", "batch_size", "decode"),
    [(1, 32, "threads"), (2, 3, "threads"), (3, 1, "threads"), (2, 3, "processes")],
)
def test_parallel_batches_keep_order_and_match_one_big_batch(
    slide_tree, workers, batch_size, decode
):
    """Workers run whole batches concurrently on one session (or prepare them in worker
    processes); results must come back in discovery order, each with the probabilities of
    its own image."""
    from smearscan.discover import discover
    from smearscan.engines.local import LocalEngine
    from smearscan.inference import BatchPredictor, load_classifier
    from smearscan.preprocess import load_and_preprocess
    from smearscan.stages import StageConfig

    (slide_tree / "patient_A" / "broken.png").write_bytes(b"not an image")
    classifier = load_classifier(device="cpu")
    found = list(discover([slide_tree]))
    predictor = BatchPredictor(classifier=classifier)
    config = StageConfig(classifier.info.recipe)
    engine = LocalEngine(config, predictor, batch_size, workers, decode)
    results = list(engine.run(found))
    assert [r.path for r in results] == [f.rel for f in found]
    good = [f for f in found if not f.rel.endswith("broken.png")]
    reference = classifier.predict(
        np.stack([load_and_preprocess(f.path, classifier.info.recipe) for f in good])
    )
    by_path = {r.path: r for r in results}
    assert by_path["patient_A/broken.png"].status == "error"
    for item, expected in zip(good, reference, strict=True):
        assert np.allclose(by_path[item.rel].probabilities, expected, atol=1e-5)


def test_thread_options_do_not_change_results(slide_tree, tmp_path):
    default, tuned = tmp_path / "default.csv", tmp_path / "tuned.csv"
    run(["scan", str(slide_tree), "--out", str(default), "--no-html"])
    run(
        [
            "scan",
            str(slide_tree),
            "--out",
            str(tuned),
            "--no-html",
            "--workers",
            "3",
            "--threads",
            "2",
            "--batch-size",
            "3",
        ]
    )
    for a, b in zip(rows(default), rows(tuned), strict=True):
        assert a["path"] == b["path"] and a["label"] == b["label"]
        assert abs(float(a["p_all"]) - float(b["p_all"])) < 1e-5


def test_worker_processes_write_the_same_reports_and_profile_the_stages(tmp_path, slide_tree):
    """--decode processes (the CUDA default) must change nothing in the reports; --profile
    prints where the time went and the summary keeps it for every run."""
    (slide_tree / "patient_A" / "broken.png").write_bytes(b"not an image")
    threads, processes = tmp_path / "threads.csv", tmp_path / "processes.csv"
    run(
        ["scan", str(slide_tree), "--out", str(threads), "--no-html", "--decode", "threads"],
        expect=3,
    )
    result = run(
        [
            "scan",
            str(slide_tree),
            "--out",
            str(processes),
            "--no-html",
            "--decode",
            "processes",
            "--workers",
            "2",
            "--profile",
        ],
        expect=3,
    )
    assert processes.read_bytes() == threads.read_bytes()
    summary = json.loads(processes.with_name("processes.summary.json").read_text())
    assert summary["engine"]["decode"] == "processes"
    profile = summary["profile"]
    files = len(rows(processes))
    assert profile["files"] == files and profile["classified"] == files - 1
    assert set(profile["stages"]) == {"decode", "qc", "preprocess", "infer"}
    assert all(stage["seconds"] > 0 for stage in profile["stages"].values())
    table = result.log[result.log.index("profile:") :]
    assert f"profile: {files} files" in table and "infer" in table and "decode" in table


def test_python_api_as_the_readme_shows(tmp_path):
    from smearscan import ScanRequest, load_classifier, run_scan

    classifier = load_classifier()
    outcome = run_scan(
        ScanRequest(inputs=[ROOT / "examples" / "slides"], out=tmp_path / "r.csv"), classifier
    )
    assert outcome.files == 24 and outcome.status == ExitStatus.SUCCESS


def test_labels_follow_the_models_own_operating_point(tmp_path, slide_tree):
    from smearscan.inference import load_classifier

    decision = load_classifier(device="cpu").info.json_field("smearscan.decision")
    threshold = decision["cell"]["threshold"]
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)])
    for row in rows(out):
        assert row["label"] == ("all" if float(row["p_all"]) >= threshold else "hem")
        assert row["decided_by"] == f"P(all) >= {threshold:g}"
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["decision"]["threshold"] == threshold
    assert summary["decision"]["slide_rule"] == decision["slide"]["rule"]


def test_the_default_batch_follows_the_provider_in_use():
    """Small batches on CPU (faster there, and a third of the memory with the four-network
    model); an explicit size wins."""
    from smearscan.inference import load_classifier
    from smearscan.limits import CPU_BATCH_SIZE
    from smearscan.runner import ScanOptions, batch_size_for, decode_for

    classifier = load_classifier(None, device="cpu")
    assert batch_size_for(ScanOptions(), classifier) == CPU_BATCH_SIZE == 8
    assert batch_size_for(ScanOptions(batch_size=3), classifier) == 3
    assert decode_for(ScanOptions(), classifier) == "threads"  # processes only on CUDA
    assert decode_for(ScanOptions(decode="processes"), classifier) == "processes"


def test_hidden_files_and_folders_are_skipped_counted_and_can_be_included(tmp_path, slide_tree):
    """Issue 21: macOS AppleDouble copies, thumbnail and NAS system folders are not cells."""
    crop = sorted(image_files(slide_tree))[0]
    hidden = [
        crop.parent / f"._{crop.name}",
        slide_tree / ".thumbs" / crop.name,
        slide_tree / "patient_A" / "@eaDir" / crop.name,
        slide_tree / "__MACOSX" / "patient_A" / crop.name,
    ]
    for path in hidden:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(crop, path)
    (slide_tree / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)])
    assert len(rows(out)) == 8
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["skipped"] == {
        "hidden_files": 1,
        "hidden_folders": 3,
        "other_files": 0,
        "other_types": {},
        "unread_images": {},
        "include_hidden": False,
    }
    run(["scan", str(slide_tree), "--out", str(out), "--include-hidden"])
    assert len(rows(out)) == 12
    assert {str(p.relative_to(slide_tree)) for p in hidden} <= {r["path"] for r in rows(out)}


@pytest.mark.usefixtures("plumbing_model")
def test_crops_of_a_type_smearscan_does_not_read_are_counted_and_named(tmp_path, slide_tree):
    """A crop saved as GIF or JPEG 2000 gets no row: the summary counts every file left out
    by extension, and the log names the image types, so none vanishes without a trace."""
    from PIL import Image

    crop = sorted(image_files(slide_tree))[0]
    slide = slide_tree / "patient_A"
    with Image.open(crop) as image:
        image.convert("RGB").save(slide / "cell.gif")
        image.convert("RGB").save(slide_tree / "patient_B" / "cell.GIF")
    (slide / "scanner.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (slide / "notes.txt").write_text("slide notes\n")
    (slide / "README").write_text("no extension\n")
    out = tmp_path / "r.csv"
    result = run(["scan", str(slide_tree), "--out", str(out)])
    assert len(rows(out)) == 8 and not any(r["path"].lower().endswith(".gif") for r in rows(out))
    skipped = json.loads(out.with_name("r.summary.json").read_text())["skipped"]
    assert skipped["other_files"] == 5
    assert skipped["other_types"] == {".gif": 2, ".dcm": 1, ".txt": 1, "(none)": 1}
    assert skipped["unread_images"] == {".dcm": 1, ".gif": 2}
    assert "3 files of image types smearscan does not read were left out (1 .dcm, 2 .gif)" in (
        result.log
    )
    # a --glob narrows what is counted too: files it excludes were not asked for
    run(["scan", str(slide_tree), "--out", str(out), "--glob", "*.png"])
    skipped = json.loads(out.with_name("r.summary.json").read_text())["skipped"]
    assert skipped["other_files"] == 0
    # parts of a sharded run each walk the whole share; their merge keeps the count
    parts = [tmp_path / f"p{part}.csv" for part in range(2)]
    for part, path in enumerate(parts):
        run(
            [
                "scan",
                str(slide_tree),
                "--out",
                str(path),
                "--num-parts",
                "2",
                "--part-id",
                str(part),
            ]
        )
    merged = tmp_path / "m.csv"
    run(["merge", *map(str, parts), "--out", str(merged)])
    skipped = json.loads(merged.with_name("m.summary.json").read_text())["skipped"]
    assert skipped["unread_images"] == {".dcm": 1, ".gif": 2}


def test_max_qc_rate_lets_a_normal_night_exit_0(tmp_path, slide_tree):
    """Issue 21: a few refused crops need not fail cron every night; more than the limit, or
    any unreadable file, still exits 3."""
    cv2.imwrite(str(slide_tree / "patient_A" / "black.png"), np.zeros((450, 450, 3), np.uint8))
    out = tmp_path / "r.csv"
    args = ["scan", str(slide_tree), "--out", str(out)]
    run(args, expect=ExitStatus.SOME_UNUSABLE)  # 1 of 9 failed QC, no limit given
    run([*args, "--max-qc-rate", "0.2"], expect=ExitStatus.SUCCESS)
    tolerance = json.loads(out.with_name("r.summary.json").read_text())["qc_tolerance"]
    assert tolerance == {"max_qc_rate": 0.2, "qc_rate": round(1 / 9, 6), "within": True}
    run([*args, "--max-qc-rate", "0.05"], expect=ExitStatus.SOME_UNUSABLE)
    (slide_tree / "patient_A" / "broken.png").write_bytes(b"not an image")
    run([*args, "--max-qc-rate", "0.2"], expect=ExitStatus.SOME_UNUSABLE)
    run([*args, "--max-qc-rate", "1.5"], expect=ExitStatus.USAGE)


def test_an_unknown_report_extension_is_refused_and_env_vars_are_in_help(tmp_path, slide_tree):
    """Issue 21: --out r.xlsx silently wrote CSV; the environment variables were nowhere in
    --help."""
    result = run(["scan", str(slide_tree), "--out", str(tmp_path / "r.xlsx")], expect=2)
    assert "unknown report type '.xlsx'" in result.log + result.output
    assert not (tmp_path / "r.xlsx").exists()
    run(["scan", str(slide_tree), "--out", str(tmp_path / "r.xlsx"), "--format", "csv"])
    helped = run(["scan", "--help"]).output
    assert "SMEARSCAN_WORKERS" in helped and "SMEARSCAN_MAX_QC_RATE" in helped


def test_verbose_shows_debug_messages(tmp_path, slide_tree):
    plain = run(["scan", str(slide_tree), "--out", str(tmp_path / "a.csv")])
    verbose = run(["-v", "scan", str(slide_tree), "--out", str(tmp_path / "b.csv")])
    assert " DEBUG " not in plain.log
    assert " DEBUG local engine: batch 8, CPU stage in threads" in verbose.log


def test_environment_settings_are_named_after_their_options_shown_and_documented():
    """A cron job's settings: each is SMEARSCAN_ and its option's name (one rule,
    ``setting_option``), ``--help`` shows it, and the docs name exactly these."""
    import re

    import click
    from conftest import ROOT

    from smearscan.cli import cli

    settings: set[str] = set()
    for name, command in cli.commands.items():
        for param in command.params:
            if not isinstance(param, click.Option) or not param.envvar:
                continue
            option = max(param.opts, key=len)
            assert param.envvar == "SMEARSCAN_" + option[2:].replace("-", "_").upper()
            assert param.show_envvar, param.envvar
            assert param.envvar in run([name, "--help"]).output
            settings.add(str(param.envvar))
    assert {"SMEARSCAN_WORKERS", "SMEARSCAN_MAX_QC_RATE", "SMEARSCAN_MODEL"} <= settings
    documented = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        documented |= set(re.findall(r"SMEARSCAN_[A-Z_]+[A-Z]", doc.read_text()))
    assert documented == settings
