"""Checkpoint import (the original formats of SPEC 4) and our own self-describing format.

Original formats, all loaded with strict key and shape checks:

* fine-tuned bi-encoder `biencoder.*.pt`: a dict whose `model_dict` is the state dict;
* pre-training `model_step_N.pt`: a raw state dict under `bert.` plus the heads `cls.*`,
  `feat_regress.*`, `region_classifier.*` and the unused `itm_output.*`;
* UNITER `model_step_N.pt` / `uniter-base.pt`: `uniter.*` (+ `itm_output`, `rank_output`, or
  pre-training heads), LayerNorm parameters possibly named `gamma` / `beta`;
* BERT text weights: HF model directories and plain `BertModel` / `BertFor*` state dicts.

Our format is one dict: `format`, `format_version`, `model_config` (the model's config
dataclass as a dict, BERT configs inline), `run_config` (whatever the caller passes),
`model` (the state dict) and `extra` (caller's data, e.g. the step). A checkpoint alone is
enough to rebuild its model.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from model.biencoder import (
    BiEncoder,
    check_level_heads,
    hierarchy_keys,
    load_text_tower_state,
)
from model.cross_encoder import CrossEncoderConfig, UniterCrossEncoder
from model.formats import (
    BIENCODER_FORMAT,
    CROSS_ENCODER_FORMAT,
    FORMAT_VERSION,
    OUR_FORMATS,
    PRETRAIN_FORMAT,
)
from model.retrieval import RetrievalModel
from model.state_dicts import (
    CheckpointError,
    drop_prefixes,
    load_strict,
    read_weights,
    rename_gamma_beta,
    select_prefix,
)
from model.towers import ImageTower, TextTower, hf_weights_file
from model.vldeformer import load_vldeformer_init
from utils.errors import MissingPathError

__all__ = [
    "BIENCODER_FORMAT",
    "CROSS_ENCODER_FORMAT",
    "PRETRAIN_FORMAT",
    "CheckpointError",
    "biencoder_state",
    "build_cross_encoder_from_checkpoint",
    "initialise_biencoder",
    "load_biencoder_weights",
    "load_cross_encoder_weights",
    "load_image_tower_from_uniter",
    "load_pretrain_weights",
    "load_text_tower_weights",
    "load_vldeformer_init_file",
    "make_checkpoint",
    "read_checkpoint",
]

# Heads of the original pre-training models (LightningDOT and UNITER); `itm_output` is
# never used by LightningDOT pre-training.
PRETRAIN_HEAD_PREFIXES = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")
# Everything in a UNITER file that is not the UNITER body itself.
UNITER_HEAD_PREFIXES = PRETRAIN_HEAD_PREFIXES + ("rank_output.",)

PathLike = str | os.PathLike[str]
logger = logging.getLogger(__name__)


# Checkpoint formats in detection order: name -> test on the loaded dict. Every loader, and
# inference's info.json, names a file's format through `detect_format`; a new format is one
# entry here plus the branch of each loader that accepts it.
CHECKPOINT_FORMATS: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    **{name: (lambda obj, name=name: obj.get("format") == name) for name in OUR_FORMATS},
    "original-biencoder": lambda obj: "model_dict" in obj,
    "original-pretrain": lambda obj: any(k.startswith("bert.") for k in obj),
    "original-uniter": lambda obj: any(k.startswith("uniter.") for k in obj),
    "state-dict": lambda obj: True,
}


def detect_format(obj: Mapping[str, Any]) -> str:
    """The name in `CHECKPOINT_FORMATS` of a loaded checkpoint (`read_weights` output)."""
    return next(name for name, test in CHECKPOINT_FORMATS.items() if test(obj))


# ---------------------------------------------------------------- our own format


class Checkpointable(Protocol):
    """What a model offers to be stored in our format: a bi-encoder of any family
    (`RetrievalModel`), the pre-training model or the cross-encoder (not a DDP wrapper)."""

    checkpoint_format: str

    def checkpoint_config(self) -> dict[str, Any]: ...

    def checkpoint_state(self) -> dict[str, torch.Tensor]: ...


def make_checkpoint(
    model: Checkpointable,
    run_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of `model` in our format (pass it to your own atomic writer).

    Args:
        model: the model (its format, config and weights say what is stored; a bi-encoder of
            any family is stored in the bi-encoder format, its config telling the families
            apart).
        run_config: the run configuration as a plain dict (stored as given).
        extra: anything else to store (plain Python values and tensors), e.g. the step.
    """
    return {
        "format": model.checkpoint_format,
        "format_version": FORMAT_VERSION,
        "model_config": model.checkpoint_config(),
        "run_config": dict(run_config or {}),
        "model": model.checkpoint_state(),
        "extra": dict(extra or {}),
    }


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read one of our checkpoints; `run_config` and `extra` are there for the caller.

    Raises:
        CheckpointError: the file is not in our format (original files have no config:
            build the model from its configs and use a `load_*_weights` function).
    """
    return _check_ours(read_weights(path), path)


def _check_ours(obj: dict[str, Any], path: PathLike) -> dict[str, Any]:
    fmt = obj.get("format")
    if fmt not in OUR_FORMATS:
        raise CheckpointError(
            f"{path} is not a LightningDOT checkpoint of this project (no 'format' entry): an "
            f"original checkpoint has no model config, so build the model from its config "
            f"files and load the weights with load_biencoder_weights / load_pretrain_weights / "
            f"load_cross_encoder_weights"
        )
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {obj['format_version']}; this code reads up to {FORMAT_VERSION}"
        )
    return obj


def build_cross_encoder_from_checkpoint(path: PathLike) -> UniterCrossEncoder:
    """Rebuild a UNITER cross-encoder from one of our cross-encoder checkpoints alone."""
    obj = read_checkpoint(path)
    if obj["format"] != CROSS_ENCODER_FORMAT:
        raise CheckpointError(f"{path} holds a {obj['format']} checkpoint, not a cross-encoder")
    model = UniterCrossEncoder(CrossEncoderConfig.from_dict(obj["model_config"]))
    load_strict(model, obj["model"], path, "cross-encoder")
    model.tie_rank_output()
    return model


# ---------------------------------------------------------------- original formats


def _biencoder_part_of_pretrain(state: Mapping[str, torch.Tensor], path: PathLike) -> dict:
    """`bert.*` of a pre-training state dict, prefix stripped; only known heads may remain."""
    others = [k for k in state if not k.startswith("bert.")]
    strays = [k for k in others if not k.startswith(PRETRAIN_HEAD_PREFIXES)]
    if strays:
        raise CheckpointError(
            f"{path}: unexpected keys besides bert.* and the pre-training heads: {strays[:25]}"
        )
    return select_prefix(state, "bert.")


def biencoder_state(obj: Mapping[str, Any], path: PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The bi-encoder weights of a loaded file (`read_weights` output) and its format.

    Accepts our bi-encoder and pre-training checkpoints, the original fine-tuned format
    (`model_dict`), the original pre-training `model_step_N.pt` (its `bert.` part) and a raw
    bi-encoder state dict.

    Raises:
        CheckpointError: a cross-encoder checkpoint, or stray keys beside a pre-training
            model's known heads.
    """
    fmt = detect_format(obj)
    if fmt in OUR_FORMATS:
        obj = _check_ours(dict(obj), path)
        if fmt == CROSS_ENCODER_FORMAT:
            raise CheckpointError(f"{path} holds a cross-encoder, not a bi-encoder")
        state = obj["model"]
        if fmt == PRETRAIN_FORMAT:
            state = _biencoder_part_of_pretrain(state, path)
    elif fmt == "original-biencoder":
        state = obj["model_dict"]
    elif fmt == "original-pretrain":
        state = _biencoder_part_of_pretrain(obj, path)
    else:
        state = dict(obj)
    return state, fmt


def load_biencoder_weights(model: RetrievalModel, path: PathLike, *, new_level_heads: bool = False) -> None:
    """Load bi-encoder weights from any file `biencoder_state` accepts into `model`.

    Args:
        model: the bi-encoder to fill.
        path: the checkpoint file.
        new_level_heads: the start of a training run: a file without the hierarchy's own
            weights of `model` (`heads`-mode level heads, a learned temperature), e.g. a flat
            model's, fills everything else, and those keep their initialisation (said in one
            line). Any other mismatch still raises.

    Raises:
        CheckpointError: keys or shapes do not match (the message names the file; a
            hierarchy mismatch names the level heads, see `check_level_heads`).
    """
    state, _ = biencoder_state(read_weights(path), path)
    own, provided = set(hierarchy_keys(model.state_dict())), set(hierarchy_keys(state))
    if new_level_heads and own - provided and not provided - own:
        missing = sorted(own - provided)
        logger.info("%s lacks the hierarchy's own weights; they start from their initialisation: %s",
                    path, ", ".join(missing))
        load_strict(model, rename_gamma_beta(state), path, "bi-encoder", allow_missing=tuple(missing))
        return
    check_level_heads(model, state, path, "bi-encoder")
    load_strict(model, rename_gamma_beta(state), path, "bi-encoder")


def load_pretrain_weights(model: torch.nn.Module, path: PathLike, *, heads_optional: bool = False) -> bool:
    """Load an original `model_step_N.pt` (or our pre-training checkpoint) into `model`, the
    pre-training model (`bert.*` plus its heads), strictly, as the original `pretrain.py` does.

    The original's unused `itm_output.*` head is dropped; every other key must match.

    Args:
        model: the pre-training model.
        path: the checkpoint file.
        heads_optional: also accept a file without pre-training heads (a bi-encoder in any
            format `biencoder_state` reads): it fills `model.bert` only.

    Returns:
        Whether the file carried the model's heads (False: only the bi-encoder was loaded).

    Raises:
        CheckpointError: another of our formats, a bi-encoder file without `heads_optional`,
            or keys / shapes that do not match.
    """
    obj = read_weights(path)
    fmt = detect_format(obj)
    if fmt in OUR_FORMATS and fmt != PRETRAIN_FORMAT and not heads_optional:
        raise CheckpointError(f"{path} holds a {fmt} checkpoint, not a pre-training one")
    if fmt == PRETRAIN_FORMAT:
        state = _check_ours(obj, path)["model"]
    elif fmt in OUR_FORMATS or fmt == "original-biencoder":
        state = {}
    else:
        state = drop_prefixes(rename_gamma_beta(obj), ("itm_output.",))
    if heads_optional and not any(k.startswith(PRETRAIN_HEAD_PREFIXES) for k in state):
        bert_state, _ = biencoder_state(obj, path)
        check_level_heads(model.bert, bert_state, path, "bi-encoder")
        load_strict(model.bert, rename_gamma_beta(bert_state), path, "bi-encoder")
        return False
    check_level_heads(model, state, path, "pre-training model")
    load_strict(model, state, path, "pre-training model")
    return True


def _uniter_body(state: Mapping[str, torch.Tensor], path: PathLike) -> dict[str, torch.Tensor]:
    """Normalise a UNITER state dict to the `uniter.` prefix (some copies use `bert.`)."""
    state = rename_gamma_beta(state)
    if not any(k.startswith("uniter.") for k in state) and any(k.startswith("bert.") for k in state):
        state = {("uniter." + k[len("bert."):] if k.startswith("bert.") else k): v for k, v in state.items()}
    if not any(k.startswith("uniter.") for k in state):
        raise CheckpointError(f"{path}: no 'uniter.*' (or 'bert.*') keys; not a UNITER checkpoint")
    return state


def load_cross_encoder_weights(
    model: UniterCrossEncoder, path: PathLike, allow_biencoder_init: bool = False
) -> None:
    """Load a UNITER checkpoint (fine-tuned ITM or pre-trained) or ours into `model`.

    `rank_output` may be absent (pre-trained UNITER): it is re-tied to row 1 of
    `itm_output` after loading in every case, as the original does at inference. The
    pre-training heads of a pre-trained UNITER file are dropped.

    Args:
        model: the cross-encoder to fill.
        path: the checkpoint file.
        allow_biencoder_init: also accept our bi-encoder / pre-training checkpoints, whose
            image tower is a UNITER body: it initialises the cross-encoder (the ITM head
            stays freshly initialised), as UNITER-base initialises the image tower. Only for
            starting a training run; scoring with such a file would be meaningless.
    """
    obj = read_weights(path)
    if detect_format(obj) in OUR_FORMATS:
        obj = _check_ours(obj, path)
        if obj["format"] != CROSS_ENCODER_FORMAT:
            if not allow_biencoder_init:
                raise CheckpointError(f"{path} holds a {obj['format']} checkpoint, not a cross-encoder")
            tower = "img_model.bert." if obj["format"] == BIENCODER_FORMAT else "bert.img_model.bert."
            body = {"uniter." + k: v for k, v in select_prefix(obj["model"], tower).items()}
            load_strict(model, body, path, "UNITER cross-encoder (from an image tower)",
                        allow_missing=("rank_output.", "itm_output."))
            model.tie_rank_output()
            return
        state = obj["model"]
    else:
        state = _uniter_body(obj, path)
        state = drop_prefixes(state, ("cls.", "feat_regress.", "region_classifier."))
    load_strict(model, state, path, "UNITER cross-encoder", allow_missing=("rank_output.",))
    model.tie_rank_output()


def load_vldeformer_init_file(model: RetrievalModel, path: PathLike) -> dict[str, list[str]]:
    """Decompose a cross-encoder: fill `model`'s UNITER body from an original UNITER file
    (`uniter.*`, `gamma`/`beta` names allowed) or our cross-encoder checkpoint.

    Returns:
        `load_vldeformer_init`'s report: the file's keys used and unused (the ITM head).
    """
    obj = read_weights(path)
    if detect_format(obj) in OUR_FORMATS:
        obj = _check_ours(obj, path)
        if obj["format"] != CROSS_ENCODER_FORMAT:
            raise CheckpointError(
                f"{path} holds a {obj['format']} checkpoint; a VLDeformer starts from a UNITER "
                f"cross-encoder (rerank.py train output or an original UNITER file)"
            )
        obj = obj["model"]
    return load_vldeformer_init(model, obj, path)


def load_text_tower_weights(tower: TextTower, path: PathLike) -> None:
    """Initialise a text tower from BERT weights (e.g. `bert-base-cased.pt`).

    Args:
        tower: the text tower (a bi-encoder's `txt_model`).
        path: a local HF model directory or a state-dict file (`BertModel` or `BertFor*`
            keys, with or without the `bert.` prefix, `position_ids` optional).
    """
    weights = hf_weights_file(path)
    if weights is None and os.path.isdir(path):
        raise MissingPathError(f"{path} is a directory without model.safetensors / pytorch_model.bin")
    source = weights if weights is not None else path
    load_text_tower_state(tower, read_weights(source), str(source))


def load_image_tower_from_uniter(tower: ImageTower, path: PathLike) -> None:
    """Initialise an image tower's UNITER body from UNITER weights (the paper's init).

    The UNITER pre-training / ITM heads in the file are ignored; `encode_proj` keeps its
    initialisation (UNITER has none).
    """
    state = _uniter_body(read_weights(path), path)
    strays = [k for k in state if not k.startswith(("uniter.",) + UNITER_HEAD_PREFIXES)]
    if strays:
        raise CheckpointError(f"{path}: unexpected keys in a UNITER checkpoint: {strays[:25]}")
    load_strict(tower.bert, select_prefix(state, "uniter."), path, "image tower (UNITER)")


def initialise_biencoder(
    model: BiEncoder,
    txt_checkpoint: PathLike | None = None,
    img_checkpoint: PathLike | None = None,
    biencoder_checkpoint: PathLike | None = None,
) -> None:
    """Apply the run config's checkpoints in the original order; later ones win.

    Args:
        model: the freshly built bi-encoder.
        txt_checkpoint: BERT weights for the text tower (HF directory or state dict).
        img_checkpoint: UNITER weights for the image tower (the paper's initialisation).
        biencoder_checkpoint: a whole bi-encoder (fine-tuned, pre-trained or ours).
    """
    if txt_checkpoint:
        load_text_tower_weights(model.txt_model, txt_checkpoint)
    if img_checkpoint:
        load_image_tower_from_uniter(model.img_model, img_checkpoint)
    if biencoder_checkpoint:
        load_biencoder_weights(model, biencoder_checkpoint, new_level_heads=True)
