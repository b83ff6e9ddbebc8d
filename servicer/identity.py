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


def pad_values(identity: str, count: int, candidates: Sequence[int]) -> list[int]:
    """`count` ids drawn from `candidates` (ordinary tokens), deterministic in the identity and position."""
    seed = xxhash.xxh3_64_intdigest(identity.encode())
    return [candidates[xxhash.xxh3_64_intdigest(i.to_bytes(8, "little"), seed=seed) % len(candidates)] for i in range(count)]
