"""Synthetic "shapes" images and one-word questions about them, generated from a seed.

Every image holds one shape in one colour (size, position and rotation vary) on a
tinted-grey background that may carry a gradient and mild noise, so every question has
exactly one answer:

    "What colour is the shape?"   -> red / green / blue / yellow / purple / orange / white / black
    "What shape is it?"           -> circle / square / triangle / star / cross

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

QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
}
QUESTION_WEIGHTS = {"colour": 1.0, "shape": 2.0}  # colour is learned in a few hundred steps, shape is not
# Filler prose that may sit between the image and the question (a fifth of training
# batches carry 1-8 sentences of it, up to ~180 tokens), so the model reads past text to the question and a
# test can put the image inside full 128-token KV blocks without leaving what it learned.
FILLER_WORDS = ("the a this that picture image photo shows one small large plain background with on of and "
                "here is some colour shape above below left right near far quick brown fox jumps over lazy "
                "dog hello world look at it carefully please answer in word").split()
# Every answer the model may give; the tokenizer makes each of these one token.
ANSWER_WORDS = [*COLOURS, *SHAPES]

# Image sizes (w, h) and how often each is drawn. All are multiples of 28, so the image
# processor keeps them as they are: 56x56 is 4x4 patches and 4 image tokens, 84x56 is 6.
# Small images on purpose: a shape that spans only a few 14-pixel patches shows a corner,
# a curve or a spike in each of them, which a tiny ViT learns in minutes; the same shape
# drawn 112 pixels wide is mostly flat interior per patch and takes far longer to learn.
SIZES: dict[tuple[int, int], float] = {(56, 56): 0.7, (56, 84): 0.15, (84, 56): 0.15}
# The shape's radius as a fraction of the image's shorter side: it fills much of the picture.
RADIUS = (0.36, 0.45)
# Rotation range (radians, either way) per shape; a star looks the same every 72 degrees.
SPIN = {"circle": 0.0, "square": 0.3, "triangle": 0.3, "star": math.pi, "cross": 0.3}


@dataclass
class Sample:
    image: Image.Image
    colour: str
    shape: str

    def answer(self, kind: str) -> str:
        return {"colour": self.colour, "shape": self.shape}[kind]


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


def pick_size(rng: random.Random) -> tuple[int, int]:
    return rng.choices(list(SIZES), weights=list(SIZES.values()))[0]


def make_sample(rng: random.Random, size: tuple[int, int] | None = None, colour: str | None = None) -> Sample:
    """One image with one shape. `colour` overrides the drawn colour without changing
    anything else the seed draws (the same scene in another colour)."""
    w, h = size or pick_size(rng)
    drawn = rng.choice(list(COLOURS))
    colour = colour or drawn
    shape = rng.choice(SHAPES)
    img = _background(rng, w, h)
    r = min(w, h) * rng.uniform(*RADIUS)
    cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
    fill = _jitter(rng, COLOURS[colour])
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-SPIN[shape], SPIN[shape])), fill=fill)
    return Sample(img, colour, shape)


def filler(rng: random.Random, sentences: int) -> str:
    """`sentences` sentences of 3-12 random filler words, each ending in ". "."""
    return "".join(" ".join(rng.choice(FILLER_WORDS) for _ in range(rng.randint(3, 12))).capitalize() + ". "
                   for _ in range(sentences))


def make_qa(rng: random.Random, size: tuple[int, int] | None = None, prose: bool = False):
    """One (sample, kind, question, answer); with `prose` the question starts with filler."""
    kind = rng.choices(list(QUESTION_WEIGHTS), weights=list(QUESTION_WEIGHTS.values()))[0]
    sample = make_sample(rng, size)
    lead = filler(rng, rng.randint(1, 8)) if prose else ""
    return sample, kind, lead + QUESTIONS[kind], sample.answer(kind)


def batches(seed: int, batch_size: int):
    """Endless reproducible training batches; every batch shares one image size, and a fifth
    of them (whole batches, so short prompts are not padded to long ones) carry filler."""
    rng = random.Random(seed)
    while True:
        size, prose = pick_size(rng), rng.random() < 0.2
        yield [make_qa(rng, size=size, prose=prose) for _ in range(batch_size)]


def held_out(seed: int, n_images: int):
    """`n_images` fresh images, each asked its colour and its shape: [(sample, kind, question, answer)]."""
    rng = random.Random(seed)
    samples = [make_sample(rng) for _ in range(n_images)]
    return [(s, k, QUESTIONS[k], s.answer(k)) for s in samples for k in QUESTIONS]


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
    rng = random.Random(args.seed)
    for i in range(args.n):
        s = make_sample(rng)
        x, y = (i % cols) * cell, (i // cols) * cell
        sheet.paste(s.image, (x + 2, y + 2))
        draw.text((x + 2, y + cell - 12), f"{s.colour} {s.shape}", fill=(0, 0, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
