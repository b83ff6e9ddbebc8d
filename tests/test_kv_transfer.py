"""KV-transfer parameters (prefill/decode disaggregation) pass through to vLLM's KV connector and back.

The engine runs a test connector through vLLM's own plug-in point (tests/echo_connector.py: it moves no KV and
returns the parameters it received when the request ends, as NIXL returns a prefill's block ids). So the
request's `kv_transfer_params_json` (or the legacy typed field) reaches the connector exactly, the connector's
output comes back as `GenerateComplete.kv_transfer_params_json`, unary and streamed, and the ids generated are
the same as without parameters. A worker without a connector is FAILED_PRECONDITION (tests/test_bad_input.py).
"""

import json

import grpc
import pytest
import pytest_asyncio

from tests.conftest import _start_engine, extra_server
from servicer.tensors import decode_tensor
from tests.fixtures import ENGINE_ARGS, MODEL, image, mm_inputs, reference_inputs, request
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


async def test_a_prefill_leg_returns_its_images_by_identity(echo_stub, oracle):
    """`GenerateComplete.media_identity`: the expanded ids and each image's identity, range and grid, which a
    decode leg can send instead of the pixels."""
    imgs = oracle.images([image(112, 84, seed=41)])
    ids = oracle.chat_ids("What is in the image?", 1)
    req = request(ids, mm=mm_inputs(imgs.raw, imgs.grid), temperature=0.0, max_tokens=2)
    req.kv_transfer_params_json = json.dumps({"do_remote_decode": True})
    call = echo_stub.Generate(req)
    identities = dict(await call.initial_metadata())["vlm-mm-identities"]
    [done] = [r.complete async for r in call]
    media = done.media_identity
    assert list(media.prompt_token_ids) == oracle.chat_ids("What is in the image?", 1, imgs.tokens_per_image)
    assert list(media.mm_inputs.mm_hashes) == [identities]
    [place] = media.mm_inputs.mm_placeholders
    assert set(media.prompt_token_ids[place.offset:place.offset + place.length]) == {oracle.pad}
    assert decode_tensor("grid", media.mm_inputs.model_specific_tensors["image_grid_thw"]).tolist() == imgs.grid.tolist()
    assert not media.mm_inputs.HasField("pixel_values")
    # Without KV parameters a completion carries no identity.
    [plain] = await _completes(echo_stub, request(ids, mm=mm_inputs(imgs.raw, imgs.grid), temperature=0.0, max_tokens=2))
    assert not plain.HasField("media_identity")


async def test_pixel_less_image_needs_a_connector_that_loads_the_whole_prompt(echo_stub, oracle):
    """This connector loads nothing, so the engine would have to encode an image it has no pixels for (vLLM's
    engine core dies of that): a decode leg's pixel-less image is refused here, naming it, and the engine serves on."""
    imgs = oracle.images([image(112, 84, seed=42)])
    ids = oracle.chat_ids("What is in the image?", 1)
    mm = reference_inputs(imgs.grid, ["d" * 32])
    req = request(ids, mm=mm, temperature=0.0, max_tokens=2)
    req.kv_transfer_params_json = json.dumps({"do_remote_prefill": True})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _completes(echo_stub, req)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "d" * 32 in err.value.details()
    [after] = await _completes(echo_stub, request(PROMPT, temperature=0.0, max_tokens=2))
    assert len(after.output_ids) == 2
