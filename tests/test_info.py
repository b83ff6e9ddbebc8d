"""Management RPCs, standard health and reflection, over real gRPC on the real engine."""

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import extra_server
from tests.fixtures import request
from vlm_proto import common_pb2, vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine


async def test_model_and_server_info(stub, engine):
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.supports_vision and info.is_generation and info.model_type == "qwen2_vl"
    assert (info.vocab_size, info.max_context_length) == (engine.info.vocab_size, 4096)
    assert list(info.eos_token_ids) == list(engine.info.eos_token_ids)
    server = await stub.GetServerInfo(pb.GetServerInfoRequest())
    assert server.mm_device_do_normalize  # raw uint8 pixels are welcome
    assert server.mm_item_limits == "image=8"
    assert server.max_num_seqs == engine.info.max_num_seqs and server.uptime_seconds > 0
    assert server.multimodal_encoder_dtype == "float32"


async def test_server_info_reports_calls_in_flight_last_receive_and_uptime(engine):
    """What SMG may read of the worker's state, checked against what happened (a server of its own)."""
    ids = [(5 * i + 7) % 900 + 20 for i in range(20)]
    async with extra_server(engine) as (server, stub):
        idle = await stub.GetServerInfo(pb.GetServerInfoRequest())
        assert (idle.active_requests, idle.last_receive_timestamp) == (0, 0.0)  # nothing received yet
        sent = time.time()
        calls = [stub.Generate(request(ids, stream=True, max_tokens=3000, ignore_eos=True)) for _ in range(2)]
        for call in calls:
            await call.read()
        busy = await stub.GetServerInfo(pb.GetServerInfoRequest())
        assert busy.active_requests == 2
        assert sent <= busy.last_receive_timestamp <= time.time()
        for call in calls:
            call.cancel()
        while server.servicer.in_flight:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        after = await stub.GetServerInfo(pb.GetServerInfoRequest())
        assert after.active_requests == 0
        assert after.last_receive_timestamp == busy.last_receive_timestamp  # info calls are not requests
        assert idle.uptime_seconds < busy.uptime_seconds < after.uptime_seconds
        assert abs(after.uptime_seconds - (time.monotonic() - server.servicer.started)) < 1


async def test_health_check_and_standard_health(stub, channel):
    assert (await stub.HealthCheck(pb.HealthCheckRequest())).healthy
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "vllm.grpc.engine.VllmEngine"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(channel):
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    [reply] = [r async for r in reflect.ServerReflectionInfo(ask())]
    names = {s.name for s in reply.list_services_response.service}
    assert {"vllm.grpc.engine.VllmEngine", "grpc.health.v1.Health"} <= names


async def test_loads_and_flush_cache(stub, oracle):
    ids = oracle.chat_ids("Describe the image. " * 40)
    for _ in range(2):
        _ = [r async for r in stub.Generate(request(ids, temperature=0.0, max_tokens=1))]
    loads = await stub.GetLoads(pb.GetLoadsRequest())
    assert loads.dp_rank_count == 1 and loads.loads[0].num_total_reqs == 0
    assert 0.0 < loads.loads[0].cache_hit_rate <= 1.0
    flushed = await stub.FlushCache(common_pb2.FlushCacheRequest(timeout_s=5))
    assert flushed.success and flushed.message == "prefix cache flushed on rank(s) 0"
    [after] = [r.complete async for r in stub.Generate(request(ids, temperature=0.0, max_tokens=1))]
    assert after.cached_tokens == 0  # the flush really emptied the prefix cache


async def test_unknown_rpc_is_unimplemented(channel):
    call = channel.unary_stream("/vllm.grpc.engine.VllmEngine/SubscribeMoonPhases")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [m async for m in call(b"")]
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
