"""The Prometheus endpoint: request codes, latencies, tokens, multimodal bytes, cache and store figures."""

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


async def test_request_log_line_follows_vllms_flag(stub, engine, oracle, caplog, monkeypatch):
    """One log line per request only under vLLM's --enable-log-requests (off by default, as in vLLM);
    vLLM's own Prometheus stat logger, which nothing exports here, is not run (it cost front-end CPU)."""
    import dataclasses
    import logging

    assert not engine.info.log_requests
    assert not any(type(s).__name__ == "PrometheusStatLogger" for s in engine._llm.logger_manager.stat_loggers)
    ids = oracle.chat_ids("Name a colour.")
    for log_requests in (False, True):
        monkeypatch.setattr(engine, "info", dataclasses.replace(engine.info, log_requests=log_requests))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="servicer.handlers"):
            _ = [r async for r in stub.Generate(request(ids, temperature=0.0, max_tokens=2, ignore_eos=True,
                                                        request_id=f"log-{log_requests}"))]
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"request log-{log_requests} ")]
        assert len(lines) == log_requests, lines
    assert "completion=2" in lines[0]
