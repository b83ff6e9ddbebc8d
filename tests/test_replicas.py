"""Three `vlm-servicer serve` processes (each its own engine, KV events on) behind one real SMG gateway.

- `cache_aware` (fed by our SubscribeKvEvents): every turn of an image conversation lands on the replica that
  served its first turn, and the later turns are served from that replica's prefix cache;
- failover under steady load: SIGKILL one replica's process group. Only requests in flight at the kill may
  fail; SMG marks the worker unhealthy; every request started once it has done so succeeds; the restarted
  replica rejoins and serves again.
The routing figures themselves are measured by `make bench-replicas` (bench/replicas.py), not asserted here.
"""

import asyncio
import time

import pytest

from harness.gateway import Conversation, chat_stream, launch_gateway, smg_executable
from harness.processes import metric, start_replicas

pytestmark = [pytest.mark.engine, pytest.mark.gateway]
if smg_executable() is None:
    pytest.skip("the SMG gateway (`smg` executable, pip package smg) is not installed", allow_module_level=True)

REPLICAS = 3
WAIT_S = 60.0


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    started = start_replicas(REPLICAS, tmp_path_factory.mktemp("replicas"))
    yield started
    for r in started:
        r.stop()


@pytest.fixture
def gateway_for(replicas, tmp_path):
    gateways = []

    def launch(policy: str):
        gateways.append(launch_gateway([r.url for r in replicas], tmp_path / f"smg-{policy}.log", policy=policy))
        return gateways[-1]

    yield launch
    for gw in gateways:
        gw.stop()


async def _served_by(replicas, before: list[float]) -> int:
    """The one replica whose finished-request counter moved since `before`."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        moved = [i for i, (r, b) in enumerate(zip(replicas, before)) if r.served() > b]
        if moved:
            assert len(moved) == 1, f"one request counted on replicas {moved}"
            return moved[0]
        await asyncio.sleep(0.1)
    raise AssertionError("no replica counted the request")


async def test_cache_aware_keeps_each_image_conversation_on_its_replica(replicas, gateway_for):
    gw = gateway_for("cache_aware")
    conversations = [Conversation(i) for i in range(4)]
    placed: dict[int, list[int]] = {}
    try:
        for turn in range(3):
            for conv in conversations:  # one at a time, so each replica's counter names the one that served it
                before = [r.served() for r in replicas]
                ok, text, _, usage, error = await asyncio.to_thread(chat_stream, gw, conv.next_turn(turn, 7), 4)
                assert ok, error
                conv.answered(text)
                placed.setdefault(conv.index, []).append(await _served_by(replicas, before))
                if turn:
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                    assert cached >= 256, f"turn {turn} of conversation {conv.index}: {usage}"
        print(f"\nreplica of each turn, by conversation: {placed}")
        assert all(len(set(where)) == 1 for where in placed.values()), placed
        assert metric(gw.metrics_url, "smg_kv_event_blocks_total") > 0
        assert metric(gw.metrics_url, "smg_kv_event_stream_errors_total") == 0
    except BaseException:
        print(f"\n===== SMG log =====\n{gw.tail()}")
        raise


async def test_failover_loses_only_in_flight_requests_and_the_replica_rejoins(replicas, gateway_for):
    gw = gateway_for("round_robin")
    outcomes: list[tuple[float, float, bool, str]] = []  # (start, end, ok, error) of every request
    stop = asyncio.Event()

    async def client(k: int) -> None:
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            ok, _, _, _, error = await asyncio.to_thread(
                chat_stream, gw, [{"role": "user", "content": f"Client {k}, request {n}: say something."}], 8)
            outcomes.append((started, time.monotonic(), ok, error))
            n += 1

    victim = replicas[1]
    clients = [asyncio.create_task(client(k)) for k in range(3)]
    try:
        await asyncio.sleep(3)
        killed_at = time.monotonic()
        await asyncio.to_thread(victim.kill)
        while gw.healthy_workers() != REPLICAS - 1:
            assert time.monotonic() - killed_at < WAIT_S, "SMG never marked the killed worker unhealthy"
            await asyncio.sleep(0.1)
        marked_at = time.monotonic()
        await asyncio.sleep(3)  # load on the two survivors
        victim.start()
        await asyncio.to_thread(victim.wait_ready, time.monotonic() + 420)
        while gw.healthy_workers() != REPLICAS:
            assert time.monotonic() - marked_at < 480, "the restarted replica never rejoined"
            await asyncio.sleep(0.2)
        rejoined = victim.served()
        await asyncio.sleep(4)  # load on all three again
    except BaseException:
        print(f"\n===== SMG log =====\n{gw.tail()}")
        raise
    finally:
        stop.set()
        await asyncio.gather(*clients)
    failed = [(s, e, err) for s, e, ok, err in outcomes if not ok]
    in_flight = [o for o in outcomes if o[0] <= killed_at <= o[1]]
    after = [o for o in outcomes if o[0] >= marked_at]
    print(f"\nfailover: {len(outcomes)} requests, {len(in_flight)} in flight at the kill, {len(failed)} failed, "
          f"SMG marked the worker unhealthy after {marked_at - killed_at:.1f} s; "
          f"{len(after)} started after that, all succeeded: {all(o[2] for o in after)}; "
          f"the restarted replica served {victim.served() - rejoined:.0f} after rejoining")
    assert all(s <= killed_at <= e for s, e, _ in failed), f"a request not in flight at the kill failed: {failed}"
    assert after and all(ok for _, _, ok, _ in after)
    assert victim.served() > rejoined, "the restarted replica got no requests"
