"""A worker keeps its own entry in the real SMG gateway (`--register-with`): added when the gateway does not list
it, labelled with its rl.control_url, control key, weight version and extra labels, and relabelled after a
refit. The worker is a server on the session's engine."""

import asyncio

import pytest

from harness.gateway import launch_gateway, smg_executable
from harness.processes import MODEL
from smg.rl import RL
from tests.conftest import extra_server

pytestmark = [pytest.mark.engine, pytest.mark.gateway]
if smg_executable() is None:
    pytest.fail("the SMG gateway (`smg` executable, pip package smg) is not installed", pytrace=False)
KEY = "registrar-key"


async def _until(predicate, what: str, timeout: float = 60.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := await asyncio.to_thread(predicate)):
        assert asyncio.get_running_loop().time() < deadline, f"never saw: {what}"
        await asyncio.sleep(0.2)
    return found


async def test_a_worker_adds_itself_to_a_gateway_and_keeps_its_labels_current(engine, tmp_path):
    # IGW mode: SMG routes chat to gRPC workers added through its API (in its default mode it only fans RL out).
    gw = await asyncio.to_thread(launch_gateway, [], tmp_path / "smg.log", "--enable-rl", "--enable-igw",
                                 model=MODEL, workers=0)
    try:
        with gw.dump_log_on_failure():
            async with extra_server(engine, control_port=0, control_api_key=KEY, register_with=gw.url,
                                    register_labels=(("rl.group", "self"),), register_interval_s=1.0) as (server, _):
                rl = RL(gw.url)
                [worker] = await _until(lambda: [w for w in rl.workers() if w.control_url], "the worker registered")
                assert worker.url == f"grpc://127.0.0.1:{server.port}"
                assert worker.control_url == f"http://127.0.0.1:{server.control_port}"
                assert worker.labels["rl.group"] == "self" and worker.weight_version == "default"
                assert worker.labels["rl.pause_modes"] == "abort,wait,keep,in_place,retract"
                # The key SMG holds is the worker's: its fan-out is let in.
                result = await asyncio.to_thread(rl.fanout, "get_weight_version", {}, selector="rl.group=self")
                assert result.succeeded == 1 and result.results[worker.id].body == {"weight_version": "default"}
                # A relabel (as after a refit) reaches the gateway at once, not at the next round.
                await asyncio.to_thread(rl.fanout, "update_weight_version", {"new_version": "v2"},
                                        selector="rl.group=self")
                await _until(lambda: rl.workers()[0].weight_version == "v2", "the new version in SMG")
                await asyncio.to_thread(rl.fanout, "update_weight_version", {"new_version": "default"},
                                        selector="rl.group=self")
                # And the gateway routes chat to it.
                status, answer = await gw.chat({"model": gw.model or str(MODEL), "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "hello"}]})
                assert status == 200, answer
    finally:
        await asyncio.to_thread(gw.stop)
