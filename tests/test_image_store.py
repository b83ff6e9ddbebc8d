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
