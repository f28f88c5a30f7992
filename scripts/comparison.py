"""The one comparison table of the three systems: its rows, the cross-encoder's cost ratio and
the papers' claims, read from evaluation outputs in one directory layout.

`scripts/demo.py` and `scripts/compare_systems.py` both write their evaluations as the
subdirectories `SOURCES` names (an `inference.py` output for a bi-encoder row, a `rerank.py`
output for a cross-encoder row) and build the summary with `summarize` (`collect_rows`,
`cost_ratio`, `claims`) and print it with `format_summary`, so the demo's table and a table on
real data mean the same thing.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.run_files import INFO_FILE, RECALL_FILE, RERANK_FILE

RECALL_KS = (1, 5, 10)
DIRECTIONS = ("image_to_text", "text_to_image")
# The paper's evaluation sizes the cost ratio is projected to (Flickr30k 1K, COCO 5K).
PROJECTED_IMAGES = (1000, 5000)

# The rows of the table, in order: name -> what it is.
ROW_NAMES = {
    "cross_encoder": "UNITER-style cross-encoder ranking all pairs",
    "lightningdot": "LightningDOT bi-encoder",
    "lightningdot_reranked": "LightningDOT top-M re-ranked by the cross-encoder",
    "vldeformer": "VLDeformer (decomposed cross-encoder, bi-modal negatives)",
    "vldeformer_no_bimodal": "VLDeformer without bi-modal negatives",
    "hivlp": "HiVLP, flat search of the full embedding",
    "hivlp_cascade": "HiVLP, coarse-to-fine cascade",
    "zero_shot": "LightningDOT pre-trained, not fine-tuned",
}

# Row -> the output directory it is read from (an `inference.py` or a `rerank.py` output).
SOURCES = {
    "cross_encoder": "cross_encoder_all_pairs",
    "lightningdot": "eval_lightningdot",
    "lightningdot_reranked": "rerank",
    "vldeformer": "eval_vldeformer",
    "vldeformer_no_bimodal": "eval_vldeformer_no_bimodal",
    "hivlp": "eval_hivlp",
    "hivlp_cascade": "eval_hivlp_cascade",
    "zero_shot": "eval_zero_shot",
}
# The cost ratio at a second, smaller size: (all pairs, re-ranked top-M) at each size, small first.
RATIO_SOURCES = (("cross_encoder_all_pairs_small", "rerank_small"), ("cross_encoder_all_pairs", "rerank"))
RERANK_ROWS = ("cross_encoder", "lightningdot_reranked")


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def chance_recall(num_images: int, captions_per_image: int) -> dict[str, Any]:
    """Expected recall of random scores, in percent.

    Image retrieval: the one right image among N lands in the top k with probability k / N.
    Text retrieval: at least one of the image's c captions among the top k of the c * N
    captions: 1 - C(cN - c, k) / C(cN, k).
    """
    num_captions = num_images * captions_per_image
    t2i = {f"R@{k}": 100.0 * min(1.0, k / num_images) for k in RECALL_KS}
    i2t = {}
    for k in RECALL_KS:
        miss = math.comb(num_captions - captions_per_image, k) / math.comb(num_captions, k)
        i2t[f"R@{k}"] = 100.0 * (1.0 - miss)
    rsum = sum(t2i.values()) + sum(i2t.values())
    return {"text_to_image": t2i, "image_to_text": i2t, "rsum": rsum}


def _recall(recall: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "text_to_image": {f"R@{k}": recall["text_to_image"][f"R@{k}"] for k in RECALL_KS},
        "image_to_text": {f"R@{k}": recall["image_to_text"][f"R@{k}"] for k in RECALL_KS},
        "rsum": recall["rsum"],
    }


def present_rows(run_dir: Path) -> list[str]:
    """The rows whose output is in `run_dir`, in table order."""
    marker = {name: RERANK_FILE if name in RERANK_ROWS else RECALL_FILE for name in ROW_NAMES}
    return [name for name in ROW_NAMES if (run_dir / SOURCES[name] / marker[name]).is_file()]


def collect_rows(run_dir: Path, rows: Sequence[str] | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The table's rows (recall, RSUM, seconds, split) from the outputs under `run_dir`.

    Args:
        run_dir: holds the `SOURCES` directories of `rows`.
        rows: the rows to read (default: every row whose output is there).

    Returns:
        (row name -> row, in table order; the split and the re-ranking settings).
    """
    names = list(rows) if rows is not None else present_rows(run_dir)
    if "lightningdot_reranked" in names and "lightningdot" not in names:
        raise ValueError("the re-ranked row adds its seconds to the lightningdot row: read both")

    def retrieval(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        path = run_dir / SOURCES[name]
        return read_json(path / RECALL_FILE), read_json(path / INFO_FILE)

    def search_seconds(info: Mapping[str, Any]) -> dict[str, float]:
        return {"encode_s": info["timing"]["encode_s"], "search_s": info["timing"]["search_s"]}

    table: dict[str, dict[str, Any]] = {}
    split: dict[str, Any] | None = None
    settings: dict[str, Any] = {}
    for name in names:
        if name in RERANK_ROWS:
            continue
        recall, info = retrieval(name)
        if split is None:
            split = {"name": info["split"]["name"], "images": info["num_images"], "captions": info["num_captions"],
                     "subset": f"the first {info['num_images']} images of the {info['split']['name']} split "
                               f"(canonical order) and their {info['num_captions']} captions"}
        # The cascade's recall is that of its last stage's lists (top-M per query).
        if name == "hivlp_cascade":
            recall = recall["cascade"]["stages"][-1]["recall"]
        table[name] = {**_recall(recall), "timing": search_seconds(info)}
    if "cross_encoder" in names:
        all_pairs = read_json(run_dir / SOURCES["cross_encoder"] / RERANK_FILE)
        table["cross_encoder"] = {**_recall(all_pairs["after"]),
                                  "timing": {"cross_encoder_s": all_pairs["timing"]["rerank_s"]}}
    if "lightningdot_reranked" in names:
        reranked = read_json(run_dir / SOURCES["lightningdot_reranked"] / RERANK_FILE)
        table["lightningdot_reranked"] = {
            **_recall(reranked["after"]),
            "timing": {**table["lightningdot"]["timing"], "cross_encoder_s": reranked["timing"]["rerank_s"]},
        }
        settings = {"top_m": reranked["top_m"], "alpha": reranked["alpha"],
                    "reranked_before": _recall(reranked["before"])}
    if split is None:
        raise ValueError(f"{run_dir}: no bi-encoder evaluation among the rows {names}")
    for row in table.values():
        row["split"] = f"{split['name']}[:{split['images']}]"
        row["timing"]["total_s"] = sum(row["timing"].values())
    return {name: table[name] for name in ROW_NAMES if name in table}, {"split": split, **settings}


def cost_ratio(run_dir: Path) -> dict[str, Any]:
    """The cross-encoder's seconds of all pairs against the re-ranking of the top-M, at the two
    measured sizes (`RATIO_SOURCES`), and the ratio projected to the paper's sizes (labelled)."""
    measured = []
    for all_pairs, reranked in RATIO_SOURCES:
        a = read_json(run_dir / all_pairs / RERANK_FILE)
        r = read_json(run_dir / reranked / RERANK_FILE)
        measured.append({
            "images": a["num_queries"]["image_to_text"], "captions": a["num_queries"]["text_to_image"],
            "top_m": r["top_m"], "all_pairs": a["num_pairs"], "reranked_pairs": r["num_pairs"],
            "all_pairs_s": a["timing"]["rerank_s"], "rerank_s": r["timing"]["rerank_s"],
            "ratio": a["timing"]["rerank_s"] / max(r["timing"]["rerank_s"], 1e-9),
        })
    # All pairs grow with images x captions, the top-M with their sum: seconds per pair from the
    # larger measurement, five captions per image as the data (and Flickr30k / COCO) have. The
    # projected top-M counts every query's M pairs, also those both directions share (the
    # measurement scores them once), so the projected ratio errs low.
    largest = measured[-1]
    per_pair = largest["all_pairs_s"] / largest["all_pairs"]
    per_reranked_pair = largest["rerank_s"] / largest["reranked_pairs"]
    projected = []
    for n in PROJECTED_IMAGES:
        captions = 5 * n
        all_s = per_pair * n * captions
        rerank_s = per_reranked_pair * (captions + n) * largest["top_m"]
        projected.append({"images": n, "captions": captions, "top_m": largest["top_m"], "projected": True,
                          "all_pairs_s": all_s, "rerank_s": rerank_s, "ratio": all_s / rerank_s})
    return {"measured": measured, "projected": projected}


def claims(rows: Mapping[str, Mapping[str, Any]], ratio: Mapping[str, Any] | None, top_m: int | None,
           images: int) -> list[dict[str, Any]]:
    """Each paper's claim, the target for it and whether the rows meet it (claims whose rows
    are not all in the table are left out)."""
    def r1(row: str, direction: str) -> float:
        return rows[row][direction]["R@1"]

    def rsum(row: str) -> float:
        return rows[row]["rsum"]

    def r10(row: str, direction: str) -> float:
        return rows[row][direction]["R@10"]

    found = []
    if {"cross_encoder", "lightningdot"} <= rows.keys():
        found.append({
            "paper": "LightningDOT", "claim": "a cross-encoder ranking all pairs beats the bi-encoder",
            "target": "cross-encoder R@1 above LightningDOT's, both directions",
            "met": all(r1("cross_encoder", d) > r1("lightningdot", d) for d in DIRECTIONS)})
    if {"cross_encoder", "lightningdot_reranked"} <= rows.keys() and top_m is not None:
        cost = f"; cost ratio {ratio['measured'][-1]['ratio']:.0f}x here" if ratio else ""
        found.append({
            "paper": "LightningDOT",
            "claim": "re-ranking the bi-encoder's top-M matches the cross-encoder at a fraction of its cost",
            "target": f"top-{top_m} re-ranked RSUM within 1% of all pairs (M <= images / 10){cost}",
            "met": rsum("lightningdot_reranked") >= 0.99 * rsum("cross_encoder") and top_m <= images / 10})
    if {"vldeformer", "vldeformer_no_bimodal", "lightningdot", "cross_encoder"} <= rows.keys():
        found.append({
            "paper": "VLDeformer",
            "claim": "a decomposed cross-encoder keeps its accuracy at bi-encoder speed; bi-modal negatives keep it",
            "target": "RSUM >= LightningDOT's and >= 90% of the cross-encoder's; without bi-modal negatives below",
            "met": rsum("vldeformer") >= rsum("lightningdot") and rsum("vldeformer") >= 0.9 * rsum("cross_encoder")
                   and rsum("vldeformer_no_bimodal") < rsum("vldeformer")})
    if {"hivlp", "hivlp_cascade", "lightningdot"} <= rows.keys():
        found.append({
            "paper": "HiVLP", "claim": "coarse-to-fine search is faster at no loss",
            "target": "full-dimension RSUM at most 1 point below LightningDOT's; cascade R@10 within 0.5 of its "
                      "flat search",
            "met": rsum("hivlp") >= rsum("lightningdot") - 1.0
                   and all(abs(r10("hivlp_cascade", d) - r10("hivlp", d)) <= 0.5 for d in DIRECTIONS)})
    return found


def summarize(run_dir: Path, rows: Sequence[str] | None = None,
              ratio: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary of the outputs under `run_dir`: rows, chance on their split, the split and
    re-ranking settings, the cost ratio (None when not measured) and the claims the rows allow.

    Args:
        run_dir: holds the `SOURCES` directories of `rows`.
        rows: the rows to read (default: every row whose output is there).
        ratio: `cost_ratio(run_dir)`, when both sizes were measured.
    """
    table, settings = collect_rows(run_dir, rows)
    split = settings["split"]
    chance = chance_recall(split["images"], max(1, round(split["captions"] / split["images"])))
    found = claims(table, ratio, settings.get("top_m"), split["images"])
    return {"rows": table, "chance": chance, **settings, "cost_ratio": ratio, "claims": found}


def format_summary(summary: Mapping[str, Any], heading: str) -> str:
    """`heading`, the table, then the cost ratio and the claims where the summary has them."""
    parts = [heading, format_table(summary["rows"], summary["chance"])]
    if summary["cost_ratio"]:
        parts += ["", "The cross-encoder's seconds: all pairs against the re-ranked top-M",
                  format_ratio(summary["cost_ratio"])]
    if summary["claims"]:
        parts += ["", "The papers' claims on this data:", format_claims(summary["claims"])]
    return "\n".join(parts)


def format_table(rows: Mapping[str, Mapping[str, Any]], chance: Mapping[str, Any]) -> str:
    """The table as markdown: recall, RSUM and seconds of every row, chance first."""
    head = ("| system | TR R@1 | TR R@5 | TR R@10 | IR R@1 | IR R@5 | IR R@10 | RSUM "
            "| encode s | search s | cross-encoder s |")
    lines = [head, "|" + "---|" * 11]
    for name, row in [("chance", chance), *rows.items()]:
        tr, ir = row["image_to_text"], row["text_to_image"]
        t = row.get("timing", {})
        cells = [name, *(f"{tr[f'R@{k}']:.2f}" for k in RECALL_KS), *(f"{ir[f'R@{k}']:.2f}" for k in RECALL_KS),
                 f"{row['rsum']:.2f}"]
        cells += [f"{t[key]:.2f}" if key in t else "" for key in ("encode_s", "search_s", "cross_encoder_s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ratio(ratio: Mapping[str, Any]) -> str:
    """The cross-encoder's cost of both rankings, measured and projected."""
    lines = ["| images x captions | top-M | all pairs s | top-M re-ranked s | ratio |", "|---|---|---|---|---|"]
    for entry in [*ratio["measured"], *ratio["projected"]]:
        label = f"{entry['images']} x {entry['captions']}" + (" (projected)" if entry.get("projected") else "")
        lines.append(f"| {label} | {entry['top_m']} | {entry['all_pairs_s']:.2f} | {entry['rerank_s']:.2f} "
                     f"| {entry['ratio']:.0f}x |")
    return "\n".join(lines)


def format_claims(found: Sequence[Mapping[str, Any]]) -> str:
    """One line per claim: the paper, what it claims, the target here, met or not."""
    return "\n".join(f"  [{'met' if c['met'] else 'NOT met'}] {c['paper']}: {c['claim']} ({c['target']})"
                     for c in found)
