"""Reading weight files and loading them strictly, with errors that say what is wrong.

Low-level helpers shared by `model/checkpoint.py` (all checkpoint formats) and
`model/biencoder.py` (weights of a local HF model directory); they know no model class.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from utils.errors import MissingPathError, UserError

# Buffers older transformers versions saved with BertEmbeddings; newer ones neither save nor
# need them (they are rebuilt from the config), so they may be absent or present.
OPTIONAL_BUFFER_SUFFIXES = ("embeddings.position_ids",)
# Longest key list printed in an error message.
_MAX_LISTED = 25


class CheckpointError(UserError, RuntimeError):
    """A weight file that does not fit the model: wrong, missing or unexpected keys/shapes."""


def read_weights(path: str | os.PathLike[str]) -> dict:
    """Load a weight file on the CPU without unpickling code.

    `.safetensors` files go through safetensors; everything else through
    `torch.load(map_location='cpu', weights_only=True)`.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file cannot be read as weights.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingPathError(f"checkpoint file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(p), device="cpu"))
        obj = _torch_load(p)
    except Exception as err:  # torch raises several types for a bad or unsafe pickle
        raise CheckpointError(f"cannot read weights from {p}: {err}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a dict of weights")
    return dict(obj)


def _torch_load(path: Path) -> object:
    """`torch.load` on the CPU, memory-mapped when the file allows it.

    Mapping makes a checkpoint that is opened twice (format detection, then loading) or
    only partly used (one tower of it) cost little more than its header. Files written in
    torch's legacy (pre-zip) format, as some 2020 UNITER releases are, cannot be mapped and
    are read in full.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def rename_gamma_beta(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old (TF-converted) LayerNorm names `*.gamma` / `*.beta` -> `*.weight` / `*.bias`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        out[key] = value
    return out


def select_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def drop_prefixes(
    state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The entries whose key starts with none of `prefixes`."""
    prefixes = tuple(prefixes)
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def _is_optional_buffer(key: str) -> bool:
    return key.endswith(OPTIONAL_BUFFER_SUFFIXES)


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"\n  {title} ({len(keys)}): {shown}{more}"


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str | os.PathLike[str],
    what: str,
    allow_missing: Iterable[str] = (),
) -> None:
    """Copy `state_dict` into `module`, refusing any mismatch.

    Only the `embeddings.position_ids` buffers of older transformers versions may be absent
    or present at will; every other difference raises.

    Args:
        module: the model (or sub-module) to fill.
        state_dict: weights keyed as `module.state_dict()` keys them.
        source: the file they came from, named in errors.
        what: what is being loaded (e.g. "bi-encoder"), named in errors.
        allow_missing: key prefixes the caller knows may be missing (documented per format).

    Raises:
        CheckpointError: missing or unexpected keys, or a shape mismatch.
    """
    expected = module.state_dict()
    allow = tuple(allow_missing)
    provided = {k: v for k, v in state_dict.items() if not _is_optional_buffer(k) or k in expected}
    missing = [
        k
        for k in expected
        if k not in provided and not _is_optional_buffer(k) and not (allow and k.startswith(allow))
    ]
    unexpected = [k for k in provided if k not in expected]
    if missing or unexpected:
        message = f"{source}: the weights do not match the {what}"
        if missing:
            message += _listing("missing keys", missing)
        if unexpected:
            message += _listing("unexpected keys", unexpected)
        raise CheckpointError(message)
    for key, value in provided.items():
        want = tuple(expected[key].shape)
        if tuple(value.shape) != want:
            raise CheckpointError(
                f"{source}: shape mismatch for {key!r} in the {what}: the model expects "
                f"{list(want)}, the file has {list(value.shape)} (is the model config the one "
                f"this checkpoint was trained with?)"
            )
    module.load_state_dict(dict(provided), strict=False)
