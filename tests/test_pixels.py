"""Pixel preparation: uint8 and normalized floats reach the tower in the form it takes."""

import pytest
import torch
from transformers import AutoImageProcessor

from engine_adapter.engine import parse_engine_args
from engine_adapter.info import pixel_norm
from engine_adapter.pixels import PixelNorm, prepare_pixels
from tests.fixtures import ENGINE_ARGS, MODEL, image

NORM = PixelNorm(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), rescale_factor=1 / 255)


def _normalize(raw: torch.Tensor) -> torch.Tensor:
    """Reference: HF's (x/255 - mean)/std per channel on [patch, channel, rest] rows."""
    x = raw.to(torch.float32).reshape(raw.shape[0], 3, -1) / 255
    mean = torch.tensor(NORM.mean).view(1, 3, 1)
    std = torch.tensor(NORM.std).view(1, 3, 1)
    return ((x - mean) / std).reshape(raw.shape)


def test_uint8_passes_untouched_when_the_engine_normalizes():
    raw = torch.randint(0, 256, (4, 1176), dtype=torch.uint8)
    assert prepare_pixels(raw, NORM, True, torch.bfloat16) is raw


def test_normalized_floats_are_unnormalized_for_the_engine():
    raw = torch.randint(0, 256, (4, 1176), dtype=torch.uint8)
    back = prepare_pixels(_normalize(raw), NORM, True, torch.bfloat16)
    assert back.dtype == torch.float32
    assert torch.allclose(back, raw.to(torch.float32), atol=1e-3)


def test_uint8_is_normalized_when_the_engine_takes_floats():
    raw = torch.randint(0, 256, (4, 1176), dtype=torch.uint8)
    out = prepare_pixels(raw, NORM, False, torch.float32)
    assert torch.allclose(out, _normalize(raw), atol=1e-6)


def test_floats_are_cast_once_to_the_model_dtype():
    x = torch.randn(4, 1176, dtype=torch.float32)
    out = prepare_pixels(x, NORM, False, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x.to(torch.bfloat16))


@pytest.mark.parametrize("device", [True, False], ids=["device_norm", "host_norm"])
def test_engine_norm_is_the_image_processors(device):
    """pixel_norm from a real engine config of the tiny model (no engine started), with vLLM's device-side
    normalisation and without: it turns raw uint8 patches into HF's image processor's floats."""
    flags = [*ENGINE_ARGS, *(() if device else ("--no-mm-device-do-normalize",))]
    config = parse_engine_args(str(MODEL), flags).create_engine_config()
    assert config.model_config.multimodal_config.mm_device_do_normalize is device
    norm = pixel_norm(config)
    processor = AutoImageProcessor.from_pretrained(MODEL)
    pil = [image(112, 84, seed=3)]
    floats = processor(images=pil, return_tensors="pt")["pixel_values"]
    raw = processor(images=pil, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"].to(torch.uint8)
    assert torch.allclose(prepare_pixels(raw, norm, False, torch.float32), floats, atol=1e-5)
    if device:  # and back: floats a gateway normalised reach the device-normalising tower on its 0..255 scale
        assert torch.allclose(prepare_pixels(floats, norm, True, torch.float32), raw.to(torch.float32), atol=1e-3)
