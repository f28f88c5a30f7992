"""Triton kernel: inner products fused with a running top-k (exact maximum inner-product search).

Imported only by `utils.search.topk` when Triton is needed, so that the rest of the project
never imports `triton` (it ships with CUDA builds of torch and is no core dependency).

Each program owns BLOCK_Q queries and one contiguous split of the keys. It streams the split
in tiles of BLOCK_N keys, computes the (BLOCK_Q, BLOCK_N) score tile with `tl.dot` (fp32
accumulation), and keeps a per-query list of the K best (score, index) pairs in registers.
Only the (Q, splits, K) candidate lists reach device memory; `utils.search.topk` merges the
splits with one small `torch.topk`. The full Q x N score matrix is never materialised.

Running top-k update, per tile: a query's tile can only matter when its best score beats the
smallest entry of its list (the threshold), which after the first few tiles almost never
happens (about K * ln(n / K) insertions over n keys). So the common path costs one row-max
per tile, and the rare path extracts the tile maximum, overwrites the list minimum and
repeats until no query of the block has a tile score above its threshold (at most K rounds).
Everything is element-wise on 2-D tiles: no sort, no dynamic indexing of registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fused_topk_kernel(
    q_ptr,
    k_ptr,
    out_val_ptr,
    out_idx_ptr,
    num_q,
    num_keys,
    dim,
    keys_per_split,
    stride_qm,
    stride_qd,
    stride_kn,
    stride_kd,
    stride_oq,
    stride_os,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = offs_q < num_q
    split_start = pid_s * keys_per_split
    split_end = tl.minimum(split_start + keys_per_split, num_keys)

    slot = tl.arange(0, K_PAD)
    tile_col = tl.arange(0, BLOCK_N)
    # Slots K..K_PAD-1 only exist because Triton shapes are powers of two: +inf keeps them
    # out of the minimum, so they are never overwritten and the threshold ignores them.
    top_val = tl.where(slot[None, :] < K, float("-inf"), float("inf")) + tl.zeros(
        (BLOCK_Q, K_PAD), dtype=tl.float32
    )
    top_idx = tl.full((BLOCK_Q, K_PAD), -1, dtype=tl.int32)
    q_rows = q_ptr + offs_q.to(tl.int64)[:, None] * stride_qm

    for n0 in range(split_start, split_end, BLOCK_N):
        offs_n = n0 + tile_col
        n_valid = offs_n < split_end
        k_rows = k_ptr + offs_n.to(tl.int64)[:, None] * stride_kn
        acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_valid = offs_d < dim
            q_tile = tl.load(
                q_rows + offs_d[None, :] * stride_qd,
                mask=q_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            k_tile = tl.load(
                k_rows + offs_d[None, :] * stride_kd,
                mask=n_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            if UPCAST:
                q_tile = q_tile.to(tl.float32)
                k_tile = k_tile.to(tl.float32)
            if IEEE_FP32 or UPCAST:
                acc = tl.dot(q_tile, tl.trans(k_tile), acc, input_precision="ieee")
            else:
                acc = tl.dot(q_tile, tl.trans(k_tile), acc)
        acc = tl.where(n_valid[None, :], acc, float("-inf"))

        threshold = tl.min(top_val, axis=1)
        row_best = tl.max(acc, axis=1)
        while tl.max((row_best > threshold).to(tl.int32), axis=0) > 0:
            insert = row_best > threshold
            best_col = tl.argmax(acc, axis=1)
            victim = tl.argmin(top_val, axis=1)
            hit = (slot[None, :] == victim[:, None]) & insert[:, None]
            top_val = tl.where(hit, row_best[:, None], top_val)
            top_idx = tl.where(hit, (n0 + best_col)[:, None], top_idx)
            acc = tl.where(tile_col[None, :] == best_col[:, None], float("-inf"), acc)
            threshold = tl.min(top_val, axis=1)
            row_best = tl.max(acc, axis=1)

    out_offs = offs_q.to(tl.int64)[:, None] * stride_oq + pid_s * stride_os + slot[None, :]
    out_mask = q_valid[:, None] & (slot[None, :] < K)
    tl.store(out_val_ptr + out_offs, top_val, mask=out_mask)
    tl.store(out_idx_ptr + out_offs, top_idx, mask=out_mask)


def launch_fused_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    block_q: int,
    block_n: int,
    block_d: int,
    num_splits: int,
    num_warps: int,
    num_stages: int,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel; returns per-split candidates (Q, splits, k) scores (fp32) and indices.

    Unused candidate slots (a split with fewer than k keys) hold score -inf and index -1.
    Arguments are validated by the caller (`utils.search.topk.fused_topk`). `upcast` converts
    the tiles to fp32 before `tl.dot`: Triton's CPU interpreter (3.9) multiplies bf16 tiles
    as raw integers, so the tests need it there; on a GPU it would only slow the kernel.
    """
    num_q, dim = queries.shape
    num_keys = keys.shape[0]
    keys_per_split = triton.cdiv(triton.cdiv(num_keys, num_splits), block_n) * block_n
    num_splits = triton.cdiv(num_keys, keys_per_split)
    out_val = torch.empty((num_q, num_splits, k), dtype=torch.float32, device=queries.device)
    out_idx = torch.empty((num_q, num_splits, k), dtype=torch.int32, device=queries.device)
    grid = (triton.cdiv(num_q, block_q), num_splits)
    _fused_topk_kernel[grid](
        queries,
        keys,
        out_val,
        out_idx,
        num_q,
        num_keys,
        dim,
        keys_per_split,
        queries.stride(0),
        queries.stride(1),
        keys.stride(0),
        keys.stride(1),
        out_val.stride(0),
        out_val.stride(1),
        K=k,
        K_PAD=triton.next_power_of_2(k),
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        IEEE_FP32=queries.dtype == torch.float32,
        UPCAST=upcast,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out_val, out_idx
