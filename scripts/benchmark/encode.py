"""Section `encode`: caption and image encoding throughput (index building), padded vs packed."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from scripts.benchmark.context import Context, Row
from scripts.benchmark.flops import image_tower_flops, text_tower_flops
from scripts.benchmark.measure import rel_err, time_fn
from scripts.benchmark.models import build_biencoder


def section_encode(ctx: Context) -> None:
    """Caption and image encoding throughput (index building), padded vs packed, no grad."""
    from model.packed import FixedShapeEncoder, use_execution
    from scripts.benchmark.batches import batch_to, retrieval_batch

    s = ctx.sizes
    model = build_biencoder(ctx)
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
