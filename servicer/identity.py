"""Image identities: xxh3-128 over dtype, shape and bytes.

The identity becomes vLLM's multimodal identifier, which keys its encoder cache
and the prefix-cache blocks that cover the image, so two different images must
never share one.
"""

import torch
import xxhash


def image_identity(pixels: torch.Tensor, grid_thw: tuple[int, int, int]) -> str:
    """Identity of one image's patches as sent (before any cast), including its grid."""
    h = xxhash.xxh3_128()
    h.update(f"{pixels.dtype}|{tuple(pixels.shape)}|{grid_thw}|".encode())
    contiguous = pixels.contiguous()
    # Hash the raw bytes without a copy (uint8 view of the tensor's storage).
    h.update(contiguous.view(torch.uint8).numpy().data if contiguous.numel() else b"")
    return h.hexdigest()
