"""Datasets and collators producing the batch layout of docs/architecture.md.

Text inputs are ``{"input_ids": (B, L), "attention_mask": (B, L)}`` with ``[CLS] ids [SEP]``
right-padded with 0. Image inputs are ``{"img_feat": (B, N, 2048), "img_pos": (B, N, 7),
"img_mask": (B, N)}`` plus ``"img_masked"`` (B, N) for SMRM.

Randomness (VMLM/SMRM masking, ItmRank negative sampling) comes from a generator seeded by
``(seed, epoch, index)`` for each example, so a run is reproducible whatever the number of
DataLoader workers, and resumable: restore the epoch with ``set_epoch`` and the sampler
position, and every later example is drawn exactly as in the uninterrupted run.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from data.composed_negatives import (
    composed_caption_id,
    composed_image_name,
    mix_regions,
    read_object_vocab,
    replace_words,
)
from data.img_db import ImgDb, image_key
from data.txt_db import TxtDb
from utils.config import BimodalNegatives
from utils.errors import ConfigError, DataError
from utils.region_features import BOX_DIM, FEAT_DIM

IGNORE_INDEX = -100
# 'top-random' samples among the top max(2n + 10, 50) (at most 1000) non-positives, the pool
# the original LightningDOT retrieved before sampling its hard negatives.
_TOP_RANDOM_MIN, _TOP_RANDOM_MAX = 50, 1000
_RANK_RANGE = re.compile(r"(\d+)-(\d+)")


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Generator for one example of one epoch, independent of worker count and order."""
    return np.random.default_rng([seed, epoch, index])


def collate_text(input_ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pads ``[CLS] ids [SEP]`` LongTensors into ``{input_ids, attention_mask}`` (B, L)."""
    lens = torch.tensor([len(t) for t in input_ids])
    ids = pad_sequence(list(input_ids), batch_first=True, padding_value=0)
    mask = (torch.arange(ids.size(1))[None, :] < lens[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def collate_images(feats: Sequence[torch.Tensor], poss: Sequence[torch.Tensor],
                   masked: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Pads per-image (n_i, 2048) features and (n_i, 7) boxes into the image inputs."""
    nbbs = [f.size(0) for f in feats]
    b, n = len(feats), max(nbbs)
    img_feat = torch.zeros(b, n, FEAT_DIM)
    img_pos = torch.zeros(b, n, BOX_DIM)
    img_mask = torch.zeros(b, n, dtype=torch.long)
    for i, (f, p, k) in enumerate(zip(feats, poss, nbbs)):
        img_feat[i, :k] = f
        img_pos[i, :k] = p
        img_mask[i, :k] = 1
    out = {"img_feat": img_feat, "img_pos": img_pos, "img_mask": img_mask}
    if masked is not None:
        img_masked = torch.zeros(b, n, dtype=torch.bool)
        for i, (m, k) in enumerate(zip(masked, nbbs)):
            img_masked[i, :k] = m
        out["img_masked"] = img_masked
    return out


def mask_tokens(ids: Sequence[int], rng: np.random.Generator, mask_prob: float, mask_id: int,
                v_range: tuple[int, int]) -> tuple[list[int], list[int]]:
    """BERT masking of one caption (without [CLS]/[SEP]).

    Each token is chosen with probability ``mask_prob`` (at least one is chosen when the
    caption is not empty); a chosen token becomes [MASK] 80% of the time, a random id of
    ``v_range`` 10% and stays 10%.

    Returns:
        ``(masked_ids, labels)``: labels hold the original id at chosen positions, -100
        elsewhere.
    """
    arr = np.asarray(ids, dtype=np.int64)
    labels = np.full(len(arr), IGNORE_INDEX, dtype=np.int64)
    if len(arr) == 0:
        return [], []
    chosen = rng.random(len(arr)) < mask_prob
    if not chosen.any():
        chosen[rng.integers(len(arr))] = True
    labels[chosen] = arr[chosen]
    action = rng.random(len(arr))
    out = arr.copy()
    out[chosen & (action < 0.8)] = mask_id
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    out[to_random] = rng.integers(v_range[0], v_range[1], size=int(to_random.sum()))
    return out.tolist(), labels.tolist()


def mask_regions(num_boxes: int, rng: np.random.Generator, mrm_prob: float) -> torch.Tensor:
    """Bool (num_boxes,) mask: each box with probability ``mrm_prob``, at least one."""
    masked = rng.random(num_boxes) < mrm_prob
    if num_boxes and not masked.any():
        masked[rng.integers(num_boxes)] = True
    return torch.from_numpy(masked)


def hard_negative_pool(n: int, mode: str) -> tuple[int, int | None]:
    """Ranks `[start, stop)` of the non-positives that `mode` draws `n` negatives from.

    `stop` None means the whole ranking; `(0, 0)` means no negatives. The one parser of the
    `retrieval.hard_negatives_sampling` grammar: `none | random | top | top-random | a-b`.

    Raises:
        ConfigError: an unknown mode, or `a-b` with `a >= b`.
    """
    if mode == "none" or n <= 0:
        return 0, 0
    if mode == "top":
        return 0, n
    if mode == "random":
        return 0, None
    if mode == "top-random":
        return 0, min(max(2 * n + 10, _TOP_RANDOM_MIN), _TOP_RANDOM_MAX)
    m = _RANK_RANGE.fullmatch(mode)
    if m is None or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(
            f"retrieval.hard_negatives_sampling: unknown hard negative sampling mode {mode!r}; use none, "
            f"random, top, top-random or 'a-b' with a < b (e.g. 10-20)"
        )
    return int(m.group(1)), int(m.group(2))


def select_hard_negatives(ranked_candidates: Sequence[str], positives: Sequence[str] | set[str],
                          n: int, mode: str, rng: np.random.Generator) -> list[str]:
    """Picks up to ``n`` hard negatives from a best-first ranking.

    Positives are removed first; ranks below refer to the remaining non-positives.

    Modes:
        ``none``: no negatives.
        ``random``: uniform among all given non-positives (pass the whole ranking).
        ``top``: the ``n`` best-ranked non-positives.
        ``top-random``: ``n`` uniform among the top ``max(2n + 10, 50)`` (at most 1000)
            non-positives, the pool the original sampled from.
        ``a-b`` (e.g. ``10-20``): uniform among the non-positives at 0-based ranks
            ``a .. b-1`` (Python slice ``[a:b]``), i.e. skipping the ``a`` best.

    Returns fewer than ``n`` when the pool is smaller.
    """
    if n <= 0 or mode == "none":
        return []
    start, stop = hard_negative_pool(n, mode)
    pos = set(positives)
    cands = [c for c in dict.fromkeys(ranked_candidates) if c not in pos]
    if mode == "top":
        return cands[:n]
    pool = cands[start:stop]
    picked = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[j] for j in picked]


def _sample_excluding(pool: Sequence[str], pool_set: set[str], exclude: set[str], k: int,
                      rng: np.random.Generator, what: str) -> list[str]:
    """``k`` distinct uniform samples of ``pool`` outside ``exclude`` (rejection sampling)."""
    if k <= 0:
        return []
    available = len(pool) - sum(1 for e in exclude if e in pool_set)
    if available < k:
        raise DataError(f"cannot sample {k} negative {what}: only {available} candidates")
    seen, out = set(exclude), []
    while len(out) < k:
        for j in rng.integers(len(pool), size=2 * (k - len(out)) + 4):
            c = pool[int(j)]
            if c not in seen:
                seen.add(c)
                out.append(c)
                if len(out) == k:
                    break
    return out


@dataclass(frozen=True)
class HardNegatives:
    """Mined negatives, already selected and ordered (datasets use the first entries).

    Attributes:
        txt2neg_imgs: caption id -> negative image names.
        img2neg_txts: image name -> negative caption ids.
    """

    txt2neg_imgs: Mapping[str, Sequence[str]] | None = None
    img2neg_txts: Mapping[str, Sequence[str]] | None = None


class _CaptionImageDataset(Dataset):
    """Every kept caption of paired (txt_db, img_db) lists, with its image.

    Attributes:
        img_names: image name of each example.
        txt_lens: caption length with [CLS]/[SEP] of each example.
        img_lens: number of boxes of each example's image.
        lens: ``txt_lens + img_lens`` (the original's bucketing length).
    """

    def __init__(self, txt_dbs: Sequence[TxtDb], img_dbs: Sequence[ImgDb]) -> None:
        if len(txt_dbs) != len(img_dbs) or not txt_dbs:
            raise DataError(f"need as many img_dbs as txt_dbs (>= 1), got {len(txt_dbs)} "
                            f"txt_dbs and {len(img_dbs)} img_dbs")
        self.txt_dbs, self.img_dbs = list(txt_dbs), list(img_dbs)
        self._examples: list[tuple[int, str]] = []
        self.img_names: list[str] = []
        self.txt_lens: list[int] = []
        self.img_lens: list[int] = []
        for k, (tdb, idb) in enumerate(zip(self.txt_dbs, self.img_dbs)):
            for txt_id, n in zip(tdb.ids, tdb.lens):
                name = tdb.txt2img[txt_id]
                if name not in idb:
                    raise DataError(f"caption {txt_id!r} of txt_db {tdb.db_dir} refers to image "
                                    f"{name!r}, which is not in img_db {idb.img_dir} "
                                    f"({idb.feat_dir})")
                self._examples.append((k, txt_id))
                self.img_names.append(name)
                self.txt_lens.append(n + 2)
                self.img_lens.append(idb.name2nbb[name])
        self.lens = [t + i for t, i in zip(self.txt_lens, self.img_lens)]

    def __len__(self) -> int:
        return len(self._examples)

    @property
    def txt_ids(self) -> list[str]:
        """Caption id of each example."""
        return [t for _, t in self._examples]

    def _text(self, k: int, txt_id: str) -> torch.Tensor:
        tdb = self.txt_dbs[k]
        return torch.tensor([tdb.cls_id, *tdb.input_ids(txt_id), tdb.sep_id], dtype=torch.long)

    def _image(self, k: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        feat, pos, _ = self.img_dbs[k].tensors(name, with_soft_labels=False)
        return feat, pos


class _HardNegativeDataset(_CaptionImageDataset):
    """Caption-image examples that can take mined hard negatives (images for the caption,
    captions for the image), e.g. from `utils.pipeline.evaluation.HardNegativeMiner`."""

    def __init__(self, txt_dbs: Sequence[TxtDb], img_dbs: Sequence[ImgDb]) -> None:
        super().__init__(txt_dbs, img_dbs)
        self.hard_negatives = HardNegatives()
        self.num_hard_negatives = 0

    def set_hard_negatives(self, txt2neg_imgs: Mapping[str, Sequence[str]] | None,
                           img2neg_txts: Mapping[str, Sequence[str]] | None,
                           num_hard_negatives: int) -> None:
        """Sets the negatives used from now on; each example takes the first
        ``num_hard_negatives`` entries of its caption's and its image's lists.

        Raises:
            ValueError: a negative image or caption is not in the databases of the example's
                pair.
        """
        if num_hard_negatives < 0:
            raise ValueError(f"num_hard_negatives must be >= 0, got {num_hard_negatives}")
        for k, (tdb, idb) in enumerate(zip(self.txt_dbs, self.img_dbs)):
            for txt_id, negs in (txt2neg_imgs or {}).items():
                if txt_id in tdb.txt2img:
                    bad = [n for n in negs[:num_hard_negatives] if n not in idb]
                    if bad:
                        raise DataError(f"hard negative image {bad[0]!r} of caption {txt_id!r} "
                                        f"is not in img_db {idb.img_dir}")
            for name, negs in (img2neg_txts or {}).items():
                if name in tdb.img2txts:
                    bad = [t for t in negs[:num_hard_negatives] if t not in tdb.txt2img]
                    if bad:
                        raise DataError(f"hard negative caption {bad[0]!r} of image {name!r} "
                                        f"is not in txt_db {tdb.db_dir}")
        self.hard_negatives = HardNegatives(txt2neg_imgs, img2neg_txts)
        self.num_hard_negatives = num_hard_negatives


class RetrievalDataset(_HardNegativeDataset):
    """Caption-image pairs for contrastive training (CMR pre-training and fine-tuning).

    Each example is one caption and its image, plus optional hard negatives (images for the
    caption and captions for the image) set with :meth:`set_hard_negatives`.
    """

    bimodal: BimodalNegatives | None = None

    def set_bimodal_negatives(self, spec: BimodalNegatives | None, seed: int = 0) -> None:
        """Add VLDeformer's composed negatives (data/composed_negatives.py) to every example
        from now on, after its mined ones; None turns them off. Draws depend on `seed`, the
        epoch (`set_epoch`) and the example only.

        Raises:
            MissingPathError / DataError: the vocabulary file is missing or unreadable.
        """
        self.bimodal, self._bimodal_seed, self._bimodal_epoch = spec, seed, 0
        self._bimodal_vocab = read_object_vocab(spec.vocab) if spec is not None and spec.text > 0 else []
        # Per database, the images another image's regions may come from.
        self._bimodal_images = [sorted(tdb.img2txts) for tdb in self.txt_dbs]

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose composed negatives ``__getitem__`` draws."""
        self._bimodal_epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, txt_id = self._examples[i]
        name = self.img_names[i]
        feat, pos = self._image(k, name)
        item = {"txt_id": txt_id, "input_ids": self._text(k, txt_id), "img_name": name,
                "img_feat": feat, "img_pos": pos, "neg_imgs": [], "neg_txts": []}
        n = self.num_hard_negatives
        if n > 0 and self.hard_negatives.txt2neg_imgs is not None:
            for neg in list(self.hard_negatives.txt2neg_imgs.get(txt_id, ()))[:n]:
                item["neg_imgs"].append((neg, *self._image(k, neg)))
        if n > 0 and self.hard_negatives.img2neg_txts is not None:
            tdb = self.txt_dbs[k]
            for neg in list(self.hard_negatives.img2neg_txts.get(name, ()))[:n]:
                item["neg_txts"].append((neg, self._text(k, neg), tdb.txt2img[neg]))
        if self.bimodal is not None:
            self._add_composed(item, k, i)
        return item

    def _add_composed(self, item: dict[str, Any], k: int, i: int) -> None:
        """Append the example's composed captions and images (names never of real ones)."""
        spec, txt_id = self.bimodal, item["txt_id"]
        rng = np.random.default_rng([self._bimodal_seed, self._bimodal_epoch, i, 0xB1])
        ids = item["input_ids"].tolist()
        for j in range(spec.text):
            composed = replace_words(ids, self._bimodal_vocab, spec.word_replace_prob, rng)
            if composed is None:
                break  # no object word to replace: a composed caption would be the positive
            fake = composed_caption_id(txt_id, j)
            item["neg_txts"].append((fake, torch.tensor(composed, dtype=torch.long), fake))
        images = self._bimodal_images[k]
        for j in range(spec.image if len(images) > 1 else 0):
            other = images[int(rng.integers(len(images) - 1))]
            if other == item["img_name"]:
                other = images[-1]
            other_feat, other_pos = self._image(k, other)
            feat, pos = mix_regions((item["img_feat"], item["img_pos"]), (other_feat, other_pos),
                                    spec.region_mix, rng)
            item["neg_imgs"].append((composed_image_name(txt_id, j), feat, pos))


def retrieval_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch for contrastive training.

    Rows ``0..num_pos-1`` of ``txt`` and ``img`` are the positive pairs; hard-negative images
    and captions follow. A hard negative already present in the batch (as a positive or as
    another example's negative) is not repeated.
    """
    txt_ids = [it["txt_id"] for it in items]
    txt_seqs = [it["input_ids"] for it in items]
    txt_imgs = [it["img_name"] for it in items]
    img_names = [it["img_name"] for it in items]
    feats = [it["img_feat"] for it in items]
    poss = [it["img_pos"] for it in items]
    seen_txt, seen_img = set(txt_ids), set(img_names)
    for it in items:
        for name, feat, pos in it["neg_imgs"]:
            if name not in seen_img:
                seen_img.add(name)
                img_names.append(name)
                feats.append(feat)
                poss.append(pos)
        for txt_id, ids, img in it["neg_txts"]:
            if txt_id not in seen_txt:
                seen_txt.add(txt_id)
                txt_ids.append(txt_id)
                txt_seqs.append(ids)
                txt_imgs.append(img)
    return {
        "txt": collate_text(txt_seqs),
        "img": collate_images(feats, poss),
        "num_pos": len(items),
        "txt_img_keys": torch.tensor([image_key(n) for n in txt_imgs], dtype=torch.long),
        "img_keys": torch.tensor([image_key(n) for n in img_names], dtype=torch.long),
        "txt_ids": txt_ids,
        "img_names": img_names,
    }


class VmlmDataset(_CaptionImageDataset):
    """Caption (BERT-masked) + its image, for VMLM (SPEC 5)."""

    def __init__(self, txt_dbs: Sequence[TxtDb], img_dbs: Sequence[ImgDb],
                 mask_prob: float = 0.15, seed: int = 0) -> None:
        super().__init__(txt_dbs, img_dbs)
        self.mask_prob, self.seed, self.epoch = mask_prob, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose masks ``__getitem__`` draws."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, txt_id = self._examples[i]
        tdb = self.txt_dbs[k]
        rng = item_rng(self.seed, self.epoch, i)
        ids, labels = mask_tokens(tdb.input_ids(txt_id), rng, self.mask_prob, tdb.mask_id,
                                  tdb.v_range)
        feat, pos = self._image(k, self.img_names[i])
        return {"txt_id": txt_id,
                "input_ids": torch.tensor([tdb.cls_id, *ids, tdb.sep_id], dtype=torch.long),
                "txt_labels": torch.tensor([IGNORE_INDEX, *labels, IGNORE_INDEX],
                                           dtype=torch.long),
                "img_name": self.img_names[i], "img_feat": feat, "img_pos": pos}


def vmlm_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch ``{txt, img, txt_labels, txt_ids, img_names}``; labels are -100 except at masked positions."""
    txt = collate_text([it["input_ids"] for it in items])
    labels = pad_sequence([it["txt_labels"] for it in items], batch_first=True,
                          padding_value=IGNORE_INDEX)
    img = collate_images([it["img_feat"] for it in items], [it["img_pos"] for it in items])
    return {"txt": txt, "img": img, "txt_labels": labels,
            "txt_ids": [it["txt_id"] for it in items], "img_names": [it["img_name"] for it in items]}


class SmrmDataset(_CaptionImageDataset):
    """Caption + its image with masked regions, for MRFR / MRC-kl (SPEC 5)."""

    def __init__(self, txt_dbs: Sequence[TxtDb], img_dbs: Sequence[ImgDb],
                 mrm_prob: float = 0.15, seed: int = 0) -> None:
        super().__init__(txt_dbs, img_dbs)
        self.mrm_prob, self.seed, self.epoch = mrm_prob, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose masks ``__getitem__`` draws."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, txt_id = self._examples[i]
        name = self.img_names[i]
        feat, pos, soft = self.img_dbs[k].tensors(name, with_soft_labels=True)
        rng = item_rng(self.seed, self.epoch, i)
        return {"txt_id": txt_id, "input_ids": self._text(k, txt_id), "img_name": name,
                "img_feat": feat, "img_pos": pos, "soft_labels": soft,
                "img_masked": mask_regions(feat.size(0), rng, self.mrm_prob)}


def smrm_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch ``{txt, img, feat_targets, label_targets, txt_ids, img_names}``.

    Masked boxes have their features zeroed in ``img["img_feat"]``; the targets are their
    original features and soft labels, in ``img["img_masked"].nonzero()`` order.
    """
    masked = [it["img_masked"] for it in items]
    img = collate_images([it["img_feat"] for it in items], [it["img_pos"] for it in items],
                         masked)
    feat_targets = torch.cat([it["img_feat"][m] for it, m in zip(items, masked)])
    label_targets = torch.cat([it["soft_labels"][m] for it, m in zip(items, masked)])
    img["img_feat"][img["img_masked"]] = 0.0
    return {"txt": collate_text([it["input_ids"] for it in items]), "img": img,
            "feat_targets": feat_targets, "label_targets": label_targets,
            "txt_ids": [it["txt_id"] for it in items], "img_names": [it["img_name"] for it in items]}


class ItmDataset(_CaptionImageDataset):
    """UNITER's ITM pre-training examples: a caption with its image (label 1) or, with
    probability ``neg_prob``, with another image of the same databases (label 0)."""

    def __init__(self, txt_dbs: Sequence[TxtDb], img_dbs: Sequence[ImgDb],
                 neg_prob: float = 0.5, seed: int = 0) -> None:
        super().__init__(txt_dbs, img_dbs)
        if not 0.0 <= neg_prob <= 1.0:
            raise ValueError(f"neg_prob must lie in [0, 1], got {neg_prob}")
        self.neg_prob, self.seed, self.epoch = neg_prob, seed, 0
        self._img_pools = [list(dict.fromkeys(t.txt2img.values())) for t in self.txt_dbs]
        self._img_pool_sets = [set(p) for p in self._img_pools]

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose negatives ``__getitem__`` draws."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, txt_id = self._examples[i]
        name = self.img_names[i]
        rng = item_rng(self.seed, self.epoch, i)
        label = 1
        if rng.random() < self.neg_prob:
            name = _sample_excluding(self._img_pools[k], self._img_pool_sets[k], {name}, 1, rng, "images")[0]
            label = 0
        feat, pos = self._image(k, name)
        return {"txt_id": txt_id, "input_ids": self._text(k, txt_id), "img_name": name,
                "img_feat": feat, "img_pos": pos, "label": label}


def itm_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch ``{txt, img, labels, txt_ids, img_names}``: `pair_collate` plus the 1 / 0 labels."""
    return {**pair_collate(items), "labels": torch.tensor([it["label"] for it in items], dtype=torch.long)}


class ImageEvalDataset(Dataset):
    """Images of an evaluation split, in the given (canonical) order."""

    def __init__(self, img_db: ImgDb, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in img_db]
        if missing:
            raise DataError(f"image {missing[0]!r} is not in img_db {img_db.img_dir} "
                            f"({len(missing)} missing)")
        self.img_db, self.names = img_db, list(names)
        self.lens = [img_db.name2nbb[n] for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        feat, pos, _ = self.img_db.tensors(self.names[i], with_soft_labels=False)
        return {"index": i, "img_name": self.names[i], "img_feat": feat, "img_pos": pos}


def image_eval_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch ``{img, img_names, index}``; ``index`` = position in the canonical order."""
    return {"img": collate_images([it["img_feat"] for it in items],
                                  [it["img_pos"] for it in items]),
            "img_names": [it["img_name"] for it in items],
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}


class TextEvalDataset(Dataset):
    """Captions of an evaluation split, in ``txt_db.ids`` order."""

    def __init__(self, txt_db: TxtDb) -> None:
        self.txt_db = txt_db
        self.lens = [n + 2 for n in txt_db.lens]

    def __len__(self) -> int:
        return len(self.txt_db)

    def __getitem__(self, i: int) -> dict[str, Any]:
        tdb, txt_id = self.txt_db, self.txt_db.ids[i]
        ids = torch.tensor([tdb.cls_id, *tdb.input_ids(txt_id), tdb.sep_id], dtype=torch.long)
        return {"index": i, "txt_id": txt_id, "input_ids": ids}


def text_eval_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch ``{txt, txt_ids, index}``; ``index`` = position in the caption order."""
    return {"txt": collate_text([it["input_ids"] for it in items]),
            "txt_ids": [it["txt_id"] for it in items],
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}


class PairDataset(Dataset):
    """Explicit (caption id, image name) pairs, e.g. the candidates to re-rank."""

    def __init__(self, txt_db: TxtDb, img_db: ImgDb, pairs: Sequence[tuple[str, str]]) -> None:
        missing = [name for _, name in pairs if name not in img_db]
        if missing:
            raise DataError(f"image {missing[0]!r} is not in img_db {img_db.img_dir}")
        self.txt_db, self.img_db, self.pairs = txt_db, img_db, list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        txt_id, name = self.pairs[i]
        tdb = self.txt_db
        feat, pos, _ = self.img_db.tensors(name, with_soft_labels=False)
        return {"txt_id": txt_id, "img_name": name, "img_feat": feat, "img_pos": pos,
                "input_ids": torch.tensor([tdb.cls_id, *tdb.input_ids(txt_id), tdb.sep_id],
                                          dtype=torch.long)}


def pair_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch ``{txt, img, txt_ids, img_names}``; row i of ``txt`` pairs with row i of ``img``."""
    return {"txt": collate_text([it["input_ids"] for it in items]),
            "img": collate_images([it["img_feat"] for it in items],
                                  [it["img_pos"] for it in items]),
            "txt_ids": [it["txt_id"] for it in items],
            "img_names": [it["img_name"] for it in items]}


class ItmRankDataset(_HardNegativeDataset):
    """Groups of one positive pair and its negatives for cross-encoder ranking training.

    UNITER's recipe: for each caption, ``negative_size`` negative images paired with the
    caption and/or ``negative_size`` negative captions paired with its image
    (``negative_side`` = ``image``, ``text`` or ``both``; ``both`` is UNITER's ItmRankDataset
    and gives groups of ``1 + 2 * negative_size``). Negatives come first from
    ``hard_negatives`` (first entries of the lists) and are completed by uniform samples
    among the images / captions of the same pair of databases.
    """

    SIDES = ("image", "text", "both")

    def __init__(self, txt_dbs: Sequence[TxtDb], img_dbs: Sequence[ImgDb], negative_size: int,
                 hard_negatives: HardNegatives | None = None, negative_side: str = "both",
                 seed: int = 0) -> None:
        super().__init__(txt_dbs, img_dbs)
        if negative_size < 1:
            raise ValueError(f"negative_size must be >= 1, got {negative_size}")
        if negative_side not in self.SIDES:
            raise ValueError(f"negative_side must be one of {self.SIDES}, got {negative_side!r}")
        self.negative_size, self.negative_side = negative_size, negative_side
        self.hard_negatives = hard_negatives or HardNegatives()
        self.seed, self.epoch = seed, 0
        self._img_pools = [list(dict.fromkeys(t.txt2img.values())) for t in self.txt_dbs]
        self._img_pool_sets = [set(p) for p in self._img_pools]
        self._txt_pool_sets = [set(t.ids) for t in self.txt_dbs]

    @property
    def group_size(self) -> int:
        """Rows per example: the positive then the negatives."""
        sides = 2 if self.negative_side == "both" else 1
        return 1 + sides * self.negative_size

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose negatives ``__getitem__`` draws."""
        self.epoch = epoch

    def _negatives(self, hard: Mapping[str, Sequence[str]] | None, key: str,
                   exclude: set[str], pool: Sequence[str], pool_set: set[str],
                   rng: np.random.Generator, what: str) -> list[str]:
        chosen = [n for n in (hard or {}).get(key, ()) if n not in exclude and n in pool_set]
        chosen = list(dict.fromkeys(chosen))[:self.negative_size]
        return chosen + _sample_excluding(pool, pool_set, exclude | set(chosen),
                                          self.negative_size - len(chosen), rng, what)

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, txt_id = self._examples[i]
        name = self.img_names[i]
        tdb = self.txt_dbs[k]
        rng = item_rng(self.seed, self.epoch, i)
        pairs = [(txt_id, name)]
        if self.negative_side in ("image", "both"):
            negs = self._negatives(self.hard_negatives.txt2neg_imgs, txt_id, {name},
                                   self._img_pools[k], self._img_pool_sets[k], rng, "images")
            pairs += [(txt_id, n) for n in negs]
        if self.negative_side in ("text", "both"):
            negs = self._negatives(self.hard_negatives.img2neg_txts, name,
                                   set(tdb.img2txts.get(name, ())), tdb.ids,
                                   self._txt_pool_sets[k], rng, "captions")
            pairs += [(t, name) for t in negs]
        texts = {t: self._text(k, t) for t in dict.fromkeys(t for t, _ in pairs)}
        images = {n: self._image(k, n) for n in dict.fromkeys(n for _, n in pairs)}
        return {"txt_ids": [t for t, _ in pairs], "img_names": [n for _, n in pairs],
                "input_ids": [texts[t] for t, _ in pairs],
                "img_feat": [images[n][0] for _, n in pairs],
                "img_pos": [images[n][1] for _, n in pairs]}


def itm_rank_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Flattens groups: rows ``g * group_size`` are positives, the following rows negatives.

    Returns ``{txt, img, txt_ids, img_names, labels, group_size}`` with ``labels`` 1 on
    positive rows and 0 on negative rows.
    """
    group_size = len(items[0]["txt_ids"])
    if any(len(it["txt_ids"]) != group_size for it in items):
        raise ValueError("all ItmRank examples of a batch must have the same group size")
    labels = torch.zeros(len(items), group_size, dtype=torch.long)
    labels[:, 0] = 1
    return {"txt": collate_text([t for it in items for t in it["input_ids"]]),
            "img": collate_images([f for it in items for f in it["img_feat"]],
                                  [p for it in items for p in it["img_pos"]]),
            "txt_ids": [t for it in items for t in it["txt_ids"]],
            "img_names": [n for it in items for n in it["img_names"]],
            "labels": labels.reshape(-1), "group_size": group_size}
