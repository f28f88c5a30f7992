"""Image region-feature database (``img_db``) reader and writer, SPEC section 2.

An img_db directory holds ``nbb_th{conf_th}_max{max_bb}_min{min_bb}.json`` and one or both
feature LMDBs ``feat_th{conf_th}_max{max_bb}_min{min_bb}[_compressed]/`` (``feat_numbb{num_bb}``
when ``conf_th == -1``). Values are msgpack maps of msgpack-numpy arrays, or the bytes of an
``np.savez_compressed`` archive in the ``_compressed`` variant.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, Self

import msgpack
import numpy as np
import torch

from data.lmdb_io import (
    CorruptRecordError,
    LmdbWriter,
    atomic_dir,
    iter_keys,
    read_value,
    require_lmdb_dir,
)
from utils.errors import DataKeyError, MissingPathError

MEMBERS = ("norm_bb", "features", "conf", "soft_labels")
KEYS_KEY = "__keys__"
VARIANTS = ("msgpack", "compressed")


def compute_nbb(conf: np.ndarray, conf_th: float, max_bb: int, min_bb: int) -> int:
    """Number of boxes kept: ``min(max_bb, max(min_bb, count(conf > conf_th)))``.

    The comparison is strict and made in float16, like the original on its float16 arrays: a
    confidence stored as float16(0.2) is not above a threshold of 0.2.
    """
    conf16 = np.asarray(conf).astype(np.float16, copy=False).reshape(-1)
    count = int(np.count_nonzero(conf16 > np.float16(conf_th)))
    return int(min(max_bb, max(min_bb, count)))


def box7(norm_bb: np.ndarray) -> np.ndarray:
    """7-d box feature ``[x1, y1, x2, y2, w, h, w*h]`` as float32 (n, 7).

    The area is computed in float32 after casting the stored float16 values (SPEC 2).
    """
    bb = np.asarray(norm_bb).astype(np.float32)
    if bb.ndim != 2 or bb.shape[1] != 6:
        raise ValueError(f"norm_bb must have shape (n, 6), got {bb.shape}")
    return np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1)


def image_key(name: str) -> int:
    """Stable signed int64 hash of an image name (same in every process and on every rank)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _fmt_th(conf_th: float) -> str:
    # SPEC: the threshold is printed as Python prints a float ('0.2', '0.0').
    return repr(float(conf_th))


def nbb_file_name(conf_th: float, max_bb: int, min_bb: int) -> str:
    """Name of the ``{img_fname: nbb}`` JSON inside an img_db directory."""
    return f"nbb_th{_fmt_th(conf_th)}_max{max_bb}_min{min_bb}.json"


def feat_dir_name(conf_th: float, max_bb: int, min_bb: int, num_bb: int,
                  compressed: bool) -> str:
    """Name of the feature LMDB directory inside an img_db directory."""
    if conf_th == -1:
        name = f"feat_numbb{num_bb}"
    else:
        name = f"feat_th{_fmt_th(conf_th)}_max{max_bb}_min{min_bb}"
    return name + "_compressed" if compressed else name


def _field(obj: dict, key: bytes) -> Any:
    # msgpack-numpy writes bytes keys; data written without use_bin_type decodes them as str.
    if key in obj:
        return obj[key]
    return obj.get(key.decode("ascii"))


def _decode_ndarray(obj: dict) -> Any:
    """msgpack object hook for msgpack-numpy arrays; numeric dtypes only (never unpickles)."""
    nd = _field(obj, b"nd")
    if nd is None:
        return obj
    dtype_descr = _field(obj, b"type")
    if isinstance(dtype_descr, bytes):
        dtype_descr = dtype_descr.decode("ascii")
    data = _field(obj, b"data")
    if nd is not True:
        return np.frombuffer(data, dtype=np.dtype(dtype_descr))[0]
    kind = _field(obj, b"kind")
    if kind in (b"O", "O"):
        raise ValueError("object arrays (pickled) are not supported")
    if kind in (b"V", "V"):
        dtype_descr = [tuple(d.decode() if isinstance(d, bytes) else d for d in field)
                       for field in dtype_descr]
    shape = tuple(int(s) for s in _field(obj, b"shape"))
    dtype = np.dtype(dtype_descr)
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape)).reshape(shape)


def _encode_ndarray(arr: np.ndarray) -> dict[bytes, Any]:
    arr = np.ascontiguousarray(arr)
    return {b"nd": True, b"type": arr.dtype.str, b"kind": b"", b"shape": list(arr.shape),
            b"data": arr.tobytes()}


def encode_msgpack(arrays: dict[str, np.ndarray]) -> bytes:
    """Encodes arrays like UNITER's ``msgpack.dumps(dump, use_bin_type=True)`` with
    msgpack-numpy patched in."""
    return msgpack.dumps({k: _encode_ndarray(v) for k, v in arrays.items()}, use_bin_type=True)


def encode_compressed(arrays: dict[str, np.ndarray]) -> bytes:
    """Encodes arrays as the bytes of an ``np.savez_compressed`` archive."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


class ImgDb:
    """Read-only view of one img_db directory.

    Attributes:
        img_dir: absolute path of the img_db directory.
        feat_dir: absolute path of the feature LMDB used.
        name2nbb: image name -> number of boxes kept (from the nbb JSON; ``num_bb`` for
            every stored image when ``conf_th == -1``).
        names: image names in nbb JSON order (``__keys__`` order when ``conf_th == -1``).
    """

    def __init__(self, img_dir: str, conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10,
                 num_bb: int = 36, compressed: bool = False) -> None:
        self.img_dir = os.path.abspath(img_dir)
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, max_bb, min_bb, num_bb
        self.compressed = compressed
        if not os.path.isdir(self.img_dir):
            raise MissingPathError(f"img_db directory not found: {self.img_dir}")
        feat_name = feat_dir_name(conf_th, max_bb, min_bb, num_bb, compressed)
        self.feat_dir = os.path.join(self.img_dir, feat_name)
        if not os.path.isdir(self.feat_dir):
            found = sorted(d for d in os.listdir(self.img_dir) if d.startswith("feat_"))
            raise MissingPathError(
                f"img_db {self.img_dir}: expected feature LMDB directory {feat_name} not found "
                f"(for conf_th={conf_th}, max_bb={max_bb}, min_bb={min_bb}, num_bb={num_bb}, "
                f"compressed={compressed}); present: {found or 'none'}")
        require_lmdb_dir(self.feat_dir, "img_db feature")
        if conf_th == -1:
            self.name2nbb = {n: num_bb for n in self._stored_names()}
        else:
            nbb_name = nbb_file_name(conf_th, max_bb, min_bb)
            nbb_path = os.path.join(self.img_dir, nbb_name)
            if not os.path.isfile(nbb_path):
                raise MissingPathError(f"img_db {self.img_dir}: expected nbb file {nbb_name} "
                                       f"not found ({nbb_path})")
            with open(nbb_path, encoding="utf-8") as f:
                self.name2nbb = {k: int(v) for k, v in json.load(f).items()}
        self.names = list(self.name2nbb)

    def _stored_names(self) -> list[str]:
        value = read_value(self.feat_dir, KEYS_KEY)
        if value is None:
            return [k for k in iter_keys(self.feat_dir) if k != KEYS_KEY]
        try:
            return list(json.loads(bytes(value).decode("utf-8")))
        except ValueError as e:
            raise CorruptRecordError(f"img_db {self.feat_dir}: cannot decode key "
                                     f"{KEYS_KEY!r} ({e})") from e

    def __contains__(self, name: object) -> bool:
        return name in self.name2nbb

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ImgDb({self.feat_dir!r}, images={len(self)})"

    def _load(self, name: str, members: Sequence[str]) -> dict[str, np.ndarray]:
        if name not in self.name2nbb:
            raise DataKeyError(f"image {name!r} is not in img_db {self.img_dir}")
        value = read_value(self.feat_dir, name)
        if value is None:
            raise DataKeyError(f"image {name!r} is listed by img_db {self.img_dir} but missing "
                               f"from its LMDB {self.feat_dir}")
        try:
            if self.compressed:
                with np.load(io.BytesIO(value), allow_pickle=False) as npz:
                    # 'allow_pickle' is a stray 0-d member some original dumps carry.
                    arrays = {m: npz[m] for m in members if m in npz.files}
            else:
                dump = msgpack.loads(value, raw=False, object_hook=_decode_ndarray)
                dump = {(k.decode() if isinstance(k, bytes) else k): v for k, v in dump.items()}
                arrays = {m: dump[m] for m in members if m in dump}
            for m in ("features", "norm_bb"):
                if m in members and (m not in arrays or np.ndim(arrays[m]) != 2):
                    raise ValueError(f"member {m!r} missing or not 2-d")
        except (ValueError, TypeError, KeyError, OSError, EOFError,
                msgpack.UnpackException) as e:
            raise CorruptRecordError(f"img_db {self.feat_dir}: cannot decode the value of key "
                                     f"{name!r} ({type(e).__name__}: {e})") from e
        nbb = self.name2nbb[name]
        return {m: a[:nbb] for m, a in arrays.items()}

    def get(self, name: str) -> dict[str, np.ndarray]:
        """Returns the stored arrays (float16, read-only) of the first nbb boxes of ``name``.

        Keys: ``features`` (n, 2048), ``norm_bb`` (n, 6), ``conf`` (n, 1) and
        ``soft_labels`` (n, 1601), those the database holds.

        Raises:
            KeyError: unknown image.
            CorruptRecordError: the stored value cannot be decoded.
        """
        return self._load(name, MEMBERS)

    def tensors(self, name: str, with_soft_labels: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns ``(img_feat (n, 2048), img_pos (n, 7), soft_labels (n, 1601))`` as float32.

        ``soft_labels`` is None when not requested (saves the conversion for retrieval).

        Raises:
            KeyError: unknown image, or soft labels requested but not stored.
        """
        members = ("features", "norm_bb", "soft_labels") if with_soft_labels else \
            ("features", "norm_bb")
        arrays = self._load(name, members)
        feat = torch.from_numpy(arrays["features"].astype(np.float32))
        pos = torch.from_numpy(box7(arrays["norm_bb"]))
        soft = None
        if with_soft_labels:
            if "soft_labels" not in arrays:
                raise DataKeyError(f"img_db {self.feat_dir}: image {name!r} has no soft_labels")
            soft = torch.from_numpy(arrays["soft_labels"].astype(np.float32))
        return feat, pos, soft


class ImgDbWriter:
    """Writes an img_db directory atomically from per-image detector outputs.

    Usage::

        with ImgDbWriter(out_dir, variants=("msgpack", "compressed")) as w:
            w.add("img.npz", features=..., norm_bb=..., conf=..., soft_labels=...)

    Each image keeps its first nbb rows (``compute_nbb``, or ``num_bb`` when ``conf_th == -1``);
    rows must already be sorted by confidence, descending. Writes the nbb JSON (unless
    ``conf_th == -1``), one feature LMDB per variant and the ``__keys__`` entry.
    """

    def __init__(self, img_dir: str, conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10,
                 num_bb: int = 36, variants: Sequence[str] = ("msgpack",),
                 overwrite: bool = False) -> None:
        bad = [v for v in variants if v not in VARIANTS]
        if bad or not variants:
            raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got "
                             f"{list(variants)}")
        self.img_dir = os.path.abspath(img_dir)
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, max_bb, min_bb, num_bb
        self.variants = tuple(dict.fromkeys(variants))
        self.overwrite = overwrite
        self.name2nbb: dict[str, int] = {}
        self._stack: contextlib.ExitStack | None = None
        self._writers: dict[str, LmdbWriter] = {}

    def __enter__(self) -> Self:
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_dir(self.img_dir, self.overwrite))
        for v in self.variants:
            name = feat_dir_name(self.conf_th, self.max_bb, self.min_bb, self.num_bb,
                                 compressed=(v == "compressed"))
            # Images are large: commit more often than for captions to bound memory.
            self._writers[v] = LmdbWriter(os.path.join(self._tmp, name), commit_every=200)
        return self

    def add(self, name: str, features: np.ndarray, norm_bb: np.ndarray, conf: np.ndarray,
            soft_labels: np.ndarray | None = None) -> int:
        """Adds one image (arrays of all detected boxes); returns the number of boxes kept."""
        if not self._writers:
            raise RuntimeError("ImgDbWriter.add called outside its `with` block")
        if name in self.name2nbb or name == KEYS_KEY:
            raise ValueError(f"duplicate or reserved image name {name!r} for {self.img_dir}")
        arrays = {"norm_bb": norm_bb, "features": features,
                  "conf": np.asarray(conf).reshape(-1, 1)}
        if soft_labels is not None:
            arrays["soft_labels"] = soft_labels
        arrays = {k: np.asarray(a).astype(np.float16) for k, a in arrays.items()}
        n = arrays["features"].shape[0]
        if arrays["norm_bb"].shape != (n, 6) or any(a.shape[0] != n for a in arrays.values()):
            raise ValueError(f"image {name!r}: inconsistent shapes "
                             f"{ {k: a.shape for k, a in arrays.items()} }")
        if self.conf_th == -1:
            nbb = self.num_bb
        else:
            nbb = compute_nbb(arrays["conf"], self.conf_th, self.max_bb, self.min_bb)
        kept = {k: a[:nbb] for k, a in arrays.items()}
        for v, writer in self._writers.items():
            writer.put(name, encode_compressed(kept) if v == "compressed" else
                       encode_msgpack(kept))
        self.name2nbb[name] = nbb
        return nbb

    def _finish(self) -> None:
        keys = json.dumps(list(self.name2nbb)).encode("utf-8")
        for writer in self._writers.values():
            writer.put(KEYS_KEY, keys)
            writer.close()
        if self.conf_th != -1:
            path = os.path.join(self._tmp, nbb_file_name(self.conf_th, self.max_bb, self.min_bb))
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self.name2nbb, f)

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._stack is not None
        try:
            if exc_type is None:
                self._finish()
            else:
                for writer in self._writers.values():
                    writer.close()
        except BaseException:
            if not self._stack.__exit__(*sys.exc_info()):
                raise
            return False
        finally:
            self._writers = {}
        return bool(self._stack.__exit__(exc_type, exc, tb))
