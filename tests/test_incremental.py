"""Cron safety: incremental state, locking, kill -9 and SIGTERM, with real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    TINY_3CLASS,
    fixture_images,
    image_files,
    make_share,
    rows,
    run,
    start_smearscan,
)

from smearscan.exitstatus import ExitStatus
from smearscan.state import RunLock, StateStore

# files, state, signals and reports, not predictions: the tiny two-class model
pytestmark = pytest.mark.usefixtures("plumbing_model")


def scan_state(tree: Path, tmp_path: Path, *extra: str):
    out = tmp_path / "reports" / "r.csv"
    result = run(
        [
            "scan",
            str(tree),
            "--out",
            str(out),
            "--state",
            str(tmp_path / "state.db"),
            "--min-age",
            "0",
            *extra,
        ],
        expect=None,
    )
    summary = json.loads(out.with_name("r.summary.json").read_text())
    return result, rows(out), summary


def test_rerun_reuses_unchanged_files_and_rescans_changed_ones(tmp_path, slide_tree):
    result, first, summary = scan_state(slide_tree, tmp_path)
    assert result.exit_code == 0 and len(first) == 8
    assert summary["incremental"]["reused_from_earlier_runs"] == 0

    result, second, summary = scan_state(slide_tree, tmp_path)
    assert summary["incremental"]["reused_from_earlier_runs"] == 8
    assert second == first  # merged report identical, nothing decoded

    changed = sorted(image_files(slide_tree / "patient_A"))[0]
    other = sorted(image_files(slide_tree / "patient_B"))[0]
    shutil.copy(other, changed)  # new content (and size/mtime) under the old name
    deleted = sorted(image_files(slide_tree / "patient_B"))[-1]
    deleted.unlink()
    result, third, summary = scan_state(slide_tree, tmp_path)
    assert summary["incremental"]["reused_from_earlier_runs"] == 6
    assert len(third) == 7  # the deleted file dropped out
    rel = str(changed.relative_to(slide_tree))
    before = next(r for r in first if r["path"] == rel)
    after = next(r for r in third if r["path"] == rel)
    assert after["p_all"] != before["p_all"]
    assert [r["path"] for r in third] == sorted(r["path"] for r in third)


def test_merged_report_keeps_every_file_when_new_and_reused_files_interleave(tmp_path):
    """Many slides, every other one new on the rerun: results are committed batch by batch
    while discovery is still marking unchanged files as seen; none may be lost."""
    sources = fixture_images()
    tree = tmp_path / "slides"
    for i in range(24):
        folder = tree / f"slide_{i:02d}"
        folder.mkdir(parents=True)
        for j in range(3):
            shutil.copy(sources[(i + j) % len(sources)], folder / f"cell_{j}.webp")
    hidden = tmp_path / "later"
    hidden.mkdir()
    for i in range(1, 24, 2):  # the odd slides arrive after the first run
        shutil.move(str(tree / f"slide_{i:02d}"), str(hidden / f"slide_{i:02d}"))
    result, first, _ = scan_state(tree, tmp_path, "--batch-size", "2", "--workers", "1")
    assert result.exit_code == 0 and len(first) == 36
    for folder in sorted(hidden.iterdir()):
        shutil.move(str(folder), str(tree / folder.name))
    result, second, summary = scan_state(tree, tmp_path, "--batch-size", "2", "--workers", "1")
    assert summary["incremental"]["reused_from_earlier_runs"] == 36
    assert len(second) == 72 and summary["overall"]["files"] == 72
    assert [r["path"] for r in second] == sorted(r["path"] for r in second)
    assert {r["path"]: r for r in second if r["path"] in {f["path"] for f in first}} == {
        r["path"]: r for r in first
    }


def test_new_only_reports_just_this_runs_files(tmp_path, slide_tree):
    scan_state(slide_tree, tmp_path)
    extra = slide_tree / "patient_C"
    extra.mkdir()
    shutil.copy(fixture_images()[5], extra / "new.webp")
    result, table, summary = scan_state(slide_tree, tmp_path, "--new-only")
    assert [r["path"] for r in table] == ["patient_C/new.webp"]


def test_a_different_model_rescans_everything(tmp_path, slide_tree):
    scan_state(slide_tree, tmp_path)
    result, table, summary = scan_state(slide_tree, tmp_path, "--model", str(TINY_3CLASS))
    assert summary["incremental"]["reused_from_earlier_runs"] == 0
    assert "p_aml" in table[0] and len(table) == 8


def test_young_files_wait_for_the_next_run_with_a_pending_row(tmp_path, slide_tree):
    out = tmp_path / "r.csv"
    state = tmp_path / "state.db"
    out.write_text("last night's report\n")
    args = ["scan", str(slide_tree), "--out", str(out), "--state", str(state)]
    young = sorted(image_files(slide_tree))[:3]
    old = time.time() - 7200
    for path in image_files(slide_tree):
        if path not in young:
            os.utime(path, (old, old))
    result = run([*args, "--min-age", "3600"], expect=ExitStatus.PENDING)
    assert "3 pending" in result.log and len(rows(out)) == 8
    for path in young:  # still being written: size and mtime change between runs
        with open(path, "ab") as handle:
            handle.write(b"\0")
    result = run([*args, "--min-age", "3600"], expect=ExitStatus.PENDING)
    assert "3 pending" in result.log and len(rows(out)) == 8
    # unchanged since the last run saw them: done being written, scanned now
    result = run([*args, "--min-age", "3600"], expect=(0, ExitStatus.SOME_UNUSABLE))
    assert "0 pending" in result.log and len(rows(out)) == 8


def test_a_future_mtime_delays_a_file_one_run_not_forever(tmp_path, slide_tree):
    """Clock skew on a share: a file stamped a day ahead looks 'being written' forever by age
    alone; unchanged across two runs, it is scanned."""
    old, future = time.time() - 3600, time.time() + 86400
    for path in image_files(slide_tree):
        os.utime(path, (old, old))
    skewed = sorted(image_files(slide_tree))[0]
    os.utime(skewed, (future, future))
    out, state = tmp_path / "r.csv", tmp_path / "state.db"
    args = ["scan", str(slide_tree), "--out", str(out), "--state", str(state), "--min-age", "10"]
    assert "1 pending" in run(args, expect=ExitStatus.PENDING).log
    assert "in the future" in [r for r in rows(out) if r["status"] == "pending"][0]["reason"]
    result = run(args)
    assert "0 pending" in result.log and len(rows(out)) == 8


def test_a_run_where_every_file_is_pending_reports_each_of_them(tmp_path, slide_tree):
    out, state = tmp_path / "r.csv", tmp_path / "state.db"
    out.write_text("last night's report\n")
    result = run(
        ["scan", str(slide_tree), "--out", str(out), "--state", str(state), "--min-age", "3600"],
        expect=ExitStatus.PENDING,
    )
    assert "8 pending" in result.log
    table = rows(out)
    assert len(table) == 8 and {r["status"] for r in table} == {"pending"}
    assert all(r["label"] == "" and r["p_all"] == "" for r in table)


def test_a_share_still_being_written_never_loses_a_file(tmp_path):
    """Issue 21: donors copied just before the run, and a scanned file touched again. Every
    file present has exactly one row in every run; files not read are 'pending' (a touched
    file shows its previous result, marked as previous); their slides get no call; the exit
    status says the report is not complete until a run reads them."""
    root = make_share(tmp_path, 2, age_seconds=7200)
    out, state = tmp_path / "r.csv", tmp_path / "state.db"
    args = ["scan", str(root), "--out", str(out), "--state", str(state), "--min-age", "600"]
    run(args, expect=(0, ExitStatus.SOME_UNUSABLE))
    first = {r["path"]: r for r in rows(out)}
    touched_row = next(r for path, r in sorted(first.items()) if r["status"] == "ok")
    touched = root / touched_row["path"]
    # a new donor arrives (files written just now), and one scanned file is touched again
    arriving = root / "patient_new"
    arriving.mkdir()
    for index, source in enumerate(fixture_images()[:5]):
        shutil.copy(source, arriving / f"cell_{index}{source.suffix}")
    os.utime(touched, None)
    result = run(args, expect=ExitStatus.PENDING)
    table = rows(out)
    paths = [r["path"] for r in table]
    assert sorted(paths) == sorted(str(p.relative_to(root)) for p in image_files(root))
    assert len(paths) == len(set(paths))  # exactly one row each
    by_path = {r["path"]: r for r in table}
    for index, source in enumerate(fixture_images()[:5]):
        row = by_path[f"patient_new/cell_{index}{source.suffix}"]
        assert row["status"] == "pending" and row["label"] == "" and row["p_all"] == ""
        assert "less than --min-age 600 s" in row["reason"]
    touched_now = by_path[touched_row["path"]]
    assert touched_now["status"] == "pending" and touched_now["label"] == ""
    assert "previous result, for an earlier version of the file" in touched_now["reason"]
    assert f"p_all {float(touched_row['p_all']):.4f}" in touched_now["reason"]
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["overall"]["pending"] == 6 and summary["overall"]["files"] == len(table)
    assert summary["slides"]["patient_new"]["call"] == "incomplete"
    assert summary["slides"][touched_row["slide"]]["call"] == "incomplete"
    assert "6 pending" in result.log and "exit 6" in result.log.strip().splitlines()[-1]
    html = out.with_name("r.html").read_text()
    assert 'id="pending"' in html and "6 pending" in html
    # the files settle: the next run reads them and the report is complete again
    settled = time.time() - 3600
    for path in image_files(root):
        if "patient_new" in str(path) or path == touched:
            os.utime(path, (settled, settled))
    run(args, expect=(0, ExitStatus.SOME_UNUSABLE))
    final = rows(out)
    assert len(final) == len(table) and "pending" not in {r["status"] for r in final}
    assert (
        next(r for r in final if r["path"] == touched_row["path"])["p_all"] == touched_row["p_all"]
    )


def test_errors_are_retried_every_run(tmp_path, messy_tree):
    result, first, _ = scan_state(messy_tree, tmp_path)
    assert result.exit_code == ExitStatus.SOME_UNUSABLE
    empty = messy_tree / "patient_A" / "empty.png"
    shutil.copy(fixture_images()[0], empty)
    result, second, summary = scan_state(messy_tree, tmp_path)
    row = next(r for r in second if r["path"].endswith("empty.png"))
    assert row["status"] == "ok"


def test_second_run_is_refused_while_the_lock_is_held(tmp_path, slide_tree):
    state = tmp_path / "state.db"
    out = tmp_path / "r.csv"
    args = ["scan", str(slide_tree), "--out", str(out), "--state", str(state)]
    with RunLock(state.with_name("state.db.lock")):
        refused = run(args, expect=ExitStatus.LOCKED)
        assert "another smearscan run holds" in refused.log
        started = time.monotonic()
        run([*args, "--wait", "0.6"], expect=ExitStatus.LOCKED)
        assert time.monotonic() - started >= 0.6
    run([*args, "--min-age", "0"])


def test_lock_of_a_killed_process_does_not_block(tmp_path, slide_tree):
    state = tmp_path / "state.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from pathlib import Path; from smearscan.state import RunLock\n"
            f"l = RunLock(Path({str(state) + '.lock'!r})).__enter__(); print('held', flush=True);"
            " time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    args = ["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "--state", str(state)]
    run(args, expect=ExitStatus.LOCKED)
    holder.kill()
    holder.wait()
    run([*args, "--min-age", "0"])


def start_scan(root: Path, out: Path, state: Path, *options: str) -> subprocess.Popen:
    command = ["scan", str(root), "--out", str(out), "--state", str(state)]
    command += ["--batch-size", "8", "--workers", "1", "--no-html", *options]
    # a session of its own, so that leftover worker processes can be found by group
    return start_smearscan(*command, start_new_session=True)


def group_ends(group: int, within: float) -> bool:
    """Whether every process of the group has exited within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def wait_for_rows(state: Path, minimum: int, process: subprocess.Popen) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists():
            try:
                with sqlite3.connect(state, timeout=1) as db:
                    count = db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            except sqlite3.OperationalError:
                count = 0
            if count >= minimum:
                return count
        time.sleep(0.05)
    pytest.fail("the scan finished or stalled before it could be interrupted")


def test_kill_9_mid_run_then_rerun_reports_every_file_once(tmp_path):
    root = make_share(tmp_path, 25, age_seconds=3600)
    total = len(image_files(root))
    out, state = tmp_path / "r.csv", tmp_path / "state.db"
    out.write_text("yesterday's report\n")
    process = start_scan(root, out, state)
    wait_for_rows(state, 16, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert out.read_text() == "yesterday's report\n"  # atomic replace: old report intact
    with sqlite3.connect(state) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        committed = db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    assert 16 <= committed < total

    process = start_scan(root, out, state)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    table = rows(out)
    assert len(table) == total and len({r["path"] for r in table}) == total
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["incremental"]["reused_from_earlier_runs"] == committed
    assert not list(tmp_path.glob(".r.csv.*.tmp"))  # the killed run's temporary was cleaned


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_sigterm_finishes_the_batch_and_writes_a_partial_report(tmp_path, decode):
    """SIGTERM (cron's timeout, systemd) to the scan alone: the batches in flight finish,
    a partial report is written; with worker processes, none of them is left behind."""
    root = make_share(tmp_path, 25, age_seconds=3600)
    total = len(image_files(root))
    out, state = tmp_path / "r.csv", tmp_path / "state.db"
    process = start_scan(root, out, state, "--decode", decode)
    wait_for_rows(state, 8, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitStatus.INTERRUPTED_TERM, stderr
    assert group_ends(process.pid, within=15)  # no worker process outlives the scan
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["partial"] is True
    partial_rows = rows(out)
    assert 8 <= len(partial_rows) < total
    assert "exit 143" in stderr.strip().splitlines()[-1]
    process = start_scan(root, out, state)
    process.communicate(timeout=300)
    assert process.returncode == 0 and len(rows(out)) == total


def test_anonymized_reports_hide_names_stably(tmp_path, slide_tree):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    out = tmp_path / "r.csv"
    args = ["scan", str(slide_tree), "--out", str(out), "--anonymize-key-file", str(key)]
    run(args)
    first = rows(out)
    text = out.read_text() + out.with_name("r.summary.json").read_text()
    text += out.with_name("r.html").read_text()
    assert "patient_A" not in text and "UID_" not in text
    assert all(len(r["slide"]) == 16 for r in first)
    run(args)
    assert rows(out) == first


def test_anonymized_runs_keep_names_out_of_the_log(tmp_path, slide_tree):
    """Issue 21: discovery's log lines (an input inside another, a link not followed) named
    patient folders even with --anonymize-key-file."""
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    (slide_tree / "patient_A" / "outside.png").symlink_to(tmp_path / "key")
    log_file = tmp_path / "scan.log"
    inputs = [str(slide_tree), str(slide_tree / "patient_A")]
    args = ["scan", *inputs, "--out", str(tmp_path / "r.csv"), "--log-file", str(log_file)]
    plain = run(args, expect=None)
    assert "patient_A" in plain.log  # the plain run names it, so the check below can fail
    log_file.unlink()
    hidden = run([*args, "--anonymize-key-file", str(key)], expect=None)
    assert "inside another input folder" in hidden.log
    assert "patient_A" not in hidden.log and "outside.png" not in hidden.log
    assert "patient_A" not in log_file.read_text() and "name hidden" in log_file.read_text()


def test_overlapping_inputs_are_scanned_and_reported_once(tmp_path, slide_tree):
    out = tmp_path / "r.csv"
    state = tmp_path / "state.db"
    for extra in (["--state", str(state), "--min-age", "0"], []):
        run(
            [
                "scan",
                str(slide_tree),
                str(slide_tree / "patient_A"),
                "--out",
                str(out),
                "--no-html",
                *extra,
            ]
        )
        table = rows(out)
        assert len(table) == len(image_files(slide_tree)) == 8
        assert not any(r["path"].startswith("/") for r in table)


def test_a_new_threshold_relabels_reused_rows_without_rescanning(tmp_path, slide_tree):
    """Results are stored as probabilities; the label is the report's own rule."""
    _, first, _ = scan_state(slide_tree, tmp_path, "--threshold", "0.99")
    assert all(r["decided_by"] == "P(all) >= 0.99" for r in first)
    for threshold in ("0.01", "0.5"):
        result, table, summary = scan_state(slide_tree, tmp_path, "--threshold", threshold)
        assert summary["incremental"]["reused_from_earlier_runs"] == 8  # nothing decoded
        assert summary["decision"]["threshold"] == float(threshold)
        for row in table:
            expected = "all" if float(row["p_all"]) >= float(threshold) else "hem"
            assert row["label"] == expected and row["decided_by"] == f"P(all) >= {threshold}"
        assert [r["p_all"] for r in table] == [r["p_all"] for r in first]


@pytest.mark.parametrize(
    ("first", "second", "rescanned"),
    [
        ([], ["--tta"], True),
        (["--tta"], [], True),
        ([], ["--qc", "off"], True),
        ([], ["--qc", "strict"], True),
        ([], ["--model", str(TINY_3CLASS)], True),
        ([], ["--threshold", "0.2"], False),
        ([], ["--slide-threshold", "0.2", "--slide-rule", "fraction", "--min-cells", "2"], False),
        ([], ["--batch-size", "3", "--workers", "1"], False),
    ],
)
def test_what_changes_probabilities_rescans_and_nothing_else_does(
    tmp_path, slide_tree, first, second, rescanned
):
    scan_state(slide_tree, tmp_path, *first)
    _, table, summary = scan_state(slide_tree, tmp_path, *second)
    reused = summary["incremental"]["reused_from_earlier_runs"]
    assert reused == (0 if rescanned else 8)
    assert summary["tta"] == ("--tta" in second)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _, direct, _ = scan_state(slide_tree, fresh, *second)
    assert table == direct  # a rerun reports exactly what a fresh run would


def test_verify_content_catches_a_same_size_same_mtime_replacement(tmp_path, slide_tree):
    files = sorted(image_files(slide_tree / "patient_A"))
    target = files[0]
    scan_state(slide_tree, tmp_path, "--verify", "content")
    stat = target.stat()
    other = next(
        p for p in sorted(image_files(slide_tree / "patient_B")) if p.suffix == target.suffix
    )
    data = bytearray(target.read_bytes())
    donor = other.read_bytes()
    data[-200:] = donor[-200:] if len(donor) >= 200 else data[-200:]
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size
    _, _, summary = scan_state(slide_tree, tmp_path)  # default: size and mtime only
    assert summary["incremental"]["reused_from_earlier_runs"] == 8
    _, _, summary = scan_state(slide_tree, tmp_path, "--verify", "content")
    assert summary["incremental"]["reused_from_earlier_runs"] == 7


def test_a_corrupt_state_file_fails_clearly_and_keeps_the_report(tmp_path, slide_tree):
    state = tmp_path / "state.db"
    state.write_bytes(b"this is not a database" * 100)
    out = tmp_path / "r.csv"
    out.write_text("previous\n")
    result = run(
        ["scan", str(slide_tree), "--out", str(out), "--state", str(state)], expect=ExitStatus.ERROR
    )
    assert "cannot use state file" in result.log
    assert result.log.strip().splitlines()[-1].startswith("smearscan failed:")
    assert out.read_text() == "previous\n"


def test_state_lock_and_wal_files_are_private(tmp_path, slide_tree):
    state = tmp_path / "state.db"
    scan_state(slide_tree, tmp_path)
    companions = [p for p in tmp_path.iterdir() if p.name.startswith("state.db")]
    assert {p.name for p in companions} >= {"state.db", "state.db.lock"}
    for path in companions:
        assert path.stat().st_mode & 0o077 == 0, path.name
    with sqlite3.connect(state) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


#: a process holding a state and writing to it for argv[2] seconds
WRITER = """
import sys, time
from pathlib import Path
from smearscan.state import StateStore
store = StateStore(Path(sys.argv[1]), "fingerprint")
print("open", flush=True)
until = time.monotonic() + float(sys.argv[2])
while time.monotonic() < until:
    store.db.execute("INSERT INTO runs (started, fingerprint) VALUES (?, 'x')", (time.time(),))
store.close()
"""


def test_wal_files_are_private_while_the_state_is_open(tmp_path):
    """The -wal and -shm exist only while a run holds its state: new ones take the
    database's owner-only mode, and ones a killed older smearscan left readable are made
    private before SQLite reads them."""
    state = tmp_path / "state.db"
    killed = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(state), "600"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert killed.stdout is not None and killed.stdout.readline().strip() == "open"
    killed.kill()
    killed.wait()
    for suffix in ("-wal", "-shm"):
        left_behind = state.with_name("state.db" + suffix)
        assert left_behind.stat().st_size > 0
        os.chmod(left_behind, 0o644)
    umask = os.umask(0o022)
    try:
        store = StateStore(state, "fingerprint")
    finally:
        os.umask(umask)
    try:
        for suffix in ("-wal", "-shm"):
            companion = state.with_name("state.db" + suffix)
            assert companion.stat().st_mode & 0o077 == 0, companion.name
    finally:
        store.close()


def test_a_reader_of_the_state_does_not_crash_the_run_holding_it(tmp_path):
    """CI, 2026-12-08: a scan died of SIGBUS while a test polled its state. The run had
    closed a descriptor of its -shm after SQLite opened it, which drops the process's POSIX
    locks; each new reader then took itself for the first and reset the -shm the run had
    mapped. A lab's script watching the state must be harmless to the run."""
    state = tmp_path / "state.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(state), "3"], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
    readers, until = 0, time.monotonic() + 1.5
    while time.monotonic() < until and writer.poll() is None:
        reader = sqlite3.connect(state, timeout=5)
        reader.execute("SELECT COUNT(*) FROM runs").fetchone()
        reader.close()
        readers += 1
    assert writer.wait(timeout=60) == 0  # -7 (SIGBUS) before the fix, within milliseconds
    assert readers > 10


def test_a_run_removes_only_provably_dead_temporaries(tmp_path, slide_tree):
    """A killed run's temporary report (dead pid on this host) goes; a live run's stays."""
    import socket

    from smearscan.files import _HOST

    reports = tmp_path / "reports"
    reports.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = reports / f".r.csv.{_HOST}.{dead.pid}.0badc0de.tmp"
    live = reports / f".r.csv.{_HOST}.{os.getppid()}.0badc0de.tmp"
    foreign = reports / f".r.csv.other-host-{socket.gethostname()[:3]}x.{dead.pid}.0badc0de.tmp"
    for path in (stale, live, foreign):
        path.write_text("in progress")
    scan_state(slide_tree, tmp_path)
    assert not stale.exists()
    assert live.exists() and foreign.exists()


def test_a_state_row_that_does_not_read_back_is_rescanned_not_fatal(tmp_path, slide_tree):
    """Issue 22: a state row with unparsable probabilities failed every later run."""
    out, state = tmp_path / "r.csv", tmp_path / "state.db"
    args = ["scan", str(slide_tree), "--out", str(out), "--state", str(state), "--min-age", "0"]
    run(args)
    first = rows(out)
    with sqlite3.connect(state) as db:
        damaged = "SELECT rowid FROM files WHERE status='ok' LIMIT 1"
        db.execute(f"UPDATE files SET probabilities='abc,' WHERE rowid IN ({damaged})")
    result = run(args)
    assert "7 unchanged" in result.log.strip().splitlines()[-1]  # that one file scanned again
    assert rows(out) == first


def test_the_progress_bar_of_a_rerun_counts_the_files_it_keeps(tmp_path):
    """Issue 23.4: the bar's total counts every file found, but a --state rerun reads only
    new and changed files; the unchanged ones must move the bar too, or it never ends."""
    import io

    from click.testing import CliRunner

    from smearscan.cli import Environment, cli

    root = make_share(tmp_path, 2)
    total = len(image_files(root))
    args = ["scan", str(root), "--out", str(tmp_path / "r.csv"), "--state", str(tmp_path / "s.db")]
    for unchanged in (0, total):
        stderr = io.StringIO()  # a terminal, as far as the run knows: it draws the bar
        result = CliRunner().invoke(
            cli, [*args, "--min-age", "0"], obj=Environment(stderr=stderr, stderr_isatty=True)
        )
        assert result.exit_code == 0, stderr.getvalue()
        assert f"{total}/{total} 100%" in stderr.getvalue()
        assert f"{unchanged} unchanged" in stderr.getvalue().splitlines()[-1]
