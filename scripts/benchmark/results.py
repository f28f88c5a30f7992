"""What a run hands back: the printed table, the environment record and the JSON file."""
from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from scripts.benchmark.context import Row
from utils.files import atomic_write_text

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
    """Date, versions and device of the run (the JSON's `env`)."""
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


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write the result as indented JSON, atomically (temporary file, then rename): a run
    killed while writing leaves the previous complete file, never a truncated one."""
    atomic_write_text(path, json.dumps(result, indent=2, default=str))
