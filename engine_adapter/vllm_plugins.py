"""vLLM general plugins this package registers (entry point group `vllm.general_plugins`).

vLLM loads general plugins in every process it starts (engine core, workers), which is
the only way to reach the CPU build's worker processes: they are spawned, not forked,
so a setting made in the servicer's own process never gets there.
"""

import os

# Set by Engine.start; unset, the plugin changes nothing (so other vLLM runs in the same
# environment, the incumbent's included, keep vLLM's defaults).
SHM_RECHECK_ENV = "VLM_SERVICER_SHM_RECHECK_MS"


def bound_idle_shm_waits() -> None:
    """Wake idle shared-memory readers every N ms instead of vLLM's 5,000.

    vLLM's engine core and its workers hand each step over a shared-memory ring and wake
    an idle reader with a best-effort ZMQ ping (PUB with SNDHWM=1, SUB with CONFLATE),
    which can be dropped; the reader then sleeps until its recheck interval
    (vllm-project/vllm#45224 bounded it at 5 s). A NIXL prefill engine, stepping empty
    batches while it holds blocks for the decoder, lost pings often enough here that
    every PD request waited 4-16 s. vLLM 0.32's module constant: no public setting (pinned by
    tests/test_vllm_private.py).
    """
    value = os.environ.get(SHM_RECHECK_ENV)
    if not value:
        return
    from vllm.distributed.device_communicators import shm_broadcast

    shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS = int(value)
