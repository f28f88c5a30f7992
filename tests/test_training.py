"""utils/engine/: step accounting, NaN guard, atomic state, resume, output-dir rules, metrics log."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from data.samplers import LengthBucketBatchSampler
from optim.optimizer import build_optimizer
from optim.schedule import build_scheduler
from utils.config import TrainConfig
from utils.distributed import DistEnv
from utils.engine.loader import ResumableLoader
from utils.engine.metrics_log import MetricsLogger, read_metrics
from utils.engine.run_dir import (
    OutputDirError,
    list_states,
    prepare_output_dir,
    state_path,
)
from utils.engine.trainer import MicroBatch, NonFiniteLossError, Trainer
from utils.files import atomic_torch_save
from utils.precision import resolve_precision
from utils.rng import capture_rng_state, restore_rng_state

ENV = DistEnv(backend="none", rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class _Toy(nn.Module):
    """Linear regression with a LayerNorm and dropout (so RNG state matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(4, 1)

    def forward(self, batch: dict, task: str) -> dict[str, torch.Tensor]:
        pred = self.out(self.drop(self.norm(self.lin(batch["x"])))).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        if batch.get("poison"):
            loss = loss * float("nan")
        return {"loss": loss, "n_rows": torch.tensor(len(batch["y"]))}


class _ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "id": f"ex{i}"}


def _collate(items: list[dict]) -> dict:
    return {"x": torch.stack([it["x"] for it in items]), "y": torch.stack([it["y"] for it in items]),
            "ids": [it["id"] for it in items]}


def _loss(model: nn.Module, batch: dict, task: str) -> dict[str, torch.Tensor]:
    return model(batch, task)


def _setup(tmp_path, *, steps: int = 12, resume_from=None, accumulation: int = 1, on_step=None, seed: int = 0):
    torch.manual_seed(seed)
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=2, gradient_accumulation_steps=accumulation,
                      log_steps=1, keep_last=2, grad_norm=1.0)
    model = _Toy()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps)
    data = _ToyData()
    loader = ResumableLoader(data, LengthBucketBatchSampler([1] * len(data), batch_size=4, seed=3),
                             _collate, seed=3, name="toy")
    trainer = Trainer(model, opt, sched, resolve_precision("fp32", ENV.device), ENV, cfg,
                      total_steps=steps, output_dir=tmp_path, run_config={"train": {"seed": seed}},
                      stateful={"loader": loader}, resume_from=resume_from, on_step=on_step)
    return trainer, loader


def _run(trainer: Trainer, loader: ResumableLoader, save_every: int = 0) -> list[float]:
    losses = []
    while not trainer.done:
        mbs = [MicroBatch("toy", loader.next_batch(), loader.describe_last())
               for _ in range(trainer.accumulation)]
        losses.append(trainer.train_step(mbs, _loss)["loss"])
        if save_every and trainer.every(save_every):
            trainer.save_state()
    trainer.close()
    return losses


def test_resume_continues_exactly(tmp_path):
    """Dropout, data order and optimizer state all continue: same losses as one long run."""
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    for d in (full_dir, cut_dir):
        prepare_output_dir(d, resume=False, overwrite=False, env=ENV)
    full = _run(*_setup(full_dir), save_every=5)

    class Crash(Exception):
        pass

    def crash(step, metrics):
        if step == 8:
            raise Crash

    trainer, loader = _setup(cut_dir, on_step=crash)
    with pytest.raises(Crash):
        _run(trainer, loader, save_every=5)
    trainer.close()
    # Steps 6-8 of the crashed run are lost; the newest state is step 5.
    assert [p.name for p in list_states(cut_dir)] == ["step_00000005.pt"]
    latest = prepare_output_dir(cut_dir, resume=True, overwrite=False, env=ENV)
    # Another seed for the fresh objects: everything must come from the state file.
    trainer, loader = _setup(cut_dir, resume_from=latest, seed=123)
    assert trainer.step == 5
    resumed = _run(trainer, loader, save_every=5)
    assert resumed == pytest.approx(full[5:], rel=0, abs=0)
    # The log reads as one run: steps 1..12 once each, equal to the uninterrupted log.
    log = [(r["step"], r["loss"]) for r in read_metrics(cut_dir, "train")]
    assert log == [(r["step"], r["loss"]) for r in read_metrics(full_dir, "train")]
    # keep_last=2
    assert [p.name for p in list_states(full_dir)] == ["step_00000005.pt", "step_00000010.pt"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-batches of 4 with accumulation = one batch of 8 (mean losses, no dropout)."""
    torch.manual_seed(0)
    data = _ToyData()
    results = []
    for accumulation, parts in ((2, [range(4), range(4, 8)]), (1, [range(8)])):
        torch.manual_seed(0)
        model = _Toy().eval()
        model.drop.p = 0.0
        cfg = TrainConfig(learning_rate=1e-2, warmup_steps=0, gradient_accumulation_steps=accumulation, grad_norm=0.0)
        opt = build_optimizer(model, cfg)
        trainer = Trainer(model, opt, build_scheduler(opt, cfg, 5), resolve_precision("fp32", ENV.device), ENV, cfg,
                          total_steps=5, output_dir=tmp_path / str(accumulation), run_config={})
        trainer.train_step([MicroBatch("toy", _collate([data[i] for i in p])) for p in parts], _loss)
        trainer.close()
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_step_task_and_batch_ids(tmp_path):
    trainer, loader = _setup(tmp_path)
    trainer.train_step([MicroBatch("toy", loader.next_batch(), loader.describe_last())], _loss)
    trainer.save_state()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = loader.next_batch()
    batch["poison"] = True
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train_step([MicroBatch("toy", batch, loader.describe_last())], _loss)
    trainer.close()
    message = str(err.value)
    assert err.value.step == 2
    assert "step 2" in message and "task 'toy'" in message
    assert "toy epoch 0 batch 1" in message
    assert all(i in message for i in batch["ids"])
    # No update was applied and nothing was saved for the failed step.
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert [p.name for p in list_states(tmp_path)] == ["step_00000001.pt"]


def test_output_dir_rules(tmp_path):
    out = tmp_path / "run"
    assert prepare_output_dir(out, resume=False, overwrite=False, env=ENV) is None
    atomic_torch_save({"x": 1}, state_path(out, 3))
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="already holds a run.*--resume.*--overwrite"):
        prepare_output_dir(out, resume=False, overwrite=False, env=ENV)
    assert prepare_output_dir(out, resume=True, overwrite=False, env=ENV) == state_path(out, 3)
    with pytest.raises(OutputDirError, match="contradict"):
        prepare_output_dir(out, resume=True, overwrite=True, env=ENV)
    assert prepare_output_dir(out, resume=False, overwrite=True, env=ENV) is None
    assert not list_states(out) and not (out / "metrics.jsonl").exists()
    # Only our own artefacts are removed.
    assert (out / "notes.txt").read_text() == "mine"


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"v": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_torch_save({"v": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["v"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_resumable_loader_restarts_mid_epoch():
    data = _ToyData(10)

    def make():
        return ResumableLoader(data, LengthBucketBatchSampler([1] * 10, batch_size=3, seed=5), _collate, seed=5)

    loader = make()
    seen = [loader.next_batch()["ids"] for _ in range(6)]  # 4 batches / epoch: crosses into epoch 1
    assert loader.state_dict() == {"epoch": 1, "position": 2}
    other = make()
    other.load_state_dict({"epoch": 0, "position": 2})
    assert [other.next_batch()["ids"] for _ in range(4)] == seen[2:]
    assert sorted(i for b in seen[:4] for i in b) == sorted(f"ex{i}" for i in range(10))


def test_metrics_logger_truncates_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 6):
        logger.log(step, {"loss": float(step), "val": {"rsum": 1.0}})
    logger.close()
    MetricsLogger(tmp_path, enabled=True, resume_step=3).close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["val/rsum"] == 1.0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["split"] == "train"


def test_progress_in_a_log_file_is_a_few_plain_lines(tmp_path, capsys):
    """Stderr is not a terminal here: the trainer's bar is a start line, quarters and an end line."""
    _run(*_setup(tmp_path, steps=40))
    # The bar is named by the run directory, so two runs in one log are told apart.
    label = f"train {tmp_path.name}: "
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(label)]
    assert 2 <= len(lines) <= 5, lines
    assert lines[-1].startswith(f"{label}finished 40/40 it (100%)") and "loss=" in lines[-1]
