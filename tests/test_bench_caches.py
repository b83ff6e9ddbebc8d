"""bench/caches.py: a benchmark cell that claims no cache helped fails loudly when one did, and a request made
distinct carries pixels and a hash no other request has (the mistake issue 33 found: the same pixels resent)."""

import hashlib

import pytest

from bench.caches import CacheHit, CacheTally, make_distinct
from vlm_proto import vllm_engine_pb2 as pb


def test_a_no_cache_cell_with_any_cached_token_fails_naming_the_counts():
    tally = CacheTally()
    tally.add(0, 300)
    tally.require_none("uint8 x1 inline")  # nothing cached: passes
    tally.add(128, 300)
    with pytest.raises(CacheHit, match=r"uint8 x1 inline: 1 of 2 answers had cached tokens \(128 of 600"):
        tally.require_none("uint8 x1 inline")


def test_tallies_add_and_round_trip_through_the_saved_json():
    a, b = CacheTally(), CacheTally()
    a.add(0, 10)
    b.add(5, 20)
    total = a + b
    assert (total.responses, total.prompt_tokens, total.cached_tokens, total.hits) == (2, 30, 5, 1)
    assert CacheTally.from_dict(total.as_dict()) == total
    assert CacheTally.total([a.as_dict(), b.as_dict()]) == total
    assert str(total) == "5/30"


def test_a_calls_complete_message_is_counted_the_same_whether_parsed_or_not():
    done = pb.GenerateComplete(prompt_tokens=300, cached_tokens=128)
    parsed, raw = CacheTally(), CacheTally()
    parsed.add_complete(done)
    raw.add_message(pb.GenerateResponse(complete=done).SerializeToString())
    assert parsed == raw == CacheTally(responses=1, prompt_tokens=300, cached_tokens=128, hits=1)


def test_distinct_requests_get_their_own_pixels_and_the_hash_of_those_pixels():
    base = pb.GenerateRequest()
    base.mm_inputs.pixel_values.inline = bytes(range(256)) * 4
    base.mm_inputs.mm_hashes.append("gateway-hash")
    seen_pixels, seen_hashes = set(), set()
    for serial in range(1, 6):
        req = pb.GenerateRequest()
        req.CopyFrom(base)
        make_distinct(req, serial)
        pixels = req.mm_inputs.pixel_values.inline
        assert len(pixels) == len(base.mm_inputs.pixel_values.inline)
        assert req.mm_inputs.mm_hashes[0] == hashlib.sha256(pixels).hexdigest()
        seen_pixels.add(pixels)
        seen_hashes.add(req.mm_inputs.mm_hashes[0])
    assert len(seen_pixels) == len(seen_hashes) == 5
