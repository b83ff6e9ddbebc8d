"""The RL control endpoint on the real engine (the trained tiny model), driven over real HTTP, observed over real
gRPC, with Hugging Face transformers on each checkpoint as the oracle.

- A refit from disk makes the next answers the new checkpoint's (ids and logprobs), for a text prompt and
  for an image prompt whose KV and vision embedding were cached before the refit; the version advances.
- Pause modes with requests in flight: keep freezes and resumes with the unpaused tokens; wait drains;
  abort ends with finish reason "abort"; requests sent during a pause wait and then run.
- Bad input: a clear 4xx, the weights unchanged (answers identical), the engine serving.
"""

import asyncio
import json
import random
import os
import shutil

import aiohttp
import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import extra_server
from tests.fixtures import SHAPES_MODEL, SHIFTED_MODEL, mm_inputs, request
from tests.oracle import Oracle
from tinytrain import data
from vlm_proto import vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine
KEY = "rl-test-key"
FILLER = data.filler(random.Random(3), 8)  # puts the image inside full 128-token KV blocks
LOGPROB_TOLERANCE = 1e-3


def test_our_pause_modes_are_vllms():
    """The servicer checks modes without importing vLLM (engine_adapter.types.PAUSE_MODES)."""
    from typing import get_args

    from vllm.v1.engine import PauseMode

    from engine_adapter.types import PAUSE_MODES

    assert set(get_args(PauseMode)) == set(PAUSE_MODES), f"vLLM's PauseMode is now {get_args(PauseMode)}"


@pytest.fixture(scope="module")
def shifted_oracle():
    return Oracle(SHIFTED_MODEL)


@pytest_asyncio.fixture(scope="module")
async def rl(shapes_engine):
    """A server on the session's trained engine with its control endpoint; the original weights come back after."""
    async with extra_server(shapes_engine, SHAPES_MODEL, control_port=0, control_api_key=KEY,
                            max_concurrent_requests=64) as (server, stub):
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.control_port}") as http:
            client = Control(http)
            yield server, stub, client
            await client.call("POST", "/continue_generation", {})
            status, body = await client.call("POST", "/update_weights_from_disk",
                                             {"model_path": str(SHAPES_MODEL), "weight_version": "default"})
            assert status == 200, body


class Control:
    def __init__(self, http: aiohttp.ClientSession):
        self.http = http

    async def call(self, method: str, path: str, body=None, key: str | None = KEY, params=None, raw: bytes | None = None):
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with self.http.request(method, path, data=data, headers=headers, params=params) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


def _image_prompt(oracle: Oracle, sample, kind: str):
    imgs = oracle.images([sample.image])
    ids = oracle.prompt(FILLER + data.QUESTIONS[kind], [oracle.image_block(imgs.tokens_per_image[0])])[0]
    return ids, imgs


async def _ask(stub, ids, imgs=None, max_tokens=2, **kw):
    mm = mm_inputs(imgs.raw, imgs.grid) if imgs is not None else None
    req = request(ids, mm=mm, temperature=0.0, max_tokens=max_tokens, logprobs=1, **kw)
    [done] = [r.complete async for r in stub.Generate(req)]
    return done


def _chosen_logprobs(done) -> list[float]:
    return list(done.output_logprobs.token_logprobs)


def _oracle_logprobs(oracle, ids, imgs, out):
    lp = oracle.log_softmax(ids + out, imgs)
    return [float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(out)]


def _matches(done, oracle, ids, imgs) -> bool:
    """The answer is the oracle's greedy continuation, with its logprobs."""
    want, _ = oracle.greedy(ids, imgs, len(done.output_ids))
    if list(done.output_ids) != want:
        return False
    expected = _oracle_logprobs(oracle, ids, imgs, want)
    return all(abs(a - b) < LOGPROB_TOLERANCE for a, b in zip(_chosen_logprobs(done), expected))


async def test_refit_serves_the_new_weights_and_nothing_the_old_ones_computed(rl, shapes_oracle, shifted_oracle):
    server, stub, control = rl
    sample = data.make_sample(random.Random(11))
    ids, imgs = _image_prompt(shapes_oracle, sample, "colour")
    text_ids = shapes_oracle.chat_ids(FILLER + "Say something.")
    assert len(ids) > 128 and len(text_ids) > 128
    for prompt, pixels in ((ids, imgs), (text_ids, None)):
        first = await _ask(stub, prompt, pixels)
        again = await _ask(stub, prompt, pixels)
        assert _matches(again, shapes_oracle, prompt, pixels)
        assert again.cached_tokens >= 128, "the prompt's KV (and the image's embedding) are cached before the refit"
        # The check below can fail: the two checkpoints disagree on this prompt.
        assert not _matches(first, shifted_oracle, prompt, pixels)

    status, body = await control.call("POST", "/update_weights_from_disk",
                                      {"model_path": str(SHIFTED_MODEL), "weight_version": "step-1"})
    assert status == 200 and body["success"], body
    for prompt, pixels in ((ids, imgs), (text_ids, None)):
        done = await _ask(stub, prompt, pixels)
        assert done.cached_tokens == 0, "a prefix block computed by the old weights was served"
        assert _matches(done, shifted_oracle, prompt, pixels), "not the new checkpoint's answer"
        assert [(s.version, s.start, s.end) for s in done.weight_versions] == [("step-1", 0, len(done.output_ids))]
    words = shifted_oracle.tokenizer.decode(list((await _ask(stub, ids, imgs)).output_ids), skip_special_tokens=True)
    print(f"\nimage answer: {sample.colour} before the refit, {words!r} after (shifted model)")

    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    assert (info.weight_version, info.checkpoint_path, info.is_paused) == ("step-1", str(SHIFTED_MODEL), False)
    assert (await control.call("GET", "/weight_info"))[1] == {"weight_version": "step-1"}
    assert (await control.call("POST", "/get_weight_version", {}))[1] == {"weight_version": "step-1"}

    status, body = await control.call("POST", "/update_weights_from_disk",
                                      {"model_path": str(SHAPES_MODEL), "weight_version": "step-0"})
    assert status == 200, body
    for prompt, pixels in ((ids, imgs), (text_ids, None)):
        assert _matches(await _ask(stub, prompt, pixels), shapes_oracle, prompt, pixels)


# -- pause modes, observed on the data plane ----------------------------------------------------------------

async def _stream(stub, ids, max_tokens, chunks: list):
    """A streamed greedy request that runs to max_tokens; every chunk's ids land in `chunks` as they come."""
    req = request(ids, stream=True, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    finish = None
    async for r in stub.Generate(req):
        if r.HasField("chunk"):
            chunks.extend(r.chunk.token_ids)
        else:
            finish = r.complete.finish_reason
    return finish


async def _until(predicate, what: str, timeout: float = 120.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"never saw: {what}"
        await asyncio.sleep(0.02)


async def _reference(stub, ids, max_tokens) -> list[int]:
    return list((await _ask(stub, ids, max_tokens=max_tokens, ignore_eos=True)).output_ids)


async def test_keep_freezes_in_flight_requests_and_they_resume_with_unpaused_tokens(rl, shapes_oracle):
    server, stub, control = rl
    ids, later_ids = shapes_oracle.chat_ids("Tell me a story."), shapes_oracle.chat_ids("And another one.")
    want, want_later = await _reference(stub, ids, 96), await _reference(stub, later_ids, 8)
    chunks: list[int] = []
    streaming = asyncio.create_task(_stream(stub, ids, 96, chunks))
    await _until(lambda: len(chunks) >= 4, "the stream's first tokens")
    status, body = await control.call("POST", "/pause", params={"mode": "keep"})
    assert status == 200, body
    frozen = len(chunks)
    queued = asyncio.create_task(_ask(stub, later_ids, max_tokens=8, ignore_eos=True))
    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.is_paused and (await control.call("GET", "/is_paused"))[1] == {"is_paused": True}
    await _until(lambda: server.engine.num_unfinished_requests() == 2, "the queued request in the engine")
    [load] = (await stub.GetLoads(pb.GetLoadsRequest())).loads
    assert (load.num_running_reqs, load.num_waiting_reqs) == (0, 2), "a paused engine's requests all wait"
    assert server.servicer._load_record(None).queues.paused == 2  # what the KV-event stream pushes to SMG
    await asyncio.sleep(1.0)  # a frozen request makes no progress, and the queued one does not run
    assert len(chunks) == frozen and not queued.done() and not streaming.done()
    status, body = await control.call("POST", "/resume")
    assert status == 200, body
    assert await streaming == "length"
    assert chunks == want, "a kept request resumed with other tokens than an unpaused run"
    assert list((await queued).output_ids) == want_later
    assert not (await stub.GetServerInfo(pb.GetServerInfoRequest())).is_paused


async def test_wait_drains_in_flight_requests_and_queues_new_ones(rl, shapes_oracle):
    server, stub, control = rl
    ids, later_ids = shapes_oracle.chat_ids("Count slowly."), shapes_oracle.chat_ids("Then stop.")
    want, want_later = await _reference(stub, ids, 48), await _reference(stub, later_ids, 8)
    chunks: list[int] = []
    streaming = asyncio.create_task(_stream(stub, ids, 48, chunks))
    await _until(lambda: len(chunks) >= 2, "the stream's first tokens")
    status, body = await control.call("POST", "/pause_generation", {"mode": "wait"})
    assert status == 200, body
    assert streaming.done() and streaming.result() == "length" and chunks == want, "wait returned before the drain"
    queued = asyncio.create_task(_ask(stub, later_ids, max_tokens=8, ignore_eos=True))
    await asyncio.sleep(0.5)
    assert not queued.done(), "a request sent during the pause ran"
    assert (await control.call("POST", "/continue_generation", {}))[0] == 200
    assert list((await queued).output_ids) == want_later


async def test_abort_ends_in_flight_requests_with_finish_reason_abort(rl, shapes_oracle):
    server, stub, control = rl
    ids = shapes_oracle.chat_ids("Go on and on.")
    chunks: list[int] = []
    streaming = asyncio.create_task(_stream(stub, ids, 400, chunks))
    unary = asyncio.create_task(_ask(stub, shapes_oracle.chat_ids("Keep going."), max_tokens=400, ignore_eos=True))
    await _until(lambda: len(chunks) >= 2, "the stream's first tokens")
    status, body = await control.call("POST", "/pause_generation", {"mode": "abort"})
    assert status == 200, body
    assert await streaming == "abort"
    done = await unary
    assert done.finish_reason == "abort" and len(done.output_ids) < 400
    later = asyncio.create_task(_ask(stub, ids, max_tokens=4, ignore_eos=True))
    await asyncio.sleep(0.5)
    assert not later.done()
    assert (await control.call("POST", "/continue_generation", {}))[0] == 200
    assert len((await later).output_ids) == 4


async def test_a_refit_under_keep_recomputes_frozen_requests_with_the_new_weights(rl, shapes_oracle, shifted_oracle):
    """The frozen request's KV was computed by the old weights: after the refit it is recomputed, so its later
    tokens are the new checkpoint's continuation of everything it had generated."""
    server, stub, control = rl
    sample = data.make_sample(random.Random(23))
    ids, imgs = _image_prompt(shapes_oracle, sample, "shape")
    chunks: list[int] = []
    req = request(ids, mm=mm_inputs(imgs.raw, imgs.grid), stream=True, temperature=0.0, max_tokens=24,
                  ignore_eos=True, logprobs=1)
    complete: list = []

    async def stream():
        async for r in stub.Generate(req):
            (chunks.extend(r.chunk.token_ids) if r.HasField("chunk") else complete.append(r.complete))

    streaming = asyncio.create_task(stream())
    await _until(lambda: len(chunks) >= 3, "the stream's first tokens")
    assert (await control.call("POST", "/pause_generation", {"mode": "in_place"}))[0] == 200
    before = list(chunks)
    try:
        status, body = await control.call("POST", "/update_weights_from_disk",
                                          {"model_path": str(SHIFTED_MODEL), "weight_version": "kept"})
        assert status == 200, body
    finally:
        assert (await control.call("POST", "/continue_generation", {}))[0] == 200
    await streaming
    after = chunks[len(before):]
    want, gaps = shifted_oracle.greedy(ids + before, imgs, len(after))
    agree = next((i for i, (a, b) in enumerate(zip(after, want)) if a != b), len(after))
    assert agree == len(after) or gaps[agree] < 1e-3, f"after {before}: got {after}, the new weights give {want}"
    spans = [(s.version, s.start, s.end) for s in complete[0].weight_versions]
    assert spans[-1] == ("kept", len(before), len(chunks)) and spans[0][1] == 0, spans
    status, body = await control.call("POST", "/update_weights_from_disk",
                                      {"model_path": str(SHAPES_MODEL), "weight_version": "step-0"})
    assert status == 200, body


async def test_retract_frees_the_kv_of_frozen_requests_and_they_finish_after_resume(rl, shapes_oracle):
    server, stub, control = rl
    ids = shapes_oracle.chat_ids("Retract me.")
    chunks: list[int] = []
    streaming = asyncio.create_task(_stream(stub, ids, 40, chunks))
    await _until(lambda: len(chunks) >= 2, "the stream's first tokens")
    status, body = await control.call("POST", "/pause_generation", {"mode": "retract"})
    assert status == 200 and body["mode"] == "retract", body
    assert (await control.call("POST", "/continue_generation", {}))[0] == 200
    assert await streaming == "length" and len(chunks) == 40


async def test_flush_cache_drops_the_prefix_cache(rl, shapes_oracle):
    server, stub, control = rl
    ids = shapes_oracle.chat_ids(FILLER + "Flush.")
    await _ask(stub, ids)
    assert (await _ask(stub, ids)).cached_tokens >= 128
    status, body = await control.call("POST", "/flush_cache", {})
    assert status == 200 and body["success"], body
    assert (await _ask(stub, ids)).cached_tokens == 0


async def test_update_weight_version_relabels_and_aborts_only_when_asked(rl, shapes_oracle):
    server, stub, control = rl
    ids = shapes_oracle.chat_ids("Label me.")
    assert (await control.call("POST", "/update_weight_version", {"new_version": "relabelled"}))[0] == 200
    done = await _ask(stub, ids, max_tokens=3, ignore_eos=True)
    assert [(s.version, s.start, s.end) for s in done.weight_versions] == [("relabelled", 0, 3)]
    running = asyncio.create_task(_ask(stub, ids, max_tokens=400, ignore_eos=True))
    await _until(lambda: bool(server.servicer.in_flight), "a request in flight")
    await asyncio.sleep(0.2)
    status, body = await control.call("POST", "/update_weight_version",
                                      {"new_version": "step-0", "abort_all_requests": True})
    assert status == 200, body
    assert (await running).finish_reason == "abort"
    assert not (await stub.GetServerInfo(pb.GetServerInfoRequest())).is_paused
    assert (await stub.GetServerInfo(pb.GetServerInfoRequest())).weight_version == "step-0"


async def test_paused_is_not_dead(rl):
    server, stub, control = rl
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert (await control.call("POST", "/pause_generation", {"mode": "keep"}))[0] == 200
        try:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert (await stub.HealthCheck(pb.HealthCheckRequest())).healthy
            assert (await stub.GetServerInfo(pb.GetServerInfoRequest())).is_paused
        finally:
            assert (await control.call("POST", "/continue_generation", {}))[0] == 200


async def test_sleep_level_zero_pauses_scheduling_and_wake_up_resumes(rl):
    server, stub, control = rl
    assert (await control.call("POST", "/sleep", params={"level": "0"}))[0] == 200
    assert (await control.call("GET", "/is_sleeping"))[1] == {"is_sleeping": True}
    status, body = await control.call("POST", "/wake_up", params={"tags": "scheduling"})
    assert status == 200 and body["status"] == "awake", body
    assert (await control.call("GET", "/is_sleeping"))[1] == {"is_sleeping": False}


# -- bad input: a clear 4xx, the old weights in place, the engine serving ------------------------------------

@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Folders that must never be loaded over the trained model."""
    root = tmp_path_factory.mktemp("bad-checkpoints")
    reshaped = root / "reshaped"  # the trained model's config over the random model's (narrower) tensors
    shutil.copytree(SHIFTED_MODEL, reshaped)
    shutil.copy(SHAPES_MODEL.parent / "tiny-qwen2-vl" / "model.safetensors", reshaped / "model.safetensors")
    truncated = root / "truncated"
    shutil.copytree(SHIFTED_MODEL, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(truncated / "model.safetensors") - 4096)
    return {"reshaped": str(reshaped), "truncated": str(truncated),
            "other architecture": str(SHAPES_MODEL.parent / "tiny-qwen3-vl")}


BAD_CALLS = [
    # (name, method, path, body, key, params, raw body, status, words the message must contain)
    ("no key", "POST", "/pause_generation", {}, None, None, None, 401, "bearer"),
    ("wrong key", "POST", "/pause_generation", {}, "nope", None, None, 401, "bearer"),
    ("wrong key on a read", "GET", "/get_server_info", None, "nope", None, None, 401, "bearer"),
    ("unknown route", "POST", "/update_weights_from_tensor", {}, KEY, None, None, 404, "not found"),
    ("wrong method", "GET", "/update_weights_from_disk", None, KEY, None, None, 405, "not allowed"),
    ("malformed JSON", "POST", "/update_weights_from_disk", None, KEY, None, b"{model_path:", 400, "body"),
    ("body not an object", "POST", "/update_weights_from_disk", None, KEY, None, b"[1]", 400, "body"),
    ("no model_path", "POST", "/update_weights_from_disk", {}, KEY, None, None, 400, "model_path"),
    ("model_path not a string", "POST", "/update_weights_from_disk", {"model_path": 3}, KEY, None, None, 400,
     "model_path"),
    ("missing path", "POST", "/update_weights_from_disk", {"model_path": "/nonexistent/ckpt"}, KEY, None, None,
     400, "not a directory"),
    ("relative path", "POST", "/update_weights_from_disk", {"model_path": "models/x"}, KEY, None, None, 400,
     "absolute"),
    ("bad pause mode", "POST", "/pause_generation", {"mode": "later"}, KEY, None, None, 400, "mode"),
    ("bad vLLM pause mode", "POST", "/pause", None, KEY, {"mode": "later"}, None, 400, "mode"),
    ("bad boolean", "POST", "/pause", None, KEY, {"clear_cache": "maybe"}, None, 400, "clear_cache"),
    ("collective_rpc not allowed", "POST", "/collective_rpc", {"method": "reload_weights"}, KEY, None, None, 403,
     "--control-allow-collective-rpc"),
    ("no weight transfer", "POST", "/init_weight_transfer_engine", {"init_info": {}}, KEY, None, None, 409,
     "--weight-transfer-config"),
    ("update without start", "POST", "/update_weights", {"update_info": {}}, KEY, None, None, 409,
     "start_weight_update"),
    ("start without weight transfer", "POST", "/start_weight_update", {}, KEY, None, None, 409,
     "--weight-transfer-config"),
    ("finish without start", "POST", "/finish_weight_update", {}, KEY, None, None, 409, "start_weight_update"),
    ("sleep without sleep mode", "POST", "/sleep", None, KEY, {"level": "1"}, None, 409, "--enable-sleep-mode"),
    ("empty version", "POST", "/update_weight_version", {"new_version": ""}, KEY, None, None, 400, "new_version"),
]


@pytest.mark.parametrize("case", BAD_CALLS + [("checkpoint", name) for name in ("reshaped", "truncated",
                                                                              "other architecture")],
                         ids=lambda c: c[0] if c[0] != "checkpoint" else f"checkpoint {c[1]}")
async def test_bad_control_calls_leave_the_weights_serving(rl, shapes_oracle, bad_checkpoints, case):
    server, stub, control = rl
    ids = shapes_oracle.chat_ids("Say something.")
    before = await _ask(stub, ids, max_tokens=4)
    if case[0] == "checkpoint":
        status, body = await control.call("POST", "/update_weights_from_disk",
                                          {"model_path": bad_checkpoints[case[1]], "weight_version": "bad"})
        expected_status, words = 400, {"reshaped": "shape", "truncated": "safetensors",
                                       "other architecture": "config.json"}[case[1]]
    else:
        _, method, path, body, key, params, raw, expected_status, words = case
        status, body = await control.call(method, path, body, key=key, params=params, raw=raw)
    print(f"\n{case[0]}: {status} {body}")
    assert status == expected_status, body
    assert body["success"] is False and words.lower() in body["message"].lower(), body
    after = await _ask(stub, ids, max_tokens=4)
    assert (list(after.output_ids), _chosen_logprobs(after)) == (list(before.output_ids), _chosen_logprobs(before))
    assert (await stub.HealthCheck(pb.HealthCheckRequest())).healthy
    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.checkpoint_path == str(SHAPES_MODEL) and not info.is_paused


async def test_a_refit_while_another_runs_is_refused(rl, shapes_oracle):
    server, stub, control = rl
    ids = shapes_oracle.chat_ids("Talk for a while.")
    chunks: list[int] = []
    streaming = asyncio.create_task(_stream(stub, ids, 200, chunks))
    await _until(lambda: len(chunks) >= 2, "the stream's first tokens")
    # The first refit pauses with `wait`: it holds the weights while the stream drains.
    first = asyncio.create_task(control.call("POST", "/update_weights_from_disk", {"model_path": str(SHAPES_MODEL)}))
    await _until(lambda: server.rl.weights_changing, "the first refit under way")
    status, body = await control.call("POST", "/update_weights_from_disk", {"model_path": str(SHIFTED_MODEL)})
    assert status == 409 and "being changed" in body["message"], body
    assert (await control.call("POST", "/continue_generation", {}))[0] == 409  # the pause belongs to the refit
    assert await streaming == "length"
    status, body = await first
    assert status == 200, body
    assert (await stub.GetServerInfo(pb.GetServerInfoRequest())).checkpoint_path == str(SHAPES_MODEL)


async def test_collective_rpc_runs_only_where_the_operator_allowed_it(shapes_engine):
    async with extra_server(shapes_engine, SHAPES_MODEL, control_port=0, control_api_key=KEY,
                            control_allow_collective_rpc=True) as (server, stub):
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.control_port}") as http:
            status, body = await Control(http).call("POST", "/collective_rpc", {"method": "reset_encoder_cache"})
    assert status == 200 and body == {"success": True, "results": [None]}, body
