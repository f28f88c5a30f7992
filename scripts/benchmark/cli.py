"""Benchmark of training, encoding, search, re-ranking and data loading on the current device.

    python scripts/bench.py --quick                 # tiny sizes: a CPU smoke check, < 60 s
    python scripts/bench.py --out bench.json        # paper sizes, meant for one H100
    python scripts/bench.py --sections search,ann   # a subset (each section stands alone)
    python scripts/bench.py --sections serve        # inference.py serve: query latency, 32 clients x 20 s
    python scripts/bench.py --section-timeout 60 --out bench.json   # a device lease: each section at most 60 s

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

With `--out`, the JSON is rewritten (atomically) whenever a section starts or ends, so a run
killed midway leaves every finished section on disk; its `sections` entries say which ran.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from scripts.benchmark.context import FULL, QUICK, Context, Row
from scripts.benchmark.results import TARGETS, environment, format_table, write_result
from scripts.benchmark.runner import (
    DEFAULT_GRACE_S,
    EXIT_CHECKS_FAILED,
    EXIT_HARD_STOP,
    EXIT_SECTION_FAILED,
    SectionRecord,
    run_sections,
)
from scripts.benchmark.sections import SECTION_FNS, SECTIONS

EXIT_STATUSES = f"""exit status:
  0  every section ran and every numerical check passed
  {EXIT_CHECKS_FAILED}  a numerical check failed (FAIL in the table)
  2  a user error (one `error:` line)
  {EXIT_SECTION_FAILED}  a section raised or ran past --section-timeout: recorded (a "section failed" /
     "section timeout" row, its entry in the JSON's "sections"), the other sections ran
  {EXIT_HARD_STOP}  a section still ran --section-grace seconds past --section-timeout (stuck in native
     code): the watchdog wrote the JSON so far and ended the process; later sections did not run
"""


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of `scripts/bench.py`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXIT_STATUSES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, CPU smoke check (< 60 s)")
    parser.add_argument("--out", type=str, default=None,
                        help="write the results as JSON here (rewritten as each section starts and ends)")
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
    parser.add_argument("--section-timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="limit of each section: one that runs longer is stopped and recorded as timed out, "
                             "and the next section runs (default: no limit)")
    parser.add_argument("--section-grace", type=_seconds, default=DEFAULT_GRACE_S, metavar="SECONDS",
                        help="how long a section may run past --section-timeout (stuck in native code) before "
                             f"a watchdog ends the process (default {DEFAULT_GRACE_S:g})")
    return parser.parse_args(argv)


def _result(device: torch.device, run_info: dict[str, Any], rows: Sequence[Row],
            records: Sequence[SectionRecord]) -> dict[str, Any]:
    """The JSON-serialisable result of the run so far."""
    return {
        "env": environment(device),
        **run_info,
        "rows": [dataclasses.asdict(r) for r in rows],
        "failed_checks": [f"{r.section}/{r.name}" for r in rows if r.ok is False],
        "sections": [dataclasses.asdict(r) for r in records],
    }


def _report(result: dict[str, Any], rows: Sequence[Row], out: str | None) -> None:
    """Print the table, write the JSON (with `out`); the last lines say what went wrong."""
    print(format_table(rows))
    if out:
        write_result(out, result)
        print(f"wrote {out}")
    if result["failed_checks"]:
        print(f"FAILED numerical checks: {result['failed_checks']}")
    sections = result["sections"]
    timed_out = [e["section"] for e in sections if e["status"] == "timeout"]
    failed = [f"{e['section']}: {e['error'].splitlines()[0]}" for e in sections if e["status"] == "failed"]
    not_run = [e["section"] for e in sections if e["status"] == "pending"]
    if timed_out:
        print(f"TIMED OUT sections: {timed_out}")
    if failed:
        print(f"FAILED sections: {failed}")
    if not_run:
        print(f"NOT RUN sections (the watchdog ended the run): {not_run}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected sections; print the table; write JSON when `--out` is given.

    Returns:
        The JSON-serialisable result: `env`, `sizes`, `rows`, `failed_checks`, `sections`.
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
    run_info = {
        "mode": "quick" if args.quick else "full",
        "precision": str(autocast_dtype) if autocast_dtype else "fp32",
        "sizes": dataclasses.asdict(sizes),
        "targets": TARGETS,
    }

    with tempfile.TemporaryDirectory(prefix="ldot_bench_", dir=args.workdir) as workdir:
        ctx = Context(device=device, sizes=sizes, autocast_dtype=autocast_dtype, seed=args.seed,
                      rows=[], workdir=workdir, triton_configs=args.triton_sweep,
                      options={"serve_index": args.serve_index, "serve_checkpoint": args.serve_checkpoint,
                               "serve_queries": args.serve_queries, "clients": args.clients,
                               "duration": args.duration})

        def save(records: Sequence[SectionRecord]) -> None:
            if args.out:
                write_result(args.out, _result(device, run_info, ctx.rows, records))

        def hard_stop(records: Sequence[SectionRecord]) -> None:
            _report(_result(device, run_info, ctx.rows, records), ctx.rows, args.out)
            # The process ends without unwinding: the synthetic LMDBs would stay behind.
            shutil.rmtree(workdir, ignore_errors=True)

        records = run_sections(ctx, [(name, SECTION_FNS[name]) for name in sections],
                               args.section_timeout, args.section_grace, save, hard_stop)

    result = _result(device, run_info, ctx.rows, records)
    _report(result, ctx.rows, args.out)
    return result


def exit_status(result: dict[str, Any]) -> int:
    """The process exit status of a finished run (`EXIT_STATUSES`)."""
    if any(entry["status"] != "ok" for entry in result["sections"]):
        return EXIT_SECTION_FAILED
    return EXIT_CHECKS_FAILED if result["failed_checks"] else 0


def run(argv: Sequence[str] | None = None) -> int:
    """`main`, then its exit status: what `scripts/bench.py` returns to the shell."""
    return exit_status(main(argv))
