"""EngineRequest -> the engine input vLLM takes without running any HF processor.

Text-only prompts are plain token inputs. With images, each image becomes one
`MultiModalKwargsItem` laid out by the model's own field config (so the same code
serves every family vLLM registers), keyed by the image's identity, with its
placeholder range given explicitly: vLLM computes M-RoPE positions and writes
embeddings from these ranges, never by searching the ids.
"""

import torch
from transformers import BatchFeature
from vllm.inputs import mm_input, tokens_input
from vllm.multimodal.inputs import MultiModalKwargsItems, PlaceholderRange

from engine_adapter.types import EngineRequest, ImageInput


def _image_item(mm_processor, image: ImageInput):
    tensors = BatchFeature(
        {"pixel_values": image.pixel_values, "image_grid_thw": torch.tensor([image.grid_thw], dtype=torch.int64)}
    )
    # The model's declared layout (flat pixel rows by grid size, batched grid, ...).
    fields = mm_processor._get_mm_fields_config(tensors, {})
    items = MultiModalKwargsItems.from_hf_inputs(tensors, fields)
    return items["image"][0]


def build_engine_input(request: EngineRequest, mm_processor, publish=None):
    """The dict `AsyncLLM.generate` accepts for pre-tokenized, pre-processed input.

    `publish(hashes, items)`, when given, may replace items in place by handles to a copy
    the engine's ranks already share (vLLM's shared-memory object store).
    """
    ids = list(request.prompt_ids)
    if not request.images:
        return tokens_input(ids)
    items = [_image_item(mm_processor, image) for image in request.images]
    hashes = [image.identity for image in request.images]
    if publish is not None:
        publish(hashes, items)
    placeholders = [
        PlaceholderRange(
            offset=image.offset,
            length=image.length,
            is_embed=None if image.is_embed is None else torch.tensor(image.is_embed, dtype=torch.bool),
        )
        for image in request.images
    ]
    return mm_input(
        prompt_token_ids=ids,
        mm_kwargs=MultiModalKwargsItems({"image": items}),
        mm_hashes={"image": hashes},
        mm_placeholders={"image": placeholders},
    )
