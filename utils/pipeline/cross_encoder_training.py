"""What `rerank.py train` needs to train a UNITER cross-encoder (the loop is the entry point's).

UNITER's ITM ranking recipe: each example is one positive pair plus `cross_encoder.negative_size`
negative images for its caption and as many negative captions for its image, scored jointly and
trained with `cross_encoder.rank_loss`. Negatives are sampled uniformly; with
`retrieval.num_hard_negatives > 0` that many per side come first from the candidates of
`model.biencoder_checkpoint` (the bi-encoder whose top-M the re-ranker will see). Validation is
the share of held-out groups whose positive scores above all its negatives.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data.datasets import ItmRankDataset, itm_rank_collate
from data.samplers import LengthBucketBatchSampler
from model.checkpoint import load_cross_encoder_weights
from model.cross_encoder import build_cross_encoder
from utils.config import RunConfig, require_path
from utils.distributed import DistEnv, all_reduce
from utils.engine.training import ResumableLoader, eval_loader, to_device
from utils.errors import ConfigError
from utils.pipeline.evaluation import HardNegativeMiner, open_img_db, open_txt_db
from utils.pipeline.reranking import check_vocabulary
from utils.pipeline.retrieval_dir import load_biencoder, pick_precision
from utils.rng import seed_everything

logger = logging.getLogger(__name__)

# The task name of the ranking batches in the training log.
RANKING_TASK = "itm_rank"


def check_training_config(config: RunConfig) -> None:
    """Refuse a cross-encoder training config that cannot run, naming the key, before any work."""
    if not config.cross_encoder.model_config:
        raise ConfigError("cross_encoder.model_config (the UNITER JSON config of the cross-encoder) is not set")
    data = config.data
    if not data.train_txt_dbs or len(data.train_txt_dbs) != len(data.train_img_dbs):
        raise ConfigError(
            f"data.train_txt_dbs ({len(data.train_txt_dbs)}) and data.train_img_dbs "
            f"({len(data.train_img_dbs)}) must name the same, non-zero number of databases"
        )
    require_path(config.cross_encoder.model_config, "cross_encoder.model_config")
    if config.cross_encoder.checkpoint:
        require_path(config.cross_encoder.checkpoint, "cross_encoder.checkpoint", "file")
    if config.model.biencoder_checkpoint:
        require_path(config.model.biencoder_checkpoint, "model.biencoder_checkpoint", "file")


def hard_negative_miner(config: RunConfig, dataset: ItmRankDataset) -> HardNegativeMiner | None:
    """A miner of the bi-encoder's hard negatives for `dataset`, or None when not asked for.

    With `retrieval.num_hard_negatives > 0` (and a sampling mode other than `none`) the
    first that many negatives per side come from the candidates of
    `model.biencoder_checkpoint`, the bi-encoder whose top-M the re-ranker will see.
    """
    r = config.retrieval
    if r.num_hard_negatives <= 0 or r.hard_negatives_sampling == "none":
        return None
    negative_size = config.cross_encoder.negative_size
    if r.num_hard_negatives > negative_size:
        raise ConfigError(
            f"retrieval.num_hard_negatives ({r.num_hard_negatives}) exceeds cross_encoder.negative_size "
            f"({negative_size}), the negatives per side of an ITM example"
        )
    if not config.model.biencoder_checkpoint:
        raise ConfigError(
            "retrieval.num_hard_negatives > 0 mines hard negatives with the bi-encoder: set "
            "model.biencoder_checkpoint (or num_hard_negatives=0 for sampled negatives only)"
        )
    return HardNegativeMiner(dataset, r.num_hard_negatives, r.hard_negatives_sampling, config.train.seed)


def _open_dbs(config: RunConfig, txt_paths: Sequence[str], img_paths: Sequence[str], key: str):
    txt = [open_txt_db(str(require_path(p, f"data.{key}_txt_db(s)", "dir")), config.data) for p in txt_paths]
    img = [open_img_db(str(require_path(p, f"data.{key}_img_db(s)", "dir")), config.data) for p in img_paths]
    return txt, img


@dataclass
class RankingData:
    """The training and validation data of a cross-encoder run.

    Attributes:
        train_set: the ITM ranking examples of the training databases.
        loader: its resumable loader (this rank's share).
        miner: the bi-encoder's hard negatives, or None (sampled negatives only).
        val_loader: ranking groups of the validation split, or None without one.
    """

    train_set: ItmRankDataset
    loader: ResumableLoader
    miner: HardNegativeMiner | None
    val_loader: torch.utils.data.DataLoader | None

    @classmethod
    def open(cls, config: RunConfig, env: DistEnv) -> RankingData:
        """Open the databases and build the datasets, loaders and miner of `config`."""
        c, ce = config, config.cross_encoder
        txt_dbs, img_dbs = _open_dbs(c, c.data.train_txt_dbs, c.data.train_img_dbs, "train")
        val_dbs = None
        if c.data.val_txt_db and c.data.val_img_db:
            val_dbs = _open_dbs(c, [c.data.val_txt_db], [c.data.val_img_db], "val")
        train_set = ItmRankDataset(txt_dbs, img_dbs, ce.negative_size, None, "both", seed=c.train.seed)
        miner = hard_negative_miner(c, train_set)
        size_key = "max_tokens" if c.train.batch_size_unit == "tokens" else "batch_size"
        # No length bucketing here: when every positive caption of a batch has the same length
        # and the sampled negative captions do not, the ranking loss learns to key on length.
        sampler = LengthBucketBatchSampler(train_set.lens, seed=c.train.seed, shuffle=True, drop_last=False,
                                           rank=env.rank, world_size=env.world_size, bucket_batches=1,
                                           **{size_key: c.train.train_batch_size})
        loader = ResumableLoader(train_set, sampler, itm_rank_collate, seed=c.train.seed,
                                 num_workers=c.data.n_workers,
                                 pin_memory=c.data.pin_mem and env.device.type == "cuda")
        val_loader = None
        if val_dbs is not None:
            val_set = ItmRankDataset(*val_dbs, ce.negative_size, None, "both", seed=c.train.seed)
            val_sampler = LengthBucketBatchSampler(val_set.lens, batch_size=c.train.val_batch_size, shuffle=False,
                                                   rank=env.rank, world_size=env.world_size)
            val_loader = eval_loader(val_set, itm_rank_collate, val_sampler, c.data.n_workers)
        return cls(train_set, loader, miner, val_loader)

    def mine_with_biencoder(self, config: RunConfig, env: DistEnv) -> None:
        """Mine the hard negatives once with `model.biencoder_checkpoint` (fixed for the run)."""
        biencoder, _ = load_biencoder(config.model.biencoder_checkpoint, config)
        precision = pick_precision("auto", config.train.precision, env.device)
        self.miner.mine(biencoder.to(env.device), 0, 0, env, precision, config.train, config.data)


def build_cross_encoder_for_run(config: RunConfig) -> torch.nn.Module:
    """The initial cross-encoder: `cross_encoder.model_config`'s architecture, filled from
    `cross_encoder.checkpoint` (UNITER weights, ours, or a bi-encoder's image tower); a function
    of `train.seed` alone."""
    ce = config.cross_encoder
    seed_everything(config.train.seed)
    model = build_cross_encoder(ce.model_config, dropout=config.model.dropout, rank_loss=ce.rank_loss, margin=ce.margin)
    if ce.checkpoint:
        load_cross_encoder_weights(model, ce.checkpoint, allow_biencoder_init=True)
    else:
        logger.warning("cross_encoder.checkpoint is not set: training the cross-encoder from random weights")
    return model


def check_model_vocabulary(model: torch.nn.Module, data: RankingData, config: RunConfig) -> None:
    """Refuse training data whose token ids the cross-encoder's vocabulary lacks."""
    check_vocabulary(model, data.train_set.txt_dbs[0], config.cross_encoder.model_config)


def ranking_eval(model: torch.nn.Module, loader: Any, device: torch.device, precision: Any,
                 group_size: int) -> dict[str, float]:
    """Mean loss and the share of groups whose positive scores above all its negatives."""
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, groups
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch, device)
            with precision.autocast():
                out = model(batch)
            scores = out["scores"].float().view(-1, group_size)
            groups = scores.shape[0]
            total += torch.tensor(
                [float(out["loss"]) * groups, float((scores[:, 1:] < scores[:, :1]).all(1).sum()), groups],
                dtype=torch.float64, device=device,
            )
    total = all_reduce(total)
    model.train()
    return {"loss": float(total[0] / total[2]), "accuracy": float(100.0 * total[1] / total[2])}


def rank_loss(model: torch.nn.Module, batch: Mapping[str, Any], task: str) -> dict[str, torch.Tensor]:
    """The configured ranking loss of a batch of groups (the `Trainer`'s loss function)."""
    return {"loss": model(batch)["loss"]}
