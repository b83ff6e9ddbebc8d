"""Server lifecycle: create_server() builds it around a started engine; serve() runs it until a signal."""

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine_adapter.types import EngineClient
from servicer.config import ServerConfig, is_loopback
from servicer.control import ControlEndpoint
from servicer.handlers import VllmEngineServicer
from servicer.image_store import ImageStore
from servicer.kv_events import MediaTokens
from servicer.metrics import Metrics
from servicer.multimodal import ImagePolicy
from servicer.registrar import GatewayRegistration
from servicer.registrar import stop as stop_registration
from servicer.requests import RequestDecoder
from servicer.rl import CAPABILITY_LABELS, RlController
from servicer.shm import ConsumedSegments
from servicer.tls import control_ssl_context, grpc_server_credentials, ssl_context
from vlm_proto import vllm_engine_pb2 as pb
from vlm_proto import vllm_engine_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VllmEngine"].full_name
ENGINE_WATCH_INTERVAL_S = 1.0
DRAIN_POLL_S = 0.05


class Server:
    """The gRPC server, its servicer and health state, bound to one engine."""

    def __init__(self, config: ServerConfig, engine: EngineClient):
        limit = config.max_message_mb * 1024 * 1024
        self.grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # SMG pings its workers every 30 s. A non-streaming Generate sends nothing until it is done, and gRPC
                # Core's defaults count each such ping (under a 5 min floor) as a strike: after two it sends GOAWAY,
                # failing every call on the connection. Accept pings every 10 s, strike none, and allow them idle.
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        )
        self.metrics = Metrics()
        self.rl = RlController(engine)
        self.servicer = _build_servicer(config, engine, self.metrics, self.rl)
        self.control = (
            ControlEndpoint(self.rl, config.control_api_key, config.control_allow_collective_rpc)
            if config.control_port is not None
            else None
        )
        self.health = health.aio.HealthServicer()
        pb_grpc.add_VllmEngineServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        # Health and reflection share the port, so they take its TLS choice; metrics follow it in start().
        self.credentials = grpc_server_credentials(config)
        address = f"{config.host}:{config.port}"
        if self.credentials is not None:
            self.port = self.grpc.add_secure_port(address, self.credentials.credentials)
        else:
            self.port = self.grpc.add_insecure_port(address)
            if not is_loopback(config.host):
                logger.warning(
                    "serving plaintext gRPC on %s: token ids, images and outputs cross the network "
                    "unencrypted and any client may call; give --tls-cert-file/--tls-key-file "
                    "(and --tls-client-ca-file for mTLS), or keep this port inside a mesh that encrypts",
                    config.host,
                )
        self.health_port: int | None = None
        self.health_server = self._health_only(config) if config.health_port is not None else None
        self.engine = engine
        self.config = config
        self.metrics_port: int | None = None
        self.control_port: int | None = None
        self.registration: GatewayRegistration | None = None
        self._registering: asyncio.Task | None = None

    def _health_only(self, config: ServerConfig) -> grpc.aio.Server:
        """grpc.health.v1 alone, in plaintext, for Kubernetes' gRPC probes (the kubelet cannot speak TLS).
        It tells only SERVING or NOT_SERVING, from the same health state as the main port."""
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.health_port = server.add_insecure_port(f"{config.host}:{config.health_port}")
        return server

    async def start(self) -> None:
        if self.config.metrics_port is not None:
            context = ssl_context(self.config.tls)  # metrics follow the gRPC port's TLS choice
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port, context)
            logger.info(
                "metrics on http%s://%s:%d/metrics", "s" * bool(self.config.tls), self.config.host, self.metrics_port
            )
        self.engine.start_kv_events()
        await self.grpc.start()
        if self.control is not None:
            assert self.config.control_port is not None  # the endpoint is built only when a port is set
            self.control_port = await self.control.start(
                self.config.control_host, self.config.control_port, control_ssl_context(self.config)
            )
            logger.info(
                "RL control endpoint on %s://%s:%d (%s)",
                self.control_scheme,
                self.config.control_host,
                self.control_port,
                "bearer key required" if self.config.control_api_key else "no key: loopback only",
            )
        if self.config.register_with:
            self._register()
        if self.health_server is not None:
            await self.health_server.start()
            logger.info("plaintext health checks on %s:%d", self.config.host, self.health_port)
        await self._set_serving(health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "serving %s on %s:%d%s",
            self.engine.info.served_model_name,
            self.config.host,
            self.port,
            " (TLS, client certificates required)"
            if self.config.tls and self.config.tls.client_ca_file
            else " (TLS)"
            if self.config.tls
            else "",
        )

    @property
    def control_scheme(self) -> str:
        return "https" if self.config.control_tls else "http"

    def _register(self) -> None:
        """Keep this worker's entry in the gateway labelled (servicer/registrar.py)."""
        host, config = self.config.advertised_host, self.config

        async def labels() -> dict[str, str]:
            current = {**dict(config.register_labels), "weight_version": await self.engine.control.weight_version()}
            if self.control is not None:
                current |= CAPABILITY_LABELS | {"rl.control_url": f"{self.control_scheme}://{host}:{self.control_port}"}
            return current

        self.registration = GatewayRegistration(
            config.register_with,
            f"grpc://{host}:{self.port}",
            labels,
            config.control_api_key,
            config.gateway_api_key,
            config.register_interval_s,
        )
        self.rl.on_weights_changed.append(self.registration.wake)
        self._registering = asyncio.create_task(self.registration.run(), name="gateway-registration")
        logger.info("keeping grpc://%s:%d registered with %s", host, self.port, config.register_with)

    async def _set_serving(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new calls (UNAVAILABLE), let in-flight ones finish within the drain timeout.

        The gRPC server keeps answering (health says NOT_SERVING, Generate says UNAVAILABLE)
        until in-flight calls are done or the timeout passes; whatever is left is cancelled.
        """
        await self._set_serving(health_pb2.HealthCheckResponse.NOT_SERVING)
        await stop_registration(self._registering)
        self.servicer.admission.draining = True
        deadline = time.monotonic() + self.config.drain_timeout_s
        logger.info(
            "draining %d in-flight requests (up to %.0f s)", len(self.servicer.in_flight), self.config.drain_timeout_s
        )
        while self.servicer.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        await self.grpc.stop(max(0.0, deadline - time.monotonic()))
        if self.control is not None:
            await self.control.stop()
        if self.health_server is not None:
            await self.health_server.stop(0)
        self.servicer.close()

    async def watch_engine(self) -> None:
        """Return when the engine has died (the caller then stops and exits non-zero)."""
        while self.engine.is_healthy:
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        logger.error("engine died; going NOT_SERVING")


def _build_servicer(
    config: ServerConfig, engine: EngineClient, metrics: Metrics, rl: RlController
) -> VllmEngineServicer:
    """The servicer and what it works with: the image store, the decode threads, the image policy, the decoder."""
    store = ImageStore(int(config.mm_store_gb * 1024**3))
    policy = ImagePolicy(
        trust_gateway_hashes=config.mm_hash_policy == "trust",
        pad_values=config.mm_pad_values,
        pad_candidates=np.asarray(engine.ordinary_token_ids),
        store=store,
        consumed=ConsumedSegments(),
        unlink_shm=not config.mm_shm_keep,
    )
    decoder = RequestDecoder(engine.info, config.max_n, engine.prepare_pixels, policy, engine.stamp_ids)
    pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
    media_tokens = MediaTokens() if engine.info.kv_events and config.mm_pad_values else None
    servicer = VllmEngineServicer(engine, config, metrics, decoder, store, pool, rl, media_tokens)
    metrics.bind(
        lambda: len(servicer.in_flight),
        lambda: engine.stats.prefix_cache_hit_rate,
        store,
        lambda: dict(engine.stats.prompt_tokens_by_source),
    )
    return servicer


async def create_server(config: ServerConfig, engine: EngineClient) -> Server:
    server = Server(config, engine)
    await server.start()
    return server


async def serve(config: ServerConfig) -> int:
    """Start the engine, then the server; run until SIGINT/SIGTERM or engine death. Returns the exit code."""
    from engine_adapter.engine import parse_engine_args, start_engine  # the vLLM engine, imported only to start it

    engine = await start_engine(parse_engine_args(config.model, config.engine_args, config.mm_shm_gb))
    server = await create_server(config, engine)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(server.watch_engine())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
    engine_died = watcher.done()
    watcher.cancel()
    stopper.cancel()
    logger.info("shutting down (%s)", "engine died" if engine_died else "signal")
    await server.stop()
    engine.shutdown()
    return 1 if engine_died else 0
