"""Tensor transport: 1280x720 images inline vs. shared memory, ours vs. the incumbent, and what caches add.

Acts as a same-host gateway, in SMG's request layout, with the pixels in either form a gateway sends: raw
uint8 patches (what SMG sends a worker reporting mm_device_do_normalize; ~5.5 MB per image) or normalized
float32 patches (~22 MB), in the message or in a /dev/shm segment; max_tokens=1. Each round starts one server
alone, the order alternating round by round (A B, B A, ...); figures are medians over every round's requests.

- **From scratch** (the transport table): every request, the unmeasured first included, carries pixels no
  earlier request had, with the hash a gateway computes from them (SHA-256 of each image's bytes), on both
  servers. Per cell: end-to-end latency, CPU per request (the server's process / its engine's), cached /
  prompt tokens, and for ours the ingest time (validation, decode, hashing, casts; from its /metrics) and
  ingest GB/s against this machine's memcpy bandwidth. A cell with any cached token fails.
- **Cache cells** (uint8, inline): fresh pixels sent once (not measured), then resent --repeats times, as
  (a) the same pixels under the same hash, what a gateway that hashes content (SMG) sends; (b) the same pixels
  under a new hash each time, a gateway whose hash differs for the same bytes; (c) by reference: no pixels,
  the image named by the identity the server knows it by. Each side answers as it does; cached / prompt
  tokens and any error code are shown beside the latency.

`--breakdown` times each ingest step in-process (no server), to show where the time goes.

    bash bench/incumbent_env.sh   # once
    .venv/bin/python -m bench.transport [--repeats 5] [--rounds 2] [--images 1,8] [--pixels uint8,float32]
"""

import argparse
import hashlib
import json
import os
import statistics
import time

import grpc
import numpy as np
import torch
from transformers import AutoProcessor

from bench.caches import CacheTally
from bench.side_by_side import cpu_split, start_server
from bench.transport_report import report
from engine_adapter.pixels import PixelNorm, prepare_pixels
from harness.images import noise
from harness.processes import ENGINE_ARGS, ROOT, free_port, metric
from servicer.identity import image_identity, pad_values
from servicer.tensors import decode_tensor, encode_tensor
from vlm_proto import common_pb2, vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

MODEL = str(ROOT / "models" / "tiny-qwen2-vl")
# 8 images of 1280x720 are ~9,600 prompt tokens: past the tiny model's 4,096 positions, which
# M-RoPE never reaches (image positions advance by the grid, not the token count).
TRANSPORT_ENGINE_ARGS = [*ENGINE_ARGS[:2], "--max-model-len", "12288", *ENGINE_ARGS[4:],
                         "--max-num-batched-tokens", "12288"]
# Both servers as deployed (deploy/Dockerfile): glibc's malloc on transparent huge pages.
ENV = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
CACHE_CELLS = ("same pixels, same hash", "same pixels, new hash each time", "by reference, no pixels")


def memcpy_gbps(nbytes: int = 256 << 20) -> float:
    """This machine's memory bandwidth as memcpy reaches it: buffers larger than any cache, pre-faulted, best of 5."""
    src = np.random.randint(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(0)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Batch:
    """n images of 1280x720 in SMG's request layout (ids, ranges, grids), and fresh pixels for each request."""

    def __init__(self, n: int, seed: int, dtype: str):
        proc = AutoProcessor.from_pretrained(MODEL)
        tok, ip = proc.tokenizer, proc.image_processor
        self.rng = np.random.RandomState(seed)
        raw = dtype == "uint8"
        feats = ip(images=[noise(720, 1280, self.rng) for _ in range(n)], return_tensors="np",
                   do_rescale=not raw, do_normalize=not raw)
        self.dtype, self.shape = dtype, feats["pixel_values"].shape
        self.grid = feats["image_grid_thw"].astype(np.int64)
        self.rows = self.grid.prod(-1)
        self.norm = (np.array(ip.image_mean, np.float32).reshape(1, 3, 1), np.array(ip.image_std, np.float32).reshape(1, 3, 1),
                     np.float32(ip.rescale_factor))
        pad, vs, ve = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
        enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
        self.ids, self.ranges = enc("<|im_start|>user\n"), []
        for g in self.grid:
            n_tok = int(g.prod()) // 4
            self.ids.append(vs)
            self.ranges.append((len(self.ids), n_tok))
            self.ids += [pad] * n_tok + [ve]
        self.ids += enc("Describe.<|im_end|>\n<|im_start|>assistant\n")
        self.pad = pad
        self.nbytes = int(np.prod(self.shape)) * np.dtype(dtype).itemsize

    def fresh(self) -> tuple[np.ndarray, list[str]]:
        """Pixels no request had before (uniform noise patches; float32 normalized as the processor would),
        and each image's gateway hash, computed from its bytes."""
        raw = self.rng.randint(0, 256, self.shape, dtype=np.uint8)
        if self.dtype == "uint8":
            pixels = raw
        else:
            mean, std, scale = self.norm
            pixels = ((raw.reshape(len(raw), 3, -1) * scale - mean) / std).astype(np.float32).reshape(self.shape)
        starts = np.concatenate([[0], np.cumsum(self.rows)])
        hashes = [hashlib.sha256(pixels[a:b].tobytes()).hexdigest() for a, b in zip(starts[:-1], starts[1:])]
        return pixels, hashes

    def request(self, pixels: np.ndarray | None, hashes: list[str], transport: str,
                tag: str) -> tuple[pb.GenerateRequest, str | None]:
        """`pixels` None: every image by reference (its grid and identity, no pixel_values)."""
        name, tensors = None, {"image_grid_thw": encode_tensor(self.grid)}
        mm = pb.MultimodalInputs(
            im_token_id=self.pad, mm_placeholders=[pb.PlaceholderRange(offset=o, length=n) for o, n in self.ranges],
            mm_hashes=hashes, keep_on_cpu_keys=["image_grid_thw"], modality=common_pb2.IMAGE)
        if pixels is None:
            mm.batched_keys.append("image_grid_thw")
        else:
            tensors["patches_per_image"] = encode_tensor(self.rows)
            mm.batched_keys.extend(["image_grid_thw", "patches_per_image"])
            mm.flat_keys["pixel_values"] = "patches_per_image"
            if transport == "shm":
                name = f"vlmbench-{os.getpid()}-{tag}"
                with open(f"/dev/shm/{name}", "wb") as f:
                    f.write(pixels.tobytes())
                mm.pixel_values.CopyFrom(pb.TensorData(shape=list(pixels.shape), dtype=self.dtype, shm=common_pb2.ShmHandle(
                    name=name, offset=0, nbytes=pixels.nbytes, owner_id="bench")))
            else:
                mm.pixel_values.CopyFrom(encode_tensor(pixels))
        for key, tensor in tensors.items():
            mm.model_specific_tensors[key].CopyFrom(tensor)
        req = pb.GenerateRequest(request_id=tag, tokenized=pb.TokenizedInput(input_ids=self.ids), mm_inputs=mm,
                                 sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=1))
        return req, name


class Client:
    """One server as the gateway sees it: sends a request, times it, reads its answer and the CPU it cost."""

    def __init__(self, server, metrics_port: int | None):
        self.server, self.metrics_port = server, metrics_port
        limit = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
        self.channel = grpc.insecure_channel(server.host, options=limit)
        self.stub = pb_grpc.VllmEngineStub(self.channel)

    def decode_seconds(self) -> float:
        return metric(f"http://127.0.0.1:{self.metrics_port}/metrics", "vlm_request_decode_seconds_sum")

    def send(self, req: pb.GenerateRequest, shm_name: str | None) -> dict:
        """{latency_s, complete or code, identities, ingest_s (ours), cpu: seconds by part} for one call."""
        ingest0 = self.decode_seconds() if self.metrics_port else 0.0
        cpu0 = cpu_split(self.server.proc.pid)
        t0 = time.perf_counter()
        out = {}
        try:
            call = self.stub.Generate(req, timeout=600)
            out["identities"] = dict(call.initial_metadata()).get("vlm-mm-identities", "").split(",")
            out["complete"] = [r.complete for r in call][-1]
        except grpc.RpcError as exc:
            out["code"] = exc.code().name
        out["latency_s"] = time.perf_counter() - t0
        cpu1 = cpu_split(self.server.proc.pid)
        out["cpu"] = {k: cpu1[k] - cpu0[k] for k in cpu1}
        if self.metrics_port:
            out["ingest_s"] = self.decode_seconds() - ingest0
        if shm_name and os.path.exists(f"/dev/shm/{shm_name}"):
            os.unlink(f"/dev/shm/{shm_name}")  # a worker that did not consume it
        return out


def _tally(rows: list[dict]) -> CacheTally:
    tally = CacheTally()
    for r in rows:
        if "complete" in r:
            tally.add_complete(r["complete"])
    return tally


def _cell(server: str, rows: list[dict], key: dict) -> dict:
    """One cell's figures over its measured calls (`rows`)."""
    ok = [r for r in rows if "complete" in r]
    cell = {"server": server, **key, "calls": len(rows), "latencies_ms": [r["latency_s"] * 1e3 for r in ok],
            "codes": sorted({r["code"] for r in rows if "code" in r}), "cache": _tally(rows).as_dict(),
            "cpu_ms": {k: 1e3 * sum(r["cpu"][k] for r in rows) / len(rows) for k in rows[0]["cpu"]}}
    if rows[0].get("ingest_s") is not None:
        cell["ingest_ms"] = [r["ingest_s"] * 1e3 for r in ok]
    return cell


def measure(client: Client, batches: dict, args) -> list[dict]:
    """Every cell on one server: from-scratch cells, then the cache cells."""
    cells, name, serial = [], client.server.name, iter(range(1 << 62))
    tag = lambda: f"{name}-{next(serial)}-{time.time_ns()}"  # noqa: E731
    for (dtype, n), batch in batches.items():
        for transport in ("inline", "shm"):
            rows = []
            for k in range(args.repeats + 1):
                pixels, hashes = batch.fresh()
                rows.append(client.send(*batch.request(pixels, hashes, transport, tag())))
            cell = _cell(name, rows[1:], {"kind": "scratch", "pixels": dtype, "images": n, "transport": transport,
                                          "MB": batch.nbytes / 1e6})
            _tally(rows).require_none(f"{name}, {dtype} x {n} {transport}")  # the unmeasured first too
            cells.append(cell)
            print(json.dumps({k: v for k, v in cell.items() if not isinstance(v, list) or k == "codes"}), flush=True)
        if dtype != "uint8":
            continue
        for label in CACHE_CELLS:
            pixels, hashes = batch.fresh()
            first = client.send(*batch.request(pixels, hashes, "inline", tag()))
            known = first["identities"] if name == "ours" else hashes  # how each server knows the image
            rows = []
            for k in range(args.repeats):
                if label == CACHE_CELLS[0]:
                    req = batch.request(pixels, hashes, "inline", tag())
                elif label == CACHE_CELLS[1]:
                    req = batch.request(pixels, [hashlib.sha256(f"{h}{tag()}".encode()).hexdigest() for h in hashes],
                                        "inline", tag())
                else:
                    req = batch.request(None, known, "inline", tag())
                rows.append(client.send(*req))
            cell = _cell(name, rows, {"kind": "cache", "cell": label, "pixels": dtype, "images": n,
                                      "transport": "inline"})
            cell["first"] = _cell(name, [first], {})
            cells.append(cell)
            print(json.dumps({k: v for k, v in cell.items() if k in ("server", "cell", "images", "codes", "cache")}),
                  flush=True)
    return cells


def pixel_norm() -> PixelNorm:
    """The model's rescale and normalization, as the engine resolves them."""
    ip = AutoProcessor.from_pretrained(MODEL).image_processor
    return PixelNorm(tuple(ip.image_mean), tuple(ip.image_std), ip.rescale_factor)


def breakdown(batch: Batch, transport: str, repeats: int, norm: PixelNorm) -> dict[str, float]:
    """Each step of our ingest of one request's pixels, in-process, in ms (median of `repeats`): the
    protobuf parse gRPC does before the handler (inline bytes are copied there), the tensor view (inline) or
    map (shm), hashing, the cast to what the vision tower takes, and pad values; memcpy of the same bytes."""
    candidates = np.arange(1000, 30000)  # the servicer passes an array
    rows = [int(r) for r in batch.rows]
    steps: dict[str, list[float]] = {}
    for k in range(repeats):
        pixels, hashes = batch.fresh()
        src = pixels.reshape(-1).view(np.uint8)
        dst = np.empty_like(src)
        req, name = batch.request(pixels, hashes, transport, f"breakdown-{transport}-{k}-{time.time_ns()}")
        wire = req.SerializeToString()
        t = {"parse": _timed(lambda: pb.GenerateRequest.FromString(wire))}
        req = pb.GenerateRequest.FromString(wire)
        t0 = time.perf_counter()
        decoded = decode_tensor("pixel_values", req.mm_inputs.pixel_values)  # maps and unlinks a shm segment
        t["view or map"] = time.perf_counter() - t0
        parts = torch.split(decoded, rows)
        t["hash"] = _timed(lambda: [image_identity(p, tuple(map(int, g))) for p, g in zip(parts, batch.grid)])
        t["cast"] = _timed(lambda: prepare_pixels(decoded, norm, True, torch.float32))
        t["pad values"] = _timed(lambda: [pad_values(f"{k}-{i}", n, candidates) for i, (_, n) in enumerate(batch.ranges)])
        t["memcpy"] = _timed(lambda: np.copyto(dst, src))
        for step, seconds in t.items():
            steps.setdefault(step, []).append(seconds * 1e3)
    return {step: statistics.median(ms) for step, ms in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--images", default="1,8")
    parser.add_argument("--pixels", default="uint8,float32", help="pixel forms to send: uint8 (raw), float32 (normalized)")
    parser.add_argument("--repeats", type=int, default=5, help="measured requests per cell and round")
    parser.add_argument("--rounds", type=int, default=2, help="server starts each; the order alternates (A B, B A)")
    parser.add_argument("--breakdown", action="store_true", help="only time each ingest step in-process (no servers)")
    parser.add_argument("--servers", default="ours,incumbent")
    parser.add_argument("--incumbent-venv", default=".venv-incumbent")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--report", metavar="JSON", help="print the tables of a saved run (bench/results/transport.json)")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(open(args.report).read())
        return report(saved["cells"], saved["memcpy_GBps"], argparse.Namespace(**saved["args"]))
    batches = {(dtype, n): Batch(n, seed=n, dtype=dtype)
               for dtype in args.pixels.split(",") for n in map(int, args.images.split(","))}
    bandwidth = memcpy_gbps()
    print(f"memcpy bandwidth on this machine: {bandwidth:.1f} GB/s")
    if args.breakdown:
        norm = pixel_norm()
        print(f"{'pixels':>7} {'images':>6} {'MB':>6} {'transport':>9} | ms per step (median of {args.repeats})")
        for (dtype, n), batch in batches.items():
            for transport in ("inline", "shm"):
                steps = breakdown(batch, transport, args.repeats, norm)
                print(f"{dtype:>7} {n:6d} {batch.nbytes / 1e6:6.1f} {transport:>9} | "
                      + "  ".join(f"{step} {ms:.2f}" for step, ms in steps.items()), flush=True)
        return
    names = args.servers.split(",")
    if "incumbent" in names and not (ROOT / args.incumbent_venv / "bin" / "vllm").exists():
        parser.error(f"{args.incumbent_venv}/bin/vllm not found: run bash bench/incumbent_env.sh first")
    cells = []
    for round_ in range(args.rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            metrics_port = free_port() if name == "ours" else None
            extra = ["--metrics-port", str(metrics_port)] if metrics_port else []
            server = start_server(name, args, TRANSPORT_ENGINE_ARGS, extra, ENV, log_name="transport")
            try:
                server.wait_serving(args.start_timeout)
                client = Client(server, metrics_port)
                cells += measure(client, batches, args)
                client.channel.close()
            finally:
                server.stop()
    report(cells, bandwidth, args)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "transport.json").write_text(json.dumps({"args": vars(args), "memcpy_GBps": bandwidth, "cells": cells},
                                                   indent=2))


if __name__ == "__main__":
    main()
