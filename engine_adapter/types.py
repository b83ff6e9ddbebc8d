"""Plain data crossing the servicer/engine boundary; no vLLM or gRPC types here."""

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from engine_adapter.families import Family


@dataclass(frozen=True)
class Constraint:
    """A structured-output constraint, named as the wire names it (SamplingParams.constraint)."""

    kind: str  # json_schema, regex, grammar, structural_tag, json_object, choice
    value: str | tuple[str, ...] | bool


def _request(default=None):
    """A sampling option that shapes the request, not vLLM's SamplingParams."""
    return field(default=default, metadata={"sampling_params": False})


@dataclass(frozen=True)
class SamplingOptions:
    """What the client asked of the sampler: the one list of sampling fields.

    Every name is both the wire's (`SamplingParams` in the proto) and vLLM's
    (`vllm.SamplingParams`): the servicer fills fields by name from the request and the
    adapter passes them to vLLM by name, so a new field is added here and nowhere else.
    Defaults are vLLM's meaning of "unset"; bools are taken as the wire sends them.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop: tuple[str, ...] = ()  # stop strings: vLLM detokenizes the output to match them
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = False
    spaces_between_special_tokens: bool = False
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # top-k per output token; -1 = whole vocabulary
    prompt_logprobs: int | None = None
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    constraint: Constraint | None = _request()  # structured outputs
    grammar_from_first_token: bool = _request(False)  # the grammar applies from the first token


@dataclass(frozen=True)
class MediaItem:
    """One image or video: its patches (engine-ready dtype), its grid and where its embeddings go."""

    pixel_values: torch.Tensor | None  # [t*h*w patches, C*t_patch*p*p]; None: prompt KV comes from a prefill worker
    grid_thw: tuple[int, int, int]
    identity: str  # multimodal identifier: encoder-cache and prefix-cache key
    offset: int  # first prompt position of this item's placeholder range
    length: int  # number of prompt positions in the range
    is_embed: tuple[bool, ...] | None = None  # None = every position in the range is an embedding
    modality: str = "image"  # or "video"
    second_per_grid: float | None = None  # video: seconds per temporal grid step (M-RoPE time, frame stamps)


@dataclass(frozen=True)
class EngineRequest:
    """A validated request, ready for the engine: generation (with sampling) or embedding (without)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingOptions | None = None
    media: tuple[MediaItem, ...] = ()  # in prompt order
    data_parallel_rank: int | None = None  # None: vLLM balances across its ranks
    kv_transfer_params: dict | None = None  # for the engine's KV connector (prefill/decode disaggregation)
    stream: bool = True  # False: the caller wants the result only, and the engine sends just its final output
    trace_headers: dict[str, str] | None = None  # W3C traceparent/tracestate for vLLM's request span


@dataclass(frozen=True)
class Embedding:
    """The pooled embedding of one prompt."""

    values: tuple[float, ...]
    prompt_tokens: int


@dataclass(frozen=True)
class TopLogprobs:
    """Alternatives at one position, best first."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's logprob at one position, with the top-k alternatives."""

    token_id: int
    logprob: float | None  # None for the first prompt token
    top: TopLogprobs | None


@dataclass(frozen=True)
class SampleDelta:
    """New tokens of one of the n samples since the previous step."""

    index: int
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None  # "stop", "length", "abort" once finished
    stop_token_id: int | None = None  # the stop token that ended it (not EOS)
    stop_str: str | None = None  # the stop string that ended it
    # On the final delta: (weight version, first output index, end) spans, when the engine labels its weights.
    weight_versions: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class StepOutput:
    """One engine step for one request: deltas for the samples that moved."""

    prompt_tokens: int
    cached_tokens: int
    samples: tuple[SampleDelta, ...]
    prompt_logprobs: tuple[TokenLogprob, ...] | None  # only on the first step that has them
    finished: bool
    kv_transfer_params: dict | None = None  # the KV connector's hand-off for the other leg (final step only)


@dataclass(frozen=True)
class ModelInfo:
    """What the engine knows about its model and its own configuration, for GetModelInfo / GetServerInfo."""

    model_path: str
    served_model_name: str
    runner: str  # vLLM's runner: "generate" (Generate) or "pooling" (Embed)
    model_type: str
    architectures: tuple[str, ...]
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int
    pad_token_id: int
    image_token_id: int | None
    video_token_id: int | None
    family: Family | None  # what the servicer must know of the model's family (None: text only)
    vision_start_token_id: int | None
    vision_end_token_id: int | None
    spatial_merge_size: int
    patch_dim: int  # values per pixel-patch row: channels * temporal_patch * patch^2
    supports_vision: bool
    mm_item_limits: dict[str, int]
    device_normalizes_pixels: bool
    dtype: torch.dtype
    kv_cache_dtype: str
    block_size: int
    max_num_seqs: int
    data_parallel_size: int
    max_logprobs: int
    tokenizer_path: str  # the folder the engine's tokenizer files are in
    truncation_side: str  # "left" or "right": where truncate_prompt_tokens cuts
    default_sampling: dict[str, float | int]  # the model's generation-config defaults (vLLM's names)
    reasoning_parser: str  # "" when the engine runs none
    constrained_decoding_start: str  # where a grammar starts: "first_token" or "after_reasoning"
    mm_encoder_budget: int  # the most embeddings one media item may have (0: not multimodal)
    attention_backend: str  # "" when vLLM picks it
    kv_connector: str  # "" without --kv-transfer-config
    kv_role: str
    kv_engine_id: str
    kv_consumer_without_pixels: bool  # NIXL consumer failing (not recomputing) a failed load: media may come pixel-less
    profiler: str  # "" without --profiler-config
    kv_events: bool  # --kv-events-config enables vLLM's ZMQ publisher
    log_requests: bool  # vLLM's --enable-log-requests: one log line per request


@dataclass(frozen=True)
class KvBlock:
    """One KV block the engine stored: its hash (int64), its tokens as the engine ran them, and the other
    inputs of its hash (text, bytes, numbers, or (identifier, offset) of a multimodal item in it)."""

    block_hash: int
    token_ids: tuple[int, ...]
    extra_keys: tuple = ()


@dataclass(frozen=True)
class KvStored:
    blocks: tuple[KvBlock, ...]
    parent_hash: int | None
    block_size: int
    medium: str | None  # "GPU", "CPU", "STORAGE"
    lora_name: str | None
    group_idx: int | None
    spec_kind: str | None  # "full_attention", "sliding_window", ...


@dataclass(frozen=True)
class KvRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None
    group_idx: int | None


@dataclass(frozen=True)
class KvCleared:
    pass


@dataclass(frozen=True)
class KvBatch:
    """One publisher message: the KV events of one scheduler step on one data-parallel rank."""

    sequence: int  # the publisher's own, per rank, from 0
    timestamp: float
    rank: int
    events: tuple[KvStored | KvRemoved | KvCleared, ...]


@dataclass
class RankLoad:
    """One data-parallel rank's latest scheduler figures (updated after each of its steps)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0


@dataclass
class EngineStats:
    """Latest scheduler figures per data-parallel rank, and running totals."""

    ranks: dict[int, RankLoad] = field(default_factory=lambda: {0: RankLoad()})
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    mm_items_published: int = 0  # items written to the ranks' shared-memory ring
    mm_items_reused: int = 0  # items whose identity was already there (no bytes sent)
    # Prompt tokens by where their KV came from (vLLM's sources): computed here, this engine's prefix
    # cache, or a KV connector (a prefill worker's transfer).
    prompt_tokens_by_source: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("local_compute", "local_cache_hit", "external_kv_transfer"), 0)
    )

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


PauseMode = Literal["abort", "wait", "keep"]  # vLLM's: end in-flight requests, let them finish, freeze them
PAUSE_MODES: tuple[PauseMode, ...] = ("abort", "wait", "keep")


class EngineControlClient(Protocol):
    """RL control of the engine (engine_adapter.control.EngineControl is the vLLM one)."""

    @property
    def checkpoint(self) -> str: ...  # the folder the running weights were last loaded from
    @property
    def sleep_mode(self) -> bool: ...  # --enable-sleep-mode: sleep levels 1 and 2 are available
    @property
    def weight_transfer(self) -> bool: ...  # --weight-transfer-config: NCCL weight transfer is available

    async def pause(self, mode: str = "abort", clear_cache: bool = False) -> None: ...
    async def resume(self) -> None: ...
    async def is_paused(self) -> bool: ...
    async def sleep(self, level: int, mode: str = "abort") -> None: ...
    async def wake_up(self, tags: list[str] | None = None) -> bool: ...
    async def is_sleeping(self) -> bool: ...
    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_external: bool = False) -> bool: ...
    async def reset_encoder_cache(self) -> None: ...
    async def forget_old_weights(self) -> None: ...
    def check_checkpoint(self, path: str) -> None: ...
    async def reload_weights(self, path: str) -> None: ...
    def require_weight_transfer(self) -> None: ...  # raises EngineStateError when not configured
    async def init_weight_transfer(self, init_info: dict) -> None: ...
    async def start_weight_update(self) -> None: ...
    async def update_weights(self, update_info: dict | list[dict]) -> None: ...
    async def finish_weight_update(self, weight_version: str | None = None) -> None: ...
    async def weight_version(self) -> str: ...
    async def set_weight_version(self, version: str) -> None: ...
    async def collective_rpc(
        self, method: str, args: tuple = (), kwargs: dict | None = None, timeout: float | None = None
    ) -> list: ...


class EngineClient(Protocol):
    """What the servicer needs from an engine (engine_adapter.engine.Engine is the vLLM one).

    Its data members are read-only here (properties), so an engine may hold narrower types (Engine's
    `control` is an EngineControl)."""

    @property
    def info(self) -> ModelInfo: ...
    @property
    def control(self) -> EngineControlClient: ...
    @property
    def stats(self) -> EngineStats: ...
    @property
    def version(self) -> str: ...
    @property
    def ordinary_token_ids(self) -> tuple[int, ...]: ...  # stand-ins for image pad values
    @property
    def traces(self) -> bool: ...  # vLLM exports request traces (--otlp-traces-endpoint)

    def prepare_pixels(self, pixels: torch.Tensor) -> torch.Tensor: ...  # as the vision tower takes them (blocking)
    def stamp_ids(self, seconds: float) -> Sequence[int]: ...  # a video frame's timestamp as token ids
    # `on_admitted` is called once the request is handed to vLLM (our preparation done).
    def generate(
        self, request: EngineRequest, on_admitted: Callable[[], None] | None = None
    ) -> AsyncIterator[StepOutput]: ...
    async def embed(self, request: EngineRequest) -> Embedding: ...
    async def abort(self, request_ids: Sequence[str]) -> None: ...
    async def reset_prefix_cache(self) -> bool: ...
    async def reset_prefix_cache_by_rank(self) -> list[bool]: ...
    def num_unfinished_requests(self) -> int: ...
    @property
    def is_healthy(self) -> bool: ...
    async def check_health(self) -> None: ...
    async def start_profile(self, start_step: int | None = None, num_steps: int | None = None) -> None: ...
    async def stop_profile(self) -> None: ...
    def start_kv_events(self) -> None: ...
    # A bad cursor raises at the call, not at the first read.
    def kv_events(self, start: int) -> AsyncGenerator[KvBatch, None]: ...
    def shutdown(self) -> None: ...
