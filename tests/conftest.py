"""Shared fixtures and helpers: real C-NMC crops committed under tests/fixtures, files made on
disk, the CLI run in-process with an injected environment, and the session-wide expensive
pieces (one tiny trained model, one Ray instance)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from smearscan.cli import Environment, cli
from smearscan.names import IMAGE_SUFFIXES
from smearscan.preprocess import read_image

FIXTURES = Path(__file__).parent / "fixtures"
CNMC = FIXTURES / "cnmc"
TINY_3CLASS = FIXTURES / "models" / "tiny-3class.onnx"
TINY_2CLASS = FIXTURES / "models" / "tiny-2class.onnx"
ROOT = Path(__file__).resolve().parents[1]
SHARED_CNMC = ROOT.parent / "shared" / "data" / "cnmc"
IN_CI = os.environ.get("CI", "").lower() == "true"
#: TensorFlow's thread pools get each xdist worker's share of the cores (the processes a test
#: starts inherit it), not all of them: two workers each running TF on every core of a 2-core
#: machine spent 23 s more of test time (478 s against 455 s, 2026-12-07). Every assertion
#: compares within one setting or within a tolerance; a developer's own setting wins.
_CORES_PER_WORKER = max(
    1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
)
for _pool in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ.setdefault(_pool, str(_CORES_PER_WORKER))
#: the tiny training of the train tests: width 1/16, 3 folds, 8 draws per donor
TINY = ["--width", "0.0625", "--folds", "3", "--batch-size", "8", "--quiet", "--per-patient", "8"]
#: The test files that take longest (measured, most first): the workers start on them, so
#: that no long file is left to run alone at the end (longest first; xdist's own order is
#: by number of tests, which put the four-test README retraining file last)
LONGEST_FIRST = (
    "test_retraining.py",
    "test_cross_validation.py",
    "test_augment_parity.py",
    "test_train_export.py",
    "test_ray.py",
    "test_hostile.py",
    "test_qc.py",
    "test_incremental.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long files first (see :data:`LONGEST_FIRST`); every file keeps its own order."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Tests never read the developer's shell: every SMEARSCAN_* setting is cleared (after
    simonw/llm's env-resetting fixtures)."""
    for name in list(os.environ):
        if name.startswith("SMEARSCAN_") or name == "OPENCV_IO_MAX_IMAGE_PIXELS":
            monkeypatch.delenv(name, raising=False)


def run(args: list[str], stdin: str | None = None, expect: int | Iterable[int] | None = 0) -> Any:
    """Run the CLI in-process; fail unless the exit code is ``expect`` (None: any)."""
    stderr = io.StringIO()
    result: Any = CliRunner().invoke(  # with the log added as .log
        cli, args, obj=Environment(stderr=stderr, stderr_isatty=False), input=stdin
    )
    result.log = stderr.getvalue()
    if expect is not None:
        allowed = {expect} if isinstance(expect, int) else set(expect)
        if result.exit_code not in allowed:
            raise AssertionError(
                f"exit {result.exit_code}, expected {sorted(allowed)}\nstdout: {result.output}"
                f"\nstderr: {result.log}\nexception: {result.exception!r}"
            )
    return result


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``. The developer's SMEARSCAN_* settings are
    already gone (``clean_environment``); those a test set itself travel with it."""
    return {**os.environ, **extra}


@pytest.fixture
def plumbing_model(monkeypatch) -> Path:
    """Scans in this test use the tiny two-class model (``SMEARSCAN_MODEL``, in process and
    in child processes): the test is about files, state, signals or reports, not about
    predictions, and the shipped four-network model costs 0.3 s more per scan."""
    monkeypatch.setenv("SMEARSCAN_MODEL", str(TINY_2CLASS))
    return TINY_2CLASS


def smearscan_command(*args: str, max_file_size: int | None = None) -> list[str]:
    """``python -m smearscan ARGS`` with this interpreter: the CLI as its own process. With
    ``max_file_size`` (bytes), the child first limits the files it may write (a full disk)
    and then becomes the CLI: a ``preexec_fn`` would run Python in a fork of the
    multi-threaded test process, which can deadlock."""
    if max_file_size is None:
        return [sys.executable, "-m", "smearscan", *args]
    limited = (
        "import os, resource, signal, sys; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_size}, {max_file_size})); "
        "os.execv(sys.executable, [sys.executable, '-m', 'smearscan', *sys.argv[1:]])"
    )
    return [sys.executable, "-c", limited, *args]


def smearscan(
    *args: str,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    max_file_size: int | None = None,
    **kwargs,
) -> subprocess.CompletedProcess:
    """Run the CLI in its own process from the repository root; text output captured."""
    return subprocess.run(
        smearscan_command(*args, max_file_size=max_file_size),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=clean_env(**(env or {})),
        **kwargs,
    )


def start_smearscan(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Start the CLI in its own process (stdout and stderr piped as text) and return at once:
    for tests that signal, kill or watch a run."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen(
        smearscan_command(*args), text=True, cwd=ROOT, env=clean_env(**(env or {})), **options
    )


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def image_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def fixture_images() -> list[Path]:
    return sorted(CNMC.rglob("*.webp"))


def read_bgr(path: str | Path) -> np.ndarray:
    """A crop as OpenCV holds it, decoded as the scanner decodes (raises with the reason)."""
    return read_image(path, order="bgr")


@pytest.fixture
def slide_tree(tmp_path: Path) -> Path:
    """Two slides of real crops saved as BMP, PNG, TIFF and JPEG (the formats labs have)."""
    root = tmp_path / "slides"
    images = fixture_images()
    formats = [".bmp", ".png", ".tif", ".jpg"]
    for index, source in enumerate(images[::3]):
        slide = root / ("patient_A" if "all" in source.parent.name else "patient_B")
        slide.mkdir(parents=True, exist_ok=True)
        target = slide / f"{source.stem}{formats[index % len(formats)]}"
        cv2.imwrite(str(target), read_bgr(source))
    return root


@pytest.fixture
def messy_tree(slide_tree: Path) -> Path:
    """The slide tree plus every kind of bad or odd file a lab folder collects."""
    slide = slide_tree / "patient_A"
    good = read_bgr(fixture_images()[0])
    (slide / "empty.png").write_bytes(b"")
    data = (slide / next(p.name for p in slide.iterdir() if p.suffix == ".png")).read_bytes()
    (slide / "truncated.png").write_bytes(data[: len(data) // 3])
    (slide / "notes.jpg").write_text("this is not an image\n")
    cv2.imwrite(str(slide / "deep16.png"), good.astype(np.uint16) * 257)
    cv2.imwrite(str(slide / "gray.png"), cv2.cvtColor(good, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(slide / "alpha.png"), cv2.cvtColor(good, cv2.COLOR_BGR2BGRA))
    odd = slide_tree / "odd names"
    odd.mkdir()
    for name in ["ünïcødé 細胞.png", 'comma, "quote".png', "=HYPERLINK(1).png", "new\nline.png"]:
        cv2.imwrite(str(odd / "tmp.png"), good)
        os.replace(odd / "tmp.png", odd / name)
    (slide_tree / "README.txt").write_text("not scanned: not an image type")
    return slide_tree


def make_share(tmp_path: Path, copies: int, age_seconds: float = 0.0) -> Path:
    """A share of ``copies`` slides, each holding all 24 fixture crops (a run long enough
    to interrupt); with ``age_seconds`` their mtimes lie that far in the past."""
    root = tmp_path / "share"
    for i in range(copies):
        slide = root / f"slide_{i:02d}"
        slide.mkdir(parents=True)
        for source in fixture_images():
            shutil.copy(source, slide / source.name)
            if age_seconds:
                old = time.time() - age_seconds
                os.utime(slide / source.name, (old, old))
    return root


@pytest.fixture
def cnmc_copy(tmp_path: Path) -> Path:
    target = tmp_path / "cnmc"
    shutil.copytree(CNMC, target)
    return target


def require_training_stack() -> None:
    """TensorFlow and tf2onnx (the [train] extra): a skip for a user without it, a failure in
    CI, where a suite that skipped every training test once reported green."""
    for module in ("tensorflow", "tf2onnx", "onnx"):
        if IN_CI:
            __import__(module)
        else:
            pytest.importorskip(module, reason=f"{module} is in the [train] extra")


def train_unchanged_child(parent: Path, child: Path, cache: Path, *extra: str) -> int:
    """One tiny epoch from ``parent`` at a vanishing learning rate and without the weight
    average: the child is its parent, so a test can check what fine-tuning starts from."""
    from export import train

    return train.main(
        ["--data", str(CNMC), "--out", str(child), "--epochs", "1", "--seed", "3", *TINY]
        + ["--init-from", str(parent), "--lr", "1e-12", "--ema", "0", *extra]
        + ["--cache-dir", str(cache)]
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny model trained once per test session (3 folds of the 24 fixture crops, two
    epochs) and reused by every training, export and fine-tuning test."""
    require_training_stack()
    from export import train

    out = tmp_path_factory.mktemp("run") / "tiny"
    code = train.main(
        ["--data", str(CNMC), "--out", str(out), "--epochs", "2", *TINY, "--seed", "3"]
        + ["--cache-dir", str(out.parent / "cache")]
    )
    assert code == 0
    return out


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for the whole session (it takes seconds and ~1 GB to start)."""
    if IN_CI:
        import ray
    else:
        ray = pytest.importorskip("ray", reason="Ray is the [ray] extra")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    yield ray
    ray.shutdown()
