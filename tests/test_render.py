"""Pictures of the synthetic scenes: deterministic bytes, the right size, objects where their boxes say."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data.scene_render import (
    RGB,
    SHAPES,
    png_bytes,
    render_scene,
    render_split,
    shape_of,
)
from data.synthetic import COLOURS, OBJECTS
from utils.errors import DataError

SCENE = [
    {"object": "dog", "colour": "red", "size": "large", "box": [0.05, 0.1, 0.55, 0.7]},
    {"object": "car", "colour": "blue", "size": "small", "box": [0.6, 0.6, 0.95, 0.95]},
]


def test_same_inputs_same_bytes():
    a = png_bytes(render_scene(SCENE, 64, seed=3))
    b = png_bytes(render_scene([dict(o) for o in SCENE], 64, seed=3))
    assert a == b
    assert png_bytes(render_scene(SCENE, 64, seed=4)) != a  # the seed tints the background
    assert png_bytes(render_scene(SCENE[:1], 64, seed=3)) != a


@pytest.mark.parametrize("size", [32, 100])
def test_objects_drawn_in_their_box_and_colour(size):
    img = Image.open(io.BytesIO(png_bytes(render_scene(SCENE, size, seed=0)))).convert("RGB")
    assert img.size == (size, size)
    for obj in SCENE:
        x1, y1, x2, y2 = (v * (size - 1) for v in obj["box"])
        # Bottom middle of the box is inside every shape (ellipse, triangle, diamond, ...) and
        # away from the label drawn at the centre.
        pixel = img.getpixel((round((x1 + x2) / 2), round(y1 + 0.8 * (y2 - y1))))
        assert all(abs(p - q) <= 16 for p, q in zip(pixel, RGB[obj["colour"]])), (obj, pixel)
    corner = img.getpixel((size - 1, 0))  # outside both boxes: the pale background
    assert min(corner) >= 200


def test_every_colour_and_class_has_a_drawing():
    assert set(RGB) == set(COLOURS)
    assert {shape_of(o) for o in OBJECTS} == set(SHAPES)


def test_bad_objects_are_data_errors():
    with pytest.raises(DataError, match="colour"):
        render_scene([{"object": "dog", "colour": "teal", "size": "large", "box": [0, 0, 1, 1]}])
    with pytest.raises(DataError, match="box"):
        render_scene([{"object": "dog", "colour": "red", "size": "large"}])


def test_render_split(synthetic_tiny, tmp_path):
    paths = render_split(synthetic_tiny["root"], "test", tmp_path / "a", size=48)
    karpathy = json.loads(Path(synthetic_tiny["karpathy_json"]).read_text())
    test_stems = [Path(e["filename"]).stem for e in karpathy["images"] if e["split"] == "test"]
    assert [p.stem for p in paths] == test_stems and len(paths) == synthetic_tiny["counts"]["test"]["images"]
    again = render_split(synthetic_tiny["root"], "test", tmp_path / "b", size=48)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    objects = json.loads(Path(synthetic_tiny["objects"]).read_text())
    for path in paths:
        with Image.open(path) as img:
            assert img.size == (48, 48)
        assert len(objects[path.stem + ".npz"]) >= 2
    with pytest.raises(DataError, match="no images in split 'dev'"):
        render_split(synthetic_tiny["root"], "dev", tmp_path / "c")
