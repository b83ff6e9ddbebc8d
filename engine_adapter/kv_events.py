"""vLLM's KV-cache events, relayed from the engine's own publisher (`--kv-events-config`).

vLLM's scheduler publishes from the engine-core process, one ZMQ message per scheduler step that
stored or evicted blocks: `[topic, sequence (8 bytes, big-endian), msgpack [ts, events, dp_rank]]`,
and keeps its last `buffer_steps` messages for a replay socket. The front end never sees them, so the
relay subscribes like any consumer: one SUB per data-parallel rank from the moment the servicer starts
(nothing published after that is missed), a DEALER on the rank's replay socket to fill a gap, and a
bounded history so a gateway that reconnects resumes from its cursor.
"""

import asyncio
import collections
import logging
import time
from collections.abc import AsyncGenerator, Mapping

import msgspec
import zmq
import zmq.asyncio
from vllm.config.kv_events import KVEventsConfig
from vllm.distributed.kv_events import ZmqEventPublisher

from engine_adapter.errors import EngineCursorError
from engine_adapter.types import KvBatch, KvBlock, KvCleared, KvRemoved, KvStored

logger = logging.getLogger(__name__)

_END_OF_REPLAY = b"\xff" * 8
_REPLAY_TIMEOUT_S = 5.0
_U64 = (1 << 64) - 1


def _int64(block_hash) -> int | None:
    """vLLM's block hash (unsigned 64-bit int, or the raw digest whose last 8 bytes it stands for) as the
    contract's signed int64, same bits."""
    if isinstance(block_hash, bool) or not isinstance(block_hash, (int, bytes)):
        return None
    value = int.from_bytes(block_hash[-8:], "big") if isinstance(block_hash, bytes) else block_hash & _U64
    return value - (1 << 64) if value >= 1 << 63 else value


def _int64s(block_hashes) -> tuple[int, ...] | None:
    """Every hash as int64, or None when any of them cannot be read."""
    hashes = []
    for block_hash in block_hashes or ():
        value = _int64(block_hash)
        if value is None:
            return None
        hashes.append(value)
    return tuple(hashes)


def _extra_key(key):
    """One published extra key: text (LoRA name, cache salt), bytes (a digest), a number, or an image's
    (identifier, offset in the block)."""
    if isinstance(key, (list, tuple)) and len(key) == 2 and isinstance(key[0], str) and isinstance(key[1], int):
        return (key[0], key[1])
    return key if isinstance(key, (str, bytes, int)) and not isinstance(key, bool) else None


def _stored(event: dict) -> KvStored | None:
    hashes = _int64s(event.get("block_hashes"))
    tokens, size = list(event.get("token_ids") or ()), event.get("block_size") or 0
    if not hashes or size <= 0 or len(hashes) * size != len(tokens):
        return None  # hybrid models' masked blocks leave tokens without hashes: not a prefix the router can use
    extra = event.get("extra_keys") or [None] * len(hashes)
    blocks = tuple(
        KvBlock(
            h,
            tuple(int(t[0] if isinstance(t, (list, tuple)) else t) for t in tokens[i * size : (i + 1) * size]),
            tuple(k for k in map(_extra_key, extra[i] or ()) if k is not None) if i < len(extra) else (),
        )
        for i, h in enumerate(hashes)
    )
    parent = event.get("parent_block_hash")
    return KvStored(
        blocks=blocks,
        parent_hash=None if parent is None else _int64(parent),
        block_size=size,
        medium=event.get("medium"),
        lora_name=event.get("lora_name"),
        group_idx=event.get("group_idx"),
        spec_kind=event.get("kv_cache_spec_kind"),
    )


def decode_batch(seq: int, payload: bytes, rank: int) -> KvBatch:
    """One published message as plain data; what cannot be read is left out, never guessed."""
    try:
        ts, raw_events, *_ = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, ValueError, TypeError):
        logger.warning("KV events: rank %d batch %d does not decode; relayed empty", rank, seq)
        return KvBatch(seq, time.time(), rank, ())
    events: list[KvStored | KvRemoved | KvCleared] = []
    for event in raw_events or ():
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "BlockStored":
            stored = _stored(event)
            if stored is not None:
                events.append(stored)
        elif kind == "BlockRemoved":
            hashes = _int64s(event.get("block_hashes"))
            if hashes:
                events.append(KvRemoved(hashes, event.get("medium"), event.get("group_idx")))
        elif kind == "AllBlocksCleared":
            events.append(KvCleared())
    return KvBatch(seq, float(ts) if isinstance(ts, (int, float)) else time.time(), rank, tuple(events))


class KvEventRelay:
    """Every rank's events from the engine's start, a bounded history of them, and a fan-out to subscribers."""

    def __init__(self, sources: Mapping[int, KVEventsConfig], history: int = 10_000):
        """`sources`: rank -> vLLM's resolved KVEventsConfig for that rank (AsyncLLM.get_kv_event_sources)."""
        self._ctx = zmq.asyncio.Context.instance()
        self._history: collections.deque[KvBatch] = collections.deque(maxlen=history)
        self._queue_size = history  # a subscriber falling further behind than the history is dropped
        self._last: dict[int, int] = {}
        self._subscribers: set[asyncio.Queue] = set()
        self._lagging: set[asyncio.Queue] = set()  # dropped for not keeping up
        self._sockets: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task] = []
        for rank, config in sources.items():
            sub = self._ctx.socket(zmq.SUB)
            sub.set_hwm(config.hwm)
            sub.setsockopt(zmq.SUBSCRIBE, config.topic.encode())
            # vLLM's publisher binds wildcard and ipc endpoints and connects to any other (tcp://host:port),
            # which is then the collector's to bind. Its own rule (private; pinned by tests/test_vllm_private.py),
            # so the two never both connect.
            joined = None
            if ZmqEventPublisher._is_bind_endpoint(config.endpoint):
                sub.connect(_reachable(config.endpoint))
            else:
                joined = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
                sub.bind(config.endpoint)
            self._sockets.append(sub)
            self._tasks.append(asyncio.create_task(self._read(rank, sub, config, joined), name=f"kv-events-{rank}"))

    async def _read(self, rank: int, sub, config: KVEventsConfig, joined=None) -> None:
        """Relay one rank for the server's life; a failure is logged and the rank resumes after a second."""
        if joined is not None:  # a bound relay: let the publisher's reconnect land before reading its replay
            try:
                await asyncio.wait_for(joined.recv_multipart(), _REPLAY_TIMEOUT_S)
            except TimeoutError:
                logger.warning("KV events: rank %d's publisher has not connected to %s yet", rank, config.endpoint)
            finally:
                sub.disable_monitor()
                joined.close(linger=0)
        while True:
            try:
                await self._relay_rank(rank, sub, config)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("KV events: relaying rank %d failed; resuming", rank)
                await asyncio.sleep(1.0)

    async def _relay_rank(self, rank: int, sub, config) -> None:
        if rank not in self._last:  # what the engine published before we connected, from its replay buffer
            await self._fill(rank, config, 0, None)
        while True:
            frames = await sub.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                continue
            seq = int.from_bytes(frames[1], "big")
            last = self._last.get(rank)
            if last is not None and seq <= last:
                continue  # already relayed (from the replay)
            if last is not None and seq > last + 1:
                await self._fill(rank, config, last + 1, seq)
            self._emit(decode_batch(seq, frames[2], rank))

    async def _fill(self, rank: int, config, start: int, stop: int | None) -> None:
        for seq, payload in await self._replay(config, start, stop):
            self._emit(decode_batch(seq, payload, rank))

    async def _replay(self, config, start: int, stop: int | None) -> list[tuple[int, bytes]]:
        """The batches [start, stop) (stop None: all) from the rank's replay socket, or what it still holds."""
        if not config.replay_endpoint:
            if stop is not None:
                logger.warning(
                    "KV events: batches %d-%d lost (no replay_endpoint in --kv-events-config)", start, stop - 1
                )
            return []
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.connect(_reachable(config.replay_endpoint))
        got = []
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), _REPLAY_TIMEOUT_S)
                if len(frames) < 4 or frames[2] == _END_OF_REPLAY:
                    break
                seq = int.from_bytes(frames[2], "big")
                if start <= seq and (stop is None or seq < stop):
                    got.append((seq, frames[3]))
        except TimeoutError:
            logger.warning("KV events: replay from %d timed out", start)
        finally:
            dealer.close(linger=0)
        if stop is not None and len(got) != stop - start:
            logger.warning("KV events: replay filled %d of %d missed batches", len(got), stop - start)
        return got

    def _emit(self, batch: KvBatch) -> None:
        self._last[batch.rank] = batch.sequence
        self._history.append(batch)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(batch)
            except asyncio.QueueFull:  # a subscriber that stopped reading: its stream ends, it starts over
                self._subscribers.discard(queue)
                self._lagging.add(queue)

    def subscribe(self, start: int) -> AsyncGenerator[KvBatch, None]:
        """Batches after `start` (0: from the first read on), then live ones. A cursor the history no longer
        reaches back to, or one ahead of the publisher, is EngineCursorError, raised here rather than at the
        first read, so a caller can refuse it before answering: the subscriber starts over from 0."""
        if start:
            known = [b.sequence for b in self._history if b.rank == 0]
            if not known or not known[0] - 1 <= start <= known[-1]:
                raise EngineCursorError(
                    f"start_sequence_number: {start} is outside the relay's history "
                    f"({f'{known[0]}-{known[-1]}' if known else 'empty'}); resubscribe from 0"
                )
        return self._stream(start)

    async def _stream(self, start: int) -> AsyncGenerator[KvBatch, None]:
        # Joins the fan-out at the first read, so a stream never read holds no queue.
        queue: asyncio.Queue = asyncio.Queue(maxsize=self._queue_size)
        backlog = [b for b in self._history if b.rank != 0 or b.sequence > start] if start else []
        self._subscribers.add(queue)
        try:
            for batch in backlog:
                yield batch
            while queue not in self._lagging or not queue.empty():
                yield await queue.get()
            raise EngineCursorError(f"the subscriber fell {queue.maxsize} batches behind; resubscribe from 0")
        finally:
            self._subscribers.discard(queue)
            self._lagging.discard(queue)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for sock in self._sockets:
            sock.close(linger=0)


def _reachable(endpoint: str) -> str:
    """A bound wildcard endpoint, as a local subscriber connects to it."""
    return endpoint.replace("://*", "://127.0.0.1").replace("://0.0.0.0", "://127.0.0.1")
