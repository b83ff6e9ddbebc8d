"""The VllmEngine RPCs. Thin: validation lives in requests.py, the engine behind engine_adapter.

Every RPC goes through `guard` (`guard_stream`), the single place an exception becomes a gRPC status
(servicer/guards.py); admission and per-request bookkeeping are servicer/inflight.py. Cancellation is handled
once, in Generate: a client that cancels or disconnects cancels the handler task, which closes the engine
stream, which aborts the request in the engine.
"""

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import grpc

from engine_adapter.types import EngineClient, RankLoad
from servicer import shm, tokenizer_bundle
from servicer.config import ServerConfig
from servicer.errors import FailedPrecondition, InvalidArgument, Unimplemented
from servicer.guards import guard, guard_stream
from servicer.image_store import ImageStore
from servicer.inflight import Admission, InFlight
from servicer.kv_events import MediaTokens, kv_event_batch
from servicer.load_records import LoadRecords, with_load_records
from servicer.metrics import Metrics
from servicer.multimodal import media_identity
from servicer.requests import RequestDecoder
from servicer.responses import Accumulator, StreamEncoder
from servicer.rl import RlController
from servicer.tracing import Tracing
from vlm_proto import common_pb2
from vlm_proto import vllm_engine_pb2 as pb
from vlm_proto import vllm_engine_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


def _with_identity(response: pb.GenerateResponse, identity: pb.MediaIdentity | None) -> pb.GenerateResponse:
    if identity is not None and response.HasField("complete"):
        response.complete.media_identity.CopyFrom(identity)
    return response


class VllmEngineServicer(pb_grpc.VllmEngineServicer):
    """The RPCs over one engine; server.py builds what they use and hands it in."""

    def __init__(
        self,
        engine: EngineClient,
        config: ServerConfig,
        metrics: Metrics,
        decoder: RequestDecoder,
        image_store: ImageStore,
        decode_pool: ThreadPoolExecutor,
        rl: RlController,
        media_tokens: MediaTokens | None,
    ):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.decoder = decoder
        self.image_store = image_store
        self.rl = rl
        # The caller's ids of each image's range, for KV events (only needed where the engine ran pad values).
        self.media_tokens = media_tokens
        self._decode_pool = decode_pool
        self.admission = Admission(metrics, config.max_concurrent_requests, engine.info.log_requests)
        self.started = time.monotonic()  # uptime: a clock that NTP steps cannot move
        self.last_receive = 0.0  # wall-clock time of the last Generate or Embed call; 0 until one arrives
        self.shm_namespace_id = shm.namespace_id()
        self._tokenizer_bundle: tokenizer_bundle.Bundle | None = None
        self.tracing = Tracing() if engine.traces else None  # None: no tracing work at all

    @property
    def in_flight(self) -> dict[str, InFlight]:
        return self.admission.in_flight

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    @guard_stream
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        self.last_receive = time.time()
        request_id = request.request_id or uuid.uuid4().hex
        state = InFlight(request_id, time.monotonic(), request.stream)
        trace = state.trace = (
            self.tracing.start(context.invocation_metadata(), request_id) if self.tracing is not None else None
        )
        with self.admission.track(state, context):
            if self.engine.info.runner != "generate":
                raise FailedPrecondition(
                    f"Generate: this engine runs vLLM's {self.engine.info.runner} runner "
                    "(--runner pooling): it serves Embed; start one with --runner generate "
                    "to generate"
                )
            if trace is not None:
                trace.step("vlm.decode")
            decoded = await self._decode(self.decoder.decode, request, request_id)
            engine_request = decoded.engine
            if trace is not None:
                trace.step("vlm.admission")
                engine_request = dataclasses.replace(engine_request, trace_headers=trace.headers())
            state.prompt_tokens = len(engine_request.prompt_ids)
            await self._send_identities(decoded, context)
            # Prompt logprobs are reported against the prompt as the engine ran it (placeholders
            # expanded), with the caller's own token ids (never the pad values).
            encoder = StreamEncoder(decoded.prompt_ids) if request.stream else None
            accumulated = Accumulator(decoded.prompt_ids) if not request.stream else None
            # A prefill leg's images, by identity, for its decode leg (which then needs no pixels).
            identity = (
                media_identity(decoded.prompt_ids, engine_request.media)
                if engine_request.kv_transfer_params is not None and engine_request.media
                else None
            )
            admitted = functools.partial(trace.step, "vlm.generation") if trace is not None else None
            async for step in self.engine.generate(engine_request, admitted):
                if trace is not None:
                    trace.output()
                state.cached_tokens = step.cached_tokens
                state.completion_tokens += sum(len(s.token_ids) for s in step.samples)
                state.finish_reason = next(
                    (s.finish_reason for s in step.samples if s.finish_reason), state.finish_reason
                )
                if encoder is not None:
                    for response in encoder.encode(step):
                        state.first_response = state.first_response or time.monotonic()
                        yield _with_identity(response, identity)
                else:
                    assert accumulated is not None  # one of the two, by request.stream
                    accumulated.add(step)
            if accumulated is not None:
                for response in accumulated.completes():
                    state.first_response = state.first_response or time.monotonic()
                    yield _with_identity(response, identity)

    @guard
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        self.last_receive = time.time()
        state = InFlight(request.request_id or uuid.uuid4().hex, time.monotonic(), False)
        with self.admission.track(state, context):
            if self.engine.info.runner != "pooling":
                raise FailedPrecondition(
                    "Embed: this engine runs vLLM's generate runner; start it with --runner "
                    "pooling (and --convert embed for a generative checkpoint) to serve embeddings"
                )
            decoded = await self._decode(self.decoder.decode_embed, request, state.request_id)
            state.prompt_tokens = len(decoded.engine.prompt_ids)
            await self._send_identities(decoded, context)
            embedding = await self.engine.embed(decoded.engine)
            state.first_response, state.finish_reason = time.monotonic(), "pooled"
            return pb.EmbedResponse(
                embedding=embedding.values, prompt_tokens=embedding.prompt_tokens, embedding_dim=len(embedding.values)
            )

    @guard_stream
    async def SubscribeKvEvents(self, request: common_pb2.SubscribeKvEventsRequest, context):
        """vLLM's KV-cache events as they happen (after `start_sequence_number`, from the relay's history)."""
        if not self.engine.info.kv_events:  # SMG stops subscribing on UNIMPLEMENTED; it retries anything else
            raise Unimplemented(
                "KV cache events are off: start the engine with --kv-events-config "
                '\'{"enable_kv_cache_events": true, "publisher": "zmq"}\''
            )
        event_ids = itertools.count(1).__next__
        events = self.engine.kv_events(request.start_sequence_number)  # a bad cursor fails before the headers
        # Headers now, not with the first batch: SMG takes a subscription that stays silent for 2 s for an
        # unreachable worker and stops routing to it, and an idle engine publishes nothing.
        await context.send_initial_metadata(())
        records = LoadRecords(self._load_record, request.load_records_before_first_batch)
        async with contextlib.aclosing(events):
            batches = (kv_event_batch(batch, self.media_tokens, event_ids) async for batch in events)
            async with contextlib.aclosing(with_load_records(batches, records)) as stream:
                async for batch in stream:
                    yield batch

    def _queues(self, load: RankLoad) -> tuple[int, int]:
        """(running, waiting) of a rank. Figures are recorded after each engine step; once nothing is
        unfinished the last step's are stale, and so are they while the engine is paused (it takes no step):
        then every unfinished request waits (one rank; data-parallel ranks keep their last figures)."""
        unfinished = self.engine.num_unfinished_requests()
        if self.rl.paused and len(self.engine.stats.ranks) == 1:
            return 0, unfinished
        return (load.num_running, load.num_waiting) if unfinished else (0, 0)

    def _load_record(self, rank: int | None) -> common_pb2.EngineLoad | None:
        """A rank's load as GetLoads reports it (rank 0 for None), for the KV-event stream."""
        ranks = self.engine.stats.ranks
        if (load := ranks.get(rank or 0)) is None:
            return None
        running, waiting = self._queues(load)
        record = common_pb2.EngineLoad(
            running_requests=running,
            waiting_requests=waiting,
            token_usage=load.kv_cache_usage,
            max_running_requests=self.engine.info.max_num_seqs,
            cache_hit_rate=self.engine.stats.prefix_cache_hit_rate,
        )
        if self.rl.paused:  # the RL control plane paused the engine: these wait for its resume
            record.queues.paused = waiting
        if len(ranks) == 1:  # requests are not attributed to data-parallel ranks here
            # Prefill work in hand: prompts handed to the engine without output yet (a non-streamed
            # request's only output is its last).
            record.prefill_pending_tokens = sum(
                s.prompt_tokens for s in self.in_flight.values() if s.first_response is None
            )
        return record

    async def _decode(self, decode, request, request_id: str):
        """Validate and convert: off the event loop where tensors come (decode, hashing and casts block),
        inline for ids alone (cheaper than the thread hop)."""
        with self.metrics.decode.time():
            if request.HasField("mm_inputs") or request.extra_mm_inputs:
                decoded = await asyncio.get_running_loop().run_in_executor(
                    self._decode_pool, decode, request, request_id
                )
            else:
                decoded = decode(request, request_id)
        for transport, nbytes in decoded.mm_bytes.items():
            self.metrics.mm_bytes.labels(transport).inc(nbytes)
        if self.media_tokens is not None:
            for item in decoded.engine.media:
                self.media_tokens.remember(item.identity, decoded.prompt_ids[item.offset : item.offset + item.length])
        return decoded

    @staticmethod
    async def _send_identities(decoded, context: grpc.aio.ServicerContext) -> None:
        """The identities a caller may later send instead of pixels (reference by hash)."""
        if decoded.engine.media:
            await context.send_initial_metadata(
                (("vlm-mm-identities", ",".join(i.identity for i in decoded.engine.media)),)
            )

    @guard
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        known = [rid for rid in request.request_ids if rid in self.in_flight]
        if known:
            await self.engine.abort(known)
        logger.info("abort requested for %s (%d in flight)", list(request.request_ids), len(known))
        return pb.AbortResponse()

    @guard
    async def HealthCheck(self, request, context) -> pb.HealthCheckResponse:
        if not self.engine.is_healthy:
            return pb.HealthCheckResponse(healthy=False, message="engine is not running")
        await self.engine.check_health()
        return pb.HealthCheckResponse(healthy=True, message="ok")

    @guard
    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        info = self.engine.info
        return pb.GetModelInfoResponse(
            model_path=info.model_path,
            is_generation=info.runner == "generate",
            max_context_length=info.max_model_len,
            vocab_size=info.vocab_size,
            supports_vision=info.supports_vision,
            served_model_name=info.served_model_name,
            tokenizer_path=info.tokenizer_path,
            model_type=info.model_type,
            architectures=info.architectures,
            eos_token_ids=info.eos_token_ids,
            pad_token_id=info.pad_token_id,
            bos_token_id=info.bos_token_id,
            max_req_input_len=info.max_model_len - 1,
            default_sampling_params_json=json.dumps(info.default_sampling, sort_keys=True)
            if info.default_sampling
            else "",
        )

    @guard
    async def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        info = self.engine.info
        store = self.image_store.stats()
        return pb.GetServerInfoResponse(
            is_paused=await self.rl.is_paused(),
            weight_version=await self.engine.control.weight_version(),
            checkpoint_path=self.engine.control.checkpoint,
            active_requests=len(self.in_flight),
            last_receive_timestamp=self.last_receive,
            uptime_seconds=time.monotonic() - self.started,
            server_type="vlm-servicer",
            data_parallel_size=info.data_parallel_size,
            shm_namespace_id=self.shm_namespace_id,
            kv_cache_dtype=info.kv_cache_dtype,
            block_size=info.block_size,
            model_dtype=str(info.dtype),
            mm_device_do_normalize=info.supports_vision,  # raw uint8 pixels welcome (see pixels.py)
            max_num_seqs=info.max_num_seqs,
            mm_item_limits=",".join(f"{m}={n}" for m, n in sorted(info.mm_item_limits.items())),
            multimodal_encoder_dtype=str(info.dtype).removeprefix("torch."),
            kv_connector=info.kv_connector,
            kv_role=info.kv_role,
            kv_engine_id=info.kv_engine_id,
            attention_backend=info.attention_backend,
            pairing_protocol=self.config.pairing_protocol,
            engine_reasoning_parser=info.reasoning_parser,
            constrained_decoding_start=info.constrained_decoding_start,
            mm_encoder_budget=info.mm_encoder_budget,
            prefix_cache_hit_rate=self.engine.stats.prefix_cache_hit_rate,
            mm_store_items=store.items,
            mm_store_bytes=store.bytes,
            mm_store_capacity_bytes=store.capacity_bytes,
            mm_store_hits=store.hits,
            mm_store_misses=store.misses,
            mm_items_published=self.engine.stats.mm_items_published,
            mm_items_reused=self.engine.stats.mm_items_reused,
        )

    @guard
    async def GetLoads(self, request, context) -> pb.GetLoadsResponse:
        ranks = self.engine.stats.ranks
        if request.HasField("dp_rank") and request.dp_rank not in ranks:
            raise InvalidArgument(f"dp_rank: {request.dp_rank} is not one of the engine's ranks {sorted(ranks)}")
        loads = []
        for rank, load in sorted(ranks.items()):
            if request.HasField("dp_rank") and rank != request.dp_rank:
                continue
            running, waiting = self._queues(load)
            loads.append(
                pb.SchedulerLoad(
                    dp_rank=rank,
                    num_running_reqs=running,
                    num_waiting_reqs=waiting,
                    num_total_reqs=running + waiting,
                    token_usage=load.kv_cache_usage,
                    cache_hit_rate=self.engine.stats.prefix_cache_hit_rate,
                    max_running_requests=self.engine.info.max_num_seqs,
                )
            )
        return pb.GetLoadsResponse(
            timestamp=datetime.now(UTC).isoformat(),
            version=self.engine.version,
            dp_rank_count=len(loads),
            loads=loads,
        )

    @guard_stream
    async def GetTokenizer(self, request: common_pb2.GetTokenizerRequest, context):
        """The engine's tokenizer files, zipped (built once), in 64 KiB chunks; the digest on the last."""
        if self._tokenizer_bundle is None:
            path = self.engine.info.tokenizer_path
            try:
                self._tokenizer_bundle = await asyncio.to_thread(tokenizer_bundle.build, path)
            except FileNotFoundError as exc:
                raise FailedPrecondition(f"the engine's tokenizer is not a local folder of files: {exc}") from exc
            logger.info(
                "tokenizer bundle: %d bytes, sha256 %s, files %s",
                len(self._tokenizer_bundle.data),
                self._tokenizer_bundle.sha256,
                ", ".join(self._tokenizer_bundle.names),
            )
        for data, digest in self._tokenizer_bundle.chunks():
            yield common_pb2.GetTokenizerChunk(data=data, sha256=digest)

    @guard
    async def StartProfile(self, request: common_pb2.StartProfileRequest, context) -> common_pb2.ProfileResponse:
        # The trace directory and what is recorded are the engine's launch configuration (--profiler-config).
        fixed = [name for name in ("output_dir", "with_stack", "record_shapes") if request.HasField(name)]
        fixed += ["activities"] * bool(request.activities) + ["profile_by_stage"] * request.profile_by_stage
        if fixed:
            raise InvalidArgument(f"{', '.join(fixed)}: set by the engine's --profiler-config at launch, not per call")
        for name in ("start_step", "num_steps"):
            if request.HasField(name) and getattr(request, name) < 0:
                raise InvalidArgument(f"{name}: {getattr(request, name)} is negative")
        await self.engine.start_profile(
            request.start_step if request.HasField("start_step") else None,
            request.num_steps if request.HasField("num_steps") else None,
        )
        return common_pb2.ProfileResponse(success=True, message="profiling started")

    @guard
    async def StopProfile(self, request: common_pb2.StopProfileRequest, context) -> common_pb2.ProfileResponse:
        await self.engine.stop_profile()
        return common_pb2.ProfileResponse(success=True, message="profiling stopped; traces written")

    @guard
    async def FlushCache(self, request: common_pb2.FlushCacheRequest, context) -> common_pb2.FlushCacheResponse:
        """Every data-parallel rank's prefix cache, retried within `timeout_s` while requests hold blocks;
        the message names the ranks that could not be flushed."""
        deadline = time.monotonic() + max(request.timeout_s, 0.0)
        while True:
            flushed = await self.engine.reset_prefix_cache_by_rank()
            ranks = ", ".join(str(rank) for rank in range(len(flushed)))
            if all(flushed):
                return common_pb2.FlushCacheResponse(success=True, message=f"prefix cache flushed on rank(s) {ranks}")
            if time.monotonic() >= deadline:
                held = ", ".join(str(rank) for rank, ok in enumerate(flushed) if not ok)
                return common_pb2.FlushCacheResponse(
                    success=False,
                    message=f"rank(s) {held} of {ranks}: requests still hold cache blocks; retry or pass timeout_s",
                )
            await asyncio.sleep(0.05)
