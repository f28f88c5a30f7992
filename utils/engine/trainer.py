"""The training loop's optimizer steps and the resume state shared by every training script.

Nothing here knows which model it trains: a script hands the `Trainer` a model, an optimizer,
a scheduler and a `compute_loss(model, batch, task) -> {"loss": ..., other scalars}` function,
and gets back step accounting with gradient accumulation, mixed precision, clipping, a
NaN/inf guard, reduced metrics, logging, and training states that resume exactly.

Exact resume rests on three rules:

* every batch is a pure function of (seed, rank, epoch, position): the samplers' order
  depends only on (seed, epoch), the datasets draw masks from (seed, epoch, example index),
  and `utils.engine.loader.ResumableLoader` restarts a sampler at the position the loop had
  consumed;
* nothing but the model's forward consumes the global RNGs between two checkpoints (data
  loaders use their own generators), and their states are saved per rank;
* model, optimizer, scheduler, loss scaler and every registered stateful object (loader
  positions, mined hard negatives, best score) are saved together, atomically, in one
  `STATE_FORMAT` file under the run directory's `train_state/` (`utils/engine/run_dir.py`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

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
from utils.engine.loader import Batch, batch_ids, count_examples, to_device
from utils.engine.metrics_log import MetricsLogger
from utils.engine.run_dir import list_states, state_path
from utils.errors import DataError
from utils.files import atomic_torch_save
from utils.precision import Precision
from utils.progress import ProgressBar, progress
from utils.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Batch, str], Mapping[str, torch.Tensor]]

STATE_FORMAT = "lightningdot-train-state"
STATE_FORMAT_VERSION = 1


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


class Stateful(Protocol):
    """Anything whose state goes into a training checkpoint."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


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
        output_dir: the run directory (`utils.engine.run_dir.prepare_output_dir` prepared it).
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
        self._progress: ProgressBar | None = progress(
            # The run directory's name tells apart the bars of runs sharing a terminal or a log.
            total=total_steps, initial=self.step, desc=f"train {self.output_dir.name}", disable=not env.is_main
        )
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
