"""Sharding for schedulers: --num-parts/--part-id split the files stably, and merge gives the
report one run would have written."""

from __future__ import annotations

import json
import os

import pytest
from conftest import rows, run

from smearscan.exitstatus import ExitStatus
from smearscan.runner import in_part

# files, state, signals and reports, not predictions: the tiny two-class model
pytestmark = pytest.mark.usefixtures("plumbing_model")


def test_parts_partition_the_files_and_merge_back(tmp_path, messy_tree):
    whole = tmp_path / "whole.csv"
    run(["scan", str(messy_tree), "--out", str(whole)], expect=ExitStatus.SOME_UNUSABLE)
    parts = []
    for part in range(3):
        out = tmp_path / f"part{part}.csv"
        allowed = (0, ExitStatus.SOME_UNUSABLE)
        run(
            [
                "scan",
                str(messy_tree),
                "--out",
                str(out),
                "--num-parts",
                "3",
                "--part-id",
                str(part),
            ],
            expect=allowed,
        )
        parts.append(out)  # every part writes its report, an empty one too
    seen = [r["path"] for p in parts for r in rows(p)]
    assert len(seen) == len(set(seen)) == len(rows(whole))  # disjoint and complete
    merged = tmp_path / "merged.csv"
    result = run(["merge", *map(str, parts), "--out", str(merged)], expect=ExitStatus.SOME_UNUSABLE)
    by_path = lambda table: sorted(table, key=lambda r: r["path"])  # noqa: E731
    assert by_path(rows(merged)) == by_path(rows(whole))
    a = json.loads(merged.with_name("merged.summary.json").read_text())
    b = json.loads(whole.with_name("whole.summary.json").read_text())
    assert a["slides"] == b["slides"] and a["overall"] == b["overall"]
    assert a["merged_from"] == [str(p) for p in parts]
    assert merged.with_name("merged.html").exists()
    assert result.log.strip().splitlines()[-1].startswith("smearscan merged:")


def test_the_split_is_stable_and_balanced():
    paths = [f"slide_{i // 50}/cell_{i}.png" for i in range(3000)]
    counts = [sum(in_part(p, 4, k) for p in paths) for k in range(4)]
    assert sum(counts) == 3000 and min(counts) > 600
    assert [in_part(p, 4, 1) for p in paths] == [in_part(p, 4, 1) for p in paths]


def test_merge_refuses_parts_of_other_models_or_overlapping_parts(tmp_path, slide_tree):
    from conftest import TINY_3CLASS

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    run(["scan", str(slide_tree), "--out", str(a)])
    run(["scan", str(slide_tree), "--out", str(b), "--model", str(TINY_3CLASS)])
    result = run(
        ["merge", str(a), str(b), "--out", str(tmp_path / "m.csv")], expect=ExitStatus.USAGE
    )
    assert "another model" in result.log
    result = run(
        ["merge", str(a), str(a), "--out", str(tmp_path / "m.csv")], expect=ExitStatus.USAGE
    )
    assert "overlap" in result.log


@pytest.mark.parametrize("bad", [["--part-id", "3", "--num-parts", "3"]])
def test_part_options_are_checked(tmp_path, slide_tree, bad):
    run(["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), *bad], expect=ExitStatus.USAGE)


def _parts(tmp_path, tree, count=3, extra=()):
    parts = []
    for part in range(count):
        out = tmp_path / f"part{part}.csv"
        run(
            [
                "scan",
                str(tree),
                "--out",
                str(out),
                "--num-parts",
                str(count),
                "--part-id",
                str(part),
                "--no-html",
                *extra,
            ],
            expect=None,
        )
        parts.append(out)
    return parts


def _merge(tmp_path, *parts, out="m.csv"):
    return run(["merge", *map(str, parts), "--out", str(tmp_path / out)], expect=None)


def test_merge_refuses_a_missing_part_a_cut_part_and_bad_values(tmp_path, slide_tree):
    """Issue 22: merge wrote 1,331 rows and exit 0 from parts 0 and 2 of 3, merged a part
    cut short, and wrote p_all values like 'abc' or 5 as they were."""
    parts = _parts(tmp_path, slide_tree)
    result = _merge(tmp_path, parts[0], parts[2])
    assert result.exit_code == ExitStatus.USAGE and "part(s) [1] of 3 missing" in result.log
    assert not (tmp_path / "m.csv").exists()
    assert _merge(tmp_path, parts[0], parts[1], parts[1]).exit_code == ExitStatus.USAGE
    full = max(parts, key=lambda p: len(rows(p)))
    original = full.read_text()
    lines = original.splitlines(keepends=True)
    full.write_text("".join(lines[:-1]))  # the last row lost
    result = _merge(tmp_path, *parts)
    assert result.exit_code == ExitStatus.USAGE and "cut short or edited" in result.log
    header = lines[0].split(",")
    column = header.index("p_all")
    for bad, says in (
        ("abc", "not a number"),
        ("nan", "not a probability"),
        ("5", "not a probability"),
        ("-4", "not a probability"),
    ):
        cells = lines[1].split(",")
        cells[column] = bad
        full.write_text("".join([lines[0], ",".join(cells), *lines[2:]]))
        result = _merge(tmp_path, *parts)
        assert result.exit_code == ExitStatus.USAGE and says in result.log, result.log
    full.write_text(original)
    summary_path = full.with_name(full.stem + ".summary.json")
    summary = json.loads(summary_path.read_text())
    del summary["decision"]
    summary_path.write_text(json.dumps(summary))
    result = _merge(tmp_path, *parts)
    assert result.exit_code == ExitStatus.USAGE and "no 'decision'" in result.log


def test_merge_refuses_mixed_settings_and_an_out_that_overwrites_an_input(tmp_path, slide_tree):
    parts = _parts(tmp_path, slide_tree, count=2)
    result = _merge(tmp_path, parts[0], parts[1], out="part0.csv")
    assert result.exit_code == ExitStatus.USAGE and "would overwrite" in result.log
    result = _merge(tmp_path, *parts, out="m.html")
    assert result.exit_code == ExitStatus.USAGE
    tta = tmp_path / "tta"
    tta.mkdir()
    other = _parts(tta, slide_tree, count=2, extra=("--tta",))
    result = _merge(tmp_path, parts[0], other[1])
    assert result.exit_code == ExitStatus.USAGE and "test-time views" in result.log
    assert _merge(tmp_path, *parts).exit_code in (0, ExitStatus.SOME_UNUSABLE)
    summary = json.loads((tmp_path / "m.summary.json").read_text())
    assert [p["files"] for p in summary["parts"]] == [len(rows(p)) for p in parts]


def test_an_incomplete_slide_of_a_partial_part_stays_incomplete(tmp_path, slide_tree):
    parts = _parts(tmp_path, slide_tree, count=2)
    summary_path = parts[0].with_name("part0.summary.json")
    summary = json.loads(summary_path.read_text())
    slide = next(iter(summary["slides"]))
    summary["partial"] = True  # as a part stopped by a signal writes it
    summary["slides"][slide]["call"] = "incomplete"
    summary_path.write_text(json.dumps(summary))
    _merge(tmp_path, *parts)
    merged = json.loads((tmp_path / "m.summary.json").read_text())
    assert merged["partial"] is True and merged["slides"][slide]["call"] == "incomplete"


def test_merge_removes_a_killed_merges_temporaries(tmp_path, slide_tree):
    """Issue 22: merge has scan's temp cleanup: a merge killed with SIGKILL leaves a
    temporary report; the next one removes it (only those whose writer is gone)."""
    from smearscan.files import _HOST

    parts = _parts(tmp_path, slide_tree, count=2)
    dead = tmp_path / f".m.csv.{_HOST}.999999.0badc0de.tmp"  # a pid that does not run
    dead.write_text("half a report")
    alive = tmp_path / f".m.csv.{_HOST}.{os.getpid()}.0badc0de.tmp"  # this process: running
    alive.write_text("being written")
    assert _merge(tmp_path, *parts).exit_code in (0, ExitStatus.SOME_UNUSABLE)
    assert not dead.exists() and alive.exists()
