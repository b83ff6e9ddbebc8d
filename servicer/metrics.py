"""Prometheus metrics for the servicer, on a registry of our own (vLLM keeps its own)."""

import socket
import ssl
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from servicer.image_store import ImageStore

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vlm_requests", "Generate calls by final gRPC status code", ["code"], registry=r)
        self.ttft = Histogram(
            "vlm_time_to_first_token_seconds", "Time to the first response message", buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "vlm_request_latency_seconds", "End-to-end Generate latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.decode = Histogram(
            "vlm_request_decode_seconds",
            "Servicer-side ingest: validation, tensor decode (inline or shm), hashing, casts",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("vlm_prompt_tokens", "Prompt tokens run", registry=r)
        self.completion_tokens = Counter("vlm_completion_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("vlm_cached_tokens", "Prompt tokens served from the prefix cache", registry=r)
        self.mm_bytes = Counter(
            "vlm_mm_ingested_bytes", "Multimodal tensor bytes received, by transport", ["transport"], registry=r
        )
        self.active = Gauge("vlm_active_requests", "Generate calls in flight", registry=r)
        self.prefix_hit_rate = Gauge(
            "vlm_prefix_cache_hit_rate", "Cumulative prefix-cache hit rate (tokens)", registry=r
        )

    def bind(
        self,
        active: Callable[[], int],
        hit_rate: Callable[[], float],
        store: ImageStore,
        prompt_sources: Callable[[], dict[str, int]],
    ) -> None:
        """Gauges, the image store's and the engine's figures are read live at scrape time."""
        self.active.set_function(active)
        self.prefix_hit_rate.set_function(hit_rate)
        self.registry.register(_StoreCollector(store))
        self.registry.register(_PromptSourceCollector(prompt_sources))

    def serve(self, host: str, port: int, context: ssl.SSLContext | None = None) -> int:
        """Start the HTTP endpoint (a daemon thread), HTTPS with `context`; return the bound port (0 picks one)."""
        if context is None:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
            return server.server_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("HttpsServer", (_HttpsServer,), {"address_family": family, "context": context})
        server = make_server(
            host.strip("[]"), port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler
        )
        threading.Thread(target=server.serve_forever, name="metrics-https", daemon=True).start()
        return server.server_port


class _HttpsServer(ThreadingWSGIServer):
    """prometheus_client's server behind TLS. The handshake runs in each request's thread (on its first read),
    not in the accept loop, so a client that stalls mid-handshake holds up no one else."""

    context: ssl.SSLContext

    def get_request(self):
        sock, address = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request, client_address):
        pass  # a refused handshake (no or wrong client certificate) is the client's problem, not a traceback


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


class _PromptSourceCollector:
    """The engine's prompt tokens by source; `external_kv_transfer` is what a decode worker did not compute."""

    def __init__(self, sources: Callable[[], dict[str, int]]):
        self.sources = sources

    def collect(self):
        family = CounterMetricFamily(
            "vlm_engine_prompt_tokens", "Prompt tokens by where their KV came from", labels=["source"]
        )
        for source, count in self.sources().items():
            family.add_metric([source], count)
        yield family


class _StoreCollector:
    """The reference-by-hash store's own counts, exported as they are."""

    def __init__(self, store: ImageStore):
        self.store = store

    def collect(self):
        stats = self.store.stats()
        lookups = CounterMetricFamily("vlm_mm_store_lookups", "Reference-by-hash lookups", labels=["result"])
        lookups.add_metric(["hit"], stats.hits)
        lookups.add_metric(["miss"], stats.misses)
        yield lookups
        yield GaugeMetricFamily("vlm_mm_store_bytes", "Bytes held by the image store", value=stats.bytes)
        yield GaugeMetricFamily("vlm_mm_store_items", "Images held by the image store", value=stats.items)
