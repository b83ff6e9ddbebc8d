"""The servicer's one typed configuration, built once from the command line."""

import argparse
import os
from dataclasses import dataclass, field


DEFAULT_MODEL = "models/tiny-qwen2-vl-shapes"  # trained to read shapes, committed
RANDOM_MODEL = "models/tiny-qwen2-vl"  # random weights, built on first use


class ConfigError(ValueError):
    """A flag value the servicer cannot run with."""


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
            raise ConfigError("--mm-shm-gb and vLLM's --mm-processor-cache-gb both size the shared-memory ring "
                              "(--mm-processor-cache-type shm): give one of them")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"--drain-timeout {self.drain_timeout_s}: must not be negative")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port}: must be in 0..65535")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    parser.add_argument("--model", default=d.model, help="checkpoint folder (default: the tiny Qwen2-VL, built if missing)")
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--port", type=int, default=d.port)
    parser.add_argument("--max-message-mb", type=int, default=d.max_message_mb, help="largest gRPC message accepted")
    parser.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                        help="Generate calls in flight before RESOURCE_EXHAUSTED")
    parser.add_argument("--max-n", type=int, default=d.max_n, help="largest sampling_params.n accepted")
    parser.add_argument("--decode-workers", type=int, default=d.decode_workers,
                        help="threads decoding and casting tensors off the event loop")
    parser.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, default=d.drain_timeout_s,
                        help="seconds in-flight calls get to finish on SIGTERM before the engine stops")
    parser.add_argument("--metrics-port", type=int, default=d.metrics_port,
                        help="serve Prometheus metrics on this port (same host); off by default")
    parser.add_argument("--mm-hash-policy", choices=("recompute", "trust"), default=d.mm_hash_policy,
                        help="recompute: identify images by their bytes (safe); trust: use the gateway's mm_hashes")
    parser.add_argument("--mm-pad-values", action=argparse.BooleanOptionalAction, default=d.mm_pad_values,
                        help="replace image pad ids by identity-derived ids in what the engine sees")
    parser.add_argument("--mm-store-gb", type=float, default=d.mm_store_gb,
                        help="memory for images kept for reference-by-hash (0 disables)")
    parser.add_argument("--mm-shm-gb", type=float, default=d.mm_shm_gb,
                        help="with --mm-processor-cache-type shm: GiB of images published to the engine's ranks "
                             "through shared memory; requests beyond it get RESOURCE_EXHAUSTED. It sets vLLM's "
                             "--mm-processor-cache-gb (default 4): give one of the two, not both")
    parser.add_argument("--pairing-protocol", default=os.environ.get("SMG_PAIRING_PROTOCOL", "").strip(),
                        help="PD pairing protocol reported to SMG (default: $SMG_PAIRING_PROTOCOL, the variable "
                             "SMG's contract names); a prefill and a decode worker pair only when theirs are equal")
    parser.add_argument("--mm-shm-keep", action="store_true", default=d.mm_shm_keep,
                        help="do not unlink gateway shared-memory segments after reading them (debugging)")


def _sets_flag(argv: tuple[str, ...], flag: str) -> bool:
    """Whether vLLM-style flags set `flag` (`--flag v` or `--flag=v`, dashes or underscores, as vLLM's parser takes them)."""
    return any(arg.split("=", 1)[0].replace("_", "-") == flag for arg in argv if arg.startswith("--"))


def config_from_args(ns: argparse.Namespace, engine_args: list[str]) -> ServerConfig:
    return ServerConfig(
        model=ns.model, host=ns.host, port=ns.port, max_message_mb=ns.max_message_mb,
        max_concurrent_requests=ns.max_concurrent_requests, max_n=ns.max_n,
        decode_workers=ns.decode_workers, drain_timeout_s=ns.drain_timeout_s, metrics_port=ns.metrics_port,
        mm_hash_policy=ns.mm_hash_policy, mm_pad_values=ns.mm_pad_values, mm_store_gb=ns.mm_store_gb,
        mm_shm_keep=ns.mm_shm_keep, mm_shm_gb=ns.mm_shm_gb, pairing_protocol=ns.pairing_protocol,
        engine_args=tuple(engine_args),
    )
