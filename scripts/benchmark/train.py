"""Sections `train` (the CMR / `itm` step) and `pretrain` (VMLM, MRFR, MRC-kl steps):
plain vs fast training steps, samples/s, memory, MFU and the numerical check."""
from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import torch

from scripts.benchmark.context import Context, Row
from scripts.benchmark.flops import task_forward_flops
from scripts.benchmark.measure import (
    peak_memory_gib,
    rel_err,
    reset_peak_memory,
    time_fn,
)
from scripts.benchmark.models import build_pretrain_model

PRETRAIN_TASKS = ("mlm", "mrfr", "mrckl")


def make_optimizer(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    """AdamW of the paper (betas 0.9/0.98, decay 0.01 off biases and norms)."""
    from optim.optimizer import split_decay_groups

    decay, no_decay = split_decay_groups(model)
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"lr": 5e-5, "betas": (0.9, 0.98)}
    if fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = False
    return torch.optim.AdamW(groups, **kwargs)


def _to_double(batch: Any) -> Any:
    """The batch with every floating-point tensor in float64 (for the exact-arithmetic check)."""
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_double(v) for k, v in batch.items()}
    return batch


def _train_check(ctx: Context, model: torch.nn.Module, task: str, batch: dict[str, Any]) -> tuple[str, bool]:
    """Fast vs plain training step on one batch, dropout off.

    Gradients are compared in float64 on a copy of the model: at random initialisation many
    gradients come out of near-cancelling sums (the key biases' are exactly zero in exact
    arithmetic), so a float32 or bf16 comparison mostly measures that cancellation; float64
    shows whether the two paths compute the same function. The loss is also compared under
    the run's precision (bf16 autocast on CUDA).
    """
    import copy

    from model.packed import use_execution

    model.eval()
    losses = []
    with torch.no_grad(), ctx.autocast():
        for execution in ("padded", "packed"):
            with use_execution(model, execution):
                losses.append(model(batch, task)["loss"].float())
    exact = copy.deepcopy(model).double()
    batch64 = _to_double(batch)
    grads = []
    for execution in ("padded", "packed"):
        exact.zero_grad(set_to_none=True)
        with use_execution(exact, execution):
            out = exact(batch64, task)
        out["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in exact.parameters() if p.grad is not None]))
    loss_err, grad_err = rel_err(losses[1], losses[0]), rel_err(grads[1], grads[0])
    ok = loss_err <= ctx.rel_tol and grad_err <= 1e-8
    return f"loss rel {loss_err:.1e}, grad rel (fp64) {grad_err:.1e}", ok


def _time_train_steps(ctx: Context, model: torch.nn.Module, task: str, batches: list[dict[str, Any]], fast: bool) -> dict[str, float]:
    """Time full training steps (forward, backward, clip, AdamW) rotating over `batches`.

    Both call the model's own forward: the fast variant with `execution="packed"` and, on
    CUDA, fused AdamW; the plain one with `execution="padded"` and the for-loop AdamW.
    """
    from model.packed import use_execution

    opt = make_optimizer(model, fused=fast and ctx.device.type == "cuda")
    counter = iter(range(10**12))

    def step() -> None:
        batch = batches[next(counter) % len(batches)]
        with ctx.autocast():
            out = model(batch, task)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with use_execution(model, "packed" if fast else "padded"):
        return time_fn(step, ctx.device, ctx.sizes.warmup, ctx.sizes.steps)


def _train_rows(ctx: Context, task: str, section: str) -> None:
    """Plain vs fast training step of one task: samples/s, memory, MFU, numerical check."""
    from scripts.benchmark.batches import batch_to, task_batch

    s = ctx.sizes
    rng = np.random.default_rng(ctx.seed)
    batches = [batch_to(task_batch(task, s.batch, s.vocab, s.num_bb, rng, s.img_dim, s.max_txt_len), ctx.device)
               for _ in range(min(3, s.steps))]
    model = build_pretrain_model(ctx)

    check, ok = _train_check(ctx, model, task, batches[0])
    model.train()
    model.zero_grad(set_to_none=True)

    results = {}
    for variant in ("plain", "fast"):
        reset_peak_memory(ctx.device)
        t = _time_train_steps(ctx, model, task, batches, fast=variant == "fast")
        results[variant] = (t, peak_memory_gib(ctx.device))

    flops_real = 3 * statistics.mean(task_forward_flops(task, b, s) for b in batches)
    flops_padded = 3 * statistics.mean(task_forward_flops(task, b, s, padded=True) for b in batches)
    plain_t, plain_mem = results["plain"]
    fast_t, fast_mem = results["fast"]
    plain_sps = s.batch / plain_t["median_s"]
    fast_sps = s.batch / fast_t["median_s"]
    mean_tokens = float(np.mean([float(b["txt"]["attention_mask"].sum()) / s.batch for b in batches]))
    for variant, sps, t, mem in (("plain", plain_sps, plain_t, plain_mem), ("fast", fast_sps, fast_t, fast_mem)):
        extra = {"step_ms": t["median_s"] * 1e3, "peak_mem_gib": mem, "achieved_tflops": flops_real / t["median_s"] / 1e12,
                 "mean_caption_tokens": mean_tokens, "execution": "packed" if variant == "fast" else "padded"}
        if ctx.peak_flops:
            extra["mfu"] = flops_real / t["median_s"] / ctx.peak_flops
            if variant == "plain":
                extra["mfu_padded"] = flops_padded / t["median_s"] / ctx.peak_flops
        ctx.add(Row(section, f"{task} {variant}", sps, "samples/s",
                    baseline=plain_sps if variant == "fast" else None,
                    ratio=sps / plain_sps if variant == "fast" else None,
                    check=check if variant == "fast" else "", ok=ok if variant == "fast" else None,
                    extra=extra))
    if task == "itm":
        ctx.train_samples_per_s = fast_sps


def section_train(ctx: Context) -> None:
    """CMR (itm) fine-tuning / pre-training step at batch `sizes.batch`."""
    _train_rows(ctx, "itm", "train")


def section_pretrain(ctx: Context) -> None:
    """One pre-training step of each other task (VMLM, MRFR, MRC-kl)."""
    for task in PRETRAIN_TASKS:
        _train_rows(ctx, task, "pretrain")
