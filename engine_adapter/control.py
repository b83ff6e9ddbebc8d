"""RL control of a running engine, on vLLM's public EngineClient API: pause and resume, sleep and wake,
cache resets, in-place weight reloads and NCCL weight transfers, weight versions.

Every path that changes weights ends in `forget_old_weights`: vLLM's reload resets the worker's encoder
cache but not the scheduler's record of it, and a weight transfer resets neither; prefix-cache KV and
the KV of requests frozen by a `keep` pause were computed by the old weights too.
"""

import logging
from typing import Any

from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest
from vllm.v1.engine.async_llm import AsyncLLM

from engine_adapter.checkpoint import check_replaceable
from engine_adapter.errors import EngineDeadError, EngineOperationError, EngineRequestError, EngineStateError
from engine_adapter.types import PAUSE_MODES, PauseMode
from engine_adapter.vllm_errors import engine_errors

logger = logging.getLogger(__name__)


class EngineControl:
    """The control surface of one AsyncLLM; `checkpoint` is the folder its weights were last loaded from."""

    def __init__(self, llm: AsyncLLM, checkpoint: str):
        self._llm: AsyncLLM | None = llm
        self.checkpoint = checkpoint
        config = llm.vllm_config
        self.sleep_mode = config.model_config.enable_sleep_mode
        self.weight_transfer = config.weight_transfer_config is not None

    @property
    def _live(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineDeadError("the engine has been shut down")
        return self._llm

    def detach(self) -> None:
        """Drop the engine at shutdown (Engine.shutdown holds the last reference)."""
        self._llm = None

    async def pause(self, mode: str = "abort", clear_cache: bool = False) -> None:
        """vLLM's pause: `abort` ends in-flight requests, `wait` lets them finish, `keep` freezes them.
        New requests queue in the engine until `resume`."""
        pause_mode = _pause_mode(mode)
        with engine_errors(operation="pause"):
            await self._live.pause_generation(mode=pause_mode, clear_cache=clear_cache)

    async def resume(self) -> None:
        with engine_errors(operation="resume"):
            await self._live.resume_generation()

    async def is_paused(self) -> bool:
        with engine_errors(operation="is_paused"):
            return await self._live.is_paused()

    async def sleep(self, level: int, mode: str = "abort") -> None:
        """Level 0 pauses scheduling; 1 also offloads weights and drops the KV cache; 2 drops weights too."""
        if level not in (0, 1, 2):
            raise EngineRequestError(f"level: {level} is not 0, 1 or 2")
        pause_mode = _pause_mode(mode)
        if level > 0 and not self.sleep_mode:
            raise EngineStateError(
                f"level: sleep level {level} frees device memory, which needs the engine started "
                "with --enable-sleep-mode (CUDA only); level 0 pauses scheduling alone"
            )
        with engine_errors(operation="sleep"):
            await self._live.sleep(level, pause_mode)

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        with engine_errors(operation="wake_up"):
            return await self._live.wake_up(tags)

    async def is_sleeping(self) -> bool:
        with engine_errors(operation="is_sleeping"):
            return await self._live.is_sleeping()

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_external: bool = False) -> bool:
        with engine_errors(operation="reset_prefix_cache"):
            return await self._live.reset_prefix_cache(reset_running_requests, reset_external)

    async def reset_encoder_cache(self) -> None:
        with engine_errors(operation="reset_encoder_cache"):
            await self._live.reset_encoder_cache()

    async def forget_old_weights(self) -> None:
        """Drop everything the previous weights computed: every prefix-cache block (running requests are
        preempted and recompute their KV when they next run) and every cached vision embedding."""
        with engine_errors(operation="dropping the caches computed by the previous weights"):
            await self._live.reset_prefix_cache(reset_running_requests=True)
            await self._live.reset_encoder_cache()

    def check_checkpoint(self, path: str) -> None:
        """Raise EngineRequestError unless `path` can replace the running weights (blocking file reads)."""
        check_replaceable(self.checkpoint, path)

    async def reload_weights(self, path: str) -> None:
        """Load `path` (checked with `check_checkpoint` first) in place. On a failure the previous
        checkpoint is loaded back, so the engine never serves half of each."""
        previous = self.checkpoint
        try:
            with engine_errors(operation=f"reloading weights from {path}"):
                await self._live.collective_rpc(
                    "reload_weights", kwargs={"weights_path": path, "is_checkpoint_format": True}
                )
            self.checkpoint = path
        except EngineOperationError as failure:
            logger.error("refit from %s failed (%s); loading %s back", path, failure, previous)
            try:
                with engine_errors(operation=f"restoring weights from {previous}"):
                    await self._live.collective_rpc(
                        "reload_weights", kwargs={"weights_path": previous, "is_checkpoint_format": True}
                    )
            except EngineOperationError as restore_failure:
                raise EngineOperationError(
                    f"{failure}; restoring {previous} failed too ({restore_failure}): "
                    "the weights are in an unknown state, restart this worker"
                ) from failure
            raise EngineOperationError(f"{failure}; the previous weights ({previous}) were loaded back") from failure
        finally:
            await self.forget_old_weights()

    def require_weight_transfer(self) -> None:
        if not self.weight_transfer:
            raise EngineStateError(
                "weight transfer is not configured: start the engine with vLLM's "
                '--weight-transfer-config \'{"backend": "nccl"}\''
            )

    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        self.require_weight_transfer()
        with engine_errors(operation="init_weight_transfer_engine"):
            await self._live.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    async def start_weight_update(self) -> None:
        self.require_weight_transfer()
        with engine_errors(operation="start_weight_update"):
            await self._live.start_weight_update()

    async def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.require_weight_transfer()
        with engine_errors(operation="update_weights"):
            await self._live.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    async def finish_weight_update(self, weight_version: str | None = None) -> None:
        """Commit a transfer's weights, drop what the old ones computed, then label them."""
        self.require_weight_transfer()
        try:
            with engine_errors(operation="finish_weight_update"):
                await self._live.finish_weight_update()
        finally:
            await self.forget_old_weights()
        if weight_version is not None:
            await self.set_weight_version(weight_version)

    async def weight_version(self) -> str:
        with engine_errors(operation="get_weight_version"):
            return await self._live.get_weight_version()

    async def set_weight_version(self, version: str) -> None:
        with engine_errors(operation="update_weight_version"):
            await self._live.update_weight_version(version)

    async def collective_rpc(
        self, method: str, args: tuple = (), kwargs: dict | None = None, timeout: float | None = None
    ) -> list:
        with engine_errors(operation=f"collective_rpc {method}"):
            return await self._live.collective_rpc(method, timeout=timeout, args=args, kwargs=kwargs)


def _pause_mode(mode: str) -> PauseMode:
    """`mode` as one of vLLM's pause modes, or EngineRequestError naming it."""
    for known in PAUSE_MODES:
        if mode == known:
            return known
    raise EngineRequestError(f"mode: {mode!r} is not one of {', '.join(PAUSE_MODES)}")
