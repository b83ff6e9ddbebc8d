"""SamplingOptions -> vllm.SamplingParams, field by field by name (types.SamplingOptions is the list)."""

import dataclasses
from typing import Any

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from engine_adapter.types import Constraint, SamplingOptions

# The wire's constraint names -> StructuredOutputsParams' keyword for the same thing.
_STRUCTURED = {
    "json_schema": "json",
    "regex": "regex",
    "grammar": "grammar",
    "structural_tag": "structural_tag",
    "json_object": "json_object",
    "choice": "choice",
}
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingOptions) if f.metadata.get("sampling_params", True))


def structured_outputs(constraint: Constraint | None) -> StructuredOutputsParams | None:
    if constraint is None:
        return None
    # The keyword is picked at run time, so its value's type (which follows from the kind) cannot be checked here.
    value: Any = list(constraint.value) if isinstance(constraint.value, tuple) else constraint.value
    return StructuredOutputsParams(**{_STRUCTURED[constraint.kind]: value})


def _vllm_value(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value) or None
    return value


def to_sampling_params(options: SamplingOptions, final_only: bool = False) -> SamplingParams:
    """vLLM's own SamplingParams (which validates every value; errors name the parameter).

    Output text is detokenized only when stop strings need it to match; the ids are never
    changed by it. A stream takes DELTA outputs; a caller that wants the result only takes the
    final output (FINAL_ONLY), so the front end handles one output per request, not one per token.
    """
    return SamplingParams(
        **{name: _vllm_value(getattr(options, name)) for name in SAMPLING_FIELDS},
        structured_outputs=structured_outputs(options.constraint),
        detokenize=bool(options.stop),
        output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA,
    )
