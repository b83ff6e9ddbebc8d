"""Greedy and teacher-forced parity with Hugging Face transformers, through real gRPC and the real
engine, on the trained tiny model (it reads the image, so its answers are decisive).

Proves placeholder expansion, M-RoPE positions and both pixel paths at once.
(a) greedy: each image case asks about shapes the model can see; the answer and the closing
    <|im_end|> must equal HF's exactly. Every such token has an HF top-1/top-2 gap of at
    least 0.5 (checked), so no tie allowance is needed or given.
(b) teacher-forced: HF's 16-token greedy continuation is sent as part of the prompt with
    prompt_logprobs; every reference token's logprob must match HF's within 1e-3.
"""

import random

import pytest

from tests.fixtures import mm_inputs, request, tensor
from tests.oracle import Oracle
from tinytrain import data
from vlm_proto import vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine
NEW_TOKENS = 16
LOGPROB_TOL = 1e-3
DECISIVE_GAP = 0.5


def shape(seed: int, size=(56, 56), colour: str | None = None):
    return data.make_sample(random.Random(seed), size=size, colour=colour).image


def _case(oracle: Oracle, name: str):
    """(expanded ids for HF, ids as sent, Images or None, MultimodalInputs or None)."""
    colour, what = data.QUESTIONS["colour"], data.QUESTIONS["shape"]
    if name == "text":
        ids = oracle.chat_ids(colour)
        return ids, ids, None, None
    if name == "one_image_float":  # one placeholder per image, normalized float pixels
        imgs = oracle.images([shape(1)])
        ids = oracle.chat_ids(what, 1, imgs.tokens_per_image)
        return ids, oracle.chat_ids(what, 1), imgs, mm_inputs(imgs.pixel_values, imgs.grid)
    if name == "two_images_sizes":  # expanded, ranges covering <|vision_start|>..<|vision_end|>, SMG's keys
        imgs = oracle.images([shape(2, colour="green"), shape(3, size=(84, 56), colour="green")])
        ids = oracle.chat_ids(colour, 2, imgs.tokens_per_image)
        starts = [i for i, t in enumerate(ids) if t == oracle.vs]
        ranges = [pb.PlaceholderRange(offset=s, length=n + 2) for s, n in zip(starts, imgs.tokens_per_image)]
        rows = imgs.grid.prod(-1)
        mm = mm_inputs(imgs.pixel_values, imgs.grid, mm_placeholders=ranges, im_token_id=oracle.pad,
                       batched_keys=["image_grid_thw", "patches_per_image"],
                       flat_keys={"pixel_values": "patches_per_image"}, keep_on_cpu_keys=["image_grid_thw"])
        mm.model_specific_tensors["patches_per_image"].CopyFrom(tensor(rows))
        return ids, ids, imgs, mm
    if name == "image_then_long_text":  # expanded runs found without ranges, a prompt of several blocks
        imgs = oracle.images([shape(4, size=(84, 56))])
        ids = oracle.chat_ids(data.filler(random.Random(4), 8) * 2 + what, 1, imgs.tokens_per_image)
        assert len(ids) > 300
        return ids, ids, imgs, mm_inputs(imgs.pixel_values, imgs.grid)
    if name == "raw_uint8":  # SMG's form when mm_device_do_normalize: raw uint8 patches, exact pad ranges
        imgs = oracle.images([shape(5)])
        ids = oracle.chat_ids(colour, 1, imgs.tokens_per_image)
        ranges = [pb.PlaceholderRange(offset=ids.index(oracle.pad), length=imgs.tokens_per_image[0])]
        return ids, ids, imgs, mm_inputs(imgs.raw, imgs.grid, mm_placeholders=ranges)
    raise AssertionError(name)


IMAGE_CASES = ["one_image_float", "two_images_sizes", "image_then_long_text", "raw_uint8"]


@pytest.mark.parametrize("name", IMAGE_CASES)
async def test_greedy_answer_equals_hf(shapes_stub, shapes_oracle, name):
    hf_ids, sent_ids, imgs, mm = _case(shapes_oracle, name)
    reference, gaps = shapes_oracle.greedy(hf_ids, imgs, 2)  # the answer word, then <|im_end|>
    assert reference[1] == shapes_oracle.tokenizer.eos_token_id and min(gaps) >= DECISIVE_GAP, (reference, gaps)
    [done] = [r async for r in shapes_stub.Generate(request(sent_ids, mm=mm, temperature=0.0, max_tokens=NEW_TOKENS))]
    print(f"{name}: {shapes_oracle.tokenizer.decode(reference[:1])!r}, HF gaps {[round(g, 2) for g in gaps]}")
    assert done.complete.prompt_tokens == len(hf_ids)
    assert list(done.complete.output_ids) == reference and done.complete.finish_reason == "stop"


@pytest.mark.parametrize("name", ["text", *IMAGE_CASES])
async def test_teacher_forced_logprobs_match_hf(shapes_stub, shapes_oracle, name):
    oracle, stub = shapes_oracle, shapes_stub
    hf_ids, sent_ids, imgs, mm = _case(oracle, name)
    reference, _ = oracle.greedy(hf_ids, imgs, NEW_TOKENS)
    hf_lp = oracle.log_softmax(hf_ids + reference, imgs)
    req = request(sent_ids + reference, mm=mm, temperature=0.0, max_tokens=1, prompt_logprobs=0)
    [done] = [r async for r in stub.Generate(req)]
    got = done.complete.input_logprobs
    assert list(got.token_ids) == hf_ids + reference  # the prompt as run: placeholders expanded
    n = len(hf_ids)
    worst = 0.0
    for k, token in enumerate(reference):
        ours = got.token_logprobs[n + k].value
        theirs = float(hf_lp[n + k - 1, token])
        worst = max(worst, abs(ours - theirs))
    print(f"{name}: max |logprob - HF| over {len(reference)} tokens = {worst:.2e}")
    assert worst < LOGPROB_TOL
