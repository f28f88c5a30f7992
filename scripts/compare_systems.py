"""The demo's comparison table on any data: the three systems and the cross-encoder on one split.

    python scripts/compare_systems.py --config configs/itm/flickr30k.yaml --output_dir runs/compare \
        --lightningdot runs/itm/flickr30k/ckpt/biencoder.best.pt \
        --cross_encoder runs/rerank/flickr30k_hn/ckpt/cross_encoder.best.pt \
        [--vldeformer CKPT] [--vldeformer_no_bimodal CKPT] \
        [--hivlp CKPT --hivlp_config configs/itm/flickr30k_hivlp_prefix.yaml] [--zero_shot CKPT] \
        [--num_images 1000] [--ratio_images 100] [--top_m 20] [--alpha 0.0] [key=value ...]

Every row is measured on one fixed split: the first `--num_images` images of
`retrieval.eval_split` (canonical order) and all their captions (`retrieval.eval_images`),
small enough for the cross-encoder to rank all pairs. Each system runs through its entry
point, exactly as on the command line, into the directories `scripts/comparison.py` reads:
`inference.py` for every bi-encoder (HiVLP also with the cascade of `--hivlp_config`), then
`rerank.py` for the cross-encoder ranking every pair and for LightningDOT's top-M re-ranked
(weight `--alpha` on the bi-encoder; 0, the original's behaviour, the cross-encoder alone).
With `--ratio_images` the cross-encoder's cost of both is measured at that second size too, and
projected to 1K / 5K images. Prints the table, the cost ratio and each paper's claim against
the rows, and writes them to OUTPUT_DIR/summary.json (`scripts/report.py` prints it). An
original UNITER cross-encoder file needs `cross_encoder.model_config=uniter-base.json`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data.txt_db import TxtDb
from scripts.comparison import (
    SOURCES,
    cost_ratio,
    format_summary,
    summarize,
)
from utils.config import load_config
from utils.errors import ConfigError, run_cli
from utils.files import atomic_write_json
from utils.original_programs import LIGHTNINGDOT_EVAL_ITM
from utils.pipeline.retrieval_dir import resolve_split
from utils.run_files import SUMMARY_FILE

logger = logging.getLogger("compare_systems")

# Bi-encoder rows and the command-line option naming their checkpoint.
BIENCODER_ROWS = ("lightningdot", "vldeformer", "vldeformer_no_bimodal", "hivlp", "zero_shot")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config of the data (our YAML or an original JSON)")
    parser.add_argument("--output_dir", required=True, help="where every evaluation and summary.json go")
    parser.add_argument("--lightningdot", help="LightningDOT bi-encoder checkpoint")
    parser.add_argument("--vldeformer", help="VLDeformer checkpoint (with bi-modal negatives)")
    parser.add_argument("--vldeformer_no_bimodal", help="VLDeformer checkpoint trained without them")
    parser.add_argument("--hivlp", help="HiVLP (embedding hierarchy) bi-encoder checkpoint")
    parser.add_argument("--hivlp_config", help="config whose retrieval.cascade searches --hivlp coarse to fine")
    parser.add_argument("--zero_shot", help="pre-trained, not fine-tuned, LightningDOT checkpoint")
    parser.add_argument("--cross_encoder", help="cross-encoder checkpoint (ours, or an original UNITER file); "
                        "needs --lightningdot, whose complete lists it re-ranks")
    parser.add_argument("--num_images", type=int, default=100, help="the first N images of the split")
    parser.add_argument("--ratio_images", type=int, default=0,
                        help="second, smaller size for the cross-encoder's cost ratio (0: none)")
    parser.add_argument("--top_m", type=int, default=None,
                        help="LightningDOT's candidates re-ranked per query (default: a tenth of the images)")
    parser.add_argument("--alpha", type=float, default=0.0, help="bi-encoder weight in the re-ranked score")
    parser.add_argument("overrides", nargs="*", help="section.key=value or key=value overrides")
    return parser.parse_args(argv)


class Comparison:
    """The evaluations of one table, run through the entry points into `output_dir`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.output_dir)
        self.overrides = list(args.overrides)

    def num_captions(self, images: int) -> int:
        """Captions of the first `images` images of the evaluation split."""
        config = load_config(self.args.config, [*self.overrides, f"retrieval.eval_images={images}"],
                             LIGHTNINGDOT_EVAL_ITM)
        split = resolve_split(config)
        return len(TxtDb(split.txt_db, split.max_txt_len, split.num_images).ids)

    def evaluate(self, row: str, checkpoint: str, images: int, *, config: str | None = None,
                 top_k: int | None = None, directory: str | None = None) -> None:
        """`inference.py` of one bi-encoder on the first `images` images; complete lists unless `top_k`."""
        import inference

        inference.main([
            "--config", config or self.args.config, "--checkpoint", checkpoint,
            "--output_dir", str(self.out / (directory or SOURCES[row])), *self.overrides,
            f"retrieval.eval_images={images}", f"retrieval.top_k={top_k or self.num_captions(images)}",
        ])

    def rerank(self, directory: str, retrieval_dir: str, top_m: int, alpha: float, images: int) -> None:
        """`rerank.py` of a retrieval directory's top-M."""
        import rerank

        rerank.main([
            "--config", self.args.config, "--retrieval_dir", str(self.out / retrieval_dir),
            "--reranker_checkpoint", self.args.cross_encoder, "--top_m", str(top_m), "--alpha", str(alpha),
            "--output_dir", str(self.out / directory), *self.overrides, f"retrieval.eval_images={images}",
        ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every evaluation the arguments ask for; returns the summary (also printed / written)."""
    args = parse_args(argv)
    checkpoints = {row: getattr(args, row) for row in BIENCODER_ROWS if getattr(args, row)}
    if not checkpoints:
        raise ConfigError("give at least one bi-encoder: --lightningdot, --vldeformer, --vldeformer_no_bimodal, "
                          "--hivlp or --zero_shot")
    if args.cross_encoder and not args.lightningdot:
        raise ConfigError("--cross_encoder re-ranks LightningDOT's lists: give --lightningdot too")
    if args.hivlp_config and not args.hivlp:
        raise ConfigError("--hivlp_config searches --hivlp coarse to fine: give --hivlp too")
    if args.hivlp_config and not load_config(args.hivlp_config, args.overrides, LIGHTNINGDOT_EVAL_ITM).retrieval.cascade:
        raise ConfigError(f"--hivlp_config {args.hivlp_config}: retrieval.cascade is empty; the cascade row needs it")
    if args.num_images < 1 or args.ratio_images < 0 or args.ratio_images >= args.num_images:
        raise ConfigError("--num_images must be positive and --ratio_images in [0, --num_images)")
    top_m = args.top_m or max(1, args.num_images // 10)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = Comparison(args)
    images = args.num_images

    for row, checkpoint in checkpoints.items():
        run.evaluate(row, checkpoint, images)
    if args.hivlp_config:
        run.evaluate("hivlp_cascade", args.hivlp, images, config=args.hivlp_config, top_k=top_m)
    ratio = None
    if args.cross_encoder:
        run.rerank(SOURCES["cross_encoder"], SOURCES["lightningdot"], run.num_captions(images), 0.0, images)
        run.rerank(SOURCES["lightningdot_reranked"], SOURCES["lightningdot"], top_m, args.alpha, images)
        if args.ratio_images:
            small = args.ratio_images
            run.evaluate("lightningdot", args.lightningdot, small, directory="eval_lightningdot_small")
            run.rerank("cross_encoder_all_pairs_small", "eval_lightningdot_small", run.num_captions(small), 0.0, small)
            run.rerank("rerank_small", "eval_lightningdot_small", top_m, args.alpha, small)
            ratio = cost_ratio(run.out)

    measured = [*checkpoints, *(["hivlp_cascade"] if args.hivlp_config else []),
                *(["cross_encoder", "lightningdot_reranked"] if args.cross_encoder else [])]
    summary = summarize(run.out, measured, ratio)
    atomic_write_json(run.out / SUMMARY_FILE, summary, indent=2)
    print()
    print(format_summary(summary, f"Recall (%) and seconds on {summary['split']['subset']}"))
    print(f"\nsummary: {run.out / SUMMARY_FILE}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
