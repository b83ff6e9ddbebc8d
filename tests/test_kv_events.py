"""SubscribeKvEvents: vLLM's own KV-cache events (the session engine runs --kv-events-config on ipc
sockets) relayed in SMG's form, on the real engine.

- a text prompt's full blocks arrive as one stored event: the prompt's ids block by block, chained by parent
  hash, vLLM's block size, on the device tier, under the publisher's consecutive sequence numbers;
- an image's blocks carry the ids the caller sent (not the engine's pad values) and name the image by its
  identity and offset; two different images with the same ids give different block hashes;
- the stream answers (its headers) as it opens, before any batch: SMG never takes us for unreachable;
- load records: load_only batches numbered 0 before the first batch, then the load on every batch; SMG reads
  them in place of polling GetLoads;
- FlushCache arrives as `cleared`; a reconnecting subscriber resumes from its cursor; a cursor the relay
  never reached is OUT_OF_RANGE; an engine without --kv-events-config is UNIMPLEMENTED naming the flag.
"""

import asyncio

import grpc
import pytest

from harness.processes import metric
from tests.fixtures import image, mm_inputs, request
from tests.test_gateway import _chat_body, gateway  # noqa: F401 (gateway: a fixture)
from vlm_proto import common_pb2, vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine
WAIT_S = 20.0


class Subscription:
    """An open SubscribeKvEvents call and the batches read from it so far."""

    def __init__(self, stub, start: int = 0):
        self.call = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(
            start_sequence_number=start, load_records_before_first_batch=True))
        self.batches: list[common_pb2.KvEventBatch] = []

    async def until(self, found):
        """Read batches until `found(batch)` returns something truthy; return it."""
        async def scan():
            while True:
                batch = await self.call.read()
                assert batch is not grpc.aio.EOF, "the stream ended"
                self.batches.append(batch)
                if hit := found(batch):
                    return hit
        return await asyncio.wait_for(scan(), WAIT_S)

    def close(self):
        self.call.cancel()


def _events_only(batches: list[common_pb2.KvEventBatch]) -> list[common_pb2.KvEventBatch]:
    """The publisher's batches, without the load_only ones (which repeat the last number, or 0 before any)."""
    return [b for b in batches if not b.load.load_only]


def _stored_with(token_ids: list[int]):
    """A finder: the first stored event whose first block's tokens start the given ids."""
    def found(batch):
        for event in batch.events:
            if event.HasField("stored") and list(event.stored.blocks[0].token_ids) == token_ids[:len(event.stored.blocks[0].token_ids)]:
                return event.stored
        return None
    return found


async def _run(stub, ids, mm=None):
    call = stub.Generate(request(ids, mm=mm, temperature=0.0, max_tokens=1))
    identities = dict(await call.initial_metadata()).get("vlm-mm-identities")
    [done] = [r.complete async for r in call]
    return done, identities


async def test_the_stream_answers_at_once_on_an_idle_engine(stub):
    """SMG waits 2 s for a subscription's answer and takes silence for an unreachable worker. An idle engine
    publishes nothing, so the headers come when the stream opens, before any batch."""
    sub = Subscription(stub)
    try:
        await asyncio.wait_for(sub.call.initial_metadata(), WAIT_S)  # before this fix: only with a first batch
        assert sub.batches == []
    finally:
        sub.close()


async def test_load_records_ride_the_stream_from_its_start(stub, engine):
    """SMG asks for load records before the first batch: an idle engine's stream sends load_only batches
    numbered 0; then each event batch carries the engine's load (the routing core), numbered on."""
    sub = Subscription(stub)
    try:
        beat = await sub.until(lambda b: b if b.load.load_only else None)
        assert beat.sequence_number == 0 and not beat.events
        assert beat.load.running_requests == 0 and beat.load.prefill_pending_tokens == 0
        assert beat.load.max_running_requests == engine.info.max_num_seqs and beat.load.HasField("cache_hit_rate")
        ids = [(5 * i + 9) % 900 + 20 for i in range(engine.info.block_size + 1)]
        await _run(stub, ids)
        await sub.until(_stored_with(ids))
        batch = sub.batches[-1]
        assert batch.HasField("load") and not batch.load.load_only and batch.load.sample > beat.load.sample
        samples = [b.load.sample for b in sub.batches]
        assert samples == sorted(set(samples)), "one increasing sample number per record"
    finally:
        sub.close()


async def test_text_blocks_arrive_as_stored_events_with_their_ids(stub, engine):
    size = engine.info.block_size
    ids = [(7 * i + 3) % 900 + 20 for i in range(2 * size + 17)]  # two full blocks and a partial one
    sub = Subscription(stub)
    try:
        await _run(stub, ids)
        stored = await sub.until(_stored_with(ids))
    finally:
        sub.close()
    assert [list(b.token_ids) for b in stored.blocks] == [ids[:size], ids[size:2 * size]]
    assert all(b.block_size == size for b in stored.blocks) and not stored.HasField("parent_block_hash")
    assert stored.tier == common_pb2.KV_CACHE_TIER_DEVICE and stored.locality == common_pb2.KV_CACHE_LOCALITY_LOCAL
    assert len({b.block_hash for b in stored.blocks}) == 2
    batch = sub.batches[-1]
    assert batch.dp_rank == 0 and batch.timestamp > 0
    seqs = [b.sequence_number for b in _events_only(sub.batches)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the publisher's own consecutive numbers"


async def test_image_blocks_carry_the_callers_ids_and_name_the_image(stub, engine, oracle):
    size = engine.info.block_size
    hashes = []
    sub = Subscription(stub)
    try:
        for seed in (71, 72):  # two different images, the same ids
            imgs = oracle.images([image(224, 224, seed=seed)])  # 64 image tokens
            ids = oracle.chat_ids("Describe it. " * 30, 1, imgs.tokens_per_image)
            _, identity = await _run(stub, ids, mm_inputs(imgs.raw, imgs.grid))
            stored = await sub.until(_stored_with(ids))
            first = stored.blocks[0]
            assert list(first.token_ids) == ids[:size], "the caller's ids, not the engine's pad values"
            start = ids.index(oracle.pad)
            keys = [k.multimodal for k in first.extra_keys if k.HasField("multimodal")]
            assert [(k.identifier, k.offset) for k in keys] == [(identity, start)]
            hashes.append(first.block_hash)
    finally:
        sub.close()
    assert hashes[0] != hashes[1], "the engine's block hash includes the image's identity"


async def test_flush_is_cleared_and_a_subscriber_resumes_from_its_cursor(stub, engine):
    size = engine.info.block_size
    sub = Subscription(stub)
    try:
        ids = [(11 * i + 5) % 900 + 20 for i in range(size + 3)]
        await _run(stub, ids)
        await sub.until(_stored_with(ids))
        cursor = _events_only(sub.batches)[-1].sequence_number
        later = [(13 * i + 1) % 900 + 20 for i in range(size + 3)]
        await _run(stub, later)
        await sub.until(_stored_with(later))
        assert (await stub.FlushCache(common_pb2.FlushCacheRequest(timeout_s=5))).success
        await _run(stub, ids)  # vLLM publishes at its next scheduler step
        await sub.until(lambda b: any(e.HasField("cleared") for e in b.events))
    finally:
        sub.close()
    resumed = Subscription(stub, start=cursor)
    try:
        await resumed.until(_stored_with(later))
        assert _events_only(resumed.batches)[0].sequence_number == cursor + 1
    finally:
        resumed.close()
    ahead = Subscription(stub, start=_events_only(sub.batches)[-1].sequence_number + 1000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ahead.until(lambda b: True)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and "start_sequence_number" in err.value.details()


async def test_without_the_flag_it_is_unimplemented_naming_it(shapes_stub):
    sub = Subscription(shapes_stub)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sub.until(lambda b: True)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "--kv-events-config" in err.value.details()


@pytest.mark.gateway
async def test_smg_subscribes_and_indexes_our_blocks(gateway, oracle):
    """SMG (cache_aware, its default) opens SubscribeKvEvents when our worker registers and indexes what we
    publish: after an image chat its event counters and its index hold our blocks, with no stream error."""
    with gateway.dump_log_on_failure():
        before = gateway.metric("smg_kv_event_blocks_total")
        status, answer = await gateway.chat(_chat_body(gateway.model, "Describe it. " * 40, [image(224, 224, seed=73)]))
        assert status == 200, answer
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while gateway.metric("smg_kv_event_blocks_total") <= before:
            assert asyncio.get_running_loop().time() < deadline, "SMG applied none of our blocks"
            await asyncio.sleep(0.2)
        assert gateway.metric("smg_kv_event_subscriptions_total") >= 1 and gateway.metric("smg_kv_index_blocks") > 0
        assert gateway.metric("smg_kv_event_stream_errors_total") == 0 and gateway.metric("smg_kv_events_unavailable") == 0
        # Our stream answers as it opens, so SMG never took our worker for unreachable.
        assert metric(gateway.metrics_url, "smg_worker_stall_transitions_total", 'reason="unreachable"') == 0
        # SMG reads the load our stream pushes: its load monitor skips the GetLoads poll (one tick every 10 s).
        while metric(gateway.metrics_url, "smg_engine_load_polls_total", 'mode="skipped_fresh_push"') == 0:
            assert asyncio.get_running_loop().time() < deadline + 30, "SMG kept polling GetLoads"
            await asyncio.sleep(0.5)


def test_hashes_keep_their_64_bits_and_unreadable_events_are_left_out():
    import msgspec

    from engine_adapter.kv_events import decode_batch

    top = (1 << 64) - 1  # vLLM's unsigned hash with the high bit set: the same bits as int64 -1
    payload = msgspec.msgpack.encode([1.5, [
        {"type": "BlockStored", "block_hashes": [top, b"\x00" * 24 + (5).to_bytes(8, "big")], "parent_block_hash": None,
         "token_ids": [1, 2, 3, 4], "block_size": 2, "lora_id": None, "medium": "GPU", "lora_name": None,
         "extra_keys": [[["abc", -1]], None]},
        {"type": "BlockStored", "block_hashes": [9], "parent_block_hash": None, "token_ids": [1, 2, 3],
         "block_size": 2, "lora_id": None, "medium": "GPU", "lora_name": None},  # tokens without hashes: dropped
        {"type": "BlockRemoved", "block_hashes": [top], "medium": "GPU"},
        {"type": "Unknown"}], 0])
    batch = decode_batch(3, payload, 0)
    stored, removed = batch.events
    assert [b.block_hash for b in stored.blocks] == [-1, 5] and stored.blocks[0].extra_keys == (("abc", -1),)
    assert removed.block_hashes == (-1,) and (batch.sequence, batch.timestamp, batch.rank) == (3, 1.5, 0)
    assert decode_batch(4, b"\xc1", 0).events == ()  # not msgpack: relayed empty under its number


async def test_relay_replays_from_a_cursor_and_refuses_one_outside_its_history():
    """The relay's history and cursors as plain code (no engine, no sockets): batches after the cursor, then
    live ones; every rank's batches relayed; a cursor outside the history, or a subscriber that stops
    reading, is EngineCursorError (OUT_OF_RANGE on the wire)."""
    from engine_adapter.errors import EngineCursorError
    from engine_adapter.kv_events import KvEventRelay
    from engine_adapter.types import KvBatch

    relay = KvEventRelay({}, history=4)
    for seq in range(1, 7):  # rank 0 publishes 1..6 (history keeps 3..6); rank 1 its own 1
        relay._emit(KvBatch(seq, float(seq), 0, ()))
    relay._emit(KvBatch(1, 7.0, 1, ()))  # pushes rank 0's 3 out: history is 4..6 and rank 1's 1

    async def first(start: int, count: int) -> list[tuple[int, int]]:
        stream = relay.subscribe(start)
        got = [(b.rank, b.sequence) async for b in _take(stream, count)]
        await stream.aclose()
        return got

    assert await first(4, 3) == [(0, 5), (0, 6), (1, 1)]  # resumes after the cursor
    assert await first(3, 1) == [(0, 4)]  # the cursor is the batch before the oldest kept: still whole
    for outside in (2, 7):  # evicted, or never published
        with pytest.raises(EngineCursorError, match="start_sequence_number"):
            await first(outside, 1)

    live = relay.subscribe(0)
    waiting = asyncio.ensure_future(live.__anext__())
    await asyncio.sleep(0)
    relay._emit(KvBatch(7, 8.0, 0, ()))
    assert (await waiting).sequence == 7  # from 0: live batches only

    for seq in range(8, 8 + 5):  # the subscriber reads nothing while its queue (4) overflows
        relay._emit(KvBatch(seq, float(seq), 0, ()))
    with pytest.raises(EngineCursorError, match="fell"):
        async for _ in live:
            pass
    relay.close()


async def _take(stream, count: int):
    for _ in range(count):
        yield await stream.__anext__()
