"""Load records on the KV-event stream: the engine's load pushed to the gateway (`KvEventBatch.load`).

SMG reads an `EngineLoad` on each batch of a worker's `SubscribeKvEvents` stream in place of polling
`GetLoads` (its load monitor then skips the poll), and counts each record as contact with the worker.
Its rules that read pushed records (a worker whose records stop is stale after `--worker-stale-secs`;
the silence it allows a busy prefill worker grows with `prefill_pending_tokens`) apply only to workers
that push them.

Pacing, one subscription: the routing core on every event batch, the full record on the first one and on
`load_only` batches. A `load_only` batch goes out, repeating the last batch's sequence number, when the
record changed or after a second without a batch (five once two in a row carried the same record); a
subscriber that asks for `load_records_before_first_batch` gets them numbered 0 before the publisher's
first batch, so an engine that has never published is still heard from.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from vlm_proto import common_pb2 as pb

TICK_S = 0.1  # how often an idle stream looks at the record
HEARTBEAT_S = 1.0
BACKOFF_S = 5.0
_TELEMETRY = ("cache_hit_rate",)  # fields no routing rule reads: on the first record and load_only batches only

# The servicer's record for a rank (None: the stream's own, before any batch names one), or None while unknown.
LoadSource = Callable[[int | None], "pb.EngineLoad | None"]


def _moved(last: pb.EngineLoad, now: pb.EngineLoad) -> bool:
    """A change worth a load_only batch: any count, or KV usage by half a percent."""
    counts = ("running_requests", "waiting_requests", "max_running_requests", "prefill_pending_tokens")
    return any(getattr(last, f) != getattr(now, f) for f in counts) or abs(last.token_usage - now.token_usage) > 0.005


class LoadRecords:
    """One subscription's records: numbered (`sample`), trimmed to the core on event batches, and paced."""

    def __init__(self, source: LoadSource, before_first_batch: bool, clock: Callable[[], float] = time.monotonic):
        self._source, self._clock = source, clock
        self._sample = 0
        self._last: pb.EngineLoad | None = None
        self._last_sent = clock()
        self._unchanged = 0  # load_only batches in a row that carried the same record
        # What a load_only batch repeats: the last batch's number and rank (0 and none before the first).
        self._sequence: int | None = 0 if before_first_batch else None
        self._rank: int | None = None

    def _numbered(self, record: pb.EngineLoad, load_only: bool) -> pb.EngineLoad:
        self._last = record
        numbered = pb.EngineLoad()
        numbered.CopyFrom(record)
        self._sample += 1
        numbered.sample, numbered.load_only = self._sample, load_only
        if not load_only and self._sample > 1:
            for name in _TELEMETRY:
                numbered.ClearField(name)
        return numbered

    def stamp(self, batch: pb.KvEventBatch) -> pb.KvEventBatch:
        """Attach the record to an event batch about to go out."""
        self._rank = batch.dp_rank if batch.HasField("dp_rank") else None
        self._sequence, self._last_sent, self._unchanged = batch.sequence_number, self._clock(), 0
        if (record := self._source(self._rank)) is not None:
            batch.load.CopyFrom(self._numbered(record, load_only=False))
        return batch

    def heartbeat(self) -> pb.KvEventBatch | None:
        """A load_only batch if one is due now, else None."""
        if self._sequence is None or (record := self._source(self._rank)) is None:
            return None
        changed = self._last is None or _moved(self._last, record)
        due = BACKOFF_S if self._unchanged >= 2 else HEARTBEAT_S
        if not changed and self._clock() - self._last_sent < due:
            return None
        self._unchanged = 0 if changed else self._unchanged + 1
        self._last_sent = self._clock()
        batch = pb.KvEventBatch(sequence_number=self._sequence, timestamp=time.time())
        if self._rank is not None:
            batch.dp_rank = self._rank
        batch.load.CopyFrom(self._numbered(record, load_only=True))
        return batch


async def with_load_records(
    batches: AsyncIterator[pb.KvEventBatch], records: LoadRecords
) -> AsyncGenerator[pb.KvEventBatch, None]:
    """The event batches, each with its record, and load_only batches while none comes."""
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(batches))
            done, _ = await asyncio.wait((pending,), timeout=TICK_S)
            if done:
                batch, pending = pending.result(), None  # StopAsyncIteration ends the stream as the events did
                yield records.stamp(batch)
            elif (beat := records.heartbeat()) is not None:
                yield beat
    except StopAsyncIteration:
        return
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
