"""The vLLM engine behind the servicer: start, generate, abort, inspect, stop.

The servicer talks to this class only through engine_adapter.types, so it never
sees a vLLM object.
"""

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

import torch
import vllm
from vllm import PoolingParams, SamplingParams
from vllm.config import VllmConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerBase

from engine_adapter.control import EngineControl
from engine_adapter.errors import (
    EngineCapacityError,
    EngineDeadError,
    EngineRequestError,
    EngineRetryableError,
    EngineStateError,
)
from engine_adapter.info import model_info, ordinary_token_ids, pixel_norm
from engine_adapter.kv_events import KvEventRelay
from engine_adapter.outputs import to_step_output
from engine_adapter.pixels import prepare_pixels
from engine_adapter.prompt import build_engine_input
from engine_adapter.sampling import structured_outputs, to_sampling_params
from engine_adapter.shm_ring import claim_ring_name, hold_id, release_holds
from engine_adapter.types import (
    Constraint,
    Embedding,
    EngineRequest,
    EngineStats,
    KvBatch,
    ModelInfo,
    RankLoad,
    SamplingOptions,
    StepOutput,
)
from engine_adapter.vllm_errors import engine_errors
from engine_adapter.vllm_plugins import SHM_RECHECK_ENV

logger = logging.getLogger(__name__)


def parse_engine_args(model: str, argv: Sequence[str], mm_shm_gb: float | None = None) -> AsyncEngineArgs:
    """vLLM's own engine flags, parsed by vLLM's own parser (raises SystemExit on bad flags).

    `mm_shm_gb` sizes the shared-memory ring images are published into when
    `--mm-processor-cache-type shm` is on (it is vLLM's `mm_processor_cache_gb` there; None keeps
    vLLM's, and the servicer's config refuses both).
    """
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vlm-servicer serve"))
    namespace = parser.parse_args(["--model", model, *argv])
    args = AsyncEngineArgs.from_cli_args(namespace)
    if mm_shm_gb is not None and args.mm_processor_cache_type == "shm":
        args.mm_processor_cache_gb = mm_shm_gb
    return args


class _StatsRecorder(StatLoggerBase):
    """Keeps one data-parallel rank's latest scheduler figures in an EngineStats the servicer can read
    (vLLM makes one logger per rank; the factory's index is the rank)."""

    def __init__(self, stats: EngineStats, rank: int):
        self.stats = stats
        self.load = stats.ranks.setdefault(rank, RankLoad())

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if iteration_stats is not None:
            by_source = self.stats.prompt_tokens_by_source
            for source in by_source:
                by_source[source] += iteration_stats.prompt_token_stats.get_by_source(source)
        if scheduler_stats is None:
            return
        self.load.num_running = scheduler_stats.num_running_reqs
        self.load.num_waiting = scheduler_stats.num_waiting_reqs
        self.load.kv_cache_usage = scheduler_stats.kv_cache_usage
        prefix = scheduler_stats.prefix_cache_stats
        self.stats.prefix_cache_queries += prefix.queries
        self.stats.prefix_cache_hits += prefix.hits

    def log_engine_initialized(self):
        pass


class _UnexportedPrometheus(PrometheusStatLogger):
    """Stands in for vLLM's Prometheus stat logger, which this servicer never exports (it has its own
    /metrics): observing per-token histograms, it cost about a fifth of the front end's CPU per short
    request. vLLM adds its own unless it is given one of this class (StatLoggerManager), and has no other
    switch short of dropping all stats, which GetLoads needs. Tested by test_metrics.py."""

    def record(self, *args, **kwargs) -> None:
        pass


class Engine:
    """One AsyncLLM and what the servicer needs from it."""

    def __init__(self, llm: AsyncLLM, stats: EngineStats):
        self._llm: AsyncLLM | None = llm  # None once shut down
        self.stats = stats
        self._tokenizer = llm.get_tokenizer()
        self.info: ModelInfo = model_info(llm.vllm_config, self._tokenizer, llm.log_requests)
        self._norm = pixel_norm(llm.vllm_config)
        self._mm_processor = llm.renderer.get_mm_processor() if self.info.supports_vision else None
        self.version = vllm.__version__
        self._kv_relay: KvEventRelay | None = None
        self.control = EngineControl(llm, llm.vllm_config.model_config.model)
        self.ordinary_token_ids = ordinary_token_ids(self._tokenizer, self.info.vocab_size)
        # vLLM's --otlp-traces-endpoint: vLLM has installed the process's tracer provider and takes trace headers.
        self.traces = llm.observability_config.otlp_traces_endpoint is not None
        mm_config = llm.vllm_config.model_config.multimodal_config
        # With vLLM's shared-memory processor cache, each image is written once per identity
        # into a ring every rank maps, and requests carry only its address.
        self.shares_mm_by_shm = False
        if mm_config is not None and mm_config.mm_processor_cache_type == "shm":
            self.shares_mm_by_shm = True
            self._shm_bytes = int(mm_config.mm_processor_cache_gb * 1024**3)
            self._shm_item_bytes = mm_config.mm_shm_cache_max_object_size_mb * 1024**2

    @classmethod
    def start(cls, args: AsyncEngineArgs) -> "Engine":
        """Build the engine (blocking: ~30 s on CPU). Call under `if __name__ == "__main__"`."""
        stats = EngineStats()
        # Read by our vLLM plugin in the engine's processes (vllm_plugins.py); a value the user set wins.
        os.environ.setdefault(SHM_RECHECK_ENV, "20")
        if args.mm_processor_cache_type == "shm":
            logger.info(
                "multimodal items shared with the engine's ranks through shared memory ring %s", claim_ring_name()
            )

        def recorder(config: VllmConfig, index: int = 0) -> StatLoggerBase:
            return _StatsRecorder(stats, index)

        llm = AsyncLLM.from_engine_args(args, stat_loggers=[recorder, _UnexportedPrometheus])
        return cls(llm, stats)

    @property
    def _live(self) -> AsyncLLM:
        """The AsyncLLM, until shutdown() lets it go."""
        if self._llm is None:
            raise EngineDeadError("the engine has been shut down")
        return self._llm

    def stamp_ids(self, seconds: float) -> tuple[int, ...]:
        """A video frame's timestamp as the family's processor writes it, encoded on its own (vLLM does the
        same, so stamps never merge with neighbouring text)."""
        family = self.info.family
        assert family is not None  # only videos have frames, and a model without a family refuses them
        return tuple(self._tokenizer.encode(family.stamp_text(seconds), add_special_tokens=False))

    def prepare_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels as the vision tower takes them (CPU-bound: call off the event loop)."""
        return prepare_pixels(pixels, self._norm, self.info.device_normalizes_pixels, self.info.dtype)

    async def generate(
        self, request: EngineRequest, on_admitted: Callable[[], None] | None = None
    ) -> AsyncIterator[StepOutput]:
        """Run one request, yielding per-step deltas; `on_admitted()` once it is handed to vLLM.

        Cancelling the consumer aborts the request in the engine (vLLM's generate does
        it on CancelledError/GeneratorExit); vLLM's errors surface as our own types.
        """
        options = request.sampling
        assert options is not None  # a generation request carries its sampling options (embed()'s does not)
        with engine_errors():
            sampling = to_sampling_params(options, final_only=not request.stream)
        queue = self._live.scheduler_config.max_num_queued_reqs
        if queue is not None and options.n > queue:  # vLLM's admission would refuse it as "busy" forever
            raise EngineRequestError(
                f"sampling_params.n: {options.n} exceeds the engine's --max-num-queued-reqs {queue}"
            )
        if request.kv_transfer_params is not None:  # where vLLM's connectors read it
            sampling.extra_args = {**(sampling.extra_args or {}), "kv_transfer_params": request.kv_transfer_params}
        self._check_constraint(options.constraint)
        # A gateway that shaped the grammar to start at the first token says so; vLLM would
        # otherwise hold it back until its reasoning parser has seen the thought's end.
        reasoning_ended = True if options.grammar_from_first_token and options.constraint else None
        first = True
        if on_admitted is not None:
            on_admitted()
        with engine_errors():
            engine_input = self._engine_input(request)
            async for output in self._live.generate(
                engine_input,
                sampling,
                request.request_id,
                reasoning_ended=reasoning_ended,
                data_parallel_rank=request.data_parallel_rank,
                trace_headers=request.trace_headers,
            ):
                step = to_step_output(output, options.logprobs, options.prompt_logprobs, first)
                _raise_if_failed(step, options)
                yield step
                first = False

    async def embed(self, request: EngineRequest) -> Embedding:
        """Pool one prompt with the model's pooler (vLLM's `--runner pooling`); cancelling aborts it."""
        final = None
        with engine_errors():
            engine_input = self._engine_input(request)
            async for output in self._live.encode(engine_input, PoolingParams(task="embed"), request.request_id):
                final = output
        if final is None or not final.finished:
            raise EngineRetryableError("the engine ended the embedding request without a result")
        return Embedding(tuple(final.outputs.data.float().tolist()), len(final.prompt_token_ids))

    def _engine_input(self, request: EngineRequest):
        return build_engine_input(
            request, self._mm_processor, self._publish if self.shares_mm_by_shm else None, self.info.family
        )

    def _check_constraint(self, constraint: Constraint | None) -> None:
        """The backend's verdict on the constraint alone, so its errors name the constraint's field
        (vLLM's structured-output checks name no parameter)."""
        if constraint is None:
            return
        config = self._live.vllm_config
        with engine_errors(parameter=constraint.kind):
            probe = SamplingParams(structured_outputs=structured_outputs(constraint))
            probe.verify(
                config.model_config, config.speculative_config, config.structured_outputs_config, self._tokenizer
            )

    def _publish(self, hashes: dict[str, list[str]], items: dict[str, list]) -> None:
        """Write each new identity's item into the ring once; items become addresses.

        All or nothing, and bounded: vLLM's own injection falls back to sending an item that
        does not fit inline, which would make the ring's bound meaningless, so we refuse the
        request instead (EngineRequestError when it can never fit, EngineCapacityError when the
        ring is full of items in flight) and undo the holds taken on its other items.
        """
        cache = self._live.renderer.mm_processor_cache
        assert cache is not None  # vLLM's renderer has its shm sender cache whenever we publish (shares_mm_by_shm)
        slots = [(modality, i, h) for modality, hs in hashes.items() for i, h in enumerate(hs)]
        sizes = [_item_nbytes(items[m][i]) for m, i, h in slots if not cache.is_cached_item(h)]
        if sizes and (max(sizes) > self._shm_item_bytes or sum(sizes) > self._shm_bytes):  # can never fit
            raise EngineRequestError(
                f"mm_inputs: images and videos need {sum(sizes)} bytes of shared memory (largest {max(sizes)}); the "
                f"ring holds {self._shm_bytes} (--mm-shm-gb or --mm-processor-cache-gb) and {self._shm_item_bytes} "
                "per item "
                "(--mm-shm-cache-max-object-size-mb)"
            )
        held: list[int] = []  # each item written or found takes a writer hold, released as the ranks read it
        for modality, i, h in slots:
            items[modality][i], _ = cache.get_and_update_item((items[modality][i], []), h)
            if not cache.is_cached_item(h):  # the ring is full of items the ranks have not read yet
                release_holds(cache, held)
                raise EngineCapacityError(
                    f"the shared-memory ring ({self._shm_bytes} bytes, --mm-shm-gb or --mm-processor-cache-gb) is "
                    "full of items in flight; retry shortly"
                )
            held.append(hold_id(items[modality][i]))
        self._live.renderer.update_mm_cache_stats()
        self.stats.mm_items_published += len(sizes)
        self.stats.mm_items_reused += len(slots) - len(sizes)

    async def start_profile(self, start_step: int | None = None, num_steps: int | None = None) -> None:
        """Start vLLM's profiler (as configured by --profiler-config) on every rank."""
        self._require_profiler()
        with engine_errors():
            await self._live.start_profile(delay_iterations=start_step, max_iterations=num_steps)

    async def stop_profile(self) -> None:
        """Stop the profiler and write its traces (under the configured directory)."""
        self._require_profiler()
        with engine_errors():
            await self._live.stop_profile()

    def _require_profiler(self) -> None:
        if not self.info.profiler:
            raise EngineStateError(
                "no profiler configured: start the servicer with vLLM's --profiler-config, "
                'e.g. --profiler-config \'{"profiler": "torch", "torch_profiler_dir": "/tmp/trace"}\''
            )

    def start_kv_events(self) -> None:
        """Start relaying the engine's KV events (with --kv-events-config; call on the serving event loop)."""
        if self.info.kv_events and self._kv_relay is None:
            with engine_errors():
                self._kv_relay = KvEventRelay(self._live.get_kv_event_sources())

    def kv_events(self, start: int) -> AsyncGenerator[KvBatch, None]:
        """The engine's KV-cache events after `start` (0: from now on), every data-parallel rank's."""
        if self._kv_relay is None:
            raise EngineStateError("KV events are not relayed: no --kv-events-config, or start_kv_events() not called")
        return self._kv_relay.subscribe(start)

    async def abort(self, request_ids: Sequence[str]) -> None:
        with engine_errors():
            await self._live.abort(list(request_ids))

    async def reset_prefix_cache(self) -> bool:
        with engine_errors():
            return await self._live.reset_prefix_cache()

    async def reset_prefix_cache_by_rank(self) -> list[bool]:
        """Each data-parallel rank's own result, in rank order. vLLM's reset_prefix_cache asks every rank
        the same way and answers their AND; this keeps which rank still holds blocks."""
        with engine_errors():  # private to AsyncLLM (vLLM 0.32): pinned by tests/test_vllm_private.py
            return list(await self._live.engine_core.call_utility_all_async("reset_prefix_cache", False, False))

    def num_unfinished_requests(self) -> int:
        """Requests the engine's front end still tracks (0 once everything ended or aborted)."""
        return self._live.get_num_unfinished_requests()

    @property
    def is_healthy(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def check_health(self) -> None:
        with engine_errors(fatal=True):  # any failure here means the engine core is gone
            await self._live.check_health()

    def shutdown(self) -> None:
        """Stop the engine core processes. Idempotent."""
        if self._kv_relay is not None:
            self._kv_relay.close()
            self._kv_relay = None
        if self._llm is not None:
            self._llm.shutdown()
            # Drop the last references now: AsyncLLM.__del__ shuts down again, which fails
            # if it only runs at interpreter exit, after vLLM's modules are torn down.
            self.control.detach()
            self._llm = None


def _raise_if_failed(step: StepOutput, options: SamplingOptions) -> None:
    """vLLM ends a request it could not run with finish reason "error" (a grammar that would not compile,
    a KV transfer that failed, ...); that is an error status, never an answer."""
    failed = [s for s in step.samples if s.finish_reason == "error"]
    if not failed:
        return
    if options.constraint is not None and not any(s.token_ids for s in failed):
        raise EngineRequestError(
            f"sampling_params.{options.constraint.kind}: the structured-output backend could not compile it"
        )
    raise EngineRetryableError("the engine failed this request")


def _item_nbytes(item) -> int:
    """Tensor bytes of one MultiModalKwargsItem (what the ring stores, less a little metadata)."""
    return sum(elem.data.nbytes for elem in item.values() if hasattr(elem.data, "nbytes"))


async def start_engine(args: AsyncEngineArgs) -> Engine:
    """Start the engine in a worker thread so the caller's event loop keeps running."""
    return await asyncio.to_thread(Engine.start, args)
