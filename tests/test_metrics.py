"""The Prometheus endpoint: request codes, latencies, tokens, multimodal bytes, cache and store figures; the
request log line under vLLM's --enable-log-requests; vLLM's own Prometheus logger not run."""

import logging

import grpc
import pytest

from harness.processes import scrape
from tests.fixtures import image, mm_inputs, request

pytestmark = pytest.mark.engine


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    return scrape(f"http://127.0.0.1:{port}/metrics")


async def test_metrics_count_what_happened(stub, server, oracle):
    before = _scrape(server.metrics_port)
    imgs = oracle.images([image(112, 112, seed=41)])
    ids = oracle.chat_ids("What is in the image?", 1)
    mm = mm_inputs(imgs.raw, imgs.grid)
    [done] = [r.complete async for r in stub.Generate(request(ids, mm=mm, temperature=0.0, max_tokens=4, ignore_eos=True))]
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in stub.Generate(request([], max_tokens=4)):
            pass
    after = _scrape(server.metrics_port)
    delta = lambda name, **labels: after.get((name, tuple(sorted(labels.items()))), 0) - before.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
    assert delta("vlm_requests_total", code="OK") == 1
    assert delta("vlm_requests_total", code="INVALID_ARGUMENT") == 1
    assert delta("vlm_request_latency_seconds_count") == 2
    assert delta("vlm_time_to_first_token_seconds_count") == 1
    assert delta("vlm_prompt_tokens_total") == done.prompt_tokens
    assert delta("vlm_completion_tokens_total") == 4
    assert delta("vlm_mm_ingested_bytes_total", transport="inline") >= imgs.raw.numel()
    assert ("vlm_active_requests", ()) in after and ("vlm_prefix_cache_hit_rate", ()) in after
    assert after[("vlm_mm_store_items", ())] >= 1
    assert ("vlm_mm_store_lookups_total", (("result", "hit"),)) in after


async def test_concurrency_limit_is_resource_exhausted(engine, oracle):
    from tests.conftest import extra_server

    ids = oracle.chat_ids("Describe the image.")
    async with extra_server(engine, max_concurrent_requests=2) as (srv, limited):
        long = [limited.Generate(request(ids, stream=True, max_tokens=3000, ignore_eos=True)) for _ in range(2)]
        for call in long:
            await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in limited.Generate(request(ids, max_tokens=2)):
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent-requests 2" in err.value.details()
        for call in long:
            call.cancel()


async def test_request_log_line_follows_vllms_flag(stub, shapes_stub, engine, shapes_engine, oracle, shapes_oracle, caplog):
    """One log line per request only under vLLM's --enable-log-requests (off by default, as in vLLM): the
    session engine runs without the flag, the trained model's with it (conftest), each flag parsed by
    parse_engine_args and read back from the engine by its model info."""
    assert not engine.info.log_requests and shapes_engine.info.log_requests
    for name, target, chat, expected in (("off", stub, oracle, 0), ("on", shapes_stub, shapes_oracle, 1)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="servicer.inflight"):
            _ = [r async for r in target.Generate(request(chat.chat_ids("Name a colour."), temperature=0.0, max_tokens=2,
                                                          ignore_eos=True, request_id=f"log-{name}"))]
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"request log-{name} ")]
        assert len(lines) == expected, lines
    assert "completion=2" in lines[0]


async def test_vllms_prometheus_logger_does_not_run(stub, oracle, monkeypatch):
    """vLLM's own Prometheus stat logger, which nothing exports here, never records (it cost front-end CPU):
    the engine was given a stand-in, so vLLM added none of its own. The stand-in records, so the stat
    loggers did run for these requests (the second request's answer comes after the first one's records)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from engine_adapter.engine import _UnexportedPrometheus

    calls = {PrometheusStatLogger: 0, _UnexportedPrometheus: 0}
    for cls in calls:
        monkeypatch.setattr(cls, "record", lambda self, *args, cls=cls, **kwargs: calls.__setitem__(cls, calls[cls] + 1))
    ids = oracle.chat_ids("Name a colour.")
    for _ in range(2):
        _ = [r async for r in stub.Generate(request(ids, temperature=0.0, max_tokens=4, ignore_eos=True))]
    assert calls[_UnexportedPrometheus] > 0 and calls[PrometheusStatLogger] == 0, calls
