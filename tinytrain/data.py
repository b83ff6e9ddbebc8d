"""Synthetic "shapes" images and one-word questions about them, generated from a seed.

Every image holds one shape in one colour (size, position, rotation, outline and
anti-aliasing vary) on a background of any hue, flat, graded or split in two, kept apart
from the shape's colour, so every question has exactly one answer:

    "What colour is the shape?"   -> red / green / blue / yellow / purple / orange / white / black
    "What shape is it?"           -> circle / square / triangle / star / cross

Same seed, same samples, on every machine (only Python's `random` and Pillow drawing).
"""

import colorsys
import itertools
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
# Colour and shape are asked equally often. Asked a quarter of the time, colour was sometimes never learned in
# stage 2, or only after ~1,300 steps (docs/tiny-model.md).
QUESTION_WEIGHTS = {"colour": 1.0, "shape": 1.0}
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
SIZES: dict[tuple[int, int], float] = {(56, 56): 0.5, (56, 84): 0.25, (84, 56): 0.25}
# The shape's radius as a fraction of the image's shorter side (its width is 56-100% of that side),
# so the model reads a shape at any size a person would draw it, not at one scale.
RADIUS = (0.28, 0.5)
# A cross's arms reach this share of the radius: a plus sign drawn edge to edge, or a compact one.
CROSS_ARM = (0.75, 1.0)
# Up to this share of the radius may fall past the image's edge (a shape drawn as large as the
# image, or near its border, is clipped a little).
OFF_FRAME = 0.12
# A curriculum's first lessons: large, nearly upright shapes on grey, drawn plainly (see `easy`).
EASY_RADIUS, EASY_TURN = (0.36, 0.45), 0.3
# A shape reads the same after these turns (radians); each is drawn at any angle below its own.
PERIOD = {"circle": 0.0, "square": math.pi / 2, "triangle": 2 * math.pi / 3, "star": 2 * math.pi / 5,
          "cross": math.pi / 2}
# The coverage mask a training-only head learns (tinytrain/train.py VisionProbe): 4-pixel cells.
MASK_SCALE = 4
# Anti-aliased drawing: the scene drawn this many times larger, then averaged down.
SUPERSAMPLE = 4
# Backgrounds are kept at least this far (Euclidean RGB) from the shape's drawn colour: a shape
# that is the background's colour has no answer.
MIN_CONTRAST = 90


@dataclass
class Sample:
    image: Image.Image
    colour: str
    shape: str

    mask: Image.Image | None = None  # the shape's coverage (outline included), 1/MASK_SCALE of each side

    def answer(self, kind: str) -> str:
        return {"colour": self.colour, "shape": self.shape}[kind]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float, rng: random.Random) -> list[tuple[float, float]]:
    """Outline of `shape` with circumradius-ish `r` around (cx, cy), rotated by `angle` radians;
    a star's inner radius and a cross's arm width vary with `rng`."""
    if shape == "square":
        s = r / math.sqrt(2)
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        inner = rng.uniform(0.36, 0.52)
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * inner
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        a = r * rng.uniform(*CROSS_ARM)
        b = a * rng.uniform(0.26, 0.42)
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    else:
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _tone(rng: random.Random, avoid: tuple[int, int, int], grey: bool = False) -> tuple[int, int, int]:
    """A background colour: tinted mid grey, or any hue; never within MIN_CONTRAST of `avoid`."""
    while True:
        if grey or rng.random() < 0.4:
            base = rng.randint(80, 180)
            rgb = tuple(min(255, max(0, base + rng.randint(-30, 30))) for _ in range(3))
        else:
            rgb = tuple(round(v * 255) for v in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.2, 0.9)))
        if math.dist(rgb, avoid) >= MIN_CONTRAST:
            return rgb


def _background(rng: random.Random, w: int, h: int, avoid: tuple[int, int, int], plain: bool = False) -> Image.Image:
    """Flat, a linear gradient, or two tones split by a line at any angle; optionally mild noise.
    `plain`: flat grey only."""
    c0 = _tone(rng, avoid, grey=plain)
    style = "flat" if plain else rng.choice(("flat", "gradient", "split"))
    img = Image.new("RGB", (w, h), c0)
    if style == "gradient":
        c1 = _tone(rng, avoid)
        horizontal = rng.random() < 0.5
        n = w if horizontal else h
        strip = Image.new("RGB", (n, 1))
        strip.putdata([tuple(round(a + (b - a) * i / max(1, n - 1)) for a, b in zip(c0, c1)) for i in range(n)])
        img = strip.resize((w, h), Image.NEAREST) if horizontal else strip.resize((h, w), Image.NEAREST).transpose(
            Image.Transpose.TRANSPOSE)
    elif style == "split":
        c1 = _tone(rng, avoid)
        px, py, a = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, math.pi)
        ux, uy, far = math.cos(a), math.sin(a), 2 * (w + h)
        ImageDraw.Draw(img).polygon([(px - ux * far, py - uy * far), (px + ux * far, py + uy * far),
                                     (px + ux * far - uy * far, py + uy * far + ux * far),
                                     (px - ux * far - uy * far, py - uy * far + ux * far)], fill=c1)
    if rng.random() < 0.4:  # mild noise, seeded through the same generator
        noise = Image.frombytes("L", (w, h), rng.randbytes(w * h))
        img = Image.blend(img, Image.merge("RGB", (noise, noise, noise)), rng.uniform(0.03, 0.10))
    return img


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 18) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def pick_size(rng: random.Random) -> tuple[int, int]:
    return rng.choices(list(SIZES), weights=list(SIZES.values()))[0]


def make_sample(rng: random.Random, size: tuple[int, int] | None = None, colour: str | None = None,
                easy: bool = False) -> Sample:
    """One image with one shape: any size in RADIUS, any turn, anywhere (its rim may pass the edge,
    OFF_FRAME); filled, sometimes outlined; aliased or anti-aliased; with its coverage mask. `colour`
    overrides the drawn colour without changing anything else the seed draws (the same scene in
    another colour). `easy`: a large, nearly upright shape wholly inside, on flat grey, no outline,
    aliased (a curriculum's start)."""
    w, h = size or pick_size(rng)
    drawn = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    img = _background(rng, w, h, COLOURS[drawn], plain=easy)
    r = min(w, h) * rng.uniform(*(EASY_RADIUS if easy else RADIUS))
    inside = r if easy else r * (1 - OFF_FRAME)  # how near an edge the centre may come
    cx, cy = rng.uniform(inside, w - inside), rng.uniform(inside, h - inside)
    fill = _jitter(rng, COLOURS[colour or drawn])
    outline, width = None, 0
    if not easy and rng.random() < 0.35:  # an outline: darker, lighter, black or white, 1-2 pixels
        outline = rng.choice((tuple(v // 2 for v in fill), tuple((v + 255) // 2 for v in fill), (0, 0, 0),
                              (255, 255, 255)))
        width = rng.choice((1, 2))
    k = SUPERSAMPLE if not easy and rng.random() < 0.5 else 1
    canvas = img.resize((w * k, h * k), Image.NEAREST) if k > 1 else img
    draw = ImageDraw.Draw(canvas)
    cover = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    if shape == "circle":
        for d, f, o, s in ((draw, fill, outline, k), (ImageDraw.Draw(cover), 255, 255 if outline else None, SUPERSAMPLE)):
            d.ellipse([s * (cx - r), s * (cy - r), s * (cx + r), s * (cy + r)], fill=f, outline=o, width=s * width)
    else:
        turn = rng.uniform(-EASY_TURN, EASY_TURN) if easy and shape != "star" else rng.uniform(0, PERIOD[shape])
        pts = _polygon(shape, cx, cy, r, turn, rng)
        draw.polygon([(k * x, k * y) for x, y in pts], fill=fill, outline=outline, width=k * width)
        ImageDraw.Draw(cover).polygon([(SUPERSAMPLE * x, SUPERSAMPLE * y) for x, y in pts], fill=255,
                                      outline=255 if outline else None, width=SUPERSAMPLE * width)
    img = canvas.resize((w, h), Image.BOX) if k > 1 else canvas
    return Sample(img, colour or drawn, shape, cover.resize((w // MASK_SCALE, h // MASK_SCALE), Image.BOX))


def filler(rng: random.Random, sentences: int) -> str:
    """`sentences` sentences of 3-12 random filler words, each ending in ". "."""
    return "".join(" ".join(rng.choice(FILLER_WORDS) for _ in range(rng.randint(3, 12))).capitalize() + ". "
                   for _ in range(sentences))


def make_qa(rng: random.Random, size: tuple[int, int] | None = None, sentences: int = 0, easy: bool = False):
    """One (sample, kind, question, answer); the question starts with `sentences` sentences of filler."""
    kind = rng.choices(list(QUESTION_WEIGHTS), weights=list(QUESTION_WEIGHTS.values()))[0]
    sample = make_sample(rng, size, easy=easy)
    return sample, kind, filler(rng, sentences) + QUESTIONS[kind], sample.answer(kind)


def batches(seed: int, batch_size: int, easy_share=None):
    """Endless reproducible training batches; every batch shares one image size, and a fifth
    of them carry 1-8 sentences of filler, as many in each of its prompts (whole batches of near
    one length: short prompts are not padded to long ones, nor 1 sentence to 8).
    `easy_share(i)`: the chance that batch i is all `easy` samples (a curriculum)."""
    rng = random.Random(seed)
    for i in itertools.count():
        size, sentences = pick_size(rng), rng.randint(1, 8) if rng.random() < 0.2 else 0
        easy = easy_share is not None and rng.random() < easy_share(i)
        yield [make_qa(rng, size=size, sentences=sentences, easy=easy) for _ in range(batch_size)]


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
