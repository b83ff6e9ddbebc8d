"""The servicer's one typed configuration, built once from the command line."""

import argparse
import ipaddress
import os
import pathlib
from dataclasses import dataclass, field

CONTROL_KEY_ENV = "VLM_SERVICER_CONTROL_API_KEY"
DEFAULT_MODEL = "models/tiny-qwen2-vl-shapes"  # trained to read shapes, committed
RANDOM_MODEL = "models/tiny-qwen2-vl"  # random weights, built on first use


class ConfigError(ValueError):
    """A flag value the servicer cannot run with."""


# Flags an operator may give as environment variables instead (a Kubernetes Secret mounted as files, named
# in the pod spec); a flag on the command line wins.
TLS_ENV = {
    "tls_cert_file": "VLM_SERVICER_TLS_CERT_FILE",
    "tls_key_file": "VLM_SERVICER_TLS_KEY_FILE",
    "tls_client_ca_file": "VLM_SERVICER_TLS_CLIENT_CA_FILE",
    "control_tls_cert_file": "VLM_SERVICER_CONTROL_TLS_CERT_FILE",
    "control_tls_key_file": "VLM_SERVICER_CONTROL_TLS_KEY_FILE",
    "control_tls_client_ca_file": "VLM_SERVICER_CONTROL_TLS_CLIENT_CA_FILE",
}


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one TLS endpoint: its certificate chain and key, and the CA its clients must present
    certificates from (None: no client certificate asked for)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = pick a free port (tests)
    max_message_mb: int = 512  # an 8-image 1280x720 float32 request is ~110 MB inline
    max_concurrent_requests: int = 1024
    max_n: int = 16
    decode_workers: int = 4  # threads for tensor decode/hash/cast, off the event loop
    drain_timeout_s: float = 30.0
    metrics_port: int | None = None  # Prometheus endpoint; None = off, 0 = pick a free port
    mm_hash_policy: str = "recompute"  # or "trust": use the gateway's mm_hashes as identities
    mm_pad_values: bool = True  # hash-derived ids at image embedding positions
    mm_store_gb: float = 2.0  # images kept for reference-by-hash (LRU by bytes)
    mm_shm_keep: bool = False  # keep gateway shm segments after reading them (debugging)
    mm_shm_gb: float | None = None  # ring publishing images to the engine's ranks (vLLM's shm cache); None: vLLM's size
    pairing_protocol: str = ""  # PD pairing label a gateway matches between prefill and decode workers
    control_port: int | None = None  # the RL control endpoint (HTTP); None = off, 0 = pick a free port
    control_host: str = "127.0.0.1"
    control_api_key: str = field(default="", repr=False)  # bearer key; "" = none (then loopback only)
    control_allow_collective_rpc: bool = False  # vLLM's collective_rpc route: any worker method by name
    register_with: str = ""  # an SMG gateway's URL: keep this worker's entry there labelled (servicer/registrar.py)
    advertise_host: str = ""  # the address the gateway reaches this worker at ("" = --host)
    register_labels: tuple[tuple[str, str], ...] = ()  # extra labels for that entry
    register_interval_s: float = 10.0
    gateway_api_key: str = field(default="", repr=False)  # the gateway's own --api-key, for its /workers API
    tls_cert_file: str | None = None  # TLS on the gRPC port (with the key); re-read when the files change
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # mTLS: client certificates from this CA required
    # The RL control endpoint's TLS; all three default to the gRPC port's when none of them is given.
    control_tls_cert_file: str | None = None
    control_tls_key_file: str | None = None
    control_tls_client_ca_file: str | None = None
    health_port: int | None = None  # plaintext grpc.health.v1 only, for probes that cannot speak TLS
    engine_args: tuple[str, ...] = field(default_factory=tuple)  # vLLM's own flags, passed through

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: must be in 0..65535")
        for name in ("max_message_mb", "max_concurrent_requests", "max_n", "decode_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.mm_hash_policy not in ("recompute", "trust"):
            raise ConfigError(f"--mm-hash-policy {self.mm_hash_policy}: must be recompute or trust")
        if self.mm_store_gb < 0:
            raise ConfigError(f"--mm-store-gb {self.mm_store_gb}: must not be negative")
        if self.mm_shm_gb is not None and self.mm_shm_gb <= 0:
            raise ConfigError(f"--mm-shm-gb {self.mm_shm_gb}: must be positive")
        if self.mm_shm_gb is not None and _sets_flag(self.engine_args, "--mm-processor-cache-gb"):
            raise ConfigError(
                "--mm-shm-gb and vLLM's --mm-processor-cache-gb both size the shared-memory ring "
                "(--mm-processor-cache-type shm): give one of them"
            )
        if self.drain_timeout_s < 0:
            raise ConfigError(f"--drain-timeout {self.drain_timeout_s}: must not be negative")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port}: must be in 0..65535")
        if self.control_port is not None and not 0 <= self.control_port <= 65535:
            raise ConfigError(f"--control-port {self.control_port}: must be in 0..65535")
        if self.register_with and not self.advertised_host:
            raise ConfigError(
                f"--register-with: --host {self.host} is not an address a gateway can reach; "
                "pass --advertise-host (e.g. the pod's IP)"
            )
        if self.register_interval_s <= 0:
            raise ConfigError(f"--register-interval {self.register_interval_s}: must be positive")
        if self.control_port is not None and not self.control_api_key and not is_loopback(self.control_host):
            raise ConfigError(
                f"--control-host {self.control_host}: the control endpoint changes the model every user "
                "gets; off loopback it needs a key (--control-api-key-file or $" + CONTROL_KEY_ENV + ")"
            )
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ConfigError(f"--health-port {self.health_port}: must be in 0..65535")
        control = ("control_tls_cert_file", "control_tls_key_file", "control_tls_client_ca_file")
        if not any(getattr(self, name) for name in control):  # the control endpoint takes the gRPC port's files
            for name in control:
                object.__setattr__(self, name, getattr(self, name.removeprefix("control_")))
        for prefix in ("", "control_"):
            _check_tls(self, prefix)

    @property
    def tls(self) -> TlsFiles | None:
        """The gRPC port's TLS files; None: plaintext."""
        return _tls_files(self, "")

    @property
    def control_tls(self) -> TlsFiles | None:
        """The RL control endpoint's TLS files; None: plain HTTP."""
        return _tls_files(self, "control_")

    @property
    def advertised_host(self) -> str:
        """Where a gateway reaches this worker ("" when only a wildcard bind address is known)."""
        host = self.advertise_host or self.host
        return "" if host in ("0.0.0.0", "::", "") else host


def _tls_files(config: ServerConfig, prefix: str) -> TlsFiles | None:
    cert = getattr(config, f"{prefix}tls_cert_file")
    if not cert:
        return None
    return TlsFiles(cert, getattr(config, f"{prefix}tls_key_file"), getattr(config, f"{prefix}tls_client_ca_file"))


def _check_tls(config: ServerConfig, prefix: str) -> None:
    """Certificate and key come together, a client CA only with them, and each names a readable file."""
    flag = f"--{prefix.replace('_', '-')}tls"
    cert, key, ca = (getattr(config, f"{prefix}tls_{name}_file") for name in ("cert", "key", "client_ca"))
    if bool(cert) != bool(key):
        raise ConfigError(f"{flag}-cert-file and {flag}-key-file: give both or neither")
    if ca and not cert:
        raise ConfigError(f"{flag}-client-ca-file: needs {flag}-cert-file and {flag}-key-file (mTLS is TLS first)")
    for name, path in (("cert", cert), ("key", key), ("client-ca", ca)):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{flag}-{name}-file {path}: not a readable file")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def read_control_key(path: str | None) -> str:
    """The control endpoint's key: from the file when given, else from the environment ("" when neither)."""
    if path is None:
        return os.environ.get(CONTROL_KEY_ENV, "").strip()
    return _read_secret(path, "--control-api-key-file")


def _read_secret(path: str, flag: str) -> str:
    try:
        secret = pathlib.Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"{flag} {path}: the file is empty")
    return secret


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k2=v2` -> ((k, v), (k2, v2))."""
    labels = []
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--register-labels: {pair!r} is not key=value")
        labels.append((key.strip(), value.strip()))
    return tuple(labels)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    parser.add_argument(
        "--model", default=d.model, help="checkpoint folder (default: the tiny Qwen2-VL, built if missing)"
    )
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--port", type=int, default=d.port)
    parser.add_argument("--max-message-mb", type=int, default=d.max_message_mb, help="largest gRPC message accepted")
    parser.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=d.max_concurrent_requests,
        help="Generate calls in flight before RESOURCE_EXHAUSTED",
    )
    parser.add_argument("--max-n", type=int, default=d.max_n, help="largest sampling_params.n accepted")
    parser.add_argument(
        "--decode-workers",
        type=int,
        default=d.decode_workers,
        help="threads decoding and casting tensors off the event loop",
    )
    parser.add_argument(
        "--drain-timeout",
        dest="drain_timeout_s",
        type=float,
        default=d.drain_timeout_s,
        help="seconds in-flight calls get to finish on SIGTERM before the engine stops",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help="serve Prometheus metrics on this port (same host); off by default",
    )
    parser.add_argument(
        "--mm-hash-policy",
        choices=("recompute", "trust"),
        default=d.mm_hash_policy,
        help="recompute: identify images by their bytes (safe); trust: use the gateway's mm_hashes",
    )
    parser.add_argument(
        "--mm-pad-values",
        action=argparse.BooleanOptionalAction,
        default=d.mm_pad_values,
        help="replace image pad ids by identity-derived ids in what the engine sees",
    )
    parser.add_argument(
        "--mm-store-gb",
        type=float,
        default=d.mm_store_gb,
        help="memory for images kept for reference-by-hash (0 disables)",
    )
    parser.add_argument(
        "--mm-shm-gb",
        type=float,
        default=d.mm_shm_gb,
        help="with --mm-processor-cache-type shm: GiB of images published to the engine's ranks "
        "through shared memory; images that never fit get INVALID_ARGUMENT, a ring full of "
        "images in flight RESOURCE_EXHAUSTED. It sets vLLM's --mm-processor-cache-gb "
        "(default 4): give one of the two, not both",
    )
    parser.add_argument(
        "--pairing-protocol",
        default=os.environ.get("SMG_PAIRING_PROTOCOL", "").strip(),
        help="PD pairing protocol reported to SMG (default: $SMG_PAIRING_PROTOCOL, the variable "
        "SMG's contract names); a prefill and a decode worker pair only when theirs are equal",
    )
    parser.add_argument(
        "--control-port",
        type=int,
        default=d.control_port,
        help="serve the RL control endpoint (HTTP: pause, refit, resume; docs/rl.md) on this port; off by default",
    )
    parser.add_argument(
        "--control-host", default=d.control_host, help="address of the control endpoint; off loopback it requires a key"
    )
    parser.add_argument(
        "--control-api-key-file",
        default=None,
        help=f"file holding the bearer key every control call must send (default: ${CONTROL_KEY_ENV})",
    )
    parser.add_argument(
        "--control-allow-collective-rpc",
        action="store_true",
        default=d.control_allow_collective_rpc,
        help="allow the control endpoint's collective_rpc route (runs any engine worker method)",
    )
    parser.add_argument(
        "--register-with",
        default=d.register_with,
        metavar="GATEWAY_URL",
        help="keep this worker's entry in that SMG gateway labelled with its rl.control_url, control "
        "key, weight_version and --register-labels (SMG learns labels only through its API)",
    )
    parser.add_argument(
        "--advertise-host",
        default=d.advertise_host,
        help="the address the gateway reaches this worker at (default: --host)",
    )
    parser.add_argument("--register-labels", default="", metavar="K=V,...", help="extra labels for that entry")
    parser.add_argument(
        "--register-interval",
        dest="register_interval_s",
        type=float,
        default=d.register_interval_s,
        help="seconds between checks of the gateway's entry",
    )
    parser.add_argument(
        "--gateway-api-key-file",
        default=None,
        help="file holding the gateway's own --api-key, if it has one (its /workers API needs it)",
    )
    parser.add_argument(
        "--mm-shm-keep",
        action="store_true",
        default=d.mm_shm_keep,
        help="do not unlink gateway shared-memory segments after reading them (debugging)",
    )
    _add_tls_flags(parser)


def _add_tls_flags(parser: argparse.ArgumentParser) -> None:
    def env(name: str) -> str | None:
        return os.environ.get(TLS_ENV[name], "").strip() or None

    for prefix, where in (
        ("", "the gRPC port (and its health, reflection and metrics)"),
        ("control_", "the RL control endpoint (default: the gRPC port's files)"),
    ):
        flag = f"--{prefix.replace('_', '-')}tls"
        parser.add_argument(
            f"{flag}-cert-file",
            default=env(f"{prefix}tls_cert_file"),
            help=f"PEM certificate chain: TLS on {where}; re-read when the file changes "
            f"(default: ${TLS_ENV[f'{prefix}tls_cert_file']})",
        )
        parser.add_argument(
            f"{flag}-key-file",
            default=env(f"{prefix}tls_key_file"),
            help=f"PEM private key of {flag}-cert-file (default: ${TLS_ENV[f'{prefix}tls_key_file']})",
        )
        parser.add_argument(
            f"{flag}-client-ca-file",
            default=env(f"{prefix}tls_client_ca_file"),
            help=f"PEM CA bundle: clients of {where} must present a certificate it issued (mTLS) "
            f"(default: ${TLS_ENV[f'{prefix}tls_client_ca_file']})",
        )
    parser.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="also serve grpc.health.v1 alone, in plaintext, on this port (same host): for "
        "Kubernetes' gRPC probes, which cannot speak TLS; off by default",
    )


def _sets_flag(argv: tuple[str, ...], flag: str) -> bool:
    """Whether vLLM-style flags set `flag` (`--flag v` or `--flag=v`, dashes or underscores, as vLLM's parser
    takes them)."""
    return any(arg.split("=", 1)[0].replace("_", "-") == flag for arg in argv if arg.startswith("--"))


def config_from_args(ns: argparse.Namespace, engine_args: list[str]) -> ServerConfig:
    return ServerConfig(
        model=ns.model,
        host=ns.host,
        port=ns.port,
        max_message_mb=ns.max_message_mb,
        max_concurrent_requests=ns.max_concurrent_requests,
        max_n=ns.max_n,
        decode_workers=ns.decode_workers,
        drain_timeout_s=ns.drain_timeout_s,
        metrics_port=ns.metrics_port,
        mm_hash_policy=ns.mm_hash_policy,
        mm_pad_values=ns.mm_pad_values,
        mm_store_gb=ns.mm_store_gb,
        mm_shm_keep=ns.mm_shm_keep,
        mm_shm_gb=ns.mm_shm_gb,
        pairing_protocol=ns.pairing_protocol,
        control_port=ns.control_port,
        control_host=ns.control_host,
        control_api_key=read_control_key(ns.control_api_key_file) if ns.control_port is not None else "",
        control_allow_collective_rpc=ns.control_allow_collective_rpc,
        register_with=ns.register_with,
        advertise_host=ns.advertise_host,
        register_labels=_labels(ns.register_labels),
        register_interval_s=ns.register_interval_s,
        gateway_api_key=_read_secret(ns.gateway_api_key_file, "--gateway-api-key-file")
        if ns.gateway_api_key_file
        else "",
        engine_args=tuple(engine_args),
        **{name: getattr(ns, name) for name in TLS_ENV},
        health_port=ns.health_port,
    )
