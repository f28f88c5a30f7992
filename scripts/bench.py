"""Benchmark of training, encoding, search, re-ranking and data loading on the current device.

    python scripts/bench.py --quick                 # tiny sizes: a CPU smoke check, < 60 s
    python scripts/bench.py --out bench.json        # paper sizes, meant for one H100
    python scripts/bench.py --sections search,ann   # a subset (each section stands alone)
    python scripts/bench.py --sections serve        # inference.py serve: query latency, 32 clients x 20 s

Every figure is measured twice in the same run: on the straightforward implementation
(`transformers` BertModel with SDPA, bf16 autocast on CUDA, batches padded to their longest
row, full score matrix + `torch.topk`, non-fused AdamW) and on the fast path (`utils/search/topk.py`,
fused AdamW). Model figures run the product code path through the public model API: the same
model instance with `execution="padded"` (the "plain" rows) and with `execution="packed"`
(the "fast" rows: the models' default, `model/packed.py`). Each fast path is also checked
numerically against the plain path on the same inputs, and the check is in the table. Inputs and weights are random (shapes as in the paper); only the data-loader and
end-to-end evaluation sections write a small synthetic LMDB (txt_db + img_db) to a temp dir.

MFU counts the FLOPs the model needs on REAL tokens (padding excluded; the last layer of a
tower counted for its [CLS] row only, the only row its output uses; backward = 2x forward)
against the measured peak of a large bf16 matmul (fp32 on CPU, where the figure is only an
achieved-FLOP/s smoke check). The baseline also gets `mfu_padded`: the FLOPs it executes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from utils.errors import run_cli
from utils.region_features import NUM_LABELS

logger = logging.getLogger("bench")

SECTIONS = ("peak", "train", "pretrain", "encode", "search", "ann", "cascade", "cross", "eval", "loader", "serve")
PRETRAIN_TASKS = ("mlm", "mrfr", "mrckl")
# Targets of issue 7 on one H100, printed next to the measured figures.
TARGETS = {
    "train/itm fast mfu": ">= 0.40",
    "encode/text fast mfu": ">= 0.40",
    "encode/image fast mfu": ">= 0.40",
    "search/Q=1024 fused ms": "<= 3.0",
    "search/Q=1 fused ms": "<= 0.6",
    "eval/biencoder e2e s": "< 0.3",
    "eval/speedup vs cross": ">= 1000",
    "loader/ratio to train": ">= 2",
    # Issue 14, on a 2-core CPU (demo-sized index, encode + search, after warm-up).
    "serve/query p50 ms": "< 30 (2-core CPU)",
    "serve/load errors": "0",
    # Issue 12 (HiVLP cascade), on a CPU at N = 1M: speed-up over flat exact search at Q = 64
    # and 1024 with recall@10 within 0.5 points of it.
    "cascade/Q=64 3-level 128:1000": ">= 3x, R@10 >= 99.5 (CPU)",
    "cascade/Q=1024 3-level 128:1000": ">= 3x, R@10 >= 99.5 (CPU)",
    "cascade/Q=64 ivfflat 1024/256 128:1000": ">= 3x, R@10 >= 99.5 (CPU)",
    "cascade/Q=1024 ivfflat 1024/256 128:1000": ">= 3x, R@10 >= 99.5 (CPU)",
}
# Cascades of the `cascade` section: (dim, keep) per stage, dims for a 768-d full embedding.
# The first is the example; on the power-law vectors below its 64-d stage loses a
# few of the true top-10 at N = 1M (docs/benchmarks.md), the others keep more or start wider.
CASCADES = {
    "3-level 64:1000": ((64, 1000), (256, 100), (768, 20)),
    "3-level 128:1000": ((128, 1000), (256, 200), (768, 20)),
    "2-level 128:1000": ((128, 1000), (768, 20)),
}
# Cascades whose first stage is an IVF-Flat index over the first level instead of a scan of
# every row: name -> (nlist, nprobe, stages), nlist / nprobe for N = 1M (scaled with N,
# keeping the probed fraction). On the vectors below (no cluster structure) about 20-25% of
# the lists must be probed to keep 99.5% of the true top-10 (docs/benchmarks.md).
IVF_CASCADES = {
    "ivfflat 1024/205 128:1000": (1024, 205, ((128, 1000), (256, 200), (768, 20))),
    "ivfflat 1024/256 128:1000": (1024, 256, ((128, 1000), (256, 200), (768, 20))),
}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one benchmark mode."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    project_dim: int
    batch: int
    num_bb: int
    img_dim: int
    max_txt_len: int
    encode_txt_batch: int
    encode_img_batch: int
    search_n: int
    search_dim: int
    search_queries: tuple[int, ...]
    k: int
    ann_n: int
    ann_queries: int
    cross_batch: int
    eval_images: int
    captions_per_image: int
    loader_images: int
    warmup: int
    steps: int
    peak_n: int
    # The cascade section: corpus size and full embedding size.
    cascade_n: int = 20_000
    cascade_dim: int = 768
    # Variance of coordinate j of the cascade's vectors: (j+1)^-decay.
    cascade_decay: float = 1.0


QUICK = Sizes(
    hidden=64, layers=2, heads=2, intermediate=128, vocab=1000, project_dim=64, batch=16,
    num_bb=36, img_dim=2048, max_txt_len=60, encode_txt_batch=64, encode_img_batch=32,
    search_n=20_000, search_dim=64, search_queries=(1, 64, 1024), k=10, ann_n=20_000,
    ann_queries=256, cross_batch=32, eval_images=100, captions_per_image=5, loader_images=128,
    warmup=1, steps=2, peak_n=512,
)
# Paper sizes: BERT-base towers (bert-base-cased vocabulary), 768-d projection, CMR batch 256.
FULL = Sizes(
    hidden=768, layers=12, heads=12, intermediate=3072, vocab=28996, project_dim=768, batch=256,
    num_bb=36, img_dim=2048, max_txt_len=60, encode_txt_batch=1024, encode_img_batch=512,
    search_n=1_000_000, search_dim=768, search_queries=(1, 64, 1024), k=10, ann_n=1_000_000,
    ann_queries=1024, cross_batch=256, eval_images=1000, captions_per_image=5,
    loader_images=2048, warmup=3, steps=10, peak_n=8192, cascade_n=1_000_000,
)


@dataclass
class Row:
    """One line of the result table."""

    section: str
    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    check: str = ""
    ok: bool | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass
class Context:
    """What every section needs: device, precision, sizes, the measured peaks, the rows."""

    device: torch.device
    sizes: Sizes
    autocast_dtype: torch.dtype | None
    seed: int
    rows: list[Row]
    peak_flops: float | None = None
    peak_bandwidth: float | None = None
    train_samples_per_s: float | None = None
    workdir: str | None = None
    triton_configs: bool = False
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # section-specific options

    def autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        """The run's autocast; CUDA-graph capture needs `cache_enabled=False`."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=cache_enabled)

    @property
    def rel_tol(self) -> float:
        """Tolerance of a fast-vs-plain relative error at the run's precision (METHOD.md)."""
        return 1e-4 if self.autocast_dtype is None else 3e-2

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64 (METHOD.md's comparison)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- FLOPs


def encoder_flops(lengths: Sequence[int], hidden: int, intermediate: int, layers: int, cls_only_last: bool) -> float:
    """Forward FLOPs of a BERT encoder over sequences of the given real lengths.

    Per token and layer: Q, K, V, O projections (8 H^2), feed-forward (4 H I), and attention
    scores plus weighted sum (4 L H for a sequence of length L). With `cls_only_last`, the
    last layer computes K, V for every token but the rest for the [CLS] row alone.
    """
    lengths_arr = np.asarray(lengths, dtype=np.float64)
    dense = 8 * hidden**2 + 4 * hidden * intermediate
    full_layer = float(np.sum(lengths_arr * dense + 4 * lengths_arr**2 * hidden))
    if not cls_only_last or layers == 0:
        return layers * full_layer
    last = float(np.sum(lengths_arr * 4 * hidden**2 + 4 * hidden**2 + 4 * hidden * intermediate + 4 * lengths_arr * hidden))
    return (layers - 1) * full_layer + last


def projection_flops(rows: int, hidden: int, project_dim: int) -> float:
    return 0.0 if project_dim <= 0 else 2.0 * rows * (hidden * 2 * hidden + 2 * hidden * project_dim)


def text_tower_flops(lengths: Sequence[int], s: Sizes, cls_only_last: bool = True, project: bool = True) -> float:
    return encoder_flops(lengths, s.hidden, s.intermediate, s.layers, cls_only_last) + (
        projection_flops(len(lengths), s.hidden, s.project_dim) if project else 0.0
    )


def image_tower_flops(boxes: Sequence[int], s: Sizes, cls_only_last: bool = True, project: bool = True) -> float:
    boxes_arr = np.asarray(boxes, dtype=np.float64)
    embed = float(np.sum(boxes_arr)) * 2 * (s.img_dim * s.hidden + 7 * s.hidden)
    return embed + encoder_flops(boxes_arr + 1, s.hidden, s.intermediate, s.layers, cls_only_last) + (
        projection_flops(len(boxes), s.hidden, s.project_dim) if project else 0.0
    )


def task_forward_flops(task: str, batch: dict[str, Any], s: Sizes, padded: bool = False) -> float:
    """Forward FLOPs one pre-training task needs on this batch (padded: what is executed)."""
    txt_mask = batch["txt"]["attention_mask"]
    img_mask = batch["img"]["img_mask"]
    if padded:
        txt_lens = [txt_mask.shape[1]] * txt_mask.shape[0]
        boxes = [img_mask.shape[1]] * img_mask.shape[0]
    else:
        txt_lens = txt_mask.sum(1).tolist()
        boxes = img_mask.sum(1).tolist()
    cls_only = not padded
    if task == "itm":
        b = len(txt_lens)
        return (text_tower_flops(txt_lens, s, cls_only) + image_tower_flops(boxes, s, cls_only)
                + 2.0 * b * b * s.project_dim)
    if task == "mlm":
        masked = int((batch["txt_labels"] != -100).sum())
        head = 2.0 * masked * (s.hidden**2 + s.hidden * s.vocab)
        return (text_tower_flops(txt_lens, s, False, project=False)
                + image_tower_flops(boxes, s, cls_only, project=False) + head)
    masked = int(batch["img"]["img_masked"].sum())
    out_dim = s.img_dim if task == "mrfr" else NUM_LABELS
    head = 2.0 * masked * (s.hidden**2 + s.hidden * out_dim)
    return (text_tower_flops(txt_lens, s, cls_only, project=False)
            + image_tower_flops(boxes, s, False, project=False) + head)


# ----------------------------------------------------------------------------- models


def bert_config(s: Sizes) -> dict[str, Any]:
    return {
        "hidden_size": s.hidden, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "intermediate_size": s.intermediate, "vocab_size": s.vocab, "max_position_embeddings": 512,
        "type_vocab_size": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
    }


def build_pretrain_model(ctx: Context) -> torch.nn.Module:
    from model.biencoder import BiEncoderConfig
    from model.families import LIGHTNINGDOT
    from utils.pipeline.pretrain_tasks import pretrain_model

    torch.manual_seed(ctx.seed)
    cfg = bert_config(ctx.sizes)
    biencoder = LIGHTNINGDOT.build(BiEncoderConfig(cfg, dict(cfg), project_dim=ctx.sizes.project_dim, cls_concat="add"))
    return pretrain_model(biencoder).to(ctx.device)


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


# ----------------------------------------------------------------------------- sections


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
    from utils.pipeline.bench_batches import batch_to, task_batch

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


def section_encode(ctx: Context) -> None:
    """Caption and image encoding throughput (index building), padded vs packed, no grad."""
    from model.packed import FixedShapeEncoder, use_execution
    from utils.pipeline.bench_batches import batch_to, retrieval_batch

    s = ctx.sizes
    model = build_pretrain_model(ctx).bert.eval()
    rng = np.random.default_rng(ctx.seed + 1)
    txt = batch_to(retrieval_batch(s.encode_txt_batch, s.vocab, 1, rng, s.img_dim, s.max_txt_len)["txt"], ctx.device)
    img = batch_to(retrieval_batch(s.encode_img_batch, s.vocab, s.num_bb, rng, s.img_dim, s.max_txt_len)["img"], ctx.device)
    lengths = txt["attention_mask"].sum(1).tolist()
    boxes = img["img_mask"].sum(1).tolist()

    def plain_txt() -> torch.Tensor:
        with torch.no_grad(), ctx.autocast(), use_execution(model, "padded"):
            return model.encode_text(txt["input_ids"], txt["attention_mask"])

    def fast_txt() -> torch.Tensor:
        with torch.no_grad(), ctx.autocast(), use_execution(model, "packed"):
            return model.encode_text(txt["input_ids"], txt["attention_mask"])

    def plain_img() -> torch.Tensor:
        with torch.no_grad(), ctx.autocast(), use_execution(model, "padded"):
            return model.encode_image(img["img_feat"], img["img_pos"], img["img_mask"])

    def fast_img() -> torch.Tensor:
        with torch.no_grad(), ctx.autocast(), use_execution(model, "packed"):
            return model.encode_image(img["img_feat"], img["img_pos"], img["img_mask"])

    variants: list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor], float, int]] = [
        ("text", plain_txt, fast_txt, text_tower_flops(lengths, s), s.encode_txt_batch),
        ("image", plain_img, fast_img, image_tower_flops(boxes, s), s.encode_img_batch),
    ]
    if ctx.device.type == "cuda":
        # Fixed 36-box batches: the padded image encoder replayed as one CUDA graph (capture
        # needs fixed kernels; the packed path's token count depends on the data).
        graphed = FixedShapeEncoder(
            lambda f, p, m: plain_img_fn(model, ctx, f, p, m),
            shapes=[tuple(img["img_feat"].shape), tuple(img["img_pos"].shape), tuple(img["img_mask"].shape)],
            dtypes=[img["img_feat"].dtype, img["img_pos"].dtype, img["img_mask"].dtype],
            device=ctx.device,
        )
        variants.append(("image graphed", plain_img,
                         lambda: graphed(img["img_feat"], img["img_pos"], img["img_mask"]),
                         image_tower_flops(boxes, s, cls_only_last=True), s.encode_img_batch))
    for name, plain, fast, flops, rows in variants:
        want, got = plain(), fast()
        err = rel_err(got.float(), want.float())
        check, ok = f"rel {err:.1e}", err <= ctx.rel_tol
        t_plain = time_fn(plain, ctx.device, s.warmup, s.steps)
        t_fast = time_fn(fast, ctx.device, s.warmup, s.steps)
        for variant, t in (("plain", t_plain), ("fast", t_fast)):
            per_s = rows / t["median_s"]
            extra = {"batch": rows, "batch_ms": t["median_s"] * 1e3, "achieved_tflops": flops / t["median_s"] / 1e12}
            if ctx.peak_flops:
                extra["mfu"] = flops / t["median_s"] / ctx.peak_flops
            is_fast = variant == "fast"
            ctx.add(Row("encode", f"{name} {variant}", per_s, "items/s",
                        baseline=rows / t_plain["median_s"] if is_fast else None,
                        ratio=t_plain["median_s"] / t["median_s"] if is_fast else None,
                        check=check if is_fast else "", ok=ok if is_fast else None, extra=extra))


def plain_img_fn(model: torch.nn.Module, ctx: Context, feat: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The padded image encoder under the run's autocast (the body a CUDA graph records)."""
    from model.packed import use_execution

    with ctx.autocast(cache_enabled=False), use_execution(model, "padded"):
        return model.encode_image(feat, pos, mask)


def _search_dtype(device: torch.device) -> torch.dtype:
    # bf16 embeddings on a GPU (the index a real deployment keeps); fp32 on CPU, where half
    # precision GEMMs are emulated and would only measure the emulation.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _recall_vs(ref_idx: torch.Tensor, idx: torch.Tensor) -> float:
    """Mean fraction of the reference top-k ids found in the candidate top-k."""
    ref_np, got_np = ref_idx.cpu().numpy(), idx.cpu().numpy()
    hits = [len(set(r.tolist()) & set(g.tolist())) / max(1, len(r)) for r, g in zip(ref_np, got_np)]
    return float(np.mean(hits)) if hits else 1.0


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
            recall = _recall_vs(ref_idx, idx)
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


def clustered_vectors(n: int, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys around 1,000 centres and queries near random keys: some structure for ANN recall.

    Isotropic Gaussian keys have no neighbourhood structure, so approximate indexes would look
    far worse on them than on real embeddings.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((min(1000, n), dim), dtype=np.float32)
    keys = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    queries = keys[rng.integers(0, n, n_queries)] + 0.3 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    return keys, queries


def section_ann(ctx: Context) -> None:
    """faiss Flat / HNSW / IVF-PQ at N keys: build and search time, recall@k vs exact."""
    from utils.search.indexes import build_index
    from utils.search.topk import fused_topk

    s = ctx.sizes
    keys, queries = clustered_vectors(s.ann_n, s.search_dim, s.ann_queries, ctx.seed + 3)
    # Exact neighbours in fp32 on the benchmark device (the GPU when there is one).
    _, exact_idx = fused_topk(torch.from_numpy(queries).to(ctx.device), torch.from_numpy(keys).to(ctx.device), s.k)
    params = {"flat": {}, "hnsw": {"m": 32, "ef_construction": 200, "ef_search": 128},
              "ivfpq": {"nlist": 4096 if s.ann_n >= 200_000 else 256, "m": 64 if s.search_dim % 64 == 0 else 16, "nprobe": 32}}
    flat_ms = None
    for kind, kw in params.items():
        index = build_index(kind, s.search_dim, **kw)
        t0 = time.perf_counter()
        if not index.is_trained:
            index.train(keys)
        index.add(keys)
        build_s = time.perf_counter() - t0
        index.search(queries[:8], s.k)
        t0 = time.perf_counter()
        _, idx = index.search(queries, s.k)
        search_ms = (time.perf_counter() - t0) * 1e3
        recall = _recall_vs(exact_idx, torch.from_numpy(np.asarray(idx)))
        if kind == "flat":
            flat_ms = search_ms
        ctx.add(Row("ann", f"{kind} Q={s.ann_queries} search ms", search_ms, "ms", baseline=flat_ms,
                    ratio=flat_ms / search_ms if flat_ms else None, check=f"recall@{s.k} {recall:.4f}",
                    extra={"build_s": build_s, "params": kw, "n": s.ann_n}))
        del index


def prefix_model_vectors(n: int, dim: int, n_queries: int, seed: int, decay: float = 1.0,
                         chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Keys whose coordinate j has variance (j+1)^-decay, and queries near random keys.

    A prefix-trained (Matryoshka / HiVLP prefix) model puts most of an embedding's variance
    in its first coordinates; a power-law spectrum stands in for a trained model's at sizes no
    demo model reaches. Generated in chunks so only the float32 keys are held.
    """
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, dim + 1, dtype=np.float64) ** (-decay / 2)).astype(np.float32)
    keys = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        keys[start : start + block.shape[0]] = block * scale
    noise = rng.standard_normal((n_queries, dim), dtype=np.float32) * scale
    queries = keys[rng.integers(0, n, n_queries)] + 0.5 * noise
    return keys, queries.astype(np.float32)


def section_cascade(ctx: Context) -> None:
    """HiVLP coarse-to-fine cascade vs flat exact full-dimension search: time, recall@k.

    Flat exact is timed twice (torch `exact_topk` and a faiss flat index) and the faster is the
    baseline. A cascade's first stage is an exact top-keep over the first level
    (`utils.search.cascade.threshold_topk`: faiss's flat index is far slower at k = 1,000),
    or, in the `IVF_CASCADES` rows, an IVF-Flat index over the first level (built once, its
    build time a row of its own); later stages re-score exactly. Recall@k is against the flat exact top-k (100 = identical
    lists). CPU only: the issue's targets are for a CPU (GPU exact search is `search`).
    """
    import faiss

    from utils.search.cascade import CascadeStage, cascade_search
    from utils.search.indexes import FlatIndex, build_index, index_embeddings
    from utils.search.topk import exact_topk

    s = ctx.sizes
    n, dim, decay = s.cascade_n, s.cascade_dim, s.cascade_decay
    device = torch.device("cpu")
    t0 = time.perf_counter()
    keys, all_queries = prefix_model_vectors(n, dim, max(s.search_queries), ctx.seed + 4, decay)
    cascades = {name: [CascadeStage(d * dim // 768, keep) for d, keep in stages] for name, stages in CASCADES.items()}
    ivf_specs = {name: (nlist, nprobe, [CascadeStage(d * dim // 768, keep) for d, keep in stages])
                 for name, (nlist, nprobe, stages) in IVF_CASCADES.items()}
    levels = {st.dim: keys if st.dim == dim else np.ascontiguousarray(keys[:, : st.dim])
              for stages in [*cascades.values(), *(v[2] for v in ivf_specs.values())] for st in stages}
    flat = index_embeddings(FlatIndex(dim, use_gpu=False), keys)
    ctx.add(Row("cascade", "data", n, "keys", check=f"synthetic prefix-model vectors ({dim}-d): variance of "
                f"coordinate j ~ (j+1)^-{decay:g}, queries = a key + noise",
                extra={"prepare_s": time.perf_counter() - t0, "faiss_threads": faiss.omp_get_max_threads(),
                       "torch_threads": torch.get_num_threads()}))
    # An IVF-Flat index is built once per (level, nlist), offline like the stored embeddings
    # flat search reads: its build time is a row of its own, not part of a query's time.
    built: dict[tuple[int, int], Any] = {}
    runs: list[tuple[str, list[CascadeStage], Any, int | None]] = [(k, v, None, None) for k, v in cascades.items()]
    for name, (nlist, nprobe, stages) in ivf_specs.items():
        nlist_n = max(4, round(nlist * n / 1_000_000))
        nprobe_n = max(1, round(nprobe * nlist_n / nlist))
        key = (stages[0].dim, nlist_n)
        if key not in built:
            t0 = time.perf_counter()
            index = build_index("ivfflat", stages[0].dim, nlist=nlist_n, nprobe=nprobe_n, use_gpu=False)
            # k-means on 64 rows per list (faiss itself samples at most 256 per list).
            index_embeddings(index, levels[stages[0].dim], train_size=64 * nlist_n, seed=ctx.seed)
            index.lists()  # the lists as arrays for the batched search, taken once
            built[key] = index
            ctx.add(Row("cascade", f"ivfflat {key[0]}-d nlist {nlist_n} build s", time.perf_counter() - t0, "s",
                        check=f"IVF-Flat over the {key[0]}-d level, k-means on {64 * nlist_n} rows",
                        extra={"nlist": nlist_n, "dim": key[0]}))
        runs.append((name, stages, built[key], nprobe_n))
    for num_q in s.search_queries:
        queries = all_queries[:num_q]
        # A flat search of 1,024 queries over 1M keys takes a minute on a CPU: time it once.
        warmup, repeat = (1, max(1, min(3, s.steps))) if num_q <= 64 else (0, 1)
        _, ref_i = exact_topk(queries, keys, s.k)
        t_torch = time_fn(lambda q=queries: exact_topk(q, keys, s.k), device, warmup, repeat)["median_s"]
        t_faiss = time_fn(lambda q=queries: flat.search(q, s.k), device, warmup, repeat)["median_s"]
        flat_ms = min(t_torch, t_faiss) * 1e3
        ctx.add(Row("cascade", f"Q={num_q} flat exact ms", flat_ms, "ms",
                    extra={"torch_exact_topk_ms": t_torch * 1e3, "faiss_flat_ms": t_faiss * 1e3}))
        for name, stages, first_index, nprobe in runs:
            q_levels = [np.ascontiguousarray(queries[:, : st.dim]) for st in stages]
            c_levels = [levels[st.dim] for st in stages]
            if first_index is not None:
                first_index.nprobe = nprobe

            def run(q=q_levels, c=c_levels, st=stages, ix=first_index):
                return cascade_search(q, c, st, ix, device)

            results = run()
            recall = 100 * _recall_vs(ref_i, torch.from_numpy(results[-1].ids[:, : s.k]))
            # Checked: the final scores are the full-level dot products of the rows returned.
            final = results[-1]
            dots = np.einsum("qd,qkd->qk", queries.astype(np.float64), keys[final.ids].astype(np.float64))
            score_err = float(np.abs(final.scores - dots).max() / np.abs(dots).max())
            ms = time_fn(run, device, warmup, repeat)["median_s"] * 1e3
            # Recall is reported against the 99.5 target, not checked: it is a property
            # of the vectors and the keep sizes, not a numerical error of the code.
            ctx.add(Row("cascade", f"Q={num_q} {name}", ms, "ms", baseline=flat_ms, ratio=flat_ms / ms,
                        check=f"R@{s.k} {recall:.2f} vs flat exact, max |ds|/|s| {score_err:.0e}; "
                              + (f"ivfflat nprobe {nprobe}: " if nprobe else "")
                              + " ".join(f"{st.dim}:{st.keep}" for st in stages),
                        ok=score_err <= 1e-4,
                        extra={"recall_at_k": recall, "stage_ms": [r.seconds * 1e3 for r in results],
                               "stages": [st.to_dict() for st in stages], "nprobe": nprobe}))


def section_cross(ctx: Context) -> None:
    """Cross-encoder (UNITER) scoring throughput, padded vs packed execution."""
    from model.cross_encoder import CrossEncoderConfig, cross_encoder_from_config
    from model.packed import use_execution
    from utils.pipeline.bench_batches import batch_to, retrieval_batch

    s = ctx.sizes
    torch.manual_seed(ctx.seed)
    model = cross_encoder_from_config(CrossEncoderConfig(bert_config(s))).to(ctx.device).eval()
    batch = batch_to(retrieval_batch(s.cross_batch, s.vocab, s.num_bb, np.random.default_rng(ctx.seed + 4),
                                     s.img_dim, s.max_txt_len), ctx.device)
    args = (batch["txt"]["input_ids"], batch["txt"]["attention_mask"], batch["img"]["img_feat"],
            batch["img"]["img_pos"], batch["img"]["img_mask"])

    def plain() -> torch.Tensor:
        with torch.no_grad(), ctx.autocast(), use_execution(model, "padded"):
            return model.score(*args)

    def fast() -> torch.Tensor:
        with torch.no_grad(), ctx.autocast(), use_execution(model, "packed"):
            return model.score(*args)

    err = rel_err(fast().float(), plain().float())
    check, ok = f"rel {err:.1e}", err <= ctx.rel_tol
    t_plain = time_fn(plain, ctx.device, s.warmup, s.steps)
    t_fast = time_fn(fast, ctx.device, s.warmup, s.steps)
    plain_ps = s.cross_batch / t_plain["median_s"]
    fast_ps = s.cross_batch / t_fast["median_s"]
    ctx.add(Row("cross", "pairs/s plain", plain_ps, "pairs/s"))
    ctx.add(Row("cross", "pairs/s fast", fast_ps, "pairs/s", baseline=plain_ps, ratio=fast_ps / plain_ps,
                check=check, ok=ok))


# ----------------------------------------------------------------------------- LMDB data


def write_synthetic_dbs(root: str, n_images: int, captions_per_image: int, s: Sizes, seed: int) -> tuple[str, str]:
    """A txt_db and a 36-box img_db (conf_th -1) of random content, in the real formats."""
    from data.img_db import ImgDbWriter
    from data.txt_db import TxtDbWriter
    from utils.pipeline.bench_batches import caption_lengths

    rng = np.random.default_rng(seed)
    txt_dir, img_dir = os.path.join(root, "txt_db"), os.path.join(root, "img_db")
    meta = {"UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103, "v_range": [999, s.vocab], "bert": "synthetic"}
    lengths = caption_lengths(n_images * captions_per_image, rng, s.max_txt_len)
    with TxtDbWriter(txt_dir, meta) as txt_w, ImgDbWriter(img_dir, conf_th=-1, num_bb=s.num_bb) as img_w:
        for i in range(n_images):
            name = f"synthetic_{i:07d}.npz"
            feats = rng.standard_normal((s.num_bb, s.img_dim), dtype=np.float32)
            xy = rng.random((s.num_bb, 2), dtype=np.float32) * 0.5
            wh = rng.random((s.num_bb, 2), dtype=np.float32) * 0.5
            norm_bb = np.concatenate([xy, xy + wh, wh], axis=1)
            conf = np.sort(rng.random(s.num_bb, dtype=np.float32))[::-1]
            img_w.add(name, feats, norm_bb, conf)
            for j in range(captions_per_image):
                cid = i * captions_per_image + j
                ids = rng.integers(999, s.vocab, size=int(lengths[cid])).tolist()
                txt_w.add(str(cid), {"input_ids": ids, "img_fname": name})
    return txt_dir, img_dir


def _iterate(loader: Any, limit: int) -> Iterator[Any]:
    for i, batch in enumerate(loader):
        if i >= limit:
            return
        yield batch


def section_loader(ctx: Context) -> None:
    """LMDB read + decode + collate throughput of the CMR loader, default worker count."""
    from torch.utils.data import DataLoader

    from data.datasets import RetrievalDataset, retrieval_collate
    from data.img_db import ImgDb
    from data.samplers import DistinctImageBatchSampler
    from data.txt_db import TxtDb
    from utils.config import DataConfig

    s = ctx.sizes
    assert ctx.workdir is not None
    root = os.path.join(ctx.workdir, "loader")
    txt_dir, img_dir = write_synthetic_dbs(root, s.loader_images, 1, s, ctx.seed + 5)
    dataset = RetrievalDataset([TxtDb(txt_dir, s.max_txt_len)], [ImgDb(img_dir, conf_th=-1, num_bb=s.num_bb)])
    workers = DataConfig().n_workers
    sampler = DistinctImageBatchSampler(dataset.img_names, dataset.lens, s.batch, seed=ctx.seed, drop_last=True)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=retrieval_collate, num_workers=workers,
                        pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0)
    n_batches = len(sampler)
    list(_iterate(loader, 1))  # worker start-up stays out of the figure
    t0 = time.perf_counter()
    samples = sum(b["num_pos"] for b in _iterate(loader, n_batches))
    elapsed = time.perf_counter() - t0
    sps = samples / elapsed
    ratio = sps / ctx.train_samples_per_s if ctx.train_samples_per_s else None
    ctx.add(Row("loader", f"CMR batches, {workers} workers", sps, "samples/s",
                extra={"batches": n_batches, "batch": s.batch, "train_samples_per_s": ctx.train_samples_per_s}))
    ctx.add(Row("loader", "ratio to train", ratio, "x",
                check="" if ratio is not None else "run with the train section for the ratio"))


def section_eval(ctx: Context) -> None:
    """Flickr30k-size evaluation end to end vs the full cross-encoder (extrapolated)."""
    from data.datasets import collate_images, collate_text
    from data.img_db import ImgDb
    from data.txt_db import TxtDb
    from model.packed import use_execution
    from utils.pipeline.bench_batches import batch_to
    from utils.search.metrics import recall_from_embeddings

    s = ctx.sizes
    assert ctx.workdir is not None
    root = os.path.join(ctx.workdir, "eval")
    txt_dir, img_dir = write_synthetic_dbs(root, s.eval_images, s.captions_per_image, s, ctx.seed + 6)
    model = build_pretrain_model(ctx).bert.eval()

    def run(fast: bool) -> dict[str, Any]:
        txt_db = TxtDb(txt_dir, s.max_txt_len)
        img_db = ImgDb(img_dir, conf_th=-1, num_bb=s.num_bb)
        names = txt_db.img_order
        col = {n: i for i, n in enumerate(names)}
        txt2img = [col[txt_db.txt2img[t]] for t in txt_db.ids]
        img_embs, txt_embs = [], []
        with torch.no_grad(), ctx.autocast(), use_execution(model, "packed" if fast else "padded"):
            for start in range(0, len(names), s.encode_img_batch):
                feats, poss = [], []
                for name in names[start:start + s.encode_img_batch]:
                    feat, pos, _ = img_db.tensors(name, with_soft_labels=False)
                    feats.append(feat)
                    poss.append(pos)
                img = batch_to(collate_images(feats, poss), ctx.device, non_blocking=True)
                img_embs.append(model.encode_image(img["img_feat"], img["img_pos"], img["img_mask"]))
            ids = txt_db.ids
            for start in range(0, len(ids), s.encode_txt_batch):
                seqs = [torch.tensor([101, *txt_db.input_ids(t), 102]) for t in ids[start:start + s.encode_txt_batch]]
                txt = batch_to(collate_text(seqs), ctx.device, non_blocking=True)
                txt_embs.append(model.encode_text(txt["input_ids"], txt["attention_mask"]))
        txt_emb, img_emb = torch.cat(txt_embs).float(), torch.cat(img_embs).float()
        result = recall_from_embeddings(txt_emb, img_emb, txt2img, device=ctx.device)
        return {"recall": result, "txt_emb": txt_emb, "img_emb": img_emb}

    timings = {}
    outputs = {}
    for fast in (False, True):
        run(fast)  # warm-up: LMDB pages, kernels, allocator
        synchronize(ctx.device)
        t0 = time.perf_counter()
        outputs[fast] = run(fast)
        synchronize(ctx.device)
        timings[fast] = time.perf_counter() - t0
    # A random model scores most pairs nearly alike, so recall flips on rounding-level
    # differences: the embeddings are the check; the recalls are only recorded.
    txt_err = rel_err(outputs[True]["txt_emb"], outputs[False]["txt_emb"])
    img_err = rel_err(outputs[True]["img_emb"], outputs[False]["img_emb"])
    check = f"txt rel {txt_err:.1e}, img rel {img_err:.1e}"
    ok = max(txt_err, img_err) <= ctx.rel_tol
    n_txt, n_img = s.eval_images * s.captions_per_image, s.eval_images
    ctx.add(Row("eval", "biencoder e2e s plain", timings[False], "s",
                extra={"captions": n_txt, "images": n_img, "rsum": outputs[False]["recall"]["rsum"]}))
    ctx.add(Row("eval", "biencoder e2e s", timings[True], "s", baseline=timings[False],
                ratio=timings[False] / timings[True], check=check, ok=ok,
                extra={"rsum": outputs[True]["recall"]["rsum"]}))
    cross_fast = next((r.value for r in ctx.rows if r.section == "cross" and r.name == "pairs/s fast"), None)
    cross_plain = next((r.value for r in ctx.rows if r.section == "cross" and r.name == "pairs/s plain"), None)
    if cross_fast and cross_plain:
        pairs = n_txt * n_img
        cross_s = pairs / cross_fast
        ctx.add(Row("eval", "cross-encoder full s (extrapolated)", cross_s, "s",
                    baseline=pairs / cross_plain, ratio=(pairs / cross_plain) / cross_s, extra={"pairs": pairs}))
        ctx.add(Row("eval", "speedup vs cross", cross_s / timings[True], "x",
                    extra={"vs plain cross-encoder": (pairs / cross_plain) / timings[True]}))
    else:
        ctx.add(Row("eval", "speedup vs cross", None, "x", check="run with the cross section for the ratio"))


# ----------------------------------------------------------------------------- serve


SERVE_QUERIES = {"quick": (5, 40), "full": (20, 300)}  # (warm-up, timed) text queries
SERVE_LOAD = {"quick": (8, 3.0), "full": (32, 20.0)}  # (clients, seconds)
SERVE_IMAGES = {"quick": 100, "full": 500}  # images of the index built on the fly (500: the demo's)


def build_demo_index(root: str, n_images: int = 500, seed: int = 0) -> tuple[str, str]:
    """A demo-sized retrieval directory: synthetic test split, the demo's tiny towers
    (configs/demo, project_dim 128), random weights. Returns (index dir, checkpoint)."""
    from data.synthetic import SyntheticConfig, generate
    from model.biencoder import build_biencoder
    from model.checkpoint import make_checkpoint
    from utils.config import load_config
    from utils.files import atomic_torch_save
    from utils.pipeline.inference_run import run_inference

    repo = Path(__file__).resolve().parents[1]
    data = Path(root) / "data"
    generate(str(data), SyntheticConfig(seed=seed, num_train=8, num_val=8, num_test=n_images), progress=False)
    torch.manual_seed(seed)
    demo = repo / "configs" / "demo"
    model = build_biencoder(str(demo / "txt_tiny.json"), str(demo / "img_tiny.json"), project_dim=128)
    ckpt = Path(root) / "biencoder.pt"
    atomic_torch_save(make_checkpoint(model.eval(), {}), ckpt)
    out = Path(root) / "index"
    config = load_config(demo / "finetune.yaml", [
        f"data.train_txt_dbs=[{data / 'txt_db/train'}]", f"data.train_img_dbs=[{data / 'img_db'}]",
        f"data.val_txt_db={data / 'txt_db/val'}", f"data.val_img_db={data / 'img_db'}",
        f"data.test_txt_db={data / 'txt_db/test'}", f"data.test_img_db={data / 'img_db'}",
        f"model.tokenizer={data / 'tokenizer'}", "retrieval.eval_split=test", f"output_dir={out}",
    ])
    run_inference(config, str(ckpt), out, "fp32")
    return str(out), str(ckpt)


def _serve_queries(searcher: Any, count: int) -> list[str]:
    """Realistic queries: the split's own captions, cycled."""
    from data.txt_db import TxtDb

    db = TxtDb(searcher.info["split"]["txt_db"], searcher.max_txt_len)
    texts = [db.record(t)["raw"] for t in searcher.txt_ids[: max(count, 1)]]
    return [texts[i % len(texts)] for i in range(count)]


def _percentiles(ms: Sequence[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


async def _load(base: str, queries: Sequence[str], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` concurrent loops of `/api/search` requests (no re-rank) for `seconds`.

    Each client has its own connection (a client of its own), as independent users would.
    """
    import asyncio

    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    async def client_loop(w: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
            i = w
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.get("/api/search", params={"q": queries[i % len(queries)], "k": 10, "rerank": 0})
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}")
                    else:
                        latencies.append((time.perf_counter() - t0) * 1e3)
                except httpx.HTTPError as err:
                    errors.append(type(err).__name__)
                i += clients

    t_start = time.perf_counter()
    await asyncio.gather(*(client_loop(w) for w in range(clients)))
    elapsed = time.perf_counter() - t_start
    p50, p99 = _percentiles(latencies) if latencies else (None, None)
    return {"requests": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "elapsed_s": elapsed, "throughput": len(latencies) / elapsed, "p50_ms": p50, "p99_ms": p99}


def _start_server(index_dir: str, checkpoint: str, workdir: str) -> tuple[Any, str, Any]:
    """`inference.py serve` in a child process on a free local port; returns (process, base URL, log)."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    log = open(os.path.join(workdir, "serve.log"), "w")  # noqa: SIM115 (the caller closes it)
    proc = subprocess.Popen(
        [sys.executable, str(repo / "inference.py"), "serve", "--index_dir", index_dir, "--checkpoint", checkpoint,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(repo),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"inference.py serve exited ({proc.returncode}): {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/api/search", params={"q": "a dog", "k": 1}, timeout=5).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    log.close()
    raise RuntimeError("inference.py serve did not answer within 120 s")


def section_serve(ctx: Context) -> None:
    """`inference.py serve`: query latency after warm-up (encode + search, in process) on a
    demo-sized index, then concurrent clients against the real server over HTTP."""
    import asyncio

    from utils.pipeline.query import Searcher

    mode = "quick" if ctx.sizes is QUICK else "full"
    opts = ctx.options
    index_dir, checkpoint = opts.get("serve_index"), opts.get("serve_checkpoint")
    if index_dir is None:
        assert ctx.workdir is not None
        index_dir, checkpoint = build_demo_index(os.path.join(ctx.workdir, "serve"), SERVE_IMAGES[mode], ctx.seed)
    elif checkpoint is None:
        raise SystemExit("--serve-index needs --serve-checkpoint (the bi-encoder that built it)")
    warm, count = SERVE_QUERIES[mode]
    count = opts.get("serve_queries") or count
    searcher = Searcher(index_dir, checkpoint)
    queries = _serve_queries(searcher, count)
    for q in queries[:warm]:
        searcher.search_images(searcher.encode_text(q), 10)
    ms = []
    for q in queries:
        t0 = time.perf_counter()
        searcher.search_images(searcher.encode_text(q), 10)
        ms.append((time.perf_counter() - t0) * 1e3)
    p50, p99 = _percentiles(ms)
    extra = {"images": len(searcher.img_ids), "queries": len(ms), "torch_threads": torch.get_num_threads()}
    ctx.add(Row("serve", "query p50 ms", p50, "ms", extra=extra))
    ctx.add(Row("serve", "query p99 ms", p99, "ms", extra=extra))

    clients, seconds = SERVE_LOAD[mode]
    clients = opts.get("clients") or clients
    seconds = opts.get("duration") or seconds
    proc, base, log = _start_server(index_dir, checkpoint, ctx.workdir or tempfile.gettempdir())
    try:
        load = asyncio.run(_load(base, queries, clients, seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    extra = {"clients": clients, "seconds": seconds, **load}
    ctx.add(Row("serve", "load throughput", load["throughput"], "req/s", extra=extra))
    ctx.add(Row("serve", "load p50 ms", load["p50_ms"], "ms", extra=extra))
    ctx.add(Row("serve", "load p99 ms", load["p99_ms"], "ms", extra=extra))
    ctx.add(Row("serve", "load errors", float(load["errors"]), "count", check=", ".join(load["error_kinds"]),
                ok=load["errors"] == 0))


SECTION_FNS: dict[str, Callable[[Context], None]] = {
    "peak": section_peak,
    "train": section_train,
    "pretrain": section_pretrain,
    "encode": section_encode,
    "search": section_search,
    "ann": section_ann,
    "cascade": section_cascade,
    "cross": section_cross,
    "eval": section_eval,
    "serve": section_serve,
    "loader": section_loader,
}


# ----------------------------------------------------------------------------- output


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:.{digits}g}"
    return f"{x:.3e}"


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table: figure, unit, baseline, ratio to baseline, MFU, target, check.

    "x base" is the speed-up over the straightforward baseline (>1 is faster); "check" says
    whether the fast path matched the plain one (PASS / FAIL) and by how much.
    """
    header = ("section", "figure", "value", "unit", "baseline", "x base", "mfu", "H100 target", "check")
    lines = [header]
    for r in rows:
        mfu = r.extra.get("mfu")
        key = f"{r.section}/{r.name}"
        target = TARGETS.get(key, TARGETS.get(f"{key} mfu", ""))
        lines.append((r.section, r.name, _fmt(r.value), r.unit, _fmt(r.baseline), _fmt(r.ratio, 3),
                      _fmt(mfu, 3) if mfu is not None else "", target,
                      {True: "PASS ", False: "FAIL ", None: ""}[r.ok] + r.check))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for j, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, CPU smoke check (< 60 s)")
    parser.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    parser.add_argument("--device", type=str, default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--sections", type=str, default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="autocast dtype of the model sections (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="timed repetitions (default by mode)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs (default by mode)")
    parser.add_argument("--search-n", type=int, default=None, help="keys of the exact search section")
    parser.add_argument("--ann-n", type=int, default=None, help="keys of the approximate index section")
    parser.add_argument("--cascade-n", type=int, default=None, help="keys of the cascade section")
    parser.add_argument("--cascade-decay", type=float, default=None,
                        help="cascade vectors: variance of coordinate j is (j+1)^-decay (default 1)")
    parser.add_argument("--batch", type=int, default=None, help="training batch size")
    parser.add_argument("--triton-sweep", action="store_true", help="time a grid of fused-kernel configs")
    parser.add_argument("--workdir", type=str, default=None, help="where the synthetic LMDBs go (default: a temp dir)")
    parser.add_argument("--serve-index", type=str, default=None,
                        help="serve section: a built retrieval dir (default: a demo-sized one built on the fly)")
    parser.add_argument("--serve-checkpoint", type=str, default=None, help="serve section: its bi-encoder")
    parser.add_argument("--serve-queries", type=int, default=None, help="serve section: timed text queries")
    parser.add_argument("--clients", type=int, default=None, help="serve section: concurrent clients (32 full)")
    parser.add_argument("--duration", type=float, default=None, help="serve section: load seconds (20 full)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected sections; print the table; write JSON when `--out` is given.

    Returns:
        The JSON-serialisable result: `env`, `sizes`, `rows`.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = QUICK if args.quick else FULL
    overrides = {"steps": args.steps, "warmup": args.warmup, "search_n": args.search_n,
                 "ann_n": args.ann_n, "cascade_n": args.cascade_n,
                 "cascade_decay": args.cascade_decay, "batch": args.batch}
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    # Cross-section figures need their producers first: peak (MFU), train (loader ratio),
    # cross (evaluation speed-up); run in the canonical order whatever the order given.
    sections = [x for x in SECTIONS if x in sections]
    if args.precision == "auto":
        autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    else:
        autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None

    with tempfile.TemporaryDirectory(prefix="ldot_bench_", dir=args.workdir) as workdir:
        ctx = Context(device=device, sizes=sizes, autocast_dtype=autocast_dtype, seed=args.seed,
                      rows=[], workdir=workdir, triton_configs=args.triton_sweep,
                      options={"serve_index": args.serve_index, "serve_checkpoint": args.serve_checkpoint,
                               "serve_queries": args.serve_queries, "clients": args.clients,
                               "duration": args.duration})
        for name in sections:
            t0 = time.perf_counter()
            SECTION_FNS[name](ctx)
            logger.info("section %s: %.1f s", name, time.perf_counter() - t0)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    result = {
        "env": environment(device),
        "mode": "quick" if args.quick else "full",
        "precision": str(autocast_dtype) if autocast_dtype else "fp32",
        "sizes": dataclasses.asdict(sizes),
        "targets": TARGETS,
        "rows": [dataclasses.asdict(r) for r in ctx.rows],
        "failed_checks": [f"{r.section}/{r.name}" for r in ctx.rows if r.ok is False],
    }
    print(format_table(ctx.rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2, default=str)
        print(f"wrote {args.out}")
    if result["failed_checks"]:
        print(f"FAILED numerical checks: {result['failed_checks']}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: 1 if main(argv)["failed_checks"] else 0))
