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

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from model.biencoder import (
    BiEncoder,
    BiEncoderConfig,
    check_level_heads,
    load_text_tower_state,
)
from model.cross_encoder import CrossEncoderConfig, UniterCrossEncoder
from model.pretrain_heads import PretrainModel
from model.state_dicts import (
    CheckpointError,
    drop_prefixes,
    load_strict,
    read_weights,
    rename_gamma_beta,
    select_prefix,
)
from model.towers import ImageTower, TextTower, hf_weights_file
from model.vldeformer import (
    VLDeformer,
    VLDeformerConfig,
    is_vldeformer_config,
    load_vldeformer_init,
)
from utils.errors import MissingPathError
from utils.region_features import NUM_LABELS

__all__ = [
    "BIENCODER_FORMAT",
    "CROSS_ENCODER_FORMAT",
    "PRETRAIN_FORMAT",
    "CheckpointError",
    "build_biencoder_from_checkpoint",
    "build_cross_encoder_from_checkpoint",
    "build_pretrain_model_from_checkpoint",
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

BIENCODER_FORMAT = "lightningdot-biencoder"
PRETRAIN_FORMAT = "lightningdot-pretrain"
CROSS_ENCODER_FORMAT = "lightningdot-cross-encoder"
OUR_FORMATS = (BIENCODER_FORMAT, PRETRAIN_FORMAT, CROSS_ENCODER_FORMAT)
FORMAT_VERSION = 1

# Heads of the original pre-training models (LightningDOT and UNITER); `itm_output` is
# never used by LightningDOT pre-training.
PRETRAIN_HEAD_PREFIXES = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")
# Everything in a UNITER file that is not the UNITER body itself.
UNITER_HEAD_PREFIXES = PRETRAIN_HEAD_PREFIXES + ("rank_output.",)

PathLike = str | os.PathLike[str]


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


def make_checkpoint(
    model: BiEncoder | VLDeformer | PretrainModel | UniterCrossEncoder,
    run_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of `model` in our format (pass it to your own atomic writer).

    Args:
        model: a bi-encoder (either family: a VLDeformer is stored in the bi-encoder format,
            its config's `model_type` telling the two apart), pre-training model or
            cross-encoder (not a DDP wrapper).
        run_config: the run configuration as a plain dict (stored as given).
        extra: anything else to store (plain Python values and tensors), e.g. the step.
    """
    if isinstance(model, PretrainModel):
        fmt = PRETRAIN_FORMAT
        model_config: dict[str, Any] = model.bert.config.to_dict()
        model_config["pretrain"] = {
            "img_label_dim": model.region_classifier.net[-1].out_features,
            "mask_duplicates": model.mask_duplicates,
        }
    elif isinstance(model, (BiEncoder, VLDeformer)):
        fmt = BIENCODER_FORMAT
        model_config = model.config.to_dict()
    elif isinstance(model, UniterCrossEncoder):
        fmt = CROSS_ENCODER_FORMAT
        model.tie_rank_output()
        model_config = model.config.to_dict()
    else:
        raise TypeError(f"cannot checkpoint a {type(model).__name__}; unwrap DDP with .module")
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "model_config": model_config,
        "run_config": dict(run_config or {}),
        "model": model.state_dict(),
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


def _biencoder_config(obj: Mapping[str, Any]) -> BiEncoderConfig:
    data = {k: v for k, v in obj["model_config"].items() if k != "pretrain"}
    return BiEncoderConfig.from_dict(data)


def build_biencoder_from_checkpoint(path: PathLike) -> BiEncoder | VLDeformer:
    """Rebuild a bi-encoder (LightningDOT or VLDeformer, as its stored config says) from one
    of our bi-encoder or pre-training checkpoints alone."""
    obj = read_checkpoint(path)
    if obj["format"] == CROSS_ENCODER_FORMAT:
        raise CheckpointError(f"{path} holds a cross-encoder, not a bi-encoder")
    if is_vldeformer_config(obj["model_config"]):
        vld = VLDeformer(VLDeformerConfig.from_dict(obj["model_config"]))
        load_strict(vld, obj["model"], path, "VLDeformer bi-encoder")
        return vld
    model = BiEncoder(_biencoder_config(obj))
    state = obj["model"]
    if obj["format"] == PRETRAIN_FORMAT:
        state = _biencoder_part_of_pretrain(state, path)
    load_strict(model, state, path, "bi-encoder")
    return model


def build_pretrain_model_from_checkpoint(path: PathLike) -> PretrainModel:
    """Rebuild a pre-training model (bi-encoder + heads) from one of our checkpoints.

    A bi-encoder checkpoint gives fresh heads on the stored bi-encoder.
    """
    obj = read_checkpoint(path)
    if obj["format"] == CROSS_ENCODER_FORMAT:
        raise CheckpointError(f"{path} holds a cross-encoder, not a pre-training model")
    heads = obj["model_config"].get("pretrain", {})
    biencoder = BiEncoder(_biencoder_config(obj))
    model = PretrainModel(
        biencoder,
        img_label_dim=heads.get("img_label_dim", NUM_LABELS),
        mask_duplicates=heads.get("mask_duplicates", True),
    )
    if obj["format"] == PRETRAIN_FORMAT:
        load_strict(model, obj["model"], path, "pre-training model")
    else:
        load_strict(biencoder, obj["model"], path, "bi-encoder")
    return model


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


def load_biencoder_weights(model: BiEncoder, path: PathLike) -> None:
    """Load bi-encoder weights from any supported file into `model`.

    Accepts the original fine-tuned format (`model_dict`), the original pre-training
    `model_step_N.pt` (its `bert.` part), a raw bi-encoder state dict, and our bi-encoder
    or pre-training checkpoints.

    Raises:
        CheckpointError: keys or shapes do not match (the message names the file; a
            hierarchy mismatch names the level heads, see `check_level_heads`).
    """
    obj = read_weights(path)
    fmt = detect_format(obj)
    if fmt in OUR_FORMATS:
        obj = _check_ours(obj, path)
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
        state = obj
    check_level_heads(model, state, path, "bi-encoder")
    load_strict(model, rename_gamma_beta(state), path, "bi-encoder")


def load_pretrain_weights(model: PretrainModel, path: PathLike) -> None:
    """Load an original `model_step_N.pt` (or our pre-training checkpoint) into `model`.

    The original's unused `itm_output.*` head is dropped; every other key must match.
    """
    obj = read_weights(path)
    if detect_format(obj) in OUR_FORMATS:
        obj = _check_ours(obj, path)
        if obj["format"] != PRETRAIN_FORMAT:
            raise CheckpointError(f"{path} holds a {obj['format']} checkpoint, not a pre-training one")
        state = obj["model"]
    else:
        state = drop_prefixes(rename_gamma_beta(obj), ("itm_output.",))
    check_level_heads(model, state, path, "pre-training model")
    load_strict(model, state, path, "pre-training model")


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


def load_vldeformer_init_file(model: VLDeformer, path: PathLike) -> dict[str, list[str]]:
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


def load_text_tower_weights(target: BiEncoder | TextTower, path: PathLike) -> None:
    """Initialise the text tower from BERT weights (e.g. `bert-base-cased.pt`).

    Args:
        target: a bi-encoder (its `txt_model`) or a text tower.
        path: a local HF model directory or a state-dict file (`BertModel` or `BertFor*`
            keys, with or without the `bert.` prefix, `position_ids` optional).
    """
    tower = target.txt_model if isinstance(target, BiEncoder) else target
    weights = hf_weights_file(path)
    if weights is None and os.path.isdir(path):
        raise MissingPathError(f"{path} is a directory without model.safetensors / pytorch_model.bin")
    source = weights if weights is not None else path
    load_text_tower_state(tower, read_weights(source), str(source))


def load_image_tower_from_uniter(target: BiEncoder | ImageTower, path: PathLike) -> None:
    """Initialise the image tower's UNITER body from UNITER weights (the paper's init).

    The UNITER pre-training / ITM heads in the file are ignored; `encode_proj` keeps its
    initialisation (UNITER has none).
    """
    tower = target.img_model if isinstance(target, BiEncoder) else target
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
        load_text_tower_weights(model, txt_checkpoint)
    if img_checkpoint:
        load_image_tower_from_uniter(model, img_checkpoint)
    if biencoder_checkpoint:
        load_biencoder_weights(model, biencoder_checkpoint)
