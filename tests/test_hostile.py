"""Hostile trees, names, model files, signals and faults: never hang, crash, lie or leak.

Every case is built with real files, processes and signals. Behaviour that root bypasses
(permissions) runs as an unprivileged user through ``setpriv``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import (
    IN_CI,
    ROOT,
    fixture_images,
    image_files,
    make_share,
    read_bgr,
    require_training_stack,
    run,
    smearscan,
    start_smearscan,
)
from conftest import rows as read_rows

from smearscan.exitstatus import ExitStatus
from smearscan.names import display_name, unescape_name

# files, links, signals and faults, not predictions: the tiny two-class model
pytestmark = pytest.mark.usefixtures("plumbing_model")

NON_UTF8 = os.fsdecode(b"caf\xe9 \xff.png")


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ------------------------------------------------------------------ names


def test_a_non_utf8_name_is_scanned_and_shown_losslessly(tmp_path, slide_tree):
    source = next(iter(image_files(slide_tree)))
    raw = os.path.join(os.fsencode(slide_tree / "patient_A"), os.fsencode(NON_UTF8))
    with open(raw, "wb") as handle:
        handle.write(source.read_bytes())
    out, state = tmp_path / "r.csv", tmp_path / "state.db"
    for extra in ([], ["--state", str(state), "--min-age", "0"], ["--state", str(state)]):
        run(["scan", str(slide_tree), "--out", str(out), *extra])
        row = next(r for r in read_rows(out) if "caf" in r["path"])
        assert row["status"] == "ok" and row["path"] == "patient_A/caf\\xe9 \\xff.png"
        assert unescape_name(row["path"]) == "patient_A/" + NON_UTF8
        assert os.fsencode(unescape_name(row["path"])).endswith(b"caf\xe9 \xff.png")
    html = out.with_name("r.html").read_text(encoding="utf-8")
    assert "caf\\xe9" in html


def test_names_with_line_breaks_and_formulas_round_trip_in_any_csv_reader(tmp_path, slide_tree):
    source = next(iter(image_files(slide_tree))).read_bytes()
    evil = ["x\n=1+1.png", "y\r@SUM(A1).png", "tab\t-2.png", "back\\slash.png", "\x1b[31mred.png"]
    folder = slide_tree / "patient_A"
    for name in evil:
        (folder / name).write_bytes(source)
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)])
    text = out.read_text(encoding="utf-8")
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == 8 + len(evil)
    # a spreadsheet-style reader: one physical line per row, split on commas outside quotes
    lines = text.splitlines()
    assert len(lines) == 1 + 8 + len(evil)
    for line in lines[1:]:
        for cell in next(csv.reader([line])):
            assert not cell or cell[0] not in "=+-@\t\r", line
    names = {unescape_name(r["path"]).rsplit("/", 1)[1] for r in parsed}
    assert set(evil) <= names
    assert "\x1b" not in text


def test_escaping_is_reversible_for_every_byte():
    for byte in range(256):
        name = os.fsdecode(b"a" + bytes([byte]) + b"\\x41.png") if byte != 0x2F else "a.png"
        assert unescape_name(display_name(name)) == name
        assert "\n" not in display_name(name) and "\x1b" not in display_name(name)


def test_html_reports_escape_names_labels_and_model_metadata(tmp_path, slide_tree):
    source = next(iter(image_files(slide_tree))).read_bytes()
    hostile = slide_tree / "<img src=x onerror=alert(1)>"
    hostile.mkdir()
    (hostile / "<script>alert(2)<script>.png").write_bytes(source)
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)])
    page = out.with_name("r.html").read_text()
    assert "<img src=x" not in page and "<script>alert" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


# ------------------------------------------------------------------ special files


def test_a_fifo_named_like_an_image_never_hangs_the_run(tmp_path, slide_tree):
    os.mkfifo(slide_tree / "patient_A" / "x.png")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(slide_tree / "patient_A" / "y.png"))
    try:
        out = tmp_path / "r.csv"
        done = smearscan("scan", str(slide_tree), "--out", str(out), timeout=60)
        assert done.returncode == ExitStatus.SOME_UNUSABLE, done.stderr
        table = {r["path"]: r for r in read_rows(out)}
        for name in ("x.png", "y.png"):
            row = table[f"patient_A/{name}"]
            assert row["status"] == "error" and "not a regular file" in row["reason"]
        # named one by one, through --files-from, it is refused when opened
        listed = tmp_path / "list.txt"
        listed.write_text(str(slide_tree / "patient_A" / "x.png") + "\n")
        done = smearscan("scan", "--files-from", str(listed), "--out", str(out), timeout=60)
        assert "not a regular file" in read_rows(out)[0]["reason"]
    finally:
        listener.close()


def test_a_device_node_named_like_an_image_is_refused(tmp_path, slide_tree):
    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    node = slide_tree / "patient_A" / "z.png"
    os.mknod(node, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero: endless bytes
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)], expect=ExitStatus.SOME_UNUSABLE)
    row = next(r for r in read_rows(out) if r["path"].endswith("z.png"))
    assert "not a regular file" in row["reason"]


def test_files_are_capped_by_size_before_reading(tmp_path, slide_tree):
    sparse = slide_tree / "patient_A" / "huge.tif"
    with open(sparse, "wb") as handle:
        handle.truncate(4 * 1024**3)  # 4 GB, sparse: costs no disk
    out = tmp_path / "r.csv"
    done = smearscan("scan", str(slide_tree), "--out", str(out), timeout=60)
    assert done.returncode == ExitStatus.SOME_UNUSABLE, done.stderr
    row = next(r for r in read_rows(out) if r["path"].endswith("huge.tif"))
    assert "file too large" in row["reason"]
    small = next(iter(image_files(slide_tree / "patient_B")))
    run(
        ["scan", str(small), "--out", str(out), "--max-bytes", "1000"],
        expect=ExitStatus.SOME_UNUSABLE,
    )
    assert "file too large" in read_rows(out)[0]["reason"]


#: Peak resident memory of this process image (VmHWM: unlike ru_maxrss it does not carry the
#: pytest parent's peak across fork and exec).
PEAK = """
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
"""

PIXEL_GUARD = (
    PEAK
    + """
import sys
if sys.argv[1] == "cv2-first":
    import cv2
from pathlib import Path
from smearscan import ScanRequest, load_classifier, run_scan
from smearscan.preprocess import read_image
import csv
try:
    read_image(sys.argv[2])
    print("DECODED")
except ValueError as exc:
    print("REFUSED", exc)
print("RSS_MB", peak_mb())
"""
)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 3 MB-ish PNG that decodes to 20000 x 20000 pixels (400 MP, 1.2 GB as RGB)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    cv2.imwrite(str(path), np.zeros((20000, 20000), np.uint8))
    return path


@pytest.mark.parametrize("order", ["smearscan-first", "cv2-first"])
def test_the_pixel_guard_holds_whatever_loads_first(bomb, order):
    done = subprocess.run(
        [sys.executable, "-c", PIXEL_GUARD, order, str(bomb)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert "REFUSED" in done.stdout and "too large" in done.stdout, done.stdout + done.stderr
    rss = int(done.stdout.split("RSS_MB")[1])
    assert rss < 600, rss  # refused from the header, never decoded


def test_evaluate_refuses_a_bomb_from_its_header(bomb, tmp_path):
    labelled = tmp_path / "labelled" / "all"
    labelled.mkdir(parents=True)
    (labelled / "bomb.png").write_bytes(bomb.read_bytes())
    for source in fixture_images()[:3]:
        cv2.imwrite(str(labelled / f"{source.stem}.png"), read_bgr(source))
    out = tmp_path / "eval"
    wrapper = PEAK + (
        "import atexit, sys\n"
        "atexit.register(lambda: print('PEAK_MB', peak_mb(), file=sys.stderr))\n"
        "from smearscan.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, "evaluate", str(tmp_path / "labelled"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == ExitStatus.SOME_UNUSABLE, done.stderr
    assert int(done.stderr.split("PEAK_MB")[1]) < 600
    row = next(r for r in read_rows(out / "predictions.csv") if r["path"].endswith("bomb.png"))
    assert "too large" in row["reason"]


def test_max_pixels_above_the_default_is_honoured(tmp_path):
    big = tmp_path / "big" / "cell.png"
    big.parent.mkdir()
    cell = read_bgr(fixture_images()[0])
    canvas = np.zeros((9000, 9000, 3), np.uint8)  # 81 MP, over the 64 MP default
    canvas[4000:4450, 4000:4450] = cell
    cv2.imwrite(str(big), canvas)
    out = tmp_path / "r.csv"
    refused = smearscan("scan", str(big.parent), "--out", str(out), "--qc", "off")
    assert refused.returncode == ExitStatus.SOME_UNUSABLE
    assert "too large" in read_rows(out)[0]["reason"]
    allowed = smearscan(
        "scan", str(big.parent), "--out", str(out), "--qc", "off", "--max-pixels", "100000000"
    )
    assert allowed.returncode == 0, allowed.stderr
    assert read_rows(out)[0]["status"] == "ok"


# ------------------------------------------------------------------ folders


def test_a_thousand_nested_levels_are_walked_without_recursion(tmp_path):
    root = tmp_path / "deep"
    folder = str(root)
    os.mkdir(folder)
    for _ in range(1000):
        folder += "/d"
        os.mkdir(folder)  # one level at a time: pathlib and os.makedirs recurse
    cv2.imwrite(folder + "/cell.png", read_bgr(fixture_images()[0]))
    out = tmp_path / "r.csv"
    try:
        run(["scan", str(root), "--out", str(out)])
        table = read_rows(out)
        assert len(table) == 1 and table[0]["status"] == "ok"
        assert table[0]["path"].count("/") == 1000
    finally:  # shutil.rmtree (and so pytest's cleanup) recurses once per level
        os.unlink(folder + "/cell.png")
        while folder != str(root):
            os.rmdir(folder)
            folder = folder.rsplit("/", 1)[0]
        os.rmdir(folder)


def test_a_path_over_path_max_becomes_an_error_row(tmp_path, slide_tree):
    base = os.open(slide_tree, os.O_RDONLY)
    try:
        fd = base
        for _ in range(20):  # 20 x 250 characters: past PATH_MAX (4096)
            os.mkdir("l" * 250, dir_fd=fd)
            child = os.open("l" * 250, os.O_RDONLY, dir_fd=fd)
            if fd != base:
                os.close(fd)
            fd = child
        os.close(fd)
    finally:
        os.close(base)
    out = tmp_path / "r.csv"
    result = run(["scan", str(slide_tree), "--out", str(out)], expect=ExitStatus.SOME_UNUSABLE)
    row = next(r for r in read_rows(out) if r["status"] == "error")
    assert row["reason"].startswith("cannot list folder") and row["path"].endswith("/")
    assert "1 errors" in last_line(result.log)


@pytest.fixture
def as_nobody():
    """The setpriv prefix that runs a command as 'nobody' (permissions bind it, unlike root).

    A clean clone may sit in a folder only root can enter (mktemp makes them 0700): the
    folders above the project and its interpreter get the search bit for others for the
    test's duration (never read permission), and get their modes back after it."""
    if os.geteuid() != 0:
        yield []
        return
    widened: list[tuple[Path, int]] = []
    for start in (ROOT, Path(sys.prefix), Path(sys.executable).resolve()):
        for folder in [start, *start.parents]:
            if not folder.is_dir():
                continue
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH and folder not in [w for w, _ in widened]:
                widened.append((folder, stat.S_IMODE(mode)))
                os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)
    try:
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", "import smearscan"], capture_output=True, cwd="/"
        )
        if probe.returncode != 0:
            message = f"cannot run as an unprivileged user: {probe.stderr[-300:]!r}"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        yield prefix
    finally:
        for folder, mode in reversed(widened):
            os.chmod(folder, mode)


def test_an_unreadable_folder_is_an_error_row_and_exit_3(slide_tree, as_nobody):
    prefix = as_nobody
    shared = Path(tempfile.mkdtemp(prefix="smearscan-perm-"))
    try:
        os.chmod(shared, 0o777)
        tree = shared / "slides"
        import shutil

        shutil.copytree(slide_tree, tree)
        for path in [tree, *tree.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        locked = tree / "patient_B"
        os.chmod(locked, 0)
        out = shared / "reports" / "r.csv"
        (shared / "reports").mkdir()
        os.chmod(shared / "reports", 0o777)
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "smearscan", "scan", str(tree), "--out", str(out)],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=120,
        )
        assert done.returncode == ExitStatus.SOME_UNUSABLE, done.stderr
        table = read_rows(out)
        row = next(r for r in table if r["path"] == "patient_B/")
        assert row["status"] == "error" and "Permission denied" in row["reason"]
        assert "1 errors" in last_line(done.stderr)
        page = out.with_name("r.html").read_text()
        assert "Unreadable files (1)" in page and "patient_B/" in page
    finally:
        os.chmod(shared / "slides" / "patient_B", 0o755)
        import shutil

        shutil.rmtree(shared, ignore_errors=True)


def test_a_file_swapped_for_a_link_after_discovery_is_not_read(tmp_path, slide_tree):
    from smearscan.discover import discover
    from smearscan.inference import load_classifier
    from smearscan.stages import StageConfig, prepare_item

    outside = tmp_path / "outside.png"
    outside.write_bytes(next(iter(image_files(slide_tree))).read_bytes())
    found = [f for f in discover([slide_tree])]
    victim = found[0]
    os.unlink(victim.path)
    os.symlink(outside, victim.path)
    recipe = load_classifier(device="cpu").info.recipe
    result, model_input = prepare_item(victim, StageConfig(recipe))
    assert model_input is None and result.status == "error"
    assert "link out of the scanned folder" in result.reason


# ------------------------------------------------------------------ report targets


def test_report_targets_must_be_regular_files(tmp_path, slide_tree):
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    result = run(["scan", str(slide_tree), "--out", str(fifo)], expect=ExitStatus.USAGE)
    assert "not a regular file" in result.log
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    run(["scan", str(slide_tree), "--out", str(folder)], expect=ExitStatus.USAGE)
    if os.geteuid() == 0:
        node = tmp_path / "null.csv"
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        run(
            ["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "--summary", str(node)],
            expect=ExitStatus.USAGE,
        )
        assert stat.S_ISCHR(node.stat().st_mode)


def test_report_paths_may_not_clash(tmp_path, slide_tree):
    usage = ExitStatus.USAGE
    out = tmp_path / "r.csv"
    result = run(["scan", str(slide_tree), "--out", str(out), "--summary", str(out)], expect=usage)
    assert "overwrite" in result.log
    run(["scan", str(slide_tree), "--out", str(tmp_path / "x.html")], expect=usage)
    run(["scan", str(slide_tree), "--out", str(out), "--html", str(out)], expect=usage)
    assert not out.exists()


# ------------------------------------------------------------------ model files


def _tampered(tmp_path: Path, name: str = "bad.onnx", **metadata) -> Path:
    require_training_stack()
    import onnx

    from smearscan.modelfile import default_model_path

    model = onnx.load(str(default_model_path()))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        key = "smearscan." + key
        if key in existing:
            existing[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({"labels": json.dumps([1, "1"])}, "labels must be strings"),
        ({"labels": json.dumps(["all", "ALL"])}, "distinct"),
        ({"labels": json.dumps(["all", "<b>hem</b>"])}, "unsafe label"),
        ({"labels": json.dumps(["all", "hem", "aml"])}, "does not match its 3 labels"),
        ({"calibration": json.dumps({"temperature": 1.0, "threshold": "NaN"})}, "not a number"),
        ({"calibration": json.dumps({"temperature": 1.0, "threshold": 1.5})}, "in [0, 1]"),
        ({"decision": json.dumps({"cell": {"rule": "threshold", "threshold": -0.1}})}, "in [0, 1]"),
        ({"calibration": json.dumps({"temperature": 0})}, "temperature"),
        ({"calibration": json.dumps({"temperature": float("inf")})}, "temperature"),
        ({"preprocessing": json.dumps({"input_size": 40000})}, "outside"),
        ({"preprocessing": json.dumps({"input_size": 96})}, "does not match the recipe"),
        ({"qc": "{not json"}, "quality-control"),
    ],
)
def test_a_model_file_that_lies_is_refused_before_any_report(
    tmp_path, slide_tree, metadata, reason
):
    model = _tampered(tmp_path, **metadata)
    out = tmp_path / "r.csv"
    out.write_text("previous\n")
    result = run(
        ["scan", str(slide_tree), "--out", str(out), "--model", str(model)], expect=ExitStatus.ERROR
    )
    assert reason in result.log, result.log
    assert out.read_text() == "previous\n"


def _shipped(key: str) -> dict:
    from smearscan.inference import load_classifier

    return json.loads(load_classifier(device="cpu").info.metadata["smearscan." + key])


def _qc_low_above_high(qc):
    qc["limits"]["default"]["area"] = [60000, 10000]


def _qc_negative(qc):
    qc["limits"]["default"]["focus"] = [-5, -1]


def _qc_no_objects(qc):
    qc["fixed"]["max_objects"] = 0


def _qc_nan_fill(qc):
    qc["fixed"]["max_fill"] = float("nan")


def _qc_empty_default(qc):
    qc["limits"]["default"] = {}


def _qc_without_chroma(qc):
    del qc["limits"]["default"]["chroma"]  # would let grayscale crops through


def _decision_min_cells_text(decision):
    decision["slide"]["min_cells"] = "abc"


def _decision_min_cells_huge(decision):
    decision["slide"]["min_cells"] = 10**30


def _decision_min_cells_zero(decision):
    decision["slide"]["min_cells"] = 0


def _decision_without_threshold(decision):
    del decision["cell"]["threshold"]


def _decision_cell_not_object(decision):
    decision["cell"] = "threshold"


@pytest.mark.parametrize(
    ("key", "change", "reason"),
    [
        ("qc", _qc_low_above_high, "is empty"),
        ("qc", _qc_negative, "negative"),
        ("qc", _qc_no_objects, "refuse every crop"),
        ("qc", _qc_nan_fill, "max_fill"),
        ("qc", _qc_empty_default, "lack"),
        ("qc", _qc_without_chroma, "lack chroma"),
        ("decision", _decision_min_cells_text, "min_cells"),
        ("decision", _decision_min_cells_huge, "min_cells"),
        ("decision", _decision_min_cells_zero, "min_cells"),
        ("decision", _decision_without_threshold, "has no threshold"),
        ("decision", _decision_cell_not_object, "must be objects"),
    ],
)
def test_inconsistent_model_metadata_is_refused_not_only_mistyped(
    tmp_path, slide_tree, key, change, reason
):
    """Issue 22: QC ranges with low > high, max_objects 0, an empty limits set, a
    min_cells of 'abc' or 1e30, a threshold rule without its threshold were all accepted
    (some made every crop fail QC, one let grayscale crops through, some gave tracebacks)."""
    value = _shipped(key)
    change(value)
    model = _tampered(tmp_path, **{key: json.dumps(value)})
    out = tmp_path / "r.csv"
    result = run(
        ["scan", str(slide_tree), "--out", str(out), "--model", str(model)], expect=ExitStatus.ERROR
    )
    assert reason in result.log, result.log
    assert not out.exists()


def test_nan_and_negative_model_outputs_become_error_rows(tmp_path, slide_tree):
    require_training_stack()
    import onnx
    from onnx import TensorProto, helper

    from smearscan.modelfile import default_model_path

    source = onnx.load(str(default_model_path()))
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 128, 128, 3])
    probabilities = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])
    # mean colour per crop -> [r, g]; a crop brighter than 0.1 in red gets NaN, else -1, 2
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0),
        helper.make_node("Slice", ["mean", "start", "end", "axis"], ["pair"]),
        helper.make_node("Sub", ["pair", "pair"], ["zero"]),
        helper.make_node("Div", ["zero", "zero"], ["nan"]),
    ]
    initializers = [
        helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor("start", TensorProto.INT64, [1], [0]),
        helper.make_tensor("end", TensorProto.INT64, [1], [2]),
        helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan",
        [image],
        [helper.make_tensor_value_info("nan", TensorProto.FLOAT, ["batch", 2])],
        initializers,
    )
    del probabilities
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = source.ir_version
    for entry in source.metadata_props:
        value = entry.value
        if entry.key == "smearscan.qc":  # this graph computes no embedding distance
            value = json.dumps({k: v for k, v in json.loads(value).items() if k != "embedding"})
        model.metadata_props.add(key=entry.key, value=value)
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "r.csv"
    result = run(
        ["scan", str(slide_tree), "--out", str(out), "--model", str(path)],
        expect=ExitStatus.SOME_UNUSABLE,
    )
    table = read_rows(out)
    assert len(table) == 8 and all(r["status"] == "error" for r in table)
    assert all("invalid output" in r["reason"] and r["label"] == "" for r in table)
    assert "8 errors" in last_line(result.log)


# ------------------------------------------------------------------ signals


def _wait_for_progress(process: subprocess.Popen, needle: str = "progress:") -> str:
    """Read stderr lines until ``needle`` appears (the scan is under way)."""
    seen = ""
    deadline = time.monotonic() + 120
    assert process.stderr is not None  # piped
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen += line
        if needle in line:
            return seen
    pytest.fail(f"never saw {needle!r}: {seen[-2000:]}")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_hup_and_int_write_a_partial_report_marking_unfinished_slides(tmp_path, signum, code):
    root = make_share(tmp_path, 30)
    out = tmp_path / "r.csv"
    process = start_smearscan(
        "scan",
        str(root),
        "--out",
        str(out),
        "--log-interval",
        "0",
        "--batch-size",
        "4",
        "--workers",
        "1",
    )
    _wait_for_progress(process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert f"exit {code}" in last_line(stderr)
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["partial"] is True
    calls = {name: s["call"] for name, s in summary["slides"].items()}
    assert "incomplete" in calls.values()  # the slide being read when the signal came
    last_slide = sorted(calls)[-1]
    assert calls[last_slide] == "incomplete"
    assert all(c != "incomplete" for name, c in calls.items() if name != last_slide)
    assert "interrupted" in out.with_name("r.html").read_text()


def test_a_second_signal_exits_at_once_without_a_report(tmp_path):
    root = make_share(tmp_path, copies=60)
    out = tmp_path / "r.csv"
    out.write_text("previous\n")
    process = start_smearscan(
        "scan",
        str(root),
        "--out",
        str(out),
        "--log-interval",
        "0",
        "--batch-size",
        "64",
        "--workers",
        "1",
        "--tta",
    )
    _wait_for_progress(process)
    process.send_signal(signal.SIGINT)
    _wait_for_progress(process, "finishing the batches in flight")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "aborted (second signal" in last_line(stderr)
    assert out.read_text() == "previous\n"


def test_sigterm_while_the_page_is_written_leaves_complete_reports_that_say_so(
    tmp_path, slide_tree, monkeypatch
):
    """Issue 22.7: a SIGTERM that lands once every file was read (here: while the HTML page is
    being written) leaves complete reports; the summary, the final line and the exit code
    must all say so, with the same run time."""
    import smearscan.runner

    real_write_html = smearscan.runner.write_html

    def signalled_while_writing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the real handler of the run's SignalGuard
        return real_write_html(*args, **kwargs)

    monkeypatch.setattr(smearscan.runner, "write_html", signalled_while_writing)
    out = tmp_path / "r.csv"
    result = run(["scan", str(slide_tree), "--out", str(out)], expect=None)
    summary = json.loads(out.with_name("r.summary.json").read_text())
    final = last_line(result.log)
    assert "signal" in result.log.lower()  # the guard did receive it
    assert summary["partial"] is False
    assert "incomplete" not in {s["call"] for s in summary["slides"].values()}
    assert final.startswith("smearscan done:"), final
    assert result.exit_code == ExitStatus.SUCCESS and "exit 0" in final
    assert f"in {summary['seconds']:.1f} s" in final
    assert "interrupted" not in out.with_name("r.html").read_text()
    assert len(read_rows(out)) == len(image_files(slide_tree))


def test_sigterm_while_waiting_for_the_lock_ends_the_wait_without_a_report(tmp_path, slide_tree):
    from smearscan.state import RunLock

    state = tmp_path / "state.db"
    out = tmp_path / "r.csv"
    out.write_text("previous\n")
    with RunLock(state.with_name("state.db.lock")):
        process = start_smearscan(
            "scan", str(slide_tree), "--out", str(out), "--state", str(state), "--wait", "600"
        )
        _wait_for_progress(process, "waiting up to 600 s")  # now waiting for the lock
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert time.monotonic() - started < 10
    assert process.returncode == 143, stderr
    assert "interrupted" in last_line(stderr) and "exit 143" in last_line(stderr)
    assert out.read_text() == "previous\n"


def _labelled_tree(root: Path, copies: int) -> Path:
    for label in ("all", "hem"):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(copies):
            for source in (p for p in fixture_images() if p.parent.name == label):
                cv2.imwrite(str(folder / f"{i}_{source.stem}.png"), read_bgr(source))
    return root


def _wait_for_rows(folder: Path, process: subprocess.Popen) -> None:
    """Poll until the run's temporary report holds rows (the first ones reach the disk):
    an event, not a guess at how long the model takes to load."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if any(t.stat().st_size > 0 for t in folder.glob(".predictions.csv.*.tmp")):
            return
        time.sleep(0.01)
    pytest.fail(f"no rows were written before the run ended (exit {process.poll()})")


def test_evaluate_stopped_mid_run_writes_a_partial_record(tmp_path):
    root = _labelled_tree(tmp_path / "labelled", copies=40)
    out = tmp_path / "eval"
    process = start_smearscan("evaluate", str(root), "--out", str(out), "--batch-size", "4")
    _wait_for_rows(out, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "exit 143" in last_line(stderr)
    summary = json.loads((out / "predictions.summary.json").read_text())
    assert summary["partial"] is True
    assert 0 < summary["overall"]["files"] < 960
    assert not list(out.glob(".*.tmp"))


def test_evaluate_stopped_before_any_row_keeps_the_previous_record(tmp_path):
    """The signal handlers are in place before the model is loaded (the model line is
    logged inside the guard): a signal that lands as the evaluation starts ends it with the
    same code, and a record with no row would only hide the last good one."""
    root = _labelled_tree(tmp_path / "labelled", copies=10)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "predictions.summary.json").write_text("previous\n")
    process = start_smearscan(
        "evaluate", str(root), "--out", str(out), "--batch-size", "4", "--tta"
    )
    _wait_for_progress(process, "execution provider")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "exit 143" in last_line(stderr)
    assert not list(out.glob(".*.tmp"))
    record = (out / "predictions.summary.json").read_text()
    # (on a fast machine a first batch may already be done: then the record is partial)
    assert record == "previous\n" or json.loads(record)["partial"] is True


# ------------------------------------------------------------------ faults


def test_a_full_disk_still_ends_with_the_final_line_and_exit_1(tmp_path, slide_tree):
    out = tmp_path / "r.csv"
    done = smearscan("scan", str(slide_tree), "--out", str(out), max_file_size=300)
    assert done.returncode == ExitStatus.ERROR, done.stderr
    line = last_line(done.stderr)
    assert line.startswith("smearscan failed: 8 files") and "exit 1" in line
    assert not list(tmp_path.glob(".r.csv.*"))


def test_anonymized_runs_keep_names_out_of_logs(tmp_path, slide_tree):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    (slide_tree / "patient_A" / "secret_name.png").write_bytes(b"broken")
    os.mkfifo(slide_tree / "patient_A" / "pipe.png")
    log_file = tmp_path / "scan.log"
    done = smearscan(
        "scan",
        str(slide_tree),
        "--out",
        str(tmp_path / "r.csv"),
        "--anonymize-key-file",
        str(key),
        "--log-file",
        str(log_file),
        "--log-interval",
        "0",
    )
    assert done.returncode == ExitStatus.SOME_UNUSABLE
    for text in (done.stderr, log_file.read_text()):
        assert "patient_A" not in text and "secret_name" not in text and "pipe" not in text


def test_metrics_json_is_strict_json_even_when_a_metric_is_undefined(tmp_path):
    root = tmp_path / "labelled" / "all"
    root.mkdir(parents=True)
    for source in [p for p in fixture_images() if p.parent.name == "all"][:4]:
        cv2.imwrite(str(root / f"{source.stem}.png"), read_bgr(source))
    out = tmp_path / "eval"
    run(["evaluate", str(tmp_path / "labelled"), "--out", str(out)])  # one class: AUC undefined

    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON")

    document = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert document["cells"]["roc_auc"] is None


def test_native_library_warnings_do_not_get_through_quiet(tmp_path):
    folder = tmp_path / "crops"
    folder.mkdir()
    ok, png = cv2.imencode(".png", read_bgr(fixture_images()[0]))
    damaged = bytearray(png.tobytes())
    damaged[200] ^= 0xFF  # a CRC error: libpng prints its own message to file descriptor 2
    (folder / "crc.png").write_bytes(bytes(damaged))
    loud = smearscan("scan", str(folder), "--out", str(tmp_path / "r.csv"))
    assert "libpng" in loud.stderr  # the library does write to stderr
    quiet = smearscan("scan", str(folder), "--out", str(tmp_path / "r.csv"), "-q")
    assert quiet.returncode == ExitStatus.SOME_UNUSABLE
    assert quiet.stderr.strip().splitlines() == [last_line(quiet.stderr)]
    assert last_line(quiet.stderr).startswith("smearscan done: 1 files")


def test_temporaries_of_a_killed_run_are_removed_without_a_state(tmp_path, slide_tree):
    from smearscan.files import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".r.csv.{_HOST}.{dead.pid}.0badc0de.tmp"
    stale.write_text("half a report")
    run(["scan", str(slide_tree), "--out", str(tmp_path / "r.csv")])
    assert not stale.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_terminal_escapes_in_names_never_reach_the_log(tmp_path, slide_tree):
    escape = slide_tree / "\x1b[2J\x1b]0;owned\x07"
    escape.mkdir()
    (escape / "\x1b[31mcell.png").write_bytes(next(iter(image_files(slide_tree))).read_bytes())
    os.chmod(escape, 0o755)
    log_file = tmp_path / "scan.log"
    done = smearscan(
        "scan",
        str(slide_tree),
        "--out",
        str(tmp_path / "r.csv"),
        "--log-file",
        str(log_file),
        "--log-interval",
        "0",
    )
    assert done.returncode == 0, done.stderr
    for text in (
        done.stderr,
        log_file.read_text(),
        (tmp_path / "r.csv").read_text(),
        (tmp_path / "r.html").read_text(),
    ):
        assert "\x1b" not in text and "\x07" not in text


def test_both_onnx_runtimes_installed_is_refused_with_the_fix(tmp_path, slide_tree):
    fake = tmp_path / "site" / "onnxruntime_gpu-1.31.1.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n"
    )
    env = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}
    done = smearscan("scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), env=env)
    assert done.returncode == ExitStatus.ERROR
    assert "both onnxruntime (CPU) and onnxruntime-gpu are installed" in done.stderr
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in done.stderr
    assert last_line(done.stderr).startswith("smearscan failed:")


@pytest.mark.parametrize("planted", ["state.db.lock", "state.db", "state.db-wal", "scan.log"])
def test_private_files_are_never_opened_through_a_planted_link(tmp_path, slide_tree, planted):
    """Issue 22: a link another user plants where the state, its lock, its WAL or the log
    will be must not make the scan truncate, append to or chmod the link's target."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.chmod(victim, 0o644)
    (tmp_path / planted).symlink_to(victim)
    out = tmp_path / "r.csv"
    result = run(
        [
            "scan",
            str(slide_tree),
            "--out",
            str(out),
            "--state",
            str(tmp_path / "state.db"),
            "--log-file",
            str(tmp_path / "scan.log"),
        ],
        expect=None,
    )
    expected = ExitStatus.USAGE if planted == "scan.log" else ExitStatus.ERROR
    assert result.exit_code == expected, result.log + result.output
    assert "symbolic link" in result.log + result.output
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not out.exists()


def test_a_pipe_as_log_file_is_refused_without_blocking_or_chmod(tmp_path, slide_tree):
    pipe = tmp_path / "scan.log"
    os.mkfifo(pipe, 0o644)
    started = time.monotonic()
    result = run(
        ["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "--log-file", str(pipe)],
        expect=ExitStatus.USAGE,
    )
    assert time.monotonic() - started < 30
    assert "not a regular file" in result.log + result.output or "cannot open" in result.output
    assert stat.S_IMODE(pipe.stat().st_mode) == 0o644 and stat.S_ISFIFO(pipe.stat().st_mode)


def test_each_bad_name_in_a_file_list_is_one_error_row_not_a_failed_run(tmp_path, slide_tree):
    """Issue 22: a NUL byte or a name longer than the system allows aborted the whole run."""
    good = sorted(str(p) for p in image_files(slide_tree))
    too_long = str(tmp_path / ("x" * 300 + ".png"))
    listing = "\n".join([good[0], "bad\0name.png", too_long, good[1]]) + "\n"
    out = tmp_path / "r.csv"
    run(
        ["scan", "--files-from", "-", "--out", str(out)],
        stdin=listing,
        expect=ExitStatus.SOME_UNUSABLE,
    )
    table = read_rows(out)
    assert len(table) == 4
    assert [r["status"] for r in table] == ["ok", "error", "error", "ok"]
    assert "NUL byte" in table[1]["reason"] and "\\x00" in table[1]["path"]
    assert table[2]["reason"]  # file not found, or the name is too long: a reason either way


@pytest.mark.parametrize("with_state", [False, True])
def test_a_file_named_twice_is_one_row_with_or_without_state(tmp_path, slide_tree, with_state):
    """Issue 23: a file listed twice gave 2 rows without --state and 1 with it."""
    first, second = sorted(str(p) for p in image_files(slide_tree))[:2]
    relative = os.path.relpath(first)  # the same file, spelled another way
    listing = "\n".join([first, second, first, relative]) + "\n"
    out = tmp_path / "r.csv"
    state = ["--state", str(tmp_path / "state.db"), "--min-age", "0"] if with_state else []
    run(["scan", "--files-from", "-", "--out", str(out), *state], stdin=listing)
    assert [r["path"] for r in read_rows(out)] == [first, second]


def test_a_nul_separated_list_carries_names_with_newlines(tmp_path, slide_tree):
    source = sorted(image_files(slide_tree))[0]
    odd = slide_tree / "patient_A" / f"two\nlines{source.suffix}"
    shutil.copy(source, odd)
    out = tmp_path / "r.csv"
    listing = f"{source}\0{odd}\0"
    run(["scan", "--files-from", "-", "-0", "--out", str(out)], stdin=listing)
    table = read_rows(out)
    assert [r["status"] for r in table] == ["ok", "ok"]
    assert unescape_name(table[1]["path"]) == str(odd)


def test_listed_files_keep_same_named_folders_of_two_sites_apart(tmp_path, slide_tree):
    """Issue 22: 48 files of two sites became one slide 'p1', absorbing the other's blasts."""
    listed = []
    for site in ("siteA", "siteB"):
        folder = tmp_path / site / "slides" / "p1"
        folder.mkdir(parents=True)
        for source in sorted(image_files(slide_tree))[:3]:
            shutil.copy(source, folder / source.name)
            listed.append(str(folder / source.name))
    out = tmp_path / "r.csv"
    run(["scan", "--files-from", "-", "--out", str(out)], stdin="\n".join(listed) + "\n")
    slides = {r["slide"] for r in read_rows(out)}
    assert slides == {"siteA/slides/p1", "siteB/slides/p1"}


def test_a_pipe_as_anonymization_key_is_refused_at_once(tmp_path, slide_tree):
    pipe = tmp_path / "key"
    os.mkfifo(pipe)
    started = time.monotonic()
    result = run(
        [
            "scan",
            str(slide_tree),
            "--out",
            str(tmp_path / "r.csv"),
            "--anonymize-key-file",
            str(pipe),
        ],
        expect=ExitStatus.USAGE,
    )
    assert time.monotonic() - started < 30
    assert "not a regular file" in result.output + result.log


def test_names_with_line_separators_or_bidi_controls_are_escaped_everywhere(tmp_path, slide_tree):
    """Issue 22: U+2028/2029 break lines in some viewers; bidi overrides make a name display
    as another. Both are escaped, reversibly, in every output."""
    source = sorted(image_files(slide_tree))[0]
    tricky = [f"line\u2028break{source.suffix}", f"evil\u202egnp.{source.suffix[1:]}"]
    for name in tricky:
        shutil.copy(source, source.parent / name)
    out = tmp_path / "r.jsonl"
    run(["scan", str(slide_tree), "--out", str(out)])
    text = out.read_text() + out.with_name("r.summary.json").read_text()
    text += out.with_name("r.html").read_text()
    assert "\u2028" not in text and "\u202e" not in text
    paths = {unescape_name(json.loads(line)["path"]) for line in out.read_text().splitlines()}
    assert {str((source.parent / n).relative_to(slide_tree)) for n in tricky} <= paths


def test_a_dangling_link_says_so(tmp_path, slide_tree):
    (slide_tree / "patient_A" / "gone.png").symlink_to(slide_tree / "patient_A" / "nothing.png")
    out = tmp_path / "r.csv"
    run(["scan", str(slide_tree), "--out", str(out)], expect=ExitStatus.SOME_UNUSABLE)
    row = next(r for r in read_rows(out) if r["path"].endswith("gone.png"))
    assert row["reason"] == "dangling link: its target does not exist"


def test_the_ray_address_variable_does_not_break_local_scans(tmp_path, slide_tree, monkeypatch):
    monkeypatch.setenv("SMEARSCAN_RAY_ADDRESS", "127.0.0.1:1")
    run(["scan", str(slide_tree), "--out", str(tmp_path / "r.csv")])
    args = ["scan", str(slide_tree), "--out", str(tmp_path / "r.csv"), "--ray-address", "auto"]
    run(args, expect=ExitStatus.USAGE)


def test_model_info_escapes_and_caps_what_a_model_file_says(tmp_path):
    """Issue 22: `model info` printed raw terminal escape sequences and 200 MB strings."""
    model = _tampered(tmp_path, created="\x1b]0;owned\x07\x1b[31m" + "x" * 100_000)
    shown = run(["model", "info", "--model", str(model)]).output
    assert "\x1b" not in shown and "\x07" not in shown
    assert "more characters)" in shown and len(shown) < 20_000


def test_an_output_width_known_only_at_run_time_is_checked_before_any_report(tmp_path, slide_tree):
    """Issue 22: a graph whose output width is symbolic gave 4 columns under 2 labels and
    exit 0 with wrong columns; the width is now tried once when the model loads."""
    require_training_stack()
    import onnx
    from onnx import TensorProto, helper

    from smearscan.modelfile import default_model_path

    source = onnx.load(str(default_model_path()))
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 128, 128, 3])
    # [batch, 2] tiled by a count computed from the input's shape (128 // 64 = 2): no static
    # shape inference can tell the width before the graph runs
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0),
        helper.make_node("Slice", ["mean", "start", "end", "axis"], ["pair"]),
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Slice", ["shape", "one", "two", "zero"], ["side"]),
        helper.make_node("Div", ["side", "sixty_four"], ["times"]),
        helper.make_node("Concat", ["one", "times"], ["repeats"], axis=0),
        helper.make_node("Tile", ["pair", "repeats"], ["four"]),
        helper.make_node("Softmax", ["four"], ["probabilities"], axis=1),
    ]
    initializers = [
        helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor("start", TensorProto.INT64, [1], [0]),
        helper.make_tensor("end", TensorProto.INT64, [1], [2]),
        helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("two", TensorProto.INT64, [1], [2]),
        helper.make_tensor("sixty_four", TensorProto.INT64, [1], [64]),
    ]
    output = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", "k"])
    graph = helper.make_graph(nodes, "four", [image], [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = source.ir_version
    for entry in source.metadata_props:
        model.metadata_props.add(key=entry.key, value=entry.value)
    path = tmp_path / "four.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "r.csv"
    result = run(
        ["scan", str(slide_tree), "--out", str(out), "--model", str(path)], expect=ExitStatus.ERROR
    )
    assert "gives 4 outputs per crop for its 2 labels" in result.log
    assert not out.exists()


def test_a_full_disk_leaves_the_previous_report_set_whole(tmp_path, slide_tree):
    """Issue 22: a full disk while writing the HTML left the old page beside a new CSV and
    summary. On a real 140 kB filesystem (tmpfs): the first scan's set fits; the second's
    page does not, so the run fails and the first set stays, all three files of it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=140k", "tmpfs", str(disk)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        out = disk / "r.csv"
        # (a crop of examples/ is outside the tiny model's QC range: exit 3, reports written)
        run(
            ["scan", str(ROOT / "examples" / "slides"), "--out", str(out)],
            expect={0, ExitStatus.SOME_UNUSABLE},
        )
        before = {p.name: p.read_bytes() for p in disk.iterdir()}
        assert set(before) == {"r.csv", "r.summary.json", "r.html"}
        big = tmp_path / "big"
        for index in range(6):
            (big / f"s{index}").mkdir(parents=True)
            for source in fixture_images():
                shutil.copy(source, big / f"s{index}" / source.name)
        result = run(["scan", str(big), "--out", str(out)], expect=ExitStatus.ERROR)
        assert "No space left" in result.log or "space" in result.log.lower()
        assert {p.name: p.read_bytes() for p in disk.iterdir()} == before  # no temp either
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_walking_a_share_never_imports_the_image_libraries():
    """Discovery decides by name alone: a fresh interpreter that imports it has neither
    OpenCV nor numpy loaded (the suffix list lives with the other name rules)."""
    code = (
        "import sys, smearscan.discover as d\n"
        "assert d.is_image_name('a.WEBP') and not d.is_image_name('.bmp')\n"
        "print(sorted(m for m in ('cv2', 'numpy', 'PIL') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
