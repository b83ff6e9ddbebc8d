"""SamplingOptions -> vllm.SamplingParams."""

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from engine_adapter.types import SamplingOptions


def to_sampling_params(options: SamplingOptions) -> SamplingParams:
    """Token-in/token-out: no detokenization, so no stop strings (the servicer refuses them).

    Always DELTA outputs: streaming forwards them, non-streaming accumulates them, and an
    abort ends both the same way.
    """
    return SamplingParams(
        n=options.n,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        min_p=options.min_p,
        frequency_penalty=options.frequency_penalty,
        presence_penalty=options.presence_penalty,
        repetition_penalty=options.repetition_penalty,
        max_tokens=options.max_tokens,
        min_tokens=options.min_tokens,
        stop_token_ids=list(options.stop_token_ids),
        ignore_eos=options.ignore_eos,
        logprobs=options.logprobs,
        prompt_logprobs=options.prompt_logprobs,
        seed=options.seed,
        logit_bias=dict(options.logit_bias) or None,
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
    )
