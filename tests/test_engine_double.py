"""The runner, the state and the sinks driven by an engine test double (issue 23.8): the
plumbing is tested without decoding a crop or running a model, while the reports, the
state and the exit rule are the real ones. Real end-to-end scans stay in the other tests."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from conftest import rows

from smearscan.discover import Found
from smearscan.exitstatus import ExitStatus
from smearscan.inference import load_classifier
from smearscan.results import STATUS_ERROR, STATUS_OK, CellResult
from smearscan.runner import ScanRequest, run_scan


class ScriptedEngine:
    """An engine (the :class:`~smearscan.engines.Engine` protocol) that answers each file
    from a script: no decoding, no model; it records what it was asked to run."""

    name = "scripted"
    batch_size = 4
    stage_times = None

    def __init__(self, answer: Callable[[Found], CellResult]) -> None:
        self.answer = answer
        self.unfinished_slides: set[str] = set()
        self.asked: list[str] = []

    def run(
        self, items: Iterable[Found], stop: threading.Event | None = None
    ) -> Iterator[CellResult]:
        for item in items:
            self.asked.append(item.rel)
            yield self.answer(item)

    def describe(self) -> dict:
        return {"engine": self.name}


def _share(root: Path) -> Path:
    for slide, count in (("patient_A", 12), ("patient_B", 12)):
        (root / slide).mkdir(parents=True)
        for i in range(count):
            (root / slide / f"cell_{i:02d}.png").write_bytes(b"not decoded by the double")
    return root


def _answer(item: Found) -> CellResult:
    """Slide A's cells look like blasts, slide B's like normal cells; one of B is unreadable.
    Like a real engine, a result carries the size and mtime of the file it read (the state
    reuses a result only while they are unchanged)."""
    st = os.stat(item.path)
    if item.rel.endswith("cell_11.png") and "patient_B" in item.rel:
        status, reason, probabilities = STATUS_ERROR, "unreadable", []
    else:
        p_all = 0.9 if "patient_A" in item.rel else 0.1
        status, reason, probabilities = STATUS_OK, "", [p_all, 1 - p_all]
    return CellResult(
        item.rel, item.slide, status, reason, probabilities, st.st_size, st.st_mtime_ns, item.path
    )


def test_reports_calls_and_exit_code_come_from_the_engines_results(tmp_path):
    classifier = load_classifier(device="cpu")
    out = tmp_path / "r.csv"
    engine = ScriptedEngine(_answer)
    request = ScanRequest(inputs=[_share(tmp_path / "share")], out=out)
    outcome = run_scan(request, classifier, engine=engine)
    table = rows(out)
    assert len(table) == len(engine.asked) == 24
    assert outcome.status == ExitStatus.SOME_UNUSABLE  # one error row
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["slides"]["patient_A"]["call"] == "all-suspect"
    assert summary["slides"]["patient_B"]["call"] == "not-flagged"
    assert {r["label"] for r in table if r["status"] == "ok"} == {"all", "hem"}
    assert summary["engine"] == {"engine": "scripted"}


def test_a_state_run_sends_only_new_files_to_the_engine(tmp_path):
    classifier = load_classifier(device="cpu")
    share = _share(tmp_path / "share")
    request = ScanRequest(
        inputs=[share], out=tmp_path / "r.csv", state=tmp_path / "s.db", min_age=0
    )
    first = ScriptedEngine(_answer)
    run_scan(request, classifier, engine=first)
    (share / "patient_C").mkdir()
    (share / "patient_C" / "new.png").write_bytes(b"new")
    second = ScriptedEngine(_answer)
    outcome = run_scan(request, classifier, engine=second)
    # the error row is retried every run; the 23 read files are reused
    assert sorted(second.asked) == ["patient_B/cell_11.png", "patient_C/new.png"]
    assert outcome.reused == 23
    assert len(rows(tmp_path / "r.csv")) == 25
