"""MultimodalInputs (one image batch, as SMG sends it) -> per-image ImageInputs.

Honours SMG's layout keys: `flat_keys` names the per-image row counts of a flat
tensor, `batched_keys` the tensors whose first dimension is per image,
`keep_on_cpu_keys` tensors the engine keeps on the host (the model's own field
config already does so for grids). Blocking work (decode, hash, cast): run it off
the event loop.
"""

from collections.abc import Callable

import torch

from engine_adapter.types import ImageInput, ModelInfo
from servicer.errors import InvalidArgument, ResourceExhausted
from servicer.identity import image_identity
from servicer.placeholders import place_images
from servicer.tensors import decode_tensor
from vlm_proto import common_pb2, vllm_engine_pb2 as pb

GRID_KEY = "image_grid_thw"


def _grid(mm: pb.MultimodalInputs) -> torch.Tensor:
    if GRID_KEY not in mm.model_specific_tensors:
        raise InvalidArgument(f"mm_inputs.model_specific_tensors: missing '{GRID_KEY}'")
    field = f"mm_inputs.model_specific_tensors['{GRID_KEY}']"
    grid = decode_tensor(field, mm.model_specific_tensors[GRID_KEY])
    if grid.is_floating_point() or grid.dim() != 2 or grid.shape[1] != 3:
        raise InvalidArgument(f"{field}: must be an integer tensor of shape [num_images, 3], got {list(grid.shape)} {grid.dtype}")
    grid = grid.to(torch.int64)
    if grid.shape[0] == 0 or bool((grid <= 0).any()):
        raise InvalidArgument(f"{field}: needs at least one image and positive t, h, w")
    return grid


def _rows_per_image(mm: pb.MultimodalInputs, grid: torch.Tensor) -> list[int]:
    """Pixel rows per image, cross-checked against a gateway-sent sizes tensor when flat_keys names one."""
    rows = grid.prod(-1).tolist()
    for key, sizes_key in mm.flat_keys.items():
        if key != "pixel_values":
            raise InvalidArgument(f"mm_inputs.flat_keys: unexpected tensor '{key}' (only pixel_values is flat)")
        if sizes_key not in mm.model_specific_tensors:
            raise InvalidArgument(f"mm_inputs.flat_keys['pixel_values']: sizes tensor '{sizes_key}' is missing")
        sizes = decode_tensor(f"mm_inputs.model_specific_tensors['{sizes_key}']", mm.model_specific_tensors[sizes_key])
        if sizes.flatten().to(torch.int64).tolist() != rows:
            raise InvalidArgument(
                f"mm_inputs.model_specific_tensors['{sizes_key}']: {sizes.flatten().tolist()} rows per image, "
                f"but {GRID_KEY} implies {rows}"
            )
    return rows


def _check_layout_keys(mm: pb.MultimodalInputs, num_images: int) -> None:
    known = {"pixel_values", *mm.model_specific_tensors}
    allowed_extra = {GRID_KEY, *mm.flat_keys.values()}
    extra = sorted(set(mm.model_specific_tensors) - allowed_extra)
    if extra:
        raise InvalidArgument(f"mm_inputs.model_specific_tensors: unexpected {extra} (expected {GRID_KEY} and flat_keys sizes)")
    for key in list(mm.batched_keys) + list(mm.keep_on_cpu_keys):
        if key not in known:
            raise InvalidArgument(f"mm_inputs: layout key '{key}' names no tensor in this batch")
    for key in mm.batched_keys:
        if key == "pixel_values":
            raise InvalidArgument("mm_inputs.batched_keys: pixel_values is flat (rows per image), not batched")
        first = mm.model_specific_tensors[key].shape[:1]
        if list(first) != [num_images]:
            raise InvalidArgument(f"mm_inputs.batched_keys: '{key}' first dimension {list(first)} != {num_images} images")


def decode_images(
    mm: pb.MultimodalInputs,
    prompt_ids: list[int],
    info: ModelInfo,
    prepare_pixels: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[list[int], list[ImageInput]]:
    """Validate one image batch; return the (possibly expanded) prompt ids and the images in prompt order."""
    if mm.modality not in (common_pb2.MODALITY_UNSPECIFIED, common_pb2.IMAGE):
        raise InvalidArgument(f"mm_inputs.modality: {common_pb2.Modality.Name(mm.modality)} is not supported (images only)")
    if mm.HasField("encoder_input_key") and mm.encoder_input_key != "pixel_values":
        raise InvalidArgument(f"mm_inputs.encoder_input_key: '{mm.encoder_input_key}' is not supported (pixel_values)")
    if not mm.HasField("pixel_values"):
        raise InvalidArgument("mm_inputs.pixel_values: missing")
    grid = _grid(mm)
    num_images = grid.shape[0]
    limit = info.mm_item_limits.get("image", 0)
    if num_images > limit:
        raise ResourceExhausted(f"mm_inputs: {num_images} images exceed this engine's limit of {limit} per prompt")
    _check_layout_keys(mm, num_images)
    rows = _rows_per_image(mm, grid)
    pixels = decode_tensor("mm_inputs.pixel_values", mm.pixel_values)
    if pixels.dim() != 2 or pixels.shape[0] != sum(rows) or pixels.shape[1] != info.patch_dim:
        raise InvalidArgument(
            f"mm_inputs.pixel_values: shape {list(pixels.shape)}, but {GRID_KEY} implies "
            f"[{sum(rows)}, {info.patch_dim}] ({rows} rows per image)"
        )
    if mm.mm_hashes and len(mm.mm_hashes) != num_images:
        raise InvalidArgument(f"mm_inputs.mm_hashes: {len(mm.mm_hashes)} hashes for {num_images} images")
    pad_id = mm.im_token_id if mm.HasField("im_token_id") else info.image_token_id
    merge = info.spatial_merge_size
    expected = [r // (merge * merge) for r in rows]
    ranges = [(p.offset, p.length) for p in mm.mm_placeholders]
    ids, placements = place_images(prompt_ids, pad_id, expected, ranges)

    raw_per_image = torch.split(pixels, rows)
    ready_per_image = torch.split(prepare_pixels(pixels), rows)
    images = []
    for raw, ready, thw, place in zip(raw_per_image, ready_per_image, grid.tolist(), placements):
        images.append(
            ImageInput(
                pixel_values=ready,
                grid_thw=tuple(thw),
                identity=image_identity(raw, tuple(thw)),
                offset=place.offset,
                length=place.length,
                is_embed=place.is_embed,
            )
        )
    return ids, images
