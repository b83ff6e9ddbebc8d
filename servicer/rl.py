"""What an RL loop does to a worker between rollouts, independent of the protocol it arrives on:
pause, refit, resume, flush, label the weights.

One weight change at a time, and nothing else that moves the pause state while it runs: a `resume`
slipping in between a reload and the cache reset behind it would let queued requests run on KV
computed by the old weights. A refit on a running engine pauses it (`wait`: in-flight requests
finish, new ones queue) for the reload and resumes it after; inside a caller's own pause it leaves
the pause to the caller.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine_adapter.types import EngineClient
from servicer.errors import Aborted, FailedPrecondition, InvalidArgument

logger = logging.getLogger(__name__)
# What this worker's RL control plane does, in the labels SMG lists as a worker's capabilities (advisory: SMG
# refuses no call by them). Pause modes: vLLM's and SGLang's; updates: from disk and vLLM's NCCL transfer.
CAPABILITY_LABELS = {
    "rl.pause_modes": "abort,wait,keep,in_place,retract",
    "rl.update_from": "disk,distributed",
    "rl.flush_cache": "true",
    "rl.sleep_wake": "true",
    "rl.reports_weight_version": "true",
}


@dataclass
class RefitRecord:
    """The last completed weight change."""

    source: str  # a checkpoint folder, or "weight transfer"
    seconds: float  # wall time from the call to serving again (the reload and cache reset; drains included)
    version: str


class RlController:
    """Pause/refit/resume one engine; serializes weight changes against each other and against pause moves."""

    def __init__(self, engine: EngineClient):
        self._engine = engine
        self.control = engine.control
        self._changing = asyncio.Lock()  # held by a refit, or from start_weight_update to finish_weight_update
        self._transfer_paused_here = False
        self._transfer_open = False  # between start_weight_update and finish_weight_update
        self._transfer_started = 0.0
        self.paused = False  # our own record of the pause state, for synchronous readers (load records)
        self.refits = 0
        self.last_refit: RefitRecord | None = None
        self.on_weights_changed: list[Callable[[], None]] = []  # e.g. the gateway registration's wake()

    @contextlib.asynccontextmanager
    async def _exclusive(self, what: str):
        if self._changing.locked():
            raise Aborted(
                f"{what}: the weights are being changed (a refit or a weight transfer is running); "
                "retry when it has finished"
            )
        async with self._changing:
            yield

    def _refuse_while_changing(self, what: str) -> None:
        if self._changing.locked():
            raise Aborted(f"{what}: the weights are being changed; the pause state is held until that finishes")

    async def pause(self, mode: str, clear_cache: bool = False) -> None:
        self._refuse_while_changing("pause")
        await self.control.pause(mode, clear_cache=clear_cache)
        self.paused = True
        logger.info("paused (mode %s%s)", mode, ", caches cleared" if clear_cache else "")

    async def resume(self) -> None:
        self._refuse_while_changing("resume")
        await self.control.resume()
        self.paused = False
        logger.info("resumed")

    async def sleep(self, level: int, mode: str) -> None:
        self._refuse_while_changing("sleep")
        await self.control.sleep(level, mode)
        self.paused = True

    async def wake_up(self, tags: list[str] | None) -> bool:
        self._refuse_while_changing("wake_up")
        awake = await self.control.wake_up(tags)
        self.paused = await self.control.is_paused()
        return awake

    async def retract(self) -> None:
        """Free the KV of requests frozen by a pause (they recompute it when they run again): SGLang's retract."""
        await self.control.reset_prefix_cache(reset_running_requests=True)

    async def reset_prefix_cache(self, reset_running_requests: bool, reset_external: bool) -> bool:
        self._refuse_while_changing("reset_prefix_cache")
        return await self.control.reset_prefix_cache(reset_running_requests, reset_external)

    @property
    def weights_changing(self) -> bool:
        return self._changing.locked()

    @property
    def healthy(self) -> bool:
        return self._engine.is_healthy

    async def is_paused(self) -> bool:
        self.paused = await self.control.is_paused()
        return self.paused

    async def refit_from_disk(self, path: str, version: str | None, drain: str = "wait") -> RefitRecord:
        """Load `path` in place; after it nothing the old weights computed is served. The old weights stay
        (or are loaded back) when anything fails. On a running engine, in-flight requests first finish on the
        old weights (`drain` "wait") or end ("abort"); new ones wait for the new weights."""
        started = time.monotonic()
        async with self._exclusive("update_weights_from_disk"):
            await asyncio.to_thread(self.control.check_checkpoint, path)
            pause_here = not await self.control.is_paused()
            if pause_here:
                await self.control.pause(drain)
                self.paused = True
            try:
                await self.control.reload_weights(path)
                if version is not None:
                    await self.control.set_weight_version(version)
            finally:
                if pause_here:
                    await self.control.resume()
                    self.paused = False
            return self._refitted(path, started)

    def _refitted(self, source: str, started: float, version: str | None = None) -> RefitRecord:
        for hook in self.on_weights_changed:
            hook()
        self.refits += 1
        self.last_refit = RefitRecord(source, time.monotonic() - started, version or "")
        logger.info("refit %d from %s took %.2f s", self.refits, source, self.last_refit.seconds)
        return self.last_refit

    async def start_weight_update(self) -> None:
        """Open a weight-transfer session (vLLM's NCCL path): held, like a refit, until it finishes."""
        self.control.require_weight_transfer()  # before pausing anything
        if self._changing.locked():
            raise Aborted("start_weight_update: a refit or another weight transfer is running")
        await self._changing.acquire()
        self._transfer_open = True
        try:
            self._transfer_paused_here = not await self.control.is_paused()
            if self._transfer_paused_here:
                await self.control.pause("wait")
                self.paused = True
            await self.control.start_weight_update()
        except BaseException:
            await self._end_transfer()
            raise
        self._transfer_started = time.monotonic()

    async def update_weights(self, update_info) -> None:
        if not self._transfer_open:
            raise FailedPrecondition("update_weights: call start_weight_update first")
        await self.control.update_weights(update_info)

    async def finish_weight_update(self, version: str | None) -> RefitRecord:
        if not self._transfer_open:
            raise FailedPrecondition("finish_weight_update: no weight update was started (start_weight_update)")
        try:
            await self.control.finish_weight_update(version)
        finally:
            await self._end_transfer()
        return self._refitted("weight transfer", self._transfer_started, version)

    async def _end_transfer(self) -> None:
        try:
            if self._transfer_paused_here:
                await self.control.resume()
                self.paused = False
        finally:
            self._transfer_paused_here = self._transfer_open = False
            self._changing.release()

    async def flush(self) -> bool:
        """Drop the prefix cache and the encoder cache; False while requests still hold cache blocks."""
        self._refuse_while_changing("flush_cache")
        if self._engine.num_unfinished_requests() or not await self.control.reset_prefix_cache():
            return False
        await self.control.reset_encoder_cache()
        return True

    async def set_weight_version(self, version: str, abort_all_requests: bool = False) -> None:
        if not version:
            raise InvalidArgument("new_version: must be a non-empty string")
        if abort_all_requests:  # SGLang's option: nothing sampled under the old label finishes under the new one
            async with self._exclusive("update_weight_version"):
                was_paused = await self.control.is_paused()
                await self.control.pause("abort")
                await self.control.set_weight_version(version)
                if not was_paused:
                    await self.control.resume()
        else:
            await self.control.set_weight_version(version)
        for hook in self.on_weights_changed:
            hook()

    async def status(self) -> dict:
        """What get_server_info reports: the weights, the pause state and the last refit."""
        last = self.last_refit
        return {
            "model_path": self._engine.info.model_path,
            "checkpoint_path": self.control.checkpoint,
            "weight_version": await self.control.weight_version(),
            "is_paused": await self.is_paused(),
            "is_sleeping": await self.control.is_sleeping(),
            "weights_changing": self.weights_changing,
            "refits": self.refits,
            "last_refit": None
            if last is None
            else {"source": last.source, "seconds": round(last.seconds, 3), "version": last.version},
            "unfinished_requests": self._engine.num_unfinished_requests(),
            "sleep_mode": self.control.sleep_mode,
            "weight_transfer": self.control.weight_transfer,
        }
