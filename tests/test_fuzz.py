"""Property-based fuzzing of Generate on the real server: no generated request is ever INTERNAL or
UNKNOWN, and a valid request succeeds after every batch (the engine keeps serving).

Hypothesis generates the requests (random field values, lengths, dtypes, shapes, placeholder ranges,
constraint strings, shared-memory handles) from a fixed seed, printed with the counts. Its examples run
in a worker thread with a blocking client, while the session's server serves them on the event loop.
"""

import asyncio
import collections
import os

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings, strategies as st

from tests.fixtures import image, mm_inputs, request, tensor
from vlm_proto import common_pb2, vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine

SEED = int(os.environ.get("VLM_FUZZ_SEED", 20261201))
EXAMPLES = 500
BATCH = 50
DEADLINE_S = 30.0  # a deadline is the client's choice: DEADLINE_EXCEEDED is an allowed answer
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

VOCAB = 1024  # the random tiny model's (checked against the engine below)
PAD, VISION_START, VISION_END = 449, 446, 447  # checked against the engine below
DTYPES = ["uint8", "float32", "float16", "bfloat16", "int64", "uint32", "int32", "float64", "", "complex64"]

u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
text = st.text(max_size=12)


def mostly(valid, invalid):
    """`valid` 24 times in 25: about half the requests are valid throughout and reach the engine."""
    return st.integers(0, 24).flatmap(lambda k: invalid if k == 0 else valid)


def maybe(strategy):
    """Unset half the time."""
    return st.one_of(st.none(), strategy)


@st.composite
def sampling(draw) -> pb.SamplingParams:
    token = mostly(st.integers(0, VOCAB - 1), st.one_of(st.integers(VOCAB, VOCAB + 10), u32))
    sp = pb.SamplingParams(
        top_p=draw(mostly(st.floats(0, 1), floats)), top_k=draw(mostly(st.integers(0, 50), u32)),
        min_p=draw(mostly(st.floats(0, 1), floats)), frequency_penalty=draw(mostly(st.floats(-2, 2), floats)),
        presence_penalty=draw(mostly(st.floats(-2, 2), floats)), repetition_penalty=draw(mostly(st.floats(0, 2), floats)),
        min_tokens=draw(mostly(st.integers(0, 3), u32)), stop=draw(st.lists(mostly(st.text(min_size=1, max_size=4), text), max_size=2)),
        stop_token_ids=draw(st.lists(token, max_size=2)), skip_special_tokens=draw(st.booleans()),
        spaces_between_special_tokens=draw(st.booleans()), ignore_eos=draw(st.booleans()),
        n=draw(mostly(st.integers(0, 3), u32)), include_stop_str_in_output=draw(st.booleans()),
        grammar_from_first_token=draw(st.booleans()),
        logit_bias=draw(st.dictionaries(mostly(st.integers(0, VOCAB - 1), i32), mostly(st.floats(-100, 100), floats), max_size=2)),
    )
    # Mostly short generations (fast); unset means "up to the context", which the deadline bounds.
    max_tokens = draw(mostly(st.integers(1, 6), st.one_of(st.just(0), u32, st.none())))
    for name, value in (("temperature", draw(maybe(mostly(st.floats(0, 2), floats)))), ("max_tokens", max_tokens),
                        ("logprobs", draw(maybe(mostly(st.integers(-1, 20), i32)))),
                        ("prompt_logprobs", draw(maybe(mostly(st.integers(-1, 20), i32)))),
                        ("seed", draw(maybe(i32))),
                        ("truncate_prompt_tokens", draw(mostly(st.none(), st.one_of(st.integers(-3, 60), i32))))):
        if value is not None:
            setattr(sp, name, value)
    kind = draw(mostly(st.none(), st.sampled_from(["json_schema", "regex", "grammar", "structural_tag", "json_object", "choice"])))
    if kind == "json_object":
        sp.json_object = draw(st.booleans())
    elif kind == "choice":
        sp.choice.choices.extend(draw(st.lists(text, max_size=3)))
    elif kind is not None:
        setattr(sp, kind, draw(st.one_of(
            text, st.sampled_from(['{"type": "object"}', '{"enum": [1, "a"]}', "[a-z]+", 'root ::= "x"', "(", "{",
                                   '{"type": "structural_tag", "format": {"type": "const_string", "value": "x"}}']))))
    return sp


@st.composite
def tensors(draw, base: torch.Tensor) -> pb.TensorData:
    """A valid tensor, or a mutation of it: a wrong dtype, shape, length or transport."""
    t = tensor(base)
    mutation = draw(mostly(st.just("none"), st.sampled_from(["dtype", "shape", "truncate", "shm", "empty", "no payload"])))
    if mutation == "dtype":
        t.dtype = draw(st.sampled_from(DTYPES))
    elif mutation == "shape":
        del t.shape[:]
        t.shape.extend(draw(st.lists(st.integers(0, 5000), max_size=4)))
    elif mutation == "truncate":
        t.inline = t.inline[: draw(st.integers(0, len(t.inline)))]
    elif mutation == "shm":
        t.shm.CopyFrom(common_pb2.ShmHandle(name=draw(st.one_of(text, st.just("../x"), st.just("fuzz-none"))),
                                            offset=draw(st.integers(0, 2**40)), nbytes=draw(st.integers(0, 2**40))))
    elif mutation == "empty":
        t.inline = b""
    elif mutation == "no payload":
        t.ClearField("inline")
    return t


@st.composite
def multimodal(draw, imgs, at: int) -> pb.MultimodalInputs:
    """The image placed at `at` (one placeholder), with any field possibly broken."""
    mm = mm_inputs(imgs.pixel_values, imgs.grid)
    mm.pixel_values.CopyFrom(draw(tensors(imgs.pixel_values)))
    grid = draw(mostly(st.just(imgs.grid), st.lists(st.integers(-2, 40), min_size=3, max_size=3).map(
        lambda g: torch.tensor([g]))))
    mm.model_specific_tensors["image_grid_thw"].CopyFrom(draw(tensors(grid.to(torch.int64))))
    mm.mm_placeholders.extend(pb.PlaceholderRange(offset=o, length=n) for o, n in draw(mostly(
        st.just([]), st.lists(st.tuples(st.one_of(st.just(at), st.integers(0, 80)), st.integers(0, 40)), max_size=2))))
    mm.mm_hashes.extend(draw(mostly(st.just([]), st.lists(st.one_of(text, st.just("ab" * 16)), max_size=2))))
    if draw(st.booleans()):
        mm.flat_keys["pixel_values"] = draw(mostly(st.just("patches_per_image"), st.just("nope")))
        rows = int(imgs.grid.prod())
        mm.model_specific_tensors["patches_per_image"].CopyFrom(
            draw(tensors(torch.tensor([draw(mostly(st.just(rows), st.integers(-1, 200)))], dtype=torch.int64))))
    mm.batched_keys.extend(draw(mostly(st.just([]), st.lists(st.sampled_from(["image_grid_thw", "x"]), max_size=2))))
    mm.keep_on_cpu_keys.extend(draw(mostly(st.just([]), st.just(["y"]))))
    mm.modality = draw(mostly(st.sampled_from([0, 1]), st.sampled_from([2, 3, 7])))
    if draw(st.booleans()):
        mm.im_token_id = draw(mostly(st.just(PAD), u32))
    return mm


@st.composite
def generate_requests(draw, imgs) -> pb.GenerateRequest:
    token = mostly(st.integers(0, VOCAB - 1), st.integers(VOCAB, 2**32 - 1))
    ids = draw(st.lists(token, min_size=draw(mostly(st.just(1), st.just(0))), max_size=60))
    req = pb.GenerateRequest(request_id=draw(st.one_of(st.just(""), text)), tokenized=pb.TokenizedInput(input_ids=ids),
                             sampling_params=draw(sampling()), stream=draw(st.booleans()))
    if draw(st.booleans()):  # one image, as one placeholder between the vision markers
        at = draw(st.integers(0, len(ids)))
        pads = draw(mostly(st.just(1), st.sampled_from([0, 2, 16])))
        req.tokenized.input_ids[at:at] = [VISION_START] + [PAD] * pads + [VISION_END]
        req.mm_inputs.CopyFrom(draw(multimodal(imgs, at + 1)))
    if draw(mostly(st.just(False), st.just(True))):
        req.ClearField("tokenized") if draw(st.booleans()) else setattr(req, "text", draw(text))
    return req


def _summary(req: pb.GenerateRequest) -> str:
    """The request without tensor bytes (they would drown the report)."""
    copy = pb.GenerateRequest()
    copy.CopyFrom(req)
    for mm in [copy.mm_inputs, *copy.extra_mm_inputs]:
        for t in [mm.pixel_values, *mm.model_specific_tensors.values()]:
            if t.WhichOneof("payload") == "inline":
                t.inline = t.inline[:16]
    return str(copy)


def _fuzz(port: int, imgs, valid: pb.GenerateRequest) -> collections.Counter:
    codes = collections.Counter()
    bad: list[tuple[pb.GenerateRequest, grpc.StatusCode, str]] = []
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.VllmEngineStub(channel)

        def still_serving():
            [done] = [r.complete for r in stub.Generate(valid, timeout=120) if r.HasField("complete")]
            assert len(done.output_ids) == valid.sampling_params.max_tokens

        @seed(SEED)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(generate_requests(imgs))
        def check(req):
            try:
                for _ in stub.Generate(req, timeout=DEADLINE_S):
                    pass
                codes["OK"] += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1
                if err.code() in NEVER:
                    bad.append((req, err.code(), err.details()))
            if sum(codes.values()) % BATCH == 0:
                still_serving()
            assert not bad, f"{bad[-1][1].name}: {bad[-1][2]}\n{_summary(bad[-1][0])}"

        check()
        still_serving()
    return codes


async def test_generated_requests_are_never_internal_and_the_engine_keeps_serving(server, engine, oracle):
    assert (engine.info.vocab_size, oracle.pad) == (VOCAB, PAD)
    assert (engine.info.vision_start_token_id, engine.info.vision_end_token_id) == (VISION_START, VISION_END)
    imgs = oracle.images([image(56, 56, seed=3)])
    valid = request(oracle.chat_ids("Describe the image.", 1), mm=mm_inputs(imgs.pixel_values, imgs.grid),
                    temperature=0.0, max_tokens=3, ignore_eos=True)
    codes = await asyncio.to_thread(_fuzz, server.port, imgs, valid)
    total = sum(codes.values())
    print(f"\nfuzz: seed {SEED}, {total} requests: " + ", ".join(f"{c} {n}" for c, n in codes.most_common()))
    assert total >= EXAMPLES and not NEVER & {grpc.StatusCode[c] for c in codes if c != "OK"}
    assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0  # both sides of the boundary were exercised
