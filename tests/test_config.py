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
