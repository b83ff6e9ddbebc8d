"""A Generate call's spans, joined to the caller's trace by the W3C `traceparent`/`tracestate` in its metadata.

Tracing is on when the engine exports traces (vLLM's `--otlp-traces-endpoint`): vLLM then installs the
process's OpenTelemetry tracer provider and exporter, which these spans share. Per call:

    vlm.Generate (server span, child of the caller's span when it sent one)
    ├── vlm.decode       validation, tensor decode, hashing, placeholders (servicer/requests.py)
    ├── vlm.admission    into the engine: sampling parameters, constraint check, vLLM's input, ring publish
    ├── vlm.generation   vLLM's part, from the hand-off to the last output ("first_output" event)
    └── llm_request      vLLM's own request span (queue, prefill, decode times), through its trace headers

When tracing is off none of this runs: the handler holds None and skips every call here.
"""

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACE_KEYS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """Starts each traced call's spans (one per server; the tracer comes from the process's provider)."""

    def __init__(self):
        self._tracer = trace.get_tracer("vlm_servicer")

    def start(self, metadata, request_id: str) -> "RequestTrace":
        return RequestTrace(self._tracer, metadata, request_id)


class RequestTrace:
    """The spans of one call. Children start and end at the handler's steps; `end` closes the call's span."""

    def __init__(self, tracer, metadata, request_id: str):
        self._tracer = tracer
        carrier = {key: value for key, value in metadata or () if key in TRACE_KEYS}
        self.span = tracer.start_span(
            "vlm.Generate",
            context=_PROPAGATOR.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.method": "Generate", "gen_ai.request.id": request_id},
        )
        self._context = trace.set_span_in_context(self.span)
        self._step = None
        self._outputs = 0

    def step(self, name: str) -> None:
        """End the current step's span (if any) and start the next one."""
        self._end_step()
        self._step = self._tracer.start_span(name, context=self._context)

    def output(self) -> None:
        """An engine step's output arrived; the first is marked on the current step's span."""
        self._outputs += 1
        if self._outputs == 1 and self._step is not None:
            self._step.add_event("first_output")

    def headers(self) -> dict[str, str]:
        """W3C headers naming the call's span, for vLLM's request span (vLLM's `trace_headers`)."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=self._context)
        return carrier

    def end(self, code: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Close the step and the call's span with the call's final gRPC status and token counts."""
        failed = code != "OK"
        self._end_step(failed)
        self.span.set_attributes(
            {
                "rpc.grpc.status_code": code,
                "gen_ai.usage.prompt_tokens": prompt_tokens,
                "gen_ai.usage.completion_tokens": completion_tokens,
            }
        )
        if failed:
            self.span.set_status(Status(StatusCode.ERROR, code))
        self.span.end()

    def _end_step(self, failed: bool = False) -> None:
        if self._step is not None:
            if failed:
                self._step.set_status(Status(StatusCode.ERROR))
            self._step.end()
            self._step = None
