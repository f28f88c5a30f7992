"""Exact top-k search (`utils.search.topk`): torch path always, Triton kernel under its interpreter.

Every result is checked against a float64 brute force on the same (rounded) inputs: the
scores must be the k largest, the indices must point at keys with those scores, and no index
may repeat. The Triton kernel runs in a subprocess with `TRITON_INTERPRET=1` (the flag is read
when the kernel is defined, so it cannot be switched on inside this process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import check_topk
from utils.search.topk import (
    MAX_TRITON_K,
    TopKConfig,
    default_config,
    fused_topk,
    resolve_backend,
    topk_dense,
    triton_available,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "num_q, num_keys, dim, k, block",
    [(7, 300, 32, 10, 1 << 20), (33, 1000, 48, 7, 500), (5, 97, 16, 13, 40), (1, 10, 8, 3, 1)],
)
def test_torch_chunked_matches_brute_force(num_q: int, num_keys: int, dim: int, k: int, block: int) -> None:
    gen = torch.Generator().manual_seed(num_q * 1000 + num_keys)
    queries = torch.randn(num_q, dim, generator=gen)
    keys = torch.randn(num_keys, dim, generator=gen)
    vals, idx = fused_topk(queries, keys, k, backend="torch", max_block_elements=block)
    check_topk(queries, keys, k, vals, idx, tol=1e-4)
    dense_vals, dense_idx = topk_dense(queries, keys, k)
    torch.testing.assert_close(vals, dense_vals)
    assert torch.equal(idx, dense_idx)


def test_k_larger_than_keys_is_never_padded() -> None:
    queries, keys = torch.randn(4, 16), torch.randn(6, 16)
    vals, idx = fused_topk(queries, keys, 50)
    assert vals.shape == (4, 6)
    assert all(sorted(row.tolist()) == list(range(6)) for row in idx)
    check_topk(queries, keys, 50, vals, idx, tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keys_score_in_fp32(dtype: torch.dtype) -> None:
    queries = torch.randn(9, 64)
    keys = torch.randn(400, 64).to(dtype)
    vals, idx = fused_topk(queries, keys, 10, max_block_elements=9 * 64)
    check_topk(queries, keys, 10, vals, idx, tol=1e-3)


def test_empty_inputs_and_errors() -> None:
    vals, idx = fused_topk(torch.randn(0, 8), torch.randn(5, 8), 3)
    assert vals.shape == idx.shape == (0, 3)
    vals, idx = fused_topk(torch.randn(2, 8), torch.randn(0, 8), 3)
    assert vals.shape == idx.shape == (2, 0)
    with pytest.raises(ValueError, match="dimension mismatch"):
        fused_topk(torch.randn(2, 8), torch.randn(5, 7), 3)
    with pytest.raises(ValueError, match="positive int"):
        fused_topk(torch.randn(2, 8), torch.randn(5, 8), 0)
    with pytest.raises(ValueError, match="backend"):
        fused_topk(torch.randn(2, 8), torch.randn(5, 8), 1, backend="cuda")


def test_auto_backend_is_torch_on_cpu() -> None:
    assert resolve_backend("auto", torch.device("cpu"), 10) == "torch"
    assert resolve_backend("triton", torch.device("cpu"), 10) == "triton"


def test_default_config_shapes() -> None:
    cpu = torch.device("cpu")
    small = default_config(1, 1_000_000, 768, 10, cpu)
    large = default_config(1024, 1_000_000, 768, 10, cpu)
    assert small.block_q == 16 and large.block_q == 128
    assert default_config(1024, 1000, 768, 100, cpu).block_q == 64
    for cfg in (small, large):
        assert cfg.num_splits >= 1 and cfg.block_d <= 768


# Runs in a subprocess under TRITON_INTERPRET=1; prints one JSON line of case results.
_TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from tests.helpers import check_topk
    from utils.search.topk import TopKConfig, fused_topk, topk_triton

    cases = [
        # name, Q, N, D, k, dtype, config (None = default_config), key row stride padding
        ("fp32 ragged blocks", 33, 1000, 48, 7, torch.float32, TopKConfig(16, 32, 16, 3, 4, 1), 0),
        ("fp16", 20, 700, 64, 10, torch.float16, TopKConfig(16, 64, 32, 2, 4, 1), 0),
        ("bf16", 18, 650, 64, 10, torch.bfloat16, TopKConfig(32, 64, 64, 4, 4, 1), 0),
        ("k > N", 3, 20, 16, 50, torch.float32, None, 0),
        ("k not a power of two, one split", 17, 517, 64, 13, torch.float32, TopKConfig(16, 64, 16, 1, 4, 1), 0),
        ("strided keys", 5, 300, 32, 10, torch.float32, TopKConfig(16, 32, 32, 5, 4, 1), 8),
        ("split smaller than k", 4, 100, 16, 20, torch.float32, TopKConfig(16, 16, 16, 16, 4, 1), 0),
    ]
    results = {}
    for seed, (name, q, n, d, k, dtype, cfg, pad) in enumerate(cases):
        gen = torch.Generator().manual_seed(1234 + seed)
        queries = torch.randn(q, d, generator=gen).to(dtype)
        keys = torch.randn(n, d + pad, generator=gen).to(dtype)[:, :d]
        tol = 1e-4 if dtype == torch.float32 else 2e-3
        try:
            vals, idx = topk_triton(queries, keys, k, cfg)
            check_topk(queries, keys, k, vals, idx, tol)
            results[name] = "ok"
        except Exception as err:
            results[name] = f"{type(err).__name__}: {err}"
    vals, idx = fused_topk(torch.randn(3, 16), torch.randn(40, 16), 5, backend="triton")
    results["public entry point"] = "ok" if vals.shape == (3, 5) else f"shape {tuple(vals.shape)}"
    print(json.dumps(results))
    """
)


@pytest.mark.skipif(
    not triton_available(),
    reason="triton is not installed: `pip install triton` (CPU wheels work) to check the "
    "fused kernel under TRITON_INTERPRET=1",
)
def test_triton_kernel_under_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT, str(REPO)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {name: msg for name, msg in results.items() if msg != "ok"}
    assert not failed, failed


def test_triton_k_limit_is_reported() -> None:
    if not triton_available():
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match="at most"):
        fused_topk(torch.randn(2, 16), torch.randn(1000, 16), MAX_TRITON_K + 1, backend="triton")


def test_topk_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        TopKConfig().block_q = 8  # type: ignore[misc]


@pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()),
    reason="needs a CUDA GPU and triton (the compiled kernel; the interpreter test covers CPU)",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_q, num_keys, k", [(1, 100_003, 10), (300, 50_000, 10), (64, 20_000, 100)])
def test_triton_kernel_on_cuda(dtype: torch.dtype, num_q: int, num_keys: int, k: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(num_q + num_keys + k)
    queries = torch.randn(num_q, 256, device="cuda", generator=gen).to(dtype)
    keys = torch.randn(num_keys, 256, device="cuda", generator=gen).to(dtype)
    vals, idx = fused_topk(queries, keys, k)
    check_topk(queries.cpu(), keys.cpu(), k, vals.cpu(), idx.cpu(), tol=1e-3 if dtype == torch.float32 else 5e-3)
