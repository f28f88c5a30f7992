"""Search a built retrieval directory: a caption for images, or an image for captions."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from data.txt_db import TxtDb
from utils.config import ConfigError
from utils.errors import DataKeyError, MissingPathError
from utils.pipeline.retrieval_dir import load_biencoder, read_json
from utils.run_files import (
    IDS_FILE,
    IMG_EMB_FILE,
    IMG_INDEX_FILE,
    INFO_FILE,
    TXT_INDEX_FILE,
)
from utils.search.indexes import load_index
from utils.search.topk import results_to_lists


@dataclass
class Hits:
    """The answer to one query.

    Attributes:
        label: what was searched, for display (`caption '...'` or `image NAME`).
        results: `[name, score]` pairs, best first.
        texts: caption id -> raw caption, for image queries when the txt_db is readable.
    """

    label: str
    results: list[list[Any]]
    texts: dict[str, str]


def search_index(
    index_dir: str | Path,
    *,
    text: str | None = None,
    image: str | None = None,
    top_k: int = 10,
    checkpoint: str | None = None,
    tokenizer: str | None = None,
) -> Hits:
    """Search a retrieval directory written by inference.py.

    Args:
        index_dir: the directory (`info.json`, `ids.json`, embeddings, indexes).
        text: a caption to search images for (needs `checkpoint` and a tokenizer).
        image: an image name of the split, to search its captions.
        top_k: hits to return.
        checkpoint: the bi-encoder that built the index (text queries).
        tokenizer: local tokenizer directory; default the one info.json records.
    """
    index_dir = Path(index_dir)
    info = read_json(index_dir / INFO_FILE, "retrieval info")
    ids = read_json(index_dir / IDS_FILE, "ids file")
    if image is not None:
        if image not in ids["img_ids"]:
            raise DataKeyError(f"image {image!r} is not in {index_dir / IDS_FILE}")
        row = ids["img_ids"].index(image)
        vector = np.load(index_dir / IMG_EMB_FILE, mmap_mode="r")[row : row + 1]
        index = load_index(index_dir / TXT_INDEX_FILE)
        names = ids["txt_ids"]
        label = f"image {image}"
    else:
        if checkpoint is None:
            raise ConfigError("a text query needs --checkpoint (the bi-encoder that built the index)")
        tok = _load_tokenizer(tokenizer or info.get("tokenizer"))
        model, _ = load_biencoder(checkpoint, model_config=info.get("model_config"))
        max_len = info["split"]["max_txt_len"]
        tokens = tok(text, add_special_tokens=False)["input_ids"]
        tokens = tokens[:max_len] if max_len and max_len > 0 else tokens
        input_ids = torch.tensor([[tok.cls_token_id, *tokens, tok.sep_token_id]])
        with torch.inference_mode():
            vector = model.encode_text(input_ids, torch.ones_like(input_ids)).float().numpy()
        index = load_index(index_dir / IMG_INDEX_FILE)
        names = ids["img_ids"]
        label = f"caption {text!r}"
    hits = results_to_lists(*index.search(np.asarray(vector, dtype=np.float32), top_k))[0]
    results = [[names[i], s] for i, s in hits]
    texts = _caption_texts(info, [name for name, _ in results]) if image is not None else {}
    return Hits(label, results, texts)


def _load_tokenizer(path: str | None):
    if not path:
        raise ConfigError(
            "a text query needs a tokenizer: pass --tokenizer DIR (a local HF tokenizer "
            "directory with vocab.txt / tokenizer.json) or set model.tokenizer in the config"
        )
    if not Path(path).is_dir():
        raise MissingPathError(f"tokenizer directory {path} does not exist")
    return AutoTokenizer.from_pretrained(path)


def _caption_texts(info: Mapping[str, Any], txt_ids: Sequence[str]) -> dict[str, str]:
    """Caption id -> raw text for `txt_ids`, from the split's txt_db when still readable."""
    try:
        db = TxtDb(info["split"]["txt_db"], info["split"]["max_txt_len"])
        records = {t: db.record(t) for t in txt_ids}
    except (FileNotFoundError, ValueError, KeyError):
        return {}
    out = {}
    for txt_id, record in records.items():
        raw = record.get("raw") or record.get("toked_caption")
        if isinstance(raw, str):
            out[txt_id] = raw
    return out
