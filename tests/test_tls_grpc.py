"""TLS and mTLS on the gRPC port, on the real engine: who is served, who is refused at the handshake, and a
certificate rotation on disk in the middle of a run (no restart, the established call carries on).

Certificates are made here (tests/certs.py). Health and reflection share the port; metrics follow its TLS;
the plaintext health port answers Kubernetes' probes.
"""

import asyncio
import logging
import socket
import ssl
import urllib.error
import urllib.request

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from servicer.config import ServerConfig
from servicer.server import Server
from tests.certs import Authority
from tests.conftest import MAX_MESSAGE, extra_server
from tests.fixtures import request
from tests.test_tls import REFUSED
from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine
IDS = [(7 * i + 3) % 900 + 20 for i in range(24)]


class Pki:
    """The server's files (one folder, as a mounted Secret) and client certificates, from a CA that can be replaced."""

    def __init__(self, folder):
        self.folder = folder
        self.other = Authority("other-ca")
        self.stranger = self.other.issue("intruder", client=True)
        self.rotate()

    def rotate(self) -> None:
        """What cert-manager does on renewal with a new issuer: a new CA, server certificate and client certificates."""
        self.ca = Authority("cluster-ca")
        self.server = self.ca.issue("vlm-servicer")
        self.client = self.ca.issue("smg", client=True)
        self.cert_file, self.key_file = self.server.write(self.folder, "tls")
        self.ca_file = self.ca.write(self.folder, "ca")

    def config(self) -> dict:
        return dict(tls_cert_file=str(self.cert_file), tls_key_file=str(self.key_file),
                    tls_client_ca_file=str(self.ca_file))


def _channel(port: int, ca: Authority, client=None) -> grpc.aio.Channel:
    key, chain = (client.key_pem, client.cert_pem) if client else (None, None)
    creds = grpc.ssl_channel_credentials(ca.pem, key, chain)
    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options)


def _handshake(port: int, ca: Authority, client=None, folder=None) -> bytes:
    """A bare TLS 1.2 handshake (a refused client certificate fails the handshake itself); the server's certificate."""
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(*client.write(folder, "probe"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


async def _generate(stub, max_tokens: int = 4) -> pb.GenerateComplete:
    req = request(IDS, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    [done] = [r.complete async for r in stub.Generate(req)]
    return done


async def _refused(port: int, ca: Authority, client=None) -> grpc.StatusCode:
    async with _channel(port, ca, client) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.VllmEngineStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    return err.value.code()


def _https(url: str, ca: Authority, client=None, folder=None) -> str:
    context = ssl.create_default_context(cadata=ca.pem.decode())
    if client is not None:
        context.load_cert_chain(*client.write(folder, "metrics-client"))
    with urllib.request.urlopen(url, context=context, timeout=10) as answer:
        return answer.read().decode()


async def test_mtls_serves_the_cas_clients_and_refuses_others_at_the_handshake(engine, tmp_path):
    pki = Pki(tmp_path / "secret")
    async with extra_server(engine, **pki.config(), metrics_port=0, health_port=0) as (server, _):
        port = server.port
        async with _channel(port, pki.ca, pki.client) as channel:
            assert (await _generate(pb_grpc.VllmEngineStub(channel))).finish_reason == "length"
            # Health and reflection share the port and its TLS.
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING

            async def ask():
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            [reply] = [r async for r in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(ask())]
            assert "vllm.grpc.engine.VllmEngine" in {s.name for s in reply.list_services_response.service}

        # No client certificate, or one from another CA: refused during the TLS handshake, no RPC runs.
        received = server.servicer.last_receive
        assert await _refused(port, pki.ca) == grpc.StatusCode.UNAVAILABLE
        assert await _refused(port, pki.ca, pki.stranger) == grpc.StatusCode.UNAVAILABLE
        for client in (None, pki.stranger):
            with pytest.raises(REFUSED):
                await asyncio.to_thread(_handshake, port, pki.ca, client, tmp_path / "probe")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.VllmEngineStub(plain).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.servicer.last_receive == received

        # Metrics follow the port's choice: HTTPS, client certificates from the same CA.
        url = f"https://127.0.0.1:{server.metrics_port}/metrics"
        assert "vlm_requests_total" in await asyncio.to_thread(_https, url, pki.ca, pki.client, tmp_path / "m")
        with pytest.raises((urllib.error.URLError, *REFUSED)):
            await asyncio.to_thread(_https, url, pki.ca)

        # The probe port: grpc.health.v1 alone, plaintext, the same health state.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as plain:
            health = await health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(service="vllm.grpc.engine.VllmEngine"))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.VllmEngineStub(plain).GetServerInfo(pb.GetServerInfoRequest())
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # nothing but health there


async def test_rotated_certificates_are_used_without_restart_and_calls_carry_on(engine, tmp_path):
    pki = Pki(tmp_path / "secret")
    async with extra_server(engine, **pki.config()) as (server, _):
        port = server.port
        old_ca, old_client, old_cert = pki.ca, pki.client, pki.server
        assert await asyncio.to_thread(_handshake, port, old_ca, old_client, tmp_path / "probe") == \
            old_cert.cert.public_bytes(Encoding.DER)
        async with _channel(port, old_ca, old_client) as kept:
            stub = pb_grpc.VllmEngineStub(kept)
            long = stub.Generate(request(IDS, temperature=0.0, max_tokens=1500, ignore_eos=True, stream=True))
            first = await long.read()
            assert first.HasField("chunk")

            pki.rotate()  # on disk, while the call runs

            # A new connection: the new certificate, the new CA's clients; the old CA's clients are refused.
            new_der = await asyncio.to_thread(_handshake, port, pki.ca, pki.client, tmp_path / "probe")
            assert new_der == pki.server.cert.public_bytes(Encoding.DER)
            async with _channel(port, pki.ca, pki.client) as fresh:
                assert (await _generate(pb_grpc.VllmEngineStub(fresh))).finish_reason == "length"
            assert await _refused(port, old_ca, old_client) == grpc.StatusCode.UNAVAILABLE
            assert server.credentials.reloads == 1

            # The connection opened before the rotation: its call finishes, and it takes new calls.
            tokens, response = len(first.chunk.token_ids), first
            while (response := await long.read()) is not grpc.aio.EOF:
                if response.HasField("chunk"):
                    tokens += len(response.chunk.token_ids)
                else:
                    assert response.complete.finish_reason == "length"
            assert tokens == 1500
            assert (await _generate(stub)).finish_reason == "length"


async def test_plaintext_on_a_non_loopback_address_warns_once(engine, caplog):
    for host, warnings in (("127.0.0.1", 0), ("0.0.0.0", 1)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="servicer.server"):
            server = Server(ServerConfig(host=host, port=0), engine)  # bound, never started
        try:
            assert sum("plaintext gRPC" in r.getMessage() for r in caplog.records) == warnings, caplog.text
        finally:
            await server.grpc.stop(0)
            server.servicer.close()
