"""Section `search`: exact top-k over N keys, the dense baseline against the chunked torch
path, `exact_topk` and the fused Triton kernel."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from scripts.benchmark.context import Context, Row
from scripts.benchmark.measure import recall_vs, time_fn


def _search_dtype(device: torch.device) -> torch.dtype:
    # bf16 embeddings on a GPU (the index a real deployment keeps); fp32 on CPU, where half
    # precision GEMMs are emulated and would only measure the emulation.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _triton_sweep(ctx: Context, q: torch.Tensor, keys: torch.Tensor) -> list[Any]:
    """Kernel configurations to time on a GPU: the default plus a small grid around it."""
    from utils.search.topk import TopKConfig, default_config

    base = default_config(q.shape[0], keys.shape[0], keys.shape[1], ctx.sizes.k, ctx.device)
    if not ctx.triton_configs:
        return [base]
    configs = {base}
    for block_q in (16, 32, 64, 128):
        if block_q > max(16, 2 * q.shape[0]):
            continue
        for block_n in (64, 128):
            for block_d in (64, 128):
                for warps in (4, 8):
                    splits = max(1, base.num_splits * base.block_q // block_q)
                    configs.add(TopKConfig(block_q, block_n, block_d, splits, warps, 3))
    return sorted(configs, key=lambda c: dataclasses.astuple(c))


def section_search(ctx: Context) -> None:
    """Exact top-k over N keys: full matrix + topk (baseline), torch chunks, fused kernel."""
    from utils.search.topk import (
        exact_topk,
        fused_topk,
        resolve_backend,
        topk_dense,
        topk_triton,
    )

    s = ctx.sizes
    dtype = _search_dtype(ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 2)
    keys = torch.randn(s.search_n, s.search_dim, device=ctx.device, generator=gen).to(dtype)
    use_triton = resolve_backend("auto", ctx.device, s.k) == "triton"
    for num_q in s.search_queries:
        q = torch.randn(num_q, s.search_dim, device=ctx.device, generator=gen).to(dtype)
        ref_val, ref_idx = topk_dense(q, keys, s.k)
        floor_s = None
        if ctx.peak_flops and ctx.peak_bandwidth:
            floor_s = max(2.0 * num_q * s.search_n * s.search_dim / ctx.peak_flops,
                          keys.numel() * keys.element_size() / ctx.peak_bandwidth)
        t_base = time_fn(lambda q=q: topk_dense(q, keys, s.k), ctx.device, 2, max(3, s.steps))
        base_ms = t_base["median_s"] * 1e3
        ctx.add(Row("search", f"Q={num_q} dense+topk ms", base_ms, "ms",
                    extra={"floor_ms": floor_s * 1e3 if floor_s else None,
                           "score_matrix_gib": num_q * s.search_n * 4 / 2**30}))
        t_mm = time_fn(lambda q=q: q @ keys.t(), ctx.device, 2, max(3, s.steps))
        ctx.add(Row("search", f"Q={num_q} matmul only ms", t_mm["median_s"] * 1e3, "ms", baseline=base_ms,
                    ratio=base_ms / (t_mm["median_s"] * 1e3)))
        variants: list[tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]] = [
            ("torch chunked", lambda q=q: fused_topk(q, keys, s.k, backend="torch")),
            ("utils.search.topk.exact_topk", lambda q=q: exact_topk(q, keys, s.k)),
        ]
        if use_triton:
            for cfg in _triton_sweep(ctx, q, keys):
                variants.append(
                    (f"fused {dataclasses.astuple(cfg)}", lambda q=q, cfg=cfg: topk_triton(q, keys, s.k, cfg))
                )
        best_fused: tuple[float, str] | None = None
        for name, fn in variants:
            try:
                val, idx = fn()
            except Exception as err:
                # A kernel configuration may not compile on this GPU (shared memory, registers).
                if not name.startswith("fused"):
                    raise
                ctx.add(Row("search", f"Q={num_q} {name} ms", None, "ms", check=f"not run: {type(err).__name__}: {err}"[:160]))
                continue
            recall = recall_vs(ref_idx, idx)
            score_err = float((val - ref_val).abs().max() / ref_val.abs().max().clamp_min(1e-30))
            # Scores agree to fp32 accumulation-order rounding; a near tie may swap an id.
            ok = recall >= 0.99 and score_err <= 1e-4
            check = f"recall {recall:.4f}, max |ds|/|s| {score_err:.1e}"
            t = time_fn(fn, ctx.device, 2, max(3, s.steps))
            ms = t["median_s"] * 1e3
            if name.startswith("fused") and (best_fused is None or ms < best_fused[0]):
                best_fused = (ms, name)
            ctx.add(Row("search", f"Q={num_q} {name} ms", ms, "ms", baseline=base_ms, ratio=base_ms / ms,
                        check=check, ok=ok))
        if best_fused is not None:
            ctx.add(Row("search", f"Q={num_q} fused ms", best_fused[0], "ms", baseline=base_ms,
                        ratio=base_ms / best_fused[0], extra={"config": best_fused[1]}))
        else:
            ctx.add(Row("search", f"Q={num_q} fused ms", None, "ms",
                        check="not run: needs CUDA and triton (torch fallback timed above)"))
