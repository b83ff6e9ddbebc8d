"""The reference-by-hash store: LRU by bytes, owned copies, hit/miss counts."""

import torch

from servicer.image_store import ImageStore, StoredImage


def _img(n_bytes: int) -> StoredImage:
    return StoredImage(torch.zeros(n_bytes, dtype=torch.uint8), (1, 1, 1))


def test_least_recently_used_is_evicted_by_bytes():
    store = ImageStore(capacity_bytes=300)
    for name in "abc":
        store.put(name, _img(100))
    assert store.get("a") is not None  # a is now the most recent
    store.put("d", _img(100))
    assert store.get("b") is None and store.get("a") is not None
    stats = store.stats()
    assert (stats.items, stats.bytes, stats.hits, stats.misses) == (3, 300, 2, 1)


def test_too_large_is_not_stored_and_bytes_are_owned():
    store = ImageStore(capacity_bytes=50)
    store.put("big", _img(100))
    assert store.get("big") is None
    source = torch.zeros(10, dtype=torch.uint8)
    store.put("x", StoredImage(source, (1, 1, 1)))
    source.fill_(7)
    assert int(store.get("x").pixel_values.sum()) == 0


def test_a_whole_buffer_of_our_own_is_kept_without_a_copy():
    whole = torch.zeros(10, dtype=torch.uint8)
    store = ImageStore(capacity_bytes=1000)
    store.put("whole", StoredImage(whole, (1, 1, 1)), copy=False)
    assert store.get("whole").pixel_values is whole
    batch = torch.zeros(20, dtype=torch.uint8)
    store.put("part", StoredImage(batch[:10], (1, 1, 1)), copy=False)  # would pin the other half
    assert store.get("part").pixel_values.untyped_storage().nbytes() == 10
