"""The Ray engine on a real local Ray instance (one per test session) and on a two-raylet
cluster: the same report as the local engine, and a killed worker loses nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    IN_CI,
    ROOT,
    TINY_3CLASS,
    fixture_images,
    image_files,
    make_share,
    rows,
    run,
    smearscan,
    start_smearscan,
)

from smearscan.exitstatus import ExitStatus

if not IN_CI:
    pytest.importorskip("ray", reason="Ray is the [ray] extra")
pytestmark = pytest.mark.ray


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert (x["label"], x["status"], x["reason"]) == (y["label"], y["status"], y["reason"])
        for key in ("p_all", "p_hem"):
            if x[key]:
                assert abs(float(x[key]) - float(y[key])) <= 1e-5


def test_the_ray_engine_reports_what_the_local_engine_reports(ray_instance, tmp_path, messy_tree):
    local, on_ray = tmp_path / "local.csv", tmp_path / "ray.csv"
    run(["scan", str(messy_tree), "--out", str(local)], expect=ExitStatus.SOME_UNUSABLE)
    run(
        ["scan", str(messy_tree), "--out", str(on_ray), "--engine", "ray"],
        expect=ExitStatus.SOME_UNUSABLE,
    )
    _same_rows(rows(local), rows(on_ray))
    summary = json.loads(on_ray.with_name("ray.summary.json").read_text())
    assert summary["engine"]["engine"] == "ray" and summary["engine"]["cpus"] == 2
    local_summary = json.loads(local.with_name("local.summary.json").read_text())
    assert summary["slides"] == local_summary["slides"]
    assert "ray" in on_ray.with_name("ray.html").read_text()


def test_the_ray_engine_with_state_sends_only_new_files(ray_instance, tmp_path, slide_tree):
    state = tmp_path / "state.db"
    out = tmp_path / "r.csv"
    args = [
        "scan",
        str(slide_tree),
        "--out",
        str(out),
        "--state",
        str(state),
        "--min-age",
        "0",
        "--engine",
        "ray",
    ]
    run(args)
    extra = slide_tree / "patient_C"
    extra.mkdir()
    shutil.copy(fixture_images()[5], extra / "new.webp")
    run(args)
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["incremental"]["reused_from_earlier_runs"] == 8
    assert len(rows(out)) == 9


def test_the_ray_path_plans_once_and_warns_once(ray_instance, tmp_path, slide_tree):
    """Issue 23.4: the Ray path planned the run twice (its QC warning printed twice)."""
    out = tmp_path / "r.csv"
    result = run(
        ["scan", str(slide_tree), "--out", str(out), "--model", str(TINY_3CLASS), "--engine", "ray"]
    )
    assert result.log.count("quality control is off") == 1, result.log
    assert len(rows(out)) == len(image_files(slide_tree))


def _ray_workers() -> list[int]:
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [
        int(line.split()[0])
        for line in listing.splitlines()
        if "ray::" in line and ("MapBatches" in line or "MapWorker" in line)
    ]


def test_a_killed_worker_loses_and_duplicates_nothing(ray_instance, tmp_path):
    from smearscan.engines.ray import RayEngine
    from smearscan.inference import load_classifier
    from smearscan.runner import ScanRequest, plan

    root = make_share(tmp_path, 24)
    classifier = load_classifier(device="cpu")
    request = ScanRequest(inputs=[root])
    engine = RayEngine(plan(request, classifier).config, classifier, batch_size=4)
    results: list = []
    killed: list[int] = []
    results_when_killed: list[int] = []
    first_result = threading.Event()

    def killer() -> None:
        """Once a first result is back, the workers hold work in flight: kill one of them."""
        if not first_result.wait(120):
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for worker in _ray_workers():
                try:
                    os.kill(worker, signal.SIGKILL)
                except ProcessLookupError:  # it finished its share meanwhile: try another
                    continue
                killed.append(worker)
                results_when_killed.append(len(results))
                break
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        for result in engine.run(request.found()):
            results.append(result)
            first_result.set()
    finally:
        first_result.set()
        thread.join()
    assert killed, "no Ray worker process was found to kill"
    assert results_when_killed[0] < 576, "the worker was killed after the last result"
    paths = [r.path for r in results]
    assert len(paths) == len(set(paths)) == len(image_files(root)) == 576
    assert all(r.status == "ok" for r in results)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_cluster(marker: str) -> None:
    """Kill the processes of the cluster whose command lines name ``marker`` (its temp
    folder): ``ray stop`` would also stop the session's own Ray instance."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in command and int(entry.name) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


@contextlib.contextmanager
def _cluster(worker_nodes: int = 0):
    """A Ray cluster of its own (a head of one CPU, and ``worker_nodes`` raylets of one CPU
    each), started with ``ray start`` as a lab would; yields its address, the environment
    its clients need, and its temp folder (which names its processes)."""
    ray_cli = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = Path(f"/tmp/smearscan-ray-{port}")  # short: Ray's socket paths have a length limit
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(ROOT),
        "RAY_AUTH_MODE": "disabled",
    }
    address = f"127.0.0.1:{port}"
    head_cpus = 1 if worker_nodes else 2
    try:
        head = subprocess.run(
            [
                str(ray_cli),
                "start",
                "--head",
                f"--port={port}",
                f"--num-cpus={head_cpus}",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={temp}",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert head.returncode == 0, head.stderr[-2000:]
        for _ in range(worker_nodes):
            worker = subprocess.run(
                [str(ray_cli), "start", f"--address={address}", "--num-cpus=1"],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
            )
            assert worker.returncode == 0, worker.stderr[-2000:]
        yield address, env, temp
    finally:
        _stop_cluster(str(temp))
        _stop_cluster(f"--gcs-address={address}")
        _stop_cluster(f"--address={address}")
        shutil.rmtree(temp, ignore_errors=True)


def _scan_on(address: str, root: Path, out: Path) -> list[str]:
    return ["scan", str(root), "--out", str(out), "--engine", "ray", "--ray-address", address]


def test_a_two_raylet_cluster_gives_the_local_report(tmp_path, slide_tree):
    with _cluster(worker_nodes=1) as (address, env, _):
        local, clustered = tmp_path / "local.csv", tmp_path / "cluster.csv"
        run(["scan", str(slide_tree), "--out", str(local)])
        done = smearscan(*_scan_on(address, slide_tree, clustered), env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        _same_rows(rows(local), rows(clustered))
        summary = json.loads(clustered.with_name("cluster.summary.json").read_text())
        assert summary["engine"]["nodes"] == 2 and summary["engine"]["cpus"] == 2


def test_a_raylet_killed_mid_run_ends_the_scan_with_a_reason(tmp_path):
    """Issue 22.4: a raylet killed mid-run made the scan exit 1 with no message (Ray ends
    the driver from C++). Now: the reason, the final line, exit 1, and no report."""
    from smearscan.engines.ray import raylet_pids

    root = make_share(tmp_path, 48)
    out = tmp_path / "r.csv"
    with _cluster() as (address, env, temp):
        process = start_smearscan(
            *_scan_on(address, root, out), "--log-interval", "0", env=env, stdout=subprocess.DEVNULL
        )
        try:
            seen = ""
            deadline = time.monotonic() + 120
            assert process.stderr is not None  # piped
            while "progress:" not in seen and time.monotonic() < deadline:
                line = process.stderr.readline()
                if not line:
                    break
                seen += line
            assert "progress:" in seen, seen[-2000:]
            raylets = raylet_pids(lambda argument: str(temp).encode() in argument)
            assert len(raylets) == 1
            os.kill(raylets[0], signal.SIGKILL)
            _, rest = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    stderr = seen + rest
    assert process.returncode == ExitStatus.ERROR, stderr[-3000:]
    assert f"raylet (pid {raylets[0]}) died" in stderr
    final = stderr.strip().splitlines()[-1]
    assert final.startswith("smearscan failed (cluster lost; no report written)"), final
    assert not out.exists() and not out.with_name("r.summary.json").exists()


def test_engine_ray_without_ray_says_how_to_install_it(tmp_path, slide_tree):
    blocker = tmp_path / "no_ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('simulated: Ray not installed')\n")
    python_path = f"{blocker.parent}{os.pathsep}{ROOT}"
    done = smearscan(
        "scan",
        str(slide_tree),
        "--out",
        str(tmp_path / "r.csv"),
        "--engine",
        "ray",
        env={"PYTHONPATH": python_path},
        timeout=120,
    )
    assert done.returncode == ExitStatus.USAGE, done.stderr
    assert "pip install 'smearscan[ray]'" in done.stderr
    assert not (tmp_path / "r.csv").exists()


def test_an_address_where_nothing_listens_fails_fast_with_a_reason(tmp_path, slide_tree):
    """Issue 22: --ray-address to a closed port retried for 400 s and ended without the
    final line."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens
    started = time.monotonic()
    done = smearscan(*_scan_on(f"127.0.0.1:{port}", slide_tree, tmp_path / "r.csv"), timeout=120)
    assert done.returncode == ExitStatus.ERROR, done.stderr
    assert time.monotonic() - started < 60
    assert "cannot reach the Ray cluster" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("smearscan failed")
