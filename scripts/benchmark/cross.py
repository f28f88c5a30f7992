"""Section `cross`: cross-encoder (UNITER) scoring throughput, padded vs packed execution."""
from __future__ import annotations

import numpy as np
import torch

from scripts.benchmark.context import Context, Row
from scripts.benchmark.measure import rel_err, time_fn
from scripts.benchmark.models import build_cross_encoder


def section_cross(ctx: Context) -> None:
    """Cross-encoder (UNITER) scoring throughput, padded vs packed execution."""
    from model.packed import use_execution
    from scripts.benchmark.batches import batch_to, retrieval_batch

    s = ctx.sizes
    model = build_cross_encoder(ctx)
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
