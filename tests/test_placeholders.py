"""Placeholder placement: given ranges, expanded runs, one placeholder per item, two modalities."""

import pytest

from engine_adapter.families import FAMILIES
from servicer.errors import InvalidArgument
from servicer.placeholders import Placement, expanded, place_items, shifted

PAD, VS, VE = 9, 7, 8


def test_one_placeholder_per_image_is_expanded_to_grid_counts():
    ids = [1, VS, PAD, VE, 2, VS, PAD, VE, 3]
    places, inserts = place_items(ids, PAD, [4, 2], [])
    assert expanded(ids, inserts) == [1, VS, PAD, PAD, PAD, PAD, VE, 2, VS, PAD, PAD, VE, 3]
    assert places == [Placement(2, 4, None), Placement(6, 2, None)]  # as sent
    assert inserts == [(2, (PAD,) * 4), (6, (PAD,) * 2)] and [shifted(p.offset, inserts) for p in places] == [2, 9]


def test_expanded_runs_without_ranges_are_found():
    ids = [1, VS, PAD, PAD, PAD, VE, VS, PAD, PAD, VE]
    places, inserts = place_items(ids, PAD, [3, 2], [])
    assert inserts == []
    assert places == [Placement(2, 3, None), Placement(7, 2, None)]


def test_given_ranges_are_kept_and_structural_tokens_masked():
    ids = [1, VS, PAD, PAD, VE, 2]
    exact, _ = place_items(ids, PAD, [2], [(2, 2)])
    assert exact == [Placement(2, 2, None)]
    wide, _ = place_items(ids, PAD, [2], [(1, 4)])
    assert wide == [Placement(2, 2, None)]  # narrowed to the pad run (M-RoPE keys on the offset)
    kept, _ = place_items(ids, PAD, [2], [(1, 4)], narrow=False)
    assert kept == [Placement(1, 4, (False, True, True, False))]  # a video laid out per frame: markers stay in range
    split = [1, VS, PAD, 5, PAD, VE]
    masked, _ = place_items(split, PAD, [2], [(1, 5)])
    assert masked == [Placement(1, 5, (False, True, False, True, False))]


def test_two_modalities_are_placed_on_the_ids_as_sent_then_shifted_together():
    VID = 6
    ids = [1, VID, 2, PAD, 3, PAD]
    images, image_inserts = place_items(ids, PAD, [2, 1], [])
    videos, video_inserts = place_items(ids, VID, [3], [], what="video")
    inserts = image_inserts + video_inserts
    assert expanded(ids, inserts) == [1, VID, VID, VID, 2, PAD, PAD, 3, PAD]
    assert [shifted(p.offset, inserts) for p in videos + images] == [1, 5, 8]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.video_frames], ids=lambda f: f.name)
def test_a_frame_layout_replaces_one_placeholder_with_stamps_markers_and_pads(family):
    stamp = {0.1: (50, 51), 0.6: (50, 52)}  # "<0.1 seconds>", "<0.6 seconds>" as token ids
    layout = family.video_tokens((2, 2, 6), 2, 0.5, PAD, VS, VE, lambda t: stamp[round(t, 1)])
    assert layout == [50, 51, VS, PAD, PAD, PAD, VE, 50, 52, VS, PAD, PAD, PAD, VE]
    ids = [1, VS, PAD, VE, 2]
    [place], inserts = place_items(ids, PAD, [6], [], narrow=False, what="video", layout=lambda i: layout)
    assert expanded(ids, inserts) == [1, VS, *layout, VE, 2]
    assert place.offset == 2 and place.length == len(layout) and sum(place.is_embed) == 6
    with pytest.raises(InvalidArgument, match="expanded layout with mm_placeholders"):
        place_items([1, PAD, PAD, 2], PAD, [6], [], what="video", layout=lambda i: layout)


@pytest.mark.parametrize(
    "ids, expected, ranges, message",
    [
        ([1, PAD, 2], [1, 1], [], "2 images"),
        ([1, PAD, PAD, PAD, 2], [4], [], r"runs of \[4\]"),
        ([1, PAD, PAD], [2], [(1, 2), (0, 1)], "2 ranges for 1 images"),
        ([1, PAD, PAD], [2], [(2, 2)], "outside the prompt"),
        ([PAD, PAD, PAD, PAD], [2, 2], [(0, 2), (1, 2)], "overlaps"),
        ([1, PAD, PAD, 2], [3], [(1, 2)], "implies 3 embeddings"),
    ],
)
def test_mismatches_name_both_numbers(ids, expected, ranges, message):
    with pytest.raises(InvalidArgument, match=message):
        place_items(ids, PAD, expected, ranges)
