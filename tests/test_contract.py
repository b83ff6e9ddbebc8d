"""The rest of SMG's VllmEngine contract over real gRPC on the real engine: stop strings, every
structured-output kind, truncate_prompt_tokens, GetTokenizer, StartProfile/StopProfile, info fields."""

import asyncio
import hashlib
import io
import json
import pathlib
import re
import zipfile

import grpc
import pytest
from transformers import AutoTokenizer

from tests.conftest import GENERATION_DEFAULTS
from tests.fixtures import image, mm_inputs, request
from vlm_proto import common_pb2, vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine


async def _run(stub, req) -> tuple[list[int], pb.GenerateComplete]:
    """(every output id, streamed or not, in order; the final complete)."""
    responses = [r async for r in stub.Generate(req)]
    completes = [r.complete for r in responses if r.HasField("complete")]
    if req.stream:
        ids = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    else:
        ids = list(completes[-1].output_ids)
    return ids, completes[-1]


# ------------------------------------------------------------------ stop strings


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("include", [False, True], ids=["excluded", "included"])
async def test_stop_string_ends_generation_and_output_ids_stay_the_generated_ids(stub, oracle, stream, include):
    tok = oracle.tokenizer
    ids = oracle.chat_ids("Describe the image.")
    free, _ = await _run(stub, request(ids, temperature=0.0, max_tokens=16, ignore_eos=True))
    text = tok.decode(free)
    stop = text[len(tok.decode(free[:3])) - 2:][:3]  # three characters across the 3rd token's boundary
    # vLLM's definition: the ids run up to and including the token that completes the stop string,
    # whether or not the string is included in the (text) output.
    want = next(free[:k] for k in range(1, len(free) + 1) if stop in tok.decode(free[:k]))
    assert len(want) < len(free)

    got, done = await _run(stub, request(ids, temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop, "\x07never"],
                                         include_stop_str_in_output=include, stream=stream))
    assert got == want
    assert (done.finish_reason, done.WhichOneof("matched_stop"), done.matched_stop_str) == ("stop", "matched_stop_str", stop)
    assert done.completion_tokens == (len(want) if not stream else done.completion_tokens)


async def test_stop_token_is_reported_as_matched_token_id(stub, oracle):
    ids = oracle.chat_ids("Describe the image.")
    free, _ = await _run(stub, request(ids, temperature=0.0, max_tokens=8, ignore_eos=True))
    got, done = await _run(stub, request(ids, temperature=0.0, max_tokens=8, ignore_eos=True, stop_token_ids=[free[2]]))
    assert got == free[:free.index(free[2]) + 1]
    assert (done.finish_reason, done.matched_token_id) == ("stop", free[2])


# ------------------------------------------------------------- structured outputs

CHOICES = ["yes", "no", "maybe"]
CONSTRAINTS = {  # kind -> (constraint kwargs, what the text must fully match)
    "regex": ({"regex": "(cat|dog)[0-9]"}, r"(cat|dog)[0-9]"),
    "choice": ({"choice": pb.ChoiceConstraint(choices=CHOICES)}, "|".join(CHOICES)),
    "grammar": ({"grammar": 'root ::= "a" ("b" | "c")'}, "a[bc]"),
    "structural_tag": ({"structural_tag": json.dumps(
        {"type": "structural_tag", "format": {"type": "const_string", "value": "hello"}})}, "hello"),
}


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
async def test_each_constraint_kind_bounds_the_output(stub, oracle, kind):
    constraint, pattern = CONSTRAINTS[kind]
    ids = oracle.chat_ids("Describe the image.")
    for stream in (False, True):
        got, done = await _run(stub, request(ids, temperature=0.0, max_tokens=24, stream=stream, **constraint))
        text = oracle.tokenizer.decode(got, skip_special_tokens=True)
        assert re.fullmatch(pattern, text), (kind, text)
        assert done.finish_reason == "stop"


async def test_json_constraints_only_ever_emit_valid_json_prefixes(stub, oracle):
    """Random weights pad JSON with the whitespace the grammar allows, so only prefix validity is
    certain here; tests/test_structured.py checks whole answers on the trained model."""
    ids = oracle.chat_ids("Describe the image.")
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}
    for constraint in ({"json_object": True}, {"json_schema": json.dumps(schema)}):
        got, _ = await _run(stub, request(ids, temperature=0.0, max_tokens=24, **constraint))
        text = oracle.tokenizer.decode(got, skip_special_tokens=True)
        assert text.startswith("{") and "\x00" not in text, text


async def test_grammar_from_first_token_tells_vllm_the_reasoning_has_ended(stub, engine, oracle, monkeypatch):
    seen = []
    original = engine._llm.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("reasoning_ended"))
        return original(*args, **kwargs)

    monkeypatch.setattr(engine._llm, "generate", spy)
    ids = oracle.chat_ids("Describe the image.")
    constraint = CONSTRAINTS["choice"][0]
    a, _ = await _run(stub, request(ids, temperature=0.0, max_tokens=8, grammar_from_first_token=True, **constraint))
    b, _ = await _run(stub, request(ids, temperature=0.0, max_tokens=8, **constraint))
    assert seen == [True, None] and a == b  # no reasoning parser here: the grammar starts at once either way


# ------------------------------------------------------------- truncation


async def test_truncate_prompt_tokens_keeps_the_last_tokens(stub, oracle):
    ids = oracle.chat_ids("Describe the image. " * 6)
    keep = len(ids) - 9
    cut, done = await _run(stub, request(ids, temperature=0.0, max_tokens=6, ignore_eos=True, truncate_prompt_tokens=keep))
    direct, _ = await _run(stub, request(ids[-keep:], temperature=0.0, max_tokens=6, ignore_eos=True))
    assert done.prompt_tokens == keep and cut == direct
    whole, done = await _run(stub, request(ids, temperature=0.0, max_tokens=6, ignore_eos=True, truncate_prompt_tokens=-1))
    assert done.prompt_tokens == len(ids)


async def test_truncation_before_an_image_keeps_it_whole(stub, oracle):
    imgs = oracle.images([image(112, 112, seed=31)])
    ids = oracle.chat_ids("What is in the image?", 1)  # one placeholder: expanded to 16 by the servicer
    start = ids.index(oracle.pad) - 2  # cut the system prompt and the user header, not the image
    expanded = len(ids) + 15
    mm = mm_inputs(imgs.pixel_values, imgs.grid)
    cut, done = await _run(stub, request(ids, mm=mm, temperature=0.0, max_tokens=6, ignore_eos=True,
                                         truncate_prompt_tokens=expanded - start))
    direct, _ = await _run(stub, request(ids[start:], mm=mm, temperature=0.0, max_tokens=6, ignore_eos=True))
    assert done.prompt_tokens == expanded - start and cut == direct


# ------------------------------------------------------------- other RPCs


async def test_get_tokenizer_streams_a_zip_a_gateway_can_load(stub, engine, oracle, tmp_path):
    chunks = [c async for c in stub.GetTokenizer(common_pb2.GetTokenizerRequest())]
    data = b"".join(c.data for c in chunks)
    assert all(len(c.data) == 64 * 1024 for c in chunks[:-1]) and [c.sha256 for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    again = b"".join([c.data async for c in stub.GetTokenizer(common_pb2.GetTokenizerRequest())])
    assert again == data  # reproducible: the same digest on every replica
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja",
            "preprocessor_config.json", "generation_config.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Describe the image. <|image_pad|> 0123"
    assert loaded.encode(text) == oracle.tokenizer.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == oracle.tokenizer.apply_chat_template(messages, tokenize=False)


async def test_profile_start_stop_writes_traces_and_refuses_misuse(stub, engine, profile_dir):
    before = set(pathlib.Path(profile_dir).iterdir()) if pathlib.Path(profile_dir).exists() else set()
    started = await stub.StartProfile(common_pb2.StartProfileRequest())
    assert started.success
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartProfile(common_pb2.StartProfileRequest())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "StopProfile" in err.value.details()
    await _run(stub, request([1, 2, 3], temperature=0.0, max_tokens=2))
    assert (await stub.StopProfile(common_pb2.StopProfileRequest())).success
    traces = set(pathlib.Path(profile_dir).iterdir()) - before
    assert any(p.name.endswith(".pt.trace.json.gz") for p in traces), traces
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartProfile(common_pb2.StartProfileRequest(output_dir="/tmp/elsewhere"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "output_dir" in err.value.details()


async def test_profile_without_a_profiler_names_the_flag(shapes_stub):
    for call in (shapes_stub.StartProfile(common_pb2.StartProfileRequest()),
                 shapes_stub.StopProfile(common_pb2.StopProfileRequest())):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--profiler-config" in err.value.details()


async def test_info_reports_what_the_router_reads(stub, engine, model_path):
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import MultiModalBudget

    config = engine._llm.vllm_config
    server = await stub.GetServerInfo(pb.GetServerInfoRequest())
    assert server.constrained_decoding_start == "first_token" and server.engine_reasoning_parser == ""
    assert server.mm_encoder_budget == MultiModalBudget(config, MULTIMODAL_REGISTRY, enable_cache=False).get_encoder_budget() > 0
    assert (server.kv_connector, server.kv_role, server.attention_backend, server.mm_processor) == ("", "", "", "")
    model = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert model.tokenizer_path == model_path and model.max_req_input_len == model.max_context_length - 1
    assert json.loads(model.default_sampling_params_json) == GENERATION_DEFAULTS


async def test_long_quiet_generates_survive_keepalive_pings(server, oracle):
    """SMG keeps its channel alive with HTTP/2 pings; a non-streaming Generate sends nothing until it is
    done. gRPC Core's default server policy answers such pings with GOAWAY (too_many_pings) after two strikes,
    a few seconds in, failing every call on the connection. Here a client pinging as often as gRPC lets it
    (about once a second) waits on four answers of ~4,000 tokens each, which take longer than that."""
    pinging = [("grpc.keepalive_time_ms", 100), ("grpc.keepalive_timeout_ms", 10_000),
               ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)]
    ids = oracle.chat_ids("Count.")
    tokens = 4096 - len(ids)

    async def quiet(stub, k):
        [done] = [r.complete async for r in stub.Generate(request(ids, f"quiet-{k}", temperature=0.0,
                                                                  max_tokens=tokens, ignore_eos=True))]
        return done.completion_tokens

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=pinging) as channel:
        stub = pb_grpc.VllmEngineStub(channel)
        assert await asyncio.gather(*(quiet(stub, k) for k in range(4))) == [tokens] * 4
