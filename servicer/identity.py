"""Image identities and the pad values derived from them.

The identity (xxh3-128 over dtype, shape, grid and bytes) becomes vLLM's
multimodal identifier, which keys its encoder cache and the prefix-cache blocks
that cover the image. Pad values carry it into the token ids too: the ids vLLM
sees at an image's embedding positions are replaced by ordinary in-vocabulary
tokens drawn from the identity, so even a cache keyed on tokens alone tells two
images apart. The embeddings there are the vision tower's, and vLLM 0.32 takes
M-RoPE positions from the placeholder ranges, so outputs do not change.
"""

from collections.abc import Sequence

import numpy as np
import torch
import xxhash


def image_identity(pixels: torch.Tensor, grid_thw: tuple[int, int, int], salt: str = "") -> str:
    """Identity of one image's (or video's) patches as sent (before any cast), including its grid;
    `salt` adds what else changes its meaning (a video's modality and time step)."""
    h = xxhash.xxh3_128()
    h.update(f"{salt}{pixels.dtype}|{tuple(pixels.shape)}|{grid_thw}|".encode())
    contiguous = pixels.contiguous()
    # Hash the raw bytes without a copy (uint8 view of the tensor's storage).
    h.update(contiguous.view(torch.uint8).numpy().data if contiguous.numel() else b"")
    return h.hexdigest()


def pad_values(identity: str, count: int, candidates: Sequence[int] | np.ndarray) -> list[int]:
    """`count` ids drawn from `candidates` (ordinary tokens; pass an array on hot paths), deterministic in the
    identity and position: SplitMix64 of (identity hash, position), vectorized (~1,000 per 1280x720 image)."""
    seed = np.uint64(xxhash.xxh3_64_intdigest(identity.encode()))
    x = seed + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return np.asarray(candidates)[x % np.uint64(len(candidates))].tolist()
