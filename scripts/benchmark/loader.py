"""Section `loader`: LMDB read + decode + collate throughput of the CMR training loader."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from scripts.benchmark.context import Context, Row
from scripts.benchmark.synthetic_dbs import write_synthetic_dbs


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
