"""Bring gateway pixels to the form the engine's vision tower takes, in one cast.

vLLM 0.32 normalizes on the device for the models that support it
(`mm_device_do_normalize`): the tower then expects raw 0..255 values, ideally uint8
(4x fewer bytes to move).
Gateways send either raw uint8 patches or normalized floats, so:

  engine normalizes, uint8 in  -> passed through untouched
  engine normalizes, float in  -> un-normalized to the 0..255 scale, kept float32
                                  (the tower casts after normalizing; bf16 would lose ~0.5/255)
  engine takes floats, uint8 in -> normalized here (float32 math)
  engine takes floats, float in -> cast to the model dtype
"""

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PixelNorm:
    """The image processor's rescale and per-channel normalization."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float

    @classmethod
    def from_affine(cls, weight: tuple[float, ...], bias: tuple[float, ...]) -> "PixelNorm":
        """The norm whose affine() is (weight, bias), as vLLM's device-side norm holds it."""
        return cls(tuple(-b / w for w, b in zip(weight, bias)), tuple(1.0 / w for w in weight), 1.0)

    @functools.cache  # noqa: B019 (a handful of norms per process, each kept for its life anyway)
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) per channel of `normalized = raw * weight + bias` (built once; never written to)."""
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        return self.rescale_factor / std, -mean / std


def _per_channel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Patch rows are [channel, rest] flattened, as vLLM's device-side norm reads them.
    patches, size = x.shape
    channels = weight.numel()
    x = x.reshape(patches, channels, size // channels)
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    # One pass and one new tensor (bias + x * weight); separate ops made two, each page-faulted in.
    out = torch.addcmul(bias.view(1, channels, 1), x, weight.view(1, channels, 1))
    return out.reshape(patches, size).to(dtype)


def prepare_pixels(
    pixels: torch.Tensor, norm: PixelNorm | None, device_normalizes: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Return `pixels` ([patches, C*...], uint8 or float) as the vision tower wants them."""
    is_raw = pixels.dtype == torch.uint8
    if norm is None:
        return pixels.to(dtype)
    weight, bias = norm.affine()
    if device_normalizes:
        if is_raw:
            return pixels
        return _per_channel(pixels, 1.0 / weight, -bias / weight, torch.float32)
    if is_raw:
        return _per_channel(pixels, weight, bias, dtype)
    return pixels.to(dtype)
