"""The real SMG gateway (`smg launch`) as tests and benchmarks start it, and chat traffic through it."""

import asyncio
import contextlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from harness.images import noise_image
from harness.processes import HTTP_TIMEOUT_S, MODEL, free_port, http, http_json, metric

# SMG probes each worker every second and acts on two failures / one success: failover within seconds.
SMG_HEALTH = ("--health-check-interval-secs", "1", "--health-failure-threshold", "2", "--health-success-threshold", "1")
# SMG answers a PD leg that stays silent for --worker-wedge-secs (3 s by default) with 504. On 2 cores shared
# with the NIXL workers' spinning progress threads, a PD request here stalls now and then for seconds: 48
# requests in a row showed stalls of 2-31 s, in the prefill engine, before the decode engine and between the
# legs (its cause is not pinned down; a 30 s bound failed CI once). A bound, not a wait: a leg that says
# nothing for two minutes still fails.
SMG_PD_WEDGE = ("--worker-wedge-secs", "120")
# SMG's sticky sessions: every request carrying the same conversation id goes to one worker, the first chosen
# by the policy.
CONVERSATION_HEADER = "x-conversation-id"
STICKY = ("--routing-key-override", "--routing-key-headers", CONVERSATION_HEADER)
READY_TIMEOUT_S = 180.0  # a 2-core machine shared with other runs
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def smg_executable() -> str | None:
    """The `smg` next to this Python (the venv's), else on PATH."""
    return shutil.which("smg", path=os.pathsep.join([str(pathlib.Path(sys.executable).parent),
                                                     os.environ.get("PATH", "")]))


@dataclass
class Gateway:
    url: str
    metrics_url: str
    proc: subprocess.Popen
    log: pathlib.Path
    model: str = ""

    def healthy_workers(self) -> int:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            status, body = http_json("GET", f"{self.url}/readiness", timeout=5)
            if status in (200, 503):
                return int(body.get("healthy_workers", 0))
        return 0

    def workers(self) -> list[dict]:
        status, body = http_json("GET", f"{self.url}/workers", timeout=5)
        return body["workers"] if status == 200 else []

    def add_worker(self, url: str, labels: dict | None = None, api_key: str | None = None) -> tuple[int, dict | str]:
        """Register a worker at run time (`POST /workers`), e.g. with an `rl.control_url` label."""
        body = {"url": url, **({"labels": labels} if labels else {}), **({"api_key": api_key} if api_key else {})}
        return http_json("POST", f"{self.url}/workers", body, timeout=30)

    def metric(self, name: str, label: str = "") -> float:
        """The sum of a metric's samples on SMG's Prometheus endpoint (0 when absent)."""
        return metric(self.metrics_url, name, label)

    def wait_ready(self, workers: int, timeout: float = READY_TIMEOUT_S) -> None:
        """Until `workers` workers are healthy and, with any, the gateway lists their model; with none, until it
        answers at all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smg exited with {self.proc.returncode}:\n{self.tail()}")
            if workers == 0:
                with contextlib.suppress(OSError):
                    http("GET", f"{self.url}/liveness", timeout=5)
                    return
            elif self.healthy_workers() >= workers:
                with contextlib.suppress(OSError, ValueError, KeyError, IndexError, TypeError):
                    self.model = http_json("GET", f"{self.url}/v1/models", timeout=5)[1]["data"][0]["id"]
                    return
            time.sleep(0.25)
        raise RuntimeError(f"smg: {self.healthy_workers()} healthy workers, not {workers}, or no model after "
                           f"{timeout:.0f} s:\n{self.tail()}\n{_diagnosis(self.proc.pid)}")

    def tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(ANSI.sub("", self.log.read_text(errors="replace")).splitlines()[-lines:])

    @contextlib.contextmanager
    def dump_log_on_failure(self):
        try:
            yield
        except BaseException:
            print(f"\n===== SMG gateway log (last lines of {self.log}) =====\n{self.tail(150)}\n"
                  "===== end of SMG log =====")
            raise

    async def chat(self, body: dict) -> tuple[int, dict | str]:
        return await asyncio.to_thread(http_json, "POST", f"{self.url}/v1/chat/completions", body)

    async def chat_stream(self, body: dict) -> tuple[int, list[dict] | str]:
        """POST with "stream": true; the parsed `data:` events before [DONE]."""
        status, raw = await asyncio.to_thread(http, "POST", f"{self.url}/v1/chat/completions", {**body, "stream": True})
        if status != 200:
            return status, raw
        lines = [line.removeprefix("data:").strip() for line in raw.splitlines() if line.startswith("data:")]
        return status, [json.loads(line) for line in lines if line != "[DONE]"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def launch_gateway(worker_urls: list[str], log: pathlib.Path, *flags: str, policy: str | None = None,
                   model: pathlib.Path | str | None = MODEL, pd: bool = False, workers: int | None = None,
                   health: tuple[str, ...] = SMG_HEALTH, env: dict | None = None,
                   timeout: float = READY_TIMEOUT_S, port: int | None = None) -> Gateway:
    """`smg launch` over `worker_urls` (none: workers come later, `POST /workers`); `pd`: the first URL prefills,
    the second decodes. `flags` go last, as they are; without `model` SMG takes it from a worker; `port`: a port
    chosen beforehand (workers told where the gateway will be). Returns once
    `workers` (default: one per URL) are healthy and it lists the model."""
    port, metrics_port = port or free_port(), free_port()
    if pd:
        routing = ["--pd-disaggregation", "--prefill", worker_urls[0], "--decode", worker_urls[1]]
    else:
        routing = (["--worker-urls", *worker_urls] if worker_urls else []) + (["--policy", policy] if policy else [])
    cmd = [smg_executable(), "launch", *routing, "--host", "127.0.0.1", "--port", str(port),
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
           *(("--model-path", str(model)) if model else ()), *health, *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
    gw = Gateway(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", proc, pathlib.Path(log))
    try:
        gw.wait_ready(len(worker_urls) if workers is None else workers, timeout)
    except BaseException:
        gw.stop()
        raise
    return gw


def _diagnosis(pid: int) -> str:
    """What a silent process is doing, and what else holds the CPUs (for a start that timed out)."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        state = next(line for line in status.splitlines() if line.startswith("State"))
        wchan = pathlib.Path(f"/proc/{pid}/wchan").read_text()
    except (OSError, StopIteration):
        state, wchan = "gone", "-"
    busy = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,stat,etime,comm", "--sort=-pcpu"], capture_output=True,
                          text=True).stdout.splitlines()[:12]
    return f"pid {pid}: {state}, wchan {wchan}; load {os.getloadavg()}; busiest processes:\n" + "\n".join(busy)


# ---------------------------------------------------------------- chat traffic

@dataclass
class Conversation:
    """A chat client's conversation: each turn adds a user message with a new image and resends the history."""

    index: int
    messages: list[dict] = field(default_factory=list)

    def next_turn(self, turn: int, seed: int) -> list[dict]:
        words = random.Random(seed * 1000 + self.index * 10 + turn).choices(
            ["red", "blue", "shape", "corner", "light", "edge", "pattern", "noise", "left", "right"], k=8)
        self.messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": noise_image(seed * 100_000 + self.index * 100 + turn)}},
            {"type": "text", "text": f"Conversation {self.index}, turn {turn}: " + " ".join(words)}]})
        return list(self.messages)

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def chat_stream(gw: Gateway, messages: list[dict], max_tokens: int,
                conversation: str = "") -> tuple[bool, str, float, dict, str]:
    """One streamed chat completion: (ok, text, seconds to the first content chunk, usage, error). The
    conversation's id travels in the header a sticky-session gateway keys on (STICKY)."""
    body = {"model": gw.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Content-Type": "application/json"} | ({CONVERSATION_HEADER: conversation} if conversation else {})
    req = urllib.request.Request(f"{gw.url}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers=headers)
    start = time.perf_counter()
    ttft, text, usage = 0.0, [], {}
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            for raw in resp:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    return False, "", 0.0, {}, json.dumps(event["error"])[:300]
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        ttft = ttft or time.perf_counter() - start
                        text.append(choice["delta"]["content"])
                usage = event.get("usage") or usage
    except urllib.error.HTTPError as exc:
        return False, "", 0.0, {}, f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}"
    except (OSError, ValueError) as exc:
        return False, "", 0.0, {}, f"{type(exc).__name__}: {exc}"
    return True, "".join(text), ttft or time.perf_counter() - start, usage, ""
