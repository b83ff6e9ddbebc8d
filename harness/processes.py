"""Real processes on loopback: free ports, HTTP and Prometheus reads, and server subprocesses with their logs
(a `vlm-servicer serve`, or any other server command such as the incumbent's)."""

import contextlib
import json
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny-qwen2-vl"  # random weights, built on first use (make model)
SHAPES_MODEL = ROOT / "models" / "tiny-qwen2-vl-shapes"  # trained, committed


def engine_args(kv_bytes: int = 1 << 30) -> tuple[str, ...]:
    """CPU-engine flags for the tiny model: float32 for HF parity, a small KV reservation."""
    return ("--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
            "--kv-cache-memory-bytes", str(kv_bytes), "--limit-mm-per-prompt", '{"image": 8, "video": 0}')


ENGINE_ARGS = engine_args()
REPLICA_ENGINE_ARGS = engine_args(1 << 29)  # several engines share a host: half the reservation each
HTTP_TIMEOUT_S = 300.0


_HANDED_OUT: set[int] = set()  # every port free_port has returned in this process


def free_port(span: int = 1) -> int:
    """A free loopback port P, with P + 1 .. P + span - 1 free too (vLLM's rank r binds a configured port + r),
    below the kernel's ephemeral range: a server binds its ports only once its engine is up, and meanwhile
    vLLM and UCX bind ephemeral ports of their own; one of those must never take it. Nor may another of our
    own picks: a port is free only until its process binds it, so two calls before that could return the same
    one (the likeliest cause of a replica's control port found taken once), so no port is handed out twice."""
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(10_000, max(10_001, low - span))
        if _HANDED_OUT.intersection(range(port, port + span)):
            continue
        try:
            for p in range(port, port + span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        _HANDED_OUT.update(range(port, port + span))
        return port


def http(method: str, url: str, body: dict | None = None, timeout: float = HTTP_TIMEOUT_S,
         headers: dict | None = None) -> tuple[int, str]:
    """(status, body text) of one JSON call; an HTTP error status is returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def http_json(method: str, url: str, body: dict | None = None, timeout: float = HTTP_TIMEOUT_S,
              headers: dict | None = None) -> tuple[int, dict | list | str]:
    """Like http(), with the body parsed where it is JSON."""
    status, raw = http(method, url, body, timeout, headers)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def scrape(url: str, timeout: float = 10) -> dict[tuple[str, tuple], float]:
    """Every sample on a Prometheus endpoint: (sample name, sorted label pairs) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=timeout).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(url: str, name: str, label: str = "") -> float:
    """The sum of a metric's samples, those with `label` (`source="x"`) if given; 0 when absent or unreachable."""
    try:
        samples = scrape(url, timeout=5)
    except OSError:
        return 0.0
    key, _, value = label.partition("=")
    want = (key, value.strip('"')) if label else None
    return sum(v for (n, labels), v in samples.items() if n == name and (want is None or want in labels))


class ServerProcess:
    """A server subprocess in a session of its own (its engine's processes are in it), logging to `log_path`.

    Each start appends to the log; readiness is read from what this start wrote."""

    def __init__(self, command: list[str], log_path: pathlib.Path, port: int, env: dict | None = None,
                 nice: int = 0, name: str = "server"):
        self.command, self.log_path, self.port = command, pathlib.Path(log_path), port
        self.env, self.nice, self.name = env, nice, name
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._offset = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"grpc://{self.host}"

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab" if self.starts else "wb") as log:
            self._offset = log.tell()
            self.proc = subprocess.Popen(self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
                                         preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None)
        self.starts += 1
        return self

    def log_since_start(self) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(self._offset)
            return log.read().decode(errors="replace")

    def wait_for_log(self, pattern: str, deadline: float) -> re.Match:
        """The first match of `pattern` in this start's log; fails when the process exits or the deadline passes."""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            found = re.search(pattern, self.log_since_start())
            if found:
                return found
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready:\n{self.tail()}")

    def wait_serving(self, timeout: float):
        """Poll the gRPC HealthCheck until healthy; returns the server's GetServerInfo."""
        import grpc

        from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.host) as channel:
            stub = pb_grpc.VllmEngineStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log_path}")
                with contextlib.suppress(grpc.RpcError):
                    if stub.HealthCheck(pb.HealthCheckRequest(), timeout=2).healthy:
                        return stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
                time.sleep(1)
        raise TimeoutError(f"{self.name} not healthy after {timeout:.0f} s; see {self.log_path}")

    def children(self) -> list[int]:
        """PIDs whose parent is this process (for a servicer: vLLM's engine core)."""
        out = []
        for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(stat.parent.name))
        return out

    def kill(self) -> None:
        """SIGKILL the whole session: the server and its engine die at once, as in a node loss."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)

    def stop(self, grace: float = 60) -> None:
        """SIGTERM the server (it drains and stops its engine), then SIGKILL whatever is left of its session."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self.kill()

    def tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class ServicerProcess(ServerProcess):
    """One `vlm-servicer serve` process (this checkout's code), as operators run it.

    `port`: None picks a free one, fixed for the object's life (a restart comes back at the same address);
    0 lets the servicer pick, read from its log. `flags` go last on the command line and `env` over the
    environment (both win). `kv_events` turns vLLM's publisher on, on ipc sockets beside the log
    (`log_dir/<log_name or name>.log`). `omp_bind` is the default VLLM_CPU_OMP_THREADS_BIND (the caller's
    environment wins): vLLM's CPU build pins every engine's compute threads to the same core unless told."""

    def __init__(self, log_dir: pathlib.Path, name: str = "servicer", model: pathlib.Path | str = MODEL,
                 engine_args=ENGINE_ARGS, flags=(), env: dict | None = None, port: int | None = None,
                 metrics: bool = False, kv_events: bool = False, omp_bind: str | None = None, nice: int = 0,
                 log_name: str | None = None):
        log_dir = pathlib.Path(log_dir)
        self.model, self.flags, self.extra_env = model, tuple(flags), dict(env or {})
        self.metrics_port = free_port() if metrics else None
        self.picks_port = port == 0
        port = free_port() if port is None else port
        command = [sys.executable, "-m", "servicer.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(port), *(("--metrics-port", str(self.metrics_port)) if metrics else ()),
                   *engine_args]
        if kv_events:
            events = {"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": f"ipc://{log_dir}/events", "replay_endpoint": f"ipc://{log_dir}/replay"}
            command += ["--kv-events-config", json.dumps(events)]
        command += self.flags
        environ = {**({"VLLM_CPU_OMP_THREADS_BIND": omp_bind} if omp_bind is not None else {}), **os.environ,
                   **self.extra_env}
        super().__init__(command, log_dir / f"{log_name or name}.log", port, environ, nice, name)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_ready(self, deadline: float) -> int:
        """Wait for the servicer's "serving ... on HOST:PORT" line (by `deadline`, monotonic); its port."""
        port = r"(\d+)" if self.picks_port else str(self.port)
        found = self.wait_for_log(rf"serving \S+ on 127\.0\.0\.1:{port}\b", deadline)
        if self.picks_port:
            self.port = int(found.group(1))
        return self.port

    def served(self) -> float:
        """Generate calls this process has finished (any status), from its own metrics."""
        return metric(self.metrics_url, "vlm_requests_total")


REPLICA_START_TIMEOUT_S = 420.0


def replica(index: int, workdir: pathlib.Path, **overrides) -> ServicerProcess:
    """Replica `index` of several on one host: its own folder, fixed ports, metrics and KV events on, its own
    core for the engine's threads; `overrides`: ServicerProcess arguments (model, flags, env, nice, ...)."""
    settings = {"engine_args": REPLICA_ENGINE_ARGS, "metrics": True, "kv_events": True,
                "omp_bind": str(index % (os.cpu_count() or 1)), "name": f"replica{index}"} | overrides
    # vLLM's workers must not fork a process that may already run threads.
    settings["env"] = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", **(overrides.get("env") or {})}
    return ServicerProcess(pathlib.Path(workdir) / f"replica{index}", **settings)


def start_replicas(count: int, workdir: pathlib.Path, configure=lambda index: {},
                   timeout: float = REPLICA_START_TIMEOUT_S) -> list[ServicerProcess]:
    """`count` replicas started at once, returned when all serve; `configure(index)`: that replica's overrides."""
    replicas = [replica(i, workdir, **configure(i)) for i in range(count)]
    for r in replicas:  # all engines load at once: ~1 min on 2 cores for three
        r.start()
    deadline = time.monotonic() + timeout
    try:
        for r in replicas:
            r.wait_ready(deadline)
    except BaseException:
        for r in replicas:
            r.kill()
        raise
    return replicas
