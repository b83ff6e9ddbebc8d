"""An RL loop's refit through the real SMG gateway (`smg launch --enable-rl`): two `vlm-servicer serve` workers
on the trained tiny model, each registered with its `rl.control_url` and key, refitted by SMG's fan-out inside
`smg.rl.paused(...)`; Hugging Face transformers on each checkpoint is the oracle for what the gateway then
answers. And examples/rl_loop.py's three steps on the same cluster.
"""

import asyncio
import random

import pytest

from examples import rl_loop
from harness.gateway import smg_executable
from harness.processes import http_json
from smg.rl import RL, paused
from tests.fixtures import SHAPES_MODEL, SHIFTED_MODEL
from tests.oracle import Oracle
from tinytrain import data

pytestmark = [pytest.mark.engine, pytest.mark.gateway]
if smg_executable() is None:
    pytest.fail("the SMG gateway (`smg` executable, pip package smg) is not installed", pytrace=False)

FILLER = data.filler(random.Random(3), 8)  # the image and the text inside full 128-token KV blocks
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = rl_loop.launch(tmp_path_factory.mktemp("rl-cluster"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def shifted_oracle():
    return Oracle(SHIFTED_MODEL)


def _chat(gw, text: str, image=None) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": _data_url(image)}})
    body = {"model": gw.model, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 2, "skip_special_tokens": False, "logprobs": True}
    status, answer = http_json("POST", f"{gw.url}/v1/chat/completions", body)
    assert status == 200, f"HTTP {status}: {answer}"
    return answer


def _data_url(img) -> str:
    from harness.images import data_url

    return data_url(img)


def _check(answer: dict, oracle: Oracle, text: str, image=None) -> None:
    """The gateway's answer is the oracle's greedy continuation of the same ids and pixels, logprobs included."""
    imgs = oracle.images([image]) if image is not None else None
    ids = oracle.chat_ids(text, 1 if image is not None else 0, imgs.tokens_per_image if imgs else None)
    want, _ = oracle.greedy(ids, imgs, 2)
    choice = answer["choices"][0]
    # SMG leaves the stop token (<|im_end|>) out of the text and its logprobs.
    assert choice["message"]["content"] == oracle.tokenizer.decode(want, skip_special_tokens=True), (choice, want)
    lp = oracle.log_softmax(ids + want, imgs)
    expected = [float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(want)]
    got = [t["logprob"] for t in choice["logprobs"]["content"]]
    assert got and all(abs(a - b) < LOGPROB_TOLERANCE for a, b in zip(got, expected)), (got, expected)


async def _until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(predicate):
        assert asyncio.get_running_loop().time() < deadline, f"never saw: {what}"
        await asyncio.sleep(0.2)


def _cached(answer: dict) -> int:
    return (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)


async def test_refit_through_smg_serves_the_new_weights_on_every_worker(cluster, shapes_oracle, shifted_oracle):
    gw, rl = cluster.gateway, RL(cluster.gateway.url)
    sample = data.make_sample(random.Random(5))
    image_text, text = FILLER + data.QUESTIONS["colour"], FILLER + "Say something."
    with gw.dump_log_on_failure():
        served = [w.served() for w in cluster.workers]
        # Both workers see and cache the image (round robin: each gets two of the four).
        answers = [await asyncio.to_thread(_chat, gw, image_text, sample.image) for _ in range(4)]
        for answer in answers:
            _check(answer, shapes_oracle, image_text, sample.image)
        assert all(_cached(a) >= 128 for a in answers[2:]), [a["usage"] for a in answers]
        assert all(w.served() >= s + 2 for w, s in zip(cluster.workers, served)), "one worker did not see the image"
        for _ in range(2):
            _check(await asyncio.to_thread(_chat, gw, text), shapes_oracle, text)

        with paused(rl, rl_loop.SELECTOR):
            result = rl.fanout("update_weights_from_disk", {"model_path": str(SHIFTED_MODEL),
                                                            "weight_version": "shifted-1"}, selector=rl_loop.SELECTOR)
        assert result.succeeded == result.total == 2, result
        print(f"\nrefit through SMG: {[(r.status, r.latency_ms, r.body.get('seconds')) for r in result.results.values()]}")

        # The image each worker had cached, until both have answered it once. Which worker answers is read from
        # their own counters, not assumed: SMG's round robin sent two in a row to one worker once, right after a
        # worker's relabel (a PATCH) that follows every refit. A worker's first answer must reuse nothing;
        # a later one may reuse blocks its first computed under the new weights.
        first_after: dict[int, dict] = {}
        order = []
        for _ in range(8):
            before = [w.served() for w in cluster.workers]
            answer = await asyncio.to_thread(_chat, gw, image_text, sample.image)
            # A worker counts a call once its stream has ended, which may be just after SMG has answered.
            await _until(lambda: sum(w.served() for w in cluster.workers) > sum(before), "the chat in a worker's count")
            [worker] = [i for i, (w, b) in enumerate(zip(cluster.workers, before)) if w.served() > b]
            order.append((worker, _cached(answer)))
            if worker not in first_after:
                first_after[worker] = answer
                assert _cached(answer) == 0, f"a prefix block computed by the old weights was served: {answer['usage']}"
            _check(answer, shifted_oracle, image_text, sample.image)
            if len(first_after) == 2:
                break
        assert sorted(first_after) == [0, 1], f"SMG sent every chat to worker {list(first_after)}"
        print(f"image chats after the refit, (worker, cached tokens): {order}")
        for _ in range(2):
            _check(await asyncio.to_thread(_chat, gw, text), shifted_oracle, text)
        print(f"the image's colour is {sample.colour}; the gateway answered {answers[0]['choices'][0]['message']['content']!r} "
              f"before the refit and {answer['choices'][0]['message']['content']!r} after")
        versions = rl.fanout("get_weight_version", {}, selector=rl_loop.SELECTOR)
        assert sorted(r.body["weight_version"] for r in versions.results.values()) == ["shifted-1", "shifted-1"]
        for worker in cluster.workers:
            info = worker.wait_serving(30)
            assert (info.weight_version, info.checkpoint_path) == ("shifted-1", str(SHIFTED_MODEL))
        # Each worker's registration (--register-with) updates its weight_version label in SMG after the refit.
        await _until(lambda: [w.weight_version for w in rl.workers()] == ["shifted-1", "shifted-1"],
                     f"SMG listing the new version: {[w.weight_version for w in rl.workers()]}")

        result = rl.fanout("update_weights_from_disk", {"model_path": str(SHAPES_MODEL), "weight_version": "default"},
                           selector=rl_loop.SELECTOR)
        assert result.succeeded == 2, result
        for _ in range(2):
            _check(await asyncio.to_thread(_chat, gw, image_text, sample.image), shapes_oracle, image_text, sample.image)


async def test_smg_forwards_bad_control_calls_as_the_workers_4xx(cluster):
    rl = RL(cluster.gateway.url)
    result = rl.fanout("update_weights_from_disk", {"model_path": "/nonexistent"}, selector=rl_loop.SELECTOR,
                       allow_partial=True)
    assert result.succeeded == 0 and len(result.failed) == 2
    assert all(r.status == 400 and "not a directory" in r.body["message"] for r in result.results.values()), result
    assert {f.status for f in result.failed} == {400}
    status, body = http_json("POST", f"{cluster.control_urls[0]}/pause_generation", {})  # no key: refused
    assert status == 401, body


def test_rl_loop_example_runs_three_steps_on_policy(cluster, tmp_path):
    # The loop starts from the default checkpoint, whatever an earlier test left on the shared workers.
    versions, _ = rl_loop.refit(cluster.gateway, cluster.key, SHAPES_MODEL, "default")
    assert sorted(versions.values()) == ["default", "default"], versions
    reports = rl_loop.run(cluster, tmp_path, steps=3, train_steps=8)  # a few steps: the weights change, which is the point
    previous = "default"
    for report in reports:
        assert report.version == previous
        assert sorted(report.worker_versions.values()) == [f"step-{report.step}"] * 2
        assert {w for r in report.rollouts for w in [r.worker]} == {0, 1}
        assert all(r.versions == [(report.version, 0, len(r.output_ids))] for r in report.rollouts)
        # On policy: each rollout's logprobs are the sampling weights' own (HF on that step's checkpoint).
        oracle = Oracle(report.checkpoint)
        for r in report.rollouts[:2]:
            imgs = oracle.images([r.sample.image])
            lp = oracle.log_softmax(r.prompt_ids + r.output_ids, imgs)
            expected = [float(lp[len(r.prompt_ids) - 1 + i, t]) for i, t in enumerate(r.output_ids)]
            assert all(abs(a - b) < LOGPROB_TOLERANCE for a, b in zip(r.logprobs, expected)), (r.logprobs, expected)
        previous = f"step-{report.step}"
    print("\n" + "\n".join(f"step {r.step}: reward {r.reward:.2f} on {r.version}" for r in reports))
