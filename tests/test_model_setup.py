"""The model builder of the run scripts (`utils/pipeline/model_setup.py`).

Towers built from tiny configs have the configured shapes, projection and dropout; a missing
path names its config key; every checkpoint key actually sets the weights it names (compared
tensor by tensor with the state dict that was saved), later ones overriding earlier ones.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from model.biencoder import BiEncoder, BiEncoderConfig
from model.pretrain_model import PretrainModel
from tests.helpers import randomize_, save_checkpoint, tiny_bert_config
from utils.config import ModelConfig
from utils.errors import MissingPathError
from utils.pipeline.model_setup import (
    build_biencoder_for_run,
    build_pretrain_model_for_run,
    check_model_paths,
)
from utils.pipeline.pretrain_tasks import pretrain_model

VOCAB = 211
TXT = tiny_bert_config(VOCAB, num_hidden_layers=2, intermediate_size=64)
IMG = tiny_bert_config(VOCAB, num_hidden_layers=1, intermediate_size=40)
PROJECT_DIM = 12
# The model-section key of the whole pre-training checkpoint.
PRETRAIN_KEY = "pretrain_checkpoint"


@pytest.fixture()
def configs(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name, config in (("txt", TXT), ("img", IMG)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        paths[name] = str(path)
    return paths


def model_config(configs: dict[str, str], **kwargs) -> ModelConfig:
    return ModelConfig(txt_model_config=configs["txt"], img_model_config=configs["img"], project_dim=PROJECT_DIM,
                       **kwargs)


def other_biencoder(seed: int) -> BiEncoder:
    """A bi-encoder of the same shapes with weights no fresh build has."""
    model = BiEncoder(BiEncoderConfig(dict(TXT), dict(IMG), project_dim=PROJECT_DIM))
    randomize_(model, seed=seed)
    return model


def assert_same_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    want = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def assert_differs(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert any(not torch.equal(got[k], v) for k, v in state.items() if not k.endswith("position_ids"))


# ---------------------------------------------------------------- shapes, projection, dropout


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_towers_have_the_configured_sizes(configs, dropout) -> None:
    model = build_biencoder_for_run(model_config(configs, dropout=dropout))
    assert isinstance(model, BiEncoder)
    for tower, config in ((model.txt_model, TXT), (model.img_model, IMG)):
        bert = tower.bert
        assert bert.config.hidden_size == config["hidden_size"]
        assert bert.config.num_attention_heads == config["num_attention_heads"]
        assert len(bert.encoder.layer) == config["num_hidden_layers"]
        assert bert.encoder.layer[0].intermediate.dense.out_features == config["intermediate_size"]
        assert tower.out_dim == PROJECT_DIM
        # The run's dropout replaces the configs' 0.1 everywhere.
        assert bert.config.hidden_dropout_prob == bert.config.attention_probs_dropout_prob == dropout
    assert model.txt_model.bert.embeddings.word_embeddings.num_embeddings == VOCAB
    probs = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert probs == {dropout}
    assert model.config.project_dim == PROJECT_DIM and model.config.dropout == dropout
    ids = torch.tensor([[101, 150, 102]])
    assert model.encode_text(ids, torch.ones_like(ids)).shape == (1, PROJECT_DIM)


def test_no_projection_and_frozen_towers(configs) -> None:
    model = build_biencoder_for_run(model_config(configs, fix_img_encoder=True))
    assert model.config.fix_img_encoder and not model.config.fix_txt_encoder
    model = build_biencoder_for_run(ModelConfig(txt_model_config=configs["txt"], img_model_config=configs["img"],
                                                project_dim=0))
    assert model.txt_model.encode_proj is None and model.txt_model.out_dim == TXT["hidden_size"]


def test_pretrain_model_wraps_the_configured_biencoder(configs) -> None:
    model = build_pretrain_model_for_run(model_config(configs, dropout=0.0))
    assert isinstance(model, PretrainModel)
    assert len(model.bert.txt_model.bert.encoder.layer) == TXT["num_hidden_layers"]
    assert len(model.bert.img_model.bert.encoder.layer) == IMG["num_hidden_layers"]
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.0}


# ---------------------------------------------------------------- missing paths name their key


@pytest.mark.parametrize("key", ["txt_checkpoint", "img_checkpoint", "biencoder_checkpoint"])
def test_a_missing_checkpoint_names_its_key(configs, tmp_path, key) -> None:
    cfg = model_config(configs, **{key: str(tmp_path / "absent.pt")})
    with pytest.raises(MissingPathError, match=f"'{key}'.*absent.pt"):
        check_model_paths(cfg)
    with pytest.raises(MissingPathError, match=f"'{key}'"):
        build_biencoder_for_run(cfg)
    with pytest.raises(MissingPathError, match=f"'{key}'"):
        build_pretrain_model_for_run(cfg)


def test_a_missing_pretrain_checkpoint_names_its_key(configs, tmp_path) -> None:
    cfg = model_config(configs, **{PRETRAIN_KEY: str(tmp_path / "model_step_9.pt")})
    check_model_paths(cfg)  # not a key of the fine-tuning scripts
    with pytest.raises(MissingPathError, match=f"'{PRETRAIN_KEY}'.*model_step_9.pt"):
        check_model_paths(cfg, pretrain=True)
    with pytest.raises(MissingPathError, match=f"'{PRETRAIN_KEY}'"):
        build_pretrain_model_for_run(cfg)


@pytest.mark.parametrize("key", ["txt_model_config", "img_model_config"])
def test_an_unset_tower_config_names_its_key(configs, key) -> None:
    cfg = dataclasses.replace(model_config(configs), **{key: ""})
    with pytest.raises(MissingPathError, match=f"'{key}'"):
        build_biencoder_for_run(cfg)


# ---------------------------------------------------------------- checkpoints set the weights


def test_txt_checkpoint_sets_the_text_tower(configs, tmp_path) -> None:
    source = other_biencoder(seed=1)
    bert_state = source.txt_model.bert.state_dict()
    torch.save(bert_state, tmp_path / "bert.pt")
    model = build_biencoder_for_run(model_config(configs, txt_checkpoint=str(tmp_path / "bert.pt")))
    assert_same_weights(model.txt_model.bert, bert_state)
    # Only the BERT body: the image tower and the projection keep their initialisation.
    assert_differs(model.img_model, source.img_model.state_dict())
    assert_differs(model.txt_model.encode_proj, source.txt_model.encode_proj.state_dict())


def test_img_checkpoint_sets_the_image_tower_body(configs, tmp_path) -> None:
    source = other_biencoder(seed=2)
    body = source.img_model.bert.state_dict()
    # A UNITER file: `uniter.` keys, plus heads the image tower ignores.
    torch.save({**{f"uniter.{k}": v for k, v in body.items()}, "itm_output.weight": torch.zeros(2, 32),
                "itm_output.bias": torch.zeros(2)}, tmp_path / "uniter.pt")
    model = build_biencoder_for_run(model_config(configs, img_checkpoint=str(tmp_path / "uniter.pt")))
    assert_same_weights(model.img_model.bert, body)
    assert_differs(model.img_model.encode_proj, source.img_model.encode_proj.state_dict())
    assert_differs(model.txt_model, source.txt_model.state_dict())


@pytest.mark.parametrize("layout", ["ours", "original"])
def test_biencoder_checkpoint_sets_every_weight(configs, tmp_path, layout) -> None:
    source = other_biencoder(seed=3)
    state = source.state_dict()
    path = tmp_path / "biencoder.pt"
    if layout == "ours":
        save_checkpoint(source, path, run_config={})
    else:
        torch.save({"model_dict": state, "optimizer_dict": {}, "epoch": 1}, path)
    model = build_biencoder_for_run(model_config(configs, biencoder_checkpoint=str(path)))
    assert_same_weights(model, state)


def test_biencoder_checkpoint_is_applied_after_the_tower_checkpoints(configs, tmp_path) -> None:
    towers = other_biencoder(seed=4)
    torch.save(towers.txt_model.bert.state_dict(), tmp_path / "bert.pt")
    torch.save({f"uniter.{k}": v for k, v in towers.img_model.bert.state_dict().items()}, tmp_path / "uniter.pt")
    whole = other_biencoder(seed=5)
    save_checkpoint(whole, tmp_path / "biencoder.pt", run_config={})
    model = build_biencoder_for_run(model_config(
        configs, txt_checkpoint=str(tmp_path / "bert.pt"), img_checkpoint=str(tmp_path / "uniter.pt"),
        biencoder_checkpoint=str(tmp_path / "biencoder.pt"),
    ))
    assert_same_weights(model, whole.state_dict())


def test_pretrain_checkpoint_sets_the_heads_too(configs, tmp_path) -> None:
    source = pretrain_model(other_biencoder(seed=6))
    randomize_(source, seed=7)
    state = source.state_dict()
    # The original `model_step_N.pt` layout: the pre-training model's keys plus an unused ITM head.
    torch.save({**state, "itm_output.weight": torch.zeros(2, 32), "itm_output.bias": torch.zeros(2)},
               tmp_path / "model_step_9.pt")
    cfg = model_config(configs, **{PRETRAIN_KEY: str(tmp_path / "model_step_9.pt")})
    model = build_pretrain_model_for_run(cfg)
    assert_same_weights(model, state)
    # Ours loads the same.
    save_checkpoint(source, tmp_path / "ours.pt", run_config={})
    model = build_pretrain_model_for_run(model_config(configs, **{PRETRAIN_KEY: str(tmp_path / "ours.pt")}))
    assert_same_weights(model, state)
