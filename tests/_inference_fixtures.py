"""Shared set-up of the inference / re-ranking tests: tiny synthetic data, models, checkpoints.

Import the fixtures into a test module (`from tests._inference_fixtures import workspace`).
The synthetic dataset lives at a fixed place under the session's base temp directory, so the
modules that import the fixture share one copy (the generator reuses an existing dataset
with the same arguments).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

# Hidden 32, 2 layers, 2 heads: big enough to exercise every path, fast on 2 cores.
TINY_BERT = {
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
}
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
    from model.checkpoint import save_checkpoint
    from model.cross_encoder import build_cross_encoder

    root.mkdir(parents=True, exist_ok=True)
    data = generate(str(root / "synthetic"), TINY, progress=False)
    meta = json.loads((Path(data["txt_db"]["test"]) / "meta.json").read_text())
    vocab = int(meta["v_range"][1])

    torch.manual_seed(0)
    txt_config = _write_json(root / "tiny_bert.json", {**TINY_BERT, "vocab_size": vocab})
    img_config = _write_json(root / "tiny_img.json", {**TINY_BERT, "vocab_size": vocab})
    uniter_config = _write_json(root / "tiny_uniter.json", {**TINY_BERT, "vocab_size": vocab})
    wide_uniter_config = _write_json(
        root / "wide_uniter.json", {**TINY_BERT, "vocab_size": vocab, "hidden_size": 48}
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


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """Tiny synthetic data, tiny configs and checkpoints in every supported format."""
    return build_workspace(tmp_path_factory.getbasetemp() / "inference_workspace")


@pytest.fixture(scope="session")
def retrieval_dir(workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inference run of our checkpoint on the test split (shared by the re-ranking tests)."""
    import inference

    out = tmp_path_factory.getbasetemp() / "inference_workspace" / "retrieval"
    if not (out / "info.json").is_file():
        inference.main(["--config", str(workspace.config), "--checkpoint", str(workspace.our_ckpt),
                        "--output_dir", str(out)])
    return out
