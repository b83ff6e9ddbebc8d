"""Synthetic "shapes" images and one-word questions about them, generated from a seed.

Every image holds one, two or three copies of a single shape in a single colour
(sizes, positions and rotations vary), on a tinted-grey background that may carry a
gradient and mild noise, so every question has exactly one answer:

    "What colour is the shape?"   -> red / green / blue / yellow / purple / orange / white / black
    "What shape is it?"           -> circle / square / triangle / star / cross
    "How many shapes are there?"  -> one / two / three

Same seed, same samples, on every machine (only Python's `random` and Pillow drawing).
"""

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 40, 185),
    "orange": (250, 135, 15),
    "white": (248, 248, 248),
    "black": (12, 12, 12),
}
SHAPES = ["circle", "square", "triangle", "star", "cross"]
COUNT_WORDS = ["one", "two", "three"]

QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
}
# Every answer the model may give; the tokenizer makes each of these one token.
ANSWER_WORDS = [*COLOURS, *SHAPES, *COUNT_WORDS]

# Scene knobs: how many copies (weights for 1, 2, 3) and their radius in pixels, per count.
# Radii are absolute, not relative to the image: a shape 2-3 patches (14 px) across shows a
# corner, a curve or a spike in every patch it touches, which a tiny ViT picks up quickly;
# a shape many patches wide is mostly flat interior and much slower to learn.
COUNT_WEIGHTS = (0.34, 0.33, 0.33)
RADIUS = {1: (12.0, 22.0), 2: (10.0, 16.0), 3: (9.0, 14.0)}

# Image sides (pixels). Multiples of 28 map 1:1 onto patches (112x112 -> 16 image tokens);
# the odd ones exercise the image processor's resize.
_SIDES = [112] * 6 + [84, 140, 168, 100, 126]


@dataclass
class Sample:
    image: Image.Image
    colour: str
    shape: str
    count: int

    def answer(self, kind: str) -> str:
        return {"colour": self.colour, "shape": self.shape, "count": COUNT_WORDS[self.count - 1]}[kind]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline of `shape` with circumradius-ish `r` around (cx, cy), rotated by `angle` radians."""
    if shape == "square":
        s = r / math.sqrt(2) * 1.15
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        pts = [(x, y + r * 0.18) for x, y in pts]  # centre the bounding box
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        a, b = r, r * 0.34
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    else:
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _background(rng: random.Random, w: int, h: int) -> Image.Image:
    """Tinted mid grey, optionally a linear gradient, plus mild per-pixel noise."""
    base = rng.randint(80, 180)
    c0 = [min(255, max(0, base + rng.randint(-30, 30))) for _ in range(3)]
    if rng.random() < 0.5:
        img = Image.new("RGB", (w, h), tuple(c0))
    else:
        c1 = [min(255, max(0, v + rng.randint(-45, 45))) for v in c0]
        horizontal = rng.random() < 0.5
        n = w if horizontal else h
        strip = Image.new("RGB", (n, 1))
        strip.putdata([tuple(round(a + (b - a) * i / max(1, n - 1)) for a, b in zip(c0, c1)) for i in range(n)])
        img = strip.resize((w, h), Image.NEAREST) if horizontal else strip.resize((h, w), Image.NEAREST).transpose(
            Image.Transpose.TRANSPOSE)
    if rng.random() < 0.5:  # mild noise, seeded through the same generator
        noise = Image.frombytes("L", (w, h), bytes(rng.getrandbits(8) for _ in range(w * h)))
        img = Image.blend(img, Image.merge("RGB", (noise, noise, noise)), rng.uniform(0.03, 0.10))
    return img


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 18) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


SPIN = {"circle": 0.0, "square": 0.35, "triangle": 0.35, "star": math.pi, "cross": 0.35}


def pick_size(rng: random.Random) -> tuple[int, int]:
    w, h = rng.choice(_SIDES), rng.choice(_SIDES)
    return (w, w) if rng.random() < 0.5 else (w, h)


def make_sample(rng: random.Random, count: int | None = None, size: tuple[int, int] | None = None) -> Sample:
    """One image: `count` (default: drawn 1-3) non-overlapping copies of one shape in one colour."""
    w, h = size or pick_size(rng)
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    if count is None:
        count = rng.choices([1, 2, 3], weights=COUNT_WEIGHTS)[0]
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    side = min(w, h)
    lo, hi = RADIUS[count]
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _attempt in range(200):
            r = min(rng.uniform(lo, hi), side * 0.45)
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            if all(math.hypot(cx - x, cy - y) > r + q + 4 for x, y, q in placed):
                break
        else:  # no room: shrink the scene to what fits
            break
        placed.append((cx, cy, r))
    fill = _jitter(rng, COLOURS[colour])
    spin = SPIN[shape]
    for cx, cy, r in placed:
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-spin, spin)), fill=fill)
    return Sample(img, colour, shape, len(placed))


def samples(seed: int):
    """Endless reproducible stream of samples."""
    rng = random.Random(seed)
    while True:
        yield make_sample(rng)


def qa_stream(seed: int, kinds=("colour", "shape", "count"), weights=(1.0, 1.3, 1.0)):
    """Endless reproducible (sample, kind, question, answer) stream, one question per image."""
    rng = random.Random(seed ^ 0x5EED)
    for sample in samples(seed):
        kind = rng.choices(kinds, weights=weights)[0]
        yield sample, kind, QUESTIONS[kind], sample.answer(kind)


def main() -> None:  # write a contact sheet to eyeball the data
    import argparse
    import pathlib

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("models/shapes-sheet.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-n", type=int, default=48)
    args = parser.parse_args()
    cols, cell = 8, 176
    rows = (args.n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, s in zip(range(args.n), samples(args.seed)):
        x, y = (i % cols) * cell, (i // cols) * cell
        sheet.paste(s.image, (x + 2, y + 2))
        draw.text((x + 2, y + cell - 12), f"{s.colour} {s.shape} {s.count}", fill=(0, 0, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
