"""A grpc.aio load driver that runs ghz's JSON configs and prints ghz's summary figures.

    .venv/bin/python -m bench.load deploy/ghz/text.json [--host 127.0.0.1:50051] [-c 16] [-z 10s | -n 500]
    .venv/bin/python -m bench.load --write-ghz-data deploy/ghz    # regenerate the configs' request data

Reads the ghz keys call, host, data / data-file (an object, or an array used round-robin),
metadata, concurrency, total, duration, duration-stop, timeout, connections and skipFirst;
renders ghz's `{{.RequestNumber}}`-style template fields; reports count, total time,
requests/s, average/fastest/slowest, the latency distribution (p10..p99), a histogram and
the status-code and error distributions, computed the way ghz computes them. The message
types come from the generated `vlm_proto` code, so `proto` / `import-paths` are not read.
"""

import argparse
import asyncio
import dataclasses
import hashlib
import json
import pathlib
import re
import sys
import time
import uuid
from collections import Counter
from typing import Callable

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory

from servicer.tensors import encode_tensor
from vlm_proto import common_pb2, vllm_engine_pb2 as pb, vllm_engine_pb2_grpc  # noqa: F401  (registers the types)

PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
TEMPLATE = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")
MAX_MESSAGE = 512 << 20
# ghz's config keys this driver does not need: the types come from the generated code.
IGNORED_KEYS = {"proto", "protoset", "import-paths", "insecure", "format", "output", "name", "cpus", "tags",
                "connect-timeout", "keepalive", "debug", "reflect-metadata", "enable-compression"}


@dataclasses.dataclass
class LoadConfig:
    """One run's settings, as ghz's config file spells them (durations in seconds here)."""
    call: str
    host: str = "127.0.0.1:50051"
    data: list = dataclasses.field(default_factory=lambda: [{}])
    metadata: dict = dataclasses.field(default_factory=dict)
    concurrency: int = 50
    total: int = 200
    duration: float = 0.0        # > 0: run this long; `total` is ignored (ghz's -z)
    duration_stop: str = "close"  # close: in-flight calls count as errors; ignore: dropped; wait: awaited
    timeout: float = 20.0
    connections: int = 1
    skip_first: int = 0


def parse_duration(text) -> float:
    """Go's duration syntax ("10s", "1m30s", "250ms"); a bare number is seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([\d.]+)(h|ms|m|s|us|µs|ns)", text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def load_config(path: str, **overrides) -> LoadConfig:
    """Read a ghz JSON config; `overrides` (host, concurrency, duration, total) win, as ghz's flags do."""
    raw = json.loads(pathlib.Path(path).read_text())
    unsupported = set(raw) - IGNORED_KEYS - {"call", "host", "data", "data-file", "metadata", "concurrency", "total",
                                             "duration", "duration-stop", "timeout", "connections", "skipFirst"}
    if unsupported:
        raise ValueError(f"{path}: ghz keys this driver does not implement: {sorted(unsupported)}")
    data = raw.get("data")
    if "data-file" in raw:  # like ghz, relative to the working directory
        data = json.loads(pathlib.Path(raw["data-file"]).read_text())
    cfg = LoadConfig(call=raw["call"], host=raw.get("host", LoadConfig.host),
                     data=data if isinstance(data, list) else [data or {}], metadata=raw.get("metadata") or {},
                     concurrency=int(raw.get("concurrency", 50)), total=int(raw.get("total", 200)),
                     duration=parse_duration(raw.get("duration", 0)), duration_stop=raw.get("duration-stop", "close"),
                     timeout=parse_duration(raw.get("timeout", "20s")), connections=int(raw.get("connections", 1)),
                     skip_first=int(raw.get("skipFirst", 0)))
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if overrides.get("total") is not None and overrides.get("duration") is None:
        cfg.duration = 0.0  # an explicit -n replaces the config's duration
    return cfg


class Call:
    """The method named by `call`, with its requests prebuilt: only templated fields are set per request."""

    def __init__(self, cfg: LoadConfig):
        method = descriptor_pool.Default().FindMethodByName(cfg.call.replace("/", "."))
        self.path = f"/{method.containing_service.full_name}/{method.name}"
        self.streaming = method.server_streaming
        self.request_cls = message_factory.GetMessageClass(method.input_type)
        self.names = {"FullyQualifiedName": method.full_name, "MethodName": method.name,
                      "ServiceName": method.containing_service.full_name, "InputName": method.input_type.full_name,
                      "OutputName": method.output_type.full_name, "IsClientStreaming": "false",
                      "IsServerStreaming": str(method.server_streaming).lower()}
        self.items = [self._prebuild(d) for d in cfg.data]
        self.metadata = cfg.metadata

    def _prebuild(self, data: dict):
        templated = {}  # dotted field path -> template string (string fields outside lists and maps)

        def strip(node, prefix):
            for key, value in list(node.items()):
                if isinstance(value, dict) and not _is_map(self.request_cls, prefix + [key]):
                    strip(value, prefix + [key])
                elif isinstance(value, str) and "{{" in value:
                    templated[tuple(prefix + [key])] = value
                    node[key] = ""
        data = json.loads(json.dumps(data))
        strip(data, [])
        if "{{" in json.dumps(data):
            raise ValueError("templates are supported only in string fields outside lists and maps")
        base = json_format.ParseDict(data, self.request_cls())
        return base, templated, base.SerializeToString()

    def request_bytes(self, worker: str, number: int) -> bytes:
        base, templated, raw = self.items[number % len(self.items)]
        if not templated:
            return raw
        fields = self.fields(worker, number)
        msg = self.request_cls()
        msg.CopyFrom(base)
        for path, template in templated.items():
            target = msg
            for name in path[:-1]:
                target = getattr(target, name)
            setattr(target, path[-1], render(template, fields))
        return msg.SerializeToString()

    def fields(self, worker: str, number: int) -> dict:
        now = time.time_ns()
        return {**self.names, "WorkerID": worker, "RequestNumber": str(number), "UUID": str(uuid.uuid4()),
                "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "TimestampUnix": str(now // 10**9),
                "TimestampUnixMilli": str(now // 10**6), "TimestampUnixNano": str(now)}


def _is_map(cls, path) -> bool:
    desc = cls.DESCRIPTOR
    for name in path[:-1]:
        field = desc.fields_by_name.get(name)
        if field is None or field.message_type is None:
            return False
        desc = field.message_type
    field = desc.fields_by_name.get(path[-1])
    return field is not None and field.message_type is not None and field.message_type.GetOptions().map_entry


def render(template: str, fields: dict) -> str:
    def sub(m):
        if m.group(1) not in fields:
            raise ValueError(f"unsupported ghz template field {m.group(0)}")
        return fields[m.group(1)]
    return TEMPLATE.sub(sub, template)


@dataclasses.dataclass
class Result:
    latency: float
    status: str   # ghz's spelling of the code: OK, Canceled, Unavailable, ...
    error: str    # "" when OK


def go_code_name(code: grpc.StatusCode) -> str:
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "OK" if code is grpc.StatusCode.OK else "".join(p.capitalize() for p in code.name.split("_"))


async def run_load(cfg: LoadConfig, request_bytes: Callable[[str, int], bytes] | None = None,
                   on_response: Callable[[bytes], None] | None = None) -> dict:
    """Drive `cfg.concurrency` workers over `cfg.connections` channels; return ghz's report as a dict.

    `request_bytes(worker_id, request_number)` overrides the config's data (serialized requests);
    `on_response(message)` gets the last response message of every call that succeeded, still serialized."""
    call = Call(cfg)
    make = request_bytes or call.request_bytes
    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    channels = [grpc.aio.insecure_channel(cfg.host, options=options) for _ in range(max(1, cfg.connections))]
    ident = lambda b: b  # noqa: E731  (requests are pre-serialized; responses are not decoded)
    stubs = [(ch.unary_stream if call.streaming else ch.unary_unary)(call.path, ident, ident) for ch in channels]
    results: list[Result] = []
    counter = iter(range(sys.maxsize))
    stop = asyncio.Event()

    async def one(stub, worker: str, number: int) -> None:
        md = tuple((k, render(v, call.fields(worker, number))) for k, v in call.metadata.items())
        t0 = time.perf_counter()
        try:
            rpc = stub(make(worker, number), timeout=cfg.timeout or None, metadata=md or None)
            if call.streaming:
                last = b""
                async for last in rpc:
                    pass
            else:
                last = await rpc
            results.append(Result(time.perf_counter() - t0, "OK", ""))
            if on_response is not None:
                on_response(last)
        except grpc.aio.AioRpcError as e:
            name = go_code_name(e.code())
            results.append(Result(time.perf_counter() - t0, name, f"rpc error: code = {name} desc = {e.details()}"))
        except asyncio.CancelledError:
            if cfg.duration_stop == "close":
                results.append(Result(time.perf_counter() - t0, "Canceled",
                                      "rpc error: code = Canceled desc = grpc: the client connection is closing"))
            raise

    async def worker(index: int) -> None:
        stub, name = stubs[index % len(stubs)], f"g{index % len(stubs)}c{index}"
        while not stop.is_set():
            number = next(counter)
            if not cfg.duration and number >= cfg.total:
                return
            await one(stub, name, number)

    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 10)
    except asyncio.TimeoutError:
        raise ConnectionError(f"no gRPC server answers at {cfg.host} (start one: make serve)") from None
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(worker(i)) for i in range(cfg.concurrency)]
    if cfg.duration:
        done, pending = await asyncio.wait(tasks, timeout=cfg.duration)
        stop.set()
        if cfg.duration_stop != "wait":
            for t in pending:
                t.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    total = time.perf_counter() - t0
    for ch in channels:
        await ch.close()
    for outcome in outcomes:  # a driver bug (a bad template, say) must not pass for a quiet run
        if isinstance(outcome, Exception) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome
    return summarize(results[cfg.skip_first:], total, cfg)


def summarize(results: list[Result], total: float, cfg: LoadConfig) -> dict:
    """ghz's figures: average over all calls, fastest/slowest/percentiles/histogram over the OK ones."""
    ok = sorted(r.latency for r in results if not r.error)
    report = {"call": cfg.call, "host": cfg.host, "concurrency": cfg.concurrency, "count": len(results),
              "total_s": total, "rps": len(results) / total if total else 0.0,
              "average_s": sum(r.latency for r in results) / len(results) if results else 0.0,
              "fastest_s": ok[0] if ok else 0.0, "slowest_s": ok[-1] if ok else 0.0,
              "latency_distribution": {}, "histogram": [],
              "status_code_distribution": dict(Counter(r.status for r in results)),
              "error_distribution": dict(Counter(r.error for r in results if r.error))}
    for p in PERCENTILES:
        if ok:
            rank = p / 100 * len(ok)
            index = int(rank) - 1 if rank == int(rank) else int(rank)
            report["latency_distribution"][f"p{p}"] = ok[max(index, 0)]
    if ok:
        step = (ok[-1] - ok[0]) / 10
        marks = [ok[0] + step * i for i in range(10)] + [ok[-1]]
        counts = [0] * len(marks)
        for lat in ok:
            counts[next(i for i, m in enumerate(marks) if lat <= m)] += 1
        report["histogram"] = [{"mark_s": m, "count": c, "frequency": c / len(ok)} for m, c in zip(marks, counts)]
    return report


def format_report(r: dict) -> str:
    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    lines = ["", "Summary:", f"  Count:\t{r['count']}", f"  Total:\t{ms(r['total_s'])}", f"  Slowest:\t{ms(r['slowest_s'])}",
             f"  Fastest:\t{ms(r['fastest_s'])}", f"  Average:\t{ms(r['average_s'])}", f"  Requests/sec:\t{r['rps']:.2f}",
             "", "Response time histogram:"]
    top = max((b["count"] for b in r["histogram"]), default=0)
    for b in r["histogram"]:
        bar = "∎" * (round(40 * b["count"] / top) if top else 0)
        lines.append(f"  {b['mark_s'] * 1e3:.3f} [{b['count']}]\t|{bar}")
    lines += ["", "Latency distribution:"]
    lines += [f"  {k[1:]} % in {ms(v)} " for k, v in r["latency_distribution"].items()]
    lines += ["", "Status code distribution:"]
    lines += [f"  [{code}]\t{n} responses" for code, n in sorted(r["status_code_distribution"].items())]
    if r["error_distribution"]:
        lines += ["", "Error distribution:"]
        lines += [f"  [{n}]\t{err}" for err, n in sorted(r["error_distribution"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ requests a gateway sends

def text_request(tokenizer, question: str, max_tokens: int, request_id: str = "") -> pb.GenerateRequest:
    """A chat-templated text prompt as token ids; greedy, ignore_eos, so every call makes max_tokens."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": question}]}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return pb.GenerateRequest(request_id=request_id, tokenized=pb.TokenizedInput(original_text=text, input_ids=ids),
                              sampling_params=greedy(max_tokens))


def greedy(max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def image_request(processor, image, question: str, max_tokens: int, request_id: str = "",
                  raw_uint8: bool = True) -> pb.GenerateRequest:
    """What SMG sends for one image: expanded ids, pad-only placeholder range, per-image hash, layout keys.

    `raw_uint8`: unnormalized uint8 patches (a worker advertising mm_device_do_normalize), else float32."""
    import numpy as np
    tok = processor.tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    feats = processor.image_processor(images=[image], return_tensors="np",
                                      do_rescale=not raw_uint8, do_normalize=not raw_uint8)
    pixels = feats["pixel_values"].astype(np.uint8 if raw_uint8 else np.float32)
    grid = feats["image_grid_thw"].astype("<i8")
    n = int(grid.prod()) // processor.image_processor.merge_size ** 2
    content = [{"type": "image"}, {"type": "text", "text": question}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    before, after = text.split("<image>")
    ids = tok.encode(before, add_special_tokens=False)
    offset = len(ids)
    ids += [pad] * n + tok.encode(after, add_special_tokens=False)
    mm = pb.MultimodalInputs(
        pixel_values=encode_tensor(pixels),
        model_specific_tensors={"image_grid_thw": encode_tensor(grid),
                                "patches_per_image": encode_tensor(np.array([pixels.shape[0]], "<i8"))},
        im_token_id=pad, mm_placeholders=[pb.PlaceholderRange(offset=offset, length=n)],
        mm_hashes=[hashlib.sha256(np.asarray(image).tobytes()).hexdigest()],
        batched_keys=["image_grid_thw", "patches_per_image"], flat_keys={"pixel_values": "patches_per_image"},
        keep_on_cpu_keys=["image_grid_thw"], modality=common_pb2.IMAGE)
    return pb.GenerateRequest(request_id=request_id, tokenized=pb.TokenizedInput(original_text=text, input_ids=ids),
                              mm_inputs=mm, sampling_params=greedy(max_tokens))


def write_ghz_data(model: str, out: pathlib.Path) -> None:
    """The data files the ghz configs name: a short text prompt, and one inline 112x112 uint8 image."""
    from transformers import AutoProcessor

    from harness.images import image
    processor = AutoProcessor.from_pretrained(model)
    reqs = {"text.data.json": text_request(processor.tokenizer, "What is the capital of France?", 16),
            "image.data.json": image_request(processor, image(112, 112, 0), "Describe the image.", 16)}
    for name, req in reqs.items():
        req.request_id = "ghz-{{.UUID}}"  # unique per call: the incumbent rejects a running request's id
        text = json.dumps(json_format.MessageToDict(req, preserving_proto_field_name=True), indent=1)
        text = re.sub(r"\[[\d,\s]+\]", lambda m: re.sub(r"\s+", "", m.group(0)), text)  # number lists on one line
        (out / name).write_text(text + "\n")
        print(f"wrote {out / name} ({req.ByteSize()} bytes on the wire)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="ghz JSON config (e.g. deploy/ghz/text.json)")
    parser.add_argument("--host", help="HOST:PORT (overrides the config's host)")
    parser.add_argument("-c", "--concurrency", type=int)
    parser.add_argument("-z", "--duration", type=parse_duration, help="e.g. 10s (overrides total)")
    parser.add_argument("-n", "--total", type=int)
    parser.add_argument("--format", choices=("summary", "json"), default="summary")
    parser.add_argument("--write-ghz-data", metavar="DIR", help="write the configs' data files and exit")
    parser.add_argument("--model", default="models/tiny-qwen2-vl")
    args = parser.parse_args()
    if args.write_ghz_data:
        return write_ghz_data(args.model, pathlib.Path(args.write_ghz_data))
    if not args.config:
        parser.error("a ghz config is required")
    cfg = load_config(args.config, host=args.host, concurrency=args.concurrency, duration=args.duration, total=args.total)
    try:
        report = asyncio.run(run_load(cfg))
    except ConnectionError as e:
        sys.exit(f"bench.load: {e}")
    print(json.dumps(report, indent=2) if args.format == "json" else format_report(report))
    if report["count"] == 0 or report["error_distribution"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
