"""MultimodalInputs (one image or video batch, as SMG sends it) -> per-item MediaItems.

Honours SMG's layout keys: `flat_keys` names the per-item row counts of a flat
tensor, `batched_keys` the tensors whose first dimension is per item,
`keep_on_cpu_keys` tensors the engine keeps on the host (the model's own field
config already does so for grids). A batch's pixels always arrive as `pixel_values`
(SMG's name for images and videos alike); the modality says which they are.
Blocking work (decode, hash, cast): run it off the event loop.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine_adapter.families import Family
from engine_adapter.types import MediaItem, ModelInfo
from servicer.errors import FailedPrecondition, InvalidArgument
from servicer.identity import image_identity, pad_values
from servicer.image_store import ImageStore, StoredImage
from servicer.placeholders import place_items
from servicer.shm import ConsumedSegments
from servicer.tensors import SegmentGone, decode_tensor, encode_tensor
from vlm_proto import common_pb2
from vlm_proto import vllm_engine_pb2 as pb


@dataclass(frozen=True)
class Modality:
    """The tensor names one modality's batch carries."""

    name: str  # "image" | "video": vLLM's modality key
    grid_key: str
    time_keys: tuple[str, ...] = ()  # per-item seconds per temporal grid step, by any of these names
    pixel_keys: tuple[str, ...] = ("pixel_values",)  # names flat_keys may give the pixels


IMAGE = Modality("image", "image_grid_thw")
# SMG names the video time tensor `video_second_per_grid`; vLLM's field is `second_per_grid_ts`.
VIDEO = Modality(
    "video", "video_grid_thw", ("second_per_grid_ts", "video_second_per_grid"), ("pixel_values", "pixel_values_videos")
)
MODALITIES = {common_pb2.MODALITY_UNSPECIFIED: IMAGE, common_pb2.IMAGE: IMAGE, common_pb2.VIDEO: VIDEO}


def _grid(mm: pb.MultimodalInputs, kind: Modality, where: str, unlink_shm: bool) -> torch.Tensor:
    if kind.grid_key not in mm.model_specific_tensors:
        raise InvalidArgument(f"{where}.model_specific_tensors: missing '{kind.grid_key}' ({kind.name} batch)")
    field = f"{where}.model_specific_tensors['{kind.grid_key}']"
    grid = decode_tensor(field, mm.model_specific_tensors[kind.grid_key], unlink_shm)
    if grid.is_floating_point() or grid.dim() != 2 or grid.shape[1] != 3:
        raise InvalidArgument(
            f"{field}: must be an integer tensor of shape [num_{kind.name}s, 3], got {list(grid.shape)} {grid.dtype}"
        )
    grid = grid.to(torch.int64)
    if grid.shape[0] == 0 or bool((grid <= 0).any()):
        raise InvalidArgument(f"{field}: needs at least one {kind.name} and positive t, h, w")
    return grid


def _rows_per_item(mm: pb.MultimodalInputs, kind: Modality, where: str, rows: list[int], unlink_shm: bool) -> list[int]:
    """Rows each item has in pixel_values: its grid's, or 0 for a reference (flat_keys sizes say 0)."""
    sent = rows
    for key, sizes_key in mm.flat_keys.items():
        if key not in kind.pixel_keys:
            raise InvalidArgument(f"{where}.flat_keys: unexpected tensor '{key}' (only the pixels are flat)")
        if sizes_key not in mm.model_specific_tensors:
            raise InvalidArgument(f"{where}.flat_keys['{key}']: sizes tensor '{sizes_key}' is missing")
        sizes = decode_tensor(
            f"{where}.model_specific_tensors['{sizes_key}']", mm.model_specific_tensors[sizes_key], unlink_shm
        )
        sent = sizes.flatten().to(torch.int64).tolist()
        if len(sent) != len(rows) or any(s not in (0, r) for s, r in zip(sent, rows)):
            raise InvalidArgument(
                f"{where}.model_specific_tensors['{sizes_key}']: {sent} rows per {kind.name}, "
                f"but {kind.grid_key} implies {rows} (0 marks an item referenced by hash)"
            )
    return sent


def _seconds_per_grid(
    mm: pb.MultimodalInputs, kind: Modality, where: str, count: int, unlink_shm: bool
) -> list[float | None]:
    present = [k for k in kind.time_keys if k in mm.model_specific_tensors]
    if not present:
        return [None] * count
    field = f"{where}.model_specific_tensors['{present[0]}']"
    seconds = decode_tensor(field, mm.model_specific_tensors[present[0]], unlink_shm).flatten()
    if seconds.numel() != count or not bool((seconds > 0).all()):
        raise InvalidArgument(f"{field}: needs one positive value per {kind.name} ({count}), got {seconds.tolist()}")
    return [float(x) for x in seconds]


def _check_layout_keys(mm: pb.MultimodalInputs, kind: Modality, where: str, count: int) -> None:
    known = set(mm.model_specific_tensors)
    allowed = {kind.grid_key, *kind.time_keys, *mm.flat_keys.values()}
    extra = sorted(set(mm.model_specific_tensors) - allowed)
    if extra:
        raise InvalidArgument(
            f"{where}.model_specific_tensors: unexpected {extra} for a {kind.name} batch "
            f"(expected {kind.grid_key}{', ' + ' or '.join(kind.time_keys) if kind.time_keys else ''} "
            "and flat_keys sizes)"
        )
    # Layout keys may name tensors this batch lacks (SMG lists its family's keys for images and
    # videos alike); only the tensors present are checked.
    if "pixel_values" in mm.batched_keys:
        raise InvalidArgument(f"{where}.batched_keys: pixel_values is flat (rows per {kind.name}), not batched")
    for key in (k for k in mm.batched_keys if k in known):
        first = mm.model_specific_tensors[key].shape[:1]
        if list(first) != [count]:
            raise InvalidArgument(
                f"{where}.batched_keys: '{key}' first dimension {list(first)} != {count} {kind.name}s"
            )


PIXEL_LESS_PREFIX = "kv-from-prefill:"  # identity of an item a decode leg carries without pixels


@dataclass(frozen=True)
class ImagePolicy:
    """How images are identified, padded and remembered (from ServerConfig)."""

    trust_gateway_hashes: bool  # --mm-hash-policy trust
    pad_values: bool  # --mm-pad-values
    pad_candidates: Sequence[int] | np.ndarray  # ordinary in-vocabulary token ids (an array: pad values index it)
    store: ImageStore
    consumed: ConsumedSegments  # shm segments already read, for gateway retries
    unlink_shm: bool = True  # --no-mm-shm-keep


def _identities(
    mm: pb.MultimodalInputs,
    kind: Modality,
    where: str,
    raw: list[torch.Tensor | None],
    grids: list[tuple],
    seconds: list[float | None],
    trust: bool,
) -> list[str]:
    """Per item: computed from the bytes (recompute), or the gateway's hash where trusted and present.

    A reference (no pixels) is always named by its hash: under recompute that must be
    the identity this servicer computed when the pixels came (returned to the caller).
    A video's identity also covers its modality and its time step (they change its positions).
    """
    out = []
    for i, (pixels, thw, sec) in enumerate(zip(raw, grids, seconds)):
        given = mm.mm_hashes[i] if mm.mm_hashes else ""
        if pixels is None:
            if not given:
                raise InvalidArgument(
                    f"{where}.mm_hashes[{i}]: {kind.name} {i} has no pixels, so it needs its identity"
                )
            out.append(given)
        elif trust and given:
            out.append(given)
        else:
            salt = "" if kind is IMAGE else f"{kind.name}|{sec}"
            out.append(image_identity(pixels, thw, salt))
    return out


def _resolve(
    identities, ready, grids, kind: Modality, where: str, store: ImageStore, kv_from_prefill: bool, store_copies: bool
) -> list[torch.Tensor | None]:
    """Engine-ready pixels per item: the request's own (then stored; copied if `store_copies`), or the
    store's for references.

    On a decode leg whose prompt KV comes from a prefill worker, a reference this servicer
    does not hold stays None: the engine only needs its grid (positions) and identity."""
    out: list[torch.Tensor | None] = []
    missing: list[str] = []
    for i, (ident, px, thw) in enumerate(zip(identities, ready, grids)):
        if px is not None:
            store.put(ident, StoredImage(px, thw), copy=store_copies)
        else:
            stored = store.get(ident)
            if stored is None:
                if not kv_from_prefill:
                    missing.append(ident)
                out.append(None)
                continue
            if stored.grid_thw != thw:
                raise InvalidArgument(
                    f"{where}.model_specific_tensors['{kind.grid_key}'][{i}]: {list(thw)} but {kind.name} {ident} "
                    f"was stored with grid {list(stored.grid_thw)}"
                )
            px = stored.pixel_values
        out.append(px)
    if missing:
        raise FailedPrecondition(
            f"{where}: {len(missing)} referenced {kind.name}(s) not held by this servicer, resend their pixels: "
            + ",".join(missing),
            metadata=(("vlm-missing-mm-hashes", ",".join(missing)),),
        )
    return out


def _pixels(
    mm: pb.MultimodalInputs, where: str, policy: ImagePolicy
) -> tuple[torch.Tensor | None, SegmentGone | None, tuple[str, ...]]:
    """The batch's pixel rows; None when there are none, or (with the error and the identities the segment
    carried) when they came in a segment we already consumed, whose items may still be in the store."""
    if not mm.HasField("pixel_values"):
        return None, None, ()
    try:
        return decode_tensor(f"{where}.pixel_values", mm.pixel_values, policy.unlink_shm), None, ()
    except SegmentGone as gone:
        remembered = policy.consumed.identities(gone.name)
        if remembered is None:
            raise
        return None, gone, remembered


def _split(
    pixels: torch.Tensor | None,
    sent_rows: list[int],
    patch_dim: int,
    kind: Modality,
    where: str,
    prepare_pixels: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], bool]:
    """Per item: the rows as sent (for hashing) and engine-ready (one cast for the batch); None where not sent.
    And whether the engine-ready rows still view the payload (no cast was needed)."""
    count = len(sent_rows)
    raw: list[torch.Tensor | None] = [None] * count
    ready: list[torch.Tensor | None] = [None] * count
    if pixels is None:
        return raw, ready, False
    if pixels.dim() != 2 or pixels.shape[0] != sum(sent_rows) or pixels.shape[1] != patch_dim:
        raise InvalidArgument(
            f"{where}.pixel_values: shape {list(pixels.shape)}, but {kind.grid_key} implies "
            f"[{sum(sent_rows)}, {patch_dim}] ({sent_rows} rows per {kind.name})"
        )
    prepared = prepare_pixels(pixels)
    for i, (r, p) in enumerate(zip(torch.split(pixels, sent_rows), torch.split(prepared, sent_rows))):
        if sent_rows[i]:
            raw[i], ready[i] = r, p
    return raw, ready, prepared.untyped_storage().data_ptr() == pixels.untyped_storage().data_ptr()


def _retried_identities(
    mm: pb.MultimodalInputs, where: str, sent_rows: list[int], remembered: tuple[str, ...]
) -> list[str]:
    """The identities a consumed segment carried (`remembered`), placed on the items that had rows in it."""
    name = mm.pixel_values.shm.name
    carried = [i for i, n in enumerate(sent_rows) if n]
    if len(remembered) != len(carried):
        raise InvalidArgument(
            f"{where}.pixel_values.shm: segment {name!r} carried {len(remembered)} items, not {len(carried)}"
        )
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


def _frames(
    grid: tuple,
    seconds: float | None,
    merge: int,
    pad_id: int,
    family: Family,
    info: ModelInfo,
    where: str,
    stamp_ids: Callable[[float], Sequence[int]],
) -> list[int]:
    """What one video placeholder stands for where the family lays videos out per frame; its timestamps
    need the video's time step."""
    if seconds is None:
        raise InvalidArgument(
            f"{where}.model_specific_tensors: a video sent as one placeholder needs 'video_second_per_grid' "
            "(or 'second_per_grid_ts') for its frame timestamps, or send its expanded layout with mm_placeholders"
        )
    start, end = info.vision_start_token_id, info.vision_end_token_id
    if start is None or end is None:  # the checkpoint's config names no frame markers
        raise InvalidArgument(f"{where}: model {info.served_model_name} has no vision start and end tokens for frames")
    return family.video_tokens(grid, merge, seconds, pad_id, start, end, stamp_ids)


def decode_media(
    mm: pb.MultimodalInputs,
    where: str,
    prompt_ids: list[int],
    info: ModelInfo,
    prepare_pixels: Callable[[torch.Tensor], torch.Tensor],
    policy: ImagePolicy,
    stamp_ids: Callable[[float], Sequence[int]],
    kv_from_prefill: bool = False,
) -> tuple[list[MediaItem], list[tuple[int, tuple[int, ...]]]]:
    """Validate one image or video batch (`where` names it in errors) against the ids as sent.

    Returns the items in prompt order, placed in the ids as sent, and the insertions
    their one-per-item placeholders need (the caller expands and shifts every batch's
    items together). Items without pixels (no `pixel_values`, or 0 rows in the flat_keys
    sizes tensor) are references, resolved from the store by identity, or (`kv_from_prefill`:
    the engine loads this prompt's KV from a prefill worker) sent to the engine without pixels.
    """
    kind = MODALITIES.get(mm.modality)
    if kind is None:
        name = common_pb2.Modality.Name(mm.modality) if mm.modality in common_pb2.Modality.values() else mm.modality
        raise InvalidArgument(f"{where}.modality: {name} is not supported (images and videos)")
    if mm.HasField("encoder_input_key") and mm.encoder_input_key not in kind.pixel_keys:
        raise InvalidArgument(
            f"{where}.encoder_input_key: '{mm.encoder_input_key}' is not supported ({' or '.join(kind.pixel_keys)})"
        )
    pad_id = mm.im_token_id if mm.HasField("im_token_id") else getattr(info, f"{kind.name}_token_id")
    family = info.family
    if pad_id is None or family is None:
        raise InvalidArgument(f"{where}: model {info.served_model_name} takes no {kind.name}s")
    grid = _grid(mm, kind, where, policy.unlink_shm)
    count = grid.shape[0]
    limit = info.mm_item_limits.get(kind.name, 0)
    if count > limit:
        raise InvalidArgument(
            f"{where}: {count} {kind.name}s exceed this engine's limit of {limit} per prompt (--limit-mm-per-prompt)"
        )
    _check_layout_keys(mm, kind, where, count)
    rows = grid.prod(-1).tolist()
    sent_rows = _rows_per_item(mm, kind, where, rows, policy.unlink_shm) if mm.HasField("pixel_values") else [0] * count
    if mm.mm_hashes and len(mm.mm_hashes) != count:
        raise InvalidArgument(f"{where}.mm_hashes: {len(mm.mm_hashes)} hashes for {count} {kind.name}s")
    seconds = _seconds_per_grid(mm, kind, where, count, policy.unlink_shm)
    pixels, gone, remembered = _pixels(mm, where, policy)
    raw, ready, views_payload = _split(pixels, sent_rows, info.patch_dim, kind, where, prepare_pixels)
    merge = info.spatial_merge_size
    grids = [tuple(thw) for thw in grid.tolist()]
    frames = kind is VIDEO and family.video_frames
    placements, inserts = place_items(
        prompt_ids,
        pad_id,
        [family.embeddings(g, merge) for g in grids],
        [(p.offset, p.length) for p in mm.mm_placeholders],
        narrow=not frames,
        what=kind.name,
        layout=(lambda i: _frames(grids[i], seconds[i], merge, pad_id, family, info, where, stamp_ids))
        if frames
        else None,
    )
    if gone is not None:  # a retry naming a segment we consumed: its items become references
        mm = _with_hashes(mm, _retried_identities(mm, where, sent_rows, remembered))
    identities = _identities(mm, kind, where, raw, grids, seconds, policy.trust_gateway_hashes)
    if pixels is not None and mm.pixel_values.WhichOneof("payload") == "shm":
        policy.consumed.remember(mm.pixel_values.shm.name, tuple(identities[i] for i, n in enumerate(sent_rows) if n))
    try:
        # The store copies only pixels that still view the gateway's shared memory, which it could write
        # again; inline bytes are an immutable object of our own, and a cast made new ones.
        shm_view = views_payload and mm.pixel_values.WhichOneof("payload") == "shm"
        ready = _resolve(identities, ready, grids, kind, where, policy.store, kv_from_prefill, shm_view)
    except FailedPrecondition:
        if gone is None:
            raise
        raise gone from None  # name the segment the gateway retried, not our identities
    # A pixel-less item gets a name of its own, so no engine cache keyed by identity ever hands
    # its metadata-only entry to a request that needs the pixels.
    identities = [ident if px is not None else f"{PIXEL_LESS_PREFIX}{ident}" for ident, px in zip(identities, ready)]
    return [
        MediaItem(
            pixel_values=px,
            grid_thw=thw,
            identity=ident,
            offset=place.offset,
            length=place.length,
            is_embed=place.is_embed,
            modality=kind.name,
            second_per_grid=sec,
        )
        for px, thw, ident, place, sec in zip(ready, grids, identities, placements, seconds)
    ], inserts


def engine_prompt_ids(ids: list[int], media: list[MediaItem], policy: ImagePolicy, info: ModelInfo) -> list[int]:
    """The ids the engine sees: each item's embedding positions carry its identity's pad values.

    Except videos laid out per frame (Family.video_frames): vLLM finds each frame's embeddings
    by its video pad tokens, so those stay (the identity still keys the engine's caches)."""
    if not policy.pad_values or not media:
        return ids
    family = info.family
    assert family is not None  # decode_media refuses media for a model without a family
    out = list(ids)
    for item in media:
        if item.modality == "video" and family.video_frames:
            continue
        if item.is_embed is None:
            out[item.offset : item.offset + item.length] = pad_values(item.identity, item.length, policy.pad_candidates)
            continue
        positions = [item.offset + k for k in range(item.length) if item.is_embed[k]]
        for pos, pad in zip(positions, pad_values(item.identity, len(positions), policy.pad_candidates)):
            out[pos] = pad
    return out


def media_identity(prompt_ids: Sequence[int], media: Sequence[MediaItem]) -> pb.MediaIdentity:
    """The prompt as a decode leg can resend it without pixels: the caller's expanded ids and, per
    modality, each item's identity, placeholder range and grid (a prefill leg returns this)."""
    batches = []
    for kind, enum in ((IMAGE, common_pb2.IMAGE), (VIDEO, common_pb2.VIDEO)):
        items = [m for m in media if m.modality == kind.name]
        if not items:
            continue
        mm = pb.MultimodalInputs(
            modality=enum,
            mm_hashes=[m.identity for m in items],
            mm_placeholders=[pb.PlaceholderRange(offset=m.offset, length=m.length) for m in items],
            model_specific_tensors={kind.grid_key: encode_tensor(torch.tensor([m.grid_thw for m in items]))},
        )
        if kind is VIDEO and any(m.second_per_grid is not None for m in items):
            mm.model_specific_tensors[kind.time_keys[0]].CopyFrom(
                encode_tensor(torch.tensor([m.second_per_grid or 0.0 for m in items], dtype=torch.float32))
            )
        batches.append(mm)
    identity = pb.MediaIdentity(prompt_token_ids=prompt_ids)
    if batches:
        identity.mm_inputs.CopyFrom(batches[0])
        identity.extra_mm_inputs.extend(batches[1:])
    return identity
