"""What TLS (mTLS) and tracing cost the servicer: CPU per request and req/s, each on and off. Measured, never asserted.

    .venv/bin/python -m bench.tls_tracing [--duration 10] [--warmup 3] [--concurrency 16] [--max-tokens 1] [--rounds 2]

Four cells, each a `vlm-servicer serve` started alone on the machine (vLLM's engine busy-polls, so one at a
time), the order alternating round by round (A B C D, D C B A, ...):
  plain          the defaults: plaintext, no tracing;
  mtls           --tls-cert-file/--tls-key-file/--tls-client-ca-file (certificates made for the run); the driver
                 holds one TLS channel, as a gateway holds few connections, so the handshake is paid once;
  tracing        vLLM's --otlp-traces-endpoint, exporting to an OTLP receiver in this process; every call
                 carries a traceparent, as SMG's --enable-trace sends;
  mtls+tracing   both.
Per cell: calls, req/s, p50, and the servicer process's own CPU per request from /proc (its threads included:
gRPC, TLS, our spans and their exporter; vLLM's engine processes, its children, excluded). Text prompts,
greedy, `--max-tokens` tokens, non-streaming. Writes bench/results/tls_tracing.json.
"""

import argparse
import asyncio
import json
import os
import pathlib
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.caches import CacheTally
from tests.certs import Authority  # certificates made on the fly (the cryptography package)
from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
               "--kv-cache-memory-bytes", str(1 << 30), "--limit-mm-per-prompt", '{"image": 8, "video": 0}']
CELLS = ("plain", "mtls", "tracing", "mtls+tracing")
PROMPT = [(7 * i + 3) % 900 + 20 for i in range(32)]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that only counts what it is sent."""

    spans = 0

    async def Export(self, request, context):
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process, its threads included (children excluded)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Servicer:
    """One `vlm-servicer serve` in its own session; stop() ends that session."""

    def __init__(self, cell: str, pki: dict, otlp: str, log: pathlib.Path, model: str):
        self.tls = "mtls" in cell
        flags = ["--tls-cert-file", pki["cert"], "--tls-key-file", pki["key"], "--tls-client-ca-file", pki["ca_file"]]
        flags = flags * self.tls + ["--otlp-traces-endpoint", otlp] * ("tracing" in cell)
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "servicer.cli", "serve", "--model", model, "--port", "0", *ENGINE_ARGS, *flags],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": f"{ROOT / 'proto'}:{ROOT}", "OTEL_SERVICE_NAME": "vlm-servicer"})
        self.log_path = log

    def port(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if " serving " in line and " on 127.0.0.1:" in line:
                    return int(line.split(" on 127.0.0.1:")[1].split()[0])
            if self.proc.poll() is not None:
                raise RuntimeError(f"servicer exited; see {self.log_path}")
            time.sleep(0.5)
        raise TimeoutError(f"servicer not ready; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:  # what is left of the session it leads (vLLM's engine processes)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.log.close()


async def _drive(stub, seconds: float, concurrency: int, max_tokens: int, traced: bool,
                 tally: CacheTally | None = None) -> list[float]:
    """Calls back to back from `concurrency` workers for `seconds`; the latency of each successful one, and each
    answer's cached / prompt tokens into `tally`."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def worker():
        while time.monotonic() < deadline:
            metadata = (("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"),) if traced else ()
            start = time.monotonic()
            request = pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=PROMPT), sampling_params=sampling)
            async for response in stub.Generate(request, metadata=metadata, timeout=60):
                if tally is not None and response.HasField("complete"):
                    tally.add_complete(response.complete)
            latencies.append(time.monotonic() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def measure(cell: str, pki: dict, otlp: str, args) -> dict:
    server = Servicer(cell, pki, otlp, ROOT / "bench" / "results" / f"tls_tracing.{cell}.log", args.model)
    try:
        port = await asyncio.to_thread(server.port)
        if server.tls:
            creds = grpc.ssl_channel_credentials(pki["ca"].pem, pki["client"].key_pem, pki["client"].cert_pem)
            channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)
        else:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        async with channel:
            stub = pb_grpc.VllmEngineStub(channel)
            traced = "tracing" in cell
            await _drive(stub, args.warmup, args.concurrency, args.max_tokens, traced)
            cpu, wall = _cpu_seconds(server.proc.pid), time.monotonic()
            tally = CacheTally()
            latencies = await _drive(stub, args.duration, args.concurrency, args.max_tokens, traced, tally)
            cpu, wall = _cpu_seconds(server.proc.pid) - cpu, time.monotonic() - wall
        # Every cell sends the same prompt, shorter than one KV block: nothing can be cached, in any cell.
        tally.require_none(cell)
        result = {"calls": len(latencies), "rps": len(latencies) / wall, "p50_ms": 1e3 * statistics.median(latencies),
                  "cpu_ms_per_request": 1e3 * cpu / max(len(latencies), 1), "cache": tally.as_dict()}
        print(f"  {cell:13s} {result['calls']:6d} calls {result['rps']:7.1f} req/s  p50 {result['p50_ms']:6.1f} ms  "
              f"servicer CPU {result['cpu_ms_per_request']:.3f} ms/req  cached/prompt {tally}", flush=True)
        return result
    finally:
        server.stop()


async def main_async(args) -> dict:
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="vlm-bench-tls-"))
    ca = Authority("bench-ca")
    cert, key = ca.issue("vlm-servicer").write(folder, "tls")
    pki = {"ca": ca, "ca_file": str(ca.write(folder)), "cert": str(cert), "key": str(key),
           "client": ca.issue("bench-client", client=True)}
    receiver, otlp_server = Receiver(), grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, otlp_server)
    otlp = f"127.0.0.1:{otlp_server.add_insecure_port('127.0.0.1:0')}"
    await otlp_server.start()
    results: dict[str, list[dict]] = {cell: [] for cell in CELLS}
    try:
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", flush=True)
            for cell in CELLS if round_ % 2 == 0 else CELLS[::-1]:
                results[cell].append(await measure(cell, pki, otlp, args))
    finally:
        await otlp_server.stop(0)
    print(f"\nspans received: {receiver.spans}\n")
    print("| cell | req/s | p50 ms | servicer CPU ms/request | cached / prompt tokens |\n|---|---|---|---|---|")
    for cell, runs in results.items():
        rps, p50, cpu = (statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "cpu_ms_per_request"))
        cache = CacheTally.total(r["cache"] for r in runs)
        print(f"| {cell} | {rps:.0f} | {p50:.1f} | {cpu:.3f} | {cache} |")
    return {"args": vars(args), "spans_received": receiver.spans, "cells": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-qwen2-vl")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    (ROOT / "bench" / "results" / "tls_tracing.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
