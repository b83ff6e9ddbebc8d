"""Image-aware prefix caching on the real engine, with prompts several 128-token KV blocks long.

(a) same ids + same image: the repeat hits every full block through the image;
(b) same ids + another image: hits stop at the last full block before the image, and the
    answer is that image's own (HF's greedy on it);
(c) a gateway that sends one hash for two images: under recompute each gets its own answer;
    under trust the second is served the first image's KV (why recompute is the default);
(d) text-only prompts sharing a prefix hit too.
"""

import pytest

from tests.fixtures import image, mm_inputs, request
from vlm_proto import vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine
BLOCK = 128
NEW = 8


def _prompt(oracle, tag: str, imgs):
    """~400 tokens of text, the image, ~150 more: the image sits inside full blocks."""
    prefix = f"{tag} " + "The quick brown fox jumps over the lazy dog. " * 36
    ids = oracle.chat_ids("Describe this picture in detail. " * 25, 1, imgs.tokens_per_image, prefix=prefix)
    start = ids.index(oracle.pad)
    assert start > 3 * BLOCK and len(ids) > start + 16 + BLOCK
    return ids, start


async def _run(stub, ids, imgs, hashes=()):
    mm = mm_inputs(imgs.pixel_values, imgs.grid, mm_hashes=list(hashes))
    [done] = [r.complete async for r in stub.Generate(request(ids, mm=mm, temperature=0.0, max_tokens=NEW, ignore_eos=True))]
    return done


async def test_same_image_hits_through_the_image(stub, oracle):
    imgs = oracle.images([image(112, 112, seed=21)])
    ids, start = _prompt(oracle, "alpha", imgs)
    first = await _run(stub, ids, imgs)
    again = await _run(stub, ids, imgs)
    image_end = start + imgs.tokens_per_image[0]
    assert first.cached_tokens < again.cached_tokens
    assert again.cached_tokens >= -(-image_end // BLOCK) * BLOCK  # every block holding the image
    assert again.cached_tokens == (len(ids) - 1) // BLOCK * BLOCK
    assert again.output_ids == first.output_ids


async def test_other_image_stops_before_it_and_gets_its_own_answer(stub, oracle):
    a, b = oracle.images([image(112, 112, seed=22)]), oracle.images([image(112, 112, seed=23)])
    ids, start = _prompt(oracle, "bravo", a)
    await _run(stub, ids, a)
    done = await _run(stub, ids, b)
    assert done.cached_tokens == start // BLOCK * BLOCK
    expected, gaps = oracle.greedy(ids, b, NEW)
    assert list(done.output_ids) == expected, f"HF gaps {gaps}"


@pytest.mark.parametrize("policy", ["recompute", "trust"])
async def test_one_gateway_hash_for_two_images(stub, trust_stub, oracle, policy):
    a, b = oracle.images([image(112, 112, seed=24)]), oracle.images([image(112, 112, seed=25)])
    ids, start = _prompt(oracle, f"charlie-{policy}", a)
    target = stub if policy == "recompute" else trust_stub
    same_hash = ["0" * 64]
    await _run(target, ids, a, same_hash)
    done = await _run(target, ids, b, same_hash)
    if policy == "recompute":
        assert done.cached_tokens == start // BLOCK * BLOCK
        assert list(done.output_ids) == oracle.greedy(ids, b, NEW)[0]
    else:  # trusting a wrong hash serves image A's KV to image B
        assert done.cached_tokens == (len(ids) - 1) // BLOCK * BLOCK


async def test_text_prompts_sharing_a_prefix_hit(stub, oracle):
    prefix = "delta " + "The quick brown fox jumps over the lazy dog. " * 36
    one = oracle.chat_ids("What colour is the shape?", prefix=prefix)
    two = oracle.chat_ids("How many shapes are there?", prefix=prefix)
    shared = next(i for i, (x, y) in enumerate(zip(one, two)) if x != y)
    for ids in (one, two):
        [done] = [r.complete async for r in stub.Generate(request(ids, temperature=0.0, max_tokens=1))]
    assert done.cached_tokens == shared // BLOCK * BLOCK > 0


async def test_pad_values_reach_the_engine_but_not_the_caller(stub, engine, oracle, monkeypatch):
    a, b = oracle.images([image(112, 112, seed=26)]), oracle.images([image(112, 112, seed=27)])
    ids, start = _prompt(oracle, "echo", a)
    seen = []
    original = engine._llm.generate
    monkeypatch.setattr(engine._llm, "generate", lambda p, *x, **k: (seen.append(p["prompt_token_ids"]), original(p, *x, **k))[1])
    for imgs in (a, b):
        mm = mm_inputs(imgs.pixel_values, imgs.grid)
        [done] = [r.complete async for r in stub.Generate(request(ids, mm=mm, temperature=0.0, max_tokens=1, prompt_logprobs=0))]
        assert list(done.input_logprobs.token_ids) == ids  # the caller's ids
    run = slice(start, start + 16)
    assert oracle.pad not in seen[0][run] and oracle.pad not in seen[1][run]
    assert sum(x != y for x, y in zip(seen[0][run], seen[1][run])) >= 12
    assert seen[0][: start] == ids[: start] and seen[0][start + 16:] == ids[start + 16:]
