"""vLLM RequestOutput -> StepOutput (plain data for the servicer)."""

from collections.abc import Sequence

from vllm.logprobs import Logprob
from vllm.outputs import RequestOutput

from engine_adapter.types import SampleDelta, StepOutput, TokenLogprob, TopLogprobs


def _token_logprob(token_id: int, entry: dict[int, Logprob] | None, top_k: int) -> TokenLogprob:
    """The chosen token's logprob plus the `top_k` best alternatives by rank."""
    if entry is None:
        return TokenLogprob(token_id=token_id, logprob=None, top=None)
    chosen = entry.get(token_id)
    ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None)
    if top_k >= 0:
        ranked = [r for r in ranked if r[0] <= top_k]
    top = TopLogprobs(token_ids=tuple(r[1] for r in ranked), logprobs=tuple(r[2] for r in ranked))
    return TokenLogprob(token_id=token_id, logprob=chosen.logprob if chosen else None, top=top)


def _logprobs(token_ids: Sequence[int], entries, top_k: int | None) -> tuple[TokenLogprob, ...] | None:
    if top_k is None or entries is None:
        return None
    return tuple(_token_logprob(t, e, top_k) for t, e in zip(token_ids, entries))


def to_step_output(
    output: RequestOutput, logprobs_k: int | None, prompt_logprobs_k: int | None, first: bool
) -> StepOutput:
    """Map one RequestOutput (a DELTA step, or a FINAL_ONLY result); prompt logprobs come from the first."""
    samples = tuple(
        SampleDelta(
            index=c.index,
            token_ids=tuple(c.token_ids),
            logprobs=_logprobs(c.token_ids, c.logprobs, logprobs_k),
            finish_reason=c.finish_reason,
            stop_token_id=c.stop_reason if isinstance(c.stop_reason, int) else None,
            stop_str=c.stop_reason if isinstance(c.stop_reason, str) else None,
            weight_versions=tuple((w.version, w.start, w.end) for w in c.weight_versions or ()),
        )
        for c in output.outputs
    )
    prompt_ids = output.prompt_token_ids or ()
    prompt_lps = None
    if first and prompt_logprobs_k is not None and output.prompt_logprobs:
        prompt_lps = _logprobs(prompt_ids, output.prompt_logprobs, prompt_logprobs_k)
    return StepOutput(
        prompt_tokens=len(prompt_ids),
        cached_tokens=output.num_cached_tokens or 0,
        samples=samples,
        prompt_logprobs=prompt_lps,
        finished=output.finished,
        kv_transfer_params=output.kv_transfer_params if output.finished else None,
    )
