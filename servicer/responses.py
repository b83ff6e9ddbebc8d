"""StepOutputs -> GenerateResponse messages, streaming or accumulated.

Streaming mirrors SMG's vLLM worker: one chunk per sample per step (deltas, with
`completion_tokens` the delta's count and prompt logprobs on a sample's first
chunk), then right after a sample's last chunk a `complete` carrying that last
delta and the finish reason. Non-streaming sends one `complete` per sample, in
index order, with everything accumulated.
"""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from engine_adapter.types import SampleDelta, StepOutput, TokenLogprob
from vlm_proto import vllm_engine_pb2 as pb


def output_logprobs(entries: Sequence[TokenLogprob] | None) -> pb.OutputLogProbs | None:
    if entries is None:
        return None
    return pb.OutputLogProbs(
        token_logprobs=[_sampled_logprob(e) for e in entries],
        token_ids=[e.token_id for e in entries],
        top_logprobs=[pb.TopLogProbs(values=e.top.logprobs, token_ids=e.top.token_ids) for e in entries if e.top],
    )


def _sampled_logprob(entry: TokenLogprob) -> float:
    # vLLM returns every sampled token's own logprob; only a prompt's first token goes without one.
    assert entry.logprob is not None
    return entry.logprob


def input_logprobs(entries: Sequence[TokenLogprob] | None, prompt_ids: Sequence[int]) -> pb.InputLogProbs | None:
    """Prompt logprobs reported against the caller's own ids (never the engine's pad values)."""
    if entries is None:
        return None
    return pb.InputLogProbs(
        token_logprobs=[
            pb.InputTokenLogProb(value=e.logprob) if e.logprob is not None else pb.InputTokenLogProb() for e in entries
        ],
        token_ids=list(prompt_ids),
        top_logprobs=[
            pb.TopLogProbs(values=e.top.logprobs, token_ids=e.top.token_ids) if e.top else pb.TopLogProbs()
            for e in entries
        ],
    )


def _complete(
    delta_ids, step: StepOutput, sample: SampleDelta, logprobs, prompt_lps, completion_tokens
) -> pb.GenerateResponse:
    complete = pb.GenerateComplete(
        output_ids=delta_ids,
        finish_reason=sample.finish_reason or "stop",
        prompt_tokens=step.prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=step.cached_tokens,
        index=sample.index,
    )
    if logprobs is not None:
        complete.output_logprobs.CopyFrom(logprobs)
    if prompt_lps is not None:
        complete.input_logprobs.CopyFrom(prompt_lps)
    if sample.stop_token_id is not None:
        complete.matched_token_id = sample.stop_token_id
    elif sample.stop_str is not None:
        complete.matched_stop_str = sample.stop_str
    for version, start, end in sample.weight_versions:
        complete.weight_versions.add(version=version, start=start, end=end)
    if step.kv_transfer_params is not None:
        complete.kv_transfer_params_json = json.dumps(step.kv_transfer_params)
    return pb.GenerateResponse(complete=complete)


@dataclass
class StreamEncoder:
    """Turns each step into chunks (and completes for finished samples)."""

    prompt_ids: Sequence[int]
    _prompt_lps: pb.InputLogProbs | None = None
    _seen: set[int] = field(default_factory=set)

    def encode(self, step: StepOutput) -> Iterator[pb.GenerateResponse]:
        if step.prompt_logprobs is not None:
            self._prompt_lps = input_logprobs(step.prompt_logprobs, self.prompt_ids)
        for sample in step.samples:
            first = sample.index not in self._seen
            self._seen.add(sample.index)
            chunk = pb.GenerateStreamChunk(
                token_ids=sample.token_ids,
                prompt_tokens=step.prompt_tokens,
                completion_tokens=len(sample.token_ids),
                cached_tokens=step.cached_tokens,
                index=sample.index,
            )
            lps = output_logprobs(sample.logprobs)
            if lps is not None:
                chunk.output_logprobs.CopyFrom(lps)
            if first and self._prompt_lps is not None:
                chunk.input_logprobs.CopyFrom(self._prompt_lps)
            yield pb.GenerateResponse(chunk=chunk)
            if sample.finish_reason is not None:
                yield _complete(sample.token_ids, step, sample, lps, None, len(sample.token_ids))


@dataclass
class _Sample:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    last: SampleDelta | None = None


@dataclass
class Accumulator:
    """Collects deltas per sample; `completes()` once the request has finished."""

    prompt_ids: Sequence[int]
    _samples: dict[int, _Sample] = field(default_factory=dict)
    _prompt_lps: pb.InputLogProbs | None = None
    _last_step: StepOutput | None = None

    def add(self, step: StepOutput) -> None:
        self._last_step = step
        if step.prompt_logprobs is not None:
            self._prompt_lps = input_logprobs(step.prompt_logprobs, self.prompt_ids)
        for delta in step.samples:
            sample = self._samples.setdefault(delta.index, _Sample())
            sample.token_ids.extend(delta.token_ids)
            if delta.logprobs is not None:
                sample.logprobs = (sample.logprobs or []) + list(delta.logprobs)
            sample.last = delta

    def completes(self) -> Iterator[pb.GenerateResponse]:
        step = self._last_step
        for index in sorted(self._samples):
            sample = self._samples[index]
            assert step is not None and sample.last is not None  # add() sets both for every sample it makes
            yield _complete(
                sample.token_ids,
                step,
                sample.last,
                output_logprobs(sample.logprobs),
                self._prompt_lps,
                len(sample.token_ids),
            )
