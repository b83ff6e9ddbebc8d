"""Qwen2.5-VL and Qwen3-VL, each on its own real engine behind real gRPC, against Hugging Face.

Per family (random tiny checkpoints from `tinyvlm.build --family`): text only, one image (one
placeholder, raw uint8), two images of different sizes (expanded, float pixels, SMG's ranges
and layout keys). The foundation's two-part oracle: teacher-forced logprobs within 1e-3, and
greedy tokens equal except where HF's own top-2 gap is a near-tie (< 1e-3: random weights).
Also: GetModelInfo / GetServerInfo name the family and its limits, and a tensor set that
does not fit the family is INVALID_ARGUMENT naming the tensor.
"""

import dataclasses

import grpc
import pytest
import pytest_asyncio
import torch

from tests.conftest import _channel, _serve, _start_engine
from tests.fixtures import FAMILY_MODELS, image, mm_inputs, request, tensor
from tests.oracle import Oracle
from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine
NEW_TOKENS = 12
LOGPROB_TOL = 1e-3
TIE_GAP = 1e-3


@dataclasses.dataclass
class Family:
    name: str
    stub: pb_grpc.VllmEngineStub
    oracle: Oracle


@pytest_asyncio.fixture(scope="module", params=list(FAMILY_MODELS))
async def family(request):
    """One engine per family, started once for all of this module's tests on it."""
    path = FAMILY_MODELS[request.param]
    if not (path / "RECIPE").exists():
        pytest.fail(f"tiny {request.param} missing at {path}: run `make model` (make test does)")
    engine = await _start_engine(path)
    try:
        async with _serve(engine, path) as server, _channel(server.port) as channel:
            yield Family(request.param, pb_grpc.VllmEngineStub(channel), Oracle(path))
    finally:
        engine.shutdown()


def _case(oracle: Oracle, name: str):
    """(expanded ids for HF, ids as sent, Images or None, MultimodalInputs or None)."""
    if name == "text":
        ids = oracle.chat_ids("Describe the image.")
        return ids, ids, None, None
    if name == "one_image_uint8":  # one placeholder, raw uint8 patches (SMG's form)
        imgs = oracle.images([image(112, 112, seed=21)])
        ids = oracle.chat_ids("Describe the image.", 1, imgs.tokens_per_image)
        return ids, oracle.chat_ids("Describe the image.", 1), imgs, mm_inputs(imgs.raw, imgs.grid)
    if name == "two_images_float":  # expanded, ranges over <|vision_start|>..<|vision_end|>, layout keys
        imgs = oracle.images([image(112, 168, seed=22), image(224, 112, seed=23)])
        ids = oracle.chat_ids("What is in the image?", 2, imgs.tokens_per_image)
        starts = [i for i, t in enumerate(ids) if t == oracle.vs]
        ranges = [pb.PlaceholderRange(offset=s, length=n + 2) for s, n in zip(starts, imgs.tokens_per_image)]
        mm = mm_inputs(imgs.pixel_values, imgs.grid, mm_placeholders=ranges, im_token_id=oracle.pad,
                       batched_keys=["image_grid_thw", "patches_per_image"],
                       flat_keys={"pixel_values": "patches_per_image"}, keep_on_cpu_keys=["image_grid_thw"])
        mm.model_specific_tensors["patches_per_image"].CopyFrom(tensor(imgs.grid.prod(-1)))
        return ids, ids, imgs, mm
    raise AssertionError(name)


CASES = ["text", "one_image_uint8", "two_images_float"]


@pytest.mark.parametrize("name", CASES)
async def test_greedy_matches_hf_except_at_near_ties(family, name):
    hf_ids, sent_ids, imgs, mm = _case(family.oracle, name)
    reference, gaps = family.oracle.greedy(hf_ids, imgs, NEW_TOKENS)
    req = request(sent_ids, mm=mm, temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    [done] = [r.complete async for r in family.stub.Generate(req)]
    assert done.prompt_tokens == len(hf_ids)
    ours = list(done.output_ids)
    parted = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), None)
    if parted is not None:
        print(f"{family.name}/{name}: parted from HF at token {parted}, HF top-2 gap {gaps[parted]:.2e}")
        assert gaps[parted] < TIE_GAP, f"{family.name}/{name}: token {parted} differs with HF gap {gaps[parted]:.3g}"


@pytest.mark.parametrize("name", CASES)
async def test_teacher_forced_logprobs_match_hf(family, name):
    hf_ids, sent_ids, imgs, mm = _case(family.oracle, name)
    reference, _ = family.oracle.greedy(hf_ids, imgs, NEW_TOKENS)
    hf_lp = family.oracle.log_softmax(hf_ids + reference, imgs)
    req = request(sent_ids + reference, mm=mm, temperature=0.0, max_tokens=1, prompt_logprobs=0)
    [done] = [r.complete async for r in family.stub.Generate(req)]
    assert list(done.input_logprobs.token_ids) == hf_ids + reference
    n = len(hf_ids)
    worst = max(abs(done.input_logprobs.token_logprobs[n + k].value - float(hf_lp[n + k - 1, t]))
                for k, t in enumerate(reference))
    print(f"{family.name}/{name}: max |logprob - HF| over {len(reference)} tokens = {worst:.2e}")
    assert worst < LOGPROB_TOL


async def test_info_names_the_family(family):
    info = await family.stub.GetModelInfo(pb.GetModelInfoRequest())
    server = await family.stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.model_type == family.name and info.supports_vision
    assert list(info.architectures) == [type(family.oracle.model).__name__]
    assert "image=8" in server.mm_item_limits


async def test_patches_of_another_family_are_refused(family):
    """Qwen2/2.5-VL patches are 14 px (1176 values), Qwen3-VL's 16 px (1536): the wrong width is named."""
    imgs = family.oracle.images([image(112, 112, seed=24)])
    width = imgs.raw.shape[1]
    wrong = torch.zeros(imgs.raw.shape[0], 1176 if width == 1536 else 1536, dtype=torch.uint8)
    ids = family.oracle.chat_ids("Describe the image.", 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await family.stub.Generate(request(ids, mm=mm_inputs(wrong, imgs.grid), max_tokens=1)).read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mm_inputs.pixel_values" in err.value.details() and str(width) in err.value.details()
