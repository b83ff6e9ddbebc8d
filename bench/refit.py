"""Refit in place against a restart: how long a worker stops serving to take new weights.

    .venv/bin/python -m bench.refit [--rounds 3]

One `vlm-servicer serve` on the trained tiny model with its control endpoint. Alternating, `--rounds` times each:
  refit:   POST /update_weights_from_disk (pause with wait -> reload in place -> drop the caches -> resume), from
           the call to the first answer after it;
  restart: SIGTERM the servicer, start a new one on the other checkpoint, until its first answer.
Both switch between the same two checkpoints (models/tiny-qwen2-vl-shapes and its shifted step), and every
timed answer is a prompt neither side has cached (a fresh image each time). Measured, never asserted.
"""

import argparse
import pathlib
import random
import statistics
import tempfile
import time

import grpc
from transformers import AutoProcessor

from bench.caches import CacheTally
from harness.processes import SHAPES_MODEL, ServicerProcess, free_port, http_json
from harness.prompts import shapes_question
from tinytrain import data
from vlm_proto import vllm_engine_pb2_grpc as pb_grpc

SHIFTED_MODEL = SHAPES_MODEL.parent / "tiny-qwen2-vl-shapes-shifted"
KEY = "bench-refit"


def first_answer(host: str, processor, seed: int, tally: CacheTally | None = None) -> float:
    """Send one fresh image question; the seconds until its answer (its cached / prompt tokens into `tally`)."""
    request = shapes_question(processor, data.make_sample(random.Random(seed)), "colour", temperature=0.0, max_tokens=2)
    started = time.monotonic()
    with grpc.insecure_channel(host) as channel:
        responses = list(pb_grpc.VllmEngineStub(channel).Generate(request, timeout=600))
    elapsed = time.monotonic() - started
    if tally is not None:
        tally.add_complete(responses[-1].complete)
    return elapsed


def servicer(workdir: pathlib.Path, model: pathlib.Path, port: int, control_port: int, n: int) -> ServicerProcess:
    return ServicerProcess(workdir, name=f"servicer{n}", model=model, port=port, env={"VLM_SERVICER_CONTROL_API_KEY": KEY},
                           flags=("--control-port", str(control_port)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    processor = AutoProcessor.from_pretrained(SHAPES_MODEL)
    models = [SHAPES_MODEL, SHIFTED_MODEL]
    refits, reloads, restarts = [], [], []
    caches = {"refit": CacheTally(), "restart": CacheTally()}
    with tempfile.TemporaryDirectory(prefix="bench-refit-") as tmp:
        workdir = pathlib.Path(tmp)
        port, control_port, starts = free_port(), free_port(), 0
        proc = servicer(workdir, models[0], port, control_port, starts).start()
        proc.wait_ready(time.monotonic() + 600)
        first_answer(proc.host, processor, 0)  # warm: the first request after a start pays one-time costs on both sides
        seed = 1
        try:
            for r in range(args.rounds):
                target = models[(2 * r + 1) % 2]
                started = time.monotonic()
                status, body = http_json("POST", f"http://127.0.0.1:{control_port}/update_weights_from_disk",
                                         {"model_path": str(target)}, headers={"Authorization": f"Bearer {KEY}"})
                assert status == 200, body
                refits.append(time.monotonic() - started + first_answer(proc.host, processor, seed, caches["refit"]))
                reloads.append(body["seconds"])
                seed += 1

                target = models[(2 * r + 2) % 2]
                started = time.monotonic()
                proc.stop()
                starts += 1
                proc = servicer(workdir, target, port, control_port, starts).start()
                proc.wait_ready(time.monotonic() + 600)
                answer = first_answer(proc.host, processor, seed, caches["restart"])
                restarts.append(time.monotonic() - started + answer)
                seed += 1
                print(f"round {r + 1}: refit {refits[-1]:.2f} s (reload and cache reset {reloads[-1]:.2f} s), "
                      f"restart {restarts[-1]:.1f} s", flush=True)
        finally:
            proc.stop()
    for name, tally in caches.items():  # a fresh image each time, and a refit drops every cache: nothing to hit
        tally.require_none(name)
    med = statistics.median
    print(f"\nrefit in place: median {med(refits):.2f} s (max {max(refits):.2f}); of which the reload and cache reset "
          f"{med(reloads):.2f} s\nrestart: median {med(restarts):.1f} s (max {max(restarts):.1f})\n"
          f"restart / refit: {med(restarts) / med(refits):.0f}x  ({args.rounds} rounds, alternating, this machine)\n"
          f"cached / prompt tokens of the timed answers: refit {caches['refit']}, restart {caches['restart']}")


if __name__ == "__main__":
    main()
