"""Where each item's embeddings go in the prompt: validate given ranges or find and expand placeholders.

Gateways send one of two forms:
  * expanded: each item's pad-token run is already in the ids, with `mm_placeholders`
    ranges (which may include structural tokens such as <|vision_start|>, or a video's
    per-frame timestamps and markers);
  * one placeholder per item: a single pad token that we expand to the number of
    embeddings the item's grid implies (t*h*w / merge^2).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from servicer.errors import InvalidArgument


@dataclass(frozen=True)
class Placement:
    offset: int
    length: int
    is_embed: tuple[bool, ...] | None  # None: every position in the range is an embedding


def _from_ranges(
    ids: list[int], pad_id: int, ranges: list[tuple[int, int]], expected: list[int], narrow: bool
) -> list[Placement]:
    placements, end_prev = [], 0
    for i, ((offset, length), want) in enumerate(zip(ranges, expected)):
        field = f"mm_inputs.mm_placeholders[{i}]"
        if length == 0 or offset + length > len(ids):
            raise InvalidArgument(
                f"{field}: range [{offset}, {offset + length}) is outside the prompt of {len(ids)} tokens"
            )
        if offset < end_prev:
            raise InvalidArgument(
                f"{field}: range starting at {offset} overlaps or precedes the previous range ending at {end_prev}"
            )
        end_prev = offset + length
        if length == want:
            placements.append(Placement(offset, length, None))
            continue
        # A range wider than the image (e.g. including <|vision_start|>/<|vision_end|>):
        # its embeddings sit on the pad tokens inside it.
        mask = tuple(t == pad_id for t in ids[offset:end_prev])
        if sum(mask) != want:
            raise InvalidArgument(
                f"{field}: range has {length} tokens ({sum(mask)} image pad tokens) "
                f"but image {i}'s grid implies {want} embeddings"
            )
        first = mask.index(True)
        if narrow and all(mask[first : first + want]):
            # One contiguous run: narrow the range to it. vLLM derives M-RoPE positions
            # from the range's offset, so a range starting on a structural token would
            # shift every position of the image by one.
            placements.append(Placement(offset + first, want, None))
        else:
            placements.append(Placement(offset, length, mask))
    return placements


def _runs(ids: list[int], pad_id: int) -> list[tuple[int, int]]:
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == pad_id:
            j = i
            while j < len(ids) and ids[j] == pad_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def place_items(
    ids: list[int],
    pad_id: int,
    expected: list[int],
    ranges: list[tuple[int, int]],
    *,
    narrow: bool = True,
    what: str = "image",
    layout: Callable[[int], Sequence[int]] | None = None,
) -> tuple[list[Placement], list[tuple[int, tuple[int, ...]]]]:
    """One placement per item, in the coordinates of `ids` as sent, and the insertions
    (position, tokens replacing the placeholder there) that one-per-item placeholders need
    (`expanded` applies them).

    `narrow=False` keeps a range that covers structural tokens as sent (a video laid out per frame:
    the engine finds each frame's markers from the range's start). `layout(i)`, when given, is what
    item i's single placeholder stands for (such a video: timestamps and markers per frame, from its
    family); otherwise it is the item's count of pad tokens.
    """
    if ranges:
        if len(ranges) != len(expected):
            raise InvalidArgument(f"mm_inputs.mm_placeholders: {len(ranges)} ranges for {len(expected)} {what}s")
        return _from_ranges(ids, pad_id, ranges, expected, narrow), []
    runs = _runs(ids, pad_id)
    if layout is None and [length for _, length in runs] == expected:  # already expanded
        return [Placement(offset, length, None) for offset, length in runs], []
    num_pads = sum(length for _, length in runs)
    if num_pads == len(expected) and all(want >= 1 for want in expected):
        positions = [p for offset, length in runs for p in range(offset, offset + length)]
        placements, inserts = [], []
        for i, (pos, want) in enumerate(zip(positions, expected)):
            tokens = tuple(layout(i)) if layout else (pad_id,) * want
            mask = tuple(t == pad_id for t in tokens)
            placements.append(Placement(pos, len(tokens), None if all(mask) else mask))
            inserts.append((pos, tokens))
        return placements, inserts
    raise InvalidArgument(
        f"tokenized.input_ids: found {num_pads} {what} pad tokens (id {pad_id}) in {len(runs)} runs "
        f"{[length for _, length in runs]}, but {len(expected)} {what}s need either one placeholder each "
        f"or {'their expanded layout with mm_placeholders' if layout else f'runs of {expected} tokens'}"
    )


def expanded(ids: list[int], inserts: list[tuple[int, tuple[int, ...]]]) -> list[int]:
    """`ids` with the placeholder at each inserted position replaced by its tokens."""
    if not inserts:  # ids already expanded, as SMG sends them
        return ids
    at = dict(inserts)
    return [t for i, tok in enumerate(ids) for t in at.get(i, (tok,))]


def shifted(offset: int, inserts: list[tuple[int, tuple[int, ...]]]) -> int:
    """A position in the ids as sent, moved past the tokens inserted before it."""
    return offset + sum(len(tokens) - 1 for pos, tokens in inserts if pos < offset)
