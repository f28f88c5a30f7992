"""Pictures of the synthetic scenes: each image's objects drawn as simple labelled shapes.

The synthetic generator records every image's objects (class, colour, size and the normalised
box `[x1, y1, x2, y2]`) in `objects.json`; this module draws them with Pillow so a person can
see what a query found. A picture is a function of its objects, its size and its seed only:
the same inputs give a byte-identical PNG.

    render_split("runs/demo/data", "test", "runs/demo/scenes")  # -> [scenes/synth_000000.png, ...]
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.synthetic import COLOURS, OBJECTS, load_manifest
from utils.errors import DataError
from utils.files import atomic_output

# RGB of the generator's colour words.
RGB = {
    "red": (214, 39, 40), "blue": (31, 119, 180), "green": (44, 160, 44), "yellow": (240, 210, 30),
    "black": (25, 25, 25), "white": (250, 250, 250), "brown": (140, 86, 50), "orange": (255, 127, 14),
    "pink": (247, 150, 190), "purple": (148, 103, 189), "gray": (127, 127, 127),
}
SHAPES = ("ellipse", "rectangle", "rounded", "triangle", "diamond")
DEFAULT_SIZE = 128


def shape_of(name: str) -> str:
    """The shape that stands for an object class (fixed by the class's position in OBJECTS)."""
    return SHAPES[OBJECTS.index(name) % len(SHAPES)] if name in OBJECTS else "rectangle"


def _label_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    # Dark text on light fills, light text on dark ones, so every label stays readable.
    luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def render_scene(objects: Sequence[Mapping[str, Any]], size: int = DEFAULT_SIZE, seed: int = 0) -> Image.Image:
    """Draw one scene: a seeded pale background, then each object's shape in its box and colour.

    Args:
        objects: `objects.json` entries: `object`, `colour`, `size` ('small' / 'large') and
            `box` `[x1, y1, x2, y2]` in [0, 1].
        size: width and height in pixels.
        seed: varies the background tint only.

    Raises:
        DataError: an entry lacks a key or names an unknown colour.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    rng = np.random.default_rng(seed)
    tint = tuple(int(v) for v in 225 + rng.integers(0, 25, size=3))
    img = Image.new("RGB", (size, size), tint)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, size // 12))
    # Large objects first: small ones drawn over them stay visible.
    order = sorted(range(len(objects)), key=lambda i: objects[i].get("size") != "large")
    for i in order:
        obj = objects[i]
        try:
            name, colour, box = obj["object"], obj["colour"], obj["box"]
        except KeyError as err:
            raise DataError(f"scene object {dict(obj)} lacks {err}") from err
        if colour not in RGB:
            raise DataError(f"scene object {dict(obj)}: unknown colour {colour!r} (known: {', '.join(COLOURS)})")
        x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) * (size - 1) for v in box[:4])
        x2, y2 = max(x2, x1 + 2), max(y2, y1 + 2)
        fill, outline = RGB[colour], (40, 40, 40)
        shape = shape_of(name)
        if shape == "ellipse":
            draw.ellipse((x1, y1, x2, y2), fill=fill, outline=outline)
        elif shape == "rectangle":
            draw.rectangle((x1, y1, x2, y2), fill=fill, outline=outline)
        elif shape == "rounded":
            draw.rounded_rectangle((x1, y1, x2, y2), radius=max(1, int(min(x2 - x1, y2 - y1) / 4)),
                                   fill=fill, outline=outline)
        elif shape == "triangle":
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill, outline=outline)
        else:
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill, outline=outline)
        draw.text(((x1 + x2) / 2, (y1 + y2) / 2), name, fill=_label_colour(fill), font=font, anchor="mm")
    return img


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding of `img` (no metadata, so equal pictures give equal bytes).

    A 64-colour palette (the scenes hold a handful of flat colours) halves the file size.
    """
    buf = io.BytesIO()
    img.quantize(64, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def split_images(data_dir: str | os.PathLike, split: str) -> dict[str, list[dict[str, Any]]]:
    """img_db name -> objects, for the images of `split` of a synthetic dataset, in image order.

    Raises:
        MissingPathError: no synthetic dataset at `data_dir`.
        DataError: `split` has no images, or an image has no objects recorded.
    """
    manifest = load_manifest(str(data_dir))
    karpathy = json.loads(Path(manifest["karpathy_json"]).read_text(encoding="utf-8"))
    objects = json.loads(Path(manifest["objects"]).read_text(encoding="utf-8"))
    out = {}
    for entry in karpathy["images"]:
        if entry["split"] != split:
            continue
        name = Path(entry["filename"]).stem + ".npz"
        if name not in objects:
            raise DataError(f"{manifest['objects']}: no objects recorded for image {name}")
        out[name] = objects[name]
    if not out:
        raise DataError(f"{manifest['karpathy_json']}: no images in split {split!r}")
    return out


def render_split(data_dir: str | os.PathLike, split: str, out_dir: str | os.PathLike,
                 size: int = DEFAULT_SIZE) -> list[Path]:
    """Render every image of `split` to `out_dir/{name without .npz}.png` (atomically each).

    The seed of a picture is the dataset's seed plus the image's number, so a re-run
    rewrites the same bytes. Returns the written paths in image order.
    """
    manifest = load_manifest(str(data_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, objects in split_images(data_dir, split).items():
        stem = Path(name).stem
        number = int("".join(c for c in stem if c.isdigit()) or 0)
        data = png_bytes(render_scene(objects, size, seed=int(manifest["seed"]) * 1_000_003 + number))
        path = out_dir / f"{stem}.png"
        with atomic_output(path) as tmp:
            tmp.write_bytes(data)
        paths.append(path)
    return paths
