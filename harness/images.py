"""Generated, deterministic images for tests and benchmarks (no files, no downloads)."""

import base64
import io

import numpy as np
from PIL import Image


def image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic noise-and-gradient RGB image."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noise = rng.randint(0, 64, size=(height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8))


def noise(height: int, width: int, rng: np.random.RandomState) -> np.ndarray:
    """Uniform noise pixels, HxWx3 uint8, from `rng` (every call a new image)."""
    return rng.randint(0, 256, (height, width, 3), dtype=np.uint8)


def data_url(img: Image.Image) -> str:
    """An image as a PNG data URL, as a chat client sends it."""
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def noise_image(seed: int, size: int = 448) -> str:
    """A deterministic blocky-noise image as a PNG data URL (448 px: 256 image tokens on the tiny model, two
    KV blocks)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    return data_url(Image.fromarray(pixels).resize((size, size), Image.NEAREST))
