"""Timing, peak memory and the numerical comparisons of fast paths against their baselines."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> dict[str, float]:
    """Median / min seconds of `fn` over `repeat` runs after `warmup` runs.

    CUDA work is timed with events around each run (asynchronous launches included);
    CPU work with the wall clock.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeat)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeat": len(times)}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset, in GiB; None on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64 (METHOD.md's comparison)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def recall_vs(ref_idx: torch.Tensor, idx: torch.Tensor) -> float:
    """Mean fraction of the reference top-k ids found in the candidate top-k."""
    ref_np, got_np = ref_idx.cpu().numpy(), idx.cpu().numpy()
    hits = [len(set(r.tolist()) & set(g.tolist())) / max(1, len(r)) for r, g in zip(ref_np, got_np)]
    return float(np.mean(hits)) if hits else 1.0
