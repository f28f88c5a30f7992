"""Text database (``txt_db``) reader and writer, SPEC section 1.

A txt_db is one LMDB directory per split: key = caption id (UTF-8), value =
``lz4.frame.compress(msgpack.dumps(record, use_bin_type=True))``, plus the side files
``id2len.json``, ``txt2img.json``, ``img2txts.json`` and ``meta.json``.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Self

import lz4.frame
import msgpack

from data.lmdb_io import (
    CorruptRecordError,
    LmdbWriter,
    atomic_dir,
    read_value,
    require_lmdb_dir,
)
from utils.errors import DataError, DataKeyError, MissingPathError

SIDE_FILES = ("id2len.json", "txt2img.json", "img2txts.json", "meta.json")
META_TOKEN_KEYS = ("UNK", "CLS", "SEP", "MASK")


def _load_json(db_dir: str, name: str) -> Any:
    path = os.path.join(db_dir, name)
    if not os.path.isfile(path):
        raise MissingPathError(f"txt_db {db_dir}: expected file {name} is missing ({path})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def encode_record(record: dict[str, Any]) -> bytes:
    """Encodes one caption record the way the original preprocessing did."""
    return lz4.frame.compress(msgpack.dumps(record, use_bin_type=True))


def decode_record(value: bytes, key: str, db_dir: str) -> dict[str, Any]:
    """Decodes one stored caption record.

    Raises:
        CorruptRecordError: the value is not lz4-framed msgpack of a map; names the key.
    """
    try:
        record = msgpack.loads(lz4.frame.decompress(value), raw=False)
    except (RuntimeError, ValueError, TypeError, msgpack.UnpackException) as e:
        raise CorruptRecordError(f"txt_db {db_dir}: cannot decode the value of key {key!r} "
                                 f"({type(e).__name__}: {e})") from e
    if not isinstance(record, dict):
        raise CorruptRecordError(f"txt_db {db_dir}: the value of key {key!r} decodes to "
                                 f"{type(record).__name__}, expected a map")
    return record


class TxtDb:
    """Read-only view of one txt_db split.

    Attributes:
        db_dir: absolute path of the database.
        ids: caption ids in ``id2len.json`` key order (the dataset order), after the
            ``max_txt_len`` filter.
        lens: ``len(input_ids)`` of each id in ``ids`` (without [CLS]/[SEP]).
        txt2img: caption id -> image name, for the kept ids.
        img_order: every key of ``img2txts.json`` in file order: the split's canonical image
            order. It is NOT filtered by ``max_txt_len`` (the candidate images of a split do
            not depend on caption length, as in the original evaluation), so an image whose
            captions were all filtered out stays, with an empty list in ``img2txts``.
        img2txts: image name -> kept caption ids, for every image of ``img_order``.
        meta: the content of ``meta.json``.
    """

    def __init__(self, db_dir: str, max_txt_len: int = -1, num_images: int = 0) -> None:
        """Opens ``db_dir``; ``max_txt_len`` keeps ids with ``len <= max_txt_len`` (-1: all);
        ``num_images`` > 0 keeps the first that many images of ``img_order`` and only their
        captions (an evaluation subset; 0: every image)."""
        self.db_dir = require_lmdb_dir(db_dir, "txt_db")
        self.max_txt_len = max_txt_len
        id2len: dict[str, int] = _load_json(self.db_dir, "id2len.json")
        if max_txt_len is None or max_txt_len < 0:
            self.ids = list(id2len)
        else:
            self.ids = [i for i, n in id2len.items() if n <= max_txt_len]

        txt2img_all: dict[str, str] = _load_json(self.db_dir, "txt2img.json")
        missing = [i for i in self.ids if i not in txt2img_all]
        if missing:
            raise DataError(f"txt_db {self.db_dir}: caption id {missing[0]!r} of id2len.json "
                            f"is missing from txt2img.json ({len(missing)} ids missing)")
        img2txts_all: dict[str, list[str]] = _load_json(self.db_dir, "img2txts.json")
        self.img_order = list(img2txts_all)
        if num_images > 0:
            self.img_order = self.img_order[:num_images]
            chosen = set(self.img_order)
            self.ids = [i for i in self.ids if txt2img_all[i] in chosen]
        self.lens = [id2len[i] for i in self.ids]
        self.txt2img = {i: txt2img_all[i] for i in self.ids}
        kept = set(self.ids)
        self.img2txts = {img: [t for t in img2txts_all[img] if t in kept] for img in self.img_order}
        self.meta: dict[str, Any] = _load_json(self.db_dir, "meta.json")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"TxtDb({self.db_dir!r}, max_txt_len={self.max_txt_len}, captions={len(self)})"

    def _meta(self, key: str) -> Any:
        if key not in self.meta:
            raise DataKeyError(f"txt_db {self.db_dir}: meta.json has no {key!r} entry")
        return self.meta[key]

    @property
    def cls_id(self) -> int:
        """Id of [CLS] prepended to every caption."""
        return int(self._meta("CLS"))

    @property
    def sep_id(self) -> int:
        """Id of [SEP] appended to every caption."""
        return int(self._meta("SEP"))

    @property
    def mask_id(self) -> int:
        """Id of [MASK] used by VMLM."""
        return int(self._meta("MASK"))

    @property
    def unk_id(self) -> int:
        """Id of [UNK]."""
        return int(self._meta("UNK"))

    @property
    def v_range(self) -> tuple[int, int]:
        """[first ordinary token id, vocab size): the ids VMLM may substitute at random."""
        lo, hi = self._meta("v_range")
        return int(lo), int(hi)

    def record(self, txt_id: str) -> dict[str, Any]:
        """Returns the decoded record of ``txt_id`` (any id of the LMDB, kept or not).

        Raises:
            KeyError: the id is not in the database.
            CorruptRecordError: the stored value cannot be decoded.
        """
        value = read_value(self.db_dir, txt_id)
        if value is None:
            raise DataKeyError(f"caption id {txt_id!r} not found in txt_db {self.db_dir}")
        return decode_record(value, txt_id, self.db_dir)

    def input_ids(self, txt_id: str) -> list[int]:
        """Returns the token ids of ``txt_id`` WITHOUT [CLS]/[SEP]."""
        record = self.record(txt_id)
        if "input_ids" not in record:
            raise CorruptRecordError(f"txt_db {self.db_dir}: record {txt_id!r} has no "
                                     f"'input_ids'")
        return [int(t) for t in record["input_ids"]]


def _numeric_order(ids: list[str]) -> list[str]:
    # id2len's key order is the dataset order and must be numeric ('2' before '10'); ids that
    # are not all decimal keep the order in which they were added.
    if ids and all(i.isdecimal() for i in ids):
        return sorted(ids, key=int)
    return list(ids)


class TxtDbWriter:
    """Writes a txt_db atomically: into a temporary directory renamed on success.

    Usage::

        with TxtDbWriter(out_dir, meta) as w:
            w.add("123", {"input_ids": [...], "img_fname": "x.npz", ...})

    ``id2len.json`` and ``txt2img.json`` are written in numeric id order; ``img2txts.json``
    keys follow the order in which images first appear (the canonical image order).
    """

    def __init__(self, db_dir: str, meta: dict[str, Any], overwrite: bool = False) -> None:
        """Args:
            db_dir: output directory (must not exist unless ``overwrite``).
            meta: content of ``meta.json``; must hold UNK, CLS, SEP, MASK and v_range.
            overwrite: replace an existing ``db_dir`` once the new one is complete.
        """
        missing = [k for k in (*META_TOKEN_KEYS, "v_range") if k not in meta]
        if missing:
            raise ValueError(f"txt_db meta for {db_dir} lacks {missing}")
        self.db_dir = os.path.abspath(db_dir)
        self.meta = dict(meta)
        self.overwrite = overwrite
        self._id2len: dict[str, int] = {}
        self._txt2img: dict[str, str] = {}
        self._img2txts: dict[str, list[str]] = {}
        self._stack: contextlib.ExitStack | None = None
        self._writer: LmdbWriter | None = None

    def __enter__(self) -> Self:
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_dir(self.db_dir, self.overwrite))
        self._tmp = tmp
        self._writer = LmdbWriter(tmp)
        return self

    def add(self, txt_id: str, record: dict[str, Any]) -> None:
        """Adds one caption; ``record`` needs ``input_ids`` (no [CLS]/[SEP]) and ``img_fname``."""
        if self._writer is None:
            raise RuntimeError("TxtDbWriter.add called outside its `with` block")
        txt_id = str(txt_id)
        if txt_id in self._id2len:
            raise DataError(f"duplicate caption id {txt_id!r} written to {self.db_dir}")
        if "input_ids" not in record or "img_fname" not in record:
            raise ValueError(f"caption {txt_id!r}: a record needs 'input_ids' and 'img_fname'")
        input_ids = [int(t) for t in record["input_ids"]]
        img = str(record["img_fname"])
        self._writer.put(txt_id, encode_record({**record, "input_ids": input_ids}))
        self._id2len[txt_id] = len(input_ids)
        self._txt2img[txt_id] = img
        self._img2txts.setdefault(img, []).append(txt_id)

    def _write_side_files(self) -> None:
        order = _numeric_order(list(self._id2len))
        rank = {i: r for r, i in enumerate(order)}
        files = {
            "id2len.json": {i: self._id2len[i] for i in order},
            "txt2img.json": {i: self._txt2img[i] for i in order},
            "img2txts.json": {img: sorted(ids, key=rank.__getitem__)
                              for img, ids in self._img2txts.items()},
            "meta.json": self.meta,
        }
        for name, content in files.items():
            with open(os.path.join(self._tmp, name), "w", encoding="utf-8") as f:
                json.dump(content, f)

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._stack is not None and self._writer is not None
        try:
            self._writer.close()
            self._writer = None
            if exc_type is None:
                self._write_side_files()
        except BaseException:
            if not self._stack.__exit__(*sys.exc_info()):
                raise
            return False
        return bool(self._stack.__exit__(exc_type, exc, tb))
