"""Converters from public annotation / detector formats to txt_db and img_db.

- Karpathy-split caption JSON (Flickr30k, COCO) -> one txt_db per choice of splits.
- Multi30K (caption text files, one caption per line, plus an image-name list) -> txt_db.
- A directory of per-image detector ``.npz`` files -> img_db.

Tokenizers are loaded from a LOCAL directory only; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from data.img_db import ImgDbWriter
from data.txt_db import TxtDbWriter
from utils.errors import DataError, MissingPathError
from utils.progress import (
    progress as progress_bar,  # `progress` is the on/off flag here
)

_TOKENIZE_CHUNK = 2048
# Reserved vocabulary entries that are never ordinary words: BERT's [unusedN] / [CLS]-style
# tokens and <s>-style tokens of other tokenizers.
_RESERVED_TOKEN = re.compile(r"\[unused\d+\]|\[[A-Z_]+\]|<[^<>\s]+>")


def load_tokenizer(path: str) -> Any:
    """Loads a HF tokenizer from a local directory.

    Raises:
        FileNotFoundError: ``path`` is not an existing directory (hub names are refused).
    """
    if not os.path.isdir(path):
        raise MissingPathError(
            f"tokenizer path {path!r} is not an existing local directory: give the directory "
            f"of a saved Hugging Face tokenizer (vocab.txt / tokenizer.json); hub names are "
            f"never downloaded")
    from transformers import (
        AutoTokenizer,  # slow import, only needed to build databases
    )

    return AutoTokenizer.from_pretrained(os.path.abspath(path), local_files_only=True)


def vocab_range(tokenizer: Any) -> list[int]:
    """``[first ordinary token id, vocab size]`` for VMLM random replacement.

    The first ordinary id is the first one after the leading run of special and reserved
    tokens; for bert-base-cased that is '!' (106), as in the original preprocessing.
    """
    vocab = tokenizer.get_vocab()
    id2tok = {i: t for t, i in vocab.items()}
    size = max(vocab.values()) + 1
    special = set(tokenizer.all_special_ids)
    start = 0
    while start < size and (start in special or start not in id2tok
                            or _RESERVED_TOKEN.fullmatch(id2tok[start])):
        start += 1
    return [start, size]


def tokenizer_meta(tokenizer: Any, tokenizer_path: str) -> dict[str, Any]:
    """meta.json entries describing the tokenizer (SPEC 1)."""
    ids = {"UNK": tokenizer.unk_token_id, "CLS": tokenizer.cls_token_id,
           "SEP": tokenizer.sep_token_id, "MASK": tokenizer.mask_token_id}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise DataError(f"tokenizer at {tokenizer_path} defines no {missing} token(s)")
    return {**ids, "v_range": vocab_range(tokenizer), "bert": tokenizer_path,
            "toker": tokenizer_path, "format": "lmdb"}


def tokenize(tokenizer: Any, texts: Sequence[str], progress: bool = True) -> list[list[int]]:
    """Token ids of each text, without special tokens, tokenised in chunks."""
    out: list[list[int]] = []
    with progress_bar(total=len(texts), desc="tokenizing", unit="cap", disable=not progress) as bar:
        for start in range(0, len(texts), _TOKENIZE_CHUNK):
            chunk = list(texts[start:start + _TOKENIZE_CHUNK])
            out.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
            bar.update(len(chunk))
    return out


def image_db_name(filename: str, prefix: str = "") -> str:
    """img_db key of an image file: ``<prefix><stem>.npz``."""
    return f"{prefix}{os.path.splitext(os.path.basename(filename))[0]}.npz"


def convert_karpathy(json_path: str, out_dir: str, tokenizer_path: str, splits: Sequence[str],
                     img_prefix: str = "", overwrite: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Builds a txt_db from a Karpathy-split caption JSON.

    Args:
        json_path: ``dataset_{flickr30k,coco}.json`` style file.
        out_dir: txt_db directory to create.
        tokenizer_path: local HF tokenizer directory.
        splits: splits to include, e.g. ``["train", "restval"]`` for COCO training.
        img_prefix: prepended to image names (to match an existing img_db's naming).
        overwrite: replace an existing ``out_dir``.
        progress: show progress bars.

    Returns:
        Counts: ``{"captions", "images", "out_dir"}``.
    """
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    wanted = set(splits)
    images = [im for im in data["images"] if im["split"] in wanted]
    if not images:
        found = sorted({im["split"] for im in data["images"]})
        raise DataError(f"{json_path}: no image in split(s) {sorted(wanted)}; splits present: "
                        f"{found}")
    tokenizer = load_tokenizer(tokenizer_path)
    sentences = [(im, s) for im in images for s in im["sentences"]]
    all_ids = tokenize(tokenizer, [s["raw"] for _, s in sentences], progress)
    meta = {**tokenizer_meta(tokenizer, tokenizer_path), "annotation": os.path.abspath(json_path),
            "splits": sorted(wanted)}
    with TxtDbWriter(out_dir, meta, overwrite=overwrite) as writer:
        for (im, s), input_ids in progress_bar(zip(sentences, all_ids), total=len(sentences),
                                               desc="writing txt_db", disable=not progress):
            writer.add(str(s["sentid"]), {
                "input_ids": input_ids,
                "img_fname": image_db_name(im["filename"], img_prefix),
                "tokens": s.get("tokens", []),
                "raw": s["raw"],
                "imgid": s.get("imgid", im.get("imgid")),
                "sentid": s["sentid"],
                "toked_caption": tokenizer.convert_ids_to_tokens(input_ids),
            })
    return {"captions": len(sentences), "images": len(images), "out_dir": os.path.abspath(out_dir)}


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def convert_multi30k(caption_files: Sequence[str], image_list: str, out_dir: str,
                     tokenizer_path: str, img_prefix: str = "", overwrite: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Builds a txt_db from Multi30K caption files aligned with an image-name list.

    Each caption file has one caption per line, line i describing image i of ``image_list``
    (task 1 has one file per language and split; task 2 has five). Caption ids are
    ``line * len(caption_files) + file index``, so an image's captions are consecutive.

    Returns:
        Counts: ``{"captions", "images", "out_dir"}``.
    """
    names = [n.strip() for n in _read_lines(image_list) if n.strip()]
    columns = []
    for path in caption_files:
        lines = _read_lines(path)
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != len(names):
            raise DataError(f"{path} has {len(lines)} captions but {image_list} lists "
                            f"{len(names)} images")
        for i, line in enumerate(lines):
            if not line.strip():
                raise DataError(f"{path}: line {i + 1} is an empty caption")
        columns.append(lines)
    tokenizer = load_tokenizer(tokenizer_path)
    entries = [(i, j, columns[j][i]) for i in range(len(names)) for j in range(len(columns))]
    all_ids = tokenize(tokenizer, [raw for _, _, raw in entries], progress)
    meta = {**tokenizer_meta(tokenizer, tokenizer_path),
            "annotation": [os.path.abspath(p) for p in caption_files],
            "image_list": os.path.abspath(image_list)}
    with TxtDbWriter(out_dir, meta, overwrite=overwrite) as writer:
        for (i, j, raw), input_ids in progress_bar(zip(entries, all_ids), total=len(entries),
                                                   desc="writing txt_db", disable=not progress):
            sentid = i * len(columns) + j
            writer.add(str(sentid), {
                "input_ids": input_ids,
                "img_fname": image_db_name(names[i], img_prefix),
                "tokens": raw.split(),
                "raw": raw,
                "imgid": i,
                "sentid": sentid,
                "toked_caption": tokenizer.convert_ids_to_tokens(input_ids),
            })
    return {"captions": len(entries), "images": len(names), "out_dir": os.path.abspath(out_dir)}


def convert_npz_dir(npz_dir: str, out_dir: str, conf_th: float = 0.2, max_bb: int = 100,
                    min_bb: int = 10, num_bb: int = 36, variants: Sequence[str] = ("msgpack",),
                    overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Builds an img_db from a directory of per-image detector ``.npz`` files.

    Each file holds ``features`` (n, 2048), ``norm_bb`` (n, 6), ``conf`` (n, 1) and
    optionally ``soft_labels`` (n, 1601); the image name is the file name (with ``.npz``).
    Rows not sorted by confidence are sorted (descending, stable) because only the first nbb
    rows are kept.

    Returns:
        Counts: ``{"images", "boxes", "resorted", "out_dir"}``.
    """
    if not os.path.isdir(npz_dir):
        raise MissingPathError(f"detector output directory not found: {npz_dir}")
    files = sorted(f for f in os.listdir(npz_dir) if f.endswith(".npz"))
    if not files:
        raise MissingPathError(f"no .npz files in {npz_dir}")
    boxes = resorted = 0
    with ImgDbWriter(out_dir, conf_th, max_bb, min_bb, num_bb, variants,
                     overwrite=overwrite) as writer:
        for fname in progress_bar(files, desc="writing img_db", unit="img", disable=not progress):
            path = os.path.join(npz_dir, fname)
            with np.load(path, allow_pickle=False) as z:
                missing = [m for m in ("features", "norm_bb", "conf") if m not in z.files]
                if missing:
                    raise DataError(f"{path}: missing member(s) {missing}")
                arrays = {m: z[m] for m in ("features", "norm_bb", "conf", "soft_labels")
                          if m in z.files}
            conf = arrays["conf"].reshape(-1).astype(np.float32)
            if np.any(np.diff(conf) > 0):
                order = np.argsort(-conf, kind="stable")
                arrays = {k: a[order] for k, a in arrays.items()}
                resorted += 1
            boxes += writer.add(fname, **arrays)
    return {"images": len(files), "boxes": boxes, "resorted": resorted,
            "out_dir": os.path.abspath(out_dir)}
