"""A bounded in-memory store of engine-ready images, keyed by identity, least-recently-used by bytes.

Filled by every request that carries pixels; a later request may send an image
as identity + grid only (reference by hash) and be served from here. A miss is
the caller's to fix (resend the pixels), never a guess.
"""

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StoredImage:
    pixel_values: torch.Tensor  # engine-ready (prepared) patches
    grid_thw: tuple[int, int, int]


@dataclass
class StoreStats:
    items: int
    bytes: int
    capacity_bytes: int
    hits: int
    misses: int


class ImageStore:
    """Thread-safe: decode workers put and get concurrently."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def put(self, identity: str, image: StoredImage, copy: bool = True) -> None:
        """Keep `image` (LRU by bytes); `copy`: its pixels view memory someone else may write."""
        size = image.pixel_values.nbytes
        if size > self.capacity_bytes:
            return
        with self._lock:
            if identity in self._items:
                self._items.move_to_end(identity)
                return
            pixels = image.pixel_values
            # A view into a larger buffer (one image of a batch) would keep all of it alive, unaccounted.
            if copy or pixels.untyped_storage().nbytes() != pixels.nbytes:
                image = StoredImage(pixels.clone(), image.grid_thw)
            self._items[identity] = image
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.pixel_values.nbytes

    def get(self, identity: str) -> StoredImage | None:
        with self._lock:
            image = self._items.get(identity)
            if image is None:
                self._misses += 1
                return None
            self._items.move_to_end(identity)
            self._hits += 1
            return image

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(len(self._items), self._bytes, self.capacity_bytes, self._hits, self._misses)
