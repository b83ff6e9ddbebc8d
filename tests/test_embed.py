"""Embed on vLLM's pooling runner: the trained shapes checkpoint converted to embeddings (`--runner pooling
--convert embed`, vLLM's default LAST pooling, normalised), through gRPC, against Hugging Face.

- parity: the pooled, normalised last hidden state transformers computes (float32) on the same ids and
  pixels, for text, one image and two images;
- images through our extension field, inline, via /dev/shm, and by reference to an identity;
- it sees: asked an image's shape, an image's nearest neighbour is mostly one of the same shape;
- the runner decides the RPC: Generate on the pooling engine and Embed on a generative one are
  FAILED_PRECONDITION naming the flag; bad input is a field-named INVALID_ARGUMENT and the engine keeps serving.
"""

import asyncio
import random

import grpc
import pytest
import pytest_asyncio
import torch

from harness.processes import http_json
from tests.conftest import _channel, _serve, _start_engine
from tests.fixtures import ENGINE_ARGS, SHAPES_MODEL, mm_inputs, reference_inputs, request, tensor
from tests.test_gateway import _launch
from tests.test_shm import ours_left, shm_tensor
from tinytrain import data
from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine
EMBED_ARGS = ENGINE_ARGS + ("--runner", "pooling", "--convert", "embed")
TOLERANCE, MIN_COSINE = 1e-4, 0.99999


@pytest_asyncio.fixture(scope="module")
async def embed_server():
    engine = await _start_engine(SHAPES_MODEL, EMBED_ARGS)
    try:
        async with _serve(engine, SHAPES_MODEL) as server:
            yield server
    finally:
        engine.shutdown()


@pytest_asyncio.fixture(scope="module")
async def embed_stub(embed_server):
    async with _channel(embed_server.port) as channel:
        yield pb_grpc.VllmEngineStub(channel)


def embed_request(ids, mm=None, extra=(), request_id="") -> pb.EmbedRequest:
    req = pb.EmbedRequest(request_id=request_id, tokenized=pb.TokenizedInput(input_ids=list(ids)), extra_mm_inputs=list(extra))
    if mm is not None:
        req.mm_inputs.CopyFrom(mm)
    return req


async def embed(stub, ids, mm=None) -> tuple[torch.Tensor, pb.EmbedResponse]:
    response = await stub.Embed(embed_request(ids, mm))
    return torch.tensor(list(response.embedding)), response


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff, cosine = float((ours - theirs).abs().max()), float(torch.dot(ours, theirs) / (ours.norm() * theirs.norm()))
    assert diff <= TOLERANCE and cosine >= MIN_COSINE, (diff, cosine)


def _shapes(seed: int, n: int):
    rng = random.Random(seed)
    return [data.make_sample(rng) for _ in range(n)]


async def test_text_equals_transformers(embed_stub, shapes_oracle):
    ids = shapes_oracle.chat_ids("What shape is it? Answer in one word.")
    ours, response = await embed(embed_stub, ids)
    assert response.embedding_dim == len(response.embedding) == shapes_oracle.model.config.text_config.hidden_size
    assert response.prompt_tokens == len(ids)
    assert abs(float(ours.norm()) - 1.0) < 1e-5, "vLLM's default for a converted model normalises"
    _close(ours, shapes_oracle.embedding(ids))


@pytest.mark.parametrize("count", [1, 2])
async def test_images_equal_transformers(embed_stub, shapes_oracle, count):
    samples = _shapes(5 + count, count)
    imgs = shapes_oracle.images([s.image for s in samples])
    ids = shapes_oracle.chat_ids("What shape is it?", count, imgs.tokens_per_image)
    ours, response = await embed(embed_stub, ids, mm_inputs(imgs.raw, imgs.grid))
    assert response.prompt_tokens == len(ids)
    _close(ours, shapes_oracle.embedding(ids, imgs))
    # The gateway's compact form (one placeholder per image) is expanded as for Generate.
    compact, _ = await embed(embed_stub, shapes_oracle.chat_ids("What shape is it?", count), mm_inputs(imgs.raw, imgs.grid))
    assert torch.equal(compact, ours)


async def test_shm_and_reference_by_hash_give_the_same_embedding(embed_stub, shapes_oracle):
    [sample] = _shapes(21, 1)
    imgs = shapes_oracle.images([sample.image])
    ids = shapes_oracle.chat_ids("What colour is the shape?", 1)
    call = embed_stub.Embed(embed_request(ids, mm_inputs(imgs.raw, imgs.grid)))
    identity = dict(await call.initial_metadata())["vlm-mm-identities"]
    inline = torch.tensor(list((await call).embedding))
    via_shm, _ = await embed(embed_stub, ids, pb.MultimodalInputs(
        pixel_values=shm_tensor(imgs.raw), model_specific_tensors={"image_grid_thw": tensor(imgs.grid)}))
    assert torch.equal(via_shm, inline) and not ours_left()
    by_hash, _ = await embed(embed_stub, ids, reference_inputs(imgs.grid, [identity]))
    assert torch.equal(by_hash, inline)


async def test_images_of_one_shape_lie_together(embed_stub, shapes_oracle):
    """Nearest neighbour (cosine) of each image's embedding, asked its shape: mostly one of the same shape."""
    samples = _shapes(99, 40)
    vectors = []
    for s in samples:
        imgs = shapes_oracle.images([s.image])
        vec, _ = await embed(embed_stub, shapes_oracle.chat_ids(data.QUESTIONS["shape"], 1), mm_inputs(imgs.raw, imgs.grid))
        vectors.append(vec)
    sims = torch.stack(vectors) @ torch.stack(vectors).T
    sims.fill_diagonal_(-2.0)
    nearest = sims.argmax(-1).tolist()
    same = sum(samples[i].shape == samples[j].shape for i, j in enumerate(nearest)) / len(samples)
    print(f"nearest neighbour of the same shape: {same:.2f} (chance about {1 / len(data.SHAPES):.2f})")
    assert same >= 0.8


async def test_generate_on_a_pooling_engine_and_embed_on_a_generative_one_name_the_flag(embed_stub, stub, oracle):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [r async for r in embed_stub.Generate(request([1, 2, 3], max_tokens=2))]
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--runner generate" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(embed_request(oracle.chat_ids("hello")))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--runner pooling" in err.value.details()
    info = await embed_stub.GetModelInfo(pb.GetModelInfoRequest())
    assert not info.is_generation


async def test_bad_input_names_the_field_and_the_engine_keeps_serving(embed_stub, shapes_oracle):
    imgs = shapes_oracle.images([s.image for s in _shapes(3, 1)])
    ids = shapes_oracle.chat_ids("What shape is it?", 1)
    vocab = shapes_oracle.model.config.text_config.vocab_size
    cases = {
        "missing ids": (pb.EmbedRequest(), "tokenized: missing"),
        "empty ids": (embed_request([]), "tokenized.input_ids: empty"),
        "id outside vocab": (embed_request([1, vocab]), "tokenized.input_ids[1]"),
        "over the context": (embed_request([5] * 4097), "exceeds the context"),
        "no placeholder": (embed_request(shapes_oracle.chat_ids("hi"), mm_inputs(imgs.raw, imgs.grid)), "1 images"),
        "pixel bytes": (embed_request(ids, pb.MultimodalInputs(
            pixel_values=pb.TensorData(shape=list(imgs.raw.shape), dtype="uint8", inline=b"\0"),
            model_specific_tensors={"image_grid_thw": tensor(imgs.grid)})), "mm_inputs.pixel_values"),
        "second image batch": (embed_request(ids, mm_inputs(imgs.raw, imgs.grid), extra=[mm_inputs(imgs.raw, imgs.grid)]),
                               "extra_mm_inputs[0].modality"),
    }
    for name, (req, named) in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await embed_stub.Embed(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
        assert named in err.value.details(), (name, err.value.details())
    ours, _ = await embed(embed_stub, ids, mm_inputs(imgs.raw, imgs.grid))
    _close(ours, shapes_oracle.embedding(shapes_oracle.chat_ids("What shape is it?", 1, imgs.tokens_per_image), imgs))


@pytest.mark.gateway
async def test_embeddings_through_smg_equal_a_direct_call(embed_server, embed_stub, shapes_oracle, tmp_path_factory):
    """SMG's /v1/embeddings tokenizes the text as the tokenizer does by default (no chat template) and calls Embed."""
    text = "A red star on a grey background."
    ids = shapes_oracle.tokenizer.encode(text)
    direct, _ = await embed(embed_stub, ids)
    async for gw in _launch(embed_server, str(SHAPES_MODEL), tmp_path_factory, "inline"):
        with gw.dump_log_on_failure():
            status, answer = await asyncio.to_thread(http_json, "POST", f"{gw.url}/v1/embeddings",
                                                     {"model": gw.model, "input": text})
            assert status == 200, answer
            assert torch.equal(torch.tensor(answer["data"][0]["embedding"]), direct)
            assert answer["usage"]["prompt_tokens"] == len(ids)
    _close(direct, shapes_oracle.embedding(ids))
