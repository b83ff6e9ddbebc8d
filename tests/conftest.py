"""One real vLLM CPU engine and one real gRPC server per test session, on loopback port 0."""

import contextlib
import json
import os
from dataclasses import dataclass, field

import grpc
import pytest
import pytest_asyncio

from tests.fixtures import ENGINE_ARGS, MODEL, SHAPES_MODEL
from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

# vLLM's worker processes must not fork a process that already runs gRPC threads.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

MAX_MESSAGE = 512 * 1024 * 1024


@pytest.fixture(scope="session")
def model_path() -> str:
    if not (MODEL / "RECIPE").exists():
        pytest.fail(f"tiny model missing at {MODEL}: run `make model` (make test does)")
    return str(MODEL)


async def _start_engine(path, engine_args=ENGINE_ARGS):
    from engine_adapter.engine import parse_engine_args, start_engine

    return await start_engine(parse_engine_args(str(path), list(engine_args)))


# The session engine also runs vLLM's profiler (idle until StartProfile), generation-config defaults a
# gateway reads from GetModelInfo, and vLLM's KV-event publisher (on local ipc sockets).
GENERATION_DEFAULTS = {"top_k": 20, "top_p": 0.9}


@pytest.fixture(scope="session")
def profile_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("profile"))


@pytest.fixture(scope="session")
def kv_events_config(tmp_path_factory) -> dict:
    where = tmp_path_factory.mktemp("kv")
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"ipc://{where}/events",
            "replay_endpoint": f"ipc://{where}/replay"}


@pytest_asyncio.fixture(scope="session")
async def engine(model_path, profile_dir, kv_events_config):
    engine = await _start_engine(model_path, ENGINE_ARGS + (
        "--profiler-config", json.dumps({"profiler": "torch", "torch_profiler_dir": profile_dir}),
        "--override-generation-config", json.dumps(GENERATION_DEFAULTS),
        "--kv-events-config", json.dumps(kv_events_config)))
    yield engine
    engine.shutdown()


@contextlib.asynccontextmanager
async def _serve(engine, model, **overrides):
    from servicer.config import ServerConfig
    from servicer.registrar import stop as stop_registration
    from servicer.server import create_server

    server = await create_server(ServerConfig(model=str(model), port=0, drain_timeout_s=1.0, **overrides), engine)
    try:
        yield server
    finally:
        await server.grpc.stop(0)
        if server.control is not None:
            await server.control.stop()
        await stop_registration(server._registering)
        if server.health_server is not None:
            await server.health_server.stop(0)
        server.servicer.close()


@pytest_asyncio.fixture(scope="session")
async def server(engine):
    async with _serve(engine, MODEL, max_n=8, max_concurrent_requests=64, metrics_port=0) as server:
        yield server


def _channel(port):
    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)


@pytest_asyncio.fixture(scope="session")
async def channel(server):
    async with _channel(server.port) as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(channel):
    return pb_grpc.VllmEngineStub(channel)


@pytest.fixture(scope="session")
def oracle():
    from tests.oracle import Oracle

    return Oracle()


# The trained checkpoint (committed): a second engine, started only by the tests that use it. Its grammars
# allow no whitespace between JSON tokens: a 0.9 M-parameter model never saw JSON and, left free, pads it
# with whitespace until max_tokens (vLLM's own flag, passed through). It also logs each request (vLLM's
# --enable-log-requests; the session engine does not): test_metrics checks the flag through both.
COMPACT_JSON = {"backend": "xgrammar", "disable_any_whitespace": True}


@pytest_asyncio.fixture(scope="session")
async def shapes_engine():
    if not (SHAPES_MODEL / "RECIPE").exists():
        pytest.fail(f"trained tiny model missing at {SHAPES_MODEL}: it is committed; `make shapes-model` retrains it")
    engine = await _start_engine(SHAPES_MODEL, ENGINE_ARGS + ("--structured-outputs-config", json.dumps(COMPACT_JSON),
                                                              "--enable-log-requests"))
    yield engine
    engine.shutdown()


@pytest_asyncio.fixture(scope="session")
async def shapes_server(shapes_engine):
    async with _serve(shapes_engine, SHAPES_MODEL, max_concurrent_requests=512) as server:
        yield server


@pytest_asyncio.fixture(scope="session")
async def shapes_stub(shapes_server):
    async with _channel(shapes_server.port) as channel:
        yield pb_grpc.VllmEngineStub(channel)


@pytest.fixture(scope="session")
def shapes_oracle():
    from tests.oracle import Oracle

    return Oracle(SHAPES_MODEL)


@contextlib.asynccontextmanager
async def extra_server(engine, model=MODEL, **overrides):
    """Another server (own config, own store) on a session engine, with a stub to it."""
    async with _serve(engine, model, **overrides) as server, _channel(server.port) as channel:
        yield server, pb_grpc.VllmEngineStub(channel)


@pytest_asyncio.fixture(scope="session")
async def trust_stub(engine):
    """A second server on the same engine, trusting the gateway's mm_hashes (--mm-hash-policy trust)."""
    async with extra_server(engine, mm_hash_policy="trust") as (_, stub):
        yield stub


@dataclass
class Capture:
    """What reached our servicer: each GenerateRequest and, in order, the ids each non-streamed answer carried."""

    requests: list[pb.GenerateRequest] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)


@pytest.fixture
def capture(monkeypatch):
    """Record Generate's input and output by wrapping the request decoder and the accumulator."""
    import servicer.handlers as handlers

    cap = Capture()
    decode = handlers.RequestDecoder.decode

    def recording_decode(self, request, *args):
        copy = pb.GenerateRequest()
        copy.CopyFrom(request)
        cap.requests.append(copy)
        return decode(self, request, *args)

    class RecordingAccumulator(handlers.Accumulator):
        def completes(self):
            for response in super().completes():
                cap.outputs.append(list(response.complete.output_ids))
                yield response

    monkeypatch.setattr(handlers.RequestDecoder, "decode", recording_decode)
    monkeypatch.setattr(handlers, "Accumulator", RecordingAccumulator)
    return cap
