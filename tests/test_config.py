"""The servicer's configuration: no flag of ours silently overrides one of vLLM's."""

import pytest

from engine_adapter.engine import parse_engine_args
from servicer import cli
from servicer.config import ConfigError, ServerConfig
from tests.fixtures import MODEL

SHM = ("--mm-processor-cache-type", "shm")


@pytest.mark.parametrize("vllm_flag", [("--mm-processor-cache-gb", "2"), ("--mm-processor-cache-gb=2",),
                                       ("--mm_processor_cache_gb", "2")])
def test_mm_shm_gb_with_vllms_cache_size_is_refused(vllm_flag):
    with pytest.raises(ConfigError, match="--mm-shm-gb and vLLM's --mm-processor-cache-gb"):
        ServerConfig(mm_shm_gb=1.0, engine_args=(*SHM, *vllm_flag))


def test_the_command_line_refuses_both_and_help_says_so(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--mm-shm-gb", "1", *SHM, "--mm-processor-cache-gb", "2"])
    assert exit_.value.code == 2
    assert "--mm-shm-gb and vLLM's --mm-processor-cache-gb" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "--mm-processor-cache-gb (default 4): give one of the two" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("ours, vllms, ring_gb", [
    (None, None, 4.0),  # vLLM's default
    (None, "2", 2.0),  # the user's vLLM flag, kept
    (0.5, None, 0.5),  # ours
])
def test_the_ring_is_sized_by_the_one_flag_given(ours, vllms, ring_gb):
    argv = (*SHM, *(("--mm-processor-cache-gb", vllms) if vllms else ()))
    config = ServerConfig(mm_shm_gb=ours, engine_args=argv)
    args = parse_engine_args(str(MODEL), config.engine_args, config.mm_shm_gb)
    assert args.mm_processor_cache_gb == ring_gb


# -- the RL control endpoint's key and address, and the gateway registration ------------------------------------

def _serve_config(argv, monkeypatch, env_key=None):
    import argparse

    from servicer.config import CONTROL_KEY_ENV, add_serve_flags, config_from_args

    if env_key is None:
        monkeypatch.delenv(CONTROL_KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(CONTROL_KEY_ENV, env_key)
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    ns, rest = parser.parse_known_args(argv)
    return config_from_args(ns, rest)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "worker.example"])
def test_a_control_endpoint_off_loopback_without_a_key_is_refused(host, monkeypatch):
    with pytest.raises(ConfigError, match=f"--control-host {host}: .* needs a key"):
        _serve_config(["--control-port", "0", "--control-host", host], monkeypatch)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.9", "::1", "localhost"])
def test_loopback_needs_no_key(host, monkeypatch):
    assert _serve_config(["--control-port", "0", "--control-host", host], monkeypatch).control_api_key == ""


def test_the_key_comes_from_the_file_or_the_environment_and_is_never_shown(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    argv = ["--control-port", "0", "--control-host", "0.0.0.0"]
    from_file = _serve_config([*argv, "--control-api-key-file", str(key_file)], monkeypatch, env_key="other")
    assert from_file.control_api_key == "s3cret" and "s3cret" not in repr(from_file)
    assert _serve_config(argv, monkeypatch, env_key="from-env").control_api_key == "from-env"
    key_file.write_text("  \n")
    with pytest.raises(ConfigError, match="--control-api-key-file .*: the file is empty"):
        _serve_config([*argv, "--control-api-key-file", str(key_file)], monkeypatch)
    with pytest.raises(ConfigError, match="--control-api-key-file .*nope"):
        _serve_config([*argv, "--control-api-key-file", str(tmp_path / "nope")], monkeypatch)


def test_the_command_line_refuses_an_open_control_endpoint(capsys, monkeypatch):
    from servicer.config import CONTROL_KEY_ENV

    monkeypatch.delenv(CONTROL_KEY_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--control-port", "8081", "--control-host", "0.0.0.0"])
    assert exit_.value.code == 2 and "needs a key" in capsys.readouterr().err


def test_registration_needs_an_address_a_gateway_can_reach(monkeypatch):
    with pytest.raises(ConfigError, match="--register-with: --host 0.0.0.0 .* --advertise-host"):
        _serve_config(["--register-with", "http://gw:8000", "--host", "0.0.0.0"], monkeypatch)
    config = _serve_config(["--register-with", "http://gw:8000", "--host", "0.0.0.0", "--advertise-host", "10.0.0.5",
                            "--register-labels", "rl.group=rollout, team=vision"], monkeypatch)
    assert config.advertised_host == "10.0.0.5"
    assert dict(config.register_labels) == {"rl.group": "rollout", "team": "vision"}
    with pytest.raises(ConfigError, match="--register-labels: 'oops' is not key=value"):
        _serve_config(["--register-labels", "oops"], monkeypatch)
