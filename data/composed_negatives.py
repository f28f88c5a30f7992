"""VLDeformer's bi-modal hard negatives: negatives composed from the positive pair itself.

* composed captions: the positive caption with about `word_replace_prob` of its object words
  (token ids listed in a vocabulary file) replaced by other object words; same length, and
  at least one word always changes, so the composed caption is never the positive one;
* composed images: the positive image with `region_mix` of its regions replaced by regions
  (features and box positions, with any other per-region rows such as soft labels) of
  another image; the region count stays that of the positive image, so the box-count rules
  (`min_bb` .. `max_bb`) that selected it still hold.

`data.bimodal_negatives` of a run config (`utils.config.BimodalNegatives`) says how many and how;
`RetrievalDataset.set_bimodal_negatives` (data/datasets.py) adds them to each example as extra
negative rows of the batch, exactly like mined hard negatives: composed captions become
candidates for the image queries, composed images for the caption queries, and the
contrastive loss gathers them across ranks with the rest. Their names start with
`COMPOSED_PREFIX`, which no real image or caption has, so their image keys (64-bit hashes of
the name, `data.img_db.image_key`) never equal a real image's and duplicate masking never
removes them.

The vocabulary file holds one token id per line, optionally followed by a group name (`#`
starts a comment); a word is replaced by another word of its group (no name: group `""`),
so objects swap with objects and colours with colours. The synthetic generator writes one
for its object, colour and size words (`object_vocab.txt`); for real data
`scripts/make_object_vocab.py` writes one from the 1,600 Visual Genome object names through
the run's tokenizer.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from utils.errors import DataError, MissingPathError

# No real caption id or image name starts with a NUL character.
COMPOSED_PREFIX = "\x00composed:"


def read_object_vocab(path: str | os.PathLike[str]) -> list[list[int]]:
    """The swap groups of a vocabulary file: sorted distinct token ids per group, groups of
    one id dropped (nothing to swap to).

    Raises:
        MissingPathError: the file does not exist.
        DataError: a line is not `ID [GROUP]`, an id sits in two groups, or no group has
            two ids.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"data.bimodal_negatives.vocab: {path} does not exist")
    groups: dict[str, set[int]] = {}
    seen: dict[int, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise DataError(f"{path}:{number}: expected 'TOKEN_ID [GROUP]', got {line.strip()!r}")
        try:
            token = int(fields[0])
        except ValueError:
            raise DataError(f"{path}:{number}: {fields[0]!r} is not a token id") from None
        group = fields[1] if len(fields) == 2 else ""
        if seen.setdefault(token, group) != group:
            raise DataError(f"{path}:{number}: token id {token} is in groups {seen[token]!r} and {group!r}")
        groups.setdefault(group, set()).add(token)
    out = [sorted(ids) for _, ids in sorted(groups.items()) if len(ids) >= 2]
    if not out:
        raise DataError(f"{path}: no group holds two token ids or more; nothing to swap between")
    return out


def write_object_vocab(
    path: str | os.PathLike[str], token_ids: Sequence[int], groups: Sequence[str] = (), words: Sequence[str] = ()
) -> None:
    """Write a vocabulary file: `ID [GROUP]` per line, the word as a comment when given."""
    groups = list(groups) or [""] * len(token_ids)
    words = list(words) or [""] * len(token_ids)
    lines = []
    for token, group, word in zip(token_ids, groups, words):
        line = f"{token} {group}".rstrip()
        lines.append(f"{line}  # {word}" if word else line)
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def replace_words(
    ids: Sequence[int], vocab: Sequence[Sequence[int]], prob: float, rng: np.random.Generator
) -> list[int] | None:
    """A composed caption: each vocabulary token of `ids` replaced with chance `prob` by
    another token of its group (at least one is replaced). Other tokens and the length stay.

    Args:
        ids: the caption's token ids ([CLS]/[SEP] may be there: they are not in `vocab`).
        vocab: swap groups, each sorted distinct token ids (at least two), as
            `read_object_vocab` returns them.
        prob: replacement chance per vocabulary token.
        rng: the random source.

    Returns:
        The composed ids, or None when the caption holds no vocabulary token.
    """
    where = {t: (g, i) for g, group in enumerate(vocab) for i, t in enumerate(group)}
    positions = [p for p, t in enumerate(ids) if t in where]
    if not positions:
        return None
    chosen = [p for p in positions if rng.random() < prob]
    if not chosen:
        chosen = [positions[int(rng.integers(len(positions)))]]
    out = list(ids)
    for p in chosen:
        g, i = where[out[p]]
        group = vocab[g]
        # Uniform over the group without the current word.
        j = int(rng.integers(len(group) - 1))
        out[p] = group[j + 1 if j >= i else j]
    return out


def mix_regions(
    own: Sequence[torch.Tensor], other: Sequence[torch.Tensor], region_mix: float, rng: np.random.Generator
) -> tuple[torch.Tensor, ...]:
    """A composed image: part of `own`'s regions, the rest from `other`, as many as `own` has.

    Args:
        own: per-region tensors of the positive image, (n, ...) each (features, boxes, ...).
        other: the same tensors of another image, (m, ...) each.
        region_mix: share of the regions taken from `other` (rounded; at least one of each
            image when `own` has two regions or more and `other` has one or more).
        rng: the random source.

    Returns:
        The composed tensors: the kept regions of `own` (in their order), then those taken
        from `other` (in theirs), n rows in all.
    """
    n, m = own[0].shape[0], other[0].shape[0]
    take = round(n * region_mix)
    if n >= 2 and m >= 1:
        take = max(1, min(take, n - 1))
    take = min(take, m)
    keep = np.sort(rng.choice(n, n - take, replace=False))
    borrowed = np.sort(rng.choice(m, take, replace=False))
    keep_t, borrowed_t = torch.from_numpy(keep).long(), torch.from_numpy(borrowed).long()
    return tuple(torch.cat([a[keep_t], b[borrowed_t]]) for a, b in zip(own, other))


def composed_caption_id(txt_id: str, j: int) -> str:
    """Name of the `j`-th composed caption of caption `txt_id` (also its image's name)."""
    return f"{COMPOSED_PREFIX}txt:{txt_id}:{j}"


def composed_image_name(txt_id: str, j: int) -> str:
    """Name of the `j`-th composed image of the example of caption `txt_id`."""
    return f"{COMPOSED_PREFIX}img:{txt_id}:{j}"


def is_composed(name: str) -> bool:
    """Whether a caption id or image name is a composed negative."""
    return name.startswith(COMPOSED_PREFIX)
