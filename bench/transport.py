"""Tensor transport: 1, 4 and 8 images of 1280x720 inline vs. shared memory, ours vs. the incumbent.

Acts as a same-host gateway, in SMG's request layout, with the pixels in either form a gateway sends:
raw uint8 patches (what SMG sends a worker reporting mm_device_do_normalize; ~5.5 MB per image) or
normalized float32 patches (~22 MB), in the message or in a /dev/shm segment. Per cell: end-to-end
latency with max_tokens=1 (median of --repeats), and for our servicer its own ingest time (validation,
decode, hashing, casts; from its /metrics) and ingest GB/s against this machine's memcpy bandwidth
(memcpy_gbps), measured in the same run. `--breakdown` times each ingest step in-process (no server), to show
where the time goes.

    bash bench/incumbent_env.sh   # once
    .venv/bin/python -m bench.transport [--repeats 5] [--images 1,4,8] [--pixels uint8,float32] [--breakdown]
"""

import argparse
import json
import os
import statistics
import time

import grpc
import numpy as np
import torch
from transformers import AutoProcessor

from bench.side_by_side import start_server
from harness.images import noise
from harness.processes import ENGINE_ARGS, ROOT, free_port, metric
from engine_adapter.pixels import PixelNorm, prepare_pixels
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
    """n images of 1280x720 as patches in SMG's request layout: raw uint8 or normalized float32."""

    def __init__(self, n: int, seed: int, dtype: str):
        proc = AutoProcessor.from_pretrained(MODEL)
        tok = proc.tokenizer
        rng = np.random.RandomState(seed)
        imgs = [noise(720, 1280, rng) for _ in range(n)]
        raw = dtype == "uint8"
        feats = proc.image_processor(images=imgs, return_tensors="np", do_rescale=not raw, do_normalize=not raw)
        self.dtype = dtype
        self.pixels = feats["pixel_values"].astype(dtype)
        self.grid = feats["image_grid_thw"].astype(np.int64)
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
        self.rows = self.grid.prod(-1)

    def request(self, transport: str, tag: str) -> tuple[pb.GenerateRequest, str | None]:
        raw = self.pixels.tobytes()
        if transport == "shm":
            name = f"vlmbench-{os.getpid()}-{tag}"
            with open(f"/dev/shm/{name}", "wb") as f:
                f.write(raw)
            pixels = pb.TensorData(shape=list(self.pixels.shape), dtype=self.dtype,
                                   shm=common_pb2.ShmHandle(name=name, offset=0, nbytes=len(raw), owner_id="bench"))
        else:
            name, pixels = None, encode_tensor(self.pixels)
        mm = pb.MultimodalInputs(
            pixel_values=pixels,
            model_specific_tensors={"image_grid_thw": encode_tensor(self.grid), "patches_per_image": encode_tensor(self.rows)},
            im_token_id=self.pad, mm_placeholders=[pb.PlaceholderRange(offset=o, length=n) for o, n in self.ranges],
            mm_hashes=[f"{tag}-{i}".ljust(64, "0") for i in range(len(self.rows))],
            batched_keys=["image_grid_thw", "patches_per_image"], flat_keys={"pixel_values": "patches_per_image"},
            keep_on_cpu_keys=["image_grid_thw"], modality=common_pb2.IMAGE,
        )
        req = pb.GenerateRequest(request_id=tag, tokenized=pb.TokenizedInput(input_ids=self.ids), mm_inputs=mm,
                                 sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=1))
        return req, name


def _decode_seconds(metrics_port: int) -> tuple[float, float]:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    return metric(url, "vlm_request_decode_seconds_sum"), metric(url, "vlm_request_decode_seconds_count")


def measure(server, batches: dict, args, metrics_port: int | None) -> list[dict]:
    rows = []
    limit = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    with grpc.insecure_channel(server.host, options=limit) as channel:
        stub = pb_grpc.VllmEngineStub(channel)
        for (dtype, n), batch in batches.items():
            for transport in ("inline", "shm"):
                latencies, ingest = [], []
                for k in range(args.repeats + 1):  # the first is a warm-up
                    # A new image identity each time, so no cache on either side helps.
                    req, name = batch.request(transport, f"{server.name}-{dtype}-{n}-{transport}-{k}-{time.time_ns()}")
                    before = _decode_seconds(metrics_port) if metrics_port else None
                    t0 = time.perf_counter()
                    list(stub.Generate(req, timeout=600))
                    elapsed = time.perf_counter() - t0
                    if name and os.path.exists(f"/dev/shm/{name}"):
                        os.unlink(f"/dev/shm/{name}")  # a worker that did not consume it
                    if k:
                        latencies.append(elapsed)
                        if before:
                            after = _decode_seconds(metrics_port)
                            ingest.append(after[0] - before[0])
                nbytes = batch.pixels.nbytes
                row = {"server": server.name, "pixels": dtype, "images": n, "transport": transport, "MB": nbytes / 1e6,
                       "latency_ms": statistics.median(latencies) * 1e3}
                if ingest:
                    row["ingest_ms"] = statistics.median(ingest) * 1e3
                    row["ingest_GBps"] = nbytes / statistics.median(ingest) / 1e9
                rows.append(row)
                print(row, flush=True)
    return rows


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
    src = batch.pixels.reshape(-1).view(np.uint8)
    dst = np.empty_like(src)
    for k in range(repeats):
        req, name = batch.request(transport, f"breakdown-{transport}-{k}-{time.time_ns()}")
        wire = req.SerializeToString()
        t = {"parse": _timed(lambda: pb.GenerateRequest.FromString(wire))}
        req = pb.GenerateRequest.FromString(wire)
        t0 = time.perf_counter()
        pixels = decode_tensor("pixel_values", req.mm_inputs.pixel_values)  # maps and unlinks a shm segment
        t["view or map"] = time.perf_counter() - t0
        parts = torch.split(pixels, rows)
        t["hash"] = _timed(lambda: [image_identity(p, tuple(map(int, g))) for p, g in zip(parts, batch.grid)])
        t["cast"] = _timed(lambda: prepare_pixels(pixels, norm, True, torch.float32))
        t["pad values"] = _timed(lambda: [pad_values(f"{k}-{i}", n, candidates) for i, (_, n) in enumerate(batch.ranges)])
        t["memcpy"] = _timed(lambda: np.copyto(dst, src))
        for step, seconds in t.items():
            steps.setdefault(step, []).append(seconds * 1e3)
    return {step: statistics.median(ms) for step, ms in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--images", default="1,4,8")
    parser.add_argument("--pixels", default="uint8,float32", help="pixel forms to send: uint8 (raw), float32 (normalized)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true", help="only time each ingest step in-process (no servers)")
    parser.add_argument("--servers", default="ours,incumbent")
    parser.add_argument("--incumbent-venv", default=".venv-incumbent")
    parser.add_argument("--start-timeout", type=float, default=600)
    args = parser.parse_args()
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
                print(f"{dtype:>7} {n:6d} {batch.pixels.nbytes / 1e6:6.1f} {transport:>9} | "
                      + "  ".join(f"{step} {ms:.2f}" for step, ms in steps.items()), flush=True)
        return
    results = []
    for name in args.servers.split(","):
        if name == "incumbent" and not (ROOT / args.incumbent_venv / "bin" / "vllm").exists():
            print("incumbent venv missing: run `bash bench/incumbent_env.sh` first; skipping it")
            continue
        metrics_port = free_port() if name == "ours" else None
        extra = ["--metrics-port", str(metrics_port)] if metrics_port else []
        server = start_server(name, args, TRANSPORT_ENGINE_ARGS, extra, ENV, log_name="transport")
        try:
            server.wait_serving(args.start_timeout)
            results += measure(server, batches, args, metrics_port)
        finally:
            server.stop()
    print(f"\n{'pixels':>7} {'images':>6} {'MB':>6} {'transport':>9} | {'ours ms':>8} {'ingest ms':>9} {'GB/s':>6} "
          f"{'of memcpy':>9} | {'incumbent ms':>12} | ratio")
    for r in (r for r in results if r["server"] == "ours"):
        inc = next((x for x in results if x["server"] == "incumbent" and x["images"] == r["images"]
                    and x["pixels"] == r["pixels"] and x["transport"] == r["transport"]), None)
        inc_ms = f"{inc['latency_ms']:12.1f}" if inc else f"{'-':>12}"
        ratio = f"{r['latency_ms'] / inc['latency_ms']:.2f}" if inc else "-"
        r["memcpy_GBps"] = bandwidth
        print(f"{r['pixels']:>7} {r['images']:6d} {r['MB']:6.1f} {r['transport']:>9} | {r['latency_ms']:8.1f} "
              f"{r['ingest_ms']:9.1f} {r['ingest_GBps']:6.2f} {100 * r['ingest_GBps'] / r['memcpy_GBps']:8.0f}% | "
              f"{inc_ms} | {ratio}")
    print(f"(of memcpy: ingest GB/s over this machine's memcpy, {bandwidth:.1f} GB/s in this run; "
          "ratio = ours / incumbent end-to-end latency, max_tokens=1)")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "transport.json").write_text(json.dumps({"rows": results}, indent=2))


if __name__ == "__main__":
    main()
