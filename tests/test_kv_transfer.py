"""KV-transfer parameters (prefill/decode disaggregation) pass through to vLLM's KV connector and back.

The engine runs a test connector through vLLM's own plug-in point (tests/echo_connector.py: it moves no KV and
returns the parameters it received when the request ends, as NIXL returns a prefill's block ids). So the
request's `kv_transfer_params_json` (or the legacy typed field) reaches the connector exactly, the connector's
output comes back as `GenerateComplete.kv_transfer_params_json`, unary and streamed, and the ids generated are
the same as without parameters. A worker without a connector is FAILED_PRECONDITION (tests/test_bad_input.py).
"""

import json

import pytest
import pytest_asyncio

from tests.conftest import _start_engine, extra_server
from tests.fixtures import ENGINE_ARGS, MODEL, request
from vlm_proto import vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine

CONNECTOR = {"kv_connector": "EchoConnector", "kv_connector_module_path": "tests.echo_connector",
             "kv_role": "kv_both"}
PROMPT = [(5 * i + 7) % 900 + 20 for i in range(40)]


@pytest_asyncio.fixture(scope="module")
async def echo_stub():
    engine = await _start_engine(MODEL, ENGINE_ARGS + ("--kv-transfer-config", json.dumps(CONNECTOR)))
    try:
        async with extra_server(engine) as (_, stub):
            yield stub
    finally:
        engine.shutdown()


async def _completes(stub, req) -> list[pb.GenerateComplete]:
    return [r.complete async for r in stub.Generate(req) if r.HasField("complete")]


async def test_the_connector_is_reported(echo_stub):
    info = await echo_stub.GetServerInfo(pb.GetServerInfoRequest())
    assert (info.kv_connector, info.kv_role) == ("EchoConnector", "kv_both")


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_params_reach_the_connector_and_its_output_comes_back(echo_stub, stream):
    params = {"do_remote_decode": True, "do_remote_prefill": False, "remote_block_ids": [3, 1, 2]}
    plain = _completes(echo_stub, request(PROMPT, temperature=0.0, max_tokens=4, ignore_eos=True))
    [without] = await plain
    assert not without.HasField("kv_transfer_params_json")

    req = request(PROMPT, stream=stream, temperature=0.0, max_tokens=4, ignore_eos=True)
    req.kv_transfer_params_json = json.dumps(params)
    [done] = await _completes(echo_stub, req)
    assert json.loads(done.kv_transfer_params_json) == {"received": params, "prompt_tokens": len(PROMPT)}
    if not stream:
        assert list(done.output_ids) == list(without.output_ids)  # the parameters change no id


async def test_the_legacy_typed_field_arrives_as_its_two_keys(echo_stub):
    req = request(PROMPT, temperature=0.0, max_tokens=1)
    req.kv_transfer_params.CopyFrom(pb.KvTransferParams(remote_host="10.0.0.7", remote_port=5600))
    [done] = await _completes(echo_stub, req)
    assert json.loads(done.kv_transfer_params_json)["received"] == {"remote_host": "10.0.0.7", "remote_port": 5600}
