"""Replicas behind SMG: N `vlm-servicer serve` processes (each its own vLLM engine, KV events on) and one
`smg launch`, all real processes on loopback; multi-turn image chat traffic through the gateway.

    python -m bench.replicas [--replicas 3] [--conversations 12] [--turns 4] [--policies cache_aware round_robin]

For each policy it reports the share of prompt tokens served from the engines' prefix caches, the mean time
to the first streamed token, and how the conversations spread over the replicas; a single servicer on the same
traffic is the reference. Each setup gets conversations of its own (fresh images), after an unmeasured warm-up
of every replica. Measured, not asserted (tests/test_replicas.py asserts only what cannot flake).
"""

import argparse
import asyncio
import json
import pathlib
import sys
import tempfile
from dataclasses import dataclass

from harness.gateway import STICKY, Conversation, Gateway, chat_stream, launch_gateway, smg_executable
from harness.processes import start_replicas


@dataclass
class Turn:
    conversation: int
    turn: int
    ok: bool
    ttft_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


async def run_conversations(gw: Gateway, count: int, turns: int, seed: int, concurrency: int,
                            max_tokens: int = 4) -> list[Turn]:
    """`count` conversations interleaved round by round (turn t of every conversation before turn t + 1), at most
    `concurrency` requests at once."""
    conversations = [Conversation(i) for i in range(count)]
    gate = asyncio.Semaphore(concurrency)
    results: list[Turn] = []

    async def one(conv: Conversation, turn: int) -> None:
        async with gate:
            ok, text, ttft, usage, error = await asyncio.to_thread(
                chat_stream, gw, conv.next_turn(turn, seed), max_tokens, f"conversation-{seed}-{conv.index}")
        conv.answered(text if ok else "")
        details = usage.get("prompt_tokens_details") or {}
        results.append(Turn(conv.index, turn, ok, ttft, usage.get("prompt_tokens", 0),
                            details.get("cached_tokens", 0), error))

    for turn in range(turns):
        await asyncio.gather(*(one(c, turn) for c in conversations))
    return results


def summary(results: list[Turn]) -> dict:
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    later = [r for r in ok if r.turn > 0]  # turns whose history could be cached
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "cached_ratio": round(sum(r.cached_tokens for r in ok) / prompt, 3) if prompt else 0.0,
        "cached_ratio_later_turns": round(sum(r.cached_tokens for r in later) / max(1, sum(r.prompt_tokens for r in later)), 3),
        "mean_ttft_ms": round(1000 * sum(r.ttft_s for r in ok) / max(1, len(ok)), 1),
    }


def warm_up(replicas: list, log: pathlib.Path) -> None:
    """Two image chats per replica through a round-robin gateway, not measured: no setup below pays for an
    engine's first requests. Their images are used nowhere else, so they leave nothing another chat could hit."""
    gw = launch_gateway([r.url for r in replicas], log, policy="round_robin")
    try:
        for n in range(2 * len(replicas)):
            ok, _, _, _, error = chat_stream(gw, Conversation(n).next_turn(0, seed=10**6), 4)
            if not ok:
                raise RuntimeError(f"warm-up chat failed: {error}")
    finally:
        gw.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=12, help="requests at once (12: every conversation)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin", "round_robin+sticky"])
    args = parser.parse_args(argv)
    if smg_executable() is None:
        sys.exit("the SMG gateway is not installed (pip install smg)")

    rows = []
    with tempfile.TemporaryDirectory(prefix="replicas-") as tmp:
        workdir = pathlib.Path(tmp)
        replicas = start_replicas(args.replicas, workdir)
        try:
            warm_up(replicas, workdir / "smg-warm-up.log")
            # Every run starts from empty caches on fresh seeds, so no run inherits another's blocks.
            plans = [("single servicer", replicas[:1], "round_robin")] + [
                (f"{args.replicas} replicas, {p}", replicas, p) for p in args.policies]
            for n, (label, members, policy) in enumerate(plans):
                name, _, sticky = policy.partition("+")
                gw = launch_gateway([r.url for r in members], workdir / f"smg{n}.log", *(STICKY if sticky else ()),
                                    policy=name)
                try:
                    before = [r.served() for r in replicas]
                    results = asyncio.run(run_conversations(gw, args.conversations, args.turns,
                                                            args.seed + n, args.concurrency))
                    spread = [int(r.served() - b) for r, b in zip(replicas, before)]
                finally:
                    gw.stop()
                rows.append({"setup": label, **summary(results), "requests_per_replica": spread})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            for r in replicas:
                r.stop()
    print(f"\n{args.conversations} conversations x {args.turns} turns (one new 448 px image per turn), "
          f"concurrency {args.concurrency}, tiny Qwen2-VL on CPU")
    print(f"{'setup':<32} {'cached/prompt':>13} {'later turns':>11} {'mean TTFT ms':>12} {'failed':>6}  per replica")
    for row in rows:
        print(f"{row['setup']:<32} {row['cached_ratio']:>13.3f} {row['cached_ratio_later_turns']:>11.3f} "
              f"{row['mean_ttft_ms']:>12.1f} {row['failed']:>6}  {row['requests_per_replica']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
