"""Helpers shared by the test modules (the fixtures live in tests/conftest.py).

* `tiny_bert_config`: the one tiny BERT / UNITER tower config of the tests (and `TINY_BERT`,
  its default, for the model-reference tests).
* Reference computations for the model tests, written with plain torch ops.
* Run-config builders for the training-script tests.
* Raw database writers for the data-layer tests.
* The inference / re-ranking workspace (data, configs, checkpoints in every format).
* Brute-force references of recall and top-k search.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

REPO = Path(__file__).resolve().parents[1]

# Fixtures of the original LightningDOT / UNITER config layouts (see tests/fixtures/README.md).
ORIGINAL_CONFIGS_DIR = Path(__file__).resolve().parent / "fixtures" / "original_configs"


# ---------------------------------------------------------------- the tiny model config


def tiny_bert_config(
    vocab_size: int = 211,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 64,
    dropout: float = 0.1,
    initializer_range: float = 0.02,
) -> dict[str, Any]:
    """The tests' tiny BERT config (text tower, image tower, cross-encoder alike).

    Hidden 32, 2 layers, 2 heads: big enough to exercise every path, fast on 2 cores. A test
    varies only what it needs: the vocabulary (the synthetic one for data runs), `dropout`
    (both rates; the training runs turn it off so a run is a function of weights and data),
    `initializer_range` (the training runs use 0.1: such a small model then leaves the
    uniform-score plateau of the contrastive loss within ~100 steps instead of several
    hundred), and the sizes where a test needs another shape.
    """
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
        "max_position_embeddings": max_position_embeddings,
        "type_vocab_size": 2,
        "initializer_range": initializer_range,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "vocab_size": vocab_size,
    }


# The model-reference tests' tower: vocabulary 211, dropout 0.1, initializer range 0.02.
TINY_BERT = tiny_bert_config()
CLS, SEP = 101, 102


# ---------------------------------------------------------------- reference computations
# Nothing here imports `transformers` or `model/`: the formulas follow SPEC 3 / 4 and the
# original BERT / UNITER code (post-LN, erf GELU, LayerNorm eps 1e-12, additive -10000 mask),
# reading parameters from a state dict by their original key names.


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Give every parameter a random value (LayerNorm-like 1-d weights around 1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=gen) * scale
        base = 1.0 if name.endswith("weight") and param.dim() == 1 else 0.0
        param.copy_(noise + base)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].t() + sd[f"{name}.bias"]


def ln(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return layer_norm(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def bert_layer(x: torch.Tensor, mask: torch.Tensor, sd: dict, p: str, heads: int) -> torch.Tensor:
    """One post-LN BERT layer; `mask` (B, L) is 1 for real positions."""
    b, length, hidden = x.shape
    d = hidden // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, length, heads, d).transpose(1, 2)

    q = split(linear(x, sd, f"{p}attention.self.query"))
    k = split(linear(x, sd, f"{p}attention.self.key"))
    v = split(linear(x, sd, f"{p}attention.self.value"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores + ((1.0 - mask.float()) * -10000.0)[:, None, None, :]
    probs = torch.exp(scores - scores.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)
    ctx = (probs @ v).transpose(1, 2).reshape(b, length, hidden)
    attn = ln(linear(ctx, sd, f"{p}attention.output.dense") + x, sd, f"{p}attention.output.LayerNorm")
    inter = gelu(linear(attn, sd, f"{p}intermediate.dense"))
    return ln(linear(inter, sd, f"{p}output.dense") + attn, sd, f"{p}output.LayerNorm")


def bert_encoder(x: torch.Tensor, mask: torch.Tensor, sd: dict, p: str, layers: int, heads: int) -> torch.Tensor:
    for i in range(layers):
        x = bert_layer(x, mask, sd, f"{p}encoder.layer.{i}.", heads)
    return x


def text_embeddings(input_ids: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    """LN(word + position(0..L-1) + token type 0)."""
    length = input_ids.shape[1]
    emb = (
        sd[f"{p}embeddings.word_embeddings.weight"][input_ids]
        + sd[f"{p}embeddings.position_embeddings.weight"][torch.arange(length)][None]
        + sd[f"{p}embeddings.token_type_embeddings.weight"][0]
    )
    return ln(emb, sd, f"{p}embeddings.LayerNorm")


def region_embeddings(
    feat: torch.Tensor, pos: torch.Tensor, sd: dict, p: str, masked: torch.Tensor | None = None
) -> torch.Tensor:
    """SPEC 3: LN(LN_img(img_linear(feat)) + LN_pos(pos_linear(box7)) + type_emb[1])."""
    e = f"{p}img_embeddings."
    if masked is not None:
        feat = feat + masked[..., None].float() * sd[f"{e}mask_embedding.weight"][1]
    img = ln(linear(feat, sd, f"{e}img_linear"), sd, f"{e}img_layer_norm")
    box = ln(linear(pos, sd, f"{e}pos_linear"), sd, f"{e}pos_layer_norm")
    return ln(img + box + sd[f"{p}embeddings.token_type_embeddings.weight"][1], sd, f"{e}LayerNorm")


def encode_proj(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    h = gelu(linear(x, sd, f"{p}encode_proj.0"))
    return linear(ln(h, sd, f"{p}encode_proj.2"), sd, f"{p}encode_proj.3")


def text_tower(input_ids: torch.Tensor, mask: torch.Tensor, sd: dict, cfg: dict, proj: bool) -> torch.Tensor:
    """Reference text embedding from `txt_model.*` keys."""
    h = bert_encoder(
        text_embeddings(input_ids, sd, "txt_model.bert."), mask, sd, "txt_model.bert.",
        cfg["num_hidden_layers"], cfg["num_attention_heads"],
    )[:, 0]
    return encode_proj(h, sd, "txt_model.") if proj else h


def image_sequence(
    feat: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, sd: dict, p: str, cfg: dict,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference image-tower last layer over [t_cls, boxes]."""
    b = feat.shape[0]
    t_cls = text_embeddings(torch.full((b, 1), CLS), sd, p)
    x = torch.cat([t_cls, region_embeddings(feat, pos, sd, p, masked)], dim=1)
    full_mask = torch.cat([torch.ones(b, 1, dtype=mask.dtype), mask], dim=1)
    return bert_encoder(x, full_mask, sd, p, cfg["num_hidden_layers"], cfg["num_attention_heads"])


def image_tower(
    feat: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, sd: dict, cfg: dict, proj: bool,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference image embedding from `img_model.*` keys."""
    h = image_sequence(feat, pos, mask, sd, "img_model.bert.", cfg, masked)[:, 0]
    return encode_proj(h, sd, "img_model.") if proj else h


def uniter_score(
    input_ids: torch.Tensor, txt_mask: torch.Tensor, feat: torch.Tensor, pos: torch.Tensor,
    img_mask: torch.Tensor, sd: dict, cfg: dict,
) -> torch.Tensor:
    """Reference cross-encoder score from `uniter.*` / `itm_output.*` keys."""
    p = "uniter."
    x = torch.cat([text_embeddings(input_ids, sd, p), region_embeddings(feat, pos, sd, p)], dim=1)
    mask = torch.cat([txt_mask, img_mask], dim=1)
    h = bert_encoder(x, mask, sd, p, cfg["num_hidden_layers"], cfg["num_attention_heads"])
    pooled = torch.tanh(linear(h[:, 0], sd, f"{p}pooler.dense"))
    return pooled @ sd["itm_output.weight"][1] + sd["itm_output.bias"][1]


def random_text(batch: int, lengths: list[int], vocab: int, seed: int, pad_to: int | None = None):
    """`[CLS] ids [SEP]` rows right-padded with 0; returns (input_ids, attention_mask)."""
    gen = torch.Generator().manual_seed(seed)
    width = pad_to or max(lengths) + 2
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        body = torch.randint(103, vocab, (n,), generator=gen)
        ids[i, : n + 2] = torch.cat([torch.tensor([CLS]), body, torch.tensor([SEP])])
        mask[i, : n + 2] = 1
    return ids, mask


def random_boxes(batch: int, counts: list[int], seed: int, pad_to: int | None = None, img_dim: int = 2048):
    """Random region inputs; padded rows hold garbage (they must not matter)."""
    gen = torch.Generator().manual_seed(seed)
    width = pad_to or max(counts)
    feat = torch.randn(batch, width, img_dim, generator=gen)
    pos = torch.rand(batch, width, 7, generator=gen)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, n in enumerate(counts):
        mask[i, :n] = 1
    return feat, pos, mask


# ---------------------------------------------------------------- run configs of the training-script tests


def itm_config(data: dict[str, Any], models: dict[str, str], **train: Any) -> dict[str, Any]:
    """A fine-tuning run config (our YAML layout) over the tiny data and models."""
    return {
        # Dropout off unless a test turns it on: runs are then functions of weights and data.
        "model": {"txt_model_config": models["txt"], "img_model_config": models["img"], "project_dim": 16,
                  "dropout": 0.0},
        "data": {
            "train_txt_dbs": [data["txt_db"]["train"]],
            "train_img_dbs": [data["img_db"]],
            "val_txt_db": data["txt_db"]["val"],
            "val_img_db": data["img_db"],
            "test_txt_db": data["txt_db"]["test"],
            "test_img_db": data["img_db"],
            "n_workers": 0,
        },
        "train": tiny_train_section(**train),
    }


def tiny_train_section(**train: Any) -> dict[str, Any]:
    """The train section of the tiny runs: 6 steps of 8, validated every 3, on the CPU."""
    return {
        "train_batch_size": 8,
        "val_batch_size": 64,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "num_train_steps": 6,
        "valid_steps": 3,
        "log_steps": 1,
        "seed": 7,
        "device": "cpu",
        **train,
    }


def pretrain_config(
    data: dict[str, Any], models: dict[str, str], tasks: list[str], ratios: list[float], **train: Any
) -> dict[str, Any]:
    """A pre-training run config over the tiny data (train split to train, val split to validate)."""
    return {
        # Dropout off unless a test turns it on: runs are then functions of weights and data.
        "model": {"txt_model_config": models["txt"], "img_model_config": models["img"], "project_dim": 16,
                  "dropout": 0.0},
        "data": {
            "train_datasets": [
                {"name": "synth", "db": [data["txt_db"]["train"]], "img": [data["img_db"]],
                 "tasks": tasks, "mix_ratio": ratios},
            ],
            "val_datasets": [
                {"name": "synth", "db": [data["txt_db"]["val"]], "img": [data["img_db"]], "tasks": tasks},
            ],
            "n_workers": 0,
        },
        "train": tiny_train_section(**train),
    }


def write_config(path: Path, config: dict[str, Any]) -> str:
    """Write a config as YAML; returns the path as a string."""
    path.write_text(yaml.safe_dump(config))
    return str(path)


# ---------------------------------------------------------------- raw databases of the data-layer tests
# Written with plain lmdb / msgpack / msgpack-numpy / lz4 / numpy, as the original
# preprocessing did, so the readers are tested against the format and not our writers.

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


# ---------------------------------------------------------------- the inference / re-ranking workspace

PROJECT_DIM = 16


@dataclass(frozen=True)
class Workspace:
    """Paths of everything the inference / re-ranking tests share."""

    root: Path
    data: dict  # the synthetic manifest (absolute paths)
    txt_config: Path  # tiny BERT config (text tower)
    img_config: Path  # tiny UNITER config (image tower)
    uniter_config: Path  # tiny UNITER config (cross-encoder)
    wide_uniter_config: Path  # hidden 48: mismatches every tiny checkpoint
    config: Path  # our YAML config for the test split
    original_config: Path  # an original-style flat JSON eval config
    our_ckpt: Path  # our bi-encoder checkpoint
    original_ckpt: Path  # original biencoder.*.pt layout (model_dict)
    pretrain_ckpt: Path  # original model_step_N.pt layout (bert. prefix + heads)
    uniter_ckpt: Path  # original UNITER raw state dict (uniter.*, some gamma/beta)
    our_cross_ckpt: Path  # our cross-encoder checkpoint


def _write_json(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path


def _to_gamma_beta(state: dict) -> dict:
    """Old TF-converted names for the LayerNorms of the embeddings (as old UNITER files have)."""
    out = {}
    for key, value in state.items():
        if ".embeddings.LayerNorm." in key:
            key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        out[key] = value
    return out


def build_workspace(root: Path) -> Workspace:
    """Generate data, configs and checkpoints under `root` (idempotent for the data)."""
    from data.synthetic import TINY, generate
    from model.biencoder import build_biencoder
    from model.cross_encoder import build_cross_encoder

    root.mkdir(parents=True, exist_ok=True)
    data = generate(str(root / "synthetic"), TINY, progress=False)
    meta = json.loads((Path(data["txt_db"]["test"]) / "meta.json").read_text())
    vocab = int(meta["v_range"][1])

    torch.manual_seed(0)
    tower = tiny_bert_config(vocab, max_position_embeddings=128)
    txt_config = _write_json(root / "tiny_bert.json", tower)
    img_config = _write_json(root / "tiny_img.json", tower)
    uniter_config = _write_json(root / "tiny_uniter.json", tower)
    wide_uniter_config = _write_json(
        root / "wide_uniter.json", tiny_bert_config(vocab, hidden_size=48, max_position_embeddings=128)
    )
    split = {
        "test_txt_db": data["txt_db"]["test"],
        "test_img_db": data["img_db"],
        "val_txt_db": data["txt_db"]["val"],
        "val_img_db": data["img_db"],
    }
    config = root / "infer.yaml"
    config.write_text(yaml.safe_dump({
        "model": {
            "txt_model_config": str(txt_config),
            "img_model_config": str(img_config),
            "model_config": str(uniter_config),
            "tokenizer": data["tokenizer"],
            "project_dim": PROJECT_DIM,
        },
        "data": {
            **split,
            "train_txt_dbs": [data["txt_db"]["train"]],
            "train_img_dbs": [data["img_db"]],
            "n_workers": 0,
            "max_txt_len": 60,
        },
        "train": {"val_batch_size": 16, "device": "cpu", "train_batch_size": 4},
        "retrieval": {"top_k": 10},
        "rerank": {"top_m": 5, "rerank_batch_size": 32},
    }))
    original_config = _write_json(root / "original_eval.json", {
        "txt_model_config": str(txt_config),
        "img_model_config": str(img_config),
        "seed": 42,
        "output_dir": str(root / "unused"),
        "max_txt_len": 60,
        "conf_th": 0.2,
        "max_bb": 100,
        "min_bb": 10,
        "num_bb": 36,
        "project_dim": PROJECT_DIM,
        **split,
        "project_name": "itm-debug",
        "n_workers": 0,
        "fp16": True,
    })

    model = build_biencoder(str(txt_config), str(img_config), project_dim=PROJECT_DIM)
    our_ckpt = root / "biencoder_ours.pt"
    save_checkpoint(model, our_ckpt, run_config={})
    # A different model for the original formats, so results tell the checkpoints apart.
    torch.manual_seed(1)
    original = build_biencoder(str(txt_config), str(img_config), project_dim=PROJECT_DIM)
    state = {k: v for k, v in original.state_dict().items() if not k.endswith("position_ids")}
    original_ckpt = root / "biencoder.best.pt"
    torch.save(
        {"model_dict": state, "optimizer_dict": {}, "scheduler_dict": {}, "offset": 0, "epoch": 3,
         "encoder_params": {}},
        original_ckpt,
    )
    pretrain_ckpt = root / "model_step_100.pt"
    torch.save({**{f"bert.{k}": v for k, v in state.items()},
                "itm_output.weight": torch.zeros(2, 32), "itm_output.bias": torch.zeros(2)},
               pretrain_ckpt)

    torch.manual_seed(2)
    cross = build_cross_encoder(str(uniter_config))
    uniter_ckpt = root / "uniter_itm.pt"
    torch.save(_to_gamma_beta(cross.state_dict()), uniter_ckpt)
    our_cross_ckpt = root / "cross_ours.pt"
    save_checkpoint(cross, our_cross_ckpt, run_config={})
    return Workspace(
        root=root, data=data, txt_config=txt_config, img_config=img_config,
        uniter_config=uniter_config, wide_uniter_config=wide_uniter_config, config=config,
        original_config=original_config, our_ckpt=our_ckpt, original_ckpt=original_ckpt,
        pretrain_ckpt=pretrain_ckpt, uniter_ckpt=uniter_ckpt, our_cross_ckpt=our_cross_ckpt,
    )


# ---------------------------------------------------------------- brute-force references of recall and top-k

KS = (1, 5, 10)


def brute_force_recall(scores: list[list[float]], txt2img: list[int], n_img: int) -> dict:
    """SPEC 7 spelled out: count strictly higher scores, one query at a time."""
    n_txt = len(scores)
    ir_hits = {k: 0 for k in KS}
    for t in range(n_txt):
        mine = scores[t][txt2img[t]]
        above = 0
        for j in range(n_img):
            if scores[t][j] > mine:
                above += 1
        for k in KS:
            if above < k:
                ir_hits[k] += 1
    tr_hits = {k: 0 for k in KS}
    n_queries = 0
    for i in range(n_img):
        captions = [t for t in range(n_txt) if txt2img[t] == i]
        if not captions:
            continue
        n_queries += 1
        for k in KS:
            found = False
            for t in captions:
                above = 0
                for u in range(n_txt):
                    if scores[u][i] > scores[t][i]:
                        above += 1
                if above < k:
                    found = True
            if found:
                tr_hits[k] += 1
    ir = {f"R@{k}": 100.0 * ir_hits[k] / n_txt for k in KS}
    tr = {f"R@{k}": 100.0 * tr_hits[k] / n_queries for k in KS}
    rsum = sum(ir.values()) + sum(tr.values())
    return {"text_to_image": ir, "image_to_text": tr, "rsum": rsum, "ar": rsum / 6}


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == {"text_to_image", "image_to_text", "rsum", "ar"}
    for direction in ("text_to_image", "image_to_text"):
        assert list(a[direction]) == ["R@1", "R@5", "R@10"]
        for key in a[direction]:
            assert a[direction][key] == pytest.approx(b[direction][key], abs=1e-9), (direction, key)
    assert a["rsum"] == pytest.approx(b["rsum"])
    assert a["ar"] == pytest.approx(b["ar"])


def check_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, vals: torch.Tensor, idx: torch.Tensor, tol: float) -> None:
    """Assert that (vals, idx) is a valid top-k of queries @ keys.T up to `tol`."""
    ref = queries.to(keys.dtype).double() @ keys.double().t()
    k_eff = min(k, keys.shape[0])
    assert vals.shape == idx.shape == (queries.shape[0], k_eff)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.isfinite(vals).all()
    assert idx.min() >= 0 and idx.max() < keys.shape[0]
    for row in idx:
        assert len(set(row.tolist())) == k_eff, "repeated index in a top-k list"
    ref_top = ref.topk(k_eff, dim=1).values
    torch.testing.assert_close(vals.double(), ref_top, atol=tol, rtol=0)
    torch.testing.assert_close(ref.gather(1, idx), vals.double(), atol=tol, rtol=0)
    assert (vals[:, 1:] <= vals[:, :-1]).all(), "scores must be sorted best first"


def save_checkpoint(model: Any, path: Any, run_config: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> None:
    """Write our checkpoint of `model` to `path` (what the trainers write, without a run)."""
    import torch

    from model.checkpoint import make_checkpoint

    torch.save(make_checkpoint(model, run_config, extra), path)


def spawn_gloo(worker: Any, world: int, tmp_path: Path, timeout_s: float = 120.0) -> None:
    """Run `worker(rank, world, init_file, out_dir)` in `world` processes; fail the test (and
    kill them) when they are not done within `timeout_s`."""
    ctx = mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"gloo workers did not finish in {timeout_s:.0f} s")


def first_epoch_rank_batches(dataset: Any, cfg: Any, world: int, per_rank_batch: int) -> list[list[list[int]]]:
    """Each rank's epoch-0 batches (dataset indices), as train_itm.py's DDP sampler draws them."""
    from utils.distributed import DistEnv
    from utils.pipeline.samplers import make_batch_sampler

    per_rank = []
    for rank in range(world):
        env = DistEnv("ddp", rank, world, rank, torch.device("cpu"))
        sampler = make_batch_sampler(dataset.lens, per_rank_batch, "examples", env, seed=cfg.train.seed,
                                     shuffle=True, img_names=dataset.img_names)
        sampler.set_epoch(0)
        per_rank.append(list(sampler))
    return per_rank
