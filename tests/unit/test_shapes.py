"""The count-the-shapes visual task (data/shapes.py): answers checked by counting the non-white
12 x 12 cells of each rendered image, determinism, splits, sizes and bad sizes."""

from __future__ import annotations

from collections import Counter

import pytest

from posttrain.config.schema import ShapesSource
from posttrain.data.prompts import load_samples
from posttrain.data.shapes import CELL, shape_count_samples

pytestmark = pytest.mark.unit


def occupied_cells(image) -> int:
    width, height = image.size
    pixels = image.load()
    return sum(
        any(pixels[x, y] != (255, 255, 255) for x in range(left, left + CELL) for y in range(top, top + CELL))
        for top in range(0, height, CELL)
        for left in range(0, width, CELL)
    )


def test_answers_equal_the_shapes_drawn():
    samples = shape_count_samples(300, seed=3, max_count=5, image_sizes=[(48, 48), (60, 36)])
    assert [s.images[0].size for s in samples[:4]] == [(48, 48), (60, 36), (48, 48), (60, 36)]
    for sample in samples:
        assert occupied_cells(sample.images[0]) == int(sample.ground_truth) == sample.metadata["count"]
    counts = Counter(int(s.ground_truth) for s in samples)
    assert sorted(counts) == [1, 2, 3, 4, 5] and min(counts.values()) > 30  # about uniform (60 each)
    assert samples[0].origin == "shapes:train:0" and "How many shapes" in samples[0].prompt


def test_same_seed_same_images_and_splits_differ():
    first, again = (shape_count_samples(20, seed=1) for _ in range(2))
    assert [s.images[0].tobytes() for s in first] == [s.images[0].tobytes() for s in again]
    validation = shape_count_samples(20, seed=1, split="validation")
    assert all(a.images[0].tobytes() != b.images[0].tobytes() for a, b in zip(first, validation, strict=True))


def test_recipe_source_loads_and_bad_sizes_are_refused():
    source = ShapesSource(type="shapes", size=4, seed=0, max_count=3, image_sizes=[(36, 24)])
    samples = load_samples(source, split="validation")
    assert len(samples) == 4 and samples[0].origin == "shapes:validation:0"
    with pytest.raises(ValueError, match="multiples of 12"):
        shape_count_samples(2, seed=0, image_sizes=[(50, 48)])
    with pytest.raises(ValueError, match="at least max_count"):
        shape_count_samples(2, seed=0, max_count=5, image_sizes=[(24, 24)])


def test_solid_style_draws_black_shapes_edge_to_edge():
    samples = shape_count_samples(100, seed=3, max_count=3, image_sizes=[(36, 24)], style="solid")
    for sample in samples:
        image = sample.images[0]
        assert occupied_cells(image) == int(sample.ground_truth)
        colors = {color for _, color in image.getcolors()}
        assert colors <= {(255, 255, 255), (0, 0, 0)}
        # every filled cell reaches its bottom edge (squares and triangles) or its middle row's ends (circles)
        pixels = image.load()
        for top in range(0, 24, CELL):
            for left in range(0, 36, CELL):
                cell = [pixels[x, y] for x in range(left, left + CELL) for y in range(top, top + CELL)]
                if (0, 0, 0) in cell:
                    edge = [pixels[x, top + CELL - 1] for x in range(left, left + CELL)] + [pixels[left, top + CELL // 2]]
                    assert (0, 0, 0) in edge
    varied = shape_count_samples(100, seed=3, max_count=3, image_sizes=[(36, 24)])
    assert [s.ground_truth for s in varied] == [s.ground_truth for s in samples]  # same draws, other paint
    assert any(len(s.images[0].getcolors()) > 2 for s in varied)
