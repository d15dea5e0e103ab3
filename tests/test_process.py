"""The installed entry point as a real process: version, help, progress on and off a TTY."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, rows, smearscan

from smearscan import __version__
from smearscan.exitstatus import ExitStatus

# files, state, signals and reports, not predictions: the tiny two-class model
pytestmark = pytest.mark.usefixtures("plumbing_model")


def test_version_and_help():
    assert smearscan("--version").stdout.strip() == f"smearscan, version {__version__}"
    helped = smearscan("--help")
    assert helped.returncode == 0
    for command in ("scan", "evaluate", "merge", "model"):
        assert command in helped.stdout
    assert "Research use only" in helped.stdout
    assert "--state" in smearscan("scan", "--help").stdout


def test_help_does_not_import_the_heavy_modules():
    code = (
        "import sys; from smearscan.cli import cli; "
        "print(sorted(m for m in ('cv2', 'onnxruntime', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "[]"


def test_cron_mode_logs_progress_lines_and_a_final_line(slide_tree, tmp_path):
    result = smearscan(
        "scan",
        str(slide_tree),
        "--out",
        str(tmp_path / "r.csv"),
        "--log-interval",
        "0",
        "--batch-size",
        "2",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert sum("progress:" in line for line in lines) >= 4
    assert lines[-1].startswith("smearscan done: 8 files, 8 ok, 0 failed QC, 0 errors")
    quiet = smearscan("scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "-q")
    assert quiet.stderr.strip().splitlines() == [quiet.stderr.strip()]  # only the final line


def test_progress_bar_on_a_terminal(slide_tree, tmp_path):
    primary, secondary = os.openpty()
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smearscan",
                "scan",
                str(slide_tree),
                "--out",
                str(tmp_path / "r.csv"),
            ],
            stderr=secondary,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
        )
        os.close(secondary)
        output = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=120) == 0
    finally:
        os.close(primary)
    text = output.decode("utf-8", "replace")
    assert "scanning" in text and "files/s" in text and "8/8" in text


def _python_without(preamble: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter after ``preamble`` took something away (a module,
    a signal), as on a platform that lacks it."""
    code = "\n".join(
        [
            preamble,
            "import sys",
            "from smearscan.cli import main",
            f"sys.argv = ['smearscan', *{list(args)!r}]",
            "main()",
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def test_help_and_signals_work_without_sighup():
    """Issue 21: Windows has no SIGHUP; `smearscan --help` failed at import."""
    done = _python_without("import signal\ndel signal.SIGHUP", "--help")
    assert done.returncode == 0 and "scan" in done.stdout, done.stderr


def test_state_runs_lock_with_filelock_where_there_is_no_fcntl(tmp_path, slide_tree):
    """Issue 21: without fcntl (Windows) --state ended in a traceback; filelock takes over,
    and a second run is still refused while the first holds the lock."""
    no_fcntl = "import sys\nsys.modules['fcntl'] = None"
    out, state = tmp_path / "r.csv", tmp_path / "state.db"
    args = ["scan", str(slide_tree), "--out", str(out), "--state", str(state), "--min-age", "0"]
    done = _python_without(no_fcntl, *args)
    assert done.returncode == 0, done.stderr
    assert len(rows(out)) == 8
    import filelock

    with filelock.FileLock(str(state) + ".lock"):
        held = _python_without(no_fcntl, *args)
    assert held.returncode == ExitStatus.LOCKED, held.stderr
    assert "another smearscan run holds" in held.stderr


def test_log_lines_print_above_the_progress_bar_in_a_real_terminal(tmp_path):
    """Issue 21: on a terminal, INFO and WARNING lines were written into the progress bar's
    line. Run in tmux (a real terminal) and read the screen: each log line starts its own
    line, never after the bar."""
    import shutil
    import time

    if shutil.which("tmux") is None:
        import pytest

        pytest.skip("tmux not installed (.ci/run installs it)")
    session = f"smearscan-{os.getpid()}"
    out = tmp_path / "r.csv"
    command = f"{sys.executable} -m smearscan scan examples/slides --out {out}; sleep 30"
    tmux = ["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50"]
    subprocess.run([*tmux, "-c", str(ROOT), command], check=True)
    try:
        deadline = time.monotonic() + 60
        screen = ""
        while time.monotonic() < deadline and "smearscan done" not in screen:
            time.sleep(0.5)
            capture = ["tmux", "capture-pane", "-t", session, "-p", "-J"]
            screen = subprocess.run(capture, capture_output=True, text=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert "smearscan done" in screen, screen
    lines = [line for line in screen.splitlines() if line.strip()]
    logged = [line for line in lines if " WARNING " in line or " INFO " in line]
    assert any("files are JPEG" in line for line in logged), screen
    assert all(line.startswith("20") for line in logged), screen  # a timestamp, not the bar
    assert not any(line.startswith("scanning") and " INFO " in line for line in lines)
