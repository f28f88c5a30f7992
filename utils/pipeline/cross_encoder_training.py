"""What `rerank.py train` needs to train a UNITER cross-encoder (the loops are the entry point's).

Two modes (`cross_encoder.mode`), UNITER's two stages:

* `pretrain`: UNITER's pre-training objectives on image-caption pairs (ITM with random
  negatives, MLM, MRFR, MRC-kl on the joint input; `utils/pipeline/pretrain_tasks/joint.py`),
  streams mixed by ratio as in `pretrain.py`;
* `rank`: ITM ranking fine-tuning. Each example is one positive pair plus
  `cross_encoder.negative_size` negative images for its caption and as many negative captions
  for its image, scored jointly and trained with `cross_encoder.rank_loss`. Negatives are
  sampled uniformly; with `retrieval.num_hard_negatives > 0` that many per side come first from
  the candidates of `model.biencoder_checkpoint` (the bi-encoder whose top-M the re-ranker will
  see); with `cross_encoder.hard_neg_size > 0` the cross-encoder scores the sampled negatives
  itself and trains on the hardest (UNITER's hard-negative recipe). Validation is the share of
  held-out groups whose positive scores above all its negatives.
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
from utils.distributed import DistEnv, all_reduce, unwrap_model
from utils.engine.loader import ResumableLoader, eval_loader, to_device
from utils.engine.trainer import MicroBatch
from utils.errors import ConfigError
from utils.pipeline.evaluation import HardNegativeMiner, open_img_db, open_txt_db
from utils.pipeline.pretrain_data import (
    StreamMix,
    build_streams,
    build_val_data,
    check_dataset_paths,
    task_loss,
    validate,
)
from utils.pipeline.pretrain_tasks import (
    CROSS_ENCODER_TASKS,
    cross_encoder_pretrain_model,
)
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
    if config.cross_encoder.mode == "pretrain":
        check_dataset_paths(config)
    elif not data.train_txt_dbs or len(data.train_txt_dbs) != len(data.train_img_dbs):
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


class RankingJob:
    """`rank` mode: ITM ranking groups, the bi-encoder's mined negatives, ranking accuracy.

    Attributes:
        train_set: the ITM ranking examples of the training databases.
        loader: its resumable loader (this rank's share).
        miner: the bi-encoder's hard negatives, or None (sampled negatives only).
        val_loader: ranking groups of the validation split, or None without one.
        loss: the trainer's loss function (on every sampled negative, or on the hardest).
    """

    best_metric = "accuracy"

    def __init__(self, config: RunConfig, env: DistEnv) -> None:
        """Open the databases and build the datasets, loaders and miner of `config`."""
        c, ce = config, config.cross_encoder
        self.config, self.env = config, env
        txt_dbs, img_dbs = _open_dbs(c, c.data.train_txt_dbs, c.data.train_img_dbs, "train")
        val_dbs = None
        if c.data.val_txt_db and c.data.val_img_db:
            val_dbs = _open_dbs(c, [c.data.val_txt_db], [c.data.val_img_db], "val")
        self.train_set = ItmRankDataset(txt_dbs, img_dbs, ce.negative_size, None, "both", seed=c.train.seed)
        self.miner = hard_negative_miner(c, self.train_set)
        size_key = "max_tokens" if c.train.batch_size_unit == "tokens" else "batch_size"
        # No length bucketing here: when every positive caption of a batch has the same length
        # and the sampled negative captions do not, the ranking loss learns to key on length.
        sampler = LengthBucketBatchSampler(self.train_set.lens, seed=c.train.seed, shuffle=True, drop_last=False,
                                           rank=env.rank, world_size=env.world_size, bucket_batches=1,
                                           **{size_key: c.train.train_batch_size})
        self.loader = ResumableLoader(self.train_set, sampler, itm_rank_collate, seed=c.train.seed,
                                      num_workers=c.data.n_workers,
                                      pin_memory=c.data.pin_mem and env.device.type == "cuda")
        self.val_loader = None
        if val_dbs is not None:
            val_set = ItmRankDataset(*val_dbs, ce.negative_size, None, "both", seed=c.train.seed)
            val_sampler = LengthBucketBatchSampler(val_set.lens, batch_size=c.train.val_batch_size, shuffle=False,
                                                   rank=env.rank, world_size=env.world_size)
            self.val_loader = eval_loader(val_set, itm_rank_collate, val_sampler, c.data.n_workers)
        self.loss = HardNegativeLoss(ce.negative_size, ce.hard_neg_size) if ce.hard_neg_size else rank_loss

    @property
    def batches_per_epoch(self) -> int | None:
        """Micro-batches of one epoch on this rank."""
        return self.loader.batches_per_epoch()

    def prepare(self, fresh: bool) -> None:
        """Mine the bi-encoder's hard negatives once, in a fresh run (`model.biencoder_checkpoint`
        is fixed; a resumed run gets the lists from its state)."""
        if self.miner is not None and fresh:
            biencoder, _ = load_biencoder(self.config.model.biencoder_checkpoint, self.config)
            precision = pick_precision("auto", self.config.train.precision, self.env.device)
            self.miner.mine(biencoder.to(self.env.device), 0, 0, self.env, precision, self.config.train,
                            self.config.data)

    def training_model(self, cross_encoder: torch.nn.Module) -> torch.nn.Module:
        """The module the trainer trains: the cross-encoder itself."""
        check_vocabulary(cross_encoder, self.train_set.txt_dbs[0], self.config.cross_encoder.model_config)
        return cross_encoder

    def stateful(self) -> dict[str, Any]:
        """What rides in the resume state: the loader position and the mined negatives."""
        return {"loader": self.loader, **({"hard_negatives": self.miner} if self.miner is not None else {})}

    def micro_batches(self, step: int, accumulation: int) -> list[MicroBatch]:
        """The next `accumulation` ranking batches."""
        return [MicroBatch(RANKING_TASK, self.loader.next_batch()) for _ in range(accumulation)]

    def evaluate(self, model: torch.nn.Module, precision: Any) -> dict[str, float]:
        """Ranking loss and accuracy on the validation groups ({} without a validation split)."""
        if self.val_loader is None:
            return {}
        return ranking_eval(model, self.val_loader, self.env.device, precision, self.train_set.group_size)


class PretrainingJob:
    """`pretrain` mode: UNITER's objectives on the joint input, streams mixed by ratio."""

    best_metric = "itm/acc"
    batches_per_epoch = None  # streams are mixed by ratio: steps, no epochs

    def __init__(self, config: RunConfig, env: DistEnv) -> None:
        """Open the datasets of `data.train_datasets` / `val_datasets` with the joint tasks."""
        self.config, self.env = config, env
        pin_memory = config.data.pin_mem and env.device.type == "cuda"
        self.mix = StreamMix(build_streams(config, env, pin_memory, CROSS_ENCODER_TASKS), config.train.seed)
        self.val = build_val_data(config, env, pin_memory, CROSS_ENCODER_TASKS)
        self.loss = task_loss(CROSS_ENCODER_TASKS)
        logger.info("streams: %s", self.mix.describe())

    def prepare(self, fresh: bool) -> None:
        """Nothing to mine."""

    def training_model(self, cross_encoder: torch.nn.Module) -> torch.nn.Module:
        """The cross-encoder with the heads of the joint tasks."""
        check_vocabulary(cross_encoder, self.mix.streams[0].loader.dataset.txt_dbs[0],
                         self.config.cross_encoder.model_config)
        return cross_encoder_pretrain_model(cross_encoder)

    def stateful(self) -> dict[str, Any]:
        """What rides in the resume state: the streams' positions."""
        return self.mix.stateful()

    def micro_batches(self, step: int, accumulation: int) -> list[MicroBatch]:
        """The micro-batches of update `step`, each from a stream drawn by ratio."""
        return self.mix.micro_batches(step, accumulation)

    def evaluate(self, model: torch.nn.Module, precision: Any) -> dict[str, Any]:
        """Per-task validation losses and accuracies ({} without validation datasets)."""
        if not self.val.loaders:
            return {}
        return validate(model, self.val, self.env, precision, self.config, CROSS_ENCODER_TASKS)


def open_job(config: RunConfig, env: DistEnv) -> RankingJob | PretrainingJob:
    """The training job of `cross_encoder.mode`."""
    return PretrainingJob(config, env) if config.cross_encoder.mode == "pretrain" else RankingJob(config, env)


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


def hardest_rows(scores: torch.Tensor, group_size: int, negative_size: int, hard_size: int) -> torch.Tensor:
    """Rows of a batch of ranking groups to train on: per group, the positive, then its
    `hard_size` highest-scored negative images, then its `hard_size` highest-scored captions.

    Args:
        scores: (G * group_size,) scores of the rows; each group is the positive, then
            `negative_size` negative images, then `negative_size` negative captions.
        group_size: `1 + 2 * negative_size`.
        negative_size: the sampled negatives of each side.
        hard_size: how many of each side to keep.

    Returns:
        (G * (1 + 2 * hard_size),) row indices into the batch, group after group.
    """
    if group_size != 1 + 2 * negative_size or not 0 < hard_size <= negative_size:
        raise ValueError(f"groups of {group_size} rows cannot keep the {hard_size} hardest of "
                         f"{negative_size} negatives per side")
    grouped = scores.reshape(-1, group_size)
    images = grouped[:, 1:1 + negative_size].topk(hard_size, dim=1).indices + 1
    captions = grouped[:, 1 + negative_size:].topk(hard_size, dim=1).indices + 1 + negative_size
    positives = torch.zeros_like(images[:, :1])
    local = torch.cat([positives, images, captions], dim=1)
    offsets = torch.arange(grouped.shape[0], device=scores.device).unsqueeze(1) * group_size
    return (local + offsets).reshape(-1)


def take_rows(batch: Mapping[str, Any], rows: torch.Tensor, group_size: int) -> dict[str, Any]:
    """The rows `rows` of a ranking batch (`itm_rank_collate` layout), as groups of `group_size`."""
    listed = rows.tolist()
    txt, img = batch["txt"], batch["img"]
    return {
        "txt": {k: v[rows] for k, v in txt.items()},
        "img": {k: v[rows] for k, v in img.items()},
        "txt_ids": [batch["txt_ids"][r] for r in listed],
        "img_names": [batch["img_names"][r] for r in listed],
        "labels": batch["labels"][rows],
        "group_size": group_size,
    }


@dataclass(frozen=True)
class HardNegativeLoss:
    """The ranking loss on the negatives the cross-encoder finds hardest (the `Trainer`'s loss
    function with `cross_encoder.hard_neg_size > 0`): the current model scores every row of the
    batch without gradient (dropout off), then the step trains on the positive and the
    `hard_size` highest-scored negatives of each side."""

    negative_size: int
    hard_size: int

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any], task: str) -> dict[str, torch.Tensor]:
        bare = unwrap_model(model)
        txt, img = batch["txt"], batch["img"]
        bare.eval()
        with torch.no_grad():
            scores = bare.score(txt["input_ids"], txt["attention_mask"], img["img_feat"], img["img_pos"],
                                img["img_mask"])
        bare.train()
        rows = hardest_rows(scores, int(batch["group_size"]), self.negative_size, self.hard_size)
        hard = take_rows(batch, rows, 1 + 2 * self.hard_size)
        return {"loss": model(hard)["loss"]}
