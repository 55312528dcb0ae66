"""A procedural visual task: count the shapes drawn in an image (rendered with Pillow, offline).

Each image is a white canvas cut into 12 x 12-pixel cells; `count` distinct cells each get one
filled circle, square or triangle in a random color, inset so shapes never touch. The answer is
the number of shapes. Canvas sides are multiples of 12 px, the size Gemma 4's image processor
maps to whole soft tokens without resizing (one token per 12 x 12 pixels). Train and validation
draw from different seeds (`split`), so their images differ; with few possible counts the
answers themselves repeat, as in any counting task.

Style "solid" draws every shape black and edge to edge in its cell: one strong, uniform feature
per filled cell. A tiny random-init vision tower learns to count those within a few hundred
supervised steps, where the varied colors and inset shapes of "varied" stayed at chance for 400
(soft tokens of empty and filled cells differ by ~4% of their norm at init).
"""

from __future__ import annotations

import random
from typing import Literal

from PIL import Image, ImageDraw

from posttrain.data.types import Sample

Style = Literal["varied", "solid"]

CELL = 12
INSET = 2
KINDS = ("circle", "square", "triangle")
COLORS = ((220, 40, 40), (40, 160, 40), (40, 80, 220), (230, 160, 20), (150, 50, 180), (20, 170, 170))
PROMPT = "How many shapes are in the image? Answer with a number."


def cells(width: int, height: int) -> list[tuple[int, int]]:
    """The top-left corners of a canvas's whole 12 x 12 cells."""
    return [(x, y) for y in range(0, height - CELL + 1, CELL) for x in range(0, width - CELL + 1, CELL)]


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, left: int, top: int, color: tuple[int, int, int], inset: int = INSET
) -> None:
    box = (left + inset, top + inset, left + CELL - 1 - inset, top + CELL - 1 - inset)
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    else:
        x0, y0, x1, y1 = box
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def render_count_image(rng: random.Random, count: int, width: int, height: int, style: Style = "varied") -> Image.Image:
    """`count` shapes in distinct cells of a white `width` x `height` canvas."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for left, top in rng.sample(cells(width, height), count):
        kind, color = rng.choice(KINDS), rng.choice(COLORS)  # drawn in both styles: the same layouts
        if style == "solid":
            draw_shape(draw, kind, left, top, (0, 0, 0), inset=0)
        else:
            draw_shape(draw, kind, left, top, color)
    return image


def shape_count_samples(
    size: int,
    *,
    seed: int,
    max_count: int = 6,
    image_sizes: list[tuple[int, int]] | tuple[tuple[int, int], ...] = ((48, 48),),
    split: str = "train",
    style: Style = "varied",
) -> list[Sample]:
    """`size` count-the-shapes prompts with one image each; counts uniform in [1, max_count], image
    sizes (width, height) cycling through `image_sizes`."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    for width, height in image_sizes:
        if width % CELL or height % CELL or len(cells(width, height)) < max_count:
            raise ValueError(
                f"image size {width}x{height}: sides must be multiples of {CELL} px with at least max_count "
                f"({max_count}) cells of {CELL} x {CELL}"
            )
    rng = random.Random(f"shapes:{split}:{seed}")
    samples = []
    for index in range(size):
        width, height = image_sizes[index % len(image_sizes)]
        count = rng.randint(1, max_count)
        samples.append(
            Sample(
                prompt=PROMPT,
                ground_truth=str(count),
                metadata={"task": "count_shapes", "count": count},
                origin=f"shapes:{split}:{index}",
                images=(render_count_image(rng, count, width, height, style),),
            )
        )
    return samples
