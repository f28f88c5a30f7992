"""Section `serve`: `inference.py serve` query latency in process, then concurrent HTTP clients
against the real server (issue 14)."""
from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from scripts.benchmark.context import QUICK, REPO_ROOT, Context, Row
from scripts.benchmark.http_load import percentiles, run_load, start_server
from scripts.benchmark.models import build_demo_biencoder

SERVE_QUERIES = {"quick": (5, 40), "full": (20, 300)}  # (warm-up, timed) text queries
SERVE_LOAD = {"quick": (8, 3.0), "full": (32, 20.0)}  # (clients, seconds)
SERVE_IMAGES = {"quick": 100, "full": 500}  # images of the index built on the fly (500: the demo's)


def build_demo_index(root: str, n_images: int = 500, seed: int = 0) -> tuple[str, str]:
    """A demo-sized retrieval directory: synthetic test split, the demo's tiny towers
    (configs/demo, project_dim 128), random weights. Returns (index dir, checkpoint)."""
    from data.synthetic import SyntheticConfig, generate
    from model.checkpoint import make_checkpoint
    from utils.config import load_config
    from utils.files import atomic_torch_save
    from utils.pipeline.inference_run import run_inference

    data = Path(root) / "data"
    generate(str(data), SyntheticConfig(seed=seed, num_train=8, num_val=8, num_test=n_images), progress=False)
    demo = REPO_ROOT / "configs" / "demo"
    model = build_demo_biencoder(demo, seed)
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


def section_serve(ctx: Context) -> None:
    """`inference.py serve`: query latency after warm-up (encode + search, in process) on a
    demo-sized index, then concurrent clients against the real server over HTTP."""
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
    p50, p99 = percentiles(ms)
    extra = {"images": len(searcher.img_ids), "queries": len(ms), "torch_threads": torch.get_num_threads()}
    ctx.add(Row("serve", "query p50 ms", p50, "ms", extra=extra))
    ctx.add(Row("serve", "query p99 ms", p99, "ms", extra=extra))

    clients, seconds = SERVE_LOAD[mode]
    clients = opts.get("clients") or clients
    seconds = opts.get("duration") or seconds
    proc, base, log = start_server(index_dir, checkpoint, ctx.workdir or tempfile.gettempdir())
    try:
        load = asyncio.run(run_load(base, queries, clients, seconds))
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
