"""pretrain.py end to end on synthetic data: every task mix, exact resume, configs, task draws."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pretrain
from model.families import build_biencoder_from_checkpoint
from tests.helpers import ORIGINAL_CONFIGS_DIR, pretrain_config, write_config
from utils.config import load_config
from utils.distributed import init_distributed
from utils.engine.metrics_log import read_metrics
from utils.engine.run_dir import list_states
from utils.errors import ConfigError
from utils.pipeline.model_setup import build_pretrain_model_from_checkpoint
from utils.pipeline.pretrain_data import dataset_tasks, draw_stream
from utils.precision import resolve_precision

REPO = Path(__file__).resolve().parents[1]
REFERENCE = ORIGINAL_CONFIGS_DIR / "lightningdot"
ORIGINAL_CONFIGS = sorted(REFERENCE.glob("*config*.json")) + [REFERENCE / "pretrain-alldata-base.json"]
PAPER_RATIOS = {"coco_cap": [16, 8, 4, 4], "vg_cap": [16, 12, 6, 6], "cc": [16, 12, 6, 6], "sbu": [16, 8, 4, 4]}


class Crash(Exception):
    """Stands in for a killed process."""


MIXES = {
    "cmr_only": ["itm"],
    "cmr_vmlm": ["itm", "mlm"],
    "cmr_smrm": ["itm", "mrfr", "mrckl"],
    "all": ["itm", "mlm", "mrfr", "mrckl"],
}


@pytest.mark.parametrize("mix", MIXES, ids=list(MIXES))
def test_every_task_mix_lowers_its_losses(mix, tiny_data, tiny_models, tmp_path):
    tasks = MIXES[mix]
    cfg_dict = pretrain_config(tiny_data, tiny_models, tasks, [2.0] + [1.0] * (len(tasks) - 1),
                               num_train_steps=60, valid_steps=30)
    # "Validate" on the training captions: optimisation progress, not generalisation from
    # 32 images, is what this test measures.
    cfg_dict["data"]["val_datasets"][0]["db"] = [tiny_data["txt_db"]["train"]]
    config = write_config(tmp_path / "c.yaml", cfg_dict)
    # The validation losses of the initial model (fixed masks: a noise-free comparison).
    cfg = load_config(config)
    env = init_distributed("none", "cpu")
    before = pretrain.validate(pretrain.build_model(cfg), pretrain.build_val_data(cfg, env, False), env,
                               resolve_precision("fp32", env.device), cfg)
    out = tmp_path / "run"
    result = pretrain.main(["--config", config, "--output_dir", str(out)])

    after = result["val"]
    for task in tasks:
        assert after[f"{task}/loss"] < before[f"{task}/loss"], (task, before, after)
    train = read_metrics(out, "train")
    for task in tasks:
        # loss, counts and throughput are logged per task
        logged = [r for r in train if f"{task}/loss" in r]
        assert len(logged) >= 5
        assert all(r[f"{task}/micro_batches"] >= 1 and r[f"{task}/examples_per_s"] > 0 for r in logged)
    assert result["step"] == 60
    assert set(after["recall/synth"]) == {"text_to_image", "image_to_text", "rsum", "ar"}
    if "mlm" in tasks:
        assert after["mlm/acc"] > before["mlm/acc"]
    # Model checkpoints rebuild from the file alone (bi-encoder for inference, full model).
    final = out / "ckpt" / "model_final.pt"
    assert build_biencoder_from_checkpoint(final).config.cls_concat == "add"
    build_pretrain_model_from_checkpoint(out / "ckpt" / "model_step_60.pt")


def test_kill_and_resume_gives_identical_losses(tiny_data, tiny_models, tmp_path):
    cfg = pretrain_config(tiny_data, tiny_models, ["itm", "mlm", "mrfr", "mrckl"], [2, 1, 1, 1],
                          num_train_steps=12, valid_steps=6, save_steps=4, gradient_accumulation_steps=2)
    cfg["model"]["dropout"] = 0.1
    config = write_config(tmp_path / "c.yaml", cfg)
    pretrain.main(["--config", config, "--output_dir", str(tmp_path / "full")])

    def crash(step: int, metrics: dict) -> None:
        if step == 10:
            raise Crash

    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        pretrain.main(["--config", config, "--output_dir", str(cut)], on_step=crash)
    assert list_states(cut)[-1].name == "step_00000008.pt"
    pretrain.main(["--config", config, "--output_dir", str(cut), "--resume"])

    def records(run: str) -> list[dict]:
        drop = ("time", "interval_s", "examples_per_s")
        return [{k: v for k, v in r.items() if not k.endswith(drop)} for r in read_metrics(tmp_path / run)]

    assert records("cut") == records("full")
    assert [r["step"] for r in read_metrics(cut, "train")] == list(range(1, 13))


def test_task_draws_follow_the_ratios_and_the_seed():
    ratios = np.array([16, 8, 4, 4], dtype=float)
    draws = [draw_stream(42, step, 0, ratios) for step in range(8000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, ratios / ratios.sum(), atol=0.02)
    assert draws[:50] == [draw_stream(42, step, 0, ratios) for step in range(50)]
    assert draws[:50] != [draw_stream(43, step, 0, ratios) for step in range(50)]


@pytest.mark.parametrize("path", ORIGINAL_CONFIGS, ids=lambda p: p.name)
def test_original_configs_parse_and_name_the_missing_path(path, tmp_path):
    cfg = load_config(path, program=pretrain.LIGHTNINGDOT_PRETRAIN)
    assert cfg.train.batch_size_unit == "tokens"
    expected = r"train_datasets\[0\]\.db\[0\]" if cfg.data.train_datasets else "train_datasets"
    with pytest.raises((ConfigError, FileNotFoundError), match=expected):
        pretrain.main(["--config", str(path), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_paper_config_and_ablations(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    paper = load_config("configs/pretrain/paper.yaml")
    t = paper.train
    assert (t.num_train_steps, t.learning_rate, t.betas, t.weight_decay) == (300000, 5e-5, [0.9, 0.98], 0.01)
    assert (t.warmup_steps, t.decay, t.grad_norm, t.precision) == (10000, "linear", 5.0, "fp16")
    assert paper.data.max_txt_len == 60 and paper.model.cls_concat == "add"
    assert paper.model.img_checkpoint.endswith("uniter-base.pt")
    assert {d.name: d.mix_ratio for d in paper.data.train_datasets} == PAPER_RATIOS

    expected_tasks = {
        "paper": ["itm", "mlm", "mrfr", "mrckl"], "all": ["itm", "mlm", "mrfr", "mrckl"],
        "cmr_only": ["itm"], "cmr_vmlm": ["itm", "mlm"], "cmr_smrm": ["itm", "mrfr", "mrckl"],
        "cls_concat_multiply": ["itm", "mlm", "mrfr", "mrckl"], "cls_concat_none": ["itm", "mlm", "mrfr", "mrckl"],
    }
    for name, tasks in expected_tasks.items():
        cfg = load_config(f"configs/pretrain/{name}.yaml")
        for spec in cfg.data.train_datasets:
            kept = dataset_tasks(spec, cfg.data.pretrain_tasks, spec.name)
            assert kept == [(t, float(r)) for t, r in zip(spec.tasks, PAPER_RATIOS[spec.name]) if t in tasks]
        assert cfg.model.cls_concat == {"cls_concat_multiply": "multiply", "cls_concat_none": "none"}.get(name, "add")
        with pytest.raises(FileNotFoundError, match=r"train_datasets\[0\]\.db\[0\]"):
            pretrain.main(["--config", f"configs/pretrain/{name}.yaml", "--output_dir", str(tmp_path / name)])
