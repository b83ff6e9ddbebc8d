"""Every registered family (engine_adapter/families), images and video, each on its own real engine behind
real gRPC, against Hugging Face; and each family module's description against HF's own processor.

Per family (random tiny checkpoints from `tinyvlm.build --all`): text only, one image (one
placeholder, raw uint8), two images of different sizes (expanded, float pixels, SMG's ranges
and layout keys), one short video (4 frames; SMG's VIDEO batch: float `pixel_values`,
`video_grid_thw`, `video_second_per_grid`) sent as one placeholder that the servicer expands
with the family's layout (Qwen3-VL: per-frame timestamps and markers), and a video then an
image in one prompt (`mm_inputs` + `extra_mm_inputs`; the video expanded, with its range). The foundation's two-part oracle: teacher-forced logprobs
within 1e-3, and greedy tokens equal except where HF's own top-2 gap is a near-tie (< 1e-3:
random weights). Also: GetModelInfo / GetServerInfo name the family and its limits, and a
tensor set that does not fit the family is INVALID_ARGUMENT naming the tensor.
"""

import dataclasses
import inspect
import types

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
import transformers
from transformers import AutoConfig, AutoProcessor
from transformers.video_utils import VideoMetadata

from engine_adapter.families import FAMILIES
from servicer.tensors import decode_tensor
from tests.conftest import _channel, _serve, _start_engine
from tests.fixtures import FAMILY_ENGINE_ARGS, FAMILY_MODELS, ROOT, image, mm_inputs, request, tensor, video_inputs
from tests.oracle import Images, Oracle, Videos
from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine
NEW_TOKENS = 12
LOGPROB_TOL = 1e-3
TIE_GAP = 1e-3
BLOCK = 128  # the CPU engine's KV block


@dataclasses.dataclass
class Family:
    name: str
    stub: pb_grpc.VllmEngineStub
    oracle: Oracle
    server: object  # servicer.server.Server, for the gateway
    path: str


@pytest_asyncio.fixture(scope="module", params=list(FAMILY_MODELS))
async def family(request):
    """One engine per family, started once for all of this module's tests on it."""
    path = FAMILY_MODELS[request.param]
    if not (path / "RECIPE").exists():
        pytest.fail(f"tiny {request.param} missing at {path}: run `make model` (make test does)")
    engine = await _start_engine(path, FAMILY_ENGINE_ARGS)
    try:
        async with _serve(engine, path) as server, _channel(server.port) as channel:
            yield Family(request.param, pb_grpc.VllmEngineStub(channel), Oracle(path), server, str(path))
    finally:
        engine.shutdown()


def _clip(seed: int, size=(112, 112), frames: int = 4) -> np.ndarray:
    return np.stack([np.asarray(image(*size, seed=seed + k)) for k in range(frames)])


@dataclasses.dataclass
class Case:
    hf_ids: list[int]  # expanded, as HF runs them
    sent_ids: list[int]  # as the gateway sends them
    images: Images | None = None
    videos: Videos | None = None
    batches: tuple[pb.MultimodalInputs, ...] = ()  # mm_inputs, then extra_mm_inputs


def _video(oracle: Oracle, videos: Videos, start: int | None = None, block: list[int] | None = None) -> pb.MultimodalInputs:
    """With `start`/`block`: the expanded form. Where the block is more than one run of pads (Qwen3-VL's
    per-frame layout), the range runs from frame 0's timestamp to the last frame's end marker (inside the
    template's outer markers), pads named by im_token_id, as SMG sends it.
    Without: one placeholder, expanded by the servicer with the family's layout."""
    if start is None or block.count(oracle.video_pad) == len(block) - 2:
        return video_inputs(videos)
    return video_inputs(videos, im_token_id=oracle.video_pad,
                        mm_placeholders=[pb.PlaceholderRange(offset=start + 1, length=len(block) - 2)])


def _case(oracle: Oracle, name: str) -> Case:
    if name == "text":
        ids, _ = oracle.prompt("Describe the image.", [])
        return Case(ids, ids)
    if name == "one_image_uint8":  # one placeholder, raw uint8 patches (SMG's form)
        imgs = oracle.images([image(112, 112, seed=21)])
        ids, _ = oracle.prompt("Describe the image.", [oracle.image_block(imgs.tokens_per_image[0])])
        sent, _ = oracle.prompt("Describe the image.", [oracle.image_block()])
        return Case(ids, sent, imgs, batches=(mm_inputs(imgs.raw, imgs.grid),))
    if name == "two_images_float":  # expanded, ranges over <|vision_start|>..<|vision_end|>, layout keys
        imgs = oracle.images([image(112, 168, seed=22), image(224, 112, seed=23)])
        ids, starts = oracle.prompt("What is in the image?", [oracle.image_block(n) for n in imgs.tokens_per_image])
        ranges = [pb.PlaceholderRange(offset=s, length=n + 2) for s, n in zip(starts, imgs.tokens_per_image)]
        mm = mm_inputs(imgs.pixel_values, imgs.grid, mm_placeholders=ranges, im_token_id=oracle.pad,
                       batched_keys=["image_grid_thw", "patches_per_image"],
                       flat_keys={"pixel_values": "patches_per_image"}, keep_on_cpu_keys=["image_grid_thw"])
        mm.model_specific_tensors["patches_per_image"].CopyFrom(tensor(imgs.grid.prod(-1)))
        return Case(ids, ids, imgs, batches=(mm,))
    if name == "video":  # one placeholder, expanded by the servicer with the family's own layout
        vids = oracle.videos([_clip(30)], fps=4.0)  # 0.5 s per grid step, not vLLM's default of 1
        ids, _ = oracle.prompt("What happens in the video?", [oracle.video_block(vids, 0)])
        sent, _ = oracle.prompt("What happens in the video?", [oracle.video_block(vids, 0, expanded=False)])
        return Case(ids, sent, videos=vids, batches=(_video(oracle, vids),))
    if name == "video_then_image":  # the image in mm_inputs, the video (expanded, with its range) in extra_mm_inputs
        vids, imgs = oracle.videos([_clip(40, size=(112, 168))]), oracle.images([image(112, 112, seed=41)])
        vblock = oracle.video_block(vids, 0)
        ids, [start, _] = oracle.prompt("Compare.", [vblock, oracle.image_block(imgs.tokens_per_image[0])])
        sent, _ = oracle.prompt("Compare.", [vblock, oracle.image_block()])
        return Case(ids, sent, imgs, vids, (mm_inputs(imgs.raw, imgs.grid), _video(oracle, vids, start, vblock)))
    raise AssertionError(name)


CASES = ["text", "one_image_uint8", "two_images_float", "video", "video_then_image"]


def _request(case: Case, ids: list[int], **sampling) -> pb.GenerateRequest:
    return request(ids, mm=case.batches[0] if case.batches else None, extra=case.batches[1:], **sampling)


@pytest.mark.parametrize("name", CASES)
async def test_greedy_matches_hf_except_at_near_ties(family, name):
    case = _case(family.oracle, name)
    reference, gaps = family.oracle.greedy(case.hf_ids, case.images, NEW_TOKENS, case.videos)
    req = _request(case, case.sent_ids, temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    [done] = [r.complete async for r in family.stub.Generate(req)]
    assert done.prompt_tokens == len(case.hf_ids)
    ours = list(done.output_ids)
    parted = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), None)
    if parted is not None:
        print(f"{family.name}/{name}: parted from HF at token {parted}, HF top-2 gap {gaps[parted]:.2e}")
        assert gaps[parted] < TIE_GAP, f"{family.name}/{name}: token {parted} differs with HF gap {gaps[parted]:.3g}"


@pytest.mark.parametrize("name", CASES)
async def test_teacher_forced_logprobs_match_hf(family, name):
    case = _case(family.oracle, name)
    reference, _ = family.oracle.greedy(case.hf_ids, case.images, NEW_TOKENS, case.videos)
    hf_lp = family.oracle.log_softmax(case.hf_ids + reference, case.images, case.videos)
    req = _request(case, case.sent_ids + reference, temperature=0.0, max_tokens=1, prompt_logprobs=0)
    [done] = [r.complete async for r in family.stub.Generate(req)]
    assert list(done.input_logprobs.token_ids) == case.hf_ids + reference
    n = len(case.hf_ids)
    worst = max(abs(done.input_logprobs.token_logprobs[n + k].value - float(hf_lp[n + k - 1, t]))
                for k, t in enumerate(reference))
    print(f"{family.name}/{name}: max |logprob - HF| over {len(reference)} tokens = {worst:.2e}")
    assert worst < LOGPROB_TOL


async def test_info_names_the_family(family):
    info = await family.stub.GetModelInfo(pb.GetModelInfoRequest())
    server = await family.stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.model_type == family.name and info.supports_vision
    assert list(info.architectures) == [type(family.oracle.model).__name__]
    assert server.mm_item_limits == "image=8,video=2"


def _patch_dims() -> set[int]:
    return {f.patch_dim(types.SimpleNamespace(**f.tiny.vision)) for f in FAMILIES}


async def test_patches_of_another_family_are_refused(family):
    """Another family's patch width (Qwen2/2.5-VL: 14 px, 1176 values; Qwen3-VL: 16 px, 1536) is refused,
    naming the width this one takes."""
    imgs = family.oracle.images([image(112, 112, seed=24)])
    width = imgs.raw.shape[1]
    wrong = torch.zeros(imgs.raw.shape[0], min(_patch_dims() - {width}), dtype=torch.uint8)
    ids, _ = family.oracle.prompt("Describe the image.", [family.oracle.image_block()])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await family.stub.Generate(request(ids, mm=mm_inputs(wrong, imgs.grid), max_tokens=1)).read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mm_inputs.pixel_values" in err.value.details() and str(width) in err.value.details()


@pytest.mark.gateway
async def test_image_chat_completion_through_smg(family, tmp_path_factory, capture):
    """The real SMG gateway recognises the family from the checkpoint and serves an image chat
    completion through us: HTTP 200, the ids and grid SMG sent are HF's, and the answer is HF greedy."""
    gateway = pytest.importorskip("tests.test_gateway")
    pil = [image(112, 112, seed=51)]
    async for gw in gateway._launch(family.server, family.path, tmp_path_factory, "inline"):
        with gw.dump_log_on_failure():
            status, answer = await gw.chat(gateway._chat_body(gw.model, "Describe the image.", pil))
            assert status == 200, f"HTTP {status}: {answer}"
            [sent], [served] = capture.requests, capture.outputs
            imgs = family.oracle.images(pil)
            ids, _ = family.oracle.prompt("Describe the image.", [family.oracle.image_block(imgs.tokens_per_image[0])])
            assert list(sent.tokenized.input_ids) == ids
            grid = decode_tensor("grid", sent.mm_inputs.model_specific_tensors["image_grid_thw"]).to(torch.int64)
            assert torch.equal(grid, imgs.grid)
            reference, gaps = family.oracle.greedy(ids, imgs, gateway.MAX_TOKENS)
            print(f"\n{family.name} via SMG: {len(ids)} ids, served {served}, text {answer['choices'][0]['message']['content']!r}")
            parted = next((i for i, (a, b) in enumerate(zip(served, reference)) if a != b), None)
            assert parted is None or gaps[parted] < TIE_GAP, (parted, served, reference)


async def test_videos_are_cached_by_identity(family):
    """The same video again hits the prefix cache through its blocks; another video in the same
    prompt shape hits nothing from the block holding it (Qwen3-VL included, whose video frames
    keep their pad ids: the identity alone keys the cache)."""
    text = "Describe every frame of the video in detail. " * 20

    async def send(seed: int) -> pb.GenerateComplete:
        vids = family.oracle.videos([_clip(seed)])
        block = family.oracle.video_block(vids, 0)
        ids, [start] = family.oracle.prompt(text, [block])
        assert start + len(block) < BLOCK < len(ids) - 1, "the video must sit inside the first full block"
        case = Case(ids, ids, videos=vids, batches=(_video(family.oracle, vids, start, block),))
        [done] = [r.complete async for r in family.stub.Generate(_request(case, ids, max_tokens=1))]
        return done

    await send(60)
    again, other = await send(60), await send(61)
    assert again.cached_tokens >= BLOCK
    assert other.cached_tokens == 0


async def test_an_image_range_over_a_video_is_refused(family):
    case = _case(family.oracle, "video_then_image")
    image_batch = pb.MultimodalInputs()
    image_batch.CopyFrom(case.batches[0])
    video_start = case.sent_ids.index(family.oracle.vs)
    image_batch.mm_placeholders.append(pb.PlaceholderRange(offset=video_start, length=case.images.tokens_per_image[0]))
    req = _request(dataclasses.replace(case, batches=(image_batch, *case.batches[1:])), case.sent_ids, max_tokens=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await family.stub.Generate(req).read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_types[0])
def test_family_module_agrees_with_hf(family):
    """The family module against HF's config, processor and model class for its tiny checkpoint (no engine):
    token ids, merge size, patch width, what an image and a 4-frame video placeholder (0.5 s per step)
    expand to, and whether M-RoPE reads the seconds per step."""
    path = ROOT / family.tiny.folder
    config, processor = AutoConfig.from_pretrained(path), AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    assert config.model_type in family.model_types and config.architectures[0] in family.architectures
    assert "-random-" in family.tiny.version  # how `make clean` tells a random checkpoint from a trained one
    ids = family.token_ids(config)
    assert ids == {name: tok.convert_tokens_to_ids(t.text) for name, t in zip(ids, family.tokens)}
    merge = family.merge_size(config.vision_config)
    assert merge == processor.image_processor.merge_size == processor.video_processor.merge_size
    imgs = processor.image_processor(images=[image(112, 168, seed=1)], return_tensors="pt")
    assert imgs["pixel_values"].shape[1] == family.patch_dim(config.vision_config)
    grid = imgs["image_grid_thw"][0].tolist()
    assert tok.encode(processor.replace_image_token(imgs, 0)) == [ids["image_pad"]] * family.embeddings(grid, merge)

    vids = processor.video_processor(videos=[_clip(2)], return_tensors="pt", do_sample_frames=False)
    grid = vids["video_grid_thw"][0].tolist()
    step = 0.5
    frames = grid[0] * processor.video_processor.temporal_patch_size
    meta = VideoMetadata(total_num_frames=frames, fps=processor.video_processor.temporal_patch_size / step,
                         frames_indices=list(range(frames)))
    hf = tok.encode(processor.replace_video_token({"video_grid_thw": vids["video_grid_thw"], "video_metadata": [meta]}, 0))
    if family.video_frames:
        stamps = lambda s: tok.encode(family.stamp_text(s))  # noqa: E731
        ours = family.video_tokens(grid, merge, step, ids["video_pad"], ids["vision_start"], ids["vision_end"], stamps)
    else:
        ours = [ids["video_pad"]] * family.embeddings(grid, merge)
    assert hf == ours
    forward = inspect.signature(getattr(transformers, config.architectures[0]).forward).parameters
    assert ("second_per_grid_ts" in forward) == (family.video.seconds == "second_per_grid_ts")
