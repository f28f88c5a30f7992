"""PNG plots of runs: training curves from `metrics.jsonl`, recall@K curves from retrieval outputs.

    python scripts/plots.py runs/demo                       # everything found under it -> runs/demo/plots/
    python scripts/plots.py runs/demo/finetune --out_dir figs
    python scripts/plots.py "zero-shot=runs/zs" "fine-tuned=runs/ft" --out_dir figs

Training curves (one PNG per run directory holding `metrics.jsonl`): the training loss of each
task and in total, the learning rate, and the validation R@1 of both directions and RSUM
over steps. Recall@K curves (one PNG for all rows): R@K for K = 1..top_k, text -> image and
image -> text, of every retrieval directory (`info.json` + `topk.json`, from inference.py) and
every re-ranked output (`rerank.json` + `rerank_scores.json`, K up to its top-M), computed
from the stored top-k lists and the split's `txt2img.json` (SPEC 7: a caption is found when
its image is ranked within K; an image when any of its captions is).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from utils.errors import DataError, MissingPathError, run_cli
from utils.run_files import (
    IDS_FILE,
    INFO_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    RECALL_PLOT,
    RERANK_FILE,
    SCORES_FILE,
    TOPK_FILE,
    TRAINING_PLOT_SUFFIX,
)

DIRECTIONS = {"text_to_image": "text -> image (IR)", "image_to_text": "image -> text (TR)"}
_R1 = re.compile(r"(?:^|/)(text_to_image|image_to_text)/R@1$")


def _pyplot():
    # Agg: no display needed, and the same bytes whatever the machine's GUI set-up.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise MissingPathError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


# -------------------------------------------------------------------- training curves


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (blank lines skipped).

    Raises:
        DataError: a line is not JSON.
    """
    records = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not a JSON record ({err})") from err
    return records


def training_series(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Panel -> series name -> (steps, values): `loss`, `lr`, `val R@1`, `val RSUM`."""
    panels: dict[str, dict[str, tuple[list[int], list[float]]]] = {
        "loss": {}, "lr": {}, "val R@1": {}, "val RSUM": {}}

    def add(panel: str, name: str, step: int, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            steps, values = panels[panel].setdefault(name, ([], []))
            steps.append(step)
            values.append(float(value))

    for rec in records:
        step = int(rec.get("step", 0))
        split = rec.get("split", "train")
        for key, value in rec.items():
            if split == "train":
                if key == "loss" or key.endswith("/loss"):
                    add("loss", key, step, value)
                elif key == "lr":
                    add("lr", key, step, value)
            elif split == "val":
                if _R1.search(key):
                    add("val R@1", key, step, value)
                elif key == "rsum" or key.endswith("/rsum"):
                    add("val RSUM", key, step, value)
    return panels


def plot_training(run_dir: str | Path, out_path: str | Path) -> Path:
    """Training curves of `run_dir/metrics.jsonl` as one PNG (2 x 2 panels).

    Raises:
        MissingPathError: no metrics.jsonl in `run_dir`.
        DataError: it holds no training record.
    """
    run_dir, out_path = Path(run_dir), Path(out_path)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise MissingPathError(f"{path} does not exist (not a training run directory?)")
    panels = training_series(read_metrics(path))
    if not any(panels.values()):
        raise DataError(f"{path}: no training loss, learning rate or validation recall in it")
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for name, (steps, values) in sorted(series.items()):
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if title == "loss" and series and min(v for _, vs in series.values() for v in vs) > 0:
            ax.set_yscale("log")
        if series:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(f"training: {run_dir}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)


# -------------------------------------------------------------------- recall@K curves


def _gold(info: Mapping[str, Any], ids: Mapping[str, Sequence[str]], where: Path) -> dict[str, str]:
    """Caption id -> image name for the split's captions, from its txt_db's txt2img.json."""
    txt_db = Path(info.get("split", {}).get("txt_db", ""))
    txt2img = _read_json(txt_db / "txt2img.json") if txt_db.name else None
    if txt2img is None:
        raise DataError(f"{where / INFO_FILE}: names no split txt_db")
    missing = [t for t in ids["txt_ids"] if t not in txt2img]
    if missing:
        raise DataError(f"{txt_db / 'txt2img.json'}: no image for caption {missing[0]!r}")
    return {t: txt2img[t] for t in ids["txt_ids"]}


def recall_curve(lists: Mapping[str, Sequence[Sequence[Any]]], gold: Mapping[str, str], query_is_text: bool,
                 queries: Sequence[str], max_k: int) -> np.ndarray:
    """R@K in percent for K = 1..max_k, from ranked candidate lists keyed by query.

    A text query is found at the rank of its image; an image query at the best rank of any of
    its captions. A query whose list misses its answer counts as not found at every K.
    """
    first = np.full(len(queries), np.inf)
    for q, query in enumerate(queries):
        for rank, row in enumerate(lists.get(query, ())[:max_k], 1):
            cand = row[0]
            hit = gold.get(query) == cand if query_is_text else gold.get(cand) == query
            if hit:
                first[q] = rank
                break
    ks = np.arange(1, max_k + 1)
    return 100.0 * (first[None, :] <= ks[:, None]).mean(axis=1)


def curves_of(path: str | Path) -> dict[str, np.ndarray]:
    """Recall@K curves of a retrieval directory (`topk.json`) or a re-ranked output (`rerank.json`).

    Returns:
        `{"text_to_image": R@1..R@K, "image_to_text": R@1..R@K}` in percent.
    """
    path = Path(path)
    if (path / RERANK_FILE).is_file() and (path / SCORES_FILE).is_file():
        rerank = _read_json(path / RERANK_FILE)
        source = Path(rerank.get("retrieval_dir", path))
        lists = _read_json(path / SCORES_FILE)
        max_k = int(rerank.get("top_m") or 0)
    elif (path / TOPK_FILE).is_file():
        source, lists = path, _read_json(path / TOPK_FILE)
        max_k = int(_read_json(path / INFO_FILE).get("top_k") or 0)
    else:
        raise MissingPathError(f"{path}: neither {TOPK_FILE} (inference.py) nor {RERANK_FILE} + {SCORES_FILE}")
    info, ids = _read_json(source / INFO_FILE), _read_json(source / IDS_FILE)
    gold = _gold(info, ids, source)
    longest = max((len(v) for d in lists.values() for v in d.values()), default=0)
    max_k = max_k or longest
    return {
        "text_to_image": recall_curve(lists["text_to_image"], gold, True, ids["txt_ids"], max_k),
        "image_to_text": recall_curve(lists["image_to_text"], gold, False, ids["img_ids"], max_k),
    }


def plot_recall_curves(rows: Mapping[str, str | Path], out_path: str | Path) -> Path:
    """One PNG: R@K against K, a panel per direction, a line per row (label -> directory)."""
    if not rows:
        raise DataError("no retrieval outputs to plot recall curves of")
    curves = {label: curves_of(path) for label, path in rows.items()}
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (direction, title) in zip(axes, DIRECTIONS.items()):
        for label, c in curves.items():
            ks = np.arange(1, len(c[direction]) + 1)
            ax.plot(ks, c[direction], marker="." if len(ks) <= 30 else None, label=label)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("K")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("R@K (%)")
    axes[0].set_ylim(0, 100)
    fig.tight_layout()
    return _save(fig, out_path)


def _save(fig, out_path: Path) -> Path:
    from utils.files import atomic_output

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _pyplot().close(fig)
    return out_path


# -------------------------------------------------------------------- a whole tree


def find_outputs(root: str | Path) -> tuple[list[Path], dict[str, Path]]:
    """Training run directories and recall rows (label -> directory) under `root`, sorted."""
    root = Path(root)
    runs = sorted({p.parent for p in root.rglob(METRICS_FILE)})
    rows = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir() or p.name not in (TOPK_FILE, RERANK_FILE):
            continue
        d = p.parent
        if p.name == RERANK_FILE and not (d / SCORES_FILE).is_file():
            continue
        if p.name == TOPK_FILE and not (d / INFO_FILE).is_file():
            continue
        label = str(d.relative_to(root)) if d != root else root.name
        split = _split_name(p)
        rows[f"{label} ({split})" if split else label] = d
    return runs, rows


def _split_name(result_file: Path) -> str | None:
    """The evaluated split of a recall row (from info.json or rerank.json), so val and test
    rows are told apart in one plot."""
    source = result_file.parent / INFO_FILE if result_file.name == TOPK_FILE else result_file
    try:
        split = json.loads(source.read_text()).get("split", {})
    except (OSError, ValueError):
        return None
    return split.get("name") if isinstance(split, dict) else None


def write_plots(sources: Sequence[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Plot everything found in `sources` (`[LABEL=]PATH` dirs); returns the PNG paths.

    The PNGs go to `out_dir` (default `FIRST_SOURCE/plots`): `{run}_training.png` per
    training run (its path below the source with `/` -> `_`, after the label when given; the
    source's name for a source that is itself a run) and `recall_at_k.png` for all recall rows.

    Raises:
        MissingPathError: a source does not exist, or nothing to plot was found.
    """
    if not sources:
        raise MissingPathError("no run directory given")
    runs: list[tuple[str, Path]] = []
    rows: dict[str, Path] = {}
    for source in sources:
        label, raw = "", str(source)
        if "=" in raw and not Path(raw).exists():
            label, raw = raw.split("=", 1)
        path = Path(raw)
        if not path.is_dir():
            raise MissingPathError(f"run directory {path} does not exist")
        found_runs, found_rows = find_outputs(path)
        for run in found_runs:
            rel = run.relative_to(path)
            name = "_".join((label,) + rel.parts if label else rel.parts) or label or path.name
            runs.append((name, run))
        for key, d in found_rows.items():
            rows[f"{label} / {key}" if label else key] = d
    if not runs and not rows:
        raise MissingPathError(f"nothing to plot under {', '.join(map(str, sources))}: "
                               f"no {METRICS_FILE}, {TOPK_FILE} or {RERANK_FILE}")
    first = Path(str(sources[0]).split("=", 1)[1] if "=" in str(sources[0]) and not Path(sources[0]).exists()
                 else sources[0])
    out_dir = Path(out_dir) if out_dir is not None else first / PLOTS_DIR
    written = [plot_training(run, out_dir / f"{name}{TRAINING_PLOT_SUFFIX}") for name, run in runs]
    if rows:
        written.append(plot_recall_curves(rows, out_dir / RECALL_PLOT))
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    """Write the plots; print their paths."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="[LABEL=]DIR: a run directory or a tree of them")
    parser.add_argument("--out_dir", default=None, help="where the PNGs go (default FIRST_DIR/plots)")
    args = parser.parse_args(argv)
    paths = write_plots(args.sources, args.out_dir)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    sys.exit(run_cli(main))
