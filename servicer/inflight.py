"""Requests in flight: admission (drain, duplicate ids, --max-concurrent-requests), per-request state while a call
runs, and its outcome recorded once it ends (status, tokens, latency; metrics, trace and the log line)."""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc

from servicer.errors import InvalidArgument, ResourceExhausted, Unavailable, status_for
from servicer.metrics import Metrics
from servicer.tracing import RequestTrace

logger = logging.getLogger(__name__)


@dataclass
class InFlight:
    """Per-request state while a Generate call runs."""

    request_id: str
    started: float
    stream: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = ""
    code: str = "OK"  # final gRPC status, for metrics and the log line
    first_response: float | None = None
    trace: RequestTrace | None = None  # its spans, when the engine exports traces


class Admission:
    """The calls in flight, keyed by request id, and the rules for letting one more in."""

    def __init__(self, metrics: Metrics, max_concurrent: int, log_requests: bool):
        self.metrics = metrics
        self.max_concurrent = max_concurrent
        self.log_requests = log_requests  # vLLM's --enable-log-requests (off by default, as in vLLM)
        self.in_flight: dict[str, InFlight] = {}
        self.draining = False

    @contextlib.contextmanager
    def track(self, state: InFlight, context: grpc.aio.ServicerContext):
        """Admit a request, keep it in flight while it runs, then record its outcome (status, tokens, latency)."""
        try:
            self._admit(state.request_id)
            self.in_flight[state.request_id] = state
            yield
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            state.code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except grpc.aio.AbortError:  # the call already has its status, from where it aborted
            raise
        except Exception as exc:
            state.code = status_for(exc)[0].name
            raise
        finally:
            if self.in_flight.get(state.request_id) is state:
                del self.in_flight[state.request_id]
            self._record(state)

    def _record(self, state: InFlight) -> None:
        """Metrics, and the one log line per request when asked for."""
        elapsed = time.monotonic() - state.started
        m = self.metrics
        m.requests.labels(state.code).inc()
        m.latency.observe(elapsed)
        if state.first_response is not None:
            m.ttft.observe(state.first_response - state.started)
        m.prompt_tokens.inc(state.prompt_tokens)
        m.completion_tokens.inc(state.completion_tokens)
        m.cached_tokens.inc(state.cached_tokens)
        if state.trace is not None:
            state.trace.end(state.code, state.prompt_tokens, state.completion_tokens)
        if not self.log_requests:
            return
        logger.info(
            "request %s %s: finish=%s prompt=%d cached=%d completion=%d stream=%s ttft=%s total=%.1f ms",
            state.request_id,
            state.code,
            state.finish_reason or "-",
            state.prompt_tokens,
            state.cached_tokens,
            state.completion_tokens,
            state.stream,
            f"{(state.first_response - state.started) * 1e3:.1f} ms" if state.first_response else "-",
            elapsed * 1e3,
        )

    def _admit(self, request_id: str) -> None:
        if self.draining:
            raise Unavailable("server is shutting down; retry on another worker")
        if request_id in self.in_flight:
            raise InvalidArgument(f"request_id: '{request_id}' is already in flight")
        if len(self.in_flight) >= self.max_concurrent:
            raise ResourceExhausted(
                f"{len(self.in_flight)} requests in flight: at the limit of --max-concurrent-requests "
                f"{self.max_concurrent}"
            )
