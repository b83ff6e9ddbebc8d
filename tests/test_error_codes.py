"""The README's error table as a test: limits no retry can meet are INVALID_ARGUMENT naming the field and the
flag; capacity that is taken right now is RESOURCE_EXHAUSTED with a retry hint; and through the real SMG
gateway, what its client finally sees for each (HTTP status) and how many attempts reached the worker.

One engine of its own with small limits: one running sequence (`--max-num-seqs 1`, so a second request
waits), vLLM's admission queue of 2, `--max-logprobs 2`, one image per prompt, and vLLM's shared-memory
ring sized for about one 112×112 image.
"""

import asyncio
import contextlib
import json
import os

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2, status_pb2

from engine_adapter.shm_ring import ENV as RING_NAME_ENV
from servicer.errors import RETRY_AFTER_MS
from tests.conftest import _start_engine, extra_server
from tests.fixtures import ENGINE_ARGS, MODEL, image, mm_inputs, request
from vlm_proto import vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine
RING_BYTES = 110_000  # one 112x112 uint8 image (75 KB of patches) fits, two do not
LIMITS = ("--max-num-seqs", "1", "--max-num-queued-reqs", "2", "--max-logprobs", "2",
          "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
          "--mm-processor-cache-type", "shm", "--mm-processor-cache-gb", str(RING_BYTES / 1024**3))
TEXT = [(7 * i + 5) % 900 + 20 for i in range(30)]


@pytest_asyncio.fixture(scope="module")
async def limited_engine():
    named = RING_NAME_ENV in os.environ
    engine = await _start_engine(MODEL, ENGINE_ARGS + LIMITS)
    yield engine
    engine.shutdown()
    if not named:  # the engine named its ring after this process; servicers started later must name their own
        del os.environ[RING_NAME_ENV]


async def _refusal(stub, req: pb.GenerateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [r async for r in stub.Generate(req)]
    return err.value


def _retry_hint(err: grpc.aio.AioRpcError) -> int | None:
    """The retry delay in ms the refusal carries (gRPC's pushback and RetryInfo agree), or None."""
    trailing = dict(err.trailing_metadata() or ())
    if "grpc-retry-pushback-ms" not in trailing:
        assert "grpc-status-details-bin" not in trailing
        return None
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    assert (status.code, status.message) == (err.code().value[0], err.details())
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.ToMilliseconds() == int(trailing["grpc-retry-pushback-ms"])
    return int(trailing["grpc-retry-pushback-ms"])


@contextlib.asynccontextmanager
async def _running(engine, stub, *requests: pb.GenerateRequest):
    """Requests in the engine: the first generating, the others (--max-num-seqs 1) waiting in vLLM's queue.
    On exit each is cancelled once it runs: one cancelled while it waits would pin its images in vLLM's ring
    (docs/multimodal.md, "Not yet here")."""
    calls = [stub.Generate(requests[0])]
    await calls[0].read()
    for r in requests[1:]:
        calls.append(stub.Generate(r))
        while engine.num_unfinished_requests() < len(calls):
            await asyncio.sleep(0.05)
    try:
        yield calls
    finally:
        for call in calls:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.read()
            call.cancel()
        while engine.num_unfinished_requests():
            await asyncio.sleep(0.05)


def _long(ids=TEXT, mm=None) -> pb.GenerateRequest:
    return request(ids, mm=mm, stream=True, max_tokens=3000, ignore_eos=True)


async def test_static_limits_are_invalid_argument_naming_field_and_flag(limited_engine, oracle):
    one, two = oracle.images([image(112, 112, seed=91)]), oracle.images([image(112, 112, seed=92)] * 2)
    big = oracle.images([image(168, 168, seed=93)])  # 169 KB of patches: never fits the ring
    cases = {
        "n over --max-n": (request(TEXT, n=5, max_tokens=2), "sampling_params.n", "--max-n"),
        "n over vLLM's queue": (request(TEXT, n=3, max_tokens=2), "sampling_params.n", "--max-num-queued-reqs 2"),
        "max_tokens beyond the context": (request(TEXT, max_tokens=4096), "sampling_params.max_tokens",
                                          "--max-model-len"),
        "logprobs over --max-logprobs": (request(TEXT, max_tokens=2, logprobs=3), "sampling_params.logprobs",
                                         "--max-logprobs"),
        "prompt_logprobs over --max-logprobs": (request(TEXT, max_tokens=2, prompt_logprobs=3),
                                                "sampling_params.prompt_logprobs", "--max-logprobs"),
        "images over --limit-mm-per-prompt": (
            request(oracle.chat_ids("Compare.", 2), mm=mm_inputs(two.raw, two.grid), max_tokens=2),
            "mm_inputs", "--limit-mm-per-prompt"),
        "an image bigger than the ring": (
            request(oracle.chat_ids("Describe.", 1, big.tokens_per_image), mm=mm_inputs(big.raw, big.grid),
                    max_tokens=2),
            "mm_inputs", "--mm-shm-gb"),
    }
    async with extra_server(limited_engine, max_n=4) as (_, stub):
        for name, (req, field, flag) in cases.items():
            err = await _refusal(stub, req)
            print(f"{name}: {err.code().name} {err.details()}")
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.details())
            assert err.details().startswith(field) and flag in err.details(), (name, err.details())
            assert _retry_hint(err) is None, name
        [done] = [r.complete async for r in stub.Generate(request(oracle.chat_ids("Describe.", 1), max_tokens=2,
                                                                  mm=mm_inputs(one.raw, one.grid)))]
        assert len(done.output_ids) == 2  # still serving


async def test_transient_capacity_is_resource_exhausted_with_a_retry_hint(limited_engine, oracle):
    a, b, c = (oracle.images([image(112, 112, seed=s)]) for s in (94, 95, 96))
    ids = oracle.chat_ids("Describe the image.", 1)
    async with extra_server(limited_engine, max_concurrent_requests=1) as (_, stub):
        async with _running(limited_engine, stub, _long()):
            err = await _refusal(stub, request(TEXT, max_tokens=2))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-requests 1" in err.details()
        assert _retry_hint(err) == RETRY_AFTER_MS
    async with extra_server(limited_engine) as (_, stub):
        # A runs (its image read by the engine), B waits in vLLM's queue with its image published and unread:
        # vLLM's queue is full (2 unfinished) and so is the ring.
        async with _running(limited_engine, stub, _long(ids, mm_inputs(a.raw, a.grid)),
                            _long(ids, mm_inputs(b.raw, b.grid))):
            queue = await _refusal(stub, request(TEXT, max_tokens=2))
            ring = await _refusal(stub, request(ids, mm=mm_inputs(c.raw, c.grid), max_tokens=2))
        for err, where in ((queue, "backlog limit" if "backlog" in queue.details() else "busy"), (ring, "--mm-shm-gb")):
            print(f"{err.code().name} {err.details()}")
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and where in err.details(), err.details()
            assert _retry_hint(err) == RETRY_AFTER_MS
        [done] = [r.complete async for r in stub.Generate(request(ids, mm=mm_inputs(c.raw, c.grid), max_tokens=2))]
        assert len(done.output_ids) == 2  # the same request, once there is room


def _attempts(server) -> dict[str, float]:
    """Generate calls that reached this servicer, by final status code (its own counter)."""
    return {s.labels["code"]: s.value for m in server.metrics.requests.collect() for s in m.samples
            if s.name.endswith("_total")}


@pytest.mark.gateway
async def test_what_smgs_client_sees(limited_engine, oracle, model_path, tmp_path_factory):
    """Each case through `smg launch`: the HTTP status SMG answers and the Generate attempts that reached us."""
    from tests.test_gateway import _chat_body, _launch

    a, b, c = (image(112, 112, seed=s) for s in (97, 98, 99))
    ids = oracle.chat_ids("Describe the image.", 1)
    imgs = {k: oracle.images([v]) for k, v in (("a", a), ("b", b))}
    async with extra_server(limited_engine, max_n=2, max_concurrent_requests=1) as (front, front_stub), \
            extra_server(limited_engine) as (_, side):
        async for gw in _launch(front, model_path, tmp_path_factory, "inline"):
            async def retries() -> float:  # SMG's own count of its retries to workers
                return await asyncio.to_thread(gw.metric, "smg_worker_retries_total")

            async def ask(**changes) -> tuple[int, str, dict[str, float]]:
                images = changes.pop("images", [])
                before, retried = _attempts(front), await retries()
                status, body = await gw.chat({**_chat_body(gw.model, "Describe the image.", images), **changes})
                after, retried = _attempts(front), await retries() - retried
                attempts = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
                assert retried == max(sum(attempts.values()) - 1, 0), (changes, attempts, retried)  # SMG agrees
                return status, body, attempts

            seen = {}
            with gw.dump_log_on_failure():
                seen["n over --max-n"] = await ask(n=3)
                seen["top_logprobs over --max-logprobs"] = await ask(logprobs=True, top_logprobs=3)
                seen["max_tokens beyond the context"] = await ask(max_tokens=5000)
                seen["images over --limit-mm-per-prompt"] = await ask(images=[a, b])
                async with _running(limited_engine, front_stub, _long()):
                    seen["--max-concurrent-requests"] = await ask()
                async with _running(limited_engine, side, _long(), _long()):
                    seen["vLLM's queue (--max-num-queued-reqs)"] = await ask()
                async with _running(limited_engine, side, _long(ids, mm_inputs(imgs["a"].raw, imgs["a"].grid)),
                                    _long(ids, mm_inputs(imgs["b"].raw, imgs["b"].grid))):
                    seen["shared-memory ring full"] = await ask(images=[c], max_tokens=2)
                seen["fine"] = await ask(images=[c], max_tokens=2)
            for name, (status, body, attempts) in seen.items():
                print(f"{name}: HTTP {status}, attempts {attempts}, {str(body)[:160]}")
            assert {name: (status, attempts) for name, (status, _, attempts) in seen.items()} == SMG_SEES


# What SMG 1.13's client gets, and the Generate attempts behind it: a static limit is tried once (400); a
# transient refusal is retried (5 attempts, SMG's --retry-max-retries default) and then answered 429. SMG checks
# the image count itself against our mm_item_limits, so that case never reaches the worker.
SMG_SEES = {
    "n over --max-n": (400, {"INVALID_ARGUMENT": 1}),
    "top_logprobs over --max-logprobs": (400, {"INVALID_ARGUMENT": 1}),
    "max_tokens beyond the context": (400, {"INVALID_ARGUMENT": 1}),
    "images over --limit-mm-per-prompt": (400, {}),
    "--max-concurrent-requests": (429, {"RESOURCE_EXHAUSTED": 5}),
    "vLLM's queue (--max-num-queued-reqs)": (429, {"RESOURCE_EXHAUSTED": 5}),
    "shared-memory ring full": (429, {"RESOURCE_EXHAUSTED": 5}),
    "fine": (200, {"OK": 1}),
}
