"""Collect retrieval results into the paper-style markdown table.

    python scripts/report.py runs/flickr_eval runs/flickr_eval/rerank.json \
        "zero-shot=runs/zs/recall.json" [--output table.md] [--timing all] [--paper]

Each argument is a results file or a directory (searched recursively for `recall.json`,
`rerank.json`, `test_results.json`, `summary.json`), optionally prefixed with `LABEL=`.
Every recall dict found in a file (the SPEC 7 layout of `utils/search/metrics.py`, at any depth)
becomes one row: `rerank.json` gives a stage-1 row and a re-ranked row; nested dicts (e.g. a
demo summary) give one row per recall dict, labelled by their key path. Timing comes from a
`timing` dict beside the recall dict (or in an enclosing dict), from a top-level `timing_s`
dict keyed by row name (older demo summaries), and for `recall.json` from the `info.json`
written next to it by `inference.py`. A row that names the split it was measured on (the demo's
`summary.json`: `split`) gets a split column.

Columns: model / setting | [split] | TR R@1 R@5 R@10 | IR R@1 R@5 R@10 | RSUM | AR | timing (s).
TR = image -> text, IR = text -> image, as in the paper. By default the timing columns are those
of `DEFAULT_TIMING` that some row has.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import DataError, MissingPathError, run_cli
from utils.files import atomic_write_text
from utils.run_files import (
    INFO_FILE,
    RECALL_FILE,
    RERANK_FILE,
    SUMMARY_FILE,
    TEST_RESULTS_FILE,
)

RESULT_FILES = (RECALL_FILE, RERANK_FILE, TEST_RESULTS_FILE, SUMMARY_FILE)
DEFAULT_TIMING = ("encode_s", "search_s", "rerank_s", "cross_encoder_s")
DIRECTIONS = ("image_to_text", "text_to_image")
KS = ("R@1", "R@5", "R@10")
# Published numbers (SPEC 9), for side-by-side reading with `--paper`.
PAPER_ROWS: dict[str, dict[str, Any]] = {
    "paper: Flickr30k zero-shot": {
        "image_to_text": {"R@1": 68.2, "R@5": 89.1, "R@10": 94.0},
        "text_to_image": {"R@1": 53.3, "R@5": 80.6, "R@10": 88.0},
    },
    "paper: Flickr30k fine-tuned": {
        "image_to_text": {"R@1": 83.9, "R@5": 97.2, "R@10": 98.6},
        "text_to_image": {"R@1": 69.9, "R@5": 91.1, "R@10": 95.2},
    },
    "paper: COCO 5K fine-tuned": {
        "image_to_text": {"R@1": 60.0, "R@5": 85.2, "R@10": 91.7},
        "text_to_image": {"R@1": 45.8, "R@5": 74.5, "R@10": 83.8},
    },
}
# Nicer names for the key paths of known files.
KEY_NAMES = {"before": "stage 1", "after": "re-ranked"}


@dataclass
class Row:
    """One table row: a label, a recall dict and the timings that go with it."""

    label: str
    recall: Mapping[str, Any]
    timing: dict[str, float] = field(default_factory=dict)
    split: str = ""


def is_recall_dict(obj: Any) -> bool:
    """True for a dict in the SPEC 7 layout (both directions with R@1/5/10)."""
    return (
        isinstance(obj, Mapping)
        and all(isinstance(obj.get(d), Mapping) for d in DIRECTIONS)
        and all(k in obj[d] for d in DIRECTIONS for k in KS)
    )


def _numeric_timing(obj: Any) -> dict[str, float]:
    if not isinstance(obj, Mapping):
        return {}
    return {k: float(v) for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def find_recall_dicts(
    obj: Any, path: tuple[str, ...] = (), timing: dict[str, float] | None = None
) -> Iterator[tuple[tuple[str, ...], Mapping[str, Any], dict[str, float]]]:
    """Every recall dict inside `obj`, with its key path and the nearest timing dict."""
    if not isinstance(obj, Mapping):
        return
    timing = {**(timing or {}), **_numeric_timing(obj.get("timing"))}
    if is_recall_dict(obj):
        yield path, obj, timing
        return
    for key, value in obj.items():
        if key == "timing":
            continue
        if isinstance(value, Mapping):
            yield from find_recall_dicts(value, (*path, str(key)), timing)


def _describe(path: tuple[str, ...], data: Mapping[str, Any]) -> str:
    parts = [KEY_NAMES.get(p, p) for p in path]
    if path and path[-1] in ("before", "after") and "top_m" in data:
        parts[-1] += f" (top-{data['top_m']}"
        parts[-1] += f", alpha {data['alpha']})" if path[-1] == "after" and "alpha" in data else ")"
    return " / ".join(parts)


def _timing_by_row(data: Mapping[str, Any], key_path: tuple[str, ...]) -> dict[str, float]:
    """Timing kept apart from the rows, keyed by row name, in seconds without the `_s` suffix
    (the demo's `summary.json`: `timing_s: {finetuned: {encode: ..., search: ...}}`)."""
    by_row = data.get("timing_s")
    if not key_path or not isinstance(by_row, Mapping):
        return {}
    timing = _numeric_timing(by_row.get(key_path[-1]))
    return {k if k.endswith("_s") else f"{k}_s": v for k, v in timing.items()}


def rows_from_file(path: Path, label: str) -> list[Row]:
    """The rows of one results file.

    Raises:
        ValueError: the file is not JSON or holds no recall dict.
    """
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not a JSON file ({err})") from err
    extra_timing: dict[str, float] = {}
    info = path.parent / INFO_FILE
    if path.name == RECALL_FILE and info.is_file():
        extra_timing = _numeric_timing(json.loads(info.read_text()).get("timing"))
    rows = []
    for key_path, recall, timing in find_recall_dicts(data):
        if key_path and key_path[-1] == "before":
            # Stage 1 of a re-ranking: the timing beside it is the re-ranker's.
            timing = {}
        name = _describe(key_path, data)
        timing = {**_timing_by_row(data, key_path), **timing}
        split = recall.get("split")
        rows.append(Row(f"{label} / {name}" if name else label, recall, {**extra_timing, **timing},
                        split if isinstance(split, str) else ""))
    if not rows:
        raise DataError(f"{path}: no recall results (text_to_image / image_to_text R@1/5/10) in it")
    return rows


def _label_for(path: Path, root: Path | None) -> str:
    base = path.parent
    if root is not None:
        try:
            rel = base.relative_to(root)
            base = rel if str(rel) != "." else Path(root.name)
        except ValueError:
            pass
    return str(base) if str(base) not in ("", ".") else path.stem


def collect(sources: Sequence[str]) -> list[Row]:
    """Rows from `[LABEL=]PATH` arguments (files or directories), in argument order.

    Raises:
        FileNotFoundError: a path does not exist, or a directory holds no results file.
    """
    rows: list[Row] = []
    for source in sources:
        label, raw = "", source
        if "=" in source and not Path(source).exists():
            label, raw = source.split("=", 1)
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.name in RESULT_FILES and p.is_file())
            if not files:
                raise MissingPathError(f"{path}: no {', '.join(RESULT_FILES)} found under it")
            for file in files:
                name = _label_for(file, path)
                rows.extend(rows_from_file(file, f"{label} / {name}" if label else name))
        elif path.is_file():
            rows.extend(rows_from_file(path, label or _label_for(path, None)))
        else:
            raise MissingPathError(f"results path {path} does not exist")
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    return f"{float(value):.{digits}f}" if isinstance(value, (int, float)) else "-"


def render_table(rows: Sequence[Row], timing_keys: Sequence[str] | None = DEFAULT_TIMING) -> str:
    """The markdown table (one line per row).

    Args:
        rows: the rows.
        timing_keys: timing entries to show as columns, None for every one found.
    """
    if timing_keys is None:
        timing_keys = list(dict.fromkeys(k for r in rows for k in r.timing))
    with_split = any(r.split for r in rows)
    header = ["model / setting"] + (["split"] if with_split else [])
    header += [f"TR {k}" for k in KS] + [f"IR {k}" for k in KS] + ["RSUM", "AR"]
    header += [k[:-2] + " (s)" if k.endswith("_s") else k for k in timing_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        r = row.recall
        values = [_fmt(r["image_to_text"][k]) for k in KS] + [_fmt(r["text_to_image"][k]) for k in KS]
        six = [float(r[d][k]) for d in DIRECTIONS for k in KS]
        rsum = r.get("rsum", sum(six))
        values += [_fmt(rsum), _fmt(r.get("ar", rsum / 6))]
        values += [_fmt(row.timing.get(k), 2) for k in timing_keys]
        first = [row.label.replace("|", "/")] + ([row.split or "-"] if with_split else [])
        lines.append("| " + " | ".join(first + values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    """Build the table; print it or write it (atomically) to `--output`. Returns the markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="[LABEL=]PATH of a results file or directory")
    parser.add_argument("--output", default=None, help="write the table here instead of stdout")
    parser.add_argument(
        "--timing",
        default=None,
        help="comma-separated timing keys to show, 'all' for every one found, 'none' for none "
             f"(default: those of {','.join(DEFAULT_TIMING)} that some row has)",
    )
    parser.add_argument("--paper", action="store_true", help="append the published rows (SPEC 9)")
    args = parser.parse_args(argv)
    rows = collect(args.sources)
    if args.paper:
        rows += [Row(label, recall) for label, recall in PAPER_ROWS.items()]
    if args.timing is None:
        timing_keys: list[str] | None = [k for k in DEFAULT_TIMING if any(k in r.timing for r in rows)]
    elif args.timing == "all":
        timing_keys = None
    elif args.timing == "none":
        timing_keys = []
    else:
        timing_keys = [k for k in args.timing.split(",") if k]
    table = render_table(rows, timing_keys)
    if args.output:
        atomic_write_text(args.output, table)
    else:
        sys.stdout.write(table)
    return table


if __name__ == "__main__":
    sys.exit(run_cli(main))
