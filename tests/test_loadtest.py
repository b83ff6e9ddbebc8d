"""The ghz configs in deploy/ghz, driven by the bundled grpc.aio load driver against the real server."""

import pathlib

import pytest

from bench.load import format_report, load_config, run_load

pytestmark = pytest.mark.engine
GHZ = pathlib.Path(__file__).resolve().parents[1] / "deploy" / "ghz"
CONFIGS = sorted(p for p in GHZ.glob("*.json") if not p.name.endswith(".data.json"))


def test_both_request_shapes_have_configs():
    assert {p.name for p in CONFIGS} == {"text.json", "image.json"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
async def test_config_runs_without_errors(server, config):
    cfg = load_config(str(config), host=f"127.0.0.1:{server.port}", concurrency=4, duration=2.0)
    report = await run_load(cfg)
    print(format_report(report))
    assert report["count"] > 0 and report["rps"] > 0
    assert report["status_code_distribution"] == {"OK": report["count"]}
    assert set(report["latency_distribution"]) >= {"p50", "p95", "p99"}
