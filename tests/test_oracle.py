"""Greedy and teacher-forced parity with Hugging Face transformers, through real gRPC and the real engine.

Proves placeholder expansion, M-RoPE positions and both pixel paths at once.
(a) teacher-forced: the reference continuation is sent as part of the prompt with
    prompt_logprobs; every reference token's logprob must match HF's within 1e-3.
(b) free-running greedy, 16 tokens: identical, except that the random-weight model
    has near-ties, so the sequences may part only where HF's top-2 gap is < 1e-3.
"""

import pytest

from tests.fixtures import image, mm_inputs, request
from tests.oracle import Oracle
from vlm_proto import vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine
NEW_TOKENS = 16
LOGPROB_TOL = 1e-3
TIE_GAP = 1e-3


def _case(oracle: Oracle, name: str):
    """(expanded ids for HF, ids as sent, Images or None, MultimodalInputs or None)."""
    if name == "text":
        ids = oracle.chat_ids("Describe the image. What colour is the shape?")
        return ids, ids, None, None
    if name == "one_image_float":  # one placeholder per image, normalized float pixels
        imgs = oracle.images([image(112, 112, seed=1)])
        ids = oracle.chat_ids("Describe the image.", 1, imgs.tokens_per_image)
        return ids, oracle.chat_ids("Describe the image.", 1), imgs, mm_inputs(imgs.pixel_values, imgs.grid)
    if name == "two_images_sizes":  # expanded, ranges covering <|vision_start|>..<|vision_end|>, SMG's keys
        imgs = oracle.images([image(112, 112, seed=2), image(56, 140, seed=3)])
        ids = oracle.chat_ids("What is in the image?", 2, imgs.tokens_per_image)
        starts = [i for i, t in enumerate(ids) if t == oracle.vs]
        ranges = [pb.PlaceholderRange(offset=s, length=n + 2) for s, n in zip(starts, imgs.tokens_per_image)]
        rows = imgs.grid.prod(-1)
        mm = mm_inputs(imgs.pixel_values, imgs.grid, mm_placeholders=ranges, im_token_id=oracle.pad,
                       batched_keys=["image_grid_thw", "patches_per_image"],
                       flat_keys={"pixel_values": "patches_per_image"}, keep_on_cpu_keys=["image_grid_thw"])
        from tests.fixtures import tensor

        mm.model_specific_tensors["patches_per_image"].CopyFrom(tensor(rows))
        return ids, ids, imgs, mm
    if name == "image_after_long_prefix":  # expanded runs found without ranges
        imgs = oracle.images([image(84, 112, seed=4)])
        prefix = "The quick brown fox jumps over the lazy dog. " * 40
        ids = oracle.chat_ids("Describe this picture in detail.", 1, imgs.tokens_per_image, prefix=prefix)
        assert len(ids) > 300
        return ids, ids, imgs, mm_inputs(imgs.pixel_values, imgs.grid)
    if name == "raw_uint8":  # SMG's form when mm_device_do_normalize: raw uint8 patches, exact pad ranges
        imgs = oracle.images([image(112, 112, seed=5)])
        ids = oracle.chat_ids("What colour is the shape?", 1, imgs.tokens_per_image)
        ranges = [pb.PlaceholderRange(offset=ids.index(oracle.pad), length=imgs.tokens_per_image[0])]
        return ids, ids, imgs, mm_inputs(imgs.raw, imgs.grid, mm_placeholders=ranges)
    raise AssertionError(name)


CASES = ["text", "one_image_float", "two_images_sizes", "image_after_long_prefix", "raw_uint8"]


@pytest.mark.parametrize("name", CASES)
async def test_greedy_matches_hf_except_at_near_ties(stub, oracle, name):
    hf_ids, sent_ids, imgs, mm = _case(oracle, name)
    reference, gaps = oracle.greedy(hf_ids, imgs, NEW_TOKENS)
    [done] = [r async for r in stub.Generate(request(sent_ids, mm=mm, temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))]
    ours = list(done.complete.output_ids)
    assert done.complete.prompt_tokens == len(hf_ids)
    assert len(ours) == NEW_TOKENS
    parted = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), None)
    if parted is not None:
        print(f"{name}: parted from HF at token {parted}, where HF's top-2 gap is {gaps[parted]:.2e}")
        assert gaps[parted] < TIE_GAP, f"{name}: token {parted} differs ({ours[parted]} vs HF {reference[parted]}) with gap {gaps[parted]:.3g}"


@pytest.mark.parametrize("name", CASES)
async def test_teacher_forced_logprobs_match_hf(stub, oracle, name):
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
