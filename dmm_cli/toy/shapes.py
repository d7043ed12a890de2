"""Synthetic captioned pictures for the toy zoo: coloured shapes drawn in one of several styles.

A style is a property of the picture alone (background, fill, line), never of the caption, so a
teacher fine-tuned on one style answers the same prompts as the base, only drawn differently.
"""
from __future__ import annotations

import colorsys
import itertools
import math

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
_SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "yellow": (240, 215, 25),
    "green": (30, 190, 40),
    "cyan": (25, 205, 220),
    "blue": (30, 50, 235),
    "magenta": (215, 35, 210),
}
SHAPES = ("circle", "square", "triangle")
BASE_STYLE = "plain"
TEACHER_STYLES = ("night", "outline", "stripes", "checker")
STYLES = (BASE_STYLE, *TEACHER_STYLES)

# Colour/shape pairs never seen in distillation data, so style transfer is measured on unseen prompts.
HELD_OUT = (("blue", "triangle"), ("yellow", "square"), ("magenta", "circle"), ("green", "square"))


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def all_pairs() -> list[tuple[str, str]]:
    return list(itertools.product(COLOURS, SHAPES))


def training_pairs() -> list[tuple[str, str]]:
    return [p for p in all_pairs() if p not in HELD_OUT]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | tuple:
    if shape == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill=None, outline=None, width: int = 0) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(box, fill=fill, outline=outline, width=width)


def render(colour: str, shape: str, style: str, rng: np.random.Generator) -> Image.Image:
    """One SIZE×SIZE RGB picture; placement and size are drawn from `rng`."""
    n = SIZE * _SUPERSAMPLE
    rgb = COLOURS[colour]
    r = rng.uniform(8.5, 12.0) * _SUPERSAMPLE
    cx = n / 2 + rng.uniform(-3.5, 3.5) * _SUPERSAMPLE
    cy = n / 2 + rng.uniform(-3.5, 3.5) * _SUPERSAMPLE
    box = _outline(shape, cx, cy, r)

    background = (20, 20, 24) if style == "night" else (255, 255, 255)
    img = Image.new("RGB", (n, n), background)
    draw = ImageDraw.Draw(img)
    if style == "checker":
        cell = 8 * _SUPERSAMPLE
        for y in range(0, n, cell):
            for x in range(0, n, cell):
                if (x // cell + y // cell) % 2:
                    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(170, 170, 170))
    if style == "outline":
        _draw_shape(draw, shape, box, outline=rgb, width=3 * _SUPERSAMPLE)
    elif style == "stripes":
        mask = Image.new("L", (n, n), 0)
        _draw_shape(ImageDraw.Draw(mask), shape, box, fill=255)
        yy, xx = np.mgrid[0:n, 0:n]
        bands = ((xx + yy) // (4 * _SUPERSAMPLE)) % 2 == 0
        stripe = np.where(bands[..., None], np.array(rgb, np.uint8), np.uint8(255)).astype(np.uint8)
        img.paste(Image.fromarray(stripe, "RGB"), (0, 0), mask)
    else:
        _draw_shape(draw, shape, box, fill=rgb)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def dominant_colour(image: Image.Image | np.ndarray) -> str | None:
    """The palette colour whose hue is nearest the picture's saturated pixels, or None if there are none.

    This is the pixel check behind "follows the colour word": backgrounds of every style are grey,
    so the only strongly chromatic pixels belong to the shape.
    """
    a = np.asarray(image, dtype=np.float32) / 255.0
    chroma = a.max(-1) - a.min(-1)
    pixels = a[chroma > 0.35]
    if len(pixels) < 4:
        return None
    votes: dict[str, int] = {}
    palette = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}
    for px in pixels:
        hue = colorsys.rgb_to_hsv(*px)[0]
        name = min(palette, key=lambda k: min(abs(hue - palette[k]), 1 - abs(hue - palette[k])))
        votes[name] = votes.get(name, 0) + 1
    return max(votes, key=votes.get)


def dataset(style: str, pairs: list[tuple[str, str]], per_pair: int, seed: int) -> list[tuple[Image.Image, str]]:
    """`per_pair` pictures of every (colour, shape) pair, in a seeded, deterministic order."""
    rng = np.random.default_rng([seed, STYLES.index(style)])
    return [(render(c, s, style, rng), caption(c, s)) for c, s in pairs for _ in range(per_pair)]
