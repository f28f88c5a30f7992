"""The pre-training task registry agrees with the data and the model for every task."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from data.img_db import ImgDb
from data.txt_db import TxtDb
from model.biencoder import BiEncoder, BiEncoderConfig
from tests.helpers import TINY_BERT
from utils.config import DataConfig, DatasetSpec, RunConfig
from utils.errors import ConfigError
from utils.pipeline.pretrain_data import dataset_tasks
from utils.pipeline.pretrain_tasks import PRETRAIN_TASKS, pretrain_model
from utils.pipeline.run_config import check_run_config


def test_the_model_dispatches_through_the_registry():
    # A LightningDOT bi-encoder can run every task: each is attached, heads in registry order.
    model = pretrain_model(BiEncoder(BiEncoderConfig(dict(TINY_BERT), dict(TINY_BERT), 16)))
    assert tuple(model.objectives) == tuple(PRETRAIN_TASKS)
    heads = [t.head_name for t in PRETRAIN_TASKS.values() if t.head_name]
    assert [name for name, _ in model.named_children() if name != "bert"] == heads == ["cls", "feat_regress", "region_classifier"]


@pytest.mark.parametrize("name", list(PRETRAIN_TASKS))
def test_each_task_batch_runs_through_its_head(name, tiny_data, tiny_models):
    from utils.config import ModelConfig
    from utils.pipeline.model_setup import build_pretrain_model_for_run

    task = PRETRAIN_TASKS[name]
    txt, img = [TxtDb(tiny_data["txt_db"]["train"])], [ImgDb(tiny_data["img_db"])]
    dataset = task.make_dataset(txt, img, DataConfig(), 0)
    batch = task.collate([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    model = build_pretrain_model_for_run(ModelConfig(txt_model_config=tiny_models["txt"],
                                                     img_model_config=tiny_models["img"], project_dim=16))
    out = model(batch, name)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out[task.weight_key] > 0
    if task.correct_key is not None:
        assert 0 <= out[task.correct_key] <= out[task.weight_key]
    assert all(torch.isfinite(v) for v in task.train_metrics(out).values())


def test_a_registered_task_is_accepted_by_configs(monkeypatch):
    spec = DatasetSpec(name="d", db=["a"], img=["b"], tasks=["itm", "mlm2"], mix_ratio=[1, 1])
    cfg = RunConfig(data=DataConfig(train_datasets=[spec]))
    with pytest.raises(ConfigError, match="unknown task 'mlm2'"):
        check_run_config(cfg)
    monkeypatch.setitem(PRETRAIN_TASKS, "mlm2", dataclasses.replace(PRETRAIN_TASKS["mlm"], name="mlm2"))
    check_run_config(cfg)
    assert dataset_tasks(spec, [], "train_datasets[0]") == [("itm", 1.0), ("mlm2", 1.0)]
