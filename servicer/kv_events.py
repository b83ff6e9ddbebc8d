"""KvBatch (the engine's KV events) -> SMG's KvEventBatch, with image blocks in the caller's tokens.

A gateway's cache-aware router indexes a worker's blocks by their token ids and compares them with the
ids of its next requests. With `--mm-pad-values` the engine ran each image's positions as values derived
from the image's identity, which no gateway request contains; each published block names the images in it
(identifier, offset), so the ids the caller sent there are put back. A repeated image then matches the
worker that holds it. (The router, not the engine, may also take two different images with the same
placeholder ids for one; the engine's cache never does: its block hashes include the identity.)
"""

import collections
import threading

from engine_adapter.types import KvBatch, KvCleared, KvRemoved, KvStored
from vlm_proto import common_pb2 as pb

_TIER = {"GPU": pb.KV_CACHE_TIER_DEVICE, "CPU": pb.KV_CACHE_TIER_HOST, "STORAGE": pb.KV_CACHE_TIER_DISK}
_CACHE_LEVEL = {pb.KV_CACHE_TIER_HOST: 1, pb.KV_CACHE_TIER_DISK: 2}


class MediaTokens:
    """The caller's ids for each recent media identity's placeholder range, bounded by total ids held."""

    def __init__(self, max_ids: int = 4_000_000):
        self._ids: collections.OrderedDict[str, tuple[int, ...]] = collections.OrderedDict()
        self._held, self._max = 0, max_ids
        self._lock = threading.Lock()  # requests are decoded on a thread pool

    def remember(self, identity: str, ids: tuple[int, ...]) -> None:
        with self._lock:
            if identity in self._ids:
                self._ids.move_to_end(identity)
                return
            self._ids[identity] = ids
            self._held += len(ids)
            while self._held > self._max:
                self._held -= len(self._ids.popitem(last=False)[1])

    def get(self, identity: str) -> tuple[int, ...] | None:
        with self._lock:
            return self._ids.get(identity)


def _caller_tokens(token_ids: tuple[int, ...], extra_keys: tuple, media: MediaTokens | None) -> list[int]:
    tokens = list(token_ids)
    if media is None:  # the engine ran the caller's ids
        return tokens
    for key in extra_keys:
        if not isinstance(key, tuple):
            continue
        identity, start = key  # the item's first position, relative to this block (negative: began earlier)
        original = media.get(identity)
        if original is None:
            continue
        for pos in range(max(0, start), min(len(tokens), start + len(original))):
            tokens[pos] = original[pos - start]
    return tokens


def _extra_key(key) -> pb.KvBlockExtraKey:
    if isinstance(key, tuple):
        return pb.KvBlockExtraKey(multimodal=pb.KvMultimodalKey(identifier=key[0], offset=key[1]))
    if isinstance(key, str):
        return pb.KvBlockExtraKey(text=key)
    if isinstance(key, bytes):
        return pb.KvBlockExtraKey(blob=key)
    return pb.KvBlockExtraKey(number=key)


def _stored(event: KvStored, media: MediaTokens | None) -> pb.KvBlocksStored:
    tier = _TIER.get(event.medium or "GPU", pb.KV_CACHE_TIER_DEVICE)
    level = _CACHE_LEVEL.get(tier)
    first = event.blocks[0].extra_keys
    # vLLM publishes no salt field: a cache salt is the first text key of the first block besides the LoRA name.
    salt = next((k for k in first if isinstance(k, str) and k != event.lora_name), None)
    out = pb.KvBlocksStored(
        blocks=[
            pb.KvBlock(
                block_hash=b.block_hash,
                token_ids=_caller_tokens(b.token_ids, b.extra_keys, media),
                block_size=event.block_size,
                cache_level=level,
                extra_keys=[_extra_key(k) for k in b.extra_keys],
            )
            for b in event.blocks
        ],
        tier=tier,
        locality=pb.KV_CACHE_LOCALITY_LOCAL,
    )
    for name, value in (
        ("parent_block_hash", event.parent_hash),
        ("medium", event.medium),
        ("group_idx", event.group_idx),
        ("kv_cache_spec_kind", event.spec_kind),
        ("lora_name", event.lora_name),
        ("cache_salt", salt),
    ):
        if value is not None:
            setattr(out, name, value)
    return out


def kv_event_batch(batch: KvBatch, media: MediaTokens | None, next_event_id) -> pb.KvEventBatch:
    """One engine batch in the contract's form, under the publisher's own sequence number and rank."""
    events = []
    for event in batch.events:
        if isinstance(event, KvStored):
            events.append(pb.KvCacheEvent(event_id=next_event_id(), stored=_stored(event, media)))
        elif isinstance(event, KvRemoved):
            removed = pb.KvBlocksRemoved(
                block_hashes=event.block_hashes,
                tier=_TIER.get(event.medium or "GPU", pb.KV_CACHE_TIER_DEVICE),
                locality=pb.KV_CACHE_LOCALITY_LOCAL,
            )
            if event.group_idx is not None:
                removed.group_idx = event.group_idx
            if event.medium is not None:
                removed.medium = event.medium
            events.append(pb.KvCacheEvent(event_id=next_event_id(), removed=removed))
        elif isinstance(event, KvCleared):
            events.append(pb.KvCacheEvent(event_id=next_event_id(), cleared=pb.KvCacheCleared()))
    return pb.KvEventBatch(sequence_number=batch.sequence, timestamp=batch.timestamp, events=events, dp_rank=batch.rank)
