"""Placeholder placement: given ranges, expanded runs, and one placeholder per image."""

import pytest

from servicer.errors import InvalidArgument
from servicer.placeholders import Placement, place_images

PAD, VS, VE = 9, 7, 8


def test_one_placeholder_per_image_is_expanded_to_grid_counts():
    ids = [1, VS, PAD, VE, 2, VS, PAD, VE, 3]
    out, places = place_images(ids, PAD, [4, 2], [])
    assert out == [1, VS, PAD, PAD, PAD, PAD, VE, 2, VS, PAD, PAD, VE, 3]
    assert places == [Placement(2, 4, None), Placement(9, 2, None)]


def test_expanded_runs_without_ranges_are_found():
    ids = [1, VS, PAD, PAD, PAD, VE, VS, PAD, PAD, VE]
    out, places = place_images(ids, PAD, [3, 2], [])
    assert out == ids
    assert places == [Placement(2, 3, None), Placement(7, 2, None)]


def test_given_ranges_are_kept_and_structural_tokens_masked():
    ids = [1, VS, PAD, PAD, VE, 2]
    _, exact = place_images(ids, PAD, [2], [(2, 2)])
    assert exact == [Placement(2, 2, None)]
    _, wide = place_images(ids, PAD, [2], [(1, 4)])
    assert wide == [Placement(2, 2, None)]  # narrowed to the pad run (M-RoPE keys on the offset)
    split = [1, VS, PAD, 5, PAD, VE]
    _, masked = place_images(split, PAD, [2], [(1, 5)])
    assert masked == [Placement(1, 5, (False, True, False, True, False))]


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
        place_images(ids, PAD, expected, ranges)
