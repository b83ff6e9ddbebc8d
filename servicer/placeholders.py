"""Where each image's embeddings go in the prompt: validate given ranges or find and expand placeholders.

Gateways send one of two forms:
  * expanded: each image's pad-token run is already in the ids, with `mm_placeholders`
    ranges (which may include structural tokens such as <|vision_start|>);
  * one placeholder per image: a single pad token that we expand to the number of
    embeddings the image's grid implies (t*h*w / merge^2).
"""

from dataclasses import dataclass

from servicer.errors import InvalidArgument


@dataclass(frozen=True)
class Placement:
    offset: int
    length: int
    is_embed: tuple[bool, ...] | None  # None: every position in the range is an embedding


def _from_ranges(ids: list[int], pad_id: int, ranges: list[tuple[int, int]], expected: list[int]) -> list[Placement]:
    placements, end_prev = [], 0
    for i, ((offset, length), want) in enumerate(zip(ranges, expected)):
        field = f"mm_inputs.mm_placeholders[{i}]"
        if length == 0 or offset + length > len(ids):
            raise InvalidArgument(f"{field}: range [{offset}, {offset + length}) is outside the prompt of {len(ids)} tokens")
        if offset < end_prev:
            raise InvalidArgument(f"{field}: range starting at {offset} overlaps or precedes the previous range ending at {end_prev}")
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
        if all(mask[first:first + want]):
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


def place_images(
    ids: list[int], pad_id: int, expected: list[int], ranges: list[tuple[int, int]]
) -> tuple[list[int], list[Placement]]:
    """Return (prompt ids, one placement per image); ids are expanded only in the one-per-image form."""
    if ranges:
        if len(ranges) != len(expected):
            raise InvalidArgument(
                f"mm_inputs.mm_placeholders: {len(ranges)} ranges for {len(expected)} images"
            )
        return ids, _from_ranges(ids, pad_id, ranges, expected)
    runs = _runs(ids, pad_id)
    num_pads = sum(length for _, length in runs)
    if num_pads == len(expected) and all(want >= 1 for want in expected):
        # One placeholder per image: expand each to its grid's embedding count.
        out, placements, cursor = [], [], 0
        positions = [p for offset, length in runs for p in range(offset, offset + length)]
        for pos, want in zip(positions, expected):
            out.extend(ids[cursor:pos])
            placements.append(Placement(len(out), want, None))
            out.extend([pad_id] * want)
            cursor = pos + 1
        out.extend(ids[cursor:])
        return out, placements
    if [length for _, length in runs] == expected:
        return ids, [Placement(offset, length, None) for offset, length in runs]
    raise InvalidArgument(
        f"tokenized.input_ids: found {num_pads} image pad tokens (id {pad_id}) in {len(runs)} runs "
        f"{[length for _, length in runs]}, but {len(expected)} images need either one placeholder each "
        f"or runs of {expected} tokens"
    )
