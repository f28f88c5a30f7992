"""Section `eval`: Flickr30k-size bi-encoder evaluation end to end, and its speed-up over the
full cross-encoder (extrapolated from the `cross` section)."""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from scripts.benchmark.context import Context, Row
from scripts.benchmark.measure import rel_err, synchronize
from scripts.benchmark.models import build_biencoder
from scripts.benchmark.synthetic_dbs import write_synthetic_dbs


def section_eval(ctx: Context) -> None:
    """Flickr30k-size evaluation end to end vs the full cross-encoder (extrapolated)."""
    from data.datasets import collate_images, collate_text
    from data.img_db import ImgDb
    from data.txt_db import TxtDb
    from model.packed import use_execution
    from scripts.benchmark.batches import batch_to
    from utils.search.metrics import recall_from_embeddings

    s = ctx.sizes
    assert ctx.workdir is not None
    root = os.path.join(ctx.workdir, "eval")
    txt_dir, img_dir = write_synthetic_dbs(root, s.eval_images, s.captions_per_image, s, ctx.seed + 6)
    model = build_biencoder(ctx)

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
