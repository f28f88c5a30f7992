"""Section `peak`: the measured ceilings every MFU and floor figure is relative to."""
from __future__ import annotations

import torch

from scripts.benchmark.context import Context, Row
from scripts.benchmark.measure import time_fn


def section_peak(ctx: Context) -> None:
    """Measured ceilings: a large matmul (bf16 on CUDA, fp32 on CPU) and a device copy."""
    n = ctx.sizes.peak_n
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    a = torch.randn(n, n, device=ctx.device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype, generator=gen)
    t = time_fn(lambda: a @ b, ctx.device, warmup=3, repeat=10)
    ctx.peak_flops = 2.0 * n**3 / t["median_s"]
    ctx.add(Row("peak", f"matmul {n}^3 {str(dtype).split('.')[-1]}", ctx.peak_flops / 1e12, "TFLOP/s"))
    elems = (1 << 28) if ctx.device.type == "cuda" else (1 << 24)
    src = torch.randn(elems, device=ctx.device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), ctx.device, warmup=2, repeat=10)
    ctx.peak_bandwidth = 2.0 * src.numel() * src.element_size() / t["median_s"]
    ctx.add(Row("peak", "copy (read + write)", ctx.peak_bandwidth / 1e9, "GB/s"))
