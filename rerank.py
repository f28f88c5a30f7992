"""Re-rank the bi-encoder's top-M with a UNITER cross-encoder (SPEC 8), or train one.

    python rerank.py --config CONFIG --retrieval_dir OUT --reranker_checkpoint UNITER_CKPT \
        --reranker_config UNITER_JSON [--top_m 20] [--alpha 0.0] [--output_dir DIR] [key=value ...]
    python rerank.py train --config CONFIG [--output_dir DIR] [--resume | --overwrite] [key=value ...]

Re-ranking reads `topk.json` of an `inference.py` run (`--retrieval_dir`, which must have
been produced from the split the config names), scores every (query, candidate) pair of each
query's top-M in both directions with the cross-encoder (each distinct pair once, batched,
sorted by length, autocast on a GPU), and re-orders each list by
`alpha * biencoder + (1 - alpha) * cross` (alpha 0 = the original: cross-encoder alone; ties
keep the stage-1 order). Written to `--output_dir` (default: the retrieval dir), atomically:

* `rerank.json`: `{"before": recall, "after": recall, "top_m", "alpha", "num_pairs",
  "num_queries": {"text_to_image", "image_to_text"}, "split", "retrieval_dir",
  "reranker_checkpoint", "reranker_format", "device", "precision", "timing": {...}}`, recall
  in the `utils/search/metrics.py` layout, both computed on the same top-M lists (before: bi-encoder
  order, after: fused order) with the SPEC 7 rules;
* `rerank_scores.json`: `{"text_to_image": {caption id: [[image, biencoder, cross], ...]},
  "image_to_text": {image: [[caption id, biencoder, cross], ...]}}`, keyed by the query, in
  re-ranked order.

The reranker checkpoint (default `cross_encoder.checkpoint`) is an original UNITER file (raw
state dict, `uniter.*` keys, maybe `gamma`/`beta`; its JSON config from `--reranker_config` or
`cross_encoder.model_config`) or one of our cross-encoder checkpoints (rebuilt alone).

`train` trains a cross-encoder the way UNITER's were, in two modes (`cross_encoder.mode`):

* `pretrain`: UNITER's pre-training objectives on image-caption pairs, on the joint input: ITM
  with random negatives (`data.itm_negative_prob`), MLM, MRFR, MRC-kl, by the datasets, tasks
  and mix ratios of `data.train_datasets` (streams mixed as in `pretrain.py`); the best
  checkpoint by validation ITM accuracy;
* `rank` (default): ITM ranking fine-tuning. Each example is one positive pair and
  `cross_encoder.negative_size` negative images for its caption plus as many negative captions
  for its image, scored jointly and trained with `cross_encoder.rank_loss` (`hinge` with
  `cross_encoder.margin`, or `softmax`). Negatives are sampled uniformly; with
  `retrieval.num_hard_negatives > 0` that many per side come first from the candidates of
  `model.biencoder_checkpoint` (the bi-encoder whose top-M will be re-ranked), chosen by
  `retrieval.hard_negatives_sampling`; with `cross_encoder.hard_neg_size > 0` the cross-encoder
  scores the sampled negatives itself at every step and trains on the hardest of each side
  (UNITER's train_itm_hard_negatives.py). The best checkpoint by validation ranking accuracy.

Both start from `cross_encoder.checkpoint` (UNITER pre-trained or ITM fine-tuned weights, one
of ours, or a bi-encoder's UNITER image tower; config `cross_encoder.model_config`) and run on
the run set-up every trainer shares (`utils/pipeline/training_run.py`, `utils/engine/`:
per-rank seeds, accumulation, AMP, torchrun / Horovod, exact resume, validate / save cadence,
best checkpoint). They write our cross-encoder checkpoints (the pre-training heads stay in the
resume state) to `OUT/ckpt/cross_encoder.{best,last}.pt` (`utils/pipeline/cross_encoder_training.py`
has the data, model and evaluation of each mode; the loop is here, as in the other two trainers).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from utils.config import add_config_args
from utils.distributed import init_distributed, shutdown
from utils.engine.cadence import BestCheckpoint, after_update
from utils.engine.run_dir import add_run_args
from utils.errors import ConfigError, run_cli
from utils.files import atomic_write_json
from utils.original_programs import UNITER_TRAIN_ITM
from utils.pipeline.cross_encoder_training import (
    build_cross_encoder_for_run,
    check_training_config,
    open_job,
)
from utils.pipeline.reranking import RERANKERS, rerank_retrieval_dir
from utils.pipeline.retrieval_dir import (
    PRECISIONS,
    check_retrieval_dir,
    open_split,
    pick_precision,
    resolve_split,
)
from utils.pipeline.run_config import (
    TRAIN_CROSS_ENCODER,
    load_run_config,
    run_config_from_args,
)
from utils.pipeline.training_run import TrainingRun, save_model
from utils.precision import resolve_precision
from utils.rng import seed_everything
from utils.run_files import (
    CKPT_DIR,
    CROSS_ENCODER_BEST,
    CROSS_ENCODER_LAST,
    VAL_RESULTS_FILE,
)

logger = logging.getLogger("rerank")


# ---------------------------------------------------------------- rerank command


def build_parser() -> argparse.ArgumentParser:
    """Command line of the re-ranking run."""
    parser = argparse.ArgumentParser(description="Re-rank an inference run's top-M with a UNITER cross-encoder.")
    # Not add_config_args: here --output_dir is where the results go, not a config override.
    parser.add_argument("--config", required=True, help="our YAML config or an original JSON config")
    parser.add_argument("--output_dir", default=None, help="where rerank.json goes (default: --retrieval_dir)")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value or key=value overrides")
    parser.add_argument("--retrieval_dir", required=True, help="output directory of inference.py")
    parser.add_argument("--reranker_checkpoint", default=None,
                        help="UNITER state dict or our cross-encoder checkpoint (default cross_encoder.checkpoint)")
    parser.add_argument("--reranker_config", default=None,
                        help="UNITER JSON config of an original checkpoint (default cross_encoder.model_config)")
    parser.add_argument("--top_m", type=int, default=None, help="candidates per query (default rerank.top_m)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="bi-encoder weight in the fused score (default rerank.alpha; 0 = cross only)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    return parser


def run_rerank(args: argparse.Namespace) -> dict[str, Any]:
    """The re-ranking command (see module docstring)."""

    output_dir = args.output_dir
    config = load_run_config(args.config, args.overrides)
    split = resolve_split(config)
    top_m = args.top_m if args.top_m is not None else config.rerank.top_m
    alpha = args.alpha if args.alpha is not None else config.rerank.alpha
    checkpoint = args.reranker_checkpoint or config.cross_encoder.checkpoint
    if not checkpoint:
        raise ConfigError("no re-ranker: pass --reranker_checkpoint (or set cross_encoder.checkpoint)")
    # Fail on a foreign retrieval dir before loading anything big.
    check_retrieval_dir(args.retrieval_dir, split)
    env = init_distributed(config.train.distributed, config.train.device)
    try:
        t0 = time.perf_counter()
        txt_db, img_db = open_split(split)
        precision = pick_precision(args.precision, config.train.precision, env.device)
        reranker = RERANKERS[config.rerank.reranker](
            checkpoint, args.reranker_config or config.cross_encoder.model_config, config, txt_db, img_db, env.device,
            precision,
        )
        load_s = time.perf_counter() - t0
        extra = {
            **reranker.describe,
            "device": str(env.device),
            "precision": precision.name,
            "timing": {"load_s": load_s},
        }
        return rerank_retrieval_dir(args.retrieval_dir, split, reranker.scorer, top_m, alpha, output_dir, txt_db,
                                    extra)
    finally:
        shutdown(env)


# ---------------------------------------------------------------- train command


def build_train_parser() -> argparse.ArgumentParser:
    """Command line of `rerank.py train`."""
    parser = argparse.ArgumentParser(
        prog="rerank.py train", description="Fine-tune a UNITER cross-encoder for re-ranking (ITM ranking)."
    )
    add_config_args(parser)
    add_run_args(parser)
    return parser


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Train a UNITER cross-encoder: ITM ranking fine-tuning or UNITER's pre-training objectives
    (`cross_encoder.mode`; see module docstring).

    Returns:
        `{"step", "val", "best": {metric: value, "step"}, "checkpoint"}` (the metric: ranking
        `accuracy`, or `itm/acc` when pre-training; also written to `OUT/val_results.json`).
    """
    cfg = run_config_from_args(args, UNITER_TRAIN_ITM, TRAIN_CROSS_ENCODER)
    check_training_config(cfg)

    # ---- device, precision and distribution: every such decision is made here, once ----
    env = init_distributed(cfg.train.distributed, cfg.train.device)
    precision = resolve_precision(cfg.train.precision, env.device)
    try:
        seed_everything(cfg.train.seed)
        job = open_job(cfg, env)
        # Every input is checked before the output directory is touched.
        run = TrainingRun.open(cfg, env, batches_per_epoch=job.batches_per_epoch, resume=args.resume,
                               overwrite=args.overwrite, extra_artifacts=(VAL_RESULTS_FILE,))
        job.prepare(fresh=run.resume_from is None)
        cross_encoder = build_cross_encoder_for_run(cfg)
        model = job.training_model(cross_encoder).to(env.device)

        def save(name: str, metrics: Mapping[str, Any], step: int) -> None:
            # The cross-encoder alone (pre-training heads stay in the resume state).
            save_model(cross_encoder, run.out / CKPT_DIR / name, cfg, {"step": step, "val": dict(metrics)}, env)

        best = BestCheckpoint(job.best_metric, lambda metrics, step: save(CROSS_ENCODER_BEST, metrics, step))
        trainer = run.trainer(model, precision, {**job.stateful(), "best": best})
        metrics: dict[str, Any] = {}

        def validate() -> None:
            nonlocal metrics
            metrics = job.evaluate(model, precision)
            if metrics:
                trainer.log(metrics, "val")
            save(CROSS_ENCODER_LAST, metrics, trainer.step)
            if job.best_metric in metrics:
                best.update(metrics, trainer.step)
            else:
                save(CROSS_ENCODER_BEST, metrics, trainer.step)  # nothing to compare: the best is the last

        try:
            while not trainer.done:
                trainer.train_step(job.micro_batches(trainer.step, run.accumulation), job.loss)
                after_update(trainer, cfg.train, validate)
        finally:
            trainer.close()
        best_summary = {job.best_metric: best.value if best.step >= 0 else None,
                        "step": best.step if best.step >= 0 else trainer.step}
        result = {"step": trainer.step, "val": metrics, "best": best_summary,
                  "checkpoint": str((run.out / CKPT_DIR / CROSS_ENCODER_BEST).resolve())}
        if env.is_main:
            atomic_write_json(run.out / VAL_RESULTS_FILE, result)
        return result
    finally:
        shutdown(env)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`rerank.py ...` re-ranks (returns rerank.json's dict); `rerank.py train ...` trains."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return run_train(build_train_parser().parse_args(argv[1:]))
    return run_rerank(build_parser().parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_cli(main))
