"""Data parallelism: one servicer over vLLM's own `--data-parallel-size 2` (two engine cores, CPU build).

- GetServerInfo reports the size, GetLoads one record per rank; a rank outside the group is INVALID_ARGUMENT;
- FlushCache empties every rank's prefix cache, and names the rank that could not be flushed;
- a request pinned with `data_parallel_rank` runs on that rank: its KV events arrive under that `dp_rank`,
  and both ranks answer the same prompt with the same ids;
- SMG with `--dp-aware` registers one worker per rank from GetServerInfo and pins its requests to them.
"""

import asyncio
import json

import grpc
import pytest
import pytest_asyncio

from harness.processes import free_port, http_json
from tests.conftest import _start_engine, extra_server
from tests.fixtures import ENGINE_ARGS, MODEL, request
from tests.test_gateway import _chat_body, _launch
from tests.test_kv_events import Subscription, _stored_with
from vlm_proto import common_pb2, vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine
RANKS = 2


@pytest_asyncio.fixture(scope="module")
async def dp_engine():
    # vLLM offsets tcp ports per rank (not ipc paths). On tcp://127.0.0.1 the publisher connects and the
    # servicer's relay binds; the replay socket is the engine's to bind.
    events = free_port(span=2 * RANKS)
    replay = events + RANKS
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{events}",
              "replay_endpoint": f"tcp://127.0.0.1:{replay}"}
    engine = await _start_engine(MODEL, ENGINE_ARGS + (
        "--data-parallel-size", str(RANKS), "--kv-events-config", json.dumps(config)))
    yield engine
    engine.shutdown()


@pytest_asyncio.fixture(scope="module")
async def dp(dp_engine):
    async with extra_server(dp_engine) as (server, stub):
        yield server, stub


async def test_size_and_per_rank_loads_are_reported(dp):
    _, stub = dp
    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.data_parallel_size == RANKS
    loads = await stub.GetLoads(pb.GetLoadsRequest())
    assert (loads.dp_rank_count, [load.dp_rank for load in loads.loads]) == (RANKS, [0, 1])
    one = await stub.GetLoads(pb.GetLoadsRequest(dp_rank=1))
    assert [load.dp_rank for load in one.loads] == [1]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetLoads(pb.GetLoadsRequest(dp_rank=RANKS))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dp_rank" in err.value.details()


async def test_a_pinned_request_runs_on_its_rank(dp, dp_engine):
    _, stub = dp
    size = dp_engine.info.block_size
    sub = Subscription(stub)
    answers = {}
    try:
        for rank in range(RANKS):
            ids = [(5 * i + 11 * rank + 3) % 900 + 20 for i in range(size + 5)]
            [done] = [r.complete async for r in stub.Generate(
                _pinned(request(ids, temperature=0.0, max_tokens=4, ignore_eos=True), rank))]
            answers[rank] = list(done.output_ids)
            await sub.until(_stored_with(ids))
            assert sub.batches[-1].dp_rank == rank, "the blocks were stored on the pinned rank"
        same = [(3 * i + 1) % 900 + 20 for i in range(20)]
        outputs = []
        for rank in range(RANKS):
            [done] = [r.complete async for r in stub.Generate(
                _pinned(request(same, temperature=0.0, max_tokens=6, ignore_eos=True), rank))]
            outputs.append(list(done.output_ids))
        assert outputs[0] == outputs[1], "both ranks hold the same weights"
    finally:
        sub.close()


async def test_flush_cache_covers_every_rank(dp, dp_engine):
    _, stub = dp
    ids = [(3 * i + 2) % 900 + 20 for i in range(2 * dp_engine.info.block_size + 5)]

    async def cached(rank: int) -> int:
        [done] = [r.complete async for r in stub.Generate(_pinned(request(ids, temperature=0.0, max_tokens=1), rank))]
        return done.cached_tokens

    for rank in range(RANKS):
        await cached(rank)
        assert await cached(rank) > 0, f"rank {rank} did not cache the prompt"
    flushed = await stub.FlushCache(common_pb2.FlushCacheRequest(timeout_s=5))
    assert flushed.success and flushed.message == "prefix cache flushed on rank(s) 0, 1"
    assert [await cached(rank) for rank in range(RANKS)] == [0, 0]

    # A request running on rank 1 holds blocks there: rank 0 flushes, rank 1 cannot, and the answer says so.
    running = stub.Generate(_pinned(request(ids, stream=True, max_tokens=3000, ignore_eos=True), 1))
    await running.read()
    try:
        held = await stub.FlushCache(common_pb2.FlushCacheRequest(timeout_s=0))
        assert not held.success and held.message.startswith("rank(s) 1 of 0, 1:"), held.message
        assert await cached(0) == 0
    finally:
        running.cancel()


async def test_a_rank_outside_the_group_is_invalid_argument(dp):
    _, stub = dp
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(_pinned(request([20, 21, 22], max_tokens=1), RANKS)):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "data_parallel_rank" in err.value.details() and "--data-parallel-size" in err.value.details()


@pytest.mark.gateway
async def test_smg_dp_aware_addresses_each_rank(dp, tmp_path_factory):
    """`smg launch --dp-aware` reads our data_parallel_size, registers `url@0` and `url@1`, and pins each
    request: round-robin over the two, the blocks of four chats land on both ranks."""
    server, stub = dp
    sub = Subscription(stub)
    try:
        async for gw in _launch([server.port], str(MODEL), tmp_path_factory, "inline",
                                "--dp-aware", "--policy", "round_robin", workers=RANKS):
            with gw.dump_log_on_failure():
                status, listed = await _workers(gw)
                assert status == 200, listed
                urls = sorted(w["url"] for w in listed["workers"])
                assert urls == [f"grpc://127.0.0.1:{server.port}@{r}" for r in range(RANKS)], urls
                for n in range(4):
                    status, answer = await gw.chat(_chat_body(gw.model, f"Chat number {n}. " * 20, []))
                    assert status == 200, answer
                ranks = set()
                while ranks != set(range(RANKS)):
                    batch = await sub.until(lambda b: any(e.HasField("stored") for e in b.events) and b)
                    ranks.add(batch.dp_rank)
    finally:
        sub.close()


async def _workers(gw):
    return await asyncio.to_thread(http_json, "GET", f"{gw.url}/workers")


def _pinned(req: pb.GenerateRequest, rank: int) -> pb.GenerateRequest:
    req.data_parallel_rank = rank
    return req
