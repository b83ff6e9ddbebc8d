"""Mutual TLS on the RL control endpoint through the real SMG: gRPC stays plaintext (SMG 1.13's gRPC channels
carry no TLS), the control endpoint serves HTTPS and requires client certificates from the cluster's CA, and
`smg launch --enable-rl --client-cert-path/--client-key-path/--ca-cert-paths` reaches it with its own. The
worker is a server on the session's engine; certificates are made here (tests/certs.py).
"""

import asyncio

import pytest

from harness.gateway import launch_gateway, smg_executable
from harness.processes import MODEL, http_json
from smg.rl import RL
from tests.certs import Authority
from tests.conftest import extra_server
from tests.test_tls import REFUSED, Client

pytestmark = [pytest.mark.engine, pytest.mark.gateway]
if smg_executable() is None:
    pytest.fail("the SMG gateway (`smg` executable, pip package smg) is not installed", pytrace=False)
KEY = "tls-control-key"


async def test_smg_fans_out_over_mutual_tls_and_a_client_without_a_certificate_is_refused(engine, tmp_path):
    ca, stranger_ca = Authority("cluster-ca"), Authority("other-ca")
    cert, key = ca.issue("vlm-servicer").write(tmp_path / "server", "tls")
    ca_file = ca.write(tmp_path / "server", "ca")
    gateway_cert, gateway_key = ca.issue("smg", client=True).write(tmp_path / "smg", "client")
    stranger = stranger_ca.issue("smg", client=True).write(tmp_path / "stranger", "client")
    tls = dict(control_tls_cert_file=str(cert), control_tls_key_file=str(key), control_tls_client_ca_file=str(ca_file))
    async with extra_server(engine, control_port=0, control_api_key=KEY, **tls) as (server, stub):
        assert server.config.tls is None and server.control_scheme == "https"
        control_url = f"https://127.0.0.1:{server.control_port}"
        gw = await asyncio.to_thread(
            launch_gateway, [f"grpc://127.0.0.1:{server.port}"], tmp_path / "smg.log", "--enable-rl",
            "--client-cert-path", str(gateway_cert), "--client-key-path", str(gateway_key),
            "--ca-cert-paths", str(ca.write(tmp_path / "smg", "ca")), model=MODEL)
        try:
            with gw.dump_log_on_failure():
                [worker] = await asyncio.to_thread(gw.workers)
                status, body = await asyncio.to_thread(
                    http_json, "PATCH", f"{gw.url}/workers/{worker['id']}",
                    {"api_key": KEY, "labels": {"rl.control_url": control_url, "rl.group": "tls"}})
                assert status in (200, 202), body
                rl = RL(gw.url)
                deadline = asyncio.get_running_loop().time() + 60
                while [w.control_url for w in await asyncio.to_thread(rl.workers)] != [control_url]:
                    assert asyncio.get_running_loop().time() < deadline, "SMG never listed the control URL"
                    await asyncio.sleep(0.2)
                for path, body in (("pause_generation", {"mode": "keep"}), ("continue_generation", {}),
                                   ("get_weight_version", {})):
                    result = await asyncio.to_thread(rl.fanout, path, body, selector="rl.group=tls")
                    assert result.succeeded == result.total == 1, result
                print(f"\nover mTLS through SMG: {[(r.status, r.body) for r in result.results.values()]}")
                assert [r.body for r in result.results.values()] == [{"weight_version": "default"}]
        finally:
            await asyncio.to_thread(gw.stop)
        # Straight to the endpoint: no client certificate, or one from another CA, ends at the handshake.
        for cert_pair in (None, stranger):
            with pytest.raises(REFUSED):
                async with Client(server.control_port, [ca], cert_pair):
                    pass
