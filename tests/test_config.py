"""Config system: inheritance, overrides, typing errors, original JSON configs."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from tests.helpers import ORIGINAL_CONFIGS_DIR
from utils.config import (
    IGNORED_ORIGINAL_KEYS,
    RunConfig,
    config_from_dict,
    config_to_dict,
    flat_key_table,
    load_config,
    require_path,
    save_config,
)
from utils.errors import ConfigError
from utils.original_programs import LIGHTNINGDOT_PRETRAIN

REPO = Path(__file__).resolve().parents[1]
REFERENCE = ORIGINAL_CONFIGS_DIR
ORIGINAL_RUN_CONFIGS = sorted(
    p for p in REFERENCE.glob("*/*.json") if "config" in p.name or "train" in p.name or "pretrain" in p.name
)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data) if path.suffix != ".json" else json.dumps(data))
    return path


def test_flat_names_are_unique_across_sections():
    table = flat_key_table()
    assert table["learning_rate"] == "train"
    assert table["project_dim"] == "model"
    assert table["conf_th"] == "data"
    assert table["num_hard_negatives"] == "retrieval"


def test_base_inheritance_and_deep_merge(tmp_path):
    _write(tmp_path / "base.yaml", {"train": {"learning_rate": 1e-4, "seed": 7}, "model": {"project_dim": 64}})
    _write(tmp_path / "child.yaml", {"base": "base.yaml", "train": {"seed": 9}})
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.seed == 9
    assert cfg.model.project_dim == 64


def test_base_cycle_is_reported(tmp_path):
    _write(tmp_path / "a.yaml", {"base": "b.yaml"})
    _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_dotted_and_flat_overrides_with_yaml_float_quirk(tmp_path):
    path = _write(tmp_path / "c.yaml", {"train": {"learning_rate": "5e-5"}})
    cfg = load_config(path, ["train.warmup_steps=7", "num_train_epochs=3", "betas=[0.8,0.9]", "val_txt_db=null"])
    assert cfg.train.learning_rate == pytest.approx(5e-5)
    assert cfg.train.warmup_steps == 7
    assert cfg.train.num_train_epochs == 3
    assert cfg.train.betas == [0.8, 0.9]
    assert cfg.data.val_txt_db is None


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = _write(tmp_path / "bad.yaml", {"train": {"learning_rat": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "learning_rat" in msg and str(path) in msg and "learning_rate" in msg


def test_unknown_override_key_suggests_closest(tmp_path):
    path = _write(tmp_path / "ok.yaml", {})
    with pytest.raises(ConfigError, match="num_train_epochs"):
        load_config(path, ["num_train_epoch=3"])
    with pytest.raises(ConfigError, match="train"):
        load_config(path, ["trian.seed=3"])


def test_wrong_type_names_key_expected_and_value(tmp_path):
    path = _write(tmp_path / "bad.yaml", {"train": {"warmup_steps": "many"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "warmup_steps" in msg and "int" in msg and "many" in msg
    path = _write(tmp_path / "bad2.yaml", {"model": {"cls_concat": "concat"}})
    with pytest.raises(ConfigError, match="add"):
        load_config(path)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = RunConfig()
    cfg.train.learning_rate = 3e-5
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_to_dict(config_from_dict(config_to_dict(cfg))) == config_to_dict(cfg)


@pytest.mark.parametrize("path", ORIGINAL_RUN_CONFIGS, ids=lambda p: p.name)
def test_original_run_configs_load_unchanged(path, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path)
    raw = json.loads(path.read_text())
    assert cfg.output_dir == raw["output_dir"]
    assert cfg.train.precision == ("fp16" if raw.get("fp16") else "fp32")
    assert cfg.data.max_txt_len == raw["max_txt_len"]
    for key in ("train_txt_dbs", "train_img_dbs"):
        if key in raw:
            assert getattr(cfg.data, key) == raw[key]
    ignored = set(raw) & set(IGNORED_ORIGINAL_KEYS)
    if ignored:
        assert any("no effect" in r.message for r in caplog.records)
        assert all(k in caplog.text for k in ignored)


def test_original_pretrain_config_maps_datasets():
    cfg = load_config(REFERENCE / "lightningdot" / "pretrain-alldata-base.json",
                      program=LIGHTNINGDOT_PRETRAIN)
    names = [d.name for d in cfg.data.train_datasets]
    assert names == ["coco_cap", "vg_cap", "cc", "sbu"]
    assert cfg.data.train_datasets[1].mix_ratio == [16, 12, 6, 6]
    assert cfg.data.train_datasets[0].tasks == ["itm", "mlm", "mrfr", "mrckl"]
    assert cfg.train.betas == [0.9, 0.98]
    assert cfg.train.grad_norm == 5.0
    assert cfg.train.batch_size_unit == "tokens"
    assert cfg.model.img_checkpoint == "./data/mode/uniter-base.pt"


def test_original_defaults_do_not_touch_our_yaml(tmp_path):
    path = _write(tmp_path / "ours.yaml", {"train": {"seed": 1}})
    cfg = load_config(path, program=LIGHTNINGDOT_PRETRAIN)
    assert cfg.train.batch_size_unit == "examples"
    assert config_to_dict(cfg) == config_to_dict(load_config(path))


def test_original_unknown_key_is_refused(tmp_path):
    path = _write(tmp_path / "orig.json", {"learning_rate": 1e-5, "train_batch_sise": 3})
    with pytest.raises(ConfigError, match="train_batch_size"):
        load_config(path)


def test_original_aliases(tmp_path):
    path = _write(tmp_path / "orig.json", {"valid_batch_size": 8, "max_grad_norm": 1.5, "hnsw_index": True, "fp16": False})
    cfg = load_config(path)
    assert cfg.train.val_batch_size == 8
    assert cfg.train.grad_norm == 1.5
    assert cfg.retrieval.index.to_dict() == {"type": "hnsw"}
    assert cfg.train.precision == "fp32"


def test_require_path_names_key_and_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        require_path("./data/db/missing.db", "train_txt_dbs", "dir")
    assert "train_txt_dbs" in str(err.value) and "missing.db" in str(err.value)
    assert require_path(str(tmp_path), "output_dir", "dir") == tmp_path


def _config_files() -> list[Path]:
    return sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "configs").rglob("*.yml"))


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_config_in_repo_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def _model_json_files() -> list[Path]:
    return sorted((REPO / "configs").rglob("*.json"))


@pytest.mark.parametrize("path", _model_json_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_model_json_in_repo_is_a_bert_config(path):
    from transformers import BertConfig

    cfg = BertConfig.from_dict(json.loads(path.read_text()))
    assert cfg.hidden_size % cfg.num_attention_heads == 0
