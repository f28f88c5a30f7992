"""Two ranks (torchrun / gloo DDP, and horovodrun / Horovod) train like one process on the
concatenated batch: same first-step loss, and after one update the same second-step loss.
Multi-task pre-training gives the same loss curve under both launchers.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_itm
from data.datasets import RetrievalDataset, retrieval_collate
from data.txt_db import TxtDb
from optim.optimizer import build_optimizer
from optim.schedule import build_scheduler
from tests.helpers import (
    first_epoch_rank_batches,
    itm_config,
    pretrain_config,
    write_config,
)
from utils.config import load_config
from utils.engine.metrics_log import read_metrics
from utils.pipeline.evaluation import open_img_db

REPO = Path(__file__).resolve().parents[1]
PER_RANK_BATCH = 4
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    # A launcher's variables from an outer job would confuse the inner one.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HOROVOD_RANK"):
        env.pop(key, None)
    return env


def _config(tiny_data, tiny_models, tmp_path: Path) -> str:
    cfg = itm_config(tiny_data, tiny_models, train_batch_size=PER_RANK_BATCH, num_train_steps=2,
                     warmup_steps=0, valid_steps=100, save_steps=0)
    return write_config(tmp_path / "c.yaml", cfg)


def _reference_losses(config: str) -> list[float]:
    """One process, batch = rank 0's first batch + rank 1's first batch (then the second ones)."""
    cfg = load_config(config)
    model = train_itm.build_model(cfg)
    dataset = RetrievalDataset([TxtDb(p, cfg.data.max_txt_len) for p in cfg.data.train_txt_dbs],
                               [open_img_db(p, cfg.data) for p in cfg.data.train_img_dbs])
    per_rank = first_epoch_rank_batches(dataset, cfg, WORLD, PER_RANK_BATCH)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, cfg.train.num_train_steps)
    losses = []
    for step in range(2):
        batch = retrieval_collate([dataset[i] for r in range(WORLD) for i in per_rank[r][step]])
        loss = train_itm.itm_loss(model, batch, "itm")["loss"]
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return losses


def _check(out: Path, config: str, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    logged = [r["loss"] for r in read_metrics(out, "train")]
    assert len(logged) == 2
    reference = _reference_losses(config)
    assert logged[0] == pytest.approx(reference[0], rel=1e-5)
    assert logged[1] == pytest.approx(reference[1], rel=1e-4)


def test_torchrun_two_ranks_match_one_process(tiny_data, tiny_models, tmp_path):
    config = _config(tiny_data, tiny_models, tmp_path)
    out = tmp_path / "ddp"
    _check(out, config, _torchrun("train_itm.py", config, out))


def test_horovodrun_two_ranks_match_one_process(tiny_data, tiny_models, tmp_path):
    horovodrun = _horovodrun()
    config = _config(tiny_data, tiny_models, tmp_path)
    out = tmp_path / "hvd"
    _check(out, config, _horovod(horovodrun, "train_itm.py", config, out))


def test_pretraining_is_the_same_under_both_launchers(tiny_data, tiny_models, tmp_path):
    """All four tasks with accumulation: unused heads must be treated alike (no update)."""
    horovodrun = _horovodrun()
    cfg = pretrain_config(tiny_data, tiny_models, ["itm", "mlm", "mrfr", "mrckl"], [1, 1, 1, 1],
                          train_batch_size=4, num_train_steps=6, valid_steps=100, gradient_accumulation_steps=2)
    cfg["model"]["dropout"] = 0.1
    config = write_config(tmp_path / "p.yaml", cfg)
    curves = []
    for name, launch in (("ddp", _torchrun), ("hvd", lambda *a: _horovod(horovodrun, *a))):
        proc = launch("pretrain.py", config, tmp_path / name)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        records = read_metrics(tmp_path / name, "train")
        assert [r["step"] for r in records] == list(range(1, 7))
        curves.append([r["loss"] for r in records])
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)


def _torchrun(script: str, config: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(REPO / script), "--config", config, "--output_dir", str(out), "train.distributed=ddp"]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)


def _horovodrun() -> str:
    """The launcher, or skip (with the reason) where Horovod is not built."""
    pytest.importorskip("horovod.torch", reason="Horovod is not installed (build it with `make horovod`)")
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
    if not Path(horovodrun).is_file():
        pytest.skip("horovod.torch imports but the horovodrun launcher is missing")
    return horovodrun


def _horovod(horovodrun: str, script: str, config: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [horovodrun, "-np", str(WORLD), "-H", f"localhost:{WORLD}", "--gloo",
           sys.executable, str(REPO / script), "--config", config, "--output_dir", str(out),
           "train.distributed=horovod"]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
