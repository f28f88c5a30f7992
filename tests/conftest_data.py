"""Fixtures and helpers shared by the data-layer tests.

The raw writers here build databases with plain lmdb / msgpack / msgpack-numpy / lz4 /
numpy, as the original preprocessing did, so the readers are tested against the format and
not against our own writers. Import what a test module needs::

    from tests.conftest_data import synthetic_tiny  # noqa: F401  (pytest fixture)
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import pytest

BERT_META = {"UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103, "v_range": [999, 28996],
             "bert": "bert-base-cased"}


def write_raw_txt_db(db_dir: Path, records: dict[str, dict[str, Any]],
                     img_order: list[str] | None = None, meta: dict | None = None) -> Path:
    """A txt_db written the original way; side files follow ``records``' order."""
    env = lmdb.open(str(db_dir), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, rec in records.items():
            txn.put(key.encode(), lz4.frame.compress(msgpack.dumps(rec, use_bin_type=True)))
    env.close()
    img2txts: dict[str, list[str]] = {name: [] for name in (img_order or [])}
    for key, rec in records.items():
        img2txts.setdefault(rec["img_fname"], []).append(key)
    side = {"id2len.json": {k: len(r["input_ids"]) for k, r in records.items()},
            "txt2img.json": {k: r["img_fname"] for k, r in records.items()},
            "img2txts.json": img2txts, "meta.json": meta or BERT_META}
    for name, content in side.items():
        (db_dir / name).write_text(json.dumps(content))
    return db_dir


def put_raw(db_dir: Path, key: str, value: bytes) -> None:
    """Overwrites one raw LMDB value (e.g. to corrupt it)."""
    env = lmdb.open(str(db_dir), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(key.encode(), value)
    env.close()


def random_detections(rng: np.random.Generator, n: int, conf: np.ndarray | None = None
                      ) -> dict[str, np.ndarray]:
    """Detector output of one image: float16 arrays, rows sorted by conf (descending)."""
    if conf is None:
        conf = np.sort(rng.random(n))[::-1]
    xy = rng.random((n, 2)) * 0.5
    wh = 0.1 + rng.random((n, 2)) * 0.4
    return {"features": rng.standard_normal((n, 2048)).astype(np.float16),
            "norm_bb": np.concatenate([xy, xy + wh, wh], 1).astype(np.float16),
            "conf": np.asarray(conf, dtype=np.float16).reshape(n, 1),
            "soft_labels": rng.dirichlet(np.ones(1601), size=n).astype(np.float16)}


def _savez_with_allow_pickle(arrays: dict[str, np.ndarray]) -> bytes:
    # Old numpy's savez_compressed(buf, allow_pickle=True, **dump) stored a 0-d member named
    # 'allow_pickle'; numpy 2 treats that argument as an option, so build the zip by hand.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in {**arrays, "allow_pickle": np.array(True)}.items():
            with zf.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_raw_img_db(img_dir: Path, images: dict[str, dict[str, np.ndarray]],
                     name2nbb: dict[str, int] | None, feat_dir: str, compressed: bool,
                     nbb_file: str | None = None, with_keys: bool = True) -> Path:
    """An img_db written the original way: clipped arrays (first nbb rows) per image.

    ``name2nbb`` None stores the arrays unclipped (the conf_th == -1 layout).
    """
    img_dir.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(img_dir / feat_dir), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for name, arrays in images.items():
            nbb = name2nbb[name] if name2nbb is not None else len(arrays["features"])
            dump = {k: arrays[k][:nbb] for k in ("norm_bb", "features", "conf", "soft_labels")}
            if compressed:
                value = _savez_with_allow_pickle(dump)
            else:
                value = msgpack.dumps(dump, default=msgpack_numpy.encode, use_bin_type=True)
            txn.put(name.encode(), value)
        if with_keys:
            txn.put(b"__keys__", json.dumps(list(images)).encode())
    env.close()
    if nbb_file is not None and name2nbb is not None:
        (img_dir / nbb_file).write_text(json.dumps(name2nbb))
    return img_dir


def leftovers(parent: Path) -> list[str]:
    """Temporary entries a writer may have left in ``parent``."""
    return [p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p]


@pytest.fixture(scope="session")
def synthetic_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Manifest (absolute paths) of the tiny synthetic dataset, generated once per session."""
    from data.synthetic import TINY, generate

    # Several test modules import this fixture; generate() reuses the directory when its
    # manifest matches, so the data is built once.
    return generate(str(tmp_path_factory.getbasetemp() / "synthetic_tiny"), TINY,
                    progress=False)
