"""TLS without an engine: the flags and their environment variables, and the reloading `ssl.SSLContext` the
RL control endpoint (and the metrics endpoint) serve with. Certificates are made here (tests/certs.py).

The gRPC port's TLS, on the real engine, is in test_tls_grpc.py.
"""

import argparse
import asyncio
import logging
import ssl

import pytest

from servicer.config import ConfigError, ServerConfig, TlsFiles, add_serve_flags, config_from_args
from servicer.tls import ReloadingContext, control_ssl_context
from tests.certs import Authority

REFUSED = (ssl.SSLError, ConnectionResetError)  # a handshake the server ends: an alert, or a reset before one


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1, a client certificate from the CA and one from another CA."""
    ca, other = Authority("test-ca"), Authority("other-ca")
    server = tmp_path / "server"
    cert, key = ca.issue("vlm-servicer").write(server, "tls")
    return {
        "dir": tmp_path, "ca": ca, "ca_file": ca.write(server, "ca"), "cert": cert, "key": key,
        "client": ca.issue("gateway", client=True).write(tmp_path / "client", "good"),
        "stranger": other.issue("gateway", client=True).write(tmp_path / "client", "other"),
    }


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    ns, rest = parser.parse_known_args(argv)
    return config_from_args(ns, rest)


def test_flags_env_and_the_control_defaults(pki, monkeypatch):
    cert, key, ca = str(pki["cert"]), str(pki["key"]), str(pki["ca_file"])
    assert _parse([]).tls is None and _parse([]).control_tls is None
    grpc_only = _parse(["--tls-cert-file", cert, "--tls-key-file", key, "--tls-client-ca-file", ca])
    assert grpc_only.tls == grpc_only.control_tls == TlsFiles(cert, key, ca)
    own = _parse(["--tls-cert-file", cert, "--tls-key-file", key, "--tls-client-ca-file", ca,
                  "--control-tls-cert-file", cert, "--control-tls-key-file", key])
    assert own.control_tls == TlsFiles(cert, key, None)  # given: the control endpoint's own, no client CA
    # A Kubernetes Secret mount names its files in the environment; a flag on the command line wins.
    monkeypatch.setenv("VLM_SERVICER_TLS_CERT_FILE", cert)
    monkeypatch.setenv("VLM_SERVICER_TLS_KEY_FILE", key)
    monkeypatch.setenv("VLM_SERVICER_TLS_CLIENT_CA_FILE", ca)
    assert _parse([]).tls == TlsFiles(cert, key, ca) == _parse([]).control_tls
    assert _parse(["--tls-client-ca-file", cert]).tls.client_ca_file == cert
    monkeypatch.setenv("VLM_SERVICER_CONTROL_TLS_CERT_FILE", cert)
    monkeypatch.setenv("VLM_SERVICER_CONTROL_TLS_KEY_FILE", key)
    assert _parse([]).control_tls == TlsFiles(cert, key, None)


def test_incomplete_or_missing_files_are_refused(pki):
    cert, key, ca = str(pki["cert"]), str(pki["key"]), str(pki["ca_file"])
    cases = {
        "--tls-cert-file and --tls-key-file: give both": dict(tls_cert_file=cert),
        "--tls-client-ca-file: needs --tls-cert-file": dict(tls_client_ca_file=ca),
        "--tls-key-file /nope: not a readable file": dict(tls_cert_file=cert, tls_key_file="/nope"),
        "--control-tls-cert-file and --control-tls-key-file": dict(control_tls_key_file=key),
    }
    for message, fields in cases.items():
        with pytest.raises(ConfigError, match=message):
            ServerConfig(**fields)


async def _serve(context: ssl.SSLContext):
    """A line server behind `context`: answers each line with the client certificate's common name."""

    async def handle(reader, writer):
        try:
            while line := await reader.readline():
                subject = dict(x[0] for x in writer.get_extra_info("peercert")["subject"])
                writer.write(f"{line.decode().strip()} {subject['commonName']}\n".encode())
                await writer.drain()
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)


class Client:
    """One TLS connection to the line server; TLS 1.2, so a refused client certificate fails the handshake
    itself (TLS 1.3 clients learn it only at their first read)."""

    def __init__(self, port: int, trust: list, cert=None):
        self.port = port
        self.context = ssl.create_default_context()
        self.context.maximum_version = ssl.TLSVersion.TLSv1_2
        for authority in trust:
            self.context.load_verify_locations(cadata=authority.pem.decode())
        if cert:
            self.context.load_cert_chain(*cert)

    async def __aenter__(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=self.context)
        return self

    async def __aexit__(self, *exc):
        self.writer.close()

    @property
    def server_cert(self) -> bytes:
        return self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)

    async def ask(self, text: str) -> str:
        self.writer.write(f"{text}\n".encode())
        await self.writer.drain()
        return (await self.reader.readline()).decode().strip()


async def test_control_context_mtls_and_rotation_without_restart(pki, caplog):
    files = TlsFiles(str(pki["cert"]), str(pki["key"]), str(pki["ca_file"]))
    config = ServerConfig(tls_cert_file=files.cert_file, tls_key_file=files.key_file,
                          tls_client_ca_file=files.client_ca_file)
    context = control_ssl_context(config)  # the gRPC port's files, as nothing else was given
    assert context.verify_mode == ssl.CERT_REQUIRED
    server = await _serve(context)
    port = server.sockets[0].getsockname()[1]
    ca = pki["ca"]
    try:
        async with Client(port, [ca], pki["client"]) as client:
            assert await client.ask("hello") == "hello gateway"
            first_cert = client.server_cert
        for trust, cert in (([ca], None), ([ca], pki["stranger"])):
            with pytest.raises(REFUSED):
                async with Client(port, trust, cert):
                    pass

        # A connection opened before the rotation, kept open across it.
        async with Client(port, [ca], pki["client"]) as kept:
            assert await kept.ask("before") == "before gateway"
            # cert-manager rotates everything: a new CA, a new server certificate, client certificates from the new CA.
            new_ca = Authority("rotated-ca")
            new_ca.issue("vlm-servicer").write(pki["dir"] / "server", "tls")
            new_ca.write(pki["dir"] / "server", "ca")
            new_client = new_ca.issue("gateway-2", client=True).write(pki["dir"] / "client", "new")
            async with Client(port, [new_ca], new_client) as fresh:
                assert await fresh.ask("after") == "after gateway-2"
                assert fresh.server_cert != first_cert
            with pytest.raises(REFUSED):  # the old CA's client certificate is no longer accepted
                async with Client(port, [ca, new_ca], pki["client"]):
                    pass
            assert await kept.ask("still") == "still gateway"  # the established connection was not dropped

            # A half-done rotation (a key that does not match the certificate) keeps the last good certificate.
            pki["dir"].joinpath("server", "tls.key").write_bytes(new_ca.issue("mismatch").key_pem)
            with caplog.at_level(logging.WARNING, logger="servicer.tls"):
                async with Client(port, [new_ca], new_client) as fresh:
                    assert await fresh.ask("bad key") == "bad key gateway-2"
            assert sum("keeping the previous certificate" in r.getMessage() for r in caplog.records) == 1
    finally:
        server.close()
        await server.wait_closed()


def test_plain_tls_without_client_certificates(pki):
    files = TlsFiles(str(pki["cert"]), str(pki["key"]))
    reloading = ReloadingContext(files)
    assert reloading.context.verify_mode == ssl.CERT_NONE and reloading.reloads == 0
    assert control_ssl_context(ServerConfig()) is None
