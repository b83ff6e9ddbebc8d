"""Multi-turn rollout: resend every image's pixels each turn vs. reference earlier images by hash.

An N-turn conversation, one new image per turn, the whole history resent as token
ids every turn (as RL rollouts do). Reports per turn: request bytes on the wire,
servicer-side decode time (validation, tensor decode, hashing, store), end-to-end
latency, and cached_tokens / prompt_tokens; and bytes per rollout. One unmeasured
rollout warms the engine; then the two modes alternate (A B, B A) over --rounds, each
rollout on fresh images from an empty prefix cache. Both modes send the same ids, so
both get the same prefix-cache hits (shown); they differ in the bytes they send.

    .venv/bin/python -m bench.rollout [--turns 8] [--size 448] [--max-tokens 16] [--rounds 2]
"""

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import time

import grpc
import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor

from harness.images import noise
from servicer.tensors import encode_tensor
from vlm_proto import common_pb2, vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
               "--kv-cache-memory-bytes", str(2 << 30), "--limit-mm-per-prompt", '{"image": 16, "video": 0}']


class Conversation:
    """Builds each turn's request the way a gateway would (uint8 patches, expanded ids, SMG keys)."""

    def __init__(self, model: str, size: int, seed: int):
        self.processor = AutoProcessor.from_pretrained(model)
        tok = self.processor.tokenizer
        self.enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
        self.pad, self.vs, self.ve = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
        self.rng = np.random.RandomState(seed)
        self.size = size
        self.ids = self.enc("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        self.pixels: list[np.ndarray] = []
        self.grids: list[np.ndarray] = []
        self.identities: list[str] = []

    def add_user_turn(self, question: str) -> None:
        img = Image.fromarray(noise(self.size, self.size, self.rng))
        feats = self.processor.image_processor(images=[img], return_tensors="np", do_rescale=False, do_normalize=False)
        self.pixels.append(feats["pixel_values"].astype(np.uint8))
        self.grids.append(feats["image_grid_thw"].astype(np.int64))
        n = int(self.grids[-1].prod()) // 4
        self.ids += self.enc("<|im_start|>user\n") + [self.vs] + [self.pad] * n + [self.ve]
        self.ids += self.enc(question + "<|im_end|>\n<|im_start|>assistant\n")

    def add_reply(self, output_ids: list[int]) -> None:
        self.ids += list(output_ids) + self.enc("<|im_end|>\n")

    def request(self, by_reference: bool, max_tokens: int) -> pb.GenerateRequest:
        known = len(self.identities) if by_reference else 0
        rows = [int(g.prod()) if i >= known else 0 for i, g in enumerate(self.grids)]
        sent = np.concatenate(self.pixels[known:])
        starts = [i for i, t in enumerate(self.ids) if t == self.vs]
        mm = pb.MultimodalInputs(
            pixel_values=encode_tensor(sent.astype(np.uint8)),
            model_specific_tensors={"image_grid_thw": encode_tensor(np.concatenate(self.grids).astype(np.int64)),
                                    "patches_per_image": encode_tensor(np.array(rows, dtype=np.int64))},
            im_token_id=self.pad,
            mm_placeholders=[pb.PlaceholderRange(offset=s + 1, length=int(g.prod()) // 4) for s, g in zip(starts, self.grids)],
            mm_hashes=self.identities[:known] + [""] * (len(self.grids) - known),
            batched_keys=["image_grid_thw", "patches_per_image"], flat_keys={"pixel_values": "patches_per_image"},
            keep_on_cpu_keys=["image_grid_thw"], modality=common_pb2.IMAGE,
        )
        return pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=self.ids), mm_inputs=mm,
                                  sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens))


async def run_rollout(stub, server, args, by_reference: bool, seed: int) -> list[dict]:
    conv = Conversation(args.model, args.size, seed)
    decode_times = server.decode_times
    rows = []
    for turn in range(args.turns):
        conv.add_user_turn(f"Describe image {turn + 1}.")
        req = conv.request(by_reference, args.max_tokens)
        wire = req.ByteSize()
        t0 = time.perf_counter()
        call = stub.Generate(req)
        conv.identities = dict(await call.initial_metadata())["vlm-mm-identities"].split(",")
        [done] = [r.complete async for r in call]
        latency = time.perf_counter() - t0
        conv.add_reply(done.output_ids)
        rows.append({"turn": turn + 1, "images": len(conv.grids), "wire_bytes": wire,
                     "decode_ms": decode_times[-1] * 1e3, "latency_ms": latency * 1e3,
                     "prompt_tokens": done.prompt_tokens, "cached_tokens": done.cached_tokens})
    return rows


def _report(name: str, rows: list[dict]) -> None:
    print(f"\n{name}: {sum(r['wire_bytes'] for r in rows) / 1e6:.2f} MB on the wire per rollout")
    print("turn images  wire_MB  decode_ms  latency_ms  cached/prompt")
    for r in rows:
        print(f"{r['turn']:4d} {r['images']:6d} {r['wire_bytes'] / 1e6:8.2f} {r['decode_ms']:10.1f} {r['latency_ms']:11.1f}"
              f"  {r['cached_tokens']:5d}/{r['prompt_tokens']:<5d} ({r['cached_tokens'] / r['prompt_tokens']:.0%})")


def _summary(results: dict[str, list[list[dict]]]) -> None:
    """Per mode and turn, the median over rounds of decode and latency; cached / prompt tokens of round 1."""
    print(f"\nmedians over {len(next(iter(results.values())))} round(s), per turn:")
    for name, rounds in results.items():
        turns = zip(*rounds)
        med = [(statistics.median(r["decode_ms"] for r in t), statistics.median(r["latency_ms"] for r in t), t[0])
               for t in turns]
        print(f"{name:>18s}: decode ms " + " ".join(f"{d:.1f}" for d, _, _ in med)
              + " | latency ms " + " ".join(f"{lat:.0f}" for _, lat, _ in med)
              + " | cached/prompt " + " ".join(f"{r['cached_tokens'] / r['prompt_tokens']:.0%}" for _, _, r in med))


async def main_async(args) -> None:
    from engine_adapter.engine import parse_engine_args, start_engine
    from servicer.config import ServerConfig
    from servicer.server import create_server

    engine = await start_engine(parse_engine_args(args.model, ENGINE_ARGS))
    server = await create_server(ServerConfig(model=args.model, port=0), engine)
    # Time the servicer's own share of each turn: request decode (off the event loop).
    decoder, server.decode_times = server.servicer.decoder, []

    class TimedDecoder:
        def decode(self, *a):
            t0 = time.perf_counter()
            try:
                return decoder.decode(*a)
            finally:
                server.decode_times.append(time.perf_counter() - t0)

    server.servicer.decoder = TimedDecoder()
    limit = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=limit) as channel:
        stub = pb_grpc.VllmEngineStub(channel)
        modes = (("resend pixels", False), ("reference by hash", True))
        # Not measured: one whole rollout first, so neither mode pays for the engine's first requests.
        await run_rollout(stub, server, args, False, seed=1000)
        results = {name: [] for name, _ in modes}
        for round_ in range(args.rounds):  # A B, B A, ...: each mode on fresh images, from an empty prefix cache
            for name, by_ref in (modes if round_ % 2 == 0 else modes[::-1]):
                await stub.FlushCache(common_pb2.FlushCacheRequest(timeout_s=5))
                results[name].append(await run_rollout(stub, server, args, by_ref, seed=2 * round_ + by_ref))
                _report(f"{name}, round {round_ + 1}", results[name][-1])
    _summary(results)
    resend, ref = (sum(r["wire_bytes"] for r in results[k][0]) for k in results)
    print(f"\nbytes per rollout, reference / resend: {ref / resend:.3f}  ({args.turns} turns, {args.size}x{args.size} uint8 images)")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    await server.grpc.stop(0)
    engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-qwen2-vl"))
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="rollouts per mode, the order alternating (A B, B A)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
