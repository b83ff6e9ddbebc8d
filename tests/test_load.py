"""A bounded load held on the real engine: mixed text and image requests, 10% cancelled mid-flight.

Checks: zero unexpected errors, every request accounted for, the engine idle afterwards,
and no growth in open file descriptors. Throughput is measured by `make bench`, not here.
"""

import asyncio
import os
import random
import time

import grpc
import pytest

from tests.fixtures import image, mm_inputs, request

pytestmark = pytest.mark.engine
DURATION_S = float(os.environ.get("VLM_LOAD_TEST_S", "60"))
CONCURRENCY = 32
CANCEL_FRACTION = 0.1
WARMUP_S = 5.0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_load_held_with_cancellations(stub, server, engine, oracle):
    imgs = [oracle.images([image(112, 112, seed=50 + i)]) for i in range(4)]
    text_ids = [oracle.chat_ids(q) for q in ("Describe the image.", "What shape is it?", "How many shapes are there?")]
    image_ids = oracle.chat_ids("What colour is the shape?", 1)
    counts = {"ok": 0, "cancelled": 0, "errors": []}

    async def worker(seed: int, deadline: float):
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            cancel = rng.random() < CANCEL_FRACTION
            stream = cancel or rng.random() < 0.5  # cancelled calls stream, so they are cancelled mid-stream
            if rng.random() < 0.5:
                img = rng.choice(imgs)
                req = request(image_ids, mm=mm_inputs(img.raw, img.grid), stream=stream, max_tokens=rng.randint(1, 24), ignore_eos=True)
            else:
                req = request(rng.choice(text_ids), stream=stream, max_tokens=rng.randint(1, 24), ignore_eos=True)
            call = stub.Generate(req)
            if cancel:
                await call.read()  # the servicer has it: the cancel lands mid-stream
                call.cancel()
                code = await call.code()
                if code == grpc.StatusCode.CANCELLED:
                    counts["cancelled"] += 1
                elif code == grpc.StatusCode.OK:  # it finished first
                    counts["ok"] += 1
                else:
                    counts["errors"].append(code)
                continue
            try:
                responses = [r async for r in call]
                assert responses[-1].complete.finish_reason == "length"
                counts["ok"] += 1
            except grpc.aio.AioRpcError as exc:
                counts["errors"].append((exc.code(), exc.details()))

    # A short warm-up first, so thread pools and channels that open once are not counted as growth.
    await asyncio.gather(*(worker(1000 + i, time.monotonic() + WARMUP_S) for i in range(CONCURRENCY)))
    await _idle(server, engine)
    counts.update(ok=0, cancelled=0, errors=[])
    fds_before = _open_fds()
    before = _requests_by_code(server)
    deadline = time.monotonic() + DURATION_S
    await asyncio.gather(*(worker(i, deadline) for i in range(CONCURRENCY)))
    await _idle(server, engine)
    total = counts["ok"] + counts["cancelled"] + len(counts["errors"])
    print(f"load: {total} requests in {DURATION_S:.0f} s at concurrency {CONCURRENCY}: {counts['ok']} ok, "
          f"{counts['cancelled']} cancelled, {len(counts['errors'])} errors; fds {fds_before} -> {_open_fds()}")
    assert counts["errors"] == []
    assert counts["cancelled"] > 0 and counts["ok"] > 0
    after = _requests_by_code(server)
    during = {code: n - before.get(code, 0) for code, n in after.items() if n != before.get(code, 0)}
    # Every request accounted for: the servicer saw each one end OK or CANCELLED (a cancel can
    # race a request's last token, so the split may differ; the total may not).
    assert sum(during.values()) == total
    assert set(during) <= {"OK", "CANCELLED"}, during
    assert engine.num_unfinished_requests() == 0 and not server.servicer.in_flight
    assert _open_fds() <= fds_before + 2


async def _idle(server, engine):
    for _ in range(200):
        if engine.num_unfinished_requests() == 0 and not server.servicer.in_flight:
            return
        await asyncio.sleep(0.05)


def _requests_by_code(server) -> dict[str, float]:
    return {s.labels["code"]: s.value for m in server.metrics.requests.collect() for s in m.samples if s.name.endswith("_total")}
