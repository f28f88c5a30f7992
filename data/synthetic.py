"""A structured synthetic image-text dataset written in the real formats.

Each image holds 2-4 objects (a class, a colour, a size and a box). A region's feature is a
fixed random vector of its class plus vectors of its attributes, a projection of its box and
noise; its soft labels peak on the class's Visual Genome id. Lower-confidence "part" rows
and sub-0.2 "clutter" rows follow, so the nbb rule is exercised. Captions come from a small
grammar naming 1-3 of the image's objects with their attributes and spatial relations.
Images come in families that share object classes with the colours reassigned, so a caption
only matches its image when attributes are bound to the right objects.

The generator writes per-image detector ``.npz`` files and a Karpathy-style JSON and builds
the databases through :mod:`data.converters`:

    OUT/txt_db/{train,val,test}/  OUT/img_db/  OUT/tokenizer/  OUT/captions.json
    OUT/objects.json (image name -> its objects)  OUT/manifest.json
    OUT/object_vocab.txt (token ids of the object, colour and size words, by group: the
    vocabulary of the composed caption negatives, data/composed_negatives.py)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from data.composed_negatives import write_object_vocab
from data.converters import convert_karpathy, convert_npz_dir
from data.lmdb_io import atomic_dir
from utils.errors import MissingPathError
from utils.progress import (
    progress as progress_bar,  # `progress` is the on/off flag here
)
from utils.region_features import FEAT_DIM, NUM_LABELS

MANIFEST = "manifest.json"
OBJECT_VOCAB = "object_vocab.txt"
MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")

OBJECTS = ("dog", "cat", "car", "bus", "bicycle", "horse", "bird", "boat", "chair", "table",
           "cup", "bottle", "ball", "kite", "tree", "house", "clock", "lamp", "book", "phone",
           "umbrella", "bench", "truck", "sheep", "cow", "bear", "train", "plane", "vase", "hat")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange", "pink",
           "purple", "gray")
SIZES = ("small", "large")
RELATIONS = ("next to", "to the left of", "to the right of", "above", "below")
PREFIXES = ("", "a photo of ", "there is ", "an image of ", "a picture showing ")
GLUE = ("a", "an", "the", "and", "of", "to", "next", "left", "right", "above", "below", "photo",
        "there", "is", "image", "picture", "showing", "with", ",", ".")
BERT_SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}

# Row kinds of a synthetic image and their confidence ranges.
_OBJECT, _PART, _CLUTTER = 0, 1, 2
_CONF = {_OBJECT: (0.6, 0.99), _PART: (0.25, 0.55), _CLUTTER: (0.02, 0.19)}
# Weights of (class, colour, size) vectors in a row's feature, by row kind.
_WEIGHTS = {_OBJECT: (1.0, 0.8, 0.5), _PART: (0.6, 0.5, 0.0), _CLUTTER: (0.3, 0.0, 0.0)}
_FAMILY_PROB = 0.6


@dataclass(frozen=True)
class SyntheticConfig:
    """Arguments of a synthetic dataset; equal configs give identical data."""

    seed: int = 0
    num_train: int = 1500
    num_val: int = 200
    num_test: int = 500
    captions_per_image: int = 5
    keep_npz: bool = False

    def counts(self) -> dict[str, int]:
        """Images per split."""
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}


TINY = SyntheticConfig(num_train=32, num_val=8, num_test=12)


def vg_class_id(obj: int) -> int:
    """Fixed column of object class ``obj`` among the 1600 VG classes (column 0: background)."""
    return 1 + (37 * obj + 11) % (NUM_LABELS - 1)


def vocabulary() -> list[str]:
    """WordPiece vocabulary: BERT special ids at the standard positions, then the grammar
    words and single characters (so any word tokenizes without [UNK])."""
    vocab = [BERT_SPECIALS.get(i, f"[unused{i}]") for i in range(104)]
    words = list(dict.fromkeys(
        [w for phrase in (*OBJECTS, *COLOURS, *SIZES, *RELATIONS, *GLUE) for w in phrase.split()]))
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    pieces = ["##" + c for c in letters + digits] + ["##s"]
    extra = [c for c in letters + digits if c not in words]
    return vocab + words + extra + list(dict.fromkeys(pieces))


def write_synthetic_object_vocab(out_dir: str) -> str:
    """Writes OUT/object_vocab.txt (groups `object`, `colour`, `size`); returns its path."""
    ids = {t: i for i, t in enumerate(vocabulary())}
    groups = [("object", OBJECTS), ("colour", COLOURS), ("size", SIZES)]
    rows = [(ids[w], g, w) for g, words in groups for w in words]
    path = os.path.join(out_dir, OBJECT_VOCAB)
    write_object_vocab(path, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    return path


def write_tokenizer(out_dir: str) -> None:
    """Writes vocab.txt, tokenizer.json and tokenizer_config.json (a lower-casing BERT
    WordPiece tokenizer that ``BertTokenizerFast.from_pretrained`` loads offline)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = vocabulary()
    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
               "cls_token": "[CLS]", "mask_token": "[MASK]"}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                   "model_max_length": 512, **special}, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)


# ---------------------------------------------------------------------------- scene layout


def _boxes(rng: np.random.Generator, sizes: np.ndarray) -> np.ndarray:
    """Normalised boxes [x1, y1, x2, y2, w, h]; large objects get large boxes."""
    n = len(sizes)
    lo = np.where(sizes == 1, 0.35, 0.1)
    wh = lo[:, None] + rng.random((n, 2)) * 0.3
    xy = rng.random((n, 2)) * (1.0 - wh)
    return np.concatenate([xy, xy + wh, wh], axis=1)


def _make_image(rng: np.random.Generator, sibling_of: dict | None) -> dict:
    """One image's objects; a sibling keeps the classes and reassigns the colours."""
    if sibling_of is None:
        n = int(rng.integers(2, 5))
        classes = rng.choice(len(OBJECTS), size=n, replace=False)
        colours = rng.integers(len(COLOURS), size=n)
        sizes = rng.integers(len(SIZES), size=n)
    else:
        classes = sibling_of["classes"].copy()
        n = len(classes)
        colours = sibling_of["colours"][rng.permutation(n)]
        # Make sure at least one object changes colour.
        while np.array_equal(colours, sibling_of["colours"]):
            colours = colours.copy()
            colours[rng.integers(n)] = rng.integers(len(COLOURS))
        sizes = rng.integers(len(SIZES), size=n)
    return {"classes": classes, "colours": colours, "sizes": sizes, "boxes": _boxes(rng, sizes)}


def _rows(rng: np.random.Generator, img: dict) -> dict[str, np.ndarray]:
    """Detector rows of one image: objects, their parts and clutter, sorted by conf."""
    n = len(img["classes"])
    part_of = rng.integers(n, size=int(rng.integers(n, 2 * n + 1)))
    # Enough clutter for more than min_bb (10) rows, so the nbb rule drops some of them.
    n_clutter = max(2, 11 - n - len(part_of)) + int(rng.integers(0, 3))
    kinds = np.concatenate([np.full(n, _OBJECT), np.full(len(part_of), _PART),
                            np.full(n_clutter, _CLUTTER)])
    classes = np.concatenate([img["classes"], img["classes"][part_of],
                              rng.integers(len(OBJECTS), size=n_clutter)])
    colours = np.concatenate([img["colours"], img["colours"][part_of],
                              rng.integers(len(COLOURS), size=n_clutter)])
    sizes = np.concatenate([img["sizes"], img["sizes"][part_of], np.zeros(n_clutter, int)])
    parent = img["boxes"][part_of]
    shrink = 0.4 + 0.4 * rng.random((len(part_of), 2))
    part_wh = parent[:, 4:6] * shrink
    part_xy = parent[:, 0:2] + (parent[:, 4:6] - part_wh) * rng.random((len(part_of), 2))
    clutter = _boxes(rng, np.zeros(n_clutter, int))
    boxes = np.concatenate([img["boxes"], np.concatenate([part_xy, part_xy + part_wh, part_wh], 1),
                            clutter])
    lo = np.array([_CONF[k][0] for k in kinds])
    hi = np.array([_CONF[k][1] for k in kinds])
    conf = lo + (hi - lo) * rng.random(len(kinds))
    order = np.argsort(-conf, kind="stable")
    return {"kinds": kinds[order], "classes": classes[order], "colours": colours[order],
            "sizes": sizes[order], "boxes": boxes[order], "conf": conf[order]}


# ---------------------------------------------------------------------------- captions


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _phrase(rng: np.random.Generator, img: dict, i: int) -> str:
    words = []
    if rng.random() < 0.5:
        words.append(SIZES[img["sizes"][i]])
    if rng.random() < 0.9:
        words.append(COLOURS[img["colours"][i]])
    words.append(OBJECTS[img["classes"][i]])
    return f"{_article(words[0])} {' '.join(words)}"


def _relation(box_a: np.ndarray, box_b: np.ndarray) -> str:
    dx = (box_a[0] + box_a[2] - box_b[0] - box_b[2]) / 2
    dy = (box_a[1] + box_a[3] - box_b[1] - box_b[3]) / 2
    if max(abs(dx), abs(dy)) < 0.15:
        return "next to"
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _caption(rng: np.random.Generator, img: dict) -> str:
    n = len(img["classes"])
    k = int(rng.choice([1, 2, 3], p=[0.25, 0.5, 0.25]))
    objs = rng.choice(n, size=min(k, n), replace=False)
    phrases = [_phrase(rng, img, i) for i in objs]
    if len(objs) == 1:
        body = phrases[0]
    elif len(objs) == 2 and rng.random() < 0.7:
        rel = _relation(img["boxes"][objs[0]], img["boxes"][objs[1]])
        body = f"{phrases[0]} {rel} {phrases[1]}"
    else:
        body = " , ".join(phrases[:-1]) + f" and {phrases[-1]}"
    prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
    text = prefix + body
    return text + " ." if rng.random() < 0.5 else text


# ---------------------------------------------------------------------------- features


def _bases(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 1])
    return {"class": rng.standard_normal((len(OBJECTS), FEAT_DIM), dtype=np.float32),
            "colour": rng.standard_normal((len(COLOURS), FEAT_DIM), dtype=np.float32),
            "size": rng.standard_normal((len(SIZES), FEAT_DIM), dtype=np.float32),
            "box": rng.standard_normal((7, FEAT_DIM), dtype=np.float32)}


def _features(rows: dict[str, np.ndarray], bases: dict[str, np.ndarray],
              rng: np.random.Generator) -> np.ndarray:
    """(rows, 2048) features: weighted class + colour + size vectors, box term and noise."""
    w = np.array([_WEIGHTS[k] for k in rows["kinds"]], dtype=np.float32)
    bb = rows["boxes"].astype(np.float32)
    box7 = np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1)
    feat = (w[:, :1] * bases["class"][rows["classes"]]
            + w[:, 1:2] * bases["colour"][rows["colours"]]
            + w[:, 2:3] * bases["size"][rows["sizes"]]
            + 0.5 * box7 @ bases["box"]
            + 0.3 * rng.standard_normal((len(bb), FEAT_DIM), dtype=np.float32))
    return feat.astype(np.float16)


def _soft_labels(rows: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """(rows, 1601) distributions peaked on the row's class (weaker for parts and clutter)."""
    n = len(rows["kinds"])
    peak = np.select([rows["kinds"] == _OBJECT, rows["kinds"] == _PART],
                     [0.6 + 0.3 * rng.random(n), 0.35 + 0.2 * rng.random(n)],
                     0.1 + 0.2 * rng.random(n))
    soft = np.zeros((n, NUM_LABELS), dtype=np.float32)
    cols = np.array([vg_class_id(c) for c in rows["classes"]])
    confusers = 1 + rng.integers(NUM_LABELS - 1, size=(n, 3))
    rest = (1.0 - peak)[:, None] * rng.dirichlet(np.ones(4), size=n)
    np.add.at(soft, (np.arange(n)[:, None], confusers), rest[:, :3])
    soft[np.arange(n), 0] += rest[:, 3]
    soft[np.arange(n), cols] += peak
    return soft.astype(np.float16)


# ---------------------------------------------------------------------------- generation


def _split_images(rng: np.random.Generator, count: int) -> list[dict]:
    images: list[dict] = []
    while len(images) < count:
        images.append(_make_image(rng, None))
        while len(images) < count and rng.random() < _FAMILY_PROB:
            images.append(_make_image(rng, images[-1]))
    return images


def _write_npz_and_json(stage: str, cfg: SyntheticConfig, progress: bool) -> dict[str, Any]:
    """Writes OUT/npz/*.npz, OUT/captions.json and OUT/objects.json; returns counts."""
    struct_rng = np.random.default_rng([cfg.seed, 0])
    noise_rng = np.random.default_rng([cfg.seed, 2])
    bases = _bases(cfg.seed)
    npz_dir = os.path.join(stage, "npz")
    os.makedirs(npz_dir)
    karpathy, objects, counts = [], {}, {}
    imgid = sentid = 0
    total = sum(cfg.counts().values())
    with progress_bar(total=total, desc="synthetic images", unit="img", disable=not progress) as bar:
        for split, count in cfg.counts().items():
            for img in _split_images(struct_rng, count):
                stem = f"synth_{imgid:06d}"
                rows = _rows(struct_rng, img)
                np.savez(os.path.join(npz_dir, stem + ".npz"),
                         features=_features(rows, bases, noise_rng),
                         norm_bb=rows["boxes"].astype(np.float16),
                         conf=rows["conf"].astype(np.float16)[:, None],
                         soft_labels=_soft_labels(rows, noise_rng))
                sentences = []
                for _ in range(cfg.captions_per_image):
                    raw = _caption(struct_rng, img)
                    sentences.append({"raw": raw, "tokens": [w for w in raw.split() if w.isalpha()],
                                      "imgid": imgid, "sentid": sentid})
                    sentid += 1
                karpathy.append({"filename": stem + ".jpg", "imgid": imgid, "split": split,
                                 "sentids": [s["sentid"] for s in sentences],
                                 "sentences": sentences})
                objects[stem + ".npz"] = [
                    {"object": OBJECTS[c], "colour": COLOURS[col], "size": SIZES[s],
                     "box": [round(float(v), 4) for v in box[:4]]}
                    for c, col, s, box in zip(img["classes"], img["colours"], img["sizes"],
                                              img["boxes"])]
                imgid += 1
                bar.update()
            counts[split] = {"images": count, "captions": count * cfg.captions_per_image}
    with open(os.path.join(stage, "captions.json"), "w", encoding="utf-8") as f:
        json.dump({"dataset": "synthetic", "images": karpathy}, f)
    with open(os.path.join(stage, "objects.json"), "w", encoding="utf-8") as f:
        json.dump(objects, f)
    return counts


def load_manifest(out_dir: str) -> dict[str, Any]:
    """Reads OUT/manifest.json with its paths made absolute."""
    out_dir = os.path.abspath(out_dir)
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        raise MissingPathError(f"no synthetic dataset at {out_dir}: {MANIFEST} is missing")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["txt_db"] = {s: os.path.join(out_dir, p) for s, p in manifest["txt_db"].items()}
    for key in ("img_db", "tokenizer", "karpathy_json", "objects"):
        manifest[key] = os.path.join(out_dir, manifest[key])
    manifest["root"] = out_dir
    return manifest


def generate(out_dir: str, cfg: SyntheticConfig = SyntheticConfig(),
             progress: bool = True) -> dict[str, Any]:
    """Generates the dataset into ``out_dir`` (atomically) unless it already exists with
    the same arguments; returns the manifest with absolute paths.

    Raises:
        FileExistsError: ``out_dir`` exists and is not a synthetic dataset.
    """
    args = dataclasses.asdict(cfg)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("args") == args and old.get("version") == MANIFEST_VERSION:
            print(f"reusing synthetic dataset at {os.path.abspath(out_dir)} (same arguments)")
            if not os.path.isfile(os.path.join(out_dir, OBJECT_VOCAB)):
                # Datasets made before the file existed: it depends on the vocabulary alone.
                write_synthetic_object_vocab(out_dir)
            return load_manifest(out_dir)
        print(f"regenerating synthetic dataset at {os.path.abspath(out_dir)} "
              f"(arguments changed)")
    elif os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and holds no {MANIFEST}: not overwriting it")
    with atomic_dir(out_dir, overwrite=True) as stage:
        counts = _write_npz_and_json(stage, cfg, progress)
        tok_dir = os.path.join(stage, "tokenizer")
        write_tokenizer(tok_dir)
        write_synthetic_object_vocab(stage)
        convert_npz_dir(os.path.join(stage, "npz"), os.path.join(stage, "img_db"),
                        progress=progress)
        for split in SPLITS:
            # meta.json records the tokenizer path it was given: use the final location.
            convert_karpathy(os.path.join(stage, "captions.json"),
                             os.path.join(stage, "txt_db", split), tok_dir, [split],
                             progress=progress)
            _fix_meta_paths(os.path.join(stage, "txt_db", split), stage,
                            os.path.abspath(out_dir))
        if not cfg.keep_npz:
            shutil.rmtree(os.path.join(stage, "npz"))
        manifest = {"version": MANIFEST_VERSION, "args": args, "seed": cfg.seed,
                    "txt_db": {s: os.path.join("txt_db", s) for s in SPLITS},
                    "img_db": "img_db", "tokenizer": "tokenizer",
                    "karpathy_json": "captions.json", "objects": "objects.json",
                    "counts": counts, "num_objects": len(OBJECTS),
                    "img_db_args": {"conf_th": 0.2, "max_bb": 100, "min_bb": 10, "num_bb": 36,
                                    "compressed": False}}
        with open(os.path.join(stage, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    return load_manifest(out_dir)


def _fix_meta_paths(db_dir: str, stage: str, final: str) -> None:
    path = os.path.join(db_dir, "meta.json")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    for key, value in meta.items():
        if isinstance(value, str) and value.startswith(stage):
            meta[key] = final + value[len(stage):]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
