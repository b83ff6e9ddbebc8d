"""Generate over real gRPC on the real engine: token-in/token-out, sampling, streaming, n, abort, cancel."""

import asyncio

import grpc
import pytest

from tests.fixtures import request
from vlm_proto import vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine


async def _complete(stub, req) -> list[pb.GenerateComplete]:
    return [r.complete async for r in stub.Generate(req)]


async def _greedy(stub, ids, n=8, **kw) -> list[int]:
    [done] = await _complete(stub, request(ids, temperature=0.0, max_tokens=n, ignore_eos=True, **kw))
    return list(done.output_ids)


async def _wait_idle(server, engine):
    for _ in range(200):
        if engine.num_unfinished_requests() == 0 and not server.servicer.in_flight:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine still has {engine.num_unfinished_requests()} requests")


async def test_non_canonical_ids_reach_the_engine_unchanged(stub, engine, oracle, monkeypatch):
    tok = oracle.tokenizer
    canonical = tok.encode("Describe the image.", add_special_tokens=False)
    split = tok.encode("D", add_special_tokens=False) + tok.encode("escribe the image.", add_special_tokens=False)
    assert tok.encode(tok.decode(split), add_special_tokens=False) == canonical != split  # the tokenizer would merge

    seen = []
    original = engine._llm.generate

    def spy(prompt, *args, **kwargs):
        seen.append(list(prompt["prompt_token_ids"]))
        return original(prompt, *args, **kwargs)

    monkeypatch.setattr(engine._llm, "generate", spy)
    [done] = await _complete(stub, request(split, temperature=0.0, max_tokens=2, prompt_logprobs=0))
    assert seen == [split]
    assert done.prompt_tokens == len(split)
    assert list(done.input_logprobs.token_ids) == split
    hf = oracle.log_softmax(split, None)
    for k in range(1, len(split)):
        assert abs(done.input_logprobs.token_logprobs[k].value - float(hf[k - 1, split[k]])) < 1e-3
    assert not done.input_logprobs.token_logprobs[0].HasField("value")


async def test_streaming_equals_non_streaming(stub, oracle):
    ids = oracle.chat_ids("What shape is it?")
    expected = await _greedy(stub, ids, 12)
    responses = [r async for r in stub.Generate(request(ids, stream=True, temperature=0.0, max_tokens=12, ignore_eos=True))]
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    completes = [r.complete for r in responses if r.HasField("complete")]
    assert [t for c in chunks for t in c.token_ids] == expected
    assert sum(c.completion_tokens for c in chunks) == 12
    assert len(completes) == 1 and completes[0].finish_reason == "length"
    assert responses[-1].HasField("complete")


async def test_n_samples_carry_their_index(stub, oracle):
    ids = oracle.chat_ids("Describe the image.")
    completes = await _complete(stub, request(ids, n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True))
    assert sorted(c.index for c in completes) == [0, 1, 2]
    assert all(len(c.output_ids) == 6 and c.completion_tokens == 6 for c in completes)
    responses = [r async for r in stub.Generate(request(ids, stream=True, n=2, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True))]
    per_index = {0: [], 1: []}
    for r in responses:
        if r.HasField("chunk"):
            per_index[r.chunk.index].extend(r.chunk.token_ids)
    assert {i: len(t) for i, t in per_index.items()} == {0: 5, 1: 5}
    assert sorted(r.complete.index for r in responses if r.HasField("complete")) == [0, 1]


async def test_seed_makes_sampling_reproducible(stub, oracle):
    ids = oracle.chat_ids("How many shapes are there?")
    sample = lambda seed: _complete(stub, request(ids, temperature=1.0, top_p=0.95, seed=seed, max_tokens=10, ignore_eos=True))  # noqa: E731
    a, b, c = await sample(1), await sample(1), await sample(2)
    assert a[0].output_ids == b[0].output_ids
    assert a[0].output_ids != c[0].output_ids


async def test_sampling_knobs_reach_the_sampler(stub, oracle):
    ids = oracle.chat_ids("What colour is the shape?")
    greedy = await _greedy(stub, ids, 8)
    top1 = await _complete(stub, request(ids, temperature=1.0, top_k=1, seed=3, max_tokens=8, ignore_eos=True))
    assert list(top1[0].output_ids) == greedy  # top_k=1 at temperature 1 is greedy
    biased = await _complete(stub, request(ids, temperature=0.0, max_tokens=4, ignore_eos=True, logit_bias={17: 100.0}))
    assert list(biased[0].output_ids) == [17] * 4
    penalised = await _complete(stub, request(
        ids, temperature=0.0, max_tokens=8, ignore_eos=True, logit_bias={17: 5.0}, presence_penalty=2.0,
        frequency_penalty=2.0, repetition_penalty=1.5, min_p=0.0))
    assert list(penalised[0].output_ids).count(17) < 8  # penalties push back against the bias


async def test_stop_token_ids_min_tokens_and_eos(stub, engine, oracle):
    ids = oracle.chat_ids("Describe this picture in detail.")
    greedy = await _greedy(stub, ids, 10)
    stop = greedy[3]
    first = greedy.index(stop)
    [done] = await _complete(stub, request(ids, temperature=0.0, max_tokens=10, stop_token_ids=[stop]))
    assert (list(done.output_ids), done.finish_reason, done.matched_token_id) == (greedy[: first + 1], "stop", stop)
    [later] = await _complete(stub, request(ids, temperature=0.0, max_tokens=10, stop_token_ids=[stop], min_tokens=first + 2))
    assert len(later.output_ids) > first + 1
    eos = engine.info.eos_token_ids[0]
    [ended] = await _complete(stub, request(ids, temperature=0.0, max_tokens=5, logit_bias={eos: 100.0}))
    assert (list(ended.output_ids), ended.finish_reason) == ([eos], "stop")
    [ignored] = await _complete(stub, request(ids, temperature=0.0, max_tokens=5, logit_bias={eos: 100.0}, ignore_eos=True))
    assert (len(ignored.output_ids), ignored.finish_reason) == (5, "length")


async def test_logprobs_with_top_k(stub, oracle):
    ids = oracle.chat_ids("What is in the image?")
    [done] = await _complete(stub, request(ids, temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2))
    out = done.output_logprobs
    assert list(out.token_ids) == list(done.output_ids) and len(out.top_logprobs) == 5
    for chosen, lp, top in zip(out.token_ids, out.token_logprobs, out.top_logprobs):
        assert len(top.token_ids) == 3 and list(top.values) == sorted(top.values, reverse=True)
        assert top.token_ids[0] == chosen and abs(top.values[0] - lp) < 1e-6  # greedy picks the top token
    prompt = done.input_logprobs
    assert len(prompt.token_logprobs) == len(ids) == len(prompt.top_logprobs)
    assert all(len(t.token_ids) == 2 for t in prompt.top_logprobs[1:])
    hf = oracle.log_softmax(ids, None)
    assert abs(out.token_logprobs[0] - float(hf[-1].max())) < 1e-3


async def test_cached_tokens_count_prefix_hits(stub, oracle):
    ids = oracle.chat_ids("Describe the image. " * 60)  # several 128-token KV blocks
    await _complete(stub, request(ids, temperature=0.0, max_tokens=1))
    [again] = await _complete(stub, request(ids, temperature=0.0, max_tokens=1))
    assert again.prompt_tokens == len(ids)
    assert again.cached_tokens >= 128 * (len(ids) // 128 - 1)


async def test_abort_by_id_finishes_with_abort(stub, server, engine, oracle):
    ids = oracle.chat_ids("Describe the image.")
    call = stub.Generate(request(ids, request_id="to-abort", stream=True, temperature=0.0, max_tokens=3000, ignore_eos=True))
    first = await call.read()
    assert first.HasField("chunk")
    await stub.Abort(pb.AbortRequest(request_ids=["to-abort", "unknown-id"]))
    rest = []
    while (r := await call.read()) != grpc.aio.EOF:
        rest.append(r)
    assert rest[-1].complete.finish_reason == "abort"
    await _wait_idle(server, engine)


async def test_client_cancel_aborts_in_the_engine(stub, server, engine, oracle):
    ids = oracle.chat_ids("Describe the image.")
    for stream in (True, False):
        call = stub.Generate(request(ids, stream=stream, temperature=0.0, max_tokens=3000, ignore_eos=True))
        if stream:
            await call.read()
        else:
            while engine.num_unfinished_requests() == 0:
                await asyncio.sleep(0.01)
        assert call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
        await _wait_idle(server, engine)
    loads = await stub.GetLoads(pb.GetLoadsRequest())
    assert loads.loads[0].num_running_reqs == 0 and loads.loads[0].num_total_reqs == 0


async def test_deadline_exceeded_aborts_in_the_engine(stub, server, engine, oracle):
    ids = oracle.chat_ids("Describe the image.")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(request(ids, stream=True, max_tokens=3000, ignore_eos=True), timeout=0.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _wait_idle(server, engine)
