"""MultimodalInputs (one image batch, as SMG sends it) -> per-image ImageInputs.

Honours SMG's layout keys: `flat_keys` names the per-image row counts of a flat
tensor, `batched_keys` the tensors whose first dimension is per image,
`keep_on_cpu_keys` tensors the engine keeps on the host (the model's own field
config already does so for grids). Blocking work (decode, hash, cast): run it off
the event loop.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine_adapter.types import ImageInput, ModelInfo
from servicer.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from servicer.identity import image_identity, pad_values
from servicer.image_store import ImageStore, StoredImage
from servicer.placeholders import place_images
from servicer.shm import ConsumedSegments
from servicer.tensors import SegmentGone, decode_tensor
from vlm_proto import common_pb2, vllm_engine_pb2 as pb

GRID_KEY = "image_grid_thw"


def _grid(mm: pb.MultimodalInputs, unlink_shm: bool) -> torch.Tensor:
    if GRID_KEY not in mm.model_specific_tensors:
        raise InvalidArgument(f"mm_inputs.model_specific_tensors: missing '{GRID_KEY}'")
    field = f"mm_inputs.model_specific_tensors['{GRID_KEY}']"
    grid = decode_tensor(field, mm.model_specific_tensors[GRID_KEY], unlink_shm)
    if grid.is_floating_point() or grid.dim() != 2 or grid.shape[1] != 3:
        raise InvalidArgument(f"{field}: must be an integer tensor of shape [num_images, 3], got {list(grid.shape)} {grid.dtype}")
    grid = grid.to(torch.int64)
    if grid.shape[0] == 0 or bool((grid <= 0).any()):
        raise InvalidArgument(f"{field}: needs at least one image and positive t, h, w")
    return grid


def _rows_per_image(mm: pb.MultimodalInputs, rows: list[int], unlink_shm: bool) -> list[int]:
    """Rows each image has in pixel_values: its grid's, or 0 for a reference (flat_keys sizes say 0)."""
    sent = rows
    for key, sizes_key in mm.flat_keys.items():
        if key != "pixel_values":
            raise InvalidArgument(f"mm_inputs.flat_keys: unexpected tensor '{key}' (only pixel_values is flat)")
        if sizes_key not in mm.model_specific_tensors:
            raise InvalidArgument(f"mm_inputs.flat_keys['pixel_values']: sizes tensor '{sizes_key}' is missing")
        sizes = decode_tensor(f"mm_inputs.model_specific_tensors['{sizes_key}']", mm.model_specific_tensors[sizes_key], unlink_shm)
        sent = sizes.flatten().to(torch.int64).tolist()
        if len(sent) != len(rows) or any(s not in (0, r) for s, r in zip(sent, rows)):
            raise InvalidArgument(
                f"mm_inputs.model_specific_tensors['{sizes_key}']: {sent} rows per image, "
                f"but {GRID_KEY} implies {rows} (0 marks an image referenced by hash)"
            )
    return sent


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


@dataclass(frozen=True)
class ImagePolicy:
    """How images are identified, padded and remembered (from ServerConfig)."""

    trust_gateway_hashes: bool  # --mm-hash-policy trust
    pad_values: bool  # --mm-pad-values
    pad_candidates: tuple[int, ...]  # ordinary in-vocabulary token ids
    store: ImageStore
    consumed: ConsumedSegments  # shm segments already read, for gateway retries
    unlink_shm: bool = True  # --no-mm-shm-keep


def _identities(mm: pb.MultimodalInputs, raw: list[torch.Tensor | None], grids: list[tuple], trust: bool) -> list[str]:
    """Per image: computed from the bytes (recompute), or the gateway's hash where trusted and present.

    A reference (no pixels) is always named by its hash: under recompute that must be
    the identity this servicer computed when the pixels came (returned to the caller).
    """
    out = []
    for i, (pixels, thw) in enumerate(zip(raw, grids)):
        given = mm.mm_hashes[i] if mm.mm_hashes else ""
        if pixels is None:
            if not given:
                raise InvalidArgument(f"mm_inputs.mm_hashes[{i}]: image {i} has no pixels, so it needs its identity")
            out.append(given)
        else:
            out.append(given if trust and given else image_identity(pixels, thw))
    return out


def _resolve(identities, ready, grids, store: ImageStore) -> list[torch.Tensor]:
    """Engine-ready pixels per image: the request's own (then stored), or the store's for references."""
    out, missing = [], []
    for i, (ident, px, thw) in enumerate(zip(identities, ready, grids)):
        if px is not None:
            store.put(ident, StoredImage(px, thw))
        else:
            stored = store.get(ident)
            if stored is None:
                missing.append(ident)
                continue
            if stored.grid_thw != thw:
                raise InvalidArgument(
                    f"mm_inputs.model_specific_tensors['{GRID_KEY}'][{i}]: {list(thw)} but image {ident} "
                    f"was stored with grid {list(stored.grid_thw)}"
                )
            px = stored.pixel_values
        out.append(px)
    if missing:
        raise FailedPrecondition(
            f"mm_inputs: {len(missing)} referenced image(s) not held by this servicer, resend their pixels: "
            + ",".join(missing),
            metadata=(("vlm-missing-mm-hashes", ",".join(missing)),),
        )
    return out


def _pixels(mm: pb.MultimodalInputs, policy: ImagePolicy) -> tuple[torch.Tensor | None, SegmentGone | None]:
    """The batch's pixel rows; None when there are none, or (with the error) when they came
    in a segment we already consumed, whose images may still be in the store."""
    if not mm.HasField("pixel_values"):
        return None, None
    try:
        return decode_tensor("mm_inputs.pixel_values", mm.pixel_values, policy.unlink_shm), None
    except SegmentGone as gone:
        if policy.consumed.identities(gone.name) is None:
            raise
        return None, gone


def _split(pixels, sent_rows: list[int], patch_dim: int, prepare_pixels) -> tuple[list, list]:
    """Per image: the rows as sent (for hashing) and engine-ready (one cast for the batch); None where not sent."""
    num_images = len(sent_rows)
    raw, ready = [None] * num_images, [None] * num_images
    if pixels is None:
        return raw, ready
    if pixels.dim() != 2 or pixels.shape[0] != sum(sent_rows) or pixels.shape[1] != patch_dim:
        raise InvalidArgument(
            f"mm_inputs.pixel_values: shape {list(pixels.shape)}, but {GRID_KEY} implies "
            f"[{sum(sent_rows)}, {patch_dim}] ({sent_rows} rows per image)"
        )
    for i, (r, p) in enumerate(zip(torch.split(pixels, sent_rows), torch.split(prepare_pixels(pixels), sent_rows))):
        if sent_rows[i]:
            raw[i], ready[i] = r, p
    return raw, ready


def _retried_identities(mm: pb.MultimodalInputs, sent_rows: list[int], policy: ImagePolicy) -> list[str]:
    """The identities a consumed segment carried, placed on the images that had rows in it."""
    name = mm.pixel_values.shm.name
    carried = [i for i, n in enumerate(sent_rows) if n]
    remembered = policy.consumed.identities(name)
    if len(remembered) != len(carried):
        raise InvalidArgument(f"mm_inputs.pixel_values.shm: segment {name!r} carried {len(remembered)} images, not {len(carried)}")
    identities = list(mm.mm_hashes) or [""] * len(sent_rows)
    for i, ident in zip(carried, remembered):
        identities[i] = ident
    return identities


def _with_hashes(mm: pb.MultimodalInputs, hashes: list[str]) -> pb.MultimodalInputs:
    copy = pb.MultimodalInputs()
    copy.CopyFrom(mm)
    del copy.mm_hashes[:]
    copy.mm_hashes.extend(hashes)
    return copy


def decode_images(
    mm: pb.MultimodalInputs,
    prompt_ids: list[int],
    info: ModelInfo,
    prepare_pixels: Callable[[torch.Tensor], torch.Tensor],
    policy: ImagePolicy,
) -> tuple[list[int], list[ImageInput]]:
    """Validate one image batch; return the (possibly expanded) prompt ids and the images in prompt order.

    Images without pixels (no `pixel_values`, or 0 rows in the flat_keys sizes tensor)
    are references, resolved from the image store by identity.
    """
    if mm.modality not in (common_pb2.MODALITY_UNSPECIFIED, common_pb2.IMAGE):
        raise InvalidArgument(f"mm_inputs.modality: {common_pb2.Modality.Name(mm.modality)} is not supported (images only)")
    if mm.HasField("encoder_input_key") and mm.encoder_input_key != "pixel_values":
        raise InvalidArgument(f"mm_inputs.encoder_input_key: '{mm.encoder_input_key}' is not supported (pixel_values)")
    grid = _grid(mm, policy.unlink_shm)
    num_images = grid.shape[0]
    limit = info.mm_item_limits.get("image", 0)
    if num_images > limit:
        raise ResourceExhausted(f"mm_inputs: {num_images} images exceed this engine's limit of {limit} per prompt")
    _check_layout_keys(mm, num_images)
    rows = grid.prod(-1).tolist()
    sent_rows = _rows_per_image(mm, rows, policy.unlink_shm) if mm.HasField("pixel_values") else [0] * num_images
    if mm.mm_hashes and len(mm.mm_hashes) != num_images:
        raise InvalidArgument(f"mm_inputs.mm_hashes: {len(mm.mm_hashes)} hashes for {num_images} images")
    pixels, gone = _pixels(mm, policy)
    raw, ready = _split(pixels, sent_rows, info.patch_dim, prepare_pixels)
    pad_id = mm.im_token_id if mm.HasField("im_token_id") else info.image_token_id
    merge = info.spatial_merge_size
    ids, placements = place_images(prompt_ids, pad_id, [r // (merge * merge) for r in rows], [(p.offset, p.length) for p in mm.mm_placeholders])
    grids = [tuple(thw) for thw in grid.tolist()]
    if gone is not None:  # a retry naming a segment we consumed: its images become references
        mm = _with_hashes(mm, _retried_identities(mm, sent_rows, policy))
    identities = _identities(mm, raw, grids, policy.trust_gateway_hashes)
    if pixels is not None and mm.pixel_values.WhichOneof("payload") == "shm":
        policy.consumed.remember(mm.pixel_values.shm.name, tuple(identities[i] for i, n in enumerate(sent_rows) if n))
    try:
        ready = _resolve(identities, ready, grids, policy.store)
    except FailedPrecondition:
        if gone is None:
            raise
        raise gone from None  # name the segment the gateway retried, not our identities
    return ids, [
        ImageInput(pixel_values=px, grid_thw=thw, identity=ident, offset=place.offset, length=place.length, is_embed=place.is_embed)
        for px, thw, ident, place in zip(ready, grids, identities, placements)
    ]


def engine_prompt_ids(ids: list[int], images: list[ImageInput], policy: ImagePolicy) -> list[int]:
    """The ids the engine sees: each image's embedding positions carry its identity's pad values."""
    if not policy.pad_values or not images:
        return ids
    out = list(ids)
    for image in images:
        positions = [image.offset + k for k in range(image.length) if image.is_embed is None or image.is_embed[k]]
        for pos, pad in zip(positions, pad_values(image.identity, len(positions), policy.pad_candidates)):
            out[pos] = pad
    return out
