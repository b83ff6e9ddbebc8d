"""Tracing: the gateway's W3C trace context reaches our spans and vLLM's.

An OTLP receiver runs here: the OpenTelemetry protocol's own gRPC TraceService (opentelemetry-proto),
receiving the real exports of a `vlm-servicer serve` process started with vLLM's `--otlp-traces-endpoint`
and of the real SMG gateway started with `--enable-trace`. A chat completion through SMG must leave
one trace: SMG's spans, our vlm.Generate under SMG's span, our decode/admission/generation steps under
it, and vLLM's own llm_request span under ours.
"""

import asyncio
import time
from collections import defaultdict

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.fixtures import request
from tests.test_lifecycle import servicer_process  # noqa: F401  (fixture)
from vlm_proto import vllm_engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine
WAIT_S = 60
STEPS = ("vlm.decode", "vlm.admission", "vlm.generation")


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span with its exporter's service name."""

    def __init__(self):
        self.spans = []  # (service, span)

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attrs.get("service.name", "") + "|" + attrs.get("vllm.instrumenting_module_name", "")
            for scope in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> dict[str, list]:
        by_name = defaultdict(list)
        for service, span in self.spans:
            if span.trace_id == trace_id:
                by_name[span.name].append((service, span))
        return by_name

    async def until(self, found, what: str):
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if result := found():
                return result
            await asyncio.sleep(0.2)
        names = sorted({(s, span.name) for s, span in self.spans})
        raise AssertionError(f"no {what} within {WAIT_S} s; received: {names}")


@pytest.fixture
async def receiver():
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield receiver
    await server.stop(0)


def _check_ours(spans: dict[str, list], parent_id: bytes) -> None:
    """Our call's span under `parent_id`, our steps and vLLM's request span under it."""
    [(_, call)] = spans["vlm.Generate"]
    assert call.parent_span_id == parent_id
    for step in STEPS:
        [(_, span)] = spans[step]
        assert span.parent_span_id == call.span_id, step
    [(service, vllm_span)] = spans["llm_request"]
    assert "vllm.llm_engine" in service and vllm_span.parent_span_id == call.span_id
    [(_, generation)] = spans["vlm.generation"]
    assert [e.name for e in generation.events] == ["first_output"]


@pytest.mark.gateway
async def test_smgs_trace_reaches_our_spans_and_vllms(servicer_process, receiver, model_path,  # noqa: F811
                                                      tmp_path_factory):
    from tests.test_gateway import _chat_body, _launch

    endpoint = f"127.0.0.1:{receiver.port}"
    proc = await asyncio.to_thread(servicer_process, "--otlp-traces-endpoint", endpoint,
                                   env={"OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_SERVICE_NAME": "vlm-servicer"})

    # Direct, with a trace context of our own making: the same tree under the caller's span.
    trace_id, caller = bytes.fromhex("0af7651916cd43dd8448eb211c80319c"), bytes.fromhex("b7ad6b7169203331")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.port}") as channel:
        call = pb_grpc.VllmEngineStub(channel).Generate(
            request([20, 21, 22, 23], max_tokens=3, temperature=0.0),
            metadata=(("traceparent", f"00-{trace_id.hex()}-{caller.hex()}-01"), ("tracestate", "smg=1")))
        [r async for r in call]
    spans = await receiver.until(lambda: (s := receiver.trace(trace_id)) and "llm_request" in s and s, "direct trace")
    _check_ours(spans, caller)

    # Through SMG with --enable-trace, exporting to the same receiver.
    async for gw in _launch([proc.port], model_path, tmp_path_factory, "inline",
                            "--enable-trace", "--otlp-traces-endpoint", endpoint):
        with gw.dump_log_on_failure():
            status, answer = await gw.chat(_chat_body(gw.model, "Describe the image.", []))
            assert status == 200, answer
            ours = await receiver.until(
                lambda: [span for _, span in receiver.spans
                         if span.name == "vlm.Generate" and span.trace_id != trace_id],
                "vlm.Generate span from the gateway's call")
            [generate] = ours
            gateway_trace = generate.trace_id

            def complete():
                spans = receiver.trace(gateway_trace)
                smg = {span.span_id: span.name for service, span in receiver.spans
                       if span.trace_id == gateway_trace and service.startswith("smg|")}
                return (spans, smg) if "llm_request" in spans and generate.parent_span_id in smg else None

            spans, smg = await receiver.until(complete, "the gateway's span over ours")
            print(f"\none trace {gateway_trace.hex()}: " + ", ".join(
                f"{name} ({services[0][0]})" for name, services in sorted(spans.items())))
            _check_ours(spans, generate.parent_span_id)
            assert smg[generate.parent_span_id] == "grpc_execute"  # SMG's span of its call to us, exported by SMG
