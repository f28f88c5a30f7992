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

The reranker checkpoint is an original UNITER file (raw state dict, `uniter.*` keys, maybe
`gamma`/`beta`; its JSON config from `--reranker_config` or `model.model_config`) or one of
our cross-encoder checkpoints (rebuilt alone).

`train` fine-tunes a cross-encoder for re-ranking, UNITER's ITM ranking recipe: each example
is one positive pair and `retrieval.negative_size` negative images for its caption plus as
many negative captions for its image, scored jointly and trained with `rerank.rank_loss`
(`hinge` with `retrieval.margin`, or `softmax`). Negatives are sampled uniformly; with
`retrieval.num_hard_negatives > 0` that many per side come first from the candidates of
`model.biencoder_checkpoint` (the bi-encoder whose top-M will be re-ranked), chosen by
`retrieval.hard_negatives_sampling`. It starts from `model.checkpoint` (UNITER pre-trained or
ITM fine-tuned weights, config `model.model_config`) and runs on the shared training
machinery (`utils/engine/training.py`: accumulation, AMP, torchrun / Horovod, exact resume). It
writes our cross-encoder checkpoints to `OUT/ckpt/cross_encoder.{best,last}.pt`.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data.datasets import ItmRankDataset, itm_rank_collate
from data.img_db import ImgDb
from data.samplers import LengthBucketBatchSampler
from data.txt_db import TxtDb
from model.checkpoint import load_cross_encoder_weights, make_checkpoint
from model.cross_encoder import build_cross_encoder
from optim.optimizer import build_optimizer
from optim.schedule import build_scheduler, resolve_run_length
from utils.config import (
    ConfigError,
    add_config_args,
    config_from_args,
    config_to_dict,
    load_config,
    require_path,
    save_config,
)
from utils.distributed import init_distributed, shutdown, wrap_optimizer
from utils.engine.training import (
    MicroBatch,
    ResumableLoader,
    Trainer,
    eval_loader,
    prepare_output_dir,
)
from utils.errors import run_cli
from utils.files import atomic_torch_save, atomic_write_json
from utils.original_programs import UNITER_TRAIN_ITM
from utils.pipeline.reranking import (
    CKPT_NAMES,
    RERANKERS,
    check_vocabulary,
    hard_negative_miner,
    ranking_eval,
    rerank_retrieval_dir,
)
from utils.pipeline.retrieval_dir import (
    PRECISIONS,
    check_retrieval_dir,
    load_biencoder,
    open_split,
    pick_precision,
    resolve_split,
)
from utils.precision import resolve_precision
from utils.rng import seed_everything
from utils.run_files import CKPT_DIR, CONFIG_FILE, VAL_RESULTS_FILE

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
                        help="UNITER state dict or our cross-encoder checkpoint (default model.checkpoint)")
    parser.add_argument("--reranker_config", default=None,
                        help="UNITER JSON config of an original checkpoint (default model.model_config)")
    parser.add_argument("--top_m", type=int, default=None, help="candidates per query (default rerank.top_m)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="bi-encoder weight in the fused score (default rerank.alpha; 0 = cross only)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    return parser


def run_rerank(args: argparse.Namespace) -> dict[str, Any]:
    """The re-ranking command (see module docstring)."""

    output_dir = args.output_dir
    config = load_config(args.config, args.overrides)
    split = resolve_split(config)
    top_m = args.top_m if args.top_m is not None else config.rerank.top_m
    alpha = args.alpha if args.alpha is not None else config.rerank.alpha
    if config.rerank.reranker not in RERANKERS:
        raise ConfigError(f"rerank.reranker: {config.rerank.reranker!r} is not one of {sorted(RERANKERS)}")
    checkpoint = args.reranker_checkpoint or config.model.checkpoint
    if not checkpoint:
        raise ConfigError("no re-ranker: pass --reranker_checkpoint (or set model.checkpoint)")
    # Fail on a foreign retrieval dir before loading anything big.
    check_retrieval_dir(args.retrieval_dir, split)
    env = init_distributed(config.train.distributed, config.train.device)
    try:
        t0 = time.perf_counter()
        txt_db, img_db = open_split(split)
        precision = pick_precision(args.precision, config.train.precision, env.device)
        reranker = RERANKERS[config.rerank.reranker](
            checkpoint, args.reranker_config or config.model.model_config, config, txt_db, img_db, env.device,
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
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --output_dir")
    group.add_argument("--overwrite", action="store_true", help="replace the run in --output_dir")
    return parser


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """ITM ranking fine-tuning of a UNITER cross-encoder (see module docstring)."""

    config = config_from_args(args, UNITER_TRAIN_ITM)
    c = config
    if not c.model.model_config:
        raise ConfigError("model.model_config (the UNITER JSON config of the cross-encoder) is not set")
    if not c.data.train_txt_dbs or len(c.data.train_txt_dbs) != len(c.data.train_img_dbs):
        raise ConfigError(
            f"data.train_txt_dbs ({len(c.data.train_txt_dbs)}) and data.train_img_dbs "
            f"({len(c.data.train_img_dbs)}) must name the same, non-zero number of databases"
        )
    env = init_distributed(c.train.distributed, c.train.device)
    try:
        seed_everything(c.train.seed)
        precision = resolve_precision(c.train.precision, env.device)

        def open_dbs(txt_paths: Sequence[str], img_paths: Sequence[str], key: str):
            txt = [TxtDb(str(require_path(p, f"data.{key}_txt_db(s)", "dir")), c.data.max_txt_len) for p in txt_paths]
            img = [ImgDb(str(require_path(p, f"data.{key}_img_db(s)", "dir")), c.data.conf_th, c.data.max_bb,
                         c.data.min_bb, c.data.num_bb, c.data.compressed_db) for p in img_paths]
            return txt, img

        # Every input is checked before the output directory is touched.
        require_path(c.model.model_config, "model.model_config")
        for key in ("checkpoint", "biencoder_checkpoint"):
            if getattr(c.model, key):
                require_path(getattr(c.model, key), f"model.{key}", "file")
        txt_dbs, img_dbs = open_dbs(c.data.train_txt_dbs, c.data.train_img_dbs, "train")
        val_dbs = None
        if c.data.val_txt_db and c.data.val_img_db:
            val_dbs = open_dbs([c.data.val_txt_db], [c.data.val_img_db], "val")
        train_set = ItmRankDataset(txt_dbs, img_dbs, c.retrieval.negative_size, None, "both", seed=c.train.seed)
        miner = hard_negative_miner(c, train_set)
        if c.train.batch_size_unit == "tokens":
            sampler_size = {"max_tokens": c.train.train_batch_size}
        else:
            sampler_size = {"batch_size": c.train.train_batch_size}
        # No length bucketing here: when every positive caption of a batch has the same length
        # and the sampled negative captions do not, the ranking loss learns to key on length.
        sampler = LengthBucketBatchSampler(train_set.lens, seed=c.train.seed, shuffle=True, drop_last=False,
                                           rank=env.rank, world_size=env.world_size, bucket_batches=1,
                                           **sampler_size)
        loader = ResumableLoader(train_set, sampler, itm_rank_collate, seed=c.train.seed,
                                 num_workers=c.data.n_workers, pin_memory=c.data.pin_mem and env.device.type == "cuda")
        accumulation = max(1, c.train.gradient_accumulation_steps)
        config.train = resolve_run_length(c.train, math.ceil(loader.batches_per_epoch() / accumulation))
        out = Path(c.output_dir)
        resume_from = prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite, env=env,
                                         extra_artifacts=(VAL_RESULTS_FILE,))
        if env.is_main:
            save_config(config, out / CONFIG_FILE)
        if miner is not None and resume_from is None:
            # Mined once: the bi-encoder is fixed. A resumed run gets the lists from its state.
            biencoder, _ = load_biencoder(c.model.biencoder_checkpoint, c)
            miner.mine(biencoder.to(env.device), 0, 0, env, pick_precision("auto", c.train.precision, env.device),
                       c.train, c.data)
            del biencoder

        val_loader = None
        if val_dbs is not None:
            v_txt, v_img = val_dbs
            val_set = ItmRankDataset(v_txt, v_img, c.retrieval.negative_size, None, "both", seed=c.train.seed)
            val_sampler = LengthBucketBatchSampler(val_set.lens, batch_size=c.train.val_batch_size, shuffle=False,
                                                   rank=env.rank, world_size=env.world_size)
            val_loader = eval_loader(val_set, itm_rank_collate, val_sampler, c.data.n_workers)

        model = build_cross_encoder(c.model.model_config, dropout=c.model.dropout, rank_loss=c.rerank.rank_loss,
                                    margin=c.retrieval.margin)
        if c.model.checkpoint:
            load_cross_encoder_weights(model, c.model.checkpoint, allow_biencoder_init=True)
        else:
            logger.warning("model.checkpoint is not set: training the cross-encoder from random weights")
        check_vocabulary(model, txt_dbs[0], c.model.model_config)
        model.to(env.device)

        total_steps = c.train.num_train_steps
        # Horovod's DistributedOptimizer is a new object: the scheduler must see that one.
        optimizer = wrap_optimizer(build_optimizer(model, c.train), model, env, accumulation)
        scheduler = build_scheduler(optimizer, c.train, total_steps)
        best: dict[str, float] = {"accuracy": -1.0, "step": 0}

        class _Best:
            def state_dict(self) -> dict[str, Any]:
                return dict(best)

            def load_state_dict(self, state: Mapping[str, Any]) -> None:
                best.update(state)

        trainer = Trainer(model, optimizer, scheduler, precision, env, c.train, total_steps=total_steps,
                          output_dir=out, run_config=config_to_dict(config),
                          stateful={"loader": loader, "best": _Best(), **({"hard_negatives": miner} if miner is not None else {})},
                          resume_from=resume_from)

        def compute_loss(m, batch, task):
            result = m(batch)
            return {"loss": result["loss"]}

        def validate_and_save() -> dict[str, float]:
            metrics = {}
            if val_loader is not None:
                metrics = ranking_eval(model, val_loader, env.device, precision, train_set.group_size)
                trainer.log(metrics, "val")
            if env.is_main:
                ckpt = make_checkpoint(model, config_to_dict(config), {"step": trainer.step, "val": metrics})
                atomic_torch_save(ckpt, out / CKPT_DIR / CKPT_NAMES[1])
                if val_loader is None or metrics["accuracy"] > best["accuracy"]:
                    best.update({"accuracy": metrics.get("accuracy", -1.0), "step": trainer.step})
                    atomic_torch_save(ckpt, out / CKPT_DIR / CKPT_NAMES[0])
            return metrics

        save_every = c.train.save_steps or c.train.valid_steps
        metrics: dict[str, float] = {}
        while not trainer.done:
            micro = [MicroBatch("itm_rank", loader.next_batch()) for _ in range(accumulation)]
            trainer.train_step(micro, compute_loss)
            if trainer.every(c.train.valid_steps) or trainer.done:
                metrics = validate_and_save()
            if trainer.every(save_every) or trainer.done:
                trainer.save_state()
        trainer.close()
        result = {"step": trainer.step, "val": metrics, "best": dict(best),
                  "checkpoint": str((out / CKPT_DIR / CKPT_NAMES[0]).resolve())}
        if env.is_main:
            atomic_write_json(out / VAL_RESULTS_FILE, result)
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
