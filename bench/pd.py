"""Prefill/decode disaggregation against one worker, both behind the real SMG gateway (measured, not asserted).

    python -m bench.pd [--requests 24] [--prompt-words 200] [--max-tokens 32] [--concurrency 4] [--image-size 224]

Setups, each run alone (its engines started for the run and stopped after it), A B, B A: a NIXL prefill
worker and a NIXL decode worker (CPU buffers over UCX) behind `smg launch --pd-disaggregation`, and one plain
worker behind `smg launch`. Alone, because each NIXL worker's UCX progress thread polls one core without
pause, idle or not: beside a PD pair a third engine on 2 cores gets almost nothing. Each round sends the
same streamed chats (text, or each with its own image: --image-size) to each setup, new ones every round, on
engines started for it; reported per setup: time to first token, decode rate per request (tokens after the
first over the time after the first), req/s, and cached / prompt tokens as the gateway reports them (no prompt
repeats, and the chat header is shorter than a KV block). On 2 CPU cores these figures say how the path
behaves here, not what GPUs would gain.
"""

import argparse
import asyncio
import json
import pathlib
import random
import statistics
import sys
import tempfile
import time
import urllib.request

from harness.gateway import SMG_PD_WEDGE, launch_gateway, smg_executable
from harness.images import noise_image
from harness.processes import free_port, start_replicas

ROLES = ("kv_producer", "kv_consumer")


def _configure(index: int) -> dict:
    connector = {"kv_connector": "NixlConnector", "kv_role": ROLES[index], "kv_buffer_device": "cpu"}
    return {"flags": ("--kv-transfer-config", json.dumps(connector)),
            "env": {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}}


def _stream(url: str, model: str, content, max_tokens: int) -> tuple[float, float, int, dict]:
    """(seconds to the first token, seconds in all, tokens, usage) for one streamed chat completion."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    start, first, tokens, usage = time.perf_counter(), 0.0, 0, {}
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode(errors="replace").strip()
            if line.startswith("data:") and line != "data: [DONE]":
                chunk = json.loads(line[5:])
                # The first chunk carrying generated text (even a partial character, which decodes to "").
                if not first and any("content" in c.get("delta", {}) for c in chunk.get("choices", [])):
                    first = time.perf_counter() - start
                usage = chunk.get("usage") or usage
                tokens = usage.get("completion_tokens", tokens)
    return first, time.perf_counter() - start, tokens, usage


async def _load(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    results = []

    async def one(text: str) -> None:
        async with gate:
            results.append(await asyncio.to_thread(_stream, url, model, text, max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    rate = [(r[2] - 1) / (r[1] - r[0]) for r in results if r[2] > 1 and r[1] > r[0]]
    # The gateway's usage.prompt_tokens_details.cached_tokens: the answering (decode) worker's count.
    cached = sum((r[3].get("prompt_tokens_details") or {}).get("cached_tokens", 0) for r in results)
    return {"ttft_p50_ms": round(1000 * statistics.median(ttft), 1), "decode_tok_s_p50": round(statistics.median(rate), 1),
            "req_s": round(len(results) / wall, 2), "cached_tokens": cached,
            "prompt_tokens": sum(r[3].get("prompt_tokens", 0) for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--prompt-words", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=0, help="each chat starts with its own image of this size")
    parser.add_argument("--smg-flag", action="append", default=None,
                        help=f"passed to every `smg launch` (repeatable; default {' '.join(SMG_PD_WEDGE)})")
    args = parser.parse_args(argv)
    args.smg_flag = args.smg_flag if args.smg_flag is not None else list(SMG_PD_WEDGE)
    if smg_executable() is None:
        sys.exit("the SMG gateway is not installed (pip install smg)")
    words = ["red", "blue", "shape", "corner", "light", "edge", "pattern", "noise", "left", "right", "sky", "rain"]
    rows: dict[str, list[dict]] = {"PD (NIXL)": [], "one worker": []}
    for n in range(args.rounds):  # fresh prompts every round, the same for both setups
        for label in (list(rows) if n % 2 == 0 else list(rows)[::-1]):
            rng = random.Random(f"round {n}")
            prompts = [" ".join(rng.choices(words, k=args.prompt_words)) for _ in range(args.requests)]
            if args.image_size:
                prompts = [[{"type": "image_url", "image_url": {"url": noise_image(rng.randrange(1 << 30), args.image_size)}},
                            {"type": "text", "text": p}] for p in prompts]
            rows[label].append(_run_setup(label, prompts, args))
            print(json.dumps({"round": n, "setup": label, **rows[label][-1]}), flush=True)
    kind = f"{args.image_size} px image chats" if args.image_size else "text chats"
    print(f"\n{args.requests} streamed {kind} per run, ~{args.prompt_words} words, {args.max_tokens} tokens, "
          f"concurrency {args.concurrency}, medians over {args.rounds} rounds (A B, B A), tiny Qwen2-VL on 2 CPU cores")
    print(f"{'setup':<12} {'TTFT p50 ms':>12} {'decode tok/s p50':>17} {'req/s':>7} {'cached/prompt':>15}")
    for label, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        cache = f"{sum(r['cached_tokens'] for r in runs)}/{sum(r['prompt_tokens'] for r in runs)}"
        print(f"{label:<12} {med['ttft_p50_ms']:>12.1f} {med['decode_tok_s_p50']:>17.1f} {med['req_s']:>7.2f} {cache:>15}")
    return 0


def _run_setup(label: str, prompts: list, args) -> dict:
    """Start the setup's engines and gateway, run the prompts through it, stop everything."""
    pd = label.startswith("PD")
    with tempfile.TemporaryDirectory(prefix="pd-") as tmp:
        workdir = pathlib.Path(tmp)
        replicas = start_replicas(2 if pd else 1, workdir, _configure if pd else (lambda index: {}))
        gw = None
        try:
            gw = launch_gateway([r.url for r in replicas], workdir / "smg.log", *args.smg_flag,
                                policy=None if pd else "round_robin", pd=pd)
            _stream(gw.url, gw.model, "Warm up.", 2)  # not measured: NIXL's first transfer includes its handshake
            return asyncio.run(_load(gw.url, gw.model, prompts, args.max_tokens, args.concurrency))
        except OSError:
            print(f"{label} failed; SMG log:\n{gw.tail(40) if gw else ''}\nlast worker's log:\n{replicas[-1].tail(30)}")
            raise
        finally:
            if gw is not None:
                gw.stop()
            for r in replicas:
                r.stop()


if __name__ == "__main__":
    sys.exit(main())
