"""The engine's own limit: vLLM's `AsyncLLM` driven in-process with the side-by-side requests, no gRPC.

    python -m bench.engine_limit --model models/tiny-qwen2-vl   # then JSON lines on stdin, one per cell:
    {"scenario": "text, 16 tokens", "concurrency": 16, "duration": 10, "warmup": 3}

Answers are stdout lines starting with MARK (vLLM logs there too). bench/side_by_side.py runs it as its
third server, so the limit is measured in the same run, cell by cell
between the two servicers. Each request is what the servicers receive once their front ends are done: the same
prompt ids (and, for images, the same pixels as one pre-built multimodal item), greedy, `ignore_eos`,
output ids only (no detokenization), the final output only; each image request under its own identity, as
each of the servicers' carries its own pixels. Answers one JSON line per cell: requests, req/s, CPU per request
split into this process (driver and vLLM's front end together) and the engine's processes, and cached / prompt
tokens.
"""

import argparse
import asyncio
import json
import os
import sys
import time

from transformers import AutoProcessor
from vllm import SamplingParams
from vllm.inputs import tokens_input
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from bench.caches import CacheTally
from bench.load import image_request, text_request
from bench.side_by_side import LIMIT_MARK as MARK, SCENARIOS, cpu_split
from engine_adapter.engine import parse_engine_args
from engine_adapter.prompt import build_engine_input
from engine_adapter.types import EngineRequest, MediaItem
from harness.images import image
from harness.processes import ENGINE_ARGS
from servicer.tensors import decode_tensor


def _prompts(processor, mm_processor, images: int) -> dict[str, list]:
    """Per scenario, the engine inputs the servicers would hand vLLM for the side-by-side requests."""
    out = {}
    for scenario, (kind, _) in SCENARIOS.items():
        if kind == "text":
            req = text_request(processor.tokenizer, "What is the capital of France?", 1)
            out[scenario] = [tokens_input(list(req.tokenized.input_ids))]
            continue
        out[scenario] = []
        for seed in range(images):
            req = image_request(processor, image(112, 112, seed), "Describe the image.", 1, raw_uint8=True)
            mm = req.mm_inputs
            grid = tuple(decode_tensor("grid", mm.model_specific_tensors["image_grid_thw"])[0].tolist())
            [place] = mm.mm_placeholders
            item = MediaItem(pixel_values=decode_tensor("pixels", mm.pixel_values).clone(), grid_thw=grid,
                             identity=f"limit-{seed}", offset=place.offset, length=place.length)
            out[scenario].append(build_engine_input(
                EngineRequest("", tuple(req.tokenized.input_ids), media=(item,)), mm_processor))
    return out


def _answer(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


async def _run(llm: AsyncLLM, prompts: list, max_tokens: int, concurrency: int, seconds: float,
               tag: str) -> tuple[int, CacheTally]:
    """Requests for `seconds`; an image prompt gets a new identity each time (the servicers' requests carry their
    own pixels), so no request reuses another's encoder output or KV blocks."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    deadline, done, tally = time.monotonic() + seconds, 0, CacheTally()

    async def worker(w: int) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < deadline:
            prompt, request_id = prompts[n % len(prompts)], f"{tag}-{w}-{n}"
            if "mm_hashes" in prompt:
                prompt = {**prompt, "mm_hashes": {"image": [request_id]}}
            async for out in llm.generate(prompt, params, request_id):
                pass
            tally.add(out.num_cached_tokens or 0, len(out.prompt_token_ids))
            n += 1
            done += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done, tally


async def serve(args) -> None:
    llm = AsyncLLM.from_engine_args(parse_engine_args(args.model, ENGINE_ARGS))
    processor = AutoProcessor.from_pretrained(args.model)
    pools = _prompts(processor, llm.renderer.get_mm_processor(), args.images)
    _answer({"ready": True})
    loop = asyncio.get_running_loop()
    cell = 0
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        scenario, c = cmd["scenario"], cmd["concurrency"]
        max_tokens = SCENARIOS[scenario][1]
        cell += 1
        await _run(llm, pools[scenario], max_tokens, c, cmd["warmup"], f"w{cell}")
        before, start = cpu_split(os.getpid()), time.monotonic()
        count, tally = await _run(llm, pools[scenario], max_tokens, c, cmd["duration"], f"m{cell}")
        wall, after = time.monotonic() - start, cpu_split(os.getpid())
        # This process is both the driver and vLLM's front end: its CPU is reported as the front end's.
        cpu = {"front_end": 1e3 * (after["front_end"] - before["front_end"]) / max(count, 1),
               "engine": 1e3 * (after["engine"] - before["engine"]) / max(count, 1), "client": 0.0}
        _answer({"count": count, "rps": count / wall, "cpu_ms_per_request": cpu, "cache": tally.as_dict()})
    llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-qwen2-vl")
    parser.add_argument("--images", type=int, default=16)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
