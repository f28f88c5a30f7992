"""Run configuration: typed dataclasses, YAML inheritance, overrides, original JSON configs.

Two file formats load into the same `RunConfig`:

* our YAML (or JSON) files, nested by section (`model:`, `data:`, `train:`, `retrieval:`,
  `rerank:`, `cross_encoder:`, `output_dir:`), optionally naming a `base:` file (relative
  to the file) whose values they override;
* the original LightningDOT / UNITER JSON run configs, whose keys are flat. Every flat key
  has exactly one home section, so they load unchanged.

Overrides given as `section.key=value` or, since flat names are unique, `key=value`.
Relative data and model paths resolve from the working directory, as in the original.

Every section is typed and checked here, when the config loads: nested values have classes of
their own (`Hierarchy`, `BimodalNegatives`, `IndexSpec`, `CascadeStage`) built by their
`from_config` and written back by `to_dict`. What needs a registry above this leaf (the model
family, the index type's parameters, the re-ranker, the pre-training tasks) is checked by
`utils/pipeline/run_config.py`, the loader every entry point uses, right after this one.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import json
import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from utils.errors import ConfigError, MissingPathError
from utils.files import atomic_write_text
from utils.hierarchy import Hierarchy

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- typed values of sections
#
# Each has `from_config(value, where)` (checks a config value; `where` names it in errors) and
# `to_dict()` (the form written to config.yaml and read back). `_coerce` builds them.

BIMODAL_KEYS = ("text", "image", "word_replace_prob", "region_mix", "vocab")


@dataclass(frozen=True)
class BimodalNegatives:
    """`data.bimodal_negatives`: how many composed negatives of each kind, and how.

    Attributes:
        text: composed captions per positive pair.
        image: composed images per positive pair.
        word_replace_prob: chance that each object word of a caption is replaced.
        region_mix: share of a composed image's regions taken from another image.
        vocab: the vocabulary file (token ids of object words); needed when `text` > 0.
    """

    text: int = 0
    image: int = 0
    word_replace_prob: float = 0.3
    region_mix: float = 0.5
    vocab: str = ""

    @classmethod
    def from_config(cls, value: Any, where: str = "data.bimodal_negatives") -> BimodalNegatives | None:
        """Parse and check the config value; None when it is empty or asks for no negatives.

        Raises:
            ConfigError: not a mapping, an unknown key or a value out of range (named).
        """
        if not value:
            return None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping {{{', '.join(BIMODAL_KEYS)}}}, got {value!r}")
        unknown = sorted(set(value) - set(BIMODAL_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; known: {list(BIMODAL_KEYS)}")
        hints = typing.get_type_hints(cls)
        spec = cls(**{key: _coerce(v, hints[key], f"{where}.{key}") for key, v in value.items()})
        for key in ("text", "image"):
            if getattr(spec, key) < 0:
                raise ConfigError(f"{where}.{key} must be an integer >= 0, got {getattr(spec, key)!r}")
        if not 0.0 < spec.word_replace_prob <= 1.0:
            raise ConfigError(f"{where}.word_replace_prob must be in (0, 1], got {spec.word_replace_prob!r}")
        if not 0.0 < spec.region_mix < 1.0:
            raise ConfigError(f"{where}.region_mix must be in (0, 1), got {spec.region_mix!r}")
        if spec.text > 0 and not spec.vocab:
            raise ConfigError(
                f"{where}.vocab is not set: composed captions need a vocabulary file of object-word "
                f"token ids (scripts/make_object_vocab.py; the synthetic data has object_vocab.txt)"
            )
        if spec.text == 0 and spec.image == 0:
            return None
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The config form."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class IndexSpec:
    """`retrieval.index`: an index type (a name of utils/search/indexes.py) and its parameters,
    written flat in a config: `{type: hnsw, m: 32, ef_search: 128}`."""

    type: str = "flat"
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, value: Any, where: str = "retrieval.index") -> IndexSpec:
        """Parse `{type, parameter: value, ...}` (the parameters are checked against the index
        type by utils/pipeline/run_config.py)."""
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping {{type: NAME, parameter: value, ...}}, got {value!r}")
        params = dict(value)
        kind = params.pop("type", "flat")
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"{where}.type: expected an index type name, got {kind!r}")
        return cls(kind, params)

    def to_dict(self) -> dict[str, Any]:
        """The config form: the type and the parameters side by side."""
        return {"type": self.type, **self.params}


CASCADE_KEYS = ("dim", "keep")


@dataclass(frozen=True)
class CascadeStage:
    """One stage of `retrieval.cascade`: search (first) or re-score (later) at level `dim`,
    keep `keep` candidates per query (utils/search/cascade.py)."""

    dim: int
    keep: int

    @classmethod
    def from_config(cls, value: Any, where: str = "retrieval.cascade[i]") -> CascadeStage:
        """Parse `{dim, keep}`, two positive ints."""
        if not isinstance(value, Mapping) or set(value) != set(CASCADE_KEYS):
            raise ConfigError(f"{where}: expected exactly the keys {list(CASCADE_KEYS)}, got {value!r}")
        values = [value[key] for key in CASCADE_KEYS]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ConfigError(f"{where}: dim and keep must be positive ints, got {dict(value)}")
        return cls(*values)

    def to_dict(self) -> dict[str, int]:
        """The config form."""
        return {"dim": self.dim, "keep": self.keep}


def check_cascade(stages: list[CascadeStage], top_k: int, where: str = "retrieval.cascade") -> None:
    """A cascade's stages together: dims strictly increasing, keeps not increasing, the last
    keep at least `top_k` (the lists inference keeps). The dims against the model's levels are
    checked when the model is loaded (utils/search/cascade.py `check_levels`)."""
    if any(b.dim <= a.dim for a, b in itertools.pairwise(stages)):
        raise ConfigError(f"{where}: dims must be strictly increasing, got {[s.dim for s in stages]}")
    if any(b.keep > a.keep for a, b in itertools.pairwise(stages)):
        raise ConfigError(f"{where}: a stage cannot keep more than the one before, got {[s.keep for s in stages]}")
    if stages and stages[-1].keep < top_k:
        raise ConfigError(f"{where}: the last stage keeps {stages[-1].keep}, below retrieval.top_k = {top_k}")


@dataclass
class ModelConfig:
    """Towers, projections and the checkpoints they start from."""

    # A local HF model directory or a HF config.json (hub names are refused offline).
    txt_model_config: str = ""
    img_model_config: str = ""
    img_checkpoint: str | None = None
    txt_checkpoint: str | None = None
    biencoder_checkpoint: str | None = None
    # Pre-training: a whole pre-training model (original `model_step_N.pt` or ours), heads
    # included, loaded last.
    pretrain_checkpoint: str | None = None
    # Local tokenizer directory; defaults to txt_model_config when that is a directory.
    tokenizer: str | None = None
    project_dim: int = 768
    dropout: float = 0.1
    cls_concat: Literal["add", "multiply", "none"] = "add"
    fix_img_encoder: bool = False
    fix_txt_encoder: bool = False
    # `packed` runs the towers and the cross-encoder on real tokens only (model/packed.py),
    # equal to `padded` within 1e-5 in fp32 and faster; `padded` is the plain BERT layout.
    execution: Literal["padded", "packed"] = "packed"
    # HiVLP embedding hierarchy (utils/hierarchy.py): {mode: prefix|heads, dims: [...],
    # weights: [...]}; empty = off (one flat embedding, as before).
    hierarchy: Hierarchy | None = None
    # Model family, a name of model/families.py: `lightningdot` (BERT text tower + UNITER image
    # tower) or `vldeformer` (model/vldeformer.py: one UNITER body run on text alone and on
    # regions alone; its architecture is `img_model_config`, or the `uniter_checkpoint`'s when
    # that is ours). The keys below up to `uniter_checkpoint` only apply to `vldeformer`;
    # `project_dim` applies to both (0 = no projection, as in the original VLDeformer). A key
    # of another family set in a config is refused when the config loads.
    type: str = "lightningdot"
    # `mean`: masked mean over the real output positions; `cls`: position 0.
    pooling: Literal["cls", "mean"] = "mean"
    # Put a [CLS] slot in front of the regions in the image pass.
    image_cls: bool = False
    # tanh on the pooled state (the original VLDeformer does).
    pool_tanh: bool = True
    # `cosine` L2-normalises both embeddings (the index's dot product is then the cosine).
    score: Literal["dot", "cosine"] = "cosine"
    # The contrastive loss divides its logits by this (the original uses 0.005 with cosine).
    temperature: float = 0.005
    # The decomposition: an original UNITER checkpoint or our cross-encoder checkpoint
    # (rerank.py train output) whose UNITER body initialises the model; its ITM head is dropped.
    uniter_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"model.temperature must be > 0, got {self.temperature}")
        if isinstance(self.hierarchy, Mapping):
            self.hierarchy = Hierarchy.from_config(self.hierarchy)
        # With project_dim 0 the full size is the tower's hidden size, checked at model build.
        if self.hierarchy is not None and self.project_dim:
            self.hierarchy.check_full_dim(self.project_dim)


@dataclass
class DatasetSpec:
    """One pre-training dataset: txt_dbs paired with img_dbs, its tasks and mix ratios."""

    name: str
    db: list[str]
    img: list[str]
    tasks: list[str] = field(default_factory=lambda: ["itm"])
    mix_ratio: list[float] = field(default_factory=list)


@dataclass
class DataConfig:
    """Databases and the feature / masking rules applied when reading them."""

    train_datasets: list[DatasetSpec] = field(default_factory=list)
    val_datasets: list[DatasetSpec] = field(default_factory=list)
    # Pre-training: keep only these tasks of every dataset (with their mix ratios), so an
    # objective ablation is one override; empty keeps every dataset's own task list.
    pretrain_tasks: list[str] = field(default_factory=list)
    train_txt_dbs: list[str] = field(default_factory=list)
    train_img_dbs: list[str] = field(default_factory=list)
    val_txt_db: str | None = None
    val_img_db: str | None = None
    test_txt_db: str | None = None
    test_img_db: str | None = None
    compressed_db: bool = False
    conf_th: float = 0.2
    max_bb: int = 100
    min_bb: int = 10
    num_bb: int = 36
    max_txt_len: int = 60
    mask_prob: float = 0.15
    mrm_prob: float = 0.15
    # The cross-encoder's ITM pre-training (`rerank.py train`, cross_encoder.mode pretrain):
    # share of examples whose image is replaced by another (UNITER's itm_neg_prob).
    itm_negative_prob: float = 0.5
    n_workers: int = 2
    pin_mem: bool = True
    # CMR batches: `distinct` samples no image twice in a batch; `mask` lets duplicates in
    # and removes them from the negatives. The loss masks same-image rows in both cases.
    duplicate_images: Literal["distinct", "mask"] = "distinct"
    # VLDeformer's bi-modal hard negatives (data/composed_negatives.py), for either model
    # family's fine-tuning: {text: N, image: M, word_replace_prob: 0.3, region_mix: 0.5,
    # vocab: FILE}, N composed captions and M composed images per positive pair; empty = off.
    # (Earlier configs spell it `train.bimodal_negatives`.)
    bimodal_negatives: BimodalNegatives | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bimodal_negatives, Mapping):
            self.bimodal_negatives = BimodalNegatives.from_config(self.bimodal_negatives)


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision and distribution."""

    train_batch_size: int = 64
    val_batch_size: int = 256
    # `tokens` counts text tokens + boxes per batch, as UNITER's pre-training sampler does.
    batch_size_unit: Literal["examples", "tokens"] = "examples"
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    # `adam` and `adamax` decay weights as an L2 term (torch's classes, as UNITER used them).
    optim: Literal["adamw", "adam", "adamax"] = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    adam_eps: float = 1e-8
    decay: Literal["linear", "constant", "cosine"] = "linear"
    weight_decay: float = 0.01
    # Clip the global gradient norm to this; 0 or less does not clip.
    grad_norm: float = 2.0
    warmup_steps: int = 100
    # When > 0, warm-up is int(warmup_ratio * total steps) and replaces warmup_steps (the
    # resolved value is what the run directory's config.yaml shows).
    warmup_ratio: float = 0.0
    # True: update n runs at the schedule's value for n - 1, so the first update has learning
    # rate 0 (the original train_itm.py's LambdaLR); False: UNITER's convention, update n at n.
    warmup_from_zero: bool = False
    # 0 derives the step count from num_train_epochs.
    num_train_steps: int = 0
    num_train_epochs: int = 0
    # 0 validates once per epoch (resolved to the updates of one epoch).
    valid_steps: int = 500
    # 0 saves at every validation.
    save_steps: int = 0
    keep_last: int = 3
    log_steps: int = 10
    seed: int = 42
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    distributed: Literal["auto", "none", "ddp", "horovod"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False


@dataclass
class RetrievalConfig:
    """Hard negatives, indexes and evaluation of the bi-encoder."""

    num_hard_negatives: int = 0
    hard_negatives_sampling: Literal[
        "none", "random", "top", "top-random", "10-20", "20-30"
    ] = "none"
    # Refresh hard negatives every N steps; 0 = once per epoch.
    steps_per_hard_neg: int = 0
    sample_init_hard_negatives: bool = False
    # `type` (flat | hnsw | ivfpq | ivfflat) and that type's parameters, e.g. {type: hnsw,
    # m: 32, ef_search: 128}; the parameters are checked against the index class at load.
    index: IndexSpec = field(default_factory=IndexSpec)
    inf_minibatch_size: int = 0
    # Candidates saved per query in topk.json.
    top_k: int = 100
    # Rows sampled (across the embedding shards) to train an index's quantiser; faiss wants
    # about 39 per IVF list, so a large `nlist` needs a large sample (e.g. 2.6M for 65,536).
    index_train_size: int = 262144
    # COCO 1K protocol: average over 5 folds of 1,000 images.
    coco_1k: bool = False
    eval_split: Literal["val", "test"] = "test"
    # Evaluate the first N images of the split (canonical order) and their captions only; 0 = all.
    # A fixed subset where ranking all pairs with a cross-encoder would cost too much.
    eval_images: int = 0
    # Coarse-to-fine retrieval over a hierarchical model's levels (utils/search/cascade.py):
    # [{dim: 64, keep: 1000}, {dim: 256, keep: 100}, {dim: 768, keep: 20}] searches the index
    # of the first level, then re-scores the kept candidates exactly at each next level;
    # topk.json then holds the last stage's lists. Empty = off.
    cascade: list[CascadeStage] = field(default_factory=list)
    # False: recall.json is the recall of the search's own top-k lists (R@K for K <= top_k,
    # exact whenever the search is), not an exact ranking of every caption against every
    # image: what a corpus of 100M images can afford. Per-level recall is then skipped.
    exact_recall: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.index, Mapping):
            self.index = IndexSpec.from_config(self.index)
        self.cascade = [CascadeStage.from_config(s, f"retrieval.cascade[{i}]") if isinstance(s, Mapping) else s
                        for i, s in enumerate(self.cascade)]
        check_cascade(self.cascade, self.top_k)
        if self.eval_images < 0:
            raise ConfigError(f"retrieval.eval_images must be >= 0 (0: every image), got {self.eval_images}")
        if self.index_train_size < 2:
            raise ConfigError(f"retrieval.index_train_size must be at least 2, got {self.index_train_size}")
        if not self.exact_recall:
            if self.coco_1k:
                raise ConfigError("retrieval.coco_1k ranks every caption of each fold: it needs retrieval.exact_recall=true")
            if self.top_k < 10:
                raise ConfigError(
                    f"retrieval.exact_recall=false reports R@1/5/10 from the search's lists: retrieval.top_k "
                    f"must be at least 10, got {self.top_k}"
                )


@dataclass
class RerankConfig:
    """Second stage: UNITER cross-encoder over the bi-encoder's top-M."""

    # The second stage, by name in utils.pipeline.reranking.RERANKERS.
    reranker: str = "cross-encoder"
    top_m: int = 20
    alpha: float = 0.0
    rerank_batch_size: int = 256


@dataclass
class CrossEncoderConfig:
    """The UNITER cross-encoder: what it starts from and how `rerank.py train` trains it."""

    # UNITER weights (pre-trained or ITM fine-tuned, an original file or ours) that training
    # starts from and re-ranking uses when --reranker_checkpoint is not given.
    checkpoint: str | None = None
    # UNITER JSON config of an original checkpoint (ours carry their config).
    model_config: str | None = None
    # Sampled negatives per side of each positive pair (UNITER's ITM ranking recipe).
    negative_size: int = 1
    # Hinge margin of the `hinge` ranking loss.
    margin: float = 0.2
    rank_loss: Literal["hinge", "softmax"] = "softmax"
    # What `rerank.py train` does: `rank`, ITM ranking fine-tuning (UNITER's train_itm.py);
    # `pretrain`, UNITER's pre-training objectives on image-caption pairs (the datasets and tasks
    # of data.train_datasets: itm, mlm, mrfr, mrckl on the joint input).
    mode: Literal["rank", "pretrain"] = "rank"
    # Hard negatives the cross-encoder mines itself (UNITER's train_itm_hard_negatives.py): when
    # > 0, the current model scores the `negative_size` sampled negatives of each side and the
    # training step takes the `hard_neg_size` highest-scored of each side. 0: all of them.
    hard_neg_size: int = 0

    def __post_init__(self) -> None:
        if self.negative_size < 1:
            raise ConfigError(f"cross_encoder.negative_size must be at least 1, got {self.negative_size}")
        if not 0 <= self.hard_neg_size <= self.negative_size:
            raise ConfigError(
                f"cross_encoder.hard_neg_size must lie in [0, negative_size = {self.negative_size}] (the "
                f"hardest of the sampled negatives), got {self.hard_neg_size}"
            )
        if self.margin < 0:
            raise ConfigError(f"cross_encoder.margin must be >= 0, got {self.margin}")


@dataclass
class RunConfig:
    """Everything one run needs; saved beside its checkpoints."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    cross_encoder: CrossEncoderConfig = field(default_factory=CrossEncoderConfig)
    output_dir: str = "runs/default"


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "retrieval": RetrievalConfig,
    "rerank": RerankConfig,
    "cross_encoder": CrossEncoderConfig,
}
TOP_LEVEL_KEYS = ("output_dir",)

# Fields that moved to another section: (old section, field) -> new section. Our earlier
# YAML files, saved run configs and `section.key=value` overrides still name the old home.
# (Flat keys need no entry: each names its one home through `flat_key_table`.)
MOVED_FIELDS: dict[tuple[str, str], str] = {
    ("model", "checkpoint"): "cross_encoder",
    ("model", "model_config"): "cross_encoder",
    ("retrieval", "negative_size"): "cross_encoder",
    ("retrieval", "margin"): "cross_encoder",
    ("rerank", "rank_loss"): "cross_encoder",
    ("train", "bimodal_negatives"): "data",
}

# Original keys that configured tools we replace (apex, comet, launchers, disabled paths).
IGNORED_ORIGINAL_KEYS = (
    "fp16_opt_level",
    "project_name",
    "expr_name_prefix",
    "rank",
    "local_rank",
    "itm_neg_prob",
    "itm_ot_lambda",
    "nce_temp",
    "neg_size",
    "full_val",
    # Architecture names: the tower config files say what the towers are.
    "txt_model_type",
    "img_model_type",
    # Image metadata the original used for display only.
    "itm_global_file",
)

# Original keys whose only working value we implement: the original programs raised or did
# nothing else for any other value.
FIXED_ORIGINAL_KEYS: dict[str, Any] = {
    # LightningDOT's train_itm.py raised "not supported anymore" for img_only / txt_only.
    "retrieval_mode": "both",
    # A score term over a separate caption encoder the released code never builds.
    "caption_score_weight": 0.0,
}


# `Optional[X]` and `X | None` annotations.
_UNION_TYPES = (typing.Union, types.UnionType)


def _fp16_to_precision(value: Any) -> str:
    return "fp16" if value else "fp32"


def _hnsw_to_index(value: Any) -> dict[str, Any]:
    return {"type": "hnsw" if value else "flat"}


def _index_type(value: Any) -> dict[str, Any]:
    return {"type": value}


# Original spellings that map onto one of our fields, with a value conversion.
ALIASES: dict[str, tuple[str, str, Any]] = {
    "valid_batch_size": ("train", "val_batch_size", None),
    "max_grad_norm": ("train", "grad_norm", None),
    "fp16": ("train", "precision", _fp16_to_precision),
    "hnsw_index": ("retrieval", "index", _hnsw_to_index),
    # Our earlier spelling of retrieval.index.type.
    "index_type": ("retrieval", "index", _index_type),
}


def _check_fixed(key: str, value: Any, source: str) -> None:
    expected = FIXED_ORIGINAL_KEYS[key]
    if value != expected:
        raise ConfigError(f"{source}: {key}={value!r} is not supported (as in the original); only {expected!r} is")


def flat_key_table() -> dict[str, str]:
    """Field name -> section, over every section (names are unique by design)."""
    table: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in table:
                raise RuntimeError(f"config field {f.name!r} is in two sections")
            table[f.name] = section
    return table


def _closest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in _UNION_TYPES:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _is_typed_value(tp: Any) -> bool:
    """A class that parses its own config value (`from_config`), e.g. `Hierarchy`."""
    return isinstance(tp, type) and hasattr(tp, "from_config")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`, converting strings from the command line."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in _UNION_TYPES:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        typed = [arg for arg in args if _is_typed_value(arg)]
        if typed:
            # A typed value's own parser names what is wrong (its None means "off").
            return typed[0].from_config(value, where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise bad
    if _is_typed_value(tp):
        return tp.from_config(value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str):
            raise ConfigError(f"{where}: expected one of {choices}, got {value!r}{_closest(value, [str(c) for c in choices])}")
        raise bad
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `5e-5` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    section = next((name for name, section_cls in SECTIONS.items() if section_cls is cls), None)
    for key, value in data.items():
        if key in IGNORED_ORIGINAL_KEYS and key not in hints:
            logger.warning("%s: key %r has no effect in this implementation", where, key)
            continue
        if key in FIXED_ORIGINAL_KEYS and key not in hints:
            _check_fixed(key, value, where)
            continue
        if key in ALIASES and ALIASES[key][0] == section and key not in hints:
            _, key, convert = ALIASES[key]
            value = convert(value) if convert else value
        if key not in hints:
            raise ConfigError(f"{where}: unknown key {key!r}{_closest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        raise ConfigError(f"{where}: missing required key(s) {missing}") from err


def _move_fields(nested: dict[str, Any]) -> dict[str, Any]:
    """`nested` with fields given in their old section (`MOVED_FIELDS`) in their new one."""
    for (old, name), new in MOVED_FIELDS.items():
        section = nested.get(old)
        if isinstance(section, dict) and name in section:
            nested = {**nested, old: {k: v for k, v in section.items() if k != name}}
            # A value given in the new home too wins.
            nested[new] = {name: section[name], **(nested.get(new) or {})}
    return nested


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot parse config file {path}: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def is_original_format(data: dict[str, Any]) -> bool:
    """Original run configs are flat: none of their keys is a section name."""
    nested = set(SECTIONS) | {"base"}
    return not any(key in nested for key in data)


def _flat_to_nested(
    flat: dict[str, Any], source: str, ignored: set[str]
) -> dict[str, Any]:
    table = flat_key_table()
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if key in TOP_LEVEL_KEYS:
            nested[key] = value
        elif key in IGNORED_ORIGINAL_KEYS:
            ignored.add(key)
        elif key in FIXED_ORIGINAL_KEYS:
            _check_fixed(key, value, source)
        elif key in ALIASES:
            section, name, convert = ALIASES[key]
            nested.setdefault(section, {})[name] = convert(value) if convert else value
        elif key in table:
            nested.setdefault(table[key], {})[key] = value
        else:
            valid = list(table) + list(ALIASES) + list(TOP_LEVEL_KEYS)
            raise ConfigError(f"{source}: unknown key {key!r}{_closest(key, valid)}")
    return nested


def _load_nested(path: Path, ignored: set[str], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config inheritance cycle: {chain}")
    data = _read_file(path)
    if is_original_format(data):
        return _flat_to_nested(data, str(path), ignored)
    base_name = data.pop("base", None)
    merged: dict[str, Any] = {}
    if base_name is not None:
        merged = _load_nested(path.parent / base_name, ignored, (*seen, path))
    for key in data:
        if key not in SECTIONS and key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"{path}: unknown section {key!r}{_closest(key, list(SECTIONS) + list(TOP_LEVEL_KEYS))}"
            )
        if key in SECTIONS and not isinstance(data[key], dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping")
    return _deep_merge(merged, _move_fields(data))


def _apply_override(nested: dict[str, Any], override: str, ignored: set[str]) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value or section.key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    value = yaml.safe_load(raw) if raw.strip() else ""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(
                f"override {override!r}: unknown section {section!r}{_closest(section, list(SECTIONS))}"
            )
        field_name, _, item = name.partition(".")
        section = MOVED_FIELDS.get((section, field_name), section)
        if item:
            # A key of a mapping field, e.g. retrieval.index.ef_search=64.
            nested.setdefault(section, {}).setdefault(field_name, {})[item] = value
        else:
            nested.setdefault(section, {})[name] = value
    else:
        converted = _flat_to_nested({key: value}, f"override {override!r}", ignored)
        if key in ALIASES:
            # An alias sets its whole field (index_type=flat drops the HNSW parameters).
            for section, fields in converted.items():
                nested.setdefault(section, {}).update(fields)
        else:
            nested.update(_deep_merge(nested, converted))


@dataclass(frozen=True)
class OriginalRule:
    """A value an original program hard-coded, whatever its config said.

    Attributes:
        key: our `section.field` that carries the behaviour.
        value: the value that reproduces the original program.
        replaces: original config keys that the program read but ignored for this.
        why: one line for the warning and the docs (what the original code did).
    """

    key: str
    value: Any
    replaces: tuple[str, ...] = ()
    why: str = ""


@dataclass(frozen=True)
class OriginalProgram:
    """How an original program read its flat JSON config: what a key left out meant.

    An original config leaves out every key whose argparse default the original program used;
    those defaults are often not ours (e.g. LightningDOT's `train_itm.py` warms up for 10% of
    the run and uses AdamW betas (0.9, 0.999) without weight decay). Applied to original flat
    configs only; our YAML configs keep our defaults.

    Attributes:
        name: the original program, for messages (e.g. "LightningDOT train_itm.py").
        defaults: original flat key -> the program's argparse default, filled where the file
            leaves the key out.
        rules: behaviour the program hard-coded, applied over the file's values.
        eps_by_optim: Adam epsilon of the optimiser class the program built for each `optim`.
    """

    name: str
    defaults: dict[str, Any]
    rules: tuple[OriginalRule, ...] = ()
    eps_by_optim: dict[str, float] = field(default_factory=dict)

    def resolve(self, flat: dict[str, Any], nested: dict[str, Any], source: str) -> dict[str, Any]:
        """`nested` (the file's values) completed with this program's defaults and rules."""
        ignored: set[str] = set()
        merged = _deep_merge(_flat_to_nested(self.defaults, f"{self.name} defaults", ignored), nested)
        for rule in self.rules:
            section, name = rule.key.split(".", 1)
            overruled = [key for key in rule.replaces if key in flat]
            if overruled:
                logger.warning(
                    "%s: %s has no effect, as in the original %s: %s (%s=%r); override %s on the "
                    "command line to change it", source, ", ".join(overruled), self.name, rule.why,
                    rule.key, rule.value, rule.key,
                )
            merged.setdefault(section, {})[name] = rule.value
        if self.eps_by_optim:
            optim = merged.get("train", {}).get("optim", TrainConfig.optim)
            if optim not in self.eps_by_optim:
                raise ConfigError(f"{source}: optim {optim!r} is not one of {sorted(self.eps_by_optim)}")
            merged.setdefault("train", {})["adam_eps"] = self.eps_by_optim[optim]
        return merged


def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    program: OriginalProgram | None = None,
) -> RunConfig:
    """Load a config file (ours or an original flat JSON), apply overrides, validate.

    Args:
        path: YAML/JSON config file.
        overrides: `section.key=value` or flat `key=value` strings, applied in order (they win
            over everything, the original program's rules included).
        program: the original program whose defaults and hard-coded rules an ORIGINAL flat
            config means (the entry script's counterpart); ignored for our nested configs.
    """
    path = Path(path)
    ignored: set[str] = set()
    raw = _read_file(path)
    nested = _load_nested(path, ignored)
    if program is not None and is_original_format(raw):
        nested = program.resolve(raw, nested, str(path))
    for override in overrides or []:
        _apply_override(nested, override, ignored)
    if ignored:
        logger.warning(
            "%s: key(s) %s configured tools this implementation replaces; they have no effect",
            path,
            sorted(ignored),
        )
    return _build_run_config(nested, str(path))


def _build_run_config(nested: dict[str, Any], source: str) -> RunConfig:
    """The typed, checked `RunConfig` of a nested dict; errors name `source` and the key."""
    kwargs: dict[str, Any] = {}
    for key in nested:
        if key not in SECTIONS and key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{source}: unknown section {key!r}")
    try:
        for section, cls in SECTIONS.items():
            kwargs[section] = _build(cls, nested.get(section) or {}, section)
        for key in TOP_LEVEL_KEYS:
            if key in nested:
                kwargs[key] = _coerce(nested[key], str, key)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    return RunConfig(**kwargs)


def _plain(value: Any) -> Any:
    """`value` as plain dicts, lists and scalars: typed values by their `to_dict()`."""
    if hasattr(value, "to_dict") and _is_typed_value(type(value)):
        return _plain(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON/torch.save friendly), the form `config_from_dict` reads."""
    return _plain(config)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Rebuild a RunConfig from `config_to_dict` output (e.g. stored in a checkpoint)."""
    return _build_run_config(_move_fields(data), source)


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def require_path(value: str | None, key: str, kind: str = "any") -> Path:
    """Check that a path named by config `key` exists; say which key and where we looked."""
    if not value:
        raise ConfigError(f"config key {key!r} is not set")
    path = Path(value)
    ok = {"file": path.is_file(), "dir": path.is_dir()}.get(kind, path.exists())
    if not ok:
        what = {"file": "file", "dir": "directory"}.get(kind, "path")
        raise MissingPathError(
            f"config key {key!r} points to {what} {value!r}, which does not exist "
            f"(relative paths resolve from the working directory {os.getcwd()})"
        )
    return path


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The flags every entry script shares."""
    parser.add_argument("--config", required=True, help="our YAML config or an original JSON config")
    parser.add_argument("--output_dir", default=None, help="overrides output_dir of the config")
    parser.add_argument(
        "overrides", nargs="*", default=[], help="section.key=value or key=value overrides"
    )


def config_from_args(args: argparse.Namespace, program: OriginalProgram | None = None) -> RunConfig:
    """Load `args.config` with `args.overrides` and `--output_dir`.

    Args:
        args: parsed command line (`add_config_args`).
        program: the original program an original flat config was written for.
    """
    config = load_config(args.config, args.overrides, program)
    if args.output_dir is not None:
        config.output_dir = args.output_dir
    return config
