"""train_itm.py end to end on synthetic data: learning, resume, hard negatives, configs, guards."""
from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pytest

import train_itm
from model.checkpoint import read_checkpoint
from model.families import build_biencoder_from_checkpoint
from tests.helpers import ORIGINAL_CONFIGS_DIR, itm_config, write_config
from utils.config import load_config
from utils.engine.metrics_log import read_metrics
from utils.engine.run_dir import OutputDirError, list_states
from utils.engine.trainer import NonFiniteLossError
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
REFERENCE = ORIGINAL_CONFIGS_DIR / "lightningdot"
ORIGINAL_CONFIGS = sorted(REFERENCE.glob("*config*.json")) + [REFERENCE / "pretrain-alldata-base.json"]


class Crash(Exception):
    """Stands in for a killed process."""


def _crash_at(step: int):
    def hook(current: int, metrics: dict) -> None:
        if current == step:
            raise Crash(f"simulated kill after step {step}")

    return hook


def _chance_rsum(n_img: int, n_txt: int, caps_per_img: int) -> float:
    """Expected RSUM of random scores (percent)."""
    ir = sum(100.0 * min(k, n_img) / n_img for k in (1, 5, 10))
    tr = sum(100.0 * (1 - comb(n_txt - caps_per_img, k) / comb(n_txt, k)) for k in (1, 5, 10))
    return ir + tr


def test_finetuning_beats_chance_and_writes_results(small_data, tiny_models, tmp_path):
    cfg = itm_config(small_data, tiny_models, train_batch_size=16, num_train_steps=400, valid_steps=100,
                     warmup_steps=10, log_steps=10)
    out = tmp_path / "run"
    results = train_itm.main(["--config", write_config(tmp_path / "c.yaml", cfg), "--output_dir", str(out)])

    losses = [r["loss"] for r in read_metrics(out, "train")]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    chance = _chance_rsum(40, 200, 5)
    assert results["test"]["rsum"] > 2 * chance, (results["test"], chance)

    saved = json.loads((out / "test_results.json").read_text())
    assert saved["rsum"] == pytest.approx(results["test"]["rsum"])
    assert saved["step"] == results["best_step"]
    assert set(saved["text_to_image"]) == {"R@1", "R@5", "R@10"}
    # The best checkpoint alone rebuilds the model and records the run.
    best = out / "ckpt" / "biencoder.best.pt"
    model = build_biencoder_from_checkpoint(best)
    assert model.config.project_dim == 16
    assert read_checkpoint(best)["run_config"]["train"]["num_train_steps"] == 400
    assert (out / "config.yaml").is_file() and (out / "tensorboard").is_dir()
    assert {r["split"] for r in read_metrics(out)} == {"train", "val", "test"}


@pytest.mark.parametrize(
    "mining",
    [
        # every 4 steps with the current model, first mining before step 1
        {"steps_per_hard_neg": 4, "sample_init_hard_negatives": True, "hard_negatives_sampling": "top"},
        # between epochs (20 batches per epoch here), sampled among the top-ranked
        {"steps_per_hard_neg": 0, "hard_negatives_sampling": "top-random"},
    ],
    ids=["every-4-steps", "between-epochs"],
)
def test_kill_and_resume_gives_identical_losses(tiny_data, tiny_models, tmp_path, mining):
    retrieval = {"num_hard_negatives": 2, **mining}
    cfg = itm_config(tiny_data, tiny_models, num_train_steps=24, valid_steps=8, save_steps=5)
    cfg["retrieval"] = retrieval
    cfg["model"]["dropout"] = 0.1  # dropout on: the RNG streams must continue too
    config = write_config(tmp_path / "c.yaml", cfg)

    full = train_itm.main(["--config", config, "--output_dir", str(tmp_path / "full")])
    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        train_itm.main(["--config", config, "--output_dir", str(cut)], on_step=_crash_at(17))
    assert [p.name for p in list_states(cut)] == ["step_00000005.pt", "step_00000010.pt", "step_00000015.pt"]
    resumed = train_itm.main(["--config", config, "--output_dir", str(cut), "--resume"])

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(tmp_path / run, "train")]

    assert losses("cut") == losses("full")
    assert [r["step"] for r in read_metrics(cut, "train")] == list(range(1, 25))
    assert resumed["test"] == full["test"]


@pytest.mark.parametrize("path", ORIGINAL_CONFIGS, ids=lambda p: p.name)
def test_original_configs_parse_and_name_the_missing_path(path, tmp_path):
    cfg = load_config(path)
    assert cfg.train.precision == "fp16"
    with pytest.raises((ConfigError, FileNotFoundError), match="train_txt_dbs"):
        train_itm.main(["--config", str(path), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["flickr30k", "coco", "multi30k_de", "multi30k_fr", "multi30k_cs"])
def test_our_configs_name_the_missing_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "itm" / f"{name}.yaml")
    assert (cfg.train.train_batch_size, cfg.train.learning_rate, cfg.train.warmup_steps) == (64, 2e-5, 100)
    assert cfg.train.num_train_epochs == (20 if name == "coco" else 15)
    with pytest.raises(FileNotFoundError, match=r"train_txt_dbs\[0\]"):
        train_itm.main(["--config", f"configs/itm/{name}.yaml", "--output_dir", str(tmp_path / "o")])


def test_output_dir_of_another_run_is_refused(tiny_data, tiny_models, tmp_path):
    config = write_config(tmp_path / "c.yaml", itm_config(tiny_data, tiny_models, num_train_steps=2, valid_steps=2))
    out = str(tmp_path / "run")
    train_itm.main(["--config", config, "--output_dir", out])
    with pytest.raises(OutputDirError, match="already holds a run"):
        train_itm.main(["--config", config, "--output_dir", out])
    train_itm.main(["--config", config, "--output_dir", out, "--overwrite"])
    # Resuming a finished run trains no further and evaluates again.
    again = train_itm.main(["--config", config, "--output_dir", out, "--resume"])
    assert again["step"] == 2


def test_nan_loss_stops_the_run_with_its_ids(tiny_data, tiny_models, tmp_path):
    # An absurd learning rate overflows the weights after the first update.
    cfg = itm_config(tiny_data, tiny_models, num_train_steps=6, learning_rate=1e30, warmup_steps=0,
                     grad_norm=0.0, save_steps=1, valid_steps=100)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train_itm.main(["--config", write_config(tmp_path / "c.yaml", cfg), "--output_dir", str(out)])
    step = err.value.step
    message = str(err.value)
    assert f"step {step}" in message and "task 'itm'" in message and "train epoch 0 batch" in message
    assert "txt_ids" in message and "img_names" in message
    # States exist only for the steps before the failure.
    assert [p.name for p in list_states(out)] == [f"step_{s:08d}.pt" for s in range(max(1, step - 3), step)]
