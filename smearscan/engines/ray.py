"""The Ray engine: the same stages on a Ray cluster, through Ray Data (the ``[ray]`` extra).

The driver (this process) discovers files and applies the ``--state`` selection, so only new
or changed files reach the cluster. The work items become a Ray Dataset; decoding, quality
control and preprocessing run as ``map_batches`` tasks on CPU workers; inference runs in an
actor pool (one ONNX session per actor, a GPU each when the cluster has GPUs); results
stream back to the driver in input order (``preserve_order``) and go to the same sinks.

Every node must read the same paths (the share mounted at the same place on each node, or a
shared filesystem); the engine checks that a worker can read the first file before it
starts. Ray Data retries tasks and restarts actors whose worker dies (its defaults for
actors: unlimited restarts and task retries); the driver keeps the first result per item and
runs any item the cluster lost once more, so a dead worker neither loses nor duplicates a
row. When the raylet of the driver's own node dies, Ray ends the driver process at once
(exit 1, nothing said); a watcher notices first and hands the reason to ``on_lost``, which
ends the run with a message and the final line.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from smearscan.discover import Found
from smearscan.engines import EngineError, EngineMissing
from smearscan.qc import QualityControl
from smearscan.results import STATUS_ERROR, STATUS_OK, CellResult
from smearscan.stages import StageConfig, attach_answers, prepare_item

log = logging.getLogger(__name__)

#: Items per Ray Data block: small enough to spread over the workers early.
ITEMS_PER_BLOCK = 64
FIELDS = ("path", "rel", "slide", "problem", "root")


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the [ray] extra brings ray[data])
    except ImportError:
        raise EngineMissing("--engine ray needs Ray Data: pip install 'smearscan[ray]'") from None
    return ray


def _found(row: dict, index: int) -> Found:
    return Found(
        str(row["path"][index]),
        str(row["rel"][index]),
        str(row["slide"][index]),
        str(row["problem"][index]),
        str(row["root"][index]) or None,
    )


def prepare_batch(batch: dict, config: StageConfig) -> dict:
    """Ray Data task: decode, check and preprocess a batch of work items. Unusable items
    carry a zero input and their status; the predictor skips them."""
    size = config.recipe.input_size
    count = len(batch["index"])
    inputs = np.zeros((count, size, size, 3), np.float32)
    status, reason = [], []
    file_size, mtime = np.zeros(count, np.int64), np.zeros(count, np.int64)
    for i in range(count):
        result, model_input = prepare_item(_found(batch, i), config)
        status.append(result.status)
        reason.append(result.reason)
        file_size[i], mtime[i] = result.size, result.mtime_ns
        if model_input is not None:
            inputs[i] = model_input
    return {
        **batch,
        "input": inputs,
        "status": np.array(status, dtype=object),
        "reason": np.array(reason, dtype=object),
        "size": file_size,
        "mtime_ns": mtime,
    }


class RayPredictor:
    """Ray Data callable class: loads the model once per actor, classifies the batches the
    CPU stage prepared (only their usable rows)."""

    def __init__(
        self, model_path: str, tta: bool, pad_to: int, use_gpu: bool, qc: QualityControl | None
    ) -> None:
        from smearscan.inference import BatchPredictor

        self.qc = qc
        self.predictor = BatchPredictor(
            model_path,
            device="cuda" if use_gpu else "cpu",
            tta=tta,
            pad_to=pad_to,
            distances=qc is not None and qc.max_embedding_distance is not None,
        )
        self.classes = len(self.predictor.classifier.labels)

    def __call__(self, batch: dict) -> dict:
        count = len(batch["index"])
        results = [
            CellResult("", "", str(s), str(r))
            for s, r in zip(batch["status"], batch["reason"], strict=True)
        ]
        usable = [i for i, r in enumerate(results) if r.status == STATUS_OK]
        if usable:
            answers = self.predictor(np.stack([batch["input"][i] for i in usable]))
            attach_answers(results, [r.status == STATUS_OK for r in results], answers, self.qc)
        probabilities = np.full((count, self.classes), np.nan)
        for i, result in enumerate(results):
            if result.probabilities:
                probabilities[i] = result.probabilities
        out = {key: value for key, value in batch.items() if key != "input"}
        out["status"] = np.array([r.status for r in results], dtype=object)
        out["reason"] = np.array([r.reason for r in results], dtype=object)
        out["probabilities"] = probabilities
        return out


#: Seconds to wait for a cluster's address to answer before calling it unreachable (Ray
#: itself retries for minutes, which a nightly run must not spend on a dead head node).
CONNECT_TIMEOUT = 10.0


def reachable_or_fail(address: str | None, timeout: float = CONNECT_TIMEOUT) -> None:
    """A ``host:port`` or ``ray://host:port`` address must accept a TCP connection within
    ``timeout`` seconds; raises :class:`EngineError` with the reason otherwise. ``None`` (a
    local instance) and ``auto`` (found by Ray itself) are not checked."""
    if not address or address == "auto":
        return
    target = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise EngineError(f"Ray address {address!r} is not host:port or ray://host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as exc:
        raise EngineError(
            f"cannot reach the Ray cluster at {address}: "
            f"{exc.strerror or exc} (nothing answered within {timeout:g} s)"
        ) from None


#: How often the watcher looks at the local raylet, in seconds (Ray itself gives up on a
#: dead raylet after a few seconds of retries).
RAYLET_POLL_SECONDS = 0.2


def raylet_pids(argument: Callable[[bytes], bool], proc: Path = Path("/proc")) -> list[int]:
    """The raylet processes with an argument for which ``argument`` holds, found among the
    processes' command lines (Linux); none where there is no /proc."""
    found: list[int] = []
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arguments[0].endswith(b"raylet") and any(argument(a) for a in arguments[1:]):
            found.append(int(entry.name))
    return found


def local_raylet_pid(socket_name: str) -> int | None:
    """The pid of the raylet that serves this driver, found by its socket name."""
    flag = f"--raylet_socket_name={socket_name}".encode()
    found = raylet_pids(lambda argument: argument == flag)
    return found[0] if found else None


def process_alive(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether ``pid`` runs: a zombie (a killed child not yet reaped) counts as dead."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _exit_lost(reason: str) -> None:
    log.error("%s; no report written", reason)
    os._exit(1)


class RayletWatch:
    """A daemon thread that calls ``on_lost(reason)`` once the raylet ``pid`` is gone.

    Ray ends the driver with ``_exit(1)`` a few seconds after its local raylet dies, from
    C++, so no exception ever reaches the scan; ``on_lost`` must end the run itself."""

    def __init__(self, pid: int, on_lost: Callable[[str], None], interval: float) -> None:
        self.pid, self.on_lost, self.interval = pid, on_lost, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="raylet-watch", daemon=True)

    def __enter__(self) -> RayletWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()

    def _watch(self) -> None:
        while not self.done.wait(self.interval):
            if not process_alive(self.pid):
                self.on_lost(
                    f"the Ray cluster was lost mid-run: this node's raylet (pid {self.pid}) "
                    "died, and Ray ends the driver with it"
                )
                return


class RayEngine:
    """Ray Data over a cluster (or a local Ray instance when no address is given)."""

    name = "ray"

    def __init__(
        self,
        config: StageConfig,
        classifier,
        batch_size: int = 32,
        tta: bool = False,
        address: str | None = None,
        on_lost: Callable[[str], None] = _exit_lost,
    ) -> None:
        self.ray = import_ray()
        self.on_lost = on_lost
        self.config, self.batch_size, self.tta = config, max(1, batch_size), tta
        self.model_path = str(classifier.info.path)
        self.unfinished_slides: set[str] = set()
        self.stage_times = None  # its stages run in remote tasks: not profiled
        # Ray Data's own progress lines would drown the scan's log and get through -q
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        # Ray core's C++ log lines go straight to stderr; failures still raise here
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        if not self.ray.is_initialized():
            reachable_or_fail(address)
            try:
                self.ray.init(
                    address=address,
                    include_dashboard=False,
                    log_to_driver=False,
                    ignore_reinit_error=True,
                    logging_level=logging.WARNING,
                )
            except Exception as exc:  # noqa: BLE001  (ray raises many kinds)
                raise EngineError(
                    f"cannot start or join Ray at {address or 'local'}: {exc}"
                ) from None
        resources = self.ray.cluster_resources()
        self.cpus = int(resources.get("CPU", 1))
        self.gpus = int(resources.get("GPU", 0))
        self.nodes = len([n for n in self.ray.nodes() if n.get("Alive")])
        from ray._private import worker as ray_worker

        node = getattr(ray_worker.global_worker, "node", None)  # None for a ray:// client
        socket_name = getattr(node, "raylet_socket_name", None)
        self.raylet_pid = local_raylet_pid(socket_name) if socket_name else None

    def describe(self) -> dict:
        return {"engine": self.name, "nodes": self.nodes, "cpus": self.cpus, "gpus": self.gpus}

    def _actors(self) -> tuple[int, float]:
        """Inference actors and the CPUs each holds: one per GPU; on CPU-only clusters half
        the CPUs (at least one), so the decode tasks always have CPUs left. A fractional-CPU
        actor beside a CPU stage's own pool stalled a 2-CPU cluster for 15 minutes."""
        if self.gpus:
            return self.gpus, 1.0
        return max(1, self.cpus // 2), 1.0

    def check_access(self, first: Found) -> None:
        """Fail fast when a worker cannot read what the driver found (mounts differ)."""
        if first.problem:
            return
        ray = self.ray

        @ray.remote(num_cpus=0)
        def readable(path: str) -> str:
            import os

            try:
                with open(path, "rb") as handle:
                    handle.read(1)
                return ""
            except OSError as exc:
                return f"{exc.strerror} on {os.uname().nodename}"

        problem = ray.get(readable.remote(first.path))
        if problem:
            raise EngineError(
                f"a Ray worker cannot read {first.path} ({problem}): mount the share at the same "
                "path on every node"
            )

    def _dataset(self, items: list[Found]):
        from ray.data import ActorPoolStrategy, DataContext

        context = DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        rows = [
            {"index": i, **{f: getattr(item, f) or "" for f in FIELDS}}
            for i, item in enumerate(items)
        ]
        blocks = max(1, min(len(rows) // ITEMS_PER_BLOCK, 4 * self.cpus))
        actors, actor_cpus = self._actors()
        return (
            self.ray.data.from_items(rows, override_num_blocks=blocks)
            .map_batches(
                prepare_batch,
                fn_kwargs={"config": self.config},
                batch_size=self.batch_size,
                batch_format="numpy",
                num_cpus=1,
            )
            .map_batches(
                RayPredictor,
                fn_constructor_kwargs={
                    "model_path": self.model_path,
                    "tta": self.tta,
                    "pad_to": self.batch_size,
                    "use_gpu": bool(self.gpus),
                    "qc": self.config.qc,
                },
                compute=ActorPoolStrategy(size=actors),
                batch_size=self.batch_size,
                batch_format="numpy",
                num_cpus=actor_cpus,
                num_gpus=1 if self.gpus else 0,
            )
        )

    def run(
        self, items: Iterable[Found], stop: threading.Event | None = None
    ) -> Iterator[CellResult]:
        """Classify every item on the cluster, yielding results in input order."""
        work = list(items)
        if not work:
            return
        self.check_access(work[0])
        if self.raylet_pid is None:  # a Ray client (ray://) or no /proc: errors raise instead
            yield from self._run(work, stop)
            return
        with RayletWatch(self.raylet_pid, self.on_lost, RAYLET_POLL_SECONDS):
            yield from self._run(work, stop)

    def _run(self, work: list[Found], stop: threading.Event | None) -> Iterator[CellResult]:
        done: dict[int, CellResult] = {}
        attempts = 0
        next_index = 0
        while next_index < len(work) and attempts < 2:
            attempts += 1
            missing = [i for i in range(next_index, len(work)) if i not in done]
            subset = [work[i] for i in missing]
            for batch in self._batches(subset):
                for row, local in enumerate(batch["index"]):
                    index = missing[int(local)]
                    if index in done:
                        continue  # a retried task's second answer: keep the first
                    done[index] = self._result(work[index], batch, row)
                while next_index in done:
                    yield done.pop(next_index)
                    next_index += 1
                if stop is not None and stop.is_set():
                    self.unfinished_slides.update(
                        work[i].slide for i in range(next_index, len(work))[:1]
                    )
                    return
        for index in range(next_index, len(work)):  # lost twice: say so, never drop it
            item = work[index]
            yield done.get(index) or CellResult(
                item.rel,
                item.slide,
                STATUS_ERROR,
                "not processed by the cluster (worker lost twice); rescanned next run",
                file=item.path,
            )

    def _batches(self, subset: list[Found]) -> Iterator[dict]:
        """The dataset's batches; a cluster that fails under them is an error with a reason."""
        try:
            yield from self._dataset(subset).iter_batches(batch_size=None, batch_format="numpy")
        except (self.ray.exceptions.RayError, ConnectionError) as exc:
            raise EngineError(f"the Ray cluster failed mid-run: {exc}") from None

    @staticmethod
    def _result(item: Found, batch: dict, row: int) -> CellResult:
        status = str(batch["status"][row])
        probabilities = batch["probabilities"][row]
        return CellResult(
            item.rel,
            item.slide,
            status,
            str(batch["reason"][row]),
            [float(p) for p in probabilities] if status == STATUS_OK else [],
            int(batch["size"][row]),
            int(batch["mtime_ns"][row]),
            item.path,
        )
