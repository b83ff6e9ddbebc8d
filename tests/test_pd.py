"""Prefill/decode disaggregation behind the real SMG gateway, on vLLM's own NIXL connector (CPU buffers, UCX).

Two `vlm-servicer serve` processes: one prefills (`kv_producer`), one decodes (`kv_consumer`);
`smg launch --pd-disaggregation` pairs them. For a text chat completion SMG runs the prefill leg (one token,
`kv_transfer_params_json` asking for a remote decode), carries the connector's answer (block ids, host, port)
to the decode leg, and streams the decode's tokens. The test checks that the answer equals the decode
worker's own answer to the same ids with no transfer, and that the decode engine received the prompt's KV
from the prefill engine (its connector's log) instead of computing it.
"""

import asyncio
import json
import re

import grpc
import pytest

from bench.replicas import free_port, http, launch_gateway, smg_executable, start_replicas
from tests.fixtures import request
from vlm_proto import vllm_engine_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.engine, pytest.mark.gateway]
if smg_executable() is None:
    pytest.skip("the SMG gateway (`smg` executable, pip package smg) is not installed", allow_module_level=True)

ROLES = ("kv_producer", "kv_consumer")
TEXT = "Tell me about the weather in a long sentence. " * 8  # > one 128-token KV block


@pytest.fixture(scope="module")
def pd_pair(tmp_path_factory):
    def configure(index: int) -> dict:
        connector = {"kv_connector": "NixlConnector", "kv_role": ROLES[index], "kv_buffer_device": "cpu"}
        # The decode side logs each finished KV receive at DEBUG: the evidence it did not recompute.
        return {"flags": ("--kv-transfer-config", json.dumps(connector)),
                "env": {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
                        **({"VLLM_LOGGING_LEVEL": "DEBUG"} if index else {})}}

    pair = start_replicas(2, tmp_path_factory.mktemp("pd"), configure)
    yield pair
    for r in pair:
        r.stop()


async def test_smg_pd_chat_equals_the_decode_workers_own_answer(pd_pair, tmp_path, oracle):
    prefill, decode = pd_pair
    gw = launch_gateway(pd_pair, "", tmp_path / "smg-pd.log", pd=True)
    try:
        body = {"model": gw.model, "messages": [{"role": "user", "content": TEXT}], "temperature": 0,
                "max_tokens": 8, "skip_special_tokens": False}
        status, raw = await asyncio.to_thread(http, "POST", f"{gw.url}/v1/chat/completions", body)
        assert status == 200, raw
        answer = json.loads(raw)
        ids = oracle.chat_ids(TEXT)
        assert answer["usage"]["prompt_tokens"] == len(ids)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{decode.port}") as channel:
            [direct] = [r.complete async for r in pb_grpc.VllmEngineStub(channel).Generate(
                request(ids, temperature=0.0, max_tokens=8))]
        expected = oracle.tokenizer.decode(list(direct.output_ids), skip_special_tokens=False)
        assert answer["choices"][0]["message"]["content"] in (expected, expected.rstrip("\ufffd"))
        log = decode.log_path.read_text(errors="replace")
        received = re.findall(r"Finished recving KV transfer for request", log)
        assert received, "the decode engine logged no KV received from the prefill engine"
        print(f"\nPD through SMG: {len(ids)} prompt tokens, answer {answer['choices'][0]['message']['content']!r}, "
              f"{len(received)} KV transfer(s) received by the decode worker")
    except BaseException:
        print(f"\n===== SMG log =====\n{gw.tail()}\n===== decode log =====\n{decode.tail(80)}")
        raise
    finally:
        gw.stop()

