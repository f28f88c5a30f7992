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
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from scripts.benchmark.context import FULL, QUICK, Context
from scripts.benchmark.results import TARGETS, environment, format_table
from scripts.benchmark.sections import SECTION_FNS, SECTIONS

logger = logging.getLogger("bench")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of `scripts/bench.py`."""
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


def run(argv: Sequence[str] | None = None) -> int:
    """`main`, then its exit status: what `scripts/bench.py` returns to the shell."""
    return 1 if main(argv)["failed_checks"] else 0
