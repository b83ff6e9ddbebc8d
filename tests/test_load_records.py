"""Load records on the KV-event stream, as plain code (no engine, no sockets): numbering, pacing, the
routing core on event batches, and load_only batches while no event batch flows."""

import asyncio
import contextlib

from servicer.load_records import BACKOFF_S, HEARTBEAT_S, LoadRecords, with_load_records
from vlm_proto import common_pb2 as pb


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _source(load: dict):
    return lambda rank: pb.EngineLoad(running_requests=load["running"], token_usage=load["usage"],
                                      max_running_requests=8, cache_hit_rate=0.25, prefill_pending_tokens=load["pending"])


def test_records_are_numbered_paced_and_trimmed_to_the_core_on_event_batches():
    clock, load = Clock(), {"running": 0, "usage": 0.1, "pending": 0}
    records = LoadRecords(_source(load), before_first_batch=True, clock=clock)

    first = records.heartbeat()  # before the publisher's first batch: numbered 0, the full record
    assert (first.sequence_number, first.load.sample, first.load.load_only) == (0, 1, True)
    assert first.load.HasField("cache_hit_rate") and not first.HasField("dp_rank")
    assert records.heartbeat() is None  # unchanged, and not yet a second

    batch = records.stamp(pb.KvEventBatch(sequence_number=7, dp_rank=0))
    assert (batch.load.sample, batch.load.load_only, batch.load.running_requests) == (2, False, 0)
    assert not batch.load.HasField("cache_hit_rate"), "an event batch carries the routing core only"

    clock.now += HEARTBEAT_S - 0.01
    assert records.heartbeat() is None
    clock.now += 0.02
    beat = records.heartbeat()  # a second without a batch: the last batch's number and rank repeated
    assert (beat.sequence_number, beat.dp_rank, beat.load.sample, beat.load.load_only) == (7, 0, 3, True)
    assert beat.load.HasField("cache_hit_rate")

    clock.now += HEARTBEAT_S + 0.01
    assert records.heartbeat().load.sample == 4  # the second unchanged one
    clock.now += HEARTBEAT_S + 0.01
    assert records.heartbeat() is None, "after two unchanged heartbeats the interval backs off"
    clock.now += BACKOFF_S
    assert records.heartbeat().load.sample == 5

    for change in ({"running": 1}, {"usage": 0.2}, {"pending": 300}):  # a change goes out at once
        load.update(change)
        beat = records.heartbeat()
        assert beat is not None and beat.load.running_requests == load["running"], change
        assert beat.load.prefill_pending_tokens == load["pending"]
    load["usage"] += 0.001  # under half a percent: not a change
    assert records.heartbeat() is None


def test_without_the_request_flag_nothing_goes_before_the_first_batch():
    records = LoadRecords(_source({"running": 2, "usage": 0.5, "pending": 0}), before_first_batch=False, clock=Clock())
    assert records.heartbeat() is None
    assert records.stamp(pb.KvEventBatch(sequence_number=3)).load.sample == 1
    assert records.heartbeat() is None  # unchanged since the batch, within the second


def test_no_record_while_the_source_knows_none():
    records = LoadRecords(lambda rank: None, before_first_batch=True, clock=Clock())
    assert records.heartbeat() is None
    assert not records.stamp(pb.KvEventBatch(sequence_number=1)).HasField("load")


async def test_the_stream_interleaves_load_only_batches_and_ends_with_the_events():
    gate, load = asyncio.Event(), {"running": 0, "usage": 0.0, "pending": 0}

    async def events():
        yield pb.KvEventBatch(sequence_number=5, dp_rank=0)
        await gate.wait()
        yield pb.KvEventBatch(sequence_number=6, dp_rank=0)

    stream = with_load_records(events(), LoadRecords(_source(load), before_first_batch=False))
    first = await anext(stream)
    assert (first.sequence_number, first.load.load_only) == (5, False)
    load["running"] = 1  # while no batch comes, the change goes out as a load_only batch
    beat = await anext(stream)
    assert (beat.sequence_number, beat.load.load_only, beat.load.running_requests) == (5, True, 1)
    gate.set()
    second = await anext(stream)
    assert (second.sequence_number, second.load.load_only, second.load.sample) == (6, False, 3)
    assert [b async for b in stream] == []  # the events ended: so does the stream


async def test_cancelling_the_stream_stops_the_events_it_was_waiting_on():
    closed = asyncio.Event()

    async def events():
        try:
            await asyncio.Event().wait()  # never publishes
            yield pb.KvEventBatch()
        finally:
            closed.set()

    stream = with_load_records(events(), LoadRecords(lambda rank: None, before_first_batch=True))
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.25)  # a couple of idle ticks: nothing to send
    assert not waiting.done()
    waiting.cancel()  # as gRPC cancels a handler whose client went away
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert closed.is_set()
