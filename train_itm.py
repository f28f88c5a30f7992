"""Fine-tune the LightningDOT bi-encoder for image-text retrieval (SPEC 6).

    python train_itm.py --config configs/itm/flickr30k.yaml [--output_dir DIR]
                        [--resume | --overwrite] [key=value ...]
    torchrun --nproc_per_node N train_itm.py ...        horovodrun -np N python train_itm.py ...

In-batch contrastive loss in both directions with negatives gathered over all ranks, optional
hard negatives mined with the current model (between epochs or every `steps_per_hard_neg`
steps), validation recall every `valid_steps`, the best checkpoint by RSUM kept as
`ckpt/biencoder.best.pt`, and the test split evaluated with it into `test_results.json`.
The original LightningDOT JSON configs load unchanged.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from data.datasets import RetrievalDataset, retrieval_collate
from model.checkpoint import load_biencoder_weights
from model.losses import hierarchical_contrastive_loss
from model.retrieval import RetrievalModel
from utils.config import RunConfig, add_config_args, require_path
from utils.distributed import DistEnv, barrier, init_distributed, shutdown, unwrap_model
from utils.engine.cadence import BestCheckpoint, after_update
from utils.engine.loader import ResumableLoader
from utils.engine.run_dir import add_run_args
from utils.engine.trainer import MicroBatch, Trainer
from utils.errors import ConfigError, run_cli
from utils.files import atomic_write_json
from utils.original_programs import LIGHTNINGDOT_TRAIN_ITM
from utils.pipeline.evaluation import (
    EvalSplit,
    HardNegativeMiner,
    evaluate_recall,
    open_img_db,
    open_txt_db,
)
from utils.pipeline.model_setup import build_biencoder_for_run, check_model_paths
from utils.pipeline.run_config import TRAIN_ITM, run_config_from_args
from utils.pipeline.samplers import make_batch_sampler
from utils.pipeline.training_run import TrainingRun, save_model
from utils.precision import Precision, resolve_precision
from utils.rng import seed_everything
from utils.run_files import BIENCODER_BEST, BIENCODER_LAST, CKPT_DIR, TEST_RESULTS_FILE

logger = logging.getLogger("train_itm")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: config, output dir, resume/overwrite, key=value overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_run_args(parser)
    return parser.parse_args(argv)


def check_paths(cfg: RunConfig) -> None:
    """Fail before any heavy work, naming the config key whose path is missing."""
    data = cfg.data
    if not data.train_txt_dbs:
        require_path(None, "train_txt_dbs")
    if len(data.train_img_dbs) != len(data.train_txt_dbs):
        raise ConfigError(
            f"train_txt_dbs has {len(data.train_txt_dbs)} entries but train_img_dbs has "
            f"{len(data.train_img_dbs)}: give one img_db per txt_db"
        )
    for key in ("train_txt_dbs", "train_img_dbs"):
        for i, path in enumerate(getattr(data, key)):
            require_path(path, f"{key}[{i}]", "dir")
    for split in ("val", "test"):
        txt, img = getattr(data, f"{split}_txt_db"), getattr(data, f"{split}_img_db")
        if bool(txt) != bool(img):
            raise ConfigError(f"set both {split}_txt_db and {split}_img_db, or neither")
        if txt:
            require_path(txt, f"{split}_txt_db", "dir")
            require_path(img, f"{split}_img_db", "dir")
    check_model_paths(cfg.model)
    bimodal = cfg.data.bimodal_negatives
    if bimodal is not None and bimodal.vocab:
        require_path(bimodal.vocab, "data.bimodal_negatives.vocab", "file")


def itm_loss(model: torch.nn.Module, batch: Mapping[str, Any], task: str) -> dict[str, torch.Tensor]:
    """Contrastive loss of a retrieval batch, negatives gathered over all ranks: the weighted
    sum over the model's embedding levels (one level of weight 1 for a flat model)."""
    bare = unwrap_model(model)
    txt_levels, img_levels = model(batch)
    out = hierarchical_contrastive_loss(
        txt_levels, img_levels, bare.level_weights, num_pos=batch["num_pos"], txt_img_keys=batch["txt_img_keys"],
        img_keys=batch["img_keys"], mask_duplicates=True, temperature=bare.loss_temperature,
    )
    return {"loss": out.loss, "acc_t2i": out.n_correct_t2i.float() / out.n_pos,
            "acc_i2t": out.n_correct_i2t.float() / out.n_pos}


def build_model(cfg: RunConfig) -> RetrievalModel:
    """The initial bi-encoder: identical on every rank, a function of `train.seed` alone."""
    seed_everything(cfg.train.seed)
    return build_biencoder_for_run(cfg.model)


def main(
    argv: list[str] | None = None,
    *,
    on_step: Callable[[int, Mapping[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run fine-tuning; returns the best validation and the test metrics.

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`).
        on_step: called after every optimizer step with (step, metrics); tests use it.
    """
    args = parse_args(argv)
    cfg = run_config_from_args(args, LIGHTNINGDOT_TRAIN_ITM, TRAIN_ITM)
    check_paths(cfg)

    # ---- device, precision and distribution: every such decision is made here, once ----
    env = init_distributed(cfg.train.distributed, cfg.train.device)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s")
    precision = resolve_precision(cfg.train.precision, env.device)
    pin_memory = cfg.data.pin_mem and env.device.type == "cuda"
    logger.info("device %s, %s, %d rank(s), precision %s", env.device, env.backend, env.world_size, precision.name)

    try:
        txt_dbs = [open_txt_db(p, cfg.data) for p in cfg.data.train_txt_dbs]
        img_dbs = [open_img_db(p, cfg.data) for p in cfg.data.train_img_dbs]
        dataset = RetrievalDataset(txt_dbs, img_dbs)
        dataset.set_bimodal_negatives(cfg.data.bimodal_negatives, cfg.train.seed)
        sampler = make_batch_sampler(
            dataset.lens, cfg.train.train_batch_size, cfg.train.batch_size_unit, env,
            seed=cfg.train.seed, shuffle=True, img_names=dataset.img_names,
            allow_duplicate_images=cfg.data.duplicate_images == "mask",
        )
        loader = ResumableLoader(dataset, sampler, retrieval_collate, seed=cfg.train.seed,
                                 num_workers=cfg.data.n_workers, pin_memory=pin_memory, name="train")
        val = EvalSplit.open("val", cfg.data.val_txt_db, cfg.data.val_img_db, cfg.data) if cfg.data.val_txt_db else None
        rcfg = cfg.retrieval
        miner = HardNegativeMiner(dataset, rcfg.num_hard_negatives, rcfg.hard_negatives_sampling, cfg.train.seed)

        # Every input is checked before the output directory is touched.
        run = TrainingRun.open(cfg, env, batches_per_epoch=loader.batches_per_epoch(), resume=args.resume,
                               overwrite=args.overwrite, extra_artifacts=(TEST_RESULTS_FILE,))
        out = run.out
        model = build_model(cfg).to(env.device)

        def save_best(metrics: Mapping[str, Any], step: int) -> None:
            save_model(model, out / CKPT_DIR / BIENCODER_BEST, cfg, {"step": step, "val_rsum": metrics["rsum"]}, env)

        best = BestCheckpoint("rsum", save_best)
        trainer = run.trainer(model, precision, {"train_loader": loader, "hard_negatives": miner, "best": best},
                              on_step=on_step)
        try:
            _train(cfg, env, precision, model, trainer, loader, miner, val, best, run.accumulation)
            results = _finish(cfg, env, precision, model, trainer, best, out)
        finally:
            trainer.close()
        return results
    finally:
        shutdown(env)


def _mining_due(cfg: RunConfig, miner: HardNegativeMiner, loader: ResumableLoader, step: int) -> bool:
    if not miner.enabled:
        return False
    first = 0 if cfg.retrieval.sample_init_hard_negatives else 1
    every = cfg.retrieval.steps_per_hard_neg
    if every > 0:
        return step % every == 0 and step >= first * every and miner.mined_at != step
    return loader.at_epoch_start and loader.epoch >= first and miner.mined_epoch != loader.epoch


def _train(cfg: RunConfig, env: DistEnv, precision: Precision, model: RetrievalModel, trainer: Trainer,
           loader: ResumableLoader, miner: HardNegativeMiner, val: EvalSplit | None, best: BestCheckpoint,
           accumulation: int) -> None:
    """The training loop: hard-negative mining when due, updates, then the shared cadence."""
    def validate() -> None:
        if val is not None:
            metrics = evaluate_recall(model, val, env, precision, cfg.train, cfg.data)
            trainer.log(metrics, "val")
            logger.info("step %d: val RSUM %.2f (best %.2f)", trainer.step, metrics["rsum"], max(best.value, 0.0))
            best.update(metrics, trainer.step)

    while not trainer.done:
        micro_batches = []
        for _ in range(accumulation):
            if _mining_due(cfg, miner, loader, trainer.step):
                miner.mine(model, trainer.step, loader.epoch, env, precision, cfg.train, cfg.data)
                # Workers hold a copy of the dataset: restart them on the new negatives.
                loader.reset()
            batch = loader.next_batch()
            micro_batches.append(MicroBatch("itm", batch, loader.describe_last()))
        trainer.train_step(micro_batches, itm_loss)
        after_update(trainer, cfg.train, validate)


def _finish(cfg: RunConfig, env: DistEnv, precision: Precision, model: RetrievalModel, trainer: Trainer,
            best: BestCheckpoint, out: Path) -> dict[str, Any]:
    """Save the last model, evaluate the best one on the test split."""
    save_model(model, out / CKPT_DIR / BIENCODER_LAST, cfg, {"step": trainer.step}, env)
    best_path = out / CKPT_DIR / BIENCODER_BEST
    results: dict[str, Any] = {"step": trainer.step, "best_step": best.step, "val": best.metrics or None}
    if cfg.data.test_txt_db:
        checkpoint = best_path if best.step >= 0 else out / CKPT_DIR / BIENCODER_LAST
        _barrier_for_file(checkpoint)
        load_biencoder_weights(model, checkpoint)
        test = EvalSplit.open("test", cfg.data.test_txt_db, cfg.data.test_img_db, cfg.data)
        metrics = evaluate_recall(model, test, env, precision, cfg.train, cfg.data)
        trainer.log(metrics, "test")
        results["test"] = metrics
        if env.is_main:
            payload = {"checkpoint": str(checkpoint), "step": best.step if best.step >= 0 else trainer.step,
                       "test_txt_db": cfg.data.test_txt_db, "test_img_db": cfg.data.test_img_db, **metrics}
            atomic_write_json(out / TEST_RESULTS_FILE, payload, indent=2)
        logger.info("test: %s", json.dumps(metrics))
    return results


def _barrier_for_file(path: Path) -> None:
    """Rank 0 wrote `path`; make the other ranks wait until they can read it."""
    barrier()
    if not path.is_file():
        raise FileNotFoundError(f"expected checkpoint {path} (written by rank 0) is missing")


if __name__ == "__main__":
    sys.exit(run_cli(main))
