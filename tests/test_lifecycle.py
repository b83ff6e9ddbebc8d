"""The servicer as operators run it (a `vlm-servicer serve` process): drain on SIGTERM, exit on engine death.

Each test starts its own process and engine (they end them), so these run last-ish and cost ~40 s each.
"""

import asyncio
import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.processes import ServicerProcess
from tests.fixtures import request
from vlm_proto import vllm_engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine
START_TIMEOUT_S = 300


@pytest.fixture
def servicer_process(tmp_path):
    """Start a `vlm-servicer serve` on the tiny model (port 0) with extra flags and env; each is killed after."""
    started = []

    def start(*flags, env=None):
        p = ServicerProcess(tmp_path, f"servicer{len(started)}", flags=flags, env=env, port=0)
        started.append(p)
        p.start().wait_ready(time.monotonic() + START_TIMEOUT_S)
        return p

    yield start
    for p in started:
        p.kill()


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
