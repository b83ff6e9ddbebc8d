"""TLS for the gRPC port and for HTTP endpoints, re-reading the PEM files when they change.

Nothing here implements TLS. The gRPC port uses gRPC's dynamic server credentials: gRPC calls
`GrpcCredentials.fetch` before every new connection's handshake, and it hands gRPC new files only
when they changed. HTTP endpoints (the RL control endpoint, metrics) get an `ssl.SSLContext` whose
handshake callback moves each new connection onto a context built from the current files.
Either way, connections already established keep the certificate they were opened with, and a
bad file (half written, key not matching) keeps the last good certificate and logs a warning.
"""

import logging
import os
import pathlib
import ssl
import threading
from dataclasses import dataclass

import grpc

from servicer.config import ServerConfig, TlsFiles

logger = logging.getLogger(__name__)


class TlsFileError(ValueError):
    """The files do not make a usable certificate (unreadable, not PEM, or the key does not match)."""


@dataclass(frozen=True)
class _Material:
    cert: bytes
    key: bytes
    client_ca: bytes | None


def _stamp(files: TlsFiles) -> tuple:
    """What identifies the files' current contents cheaply. stat() follows symlinks, so a Kubernetes
    Secret update (its `..data` link swapped to a new folder) changes the inode."""
    stamp: list[tuple[int, int, int, int] | None] = []  # None: the file cannot be read now
    for path in (files.cert_file, files.key_file, files.client_ca_file):
        if path:
            try:
                st = os.stat(path)
                stamp.append((st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size))
            except OSError:
                stamp.append(None)
    return tuple(stamp)


def _context(files: TlsFiles) -> ssl.SSLContext:
    """A server context from the files as they are now (OpenSSL checks that the key matches)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert_file, files.key_file)
        if files.client_ca_file:
            context.load_verify_locations(cafile=files.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(
            f"{files.cert_file} / {files.key_file}{f' / {files.client_ca_file}' if files.client_ca_file else ''}: {exc}"
        ) from exc
    return context


def _read(files: TlsFiles) -> _Material:
    """The files' bytes, checked to make a working certificate first."""
    _context(files)
    try:
        ca = pathlib.Path(files.client_ca_file).read_bytes() if files.client_ca_file else None
        return _Material(pathlib.Path(files.cert_file).read_bytes(), pathlib.Path(files.key_file).read_bytes(), ca)
    except OSError as exc:
        raise TlsFileError(str(exc)) from exc


class _Watch:
    """The files' last good contents, re-read when their stamp changes."""

    def __init__(self, files: TlsFiles, load):
        self.files = files
        self._load = load
        self._lock = threading.Lock()  # gRPC calls fetch() from its own threads
        self._stamp = _stamp(files)
        self.current = load(files)  # fails loudly at start: a bad file there is a configuration error
        self.reloads = 0

    def changed(self) -> bool:
        """Re-read the files if they changed since the last look; True when a new certificate was loaded."""
        stamp = _stamp(self.files)
        if stamp == self._stamp:
            return False
        with self._lock:
            if stamp == self._stamp:
                return False
            self._stamp = stamp  # a bad new file is reported once, not on every handshake
            try:
                self.current = self._load(self.files)
            except TlsFileError as exc:
                logger.warning("TLS files changed but cannot be used; keeping the previous certificate: %s", exc)
                return False
            self.reloads += 1
            logger.info("TLS certificate reloaded from %s", self.files.cert_file)
            return True


def _grpc_configuration(material: _Material):
    return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], material.client_ca)


class GrpcCredentials:
    """gRPC server credentials that follow the files (gRPC's dynamic server credentials)."""

    def __init__(self, files: TlsFiles):
        self._watch = _Watch(files, _read)
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _grpc_configuration(self._watch.current),
            self.fetch,
            require_client_authentication=files.client_ca_file is not None,
        )

    def fetch(self):
        """gRPC's callback before each new connection's handshake: a new configuration, or None for no change."""
        try:
            if self._watch.changed():
                return _grpc_configuration(self._watch.current)
        except Exception:  # never let a callback failure reach gRPC's core
            logger.exception("TLS certificate check failed; keeping the previous certificate")
        return None

    @property
    def reloads(self) -> int:
        return self._watch.reloads


def grpc_server_credentials(config: ServerConfig) -> GrpcCredentials | None:
    """Credentials for the gRPC port (None: plaintext)."""
    return GrpcCredentials(config.tls) if config.tls else None


class ReloadingContext:
    """An `ssl.SSLContext` for a server (pass `.context` to uvicorn, asyncio or a socket server). On each
    handshake it checks the files (a few stat() calls) and moves the connection onto a context built
    from them if they changed. Whether client certificates are required is fixed at start."""

    def __init__(self, files: TlsFiles):
        self._watch = _Watch(files, _context)
        self.context = self._watch.current
        self.context.sni_callback = self._on_client_hello  # OpenSSL calls it with or without SNI

    def _on_client_hello(self, connection, server_name, context) -> None:
        try:
            self._watch.changed()
        except Exception:
            logger.exception("TLS certificate check failed; keeping the previous certificate")
        current = self._watch.current
        if current is not self.context:
            connection.context = current
        return None

    @property
    def reloads(self) -> int:
        return self._watch.reloads


def ssl_context(files: TlsFiles | None) -> ssl.SSLContext | None:
    """A reloading server context for these files (None: no TLS)."""
    return ReloadingContext(files).context if files else None


def control_ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The RL control endpoint's server context (None: plain HTTP). Its files default to the gRPC port's."""
    return ssl_context(config.control_tls)
