"""EngineRequest -> the engine input vLLM takes without running any HF processor.

Text-only prompts are plain token inputs. Each image or video becomes one
`MultiModalKwargsItem`: its tensors named as the family says (engine_adapter/families),
laid out by the model's own field config, keyed by its identity, with its placeholder
range given explicitly: vLLM computes M-RoPE positions and writes embeddings from
these ranges, never by searching the ids.
"""

import torch
from transformers import BatchFeature
from vllm.inputs import mm_input, tokens_input
from vllm.multimodal.inputs import MultiModalKwargsItems, PlaceholderRange

from engine_adapter.errors import EngineRequestError
from engine_adapter.families import Family, family_for
from engine_adapter.types import EngineRequest, MediaItem


def _item(mm_processor, family: Family, media: MediaItem):
    names = family.fields(media.modality)
    tensors = BatchFeature({names.grid: torch.tensor([media.grid_thw], dtype=torch.int64)})
    if media.pixel_values is not None:  # else metadata only, as vLLM's own disaggregated front end sends it
        tensors[names.pixels] = media.pixel_values
    if media.second_per_grid is not None and names.seconds:
        tensors[names.seconds] = torch.tensor([media.second_per_grid], dtype=torch.float32)
    # The model's declared layout (flat pixel rows by grid size, batched grid, ...): a private method, the only
    # place vLLM 0.32 keeps it (pinned by tests/test_vllm_private.py).
    fields = mm_processor._get_mm_fields_config(tensors, {})
    return MultiModalKwargsItems.from_hf_inputs(tensors, fields)[media.modality][0]


def build_engine_input(request: EngineRequest, mm_processor, publish=None, family: Family | None = None):
    """The dict `AsyncLLM.generate` accepts for pre-tokenized, pre-processed input.

    `publish(hashes, items)` (both by modality), when given, may replace items in place by
    handles to a copy the engine's ranks already share (vLLM's shared-memory object store).
    `family` defaults to the processor's model's.
    """
    ids = list(request.prompt_ids)
    if not request.media:
        return tokens_input(ids)
    if family is None:
        hf = mm_processor.info.get_hf_config()
        family = family_for(hf.architectures or (), hf.model_type)
        if family is None:  # the servicer refuses such media first (ModelInfo.supports_vision)
            raise EngineRequestError(f"mm_inputs: model type {hf.model_type} takes no images or videos")
    kwargs, hashes, placeholders = {}, {}, {}
    for modality in dict.fromkeys(m.modality for m in request.media):
        media = [m for m in request.media if m.modality == modality]
        kwargs[modality] = [_item(mm_processor, family, m) for m in media]
        hashes[modality] = [m.identity for m in media]
        placeholders[modality] = [
            PlaceholderRange(
                offset=m.offset,
                length=m.length,
                is_embed=None if m.is_embed is None else torch.tensor(m.is_embed, dtype=torch.bool),
            )
            for m in media
        ]
    if publish is not None:
        publish(hashes, kwargs)
    return mm_input(
        prompt_token_ids=ids,
        mm_kwargs=MultiModalKwargsItems(kwargs),
        mm_hashes=hashes,
        mm_placeholders=placeholders,
    )
