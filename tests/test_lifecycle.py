"""The servicer as operators run it (a `vlm-servicer serve` process): drain on SIGTERM, exit on engine death.

Each test starts its own process and engine (they end them), so these run last-ish and cost ~40 s each.
"""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures import ENGINE_ARGS, MODEL, request
from vlm_proto import vllm_engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine
START_TIMEOUT_S = 300


class ServicerProcess:
    def __init__(self, log_path, *flags, env=None):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "servicer.cli", "serve", "--model", str(MODEL), "--port", "0", *ENGINE_ARGS, *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.port = None

    def wait_ready(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(r"serving \S+ on 127\.0\.0\.1:(\d+)", self.log_path.read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                return self.port
            assert self.proc.poll() is None, f"servicer exited early:\n{self.tail()}"
            time.sleep(0.5)
        raise AssertionError(f"servicer not ready:\n{self.tail()}")

    def children(self) -> list[int]:
        """PIDs whose parent is our servicer (vLLM's engine core)."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = open(f"/proc/{entry}/stat").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(entry))
        return out

    def tail(self, n=60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


@pytest.fixture
def servicer_process(tmp_path):
    started = []

    def start(*flags, env=None):
        p = ServicerProcess(tmp_path / f"servicer{len(started)}.log", *flags, env=env)
        started.append(p)
        p.wait_ready()
        return p

    yield start
    for p in started:
        p.stop()


async def _health(channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status


async def test_sigterm_drains_in_flight_then_exits_cleanly(servicer_process, oracle):
    proc = await asyncio.to_thread(servicer_process, "--drain-timeout", "60")
    ids = oracle.chat_ids("Describe the image.")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.port}") as channel:
        stub = pb_grpc.VllmEngineStub(channel)
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        call = stub.Generate(request(ids, stream=True, temperature=0.0, max_tokens=300, ignore_eos=True))
        first = await call.read()
        proc.proc.send_signal(signal.SIGTERM)
        while await _health(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
            await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Generate(request(ids, max_tokens=2)):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        tokens = list(first.chunk.token_ids)
        while (r := await call.read()) != grpc.aio.EOF:
            if r.HasField("chunk"):
                tokens += r.chunk.token_ids
            else:
                last = r.complete
        assert (len(tokens), last.finish_reason) == (300, "length")  # the in-flight request finished
    assert await asyncio.to_thread(proc.proc.wait, 120) == 0, proc.tail()
    assert "shutting down (signal)" in proc.log_path.read_text()


async def test_engine_death_goes_not_serving_and_exits_non_zero(servicer_process, oracle):
    proc = await asyncio.to_thread(servicer_process)
    engine_pids = proc.children()
    assert engine_pids, "no engine core process found"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.port}") as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        for pid in engine_pids:
            os.kill(pid, signal.SIGKILL)
        code = await asyncio.to_thread(proc.proc.wait, 120)
    assert code != 0, proc.tail()
    assert "engine died" in proc.log_path.read_text()
