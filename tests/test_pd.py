"""Prefill/decode disaggregation behind the real SMG gateway, on vLLM's own NIXL connector (CPU buffers, UCX).

Two `vlm-servicer serve` processes: one prefills (`kv_producer`), one decodes (`kv_consumer`);
`smg launch --pd-disaggregation` pairs them. SMG runs the prefill leg (one token, `kv_transfer_params_json`
asking for a remote decode, the pixels), carries the connector's answer (block ids, host, port) to the decode
leg, and streams the decode's tokens. The decode leg carries each image by hash and grid, without pixels.

The single-servicer answer is the same HTTP request through a second SMG in its ordinary mode, in front of
the decode worker alone (which then computes the prompt from the pixels itself). Both must be equal (greedy),
and the decode worker's `vlm_engine_prompt_tokens{source}` must show that for the PD request it received the
prompt's KV from the prefill worker instead of computing it.
"""

import asyncio
import json

import grpc
import pytest

from harness.gateway import SMG_PD_WEDGE, launch_gateway, smg_executable
from harness.images import noise_image
from harness.processes import free_port, http, metric, start_replicas
from tests.fixtures import image, reference_inputs, request
from vlm_proto import vllm_engine_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.engine, pytest.mark.gateway]
if smg_executable() is None:
    pytest.skip("the SMG gateway (`smg` executable, pip package smg) is not installed", allow_module_level=True)

ROLES = ("kv_producer", "kv_consumer")
TEXT = "Tell me about the weather in a long sentence. " * 8  # > one 128-token KV block
SOURCE = "vlm_engine_prompt_tokens_total"


def _image(seed: int, size: int = 224) -> dict:
    return {"type": "image_url", "image_url": {"url": noise_image(seed, size)}}


def _user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


CHATS = {
    "text": [{"role": "user", "content": TEXT}],
    "one image": [_user(_image(1), "What is in this picture? Describe it.")],
    "two images": [_user(_image(2), _image(3, 280), "Compare the two pictures.")],
}


@pytest.fixture(scope="module")
def pd_pair(tmp_path_factory):
    def configure(index: int) -> dict:
        connector = {"kv_connector": "NixlConnector", "kv_role": ROLES[index], "kv_buffer_device": "cpu"}
        # Each NIXL worker's UCX progress thread polls a core without pause: niced, the pair leaves the
        # gateways, the test and the suite's other engine their share of these 2 cores.
        return {"flags": ("--kv-transfer-config", json.dumps(connector)),
                "env": {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}, "nice": 10}

    workdir = tmp_path_factory.mktemp("pd")
    pair = start_replicas(2, workdir, configure)
    gateways = []
    try:  # every process started here stops, even when a later one fails to start
        gateways.append(launch_gateway([r.url for r in pair], workdir / "smg-pd.log", *SMG_PD_WEDGE, pd=True))
        gateways.append(launch_gateway([pair[1].url], workdir / "smg-one.log", policy="round_robin"))
        yield pair, gateways
    finally:
        for gw in gateways:
            gw.stop()
        for r in pair:
            r.stop()


def _chat(gw, messages: list[dict], max_tokens: int = 8) -> dict:
    body = {"model": gw.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens,
            "skip_special_tokens": False}
    status, raw = http("POST", f"{gw.url}/v1/chat/completions", body)
    assert status == 200, raw
    return json.loads(raw)


def _sources(decode) -> dict[str, float]:
    return {s: metric(decode.metrics_url, SOURCE, f'source="{s}"') for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}


async def _pd_then_single(pd_pair, messages: list[dict]) -> tuple[dict, dict, dict]:
    """(PD answer, single-servicer answer, the decode worker's prompt tokens by source during the PD request)."""
    (prefill, decode), (pd_gw, one_gw) = pd_pair
    before = _sources(decode)
    try:
        pd = await asyncio.to_thread(_chat, pd_gw, messages)
        after = _sources(decode)
        single = await asyncio.to_thread(_chat, one_gw, messages)
    except BaseException:
        print(f"\n===== SMG (PD) log =====\n{pd_gw.tail()}\n===== prefill log =====\n{prefill.tail(40)}"
              f"\n===== decode log =====\n{decode.tail(40)}")
        raise
    return pd, single, {k: after[k] - before[k] for k in after}


def _check(name: str, pd: dict, single: dict, moved: dict) -> None:
    prompt = pd["usage"]["prompt_tokens"]
    assert prompt == single["usage"]["prompt_tokens"]
    assert pd["choices"][0]["message"]["content"] == single["choices"][0]["message"]["content"], name
    # The decode worker computed at most the connector's last block share of the prompt; the rest came
    # over NIXL (or from its own prefix cache, for a history it decoded before).
    assert moved["external_kv_transfer"] > 0, moved
    assert moved["local_compute"] < 0.1 * prompt, moved
    assert sum(moved.values()) == prompt, moved
    print(f"\n{name}: {prompt} prompt tokens; decode worker: {moved}; answer "
          f"{pd['choices'][0]['message']['content']!r}")


@pytest.mark.parametrize("name", CHATS)
async def test_smg_pd_chat_equals_a_single_servicer(pd_pair, name):
    pd, single, moved = await _pd_then_single(pd_pair, CHATS[name])
    _check(name, pd, single, moved)


async def test_smg_pd_multi_turn_image_conversation(pd_pair):
    """Each turn resends the history (its images too) and adds one image; every turn equals one servicer's."""
    messages = []
    for turn in range(3):
        messages.append(_user(_image(10 + turn), f"Turn {turn}: what changed in this picture?"))
        pd, single, moved = await _pd_then_single(pd_pair, messages)
        _check(f"turn {turn}", pd, single, moved)
        messages.append({"role": "assistant", "content": pd["choices"][0]["message"]["content"]})


async def test_decode_worker_refuses_pixel_less_image_without_kv_from_prefill(pd_pair, oracle):
    """A pixel-less image is served only on a leg whose KV comes from a prefill worker: without
    `do_remote_prefill` the decode worker names the missing pixels (FAILED_PRECONDITION); it never runs
    the image blind."""
    (_, decode), _ = pd_pair
    imgs = oracle.images([image(112, 112, seed=35)])
    mm = reference_inputs(imgs.grid, ["e" * 32])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{decode.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in pb_grpc.VllmEngineStub(channel).Generate(
                    request(oracle.chat_ids("What is in the image?", 1), mm=mm, temperature=0.0, max_tokens=2)):
                pass
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    assert "e" * 32 in err.value.details()
