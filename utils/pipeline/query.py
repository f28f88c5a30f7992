"""Search a built retrieval directory: a caption for images, or an image for captions.

`Searcher` loads a directory (and the bi-encoder for text queries) once and answers many
queries; `inference.py query` (one query, through `search_index`) and `inference.py serve` share
it. `TextReranker` re-scores a text query's top-M images with a cross-encoder.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from data.datasets import collate_images
from data.txt_db import TxtDb
from utils.errors import ConfigError, DataKeyError, MissingPathError
from utils.pipeline.evaluation import open_img_db
from utils.pipeline.reranking import fuse, load_cross_encoder
from utils.pipeline.retrieval_dir import Split, load_biencoder, read_json
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


class Searcher:
    """A retrieval directory loaded once, answering many queries (`inference.py query` / `serve`).

    Holds the ids, both indexes, the image embeddings and, for text queries, the bi-encoder that
    built the index with its tokenizer. Text queries are tokenized exactly as the txt_db was
    (no special tokens, cut at the split's `max_txt_len`, then `[CLS] ... [SEP]`).
    """

    def __init__(self, index_dir: str | Path, checkpoint: str | None = None, tokenizer: str | None = None) -> None:
        """Load `index_dir` (and the model of `checkpoint` with its tokenizer, when given).

        Args:
            index_dir: output directory of inference.py (`info.json`, `ids.json`, indexes).
            checkpoint: the bi-encoder that built the index; needed for text queries only.
            tokenizer: local tokenizer directory; default the one info.json records.
        """
        self.index_dir = Path(index_dir)
        self.info = read_json(self.index_dir / INFO_FILE, "retrieval info")
        ids = read_json(self.index_dir / IDS_FILE, "ids file")
        self.img_ids: list[str] = list(ids["img_ids"])
        self.txt_ids: list[str] = list(ids["txt_ids"])
        self._img_row = {name: i for i, name in enumerate(self.img_ids)}
        self._img_emb = np.load(self.index_dir / IMG_EMB_FILE, mmap_mode="r")
        self._img_index = load_index(self.index_dir / IMG_INDEX_FILE)
        self._txt_index = load_index(self.index_dir / TXT_INDEX_FILE)
        self.max_txt_len = int(self.info["split"]["max_txt_len"])
        self.model = self.tokenizer = None
        if checkpoint is not None:
            self.tokenizer = _load_tokenizer(tokenizer or self.info.get("tokenizer"))
            self.model, _ = load_biencoder(checkpoint, model_config=self.info.get("model_config"))
        self._captions: dict[str, str] = {}

    def has_image(self, name: str) -> bool:
        """True when `name` is an image of the index."""
        return name in self._img_row

    @property
    def can_search_text(self) -> bool:
        """True when a bi-encoder was loaded (text queries possible)."""
        return self.model is not None

    def tokenize(self, text: str) -> torch.Tensor:
        """(1, L) `[CLS] ids [SEP]` of a query, cut as the split's captions were."""
        if self.tokenizer is None:
            raise ConfigError("a text query needs --checkpoint (the bi-encoder that built the index)")
        tok = self.tokenizer
        tokens = tok(text, add_special_tokens=False)["input_ids"]
        tokens = tokens[: self.max_txt_len] if self.max_txt_len > 0 else tokens
        return torch.tensor([[tok.cls_token_id, *tokens, tok.sep_token_id]])

    def encode_text(self, text: str) -> np.ndarray:
        """(1, D) float32 embedding of a query caption."""
        input_ids = self.tokenize(text)
        with torch.inference_mode():
            vector = self.model.encode_text(input_ids, torch.ones_like(input_ids))
        return np.ascontiguousarray(vector.float().numpy(), dtype=np.float32)

    def search_images(self, vector: np.ndarray, top_k: int) -> list[list[Any]]:
        """`[image name, score]` pairs of the images nearest to a (1, D) query vector."""
        hits = results_to_lists(*self._img_index.search(np.asarray(vector, dtype=np.float32), top_k))[0]
        return [[self.img_ids[i], s] for i, s in hits]

    def search_text(self, text: str, top_k: int) -> Hits:
        """The `top_k` images for a caption."""
        return Hits(f"caption {text!r}", self.search_images(self.encode_text(text), top_k), {})

    def search_image(self, image: str, top_k: int) -> Hits:
        """The `top_k` captions for an image of the split, with their texts when readable.

        Raises:
            DataKeyError: `image` is not in the split.
        """
        if image not in self._img_row:
            raise DataKeyError(f"image {image!r} is not in {self.index_dir / IDS_FILE}")
        row = self._img_row[image]
        vector = np.asarray(self._img_emb[row : row + 1], dtype=np.float32)
        hits = results_to_lists(*self._txt_index.search(vector, top_k))[0]
        results = [[self.txt_ids[i], s] for i, s in hits]
        texts = self.caption_texts([name for name, _ in results])
        return Hits(f"image {image}", results, texts)

    def caption_texts(self, txt_ids: Sequence[str]) -> dict[str, str]:
        """Caption id -> raw text, from the split's txt_db when readable (cached)."""
        missing = [t for t in txt_ids if t not in self._captions]
        if missing:
            self._captions.update(_caption_texts(self.info, missing))
        return {t: self._captions[t] for t in txt_ids if t in self._captions}


class TextReranker:
    """A cross-encoder re-scoring a text query's top-M images, fused with the bi-encoder score.

    Free text has no txt_db record, so the query is tokenized by the searcher (the tokenizer of
    the split) and paired with the candidates' region features from the split's img_db; the
    fused score is `alpha * biencoder + (1 - alpha) * cross`, as `rerank.py` fuses.
    """

    def __init__(self, searcher: Searcher, checkpoint: str, model_config: str | None = None,
                 alpha: float = 0.5, batch_size: int = 64) -> None:
        """Load the cross-encoder of `checkpoint` and open the split's img_db.

        Raises:
            ConfigError: alpha outside [0, 1], or the tokenizer's vocabulary does not fit the model.
        """
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"--alpha must lie in [0, 1], got {alpha}")
        if searcher.tokenizer is None:
            raise ConfigError("re-ranking text queries needs --checkpoint (the bi-encoder and its tokenizer)")
        self.model, self.format = load_cross_encoder(checkpoint, model_config)
        vocab = int(self.model.config.bert_config.get("vocab_size", 0))
        if vocab and len(searcher.tokenizer) > vocab:
            raise ConfigError(
                f"the tokenizer has {len(searcher.tokenizer)} tokens but the cross-encoder of {checkpoint} "
                f"has vocab_size {vocab}: they were not trained with the same tokenizer"
            )
        split = Split(**searcher.info["split"])
        self.img_db = open_img_db(split.img_db, split)
        self.searcher = searcher
        self.alpha = alpha
        self.batch_size = batch_size

    def rerank(self, text: str, hits: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """`[image name, fused, biencoder, cross]` rows of `hits` (`[name, score]`), best fused first."""
        if not hits:
            return []
        input_ids = self.searcher.tokenize(text)
        feats, poss = [], []
        for name, _ in hits:
            feat, pos, _ = self.img_db.tensors(name, with_soft_labels=False)
            feats.append(feat)
            poss.append(pos)
        img = collate_images(feats, poss)
        with torch.inference_mode():
            cross = self.model.score_batched(
                input_ids, torch.ones_like(input_ids), img["img_feat"], img["img_pos"], img["img_mask"],
                batch_size=self.batch_size,
            ).float().numpy()
        # rerank.py's fusion (same formula, ties keep the stage-1 order), for one text query.
        fused = fuse({text: [(name, float(bi)) for name, bi in hits]},
                     {(text, name): float(c) for (name, _), c in zip(hits, cross)}, self.alpha, query_is_text=True)
        return [[name, score, bi, c] for name, bi, c, score in fused[text]]


def search_index(
    index_dir: str | Path,
    *,
    text: str | None = None,
    image: str | None = None,
    top_k: int = 10,
    checkpoint: str | None = None,
    tokenizer: str | None = None,
) -> Hits:
    """Search a retrieval directory written by inference.py (one query; see `Searcher`).

    Args:
        index_dir: the directory (`info.json`, `ids.json`, embeddings, indexes).
        text: a caption to search images for (needs `checkpoint` and a tokenizer).
        image: an image name of the split, to search its captions.
        top_k: hits to return.
        checkpoint: the bi-encoder that built the index (text queries).
        tokenizer: local tokenizer directory; default the one info.json records.
    """
    if image is None and checkpoint is None:
        raise ConfigError("a text query needs --checkpoint (the bi-encoder that built the index)")
    searcher = Searcher(index_dir, checkpoint if image is None else None, tokenizer)
    if image is not None:
        return searcher.search_image(image, top_k)
    return searcher.search_text(text, top_k)


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
