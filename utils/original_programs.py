"""What an original flat JSON config meant to the original program that read it.

Each entry script that accepts an original config passes its counterpart here to
`load_config`: keys the file leaves out take that program's argparse default, and behaviour
the program hard-coded (warm-up rule, optimiser, schedule convention) overrides the file, as it
did in the original. Read from the original sources (LightningDOT `train_itm.py` +
`dvl/options.py` + `dvl/models/bi_encoder.py`, LightningDOT `pretrain.py` + UNITER `optim/`,
UNITER `train_itm.py`); docs/reproduce.md tabulates them next to our YAML defaults.
"""
from __future__ import annotations

from utils.config import OriginalProgram, OriginalRule

# UNITER's own AdamW (optim/adamw.py) defaults to eps 1e-6; its `adam` / `adamax` choices are
# torch's classes with eps 1e-8.
UNITER_EPS_BY_OPTIM = {"adamw": 1e-6, "adam": 1e-8, "adamax": 1e-8}

# Image-feature keys every original program defaults the same way.
_IMAGE_DEFAULTS = {"conf_th": 0.2, "max_bb": 100, "min_bb": 10, "num_bb": 36, "compressed_db": False}

LIGHTNINGDOT_TRAIN_ITM = OriginalProgram(
    name="LightningDOT train_itm.py",
    defaults={
        **_IMAGE_DEFAULTS,
        "train_batch_size": 80,
        "valid_batch_size": 80,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-5,
        "max_grad_norm": 2.0,
        "num_train_epochs": 0,
        "seed": 42,
        "fp16": False,
        "max_txt_len": 64,
        "n_workers": 2,
        "pin_mem": False,
        "project_dim": 0,
        "num_hard_negatives": 0,
        "hard_negatives_sampling": "none",
        # The original's -1 (mine between epochs) is our 0.
        "steps_per_hard_neg": 0,
        "sample_init_hard_negatives": False,
        "inf_minibatch_size": 400,
        "hnsw_index": False,
    },
    rules=(
        OriginalRule("train.warmup_ratio", 0.1, ("warmup_steps",),
                     "warm-up is hard-coded to int(0.1 * total updates)"),
        OriginalRule("train.num_train_steps", 0, ("num_train_steps",),
                     "training runs num_train_epochs epochs"),
        OriginalRule("train.valid_steps", 0, ("valid_steps",), "validation runs after every epoch"),
        OriginalRule("train.optim", "adamw", ("optim",), "the optimiser is hard-coded AdamW"),
        OriginalRule("train.betas", [0.9, 0.999], ("betas",), "AdamW keeps its default betas"),
        OriginalRule("train.adam_eps", 1e-8, (), "AdamW eps is passed as 1e-8"),
        OriginalRule("train.weight_decay", 0.0, ("weight_decay",), "AdamW has no weight decay"),
        OriginalRule("train.decay", "linear", ("decay",), "the schedule is linear warm-up then decay"),
        OriginalRule("train.warmup_from_zero", True, (),
                     "a LambdaLR evaluated at the updates done gives the first update lr 0"),
        OriginalRule("train.batch_size_unit", "examples", (), "batches count captions"),
    ),
)

LIGHTNINGDOT_EVAL_ITM = OriginalProgram(
    name="LightningDOT eval_itm.py",
    defaults={
        **_IMAGE_DEFAULTS,
        "valid_batch_size": 80,
        "seed": 42,
        "fp16": False,
        "max_txt_len": 64,
        "n_workers": 2,
        "pin_mem": False,
        "project_dim": 0,
        "hnsw_index": False,
    },
    rules=(OriginalRule("retrieval.inf_minibatch_size", 400, ("inf_minibatch_size",),
                        "the encoding batch is hard-coded to 400"),),
)

LIGHTNINGDOT_PRETRAIN = OriginalProgram(
    name="LightningDOT pretrain.py",
    defaults={
        **_IMAGE_DEFAULTS,
        "train_batch_size": 4096,
        "val_batch_size": 4096,
        "gradient_accumulation_steps": 16,
        "learning_rate": 3e-5,
        "valid_steps": 1000,
        "num_train_steps": 100000,
        "optim": "adamw",
        "betas": [0.9, 0.98],
        "decay": "linear",
        "dropout": 0.1,
        "weight_decay": 0.01,
        "grad_norm": 2.0,
        "warmup_steps": 10000,
        "seed": 42,
        "fp16": False,
        "n_workers": 4,
        "pin_mem": False,
        "max_txt_len": 60,
        "mrm_prob": 0.15,
        "project_dim": 0,
        # The original's "" adds nothing: plain MLM, not VMLM (see SPEC 5).
        "cls_concat": "none",
    },
    rules=(
        OriginalRule("train.batch_size_unit", "tokens", (), "batches count text tokens + boxes"),
        OriginalRule("train.warmup_ratio", 0.0, (), "warm-up is warmup_steps"),
        OriginalRule("train.warmup_from_zero", False, (), "update n runs at the schedule's step n"),
    ),
    eps_by_optim=UNITER_EPS_BY_OPTIM,
)

UNITER_TRAIN_ITM = OriginalProgram(
    name="UNITER train_itm.py",
    defaults={
        **_IMAGE_DEFAULTS,
        "train_batch_size": 128,
        "negative_size": 1,
        "margin": 0.2,
        "gradient_accumulation_steps": 16,
        "learning_rate": 3e-5,
        "valid_steps": 1000,
        "num_train_steps": 100000,
        "optim": "adam",
        "betas": [0.9, 0.98],
        "dropout": 0.1,
        "weight_decay": 0.01,
        "grad_norm": 0.25,
        "warmup_steps": 4000,
        "seed": 42,
        "fp16": False,
        "n_workers": 4,
        "pin_mem": False,
        "max_txt_len": 60,
    },
    rules=(
        OriginalRule("cross_encoder.rank_loss", "hinge", (), "the ranking loss is the margin hinge"),
        OriginalRule("train.decay", "linear", (), "the schedule is linear warm-up then decay"),
        OriginalRule("train.batch_size_unit", "examples", (), "batches count positive pairs"),
        OriginalRule("train.warmup_ratio", 0.0, (), "warm-up is warmup_steps"),
        OriginalRule("train.warmup_from_zero", False, (), "update n runs at the schedule's step n"),
    ),
    eps_by_optim=UNITER_EPS_BY_OPTIM,
)
