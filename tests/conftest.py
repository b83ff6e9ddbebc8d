"""One real vLLM CPU engine and one real gRPC server per test session, on loopback port 0."""

import contextlib
import os

import grpc
import pytest
import pytest_asyncio

from tests.fixtures import ENGINE_ARGS, MODEL
from vlm_proto import vllm_engine_pb2_grpc as pb_grpc

# vLLM's worker processes must not fork a process that already runs gRPC threads.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

MAX_MESSAGE = 512 * 1024 * 1024


@pytest.fixture(scope="session")
def model_path() -> str:
    if not (MODEL / "RECIPE").exists():
        pytest.fail(f"tiny model missing at {MODEL}: run `make model` (make test does)")
    return str(MODEL)


@pytest_asyncio.fixture(scope="session")
async def engine(model_path):
    from engine_adapter.engine import parse_engine_args, start_engine

    engine = await start_engine(parse_engine_args(model_path, list(ENGINE_ARGS)))
    yield engine
    engine.shutdown()


@pytest_asyncio.fixture(scope="session")
async def server(engine):
    from servicer.config import ServerConfig
    from servicer.server import create_server

    config = ServerConfig(model=str(MODEL), port=0, max_n=8, max_concurrent_requests=64, drain_timeout_s=1.0, metrics_port=0)
    server = await create_server(config, engine)
    yield server
    await server.grpc.stop(0)
    server.servicer.close()


@pytest_asyncio.fixture(scope="session")
async def channel(server):
    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(channel):
    return pb_grpc.VllmEngineStub(channel)


@pytest.fixture(scope="session")
def oracle():
    from tests.oracle import Oracle

    return Oracle()


@contextlib.asynccontextmanager
async def extra_server(engine, **overrides):
    """Another server (own config, own store) on the session's engine, with a stub to it."""
    from servicer.config import ServerConfig
    from servicer.server import create_server

    server = await create_server(ServerConfig(model=str(MODEL), port=0, drain_timeout_s=1.0, **overrides), engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, pb_grpc.VllmEngineStub(channel)
    finally:
        await server.grpc.stop(0)
        server.servicer.close()


@pytest_asyncio.fixture(scope="session")
async def trust_stub(engine):
    """A second server on the same engine, trusting the gateway's mm_hashes (--mm-hash-policy trust)."""
    async with extra_server(engine, mm_hash_policy="trust") as (_, stub):
        yield stub
