"""Replicas behind SMG: N `vlm-servicer serve` processes (each its own vLLM engine, KV events on) and one
`smg launch`, all real processes on loopback; multi-turn image chat traffic through the gateway.

    python -m bench.replicas [--replicas 3] [--conversations 12] [--turns 4] [--policies cache_aware round_robin]

For each policy it reports the share of prompt tokens served from the engines' prefix caches, the mean time
to the first streamed token, and how the conversations spread over the replicas; a single servicer on the same
traffic is the reference. Measured, not asserted (tests/test_replicas.py asserts only what cannot flake).
"""

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tiny-qwen2-vl"
ENGINE_ARGS = (
    "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
    "--kv-cache-memory-bytes", str(1 << 29), "--limit-mm-per-prompt", '{"image": 8, "video": 0}',
)
# SMG probes each worker every second and acts on two failures / one success: failover within seconds.
SMG_HEALTH = ("--health-check-interval-secs", "1", "--health-failure-threshold", "2", "--health-success-threshold", "1")
# SMG answers a PD leg that stays silent for --worker-wedge-secs (3 s by default) with 504. On 2 cores shared
# with the NIXL workers' spinning progress threads, a PD request here stalls now and then for seconds: 48
# requests in a row showed stalls of 2-31 s, in the prefill engine, before the decode engine and between the
# legs (its cause is not pinned down; a 30 s bound failed CI once). A bound, not a wait: a leg that says
# nothing for two minutes still fails.
SMG_PD_WEDGE = ("--worker-wedge-secs", "120")
# SMG's sticky sessions: every request carrying the same conversation id goes to one worker, the first chosen
# by the policy (a policy name with "+sticky" in the benchmark).
CONVERSATION_HEADER = "x-conversation-id"
STICKY = ("--routing-key-override", "--routing-key-headers", CONVERSATION_HEADER)
START_TIMEOUT_S = 420.0
HTTP_TIMEOUT_S = 300.0


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A replica binds its ports only once its engine
    is up, and meanwhile vLLM and UCX bind ephemeral ports of their own: one of those must never take it."""
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(10_000, max(10_001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def http(method: str, url: str, body: dict | None = None, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def metric(url: str, name: str, label: str = "") -> float:
    """The sum of a Prometheus metric's samples, those whose labels include `label` (`source="x"`) if given
    (0 when absent or unreachable)."""
    try:
        _, text = http("GET", url, timeout=5)
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ")
               and label in line.rsplit(" ", 1)[0])


class Replica:
    """One `vlm-servicer serve` process in its own process group (its engine core is in it), on fixed ports so
    that a restart comes back at the same address."""

    def __init__(self, index: int, workdir: pathlib.Path, model: pathlib.Path = MODEL, flags: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, nice: int = 0):
        self.index, self.model, self.flags, self.env, self.nice = index, model, flags, env or {}, nice
        self.port, self.metrics_port = free_port(), free_port()
        self.workdir = workdir / f"replica{index}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> pathlib.Path:
        return self.workdir / f"servicer{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        events = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": f"ipc://{self.workdir}/events", "replay_endpoint": f"ipc://{self.workdir}/replay"}
        cmd = [sys.executable, "-m", "servicer.cli", "serve", "--model", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), "--metrics-port", str(self.metrics_port), *ENGINE_ARGS,
               "--kv-events-config", json.dumps(events), *self.flags]
        # vLLM's CPU build pins every engine's compute threads to the same core by default; replicas sharing a
        # host each take their own (vLLM's VLLM_CPU_OMP_THREADS_BIND), or a restarting one starves for minutes.
        env = {"VLLM_CPU_OMP_THREADS_BIND": str(self.index % (os.cpu_count() or 1)), **os.environ,
               "VLLM_WORKER_MULTIPROC_METHOD": "spawn", **self.env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True,
                                         preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None)

    def wait_ready(self, deadline: float) -> None:
        pattern = re.compile(rf"serving \S+ on 127\.0\.0\.1:{self.port}\b")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.index} exited with {self.proc.returncode}:\n{self.tail()}")
            if pattern.search(self.log_path.read_text(errors="replace")):
                return
            time.sleep(0.5)
        raise RuntimeError(f"replica {self.index} not ready:\n{self.tail()}")

    def served(self) -> float:
        """Generate calls this process has finished (any status), from its own metrics."""
        return metric(f"http://127.0.0.1:{self.metrics_port}/metrics", "vlm_requests_total")

    def kill(self) -> None:
        """SIGKILL the whole process group: the servicer and its engine core die at once, as in a node loss."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_replicas(count: int, workdir: pathlib.Path, configure=lambda index: {}) -> list[Replica]:
    """`configure(index)`: Replica keyword arguments (flags, env) for that replica."""
    replicas = [Replica(i, workdir, **configure(i)) for i in range(count)]
    for r in replicas:  # all engines load at once: ~1 min on 2 cores for three
        r.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        for r in replicas:
            r.wait_ready(deadline)
    except BaseException:
        for r in replicas:
            r.kill()
        raise
    return replicas


@dataclass
class Gateway:
    url: str
    metrics_url: str
    proc: subprocess.Popen
    log: pathlib.Path
    model: str = ""

    def healthy_workers(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            status, body = http("GET", f"{self.url}/readiness", timeout=5)
            if status in (200, 503):
                return int(json.loads(body).get("healthy_workers", 0))
        return 0

    def workers(self) -> list[dict]:
        status, body = http("GET", f"{self.url}/workers", timeout=5)
        return json.loads(body)["workers"] if status == 200 else []

    def wait_healthy(self, count: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smg exited with {self.proc.returncode}:\n{self.tail()}")
            if self.healthy_workers() == count:
                return
            time.sleep(0.25)
        raise RuntimeError(f"smg: {self.healthy_workers()} healthy workers, not {count}:\n{self.tail()}\n"
                           f"{_diagnosis(self.proc.pid)}")

    def tail(self, lines: int = 60) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text(errors="replace"))
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


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


def smg_executable() -> str | None:
    return shutil.which("smg", path=os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")]))


def launch_gateway(replicas: list[Replica], policy: str, log: pathlib.Path, *flags: str,
                   model: pathlib.Path = MODEL, pd: bool = False) -> Gateway:
    """`smg launch` over the replicas' gRPC URLs with `policy` (`pd`: the first replica prefills, the second
    decodes); returns once all are healthy and it lists the model."""
    port, metrics_port = free_port(), free_port()
    workers = (["--pd-disaggregation", "--prefill", replicas[0].url, "--decode", replicas[1].url] if pd
               else ["--worker-urls", *(r.url for r in replicas), "--policy", policy])
    cmd = [smg_executable(), "launch", *workers,
           "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
           "--prometheus-port", str(metrics_port), "--model-path", str(model), *SMG_HEALTH, *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    gw = Gateway(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", proc, log)
    try:
        gw.wait_healthy(len(replicas))
        deadline = time.monotonic() + 60
        while not gw.model and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                gw.model = json.loads(http("GET", f"{gw.url}/v1/models", timeout=5)[1])["data"][0]["id"]
            time.sleep(0.25)
    except BaseException:
        gw.stop()
        raise
    return gw


# ---------------------------------------------------------------- traffic

def noise_image(seed: int, size: int = 448) -> str:
    """A deterministic image as a PNG data URL (448 px: 256 image tokens on the tiny model, two KV blocks)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((size, size), Image.NEAREST).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


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


@dataclass
class Turn:
    conversation: int
    turn: int
    ok: bool
    ttft_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


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


async def run_conversations(gw: Gateway, count: int, turns: int, seed: int, concurrency: int,
                            max_tokens: int = 4) -> list[Turn]:
    """`count` conversations interleaved round by round (turn t of every conversation before turn t + 1), at most
    `concurrency` requests at once."""
    conversations = [Conversation(i) for i in range(count)]
    gate = asyncio.Semaphore(concurrency)
    results: list[Turn] = []

    async def one(conv: Conversation, turn: int) -> None:
        async with gate:
            ok, text, ttft, usage, error = await asyncio.to_thread(
                chat_stream, gw, conv.next_turn(turn, seed), max_tokens, f"conversation-{seed}-{conv.index}")
        conv.answered(text if ok else "")
        details = usage.get("prompt_tokens_details") or {}
        results.append(Turn(conv.index, turn, ok, ttft, usage.get("prompt_tokens", 0),
                            details.get("cached_tokens", 0), error))

    for turn in range(turns):
        await asyncio.gather(*(one(c, turn) for c in conversations))
    return results


def summary(results: list[Turn]) -> dict:
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    later = [r for r in ok if r.turn > 0]  # turns whose history could be cached
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "cached_ratio": round(sum(r.cached_tokens for r in ok) / prompt, 3) if prompt else 0.0,
        "cached_ratio_later_turns": round(sum(r.cached_tokens for r in later) / max(1, sum(r.prompt_tokens for r in later)), 3),
        "mean_ttft_ms": round(1000 * sum(r.ttft_s for r in ok) / max(1, len(ok)), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=12, help="requests at once (12: every conversation)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin", "round_robin+sticky"])
    args = parser.parse_args(argv)
    if smg_executable() is None:
        sys.exit("the SMG gateway is not installed (pip install smg)")

    rows = []
    with tempfile.TemporaryDirectory(prefix="replicas-") as tmp:
        workdir = pathlib.Path(tmp)
        replicas = start_replicas(args.replicas, workdir)
        try:
            # Every run starts from empty caches on fresh seeds, so no run inherits another's blocks.
            plans = [("single servicer", replicas[:1], "round_robin")] + [
                (f"{args.replicas} replicas, {p}", replicas, p) for p in args.policies]
            for n, (label, members, policy) in enumerate(plans):
                name, _, sticky = policy.partition("+")
                gw = launch_gateway(members, name, workdir / f"smg{n}.log", *(STICKY if sticky else ()))
                try:
                    before = [r.served() for r in replicas]
                    results = asyncio.run(run_conversations(gw, args.conversations, args.turns,
                                                            args.seed + n, args.concurrency))
                    spread = [int(r.served() - b) for r, b in zip(replicas, before)]
                finally:
                    gw.stop()
                rows.append({"setup": label, **summary(results), "requests_per_replica": spread})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            for r in replicas:
                r.stop()
    print(f"\n{args.conversations} conversations x {args.turns} turns (one new 448 px image per turn), "
          f"concurrency {args.concurrency}, tiny Qwen2-VL on CPU")
    print(f"{'setup':<32} {'cached/prompt':>13} {'later turns':>11} {'mean TTFT ms':>12} {'failed':>6}  per replica")
    for row in rows:
        print(f"{row['setup']:<32} {row['cached_ratio']:>13.3f} {row['cached_ratio_later_turns']:>11.3f} "
              f"{row['mean_ttft_ms']:>12.1f} {row['failed']:>6}  {row['requests_per_replica']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
