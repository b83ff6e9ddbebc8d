"""A second, independent way to draw the shapes questions: the evaluation's renderer, never training's.

Written apart from tinytrain/data.py and kept out of training. It draws with Pillow's own primitives
(`ellipse`, `regular_polygon`, `rectangle`) on a 4x canvas, optionally with an outline, rotates a
shape layer with `Image.rotate`, and downsamples with a box filter (anti-aliasing). Backgrounds are
flat or split in two tones of any hue, kept visibly apart from the shape's colour. The shape's
circumradius is `scale` x the image's short side, placed anywhere it fits; near scale 0.5 the
shape's layer is wider than the short side, so a rim is cut off.

Same seed, same images. Answers use tinytrain's colour and shape names (the task, not the drawing).
"""

import colorsys
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

# The colour names a user asks about, drawn with this renderer's own idea of each colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 25, 35), "green": (40, 160, 60), "blue": (25, 60, 215), "yellow": (240, 215, 40),
    "purple": (130, 50, 180), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ((56, 56), (84, 56), (56, 84))
SUPER = 4  # draw at 4x, then box-filter down


@dataclass
class Drawn:
    image: Image.Image
    colour: str
    shape: str
    scale: float


def _background_colour(rng: random.Random, avoid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Any hue, any moderate saturation and value, at least 120 RGB units from the shape's colour."""
    while True:
        h, s, v = rng.random(), rng.uniform(0.0, 0.7), rng.uniform(0.25, 0.85)
        rgb = tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))
        if math.dist(rgb, avoid) >= 120:
            return rgb


def _canvas(rng: random.Random, w: int, h: int, avoid) -> Image.Image:
    first = _background_colour(rng, avoid)
    img = Image.new("RGB", (w, h), first)
    if rng.random() < 0.5:  # two-tone: a straight split at a random angle through a random point
        second = _background_colour(rng, avoid)
        px, py, a = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, math.pi)
        far = 2 * (w + h)
        dx, dy = math.cos(a) * far, math.sin(a) * far
        half = [(px - dx, py - dy), (px + dx, py + dy), (px + dx - dy, py + dy + dx), (px - dx - dy, py - dy + dx)]
        ImageDraw.Draw(img).polygon(half, fill=second)
    return img


def _star(r: float, inner: float) -> list[tuple[float, float]]:
    return [((r if k % 2 == 0 else r * inner) * math.sin(k * math.pi / 5),
             -(r if k % 2 == 0 else r * inner) * math.cos(k * math.pi / 5)) for k in range(10)]


def _shape_layer(shape: str, r: float, fill, outline, width: int, rng: random.Random) -> Image.Image:
    """The shape centred on a transparent square layer of side 2r + margin (already at SUPER scale)."""
    side = int(2 * r + 4 * width + 8)
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    c = side / 2
    kw = dict(fill=fill + (255,), outline=(outline + (255,)) if outline else None, width=width if outline else 0)
    if shape == "circle":
        d.ellipse((c - r, c - r, c + r, c + r), **kw)
    elif shape == "square":
        d.regular_polygon((c, c, r), 4, rotation=rng.uniform(0, 90), **kw)
    elif shape == "triangle":
        d.regular_polygon((c, c, r), 3, rotation=rng.uniform(0, 120), **kw)
    elif shape == "star":
        pts = [(c + x, c + y) for x, y in _star(r, rng.uniform(0.38, 0.5))]
        d.polygon(pts, **kw)
    else:  # a plus sign: two bars, then the layer turned as a whole
        arm = r * rng.uniform(0.28, 0.4)
        d.rectangle((c - r, c - arm, c + r, c + arm), fill=kw["fill"])
        d.rectangle((c - arm, c - r, c + arm, c + r), fill=kw["fill"])
        if outline:
            d.line([(c - arm, c - r), (c + arm, c - r), (c + arm, c - arm), (c + r, c - arm), (c + r, c + arm),
                    (c + arm, c + arm), (c + arm, c + r), (c - arm, c + r), (c - arm, c + arm), (c - r, c + arm),
                    (c - r, c - arm), (c - arm, c - arm), (c - arm, c - r)], fill=outline + (255,), width=width)
        layer = layer.rotate(rng.uniform(0, 90), resample=Image.BICUBIC)
    return layer


def draw(rng: random.Random, scale: tuple[float, float] = (0.3, 0.5)) -> Drawn:
    colour, shape = rng.choice(list(PALETTE)), rng.choice(SHAPES)
    w, h = rng.choice(SIZES)
    fill = tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in PALETTE[colour])
    big = _canvas(rng, w * SUPER, h * SUPER, fill)
    k = rng.uniform(*scale)
    r = k * min(w, h) * SUPER
    outline = None
    if rng.random() < 0.4:  # an outline: darker or lighter than the fill, or plain black / white
        outline = rng.choice([tuple(v // 2 for v in fill), tuple((v + 255) // 2 for v in fill), (0, 0, 0), (255, 255, 255)])
    layer = _shape_layer(shape, r, fill, outline, rng.randint(1, 2) * SUPER, rng)
    x = rng.uniform(0, max(0, big.width - layer.width))
    y = rng.uniform(0, max(0, big.height - layer.height))
    big.paste(layer, (round(x), round(y)), layer)
    return Drawn(big.resize((w, h), Image.BOX), colour, shape, k)


def samples(seed: int, n: int, scale: tuple[float, float] = (0.3, 0.5)) -> list[Drawn]:
    rng = random.Random(seed)
    return [draw(rng, scale) for _ in range(n)]


def held_out(seed: int, n: int):
    """`n` images, each asked its colour and its shape, as tinytrain.data.held_out: [(drawn, kind, question, answer)]."""
    from tinytrain.data import QUESTIONS  # the questions are the task's, not the drawing's

    return [(d, kind, question, d.colour if kind == "colour" else d.shape)
            for d in samples(seed, n) for kind, question in QUESTIONS.items()]


if __name__ == "__main__":  # a contact sheet to look at
    import sys

    cell, cols = 96, 10
    items = samples(int(sys.argv[1]) if len(sys.argv) > 1 else 0, 60)
    sheet = Image.new("RGB", (cols * cell, (len(items) + cols - 1) // cols * cell), "white")
    for i, s in enumerate(items):
        sheet.paste(s.image, (i % cols * cell, i // cols * cell))
        ImageDraw.Draw(sheet).text((i % cols * cell, i // cols * cell + 86), f"{s.colour} {s.shape}", fill="black")
    sheet.save(sys.argv[2] if len(sys.argv) > 2 else "/tmp/second_renderer.png")
