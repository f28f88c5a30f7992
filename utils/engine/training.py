"""Training-loop machinery shared by every training script (pre-training, fine-tuning, re-ranker).

Nothing here knows which model it trains: a script hands the `Trainer` a model, an optimizer,
a scheduler and a `compute_loss(model, batch, task) -> {"loss": ..., other scalars}` function,
and gets back step accounting with gradient accumulation, mixed precision, clipping, a
NaN/inf guard, reduced metrics, logging, and checkpoints that resume exactly.

Exact resume rests on three rules:

* every batch is a pure function of (seed, rank, epoch, position): the samplers' order
  depends only on (seed, epoch), the datasets draw masks from (seed, epoch, example index),
  and `ResumableLoader` restarts a sampler at the position the loop had consumed;
* nothing but the model's forward consumes the global RNGs between two checkpoints (data
  loaders use their own generators), and their states are saved per rank;
* model, optimizer, scheduler, loss scaler and every registered stateful object (loader
  positions, mined hard negatives, best score) are saved together, atomically.

Layout of an output directory::

    config.yaml        resolved run config
    metrics.jsonl      one JSON record per log / validation event
    tensorboard/       the same scalars for TensorBoard
    train_state/       step_XXXXXXXX.pt resume states (keep-last-N)
    ckpt/              model checkpoints for inference (model/checkpoint.py format)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

from utils.config import TrainConfig
from utils.distributed import (
    DistEnv,
    all_gather_object,
    all_reduce,
    barrier,
    unwrap_model,
    wrap_model,
)
from utils.errors import DataError, UserError
from utils.files import atomic_torch_save, atomic_write_text
from utils.precision import Precision
from utils.rng import capture_rng_state, derive_seed, restore_rng_state
from utils.run_files import (
    CKPT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    STATE_DIR,
    TENSORBOARD_DIR,
)

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch, str], Mapping[str, torch.Tensor]]

STATE_FORMAT = "lightningdot-train-state"
STATE_FORMAT_VERSION = 1
# What a run writes into its output directory; `--overwrite` removes exactly these.
RUN_ARTIFACTS = (STATE_DIR, CKPT_DIR, METRICS_FILE, TENSORBOARD_DIR, CONFIG_FILE)
# Keys of a batch that identify its examples, for error messages.
BATCH_ID_KEYS = ("txt_ids", "img_names", "ids", "index")


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss: the run stops before the optimizer update, nothing is saved for it."""

    def __init__(self, step: int, details: Sequence[Mapping[str, Any]]) -> None:
        self.step = step
        self.details = list(details)
        lines = [
            f"  rank {d['rank']}, task {d['task']!r}, micro-batch {d['micro_batch']} "
            f"({d['source'] or 'no source'}): loss {d['value']}, batch ids {d['ids']}"
            for d in self.details
        ]
        super().__init__(
            f"non-finite loss at step {step}; stopped before the optimizer update, so no "
            f"checkpoint holds this step:\n" + "\n".join(lines)
        )


class OutputDirError(UserError, RuntimeError):
    """The output directory holds another run and neither --resume nor --overwrite was given."""


class Stateful(Protocol):
    """Anything whose state goes into a training checkpoint."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


# ---------------------------------------------------------------- seeding and RNG state


# ---------------------------------------------------------------- data


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device`; other values are left as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (torch.Tensor, Mapping)) for v in obj):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def batch_ids(batch: Mapping[str, Any], limit: int = 16) -> dict[str, list]:
    """The identifying entries of a batch (caption ids, image names), for error messages."""
    out: dict[str, list] = {}
    for key in BATCH_ID_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        values = value.tolist() if isinstance(value, torch.Tensor) else list(value)
        out[key] = values[:limit] + (["..."] if len(values) > limit else [])
    return out


def count_examples(batch: Any) -> int:
    """Rows of the first tensor found in a (nested) batch: its number of examples."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        for value in batch.values():
            n = count_examples(value)
            if n:
                return n
    return 0


class ResumableLoader:
    """Batches of a map-style dataset in batch-sampler order, resumable at any batch.

    Epoch after epoch without end: `next_batch()` rolls over to the next epoch when one is
    exhausted. The position (epoch, batches handed out this epoch) is what `state_dict`
    saves; batches that workers prefetched but the loop never took are rebuilt identically
    after a resume, because the sampler's order depends only on (seed, epoch) and the
    datasets draw their random choices (masking) from (seed, epoch, example index).

    Args:
        dataset: map-style dataset; its `set_epoch(epoch)` is called when it has one.
        batch_sampler: a `data.samplers` batch sampler (already sharded for this rank) with
            `set_epoch`, `skip_batches` and `__len__`.
        collate_fn: list of examples -> batch.
        seed: seed of the private generator of the DataLoader (worker base seeds).
        num_workers: DataLoader worker processes.
        pin_memory: pin batches (for CUDA).
        name: label used in logs and error messages.
    """

    def __init__(
        self,
        dataset: Any,
        batch_sampler: Any,
        collate_fn: Callable[[list], Batch],
        *,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        name: str = "train",
    ) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.collate_fn = collate_fn
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.name = name
        self.epoch = 0
        self.position = 0
        self._epoch_len: int | None = None
        self._iter: Iterator[Batch] | None = None

    def _set_epoch(self) -> None:
        self.batch_sampler.set_epoch(self.epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        self._epoch_len = len(self.batch_sampler)
        if self._epoch_len == 0:
            raise RuntimeError(
                f"loader {self.name!r}: the batch sampler yields no batch in epoch {self.epoch} "
                f"(dataset of {len(self.dataset)} examples); is the batch larger than the data?"
            )

    def batches_per_epoch(self) -> int:
        """Number of batches in the current epoch (on this rank)."""
        if self._epoch_len is None:
            self._set_epoch()
        return self._epoch_len

    def _make_iter(self) -> Iterator[Batch]:
        self._set_epoch()
        self.batch_sampler.skip_batches(self.position)
        # A private generator: creating the iterator must not consume the global RNG, or a
        # resumed run's dropout would drift from the uninterrupted one.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.position))
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
        )
        return iter(loader)

    def next_batch(self) -> Batch:
        """The next batch (rolling over to the next epoch at the end of one)."""
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self.position += 1
        if self.position >= self.batches_per_epoch():
            self.epoch += 1
            self.position = 0
            self._epoch_len = None
            self._iter = None
        return batch

    @property
    def at_epoch_start(self) -> bool:
        """True when the next batch is the first of an epoch."""
        return self.position == 0

    def describe_last(self) -> str:
        """`name epoch E batch P` of the batch `next_batch` handed out last."""
        if self.position == 0:
            return f"{self.name} epoch {self.epoch - 1}, its last batch"
        return f"{self.name} epoch {self.epoch} batch {self.position - 1}"

    def reset(self) -> None:
        """Drop prefetched batches (call after the dataset changed, e.g. new hard negatives)."""
        self._iter = None

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position."""
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._epoch_len = None
        self._iter = None


def eval_loader(
    dataset: Any,
    collate_fn: Callable[[list], Batch],
    batch_sampler: Any,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A plain DataLoader for evaluation that leaves the global RNG untouched."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )


# ---------------------------------------------------------------- files


def state_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the resume state of `step` lives."""
    return Path(output_dir) / STATE_DIR / f"step_{step:08d}.pt"


def list_states(output_dir: str | os.PathLike) -> list[Path]:
    """Resume states of a run directory, oldest first."""
    folder = Path(output_dir) / STATE_DIR
    if not folder.is_dir():
        return []
    return sorted(folder.glob("step_*.pt"))


def _existing_artifacts(out: Path, artifacts: Sequence[str]) -> list[str]:
    found = []
    for name in artifacts:
        path = out / name
        if path.is_dir() and any(path.iterdir()):
            found.append(f"{name}/ ({sum(1 for _ in path.iterdir())} entries)")
        elif path.is_file():
            found.append(name)
    return found


def prepare_output_dir(
    output_dir: str | os.PathLike,
    *,
    resume: bool,
    overwrite: bool,
    env: DistEnv,
    extra_artifacts: Sequence[str] = (),
) -> Path | None:
    """Check, clean and create a run's output directory; find the state to resume from.

    Every rank runs the checks (so all fail alike); only rank 0 changes the filesystem.

    Args:
        output_dir: the run directory.
        resume: continue the run found there (from its latest resume state, if any).
        overwrite: delete the previous run's files (only those this code writes) first.
        env: distributed environment.
        extra_artifacts: other file names the script writes (e.g. `test_results.json`).

    Returns:
        The resume state to load, or None to start from scratch.

    Raises:
        OutputDirError: the directory holds another run and neither flag was given, or
            both flags were given.
    """
    if resume and overwrite:
        raise OutputDirError("--resume and --overwrite contradict each other; pass one")
    out = Path(output_dir)
    artifacts = tuple(RUN_ARTIFACTS) + tuple(extra_artifacts)
    found = _existing_artifacts(out, artifacts) if out.is_dir() else []
    if found and not (resume or overwrite):
        raise OutputDirError(
            f"output directory {out} already holds a run ({', '.join(found)}); pass --resume "
            f"to continue it, --overwrite to replace it, or choose another --output_dir"
        )
    latest = list_states(out)[-1] if resume and list_states(out) else None
    if resume and latest is None and found:
        logger.warning("--resume: %s has no resume state yet; starting from scratch", out)
    barrier()
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and found:
            logger.warning("--overwrite: removing %s from %s", ", ".join(found), out)
            for name in artifacts:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        for stale in list((out / STATE_DIR).glob(".*.tmp*")) + list((out / CKPT_DIR).glob(".*.tmp*")):
            stale.unlink()
        (out / STATE_DIR).mkdir(exist_ok=True)
        (out / CKPT_DIR).mkdir(exist_ok=True)
    barrier()
    return latest


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """`--resume` / `--overwrite`, shared by every training script."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true",
        help="continue the run in --output_dir from its latest resume state",
    )
    group.add_argument(
        "--overwrite", action="store_true",
        help="delete the previous run's files in --output_dir and start afresh",
    )


# ---------------------------------------------------------------- logging


class MetricsLogger:
    """Scalars to `metrics.jsonl` and TensorBoard, on rank 0 only.

    On resume, records after the resumed step are dropped from `metrics.jsonl` and purged
    from TensorBoard, so both read as one uninterrupted run.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._writer = None
        if not enabled:
            return
        self._truncate(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(
            str(Path(output_dir) / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None
        )

    def _truncate(self, resume_step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= resume_step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Append one record; nested dicts are flattened with `/` (e.g. `text_to_image/R@1`)."""
        if not self.enabled:
            return
        flat = _flatten(metrics)
        record = {"step": step, "split": split, "time": round(time.time(), 3), **flat}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for key, value in flat.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{split}/{key}", value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (torch.Tensor, np.generic)):
            out[name] = value.item()
        else:
            out[name] = value
    return out


def read_metrics(output_dir: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Records of a run's `metrics.jsonl` (optionally of one split)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r.get("split") == split]


# ---------------------------------------------------------------- the trainer


class MicroBatch(NamedTuple):
    """One forward/backward pass of an optimizer step."""

    task: str
    batch: Batch
    source: str = ""


@dataclass
class _TaskTotals:
    """Sums over micro-batches since the last log, per task (tensors stay on device)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    examples: int = 0


class Trainer:
    """Optimizer steps with accumulation, precision, clipping, NaN guard, logging and state.

    The trainer wraps the model for DDP / Horovod (and `torch.compile` when asked); scripts
    keep the bare model for saving and evaluation. The optimizer comes already wrapped by
    `utils.distributed.wrap_optimizer` (Horovod replaces the optimizer object, so the
    scheduler must be built on the wrapped one).

    Args:
        model: the bare model (already on `env.device`).
        optimizer: built over `model`'s parameters (`optim.build_optimizer`), then passed
            through `utils.distributed.wrap_optimizer`.
        scheduler: LR scheduler stepped once per optimizer update.
        precision: from `utils.precision.resolve_precision`.
        env: from `utils.distributed.init_distributed`.
        cfg: the train section (accumulation, clipping, log / keep-last settings).
        total_steps: optimizer updates of the whole run.
        output_dir: the run directory (see `prepare_output_dir`).
        run_config: the resolved run config as a dict (stored in every state).
        stateful: named objects whose state is saved and restored with the run (loaders,
            mined hard negatives, ...). Their state must be the same on every rank.
        resume_from: a resume state to load before training.
        on_step: called as `on_step(step, metrics)` after every update (tests use it to
            simulate a crash).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        precision: Precision,
        env: DistEnv,
        cfg: TrainConfig,
        *,
        total_steps: int,
        output_dir: str | os.PathLike,
        run_config: Mapping[str, Any],
        stateful: Mapping[str, Stateful] | None = None,
        resume_from: str | os.PathLike | None = None,
        on_step: Callable[[int, Mapping[str, float]], None] | None = None,
    ) -> None:
        if env.backend == "horovod" and not hasattr(optimizer, "skip_synchronize"):
            # An unwrapped optimizer would silently train each rank on its own gradients.
            raise ValueError(
                "under Horovod pass the optimizer through utils.distributed.wrap_optimizer "
                "(before building the scheduler on it)"
            )
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.precision = precision
        self.env = env
        self.cfg = cfg
        self.total_steps = total_steps
        self.output_dir = Path(output_dir)
        self.run_config = dict(run_config)
        self.stateful = dict(stateful or {})
        self.on_step = on_step
        self.step = 0
        self.accumulation = max(1, cfg.gradient_accumulation_steps)
        self._params = [p for p in model.parameters() if p.requires_grad]
        rng_state = self._load(resume_from) if resume_from is not None else None

        self.forward_model = wrap_model(model, env)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)

        self.metrics = MetricsLogger(self.output_dir, env.is_main, resume_step=self.step)
        self._totals: dict[str, _TaskTotals] = {}
        self._grad_norms: list[torch.Tensor] = []
        self._skipped = 0
        self._last_log_time = time.perf_counter()
        self._progress = None
        if env.is_main:
            from tqdm.auto import tqdm

            self._progress = tqdm(total=total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        # Last, so that nothing above (wrapping, logger set-up) shifts the restored streams.
        if rng_state is not None:
            restore_rng_state(rng_state)

    # ------------------------------------------------------------ stepping

    @property
    def done(self) -> bool:
        """True once `total_steps` updates are done."""
        return self.step >= self.total_steps

    def every(self, interval: int) -> bool:
        """True when the step just completed is a multiple of `interval` (> 0)."""
        return interval > 0 and self.step > 0 and self.step % interval == 0

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        # DDP all-reduces gradients on every backward; only the last micro-batch of an
        # accumulation needs it (Horovod counts backward passes itself).
        ddp = self.forward_model
        if hasattr(ddp, "_orig_mod"):  # torch.compile's wrapper
            ddp = ddp._orig_mod
        if not last and isinstance(ddp, nn.parallel.DistributedDataParallel):
            return ddp.no_sync()
        return contextlib.nullcontext()

    def train_step(self, micro_batches: Sequence[MicroBatch], compute_loss: LossFn) -> dict[str, float]:
        """One optimizer update over `micro_batches` (normally `gradient_accumulation_steps`).

        Args:
            micro_batches: the step's micro-batches, each with its task and a source label.
            compute_loss: `compute_loss(model, batch, task)` returning `loss` and any other
                scalar tensors to log (summed per task over micro-batches and ranks; a key
                starting with `n_` is a count, the others are averaged).

        Returns:
            `{"loss": mean loss over the step's micro-batches, "lr": rate used}` (local,
            unreduced; reduced metrics go to the log every `log_steps`).

        Raises:
            NonFiniteLossError: some rank's loss was NaN/inf; raised on every rank.
        """
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        self.forward_model.train()
        n = len(micro_batches)
        records = []
        for i, mb in enumerate(micro_batches):
            batch = to_device(mb.batch, self.env.device)
            with self._no_sync(last=i == n - 1):
                with self.precision.autocast():
                    out = compute_loss(self.forward_model, batch, mb.task)
                loss = out["loss"].float()
                self.precision.backward(loss / n)
            scalars = {k: torch.as_tensor(v, device=loss.device).detach().float() for k, v in out.items()}
            records.append((mb, scalars, count_examples(mb.batch)))

        losses = torch.stack([r[1]["loss"] for r in records])
        nonfinite = (~torch.isfinite(losses)).sum().reshape(1)
        if all_reduce(nonfinite).item() > 0:
            self._raise_nonfinite(records)

        if self.env.backend == "horovod":
            self._horovod_synchronize()
        self.precision.unscale_(self.optimizer)
        max_norm = self.cfg.grad_norm if self.cfg.grad_norm > 0 else math.inf
        self._grad_norms.append(torch.nn.utils.clip_grad_norm_(self._params, max_norm).detach())
        lr = self.optimizer.param_groups[0]["lr"]
        if self.env.backend == "horovod":
            with self.optimizer.skip_synchronize():
                applied = self.precision.step(self.optimizer)
        else:
            applied = self.precision.step(self.optimizer)
        self._skipped += int(not applied)
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.step += 1

        for mb, out, n_examples in records:
            totals = self._totals.setdefault(mb.task, _TaskTotals())
            for key, value in out.items():
                totals.sums[key] = totals.sums.get(key, 0.0) + value
            totals.count += 1
            totals.examples += n_examples
        if self._progress is not None:
            self._progress.update(1)
        step_metrics = {"loss": float(losses.mean()), "lr": lr}
        if self.every(self.cfg.log_steps) or self.done:
            self.log_train()
        if self.on_step is not None:
            self.on_step(self.step, step_metrics)
        return step_metrics

    def _horovod_synchronize(self) -> None:
        """Average gradients before they are unscaled and clipped, as DDP would have.

        Horovod gives a parameter no rank used (a pre-training head of another task) a zero
        gradient, and AdamW would then still move it by its momentum and decay it; DDP and a
        single process leave such a gradient None, which AdamW skips. Restore that.
        """
        unused = [p for p in self._params if p.grad is None]
        self.optimizer.synchronize()
        if unused:
            used_elsewhere = torch.stack([p.grad.abs().sum() for p in unused]).cpu() > 0
            for param, keep in zip(unused, used_elsewhere.tolist()):
                if not keep:
                    param.grad = None

    def _raise_nonfinite(self, records: list) -> None:
        self.optimizer.zero_grad()
        local = [
            {
                "rank": self.env.rank,
                "task": mb.task,
                "micro_batch": i,
                "source": mb.source,
                "value": float(out["loss"]),
                "ids": batch_ids(mb.batch),
            }
            for i, (mb, out, _) in enumerate(records)
            if not math.isfinite(float(out["loss"]))
        ]
        details = [d for rank_details in all_gather_object(local) for d in rank_details]
        raise NonFiniteLossError(self.step + 1, details)

    # ------------------------------------------------------------ logging

    def log_train(self) -> dict[str, float]:
        """Reduce the sums since the last call over ranks and log them (every rank calls)."""
        tasks = sorted(self._totals)
        if not tasks:
            return {}
        device = self.env.device
        # One all-reduce for everything: [per task: each sum, count, examples] + grad norm.
        layout: list[tuple[str, str]] = []
        values: list[torch.Tensor] = []
        for task in tasks:
            totals = self._totals[task]
            for key in sorted(totals.sums):
                layout.append((task, key))
                values.append(torch.as_tensor(totals.sums[key], dtype=torch.float32, device=device).reshape(()))
            layout += [(task, "#count"), (task, "#examples")]
            values += [torch.tensor(float(totals.count), device=device), torch.tensor(float(totals.examples), device=device)]
        reduced = all_reduce(torch.stack(values)).tolist()
        grad_norm = float(torch.stack(self._grad_norms).mean()) if self._grad_norms else float("nan")

        now = time.perf_counter()
        elapsed = max(now - self._last_log_time, 1e-9)
        by_task: dict[str, dict[str, float]] = {}
        for (task, key), value in zip(layout, reduced):
            by_task.setdefault(task, {})[key] = value
        metrics: dict[str, float] = {}
        total_loss = total_count = total_examples = 0.0
        for task, sums in by_task.items():
            count = sums.pop("#count")
            examples = sums.pop("#examples")
            for key, value in sums.items():
                metrics[f"{task}/{key}"] = value if key.startswith("n_") else value / count
            metrics[f"{task}/micro_batches"] = count
            metrics[f"{task}/examples_per_s"] = examples / elapsed
            total_loss += sums["loss"]
            total_count += count
            total_examples += examples
        metrics["loss"] = total_loss / total_count
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["grad_norm"] = grad_norm
        metrics["examples_per_s"] = total_examples / elapsed
        metrics["interval_s"] = elapsed
        if self.precision.scaler is not None:
            metrics["loss_scale"] = self.precision.scaler.get_scale()
            metrics["skipped_updates"] = self._skipped
        self.metrics.log(self.step, metrics, "train")
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        self._totals.clear()
        self._grad_norms.clear()
        self._last_log_time = now
        return metrics

    def log(self, metrics: Mapping[str, Any], split: str) -> None:
        """Log already-reduced metrics (e.g. validation) at the current step, rank 0 only."""
        self.metrics.log(self.step, metrics, split)
        self.metrics.flush()

    # ------------------------------------------------------------ state

    def save_state(self) -> Path:
        """Write the resume state of the current step (every rank must call this).

        Returns:
            The state file's path.
        """
        rng_states = all_gather_object(capture_rng_state())
        path = state_path(self.output_dir, self.step)
        if self.env.is_main:
            state = {
                "format": STATE_FORMAT,
                "format_version": STATE_FORMAT_VERSION,
                "step": self.step,
                "world_size": self.env.world_size,
                "model": unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "precision": self.precision.state_dict(),
                "rng": rng_states,
                "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()},
                "run_config": self.run_config,
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(state, path)
            self._prune_states()
            self.metrics.flush()
        barrier()
        return path

    def _prune_states(self) -> None:
        keep = self.cfg.keep_last
        if keep <= 0:
            return
        for old in list_states(self.output_dir)[:-keep]:
            old.unlink()

    def _load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Load a resume state into the bare model, optimizer, scheduler, scaler, stateful."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"{path} is not a training state of this project (format {state.get('format')!r})")
        if state["format_version"] > STATE_FORMAT_VERSION:
            raise DataError(f"{path} has state format {state['format_version']}; this code reads up to {STATE_FORMAT_VERSION}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])
        missing = sorted(set(self.stateful) - set(state["stateful"]))
        if missing:
            raise DataError(
                f"{path} has no state for {missing}: was it written by another script, or with "
                f"other datasets / tasks?"
            )
        for name, obj in self.stateful.items():
            obj.load_state_dict(state["stateful"][name])
        self.step = int(state["step"])
        _warn_config_changes(state.get("run_config", {}), self.run_config, path)
        rngs = state["rng"]
        if state["world_size"] != self.env.world_size:
            logger.warning(
                "%s was written by %d rank(s), this run has %d: data sharding and random streams "
                "differ, so the continuation is not step-for-step identical",
                path, state["world_size"], self.env.world_size,
            )
        logger.info("resumed from %s at step %d", path, self.step)
        return rngs[self.env.rank] if self.env.rank < len(rngs) else rngs[0]

    def close(self) -> None:
        """Flush logs and close the progress bar."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.metrics.close()


def _warn_config_changes(old: Mapping[str, Any], new: Mapping[str, Any], path: Any) -> None:
    changes = [
        f"{section}.{key}: {old_section.get(key)!r} -> {value!r}"
        for section, new_section in new.items()
        if isinstance(new_section, Mapping) and isinstance(old_section := old.get(section, {}), Mapping)
        for key, value in new_section.items()
        if old_section.get(key) != value
    ]
    if changes:
        logger.warning("resuming %s with a changed config: %s", path, "; ".join(changes))
