"""Bi-encoder evaluation and hard-negative mining during training.

* `EvalSplit`: one (txt_db, img_db) pair in the split's canonical orders (SPEC 1, 7).
* `encode_split`: every caption and image embedded, sharded over ranks and gathered.
* `evaluate_recall`: R@1/5/10 both ways, RSUM and AR (`utils/search/metrics.py`).
* `HardNegativeMiner`: SPEC 6 hard negatives mined with the current model, kept in the
  training state so a resumed run trains on the same negatives.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from data.datasets import (
    ImageEvalDataset,
    RetrievalDataset,
    TextEvalDataset,
    hard_negative_pool,
    image_eval_collate,
    select_hard_negatives,
    text_eval_collate,
)
from data.img_db import ImgDb
from data.txt_db import TxtDb
from model.retrieval import RetrievalModel
from utils.config import DataConfig, TrainConfig
from utils.distributed import DistEnv, all_gather_no_grad, broadcast_object
from utils.engine.loader import eval_loader, to_device
from utils.errors import DataError
from utils.pipeline.samplers import make_batch_sampler
from utils.precision import Precision
from utils.search.metrics import recall_from_embeddings
from utils.search.topk import exact_topk

logger = logging.getLogger(__name__)


class ReadSettings(Protocol):
    """What changes how a split is read: the caption filter and the box selection (SPEC 1-2).

    The run config's data section and a retrieval directory's split spec both carry them.
    """

    max_txt_len: int
    conf_th: float
    max_bb: int
    min_bb: int
    num_bb: int
    compressed_db: bool


def open_txt_db(path: str, settings: ReadSettings) -> TxtDb:
    """A txt_db with the run's `max_txt_len` filter."""
    return TxtDb(path, settings.max_txt_len)


def open_img_db(path: str, settings: ReadSettings) -> ImgDb:
    """An img_db with the run's box-selection settings."""
    return ImgDb(path, conf_th=settings.conf_th, max_bb=settings.max_bb, min_bb=settings.min_bb,
                 num_bb=settings.num_bb, compressed=settings.compressed_db)


def caption_image_indices(txt_db: TxtDb, img_ids: Sequence[str]) -> np.ndarray:
    """Image row of every caption of `txt_db` (in `txt_db.ids` order) among `img_ids`."""
    position = {name: i for i, name in enumerate(img_ids)}
    out = np.empty(len(txt_db.ids), dtype=np.int64)
    for t, txt_id in enumerate(txt_db.ids):
        name = txt_db.txt2img[txt_id]
        if name not in position:
            raise DataError(
                f"txt_db {txt_db.db_dir}: caption {txt_id!r} belongs to image {name!r}, which is "
                f"not a key of img2txts.json"
            )
        out[t] = position[name]
    return out


@dataclass
class EvalSplit:
    """Captions and images of one split, in canonical order.

    Attributes:
        name: label for logs.
        txt_db: the captions (`txt_db.ids` order).
        img_db: the features.
        img_names: the split's images (`img2txts.json` key order).
        txt2img: index in `img_names` of every caption's image.
    """

    name: str
    txt_db: TxtDb
    img_db: ImgDb
    img_names: list[str]
    txt2img: np.ndarray

    @classmethod
    def from_dbs(cls, name: str, txt_db: TxtDb, img_db: ImgDb) -> EvalSplit:
        """Pair an opened txt_db with its img_db."""
        img_names = list(txt_db.img_order)
        return cls(name, txt_db, img_db, img_names, caption_image_indices(txt_db, img_names))

    @classmethod
    def open(cls, name: str, txt_db_path: str, img_db_path: str, settings: ReadSettings) -> EvalSplit:
        """Open a split from its paths with the run's `max_txt_len` and box settings."""
        return cls.from_dbs(name, open_txt_db(txt_db_path, settings), open_img_db(img_db_path, settings))


def embed_batch(model: RetrievalModel, batch: Mapping[str, Any], side: str) -> torch.Tensor:
    """(B, D) embeddings of an eval batch: captions (`side="txt"`) or images (`"img"`)."""
    if side == "txt":
        return model.encode_text(batch["txt"]["input_ids"], batch["txt"]["attention_mask"])
    img = batch["img"]
    return model.encode_image(img["img_feat"], img["img_pos"], img["img_mask"])


def _encode(
    model: RetrievalModel,
    dataset: Any,
    collate: Any,
    side: str,
    env: DistEnv,
    precision: Precision,
    train: TrainConfig,
    data: DataConfig,
) -> torch.Tensor:
    """(len(dataset), D) float32 embeddings, row i = example i, on every rank."""
    sampler = make_batch_sampler(
        dataset.lens, train.val_batch_size, train.batch_size_unit, env, seed=0, shuffle=False
    )
    loader = eval_loader(dataset, collate, sampler, data.n_workers, data.pin_mem and env.device.type == "cuda")
    embs, index = [], []
    for batch in loader:
        batch = to_device(batch, env.device)
        with precision.autocast():
            emb = embed_batch(model, batch, side)
        embs.append(emb.float())
        index.append(batch["index"])
    local = torch.cat(embs)
    gathered = all_gather_no_grad(local)
    positions = all_gather_no_grad(torch.cat(index))
    # The samplers repeat a few examples so every rank runs the same number of batches;
    # a repeated row is written twice with the same value.
    out = torch.empty(len(dataset), local.shape[1], dtype=torch.float32, device=local.device)
    out[positions] = gathered
    return out


@torch.no_grad()
def encode_split(
    model: RetrievalModel,
    split: EvalSplit,
    env: DistEnv,
    precision: Precision,
    train: TrainConfig,
    data: DataConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every caption and image of a split, sharded over ranks.

    Args:
        model: the bare bi-encoder (not a DDP wrapper).
        split: what to embed.
        env: distributed environment (every rank must call).
        precision: autocast of the run.
        train: batch size (`val_batch_size`, in `batch_size_unit`).
        data: loader workers / pinning.

    Returns:
        (caption embeddings (num_captions, D), image embeddings (num_images, D)), float32,
        on `env.device`, identical on every rank.
    """
    was_training = model.training
    model.eval()
    try:
        txt = _encode(model, TextEvalDataset(split.txt_db), text_eval_collate, "txt", env, precision, train, data)
        img = _encode(model, ImageEvalDataset(split.img_db, split.img_names), image_eval_collate, "img",
                      env, precision, train, data)
    finally:
        model.train(was_training)
    return txt, img


def evaluate_recall(
    model: RetrievalModel,
    split: EvalSplit,
    env: DistEnv,
    precision: Precision,
    train: TrainConfig,
    data: DataConfig,
) -> dict[str, Any]:
    """Recall of a split (SPEC 7 layout: text_to_image / image_to_text R@k, rsum, ar).

    Every rank must call; every rank gets the result.
    """
    txt_emb, img_emb = encode_split(model, split, env, precision, train, data)
    metrics = None
    if env.is_main:
        metrics = recall_from_embeddings(txt_emb, img_emb, split.txt2img, device=txt_emb.device)
    return broadcast_object(metrics)


def pool_size(num: int, mode: str) -> int | None:
    """How many best-ranked non-positives `select_hard_negatives` may look at (None: all).

    The ranking handed to the miner's selection must be this long.
    """
    return hard_negative_pool(num, mode)[1]


class HardNegativeMiner:
    """Mines hard negatives for a `RetrievalDataset` with the current model (SPEC 6).

    For every training caption: negative images ranked by the bi-encoder score; for every
    training image: negative captions. `hard_negatives_sampling` picks from those rankings
    (`none | random | top | top-random | a-b`). Negatives stay within the caption's own
    (txt_db, img_db) pair. The mined lists are this object's state, saved with the run.

    Args:
        dataset: the training dataset that receives the negatives.
        num: `num_hard_negatives` per caption and per image.
        mode: `hard_negatives_sampling`.
        seed: seed of the random choices (mixed with the step of each mining round).
    """

    def __init__(self, dataset: RetrievalDataset, num: int, mode: str, seed: int) -> None:
        self.dataset = dataset
        self.num = num
        self.mode = mode
        self.seed = seed
        self.pool = pool_size(num, mode)
        self.enabled = num > 0 and mode != "none"
        self.txt2neg_imgs: dict[str, list[str]] = {}
        self.img2neg_txts: dict[str, list[str]] = {}
        self.mined_at = -1
        self.mined_epoch = -1
        self._splits = [
            EvalSplit.from_dbs(f"train[{k}]", tdb, idb)
            for k, (tdb, idb) in enumerate(zip(dataset.txt_dbs, dataset.img_dbs))
        ]

    def mine(
        self,
        model: RetrievalModel,
        step: int,
        epoch: int,
        env: DistEnv,
        precision: Precision,
        train: TrainConfig,
        data: DataConfig,
    ) -> None:
        """Mine a new set with `model` and hand it to the dataset (every rank must call).

        Args:
            model: the bare bi-encoder in its current state.
            step: optimizer updates done (recorded, and seeds the random choices).
            epoch: the training loader's epoch (recorded).
            env: distributed environment.
            precision: autocast of the run.
            train: evaluation batch size.
            data: loader settings.
        """
        rng = np.random.default_rng([self.seed, step, epoch])
        txt2neg: dict[str, list[str]] = {}
        img2neg: dict[str, list[str]] = {}
        for split in self._splits:
            # Encoding is sharded over ranks; ranking and selection run on rank 0 only.
            if self.pool is not None:
                txt_emb, img_emb = encode_split(model, split, env, precision, train, data)
            if not env.is_main:
                continue
            if self.pool is None:
                ranked_img, ranked_txt = self._random_rankings(split, rng)
            else:
                max_caps = max((len(v) for v in split.txt_db.img2txts.values()), default=1)
                _, img_idx = exact_topk(txt_emb, img_emb, self.pool + 1)
                _, txt_idx = exact_topk(img_emb, txt_emb, self.pool + max_caps)
                ranked_img, ranked_txt = img_idx.cpu().numpy(), txt_idx.cpu().numpy()
            self._select(split, ranked_img, ranked_txt, rng, txt2neg, img2neg)
        self.txt2neg_imgs, self.img2neg_txts = broadcast_object((txt2neg, img2neg))
        self.mined_at, self.mined_epoch = step, epoch
        self._apply()
        logger.info("mined %s hard negatives (%d per query) at step %d", self.mode, self.num, step)

    def _random_rankings(self, split: EvalSplit, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Random candidates instead of a model ranking (mode `random`), enough to avoid positives."""
        n_img, n_txt = len(split.img_names), len(split.txt_db.ids)
        max_caps = max((len(v) for v in split.txt_db.img2txts.values()), default=1)
        k_img, k_txt = min(n_img, self.num + 1), min(n_txt, self.num + max_caps)
        ranked_img = np.stack([rng.choice(n_img, k_img, replace=False) for _ in range(n_txt)])
        ranked_txt = np.stack([rng.choice(n_txt, k_txt, replace=False) for _ in range(n_img)])
        return ranked_img, ranked_txt

    def _select(
        self,
        split: EvalSplit,
        ranked_img: np.ndarray,
        ranked_txt: np.ndarray,
        rng: np.random.Generator,
        txt2neg: dict[str, list[str]],
        img2neg: dict[str, list[str]],
    ) -> None:
        tdb, names, ids = split.txt_db, split.img_names, split.txt_db.ids
        for t, txt_id in enumerate(ids):
            ranking = [names[j] for j in ranked_img[t]]
            txt2neg[txt_id] = select_hard_negatives(ranking, {tdb.txt2img[txt_id]}, self.num, self.mode, rng)
        for i, name in enumerate(names):
            ranking = [ids[j] for j in ranked_txt[i]]
            img2neg[name] = select_hard_negatives(ranking, tdb.img2txts.get(name, ()), self.num, self.mode, rng)

    def _apply(self) -> None:
        self.dataset.set_hard_negatives(self.txt2neg_imgs, self.img2neg_txts, self.num)

    def state_dict(self) -> dict[str, Any]:
        """The mined lists and when they were mined."""
        return {"mined_at": self.mined_at, "mined_epoch": self.mined_epoch, "txt2neg_imgs": self.txt2neg_imgs, "img2neg_txts": self.img2neg_txts}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Give the dataset back the negatives it was training on."""
        self.mined_at, self.mined_epoch = int(state["mined_at"]), int(state["mined_epoch"])
        self.txt2neg_imgs = {k: list(v) for k, v in state["txt2neg_imgs"].items()}
        self.img2neg_txts = {k: list(v) for k, v in state["img2neg_txts"].items()}
        if self.mined_at >= 0:
            self._apply()
