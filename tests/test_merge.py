"""Sharding for schedulers: --num-parts/--part-id split the files stably, and merge gives the
report one run would have written."""

from __future__ import annotations

import json

import pytest
from conftest import rows, run

from smearscan.exitstatus import ExitStatus
from smearscan.runner import in_part


def test_parts_partition_the_files_and_merge_back(tmp_path, messy_tree):
    whole = tmp_path / "whole.csv"
    run(["scan", str(messy_tree), "--out", str(whole)], expect=ExitStatus.SOME_UNUSABLE)
    parts = []
    for part in range(3):
        out = tmp_path / f"part{part}.csv"
        allowed = (0, ExitStatus.SOME_UNUSABLE, ExitStatus.NOTHING_TO_SCAN)
        run(["scan", str(messy_tree), "--out", str(out), "--num-parts", "3", "--part-id",
             str(part)], expect=allowed)  # fmt: skip
        if out.exists():
            parts.append(out)
    seen = [r["path"] for p in parts for r in rows(p)]
    assert len(seen) == len(set(seen)) == len(rows(whole))  # disjoint and complete
    merged = tmp_path / "merged.csv"
    result = run(["merge", *map(str, parts), "--out", str(merged)],
                 expect=ExitStatus.SOME_UNUSABLE)  # fmt: skip
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
    result = run(["merge", str(a), str(b), "--out", str(tmp_path / "m.csv")],
                 expect=ExitStatus.USAGE)  # fmt: skip
    assert "another model" in result.log
    result = run(["merge", str(a), str(a), "--out", str(tmp_path / "m.csv")],
                 expect=ExitStatus.USAGE)  # fmt: skip
    assert "overlap" in result.log


@pytest.mark.parametrize("bad", [["--part-id", "3", "--num-parts", "3"]])
def test_part_options_are_checked(tmp_path, slide_tree, bad):
    run(["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), *bad],
        expect=ExitStatus.USAGE)  # fmt: skip
