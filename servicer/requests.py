"""GenerateRequest / EmbedRequest -> EngineRequest: every check a client can fail, each naming its field."""

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from engine_adapter.types import Constraint, EngineRequest, MediaItem, ModelInfo, SamplingOptions
from servicer.errors import FailedPrecondition, InvalidArgument
from servicer.multimodal import MODALITIES, ImagePolicy, decode_media, engine_prompt_ids
from servicer.placeholders import expanded, shifted
from servicer.tensors import payload_nbytes
from vlm_proto import vllm_engine_pb2 as pb


def _refuse_unsupported(request: pb.GenerateRequest) -> None:
    """Options of the contract this servicer does not serve are refused by name, never ignored."""
    unsupported = {
        "text": request.WhichOneof("input") == "text",
        "media_refs": request.HasField("media_refs"),
    }
    named = [name for name, present in unsupported.items() if present]
    if named:
        raise InvalidArgument(
            f"{', '.join(named)}: not supported by this servicer (it takes token ids and preprocessed media)"
        )


def _truncate(
    ids: list[int], media: list[MediaItem], sp: pb.SamplingParams, info: ModelInfo
) -> tuple[list[int], list[MediaItem]]:
    """`truncate_prompt_tokens` as vLLM applies it: keep N tokens (-1: the context less one), from the
    side the model's tokenizer truncates; an image or video is kept whole or the request refused."""
    if not sp.HasField("truncate_prompt_tokens"):
        return ids, media
    keep = sp.truncate_prompt_tokens
    if keep == -1:
        keep = info.max_model_len - 1
    if not 1 <= keep <= info.max_model_len:
        raise InvalidArgument(
            f"sampling_params.truncate_prompt_tokens: {sp.truncate_prompt_tokens} is outside "
            f"[1, {info.max_model_len}] (or -1 for the context length)"
        )
    if keep >= len(ids):
        return ids, media
    start = len(ids) - keep if info.truncation_side == "left" else 0
    for m in media:
        if m.offset < start or m.offset + m.length > start + keep:
            raise InvalidArgument(
                f"sampling_params.truncate_prompt_tokens: keeping {keep} of {len(ids)} prompt tokens "
                f"({info.truncation_side} truncation) would cut the {m.modality} at positions "
                f"[{m.offset}, {m.offset + m.length})"
            )
    return ids[start : start + keep], [dataclasses.replace(m, offset=m.offset - start) for m in media]


def _rank(request: pb.GenerateRequest, info: ModelInfo) -> int | None:
    """The data-parallel rank the caller pinned the request to (None: vLLM balances)."""
    if not request.HasField("data_parallel_rank"):
        return None
    if not 0 <= request.data_parallel_rank < info.data_parallel_size:
        raise InvalidArgument(
            f"data_parallel_rank: {request.data_parallel_rank} is outside [0, "
            f"{info.data_parallel_size}) (the engine's --data-parallel-size)"
        )
    return request.data_parallel_rank


def _kv_transfer(request: pb.GenerateRequest, info: ModelInfo) -> dict | None:
    """The KV connector's parameters, passed to vLLM as they are (the JSON form wins over the legacy one)."""
    if request.HasField("kv_transfer_params_json"):
        where = "kv_transfer_params_json"
        try:
            params = json.loads(request.kv_transfer_params_json)
        except ValueError as exc:
            raise InvalidArgument(f"{where}: not JSON ({exc})") from exc
        if not isinstance(params, dict):
            raise InvalidArgument(f"{where}: a JSON object is expected, not {type(params).__name__}")
    elif request.HasField("kv_transfer_params"):
        where = "kv_transfer_params"
        params = {
            "remote_host": request.kv_transfer_params.remote_host,
            "remote_port": request.kv_transfer_params.remote_port,
        }
    else:
        return None
    if not info.kv_connector:
        raise FailedPrecondition(
            f"{where}: this worker has no KV connector; start its engine with vLLM's "
            '--kv-transfer-config (e.g. \'{"kv_connector": "NixlConnector", '
            '"kv_role": "kv_both"}\')'
        )
    return params


def _kv_from_prefill(params: dict | None, info: ModelInfo) -> bool:
    """A decode leg: its engine loads the prompt's KV from a prefill worker, so its media need no pixels
    (SMG sends them pixel-less). Not where a failed load would be recomputed: that needs the pixels."""
    return bool(params and params.get("do_remote_prefill")) and info.kv_consumer_without_pixels


def _check_ids(ids: list[int], info: ModelInfo) -> None:
    if not ids:
        raise InvalidArgument("tokenized.input_ids: empty prompt")
    if max(ids) >= info.vocab_size:  # at C speed; find which only when one is
        bad = next(i for i, t in enumerate(ids) if t >= info.vocab_size)
        raise InvalidArgument(
            f"tokenized.input_ids[{bad}]: token id {ids[bad]} is outside the vocabulary (size {info.vocab_size})"
        )


def _check_length(ids: list[int], info: ModelInfo, room: int = 1) -> None:
    """The prompt fits the context with `room` tokens to spare (1 to generate, 0 to pool)."""
    if len(ids) + room > info.max_model_len:
        raise InvalidArgument(
            f"tokenized.input_ids: prompt of {len(ids)} tokens "
            f"{'leaves no room in' if room else 'exceeds'} the context of {info.max_model_len}"
        )


# SamplingOptions' fields that the wire carries under the same name, with their descriptors (looked up once).
_WIRE_SAMPLING = tuple(
    (f.name, pb.SamplingParams.DESCRIPTOR.fields_by_name[f.name])
    for f in dataclasses.fields(SamplingOptions)
    if f.name in pb.SamplingParams.DESCRIPTOR.fields_by_name
)


def _given(sp: pb.SamplingParams) -> dict:
    """The request's sampling fields that SamplingOptions knows, by name, where the client set them.

    Fields with presence count when set; other numbers count when non-zero (proto3's zero is
    "unset": top_p 0 means 1.0); bools are taken as sent; lists and maps when non-empty.
    """
    given = {}
    for name, wire in _WIRE_SAMPLING:
        value = getattr(sp, name)
        if wire.message_type is not None and wire.message_type.GetOptions().map_entry:
            value = dict(value)
        elif wire.is_repeated:
            value = tuple(value)
        if sp.HasField(name) if wire.has_presence else (value or wire.type == wire.TYPE_BOOL):
            given[name] = value
    return given


def _constraint(sp: pb.SamplingParams) -> Constraint | None:
    kind = sp.WhichOneof("constraint")
    if kind is None:
        return None
    value = getattr(sp, kind)
    return Constraint(kind, tuple(value.choices) if kind == "choice" else value)


def sampling_options(sp: pb.SamplingParams, prompt_len: int, info: ModelInfo, max_n: int) -> SamplingOptions:
    """The request's sampling fields with our limits enforced; vLLM's SamplingParams checks the values."""
    given = _given(sp)
    room = info.max_model_len - prompt_len
    max_tokens = given.pop("max_tokens", room)
    if max_tokens > room:
        raise InvalidArgument(
            f"sampling_params.max_tokens: {max_tokens} exceeds the {room} tokens left after a "
            f"{prompt_len}-token prompt (context {info.max_model_len}, --max-model-len)"
        )
    if max_tokens < 1:
        raise InvalidArgument("sampling_params.max_tokens: must be at least 1")
    n = given.get("n", 1)
    if n > max_n:
        raise InvalidArgument(f"sampling_params.n: {n} exceeds this servicer's limit of {max_n} (--max-n)")
    for name in ("logprobs", "prompt_logprobs"):
        if name in given and not -1 <= given[name] <= info.max_logprobs:
            raise InvalidArgument(
                f"sampling_params.{name}: {given[name]} is outside [-1, {info.max_logprobs}] (engine --max-logprobs)"
            )
    if sp.min_tokens > max_tokens:
        raise InvalidArgument(f"sampling_params.min_tokens: {sp.min_tokens} exceeds max_tokens {max_tokens}")
    bad_stop = [t for t in sp.stop_token_ids if t >= info.vocab_size]
    if bad_stop:
        raise InvalidArgument(
            f"sampling_params.stop_token_ids: {bad_stop} outside the vocabulary (size {info.vocab_size})"
        )
    return SamplingOptions(max_tokens=max_tokens, constraint=_constraint(sp), **given)


def _tensors(batches: list[pb.MultimodalInputs]):
    for mm in batches:
        if mm.HasField("pixel_values"):
            yield mm.pixel_values
        yield from mm.model_specific_tensors.values()


def _batches(request: pb.GenerateRequest | pb.EmbedRequest) -> list[tuple[str, pb.MultimodalInputs]]:
    """(field name, batch): `mm_inputs`, then `extra_mm_inputs[i]`; at most one batch per modality."""
    batches = ([("mm_inputs", request.mm_inputs)] if request.HasField("mm_inputs") else []) + [
        (f"extra_mm_inputs[{i}]", mm) for i, mm in enumerate(request.extra_mm_inputs)
    ]
    if request.extra_mm_inputs and not request.HasField("mm_inputs"):
        raise InvalidArgument("extra_mm_inputs: given without mm_inputs (the first batch goes there)")
    seen: dict[str, str] = {}
    for where, mm in batches:
        kind = MODALITIES.get(mm.modality)
        if kind is not None and kind.name in seen:
            raise InvalidArgument(
                f"{where}.modality: a second {kind.name} batch (the first is {seen[kind.name]}); "
                f"send all {kind.name}s in one batch"
            )
        if kind is not None:
            seen[kind.name] = where
    return batches


@dataclass(frozen=True)
class DecodedRequest:
    engine: EngineRequest  # what the engine runs (pad values in place)
    prompt_ids: tuple[int, ...]  # the same prompt with the caller's ids, for reporting
    mm_bytes: dict[str, int] = field(default_factory=dict)  # tensor bytes this request carried, by transport


@dataclass(frozen=True)
class RequestDecoder:
    """Everything request validation needs, built once per server."""

    info: ModelInfo
    max_n: int
    prepare_pixels: Callable[[torch.Tensor], torch.Tensor]
    images: ImagePolicy
    stamp_ids: Callable[[float], Sequence[int]]  # a video frame's timestamp as token ids (Family.stamp_text)

    def decode(self, request: pb.GenerateRequest, request_id: str) -> DecodedRequest:
        """Validate and convert; blocking (tensor decode, hashing, casts): call off the event loop."""
        _refuse_unsupported(request)
        if request.WhichOneof("input") != "tokenized":
            raise InvalidArgument("tokenized: missing (this servicer takes token ids)")
        rank = _rank(request, self.info)
        kv_transfer = _kv_transfer(request, self.info)
        ids, media, batches = self._prompt(request, _kv_from_prefill(kv_transfer, self.info))
        ids, media = _truncate(ids, media, request.sampling_params, self.info)
        _check_length(ids, self.info)
        sampling = sampling_options(request.sampling_params, len(ids), self.info, self.max_n)
        return self._decoded(request_id, ids, media, sampling, batches, rank, kv_transfer, request.stream)

    def decode_embed(self, request: pb.EmbedRequest, request_id: str) -> DecodedRequest:
        """An EmbedRequest through the same checks (no sampling); blocking like `decode`."""
        if not request.HasField("tokenized"):
            raise InvalidArgument("tokenized: missing (this servicer takes token ids)")
        ids, media, batches = self._prompt(request)
        _check_length(ids, self.info, room=0)  # a pooled prompt generates nothing
        return self._decoded(request_id, ids, media, None, batches)

    def _prompt(
        self, request, kv_from_prefill: bool = False
    ) -> tuple[list[int], list[MediaItem], list[tuple[str, pb.MultimodalInputs]]]:
        """The ids with every image and video placed and expanded, for a Generate or an Embed request."""
        ids = list(request.tokenized.input_ids)
        _check_ids(ids, self.info)
        batches = _batches(request)
        if batches and not self.info.supports_vision:
            raise InvalidArgument(f"mm_inputs: model {self.info.served_model_name} takes no images or videos")
        media: list[MediaItem] = []
        inserts: list[tuple[int, tuple[int, ...]]] = []
        for where, mm in batches:  # every batch placed on the ids as sent, then all expanded at once
            items, added = decode_media(
                mm, where, ids, self.info, self.prepare_pixels, self.images, self.stamp_ids, kv_from_prefill
            )
            media, inserts = media + items, inserts + added
        ids = expanded(ids, inserts)
        media = sorted(
            (dataclasses.replace(m, offset=shifted(m.offset, inserts)) for m in media), key=lambda m: m.offset
        )
        for a, b in zip(media, media[1:]):  # within a batch ranges are already checked; across batches here
            if a.offset + a.length > b.offset:
                raise InvalidArgument(
                    f"mm_inputs.mm_placeholders: the {a.modality} at {a.offset} (length {a.length}) "
                    f"overlaps the {b.modality} at {b.offset}"
                )
        return ids, media, batches

    def _decoded(
        self,
        request_id: str,
        ids: list[int],
        media: list[MediaItem],
        sampling: SamplingOptions | None,
        batches: list[tuple[str, pb.MultimodalInputs]],
        rank: int | None = None,
        kv_transfer: dict | None = None,
        stream: bool = True,
    ) -> DecodedRequest:
        engine_ids = engine_prompt_ids(ids, media, self.images, self.info)
        engine = EngineRequest(
            request_id=request_id,
            prompt_ids=tuple(engine_ids),
            sampling=sampling,
            media=tuple(media),
            data_parallel_rank=rank,
            kv_transfer_params=kv_transfer,
            stream=stream,
        )
        mm_bytes: dict[str, int] = {}
        for t in _tensors([mm for _, mm in batches]):
            transport = t.WhichOneof("payload")
            mm_bytes[transport] = mm_bytes.get(transport, 0) + payload_nbytes(t)
        return DecodedRequest(engine=engine, prompt_ids=tuple(ids), mm_bytes=mm_bytes)
