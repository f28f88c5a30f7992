"""The HiVLP-style embedding hierarchy of the bi-encoder: one spec, parsed and checked once.

A hierarchy trains the embedding at several sizes at once (`dims`, the last one the full
embedding): the contrastive loss is the `weights`-weighted sum over the levels. Two modes:

* `prefix`: level i is the first `dims[i]` coordinates of the one projected embedding
  (Matryoshka representation learning, arXiv 2205.13147); no extra weights.
* `heads`: level i has its own linear head from the tower's [CLS] state; the last level is
  the tower's usual embedding (`encode_proj`).

With `normalize`, every level is L2-normalised (its scores are cosines, on one scale whatever
the level's size) and the contrastive logits are divided by `temperature`, fixed or, with
`learn_temperature`, a learned parameter that starts there (CLIP's logit scale).

The run config (`model.hierarchy`) and the bi-encoder config hold a `Hierarchy` (or None: no
hierarchy), parsed once where they are read; config files and checkpoints store the plain-dict
form (`to_dict`), where an empty dict also means no hierarchy.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from utils.errors import ConfigError

HIERARCHY_MODES = ("prefix", "heads")
HIERARCHY_KEYS = ("mode", "dims", "weights", "normalize", "temperature", "learn_temperature")


class HierarchyError(ConfigError):
    """A hierarchy spec that cannot be used; the message names where it came from."""


@dataclass(frozen=True)
class Hierarchy:
    """Levels of a hierarchical embedding.

    Attributes:
        mode: `prefix` (levels are prefixes of the full embedding) or `heads` (one head each).
        dims: level sizes, strictly increasing; the last is the full embedding size.
        weights: loss weight of each level (>= 0, not all 0).
        normalize: L2-normalise every level (cosine scores).
        temperature: the contrastive logits of every level are divided by this.
        learn_temperature: the temperature is a learned parameter, starting at `temperature`.
    """

    mode: str
    dims: tuple[int, ...]
    weights: tuple[float, ...]
    normalize: bool = False
    temperature: float = 1.0
    learn_temperature: bool = False

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any] | None,
        full_dim: int | None = None,
        where: str = "model.hierarchy",
    ) -> Hierarchy | None:
        """Parse and check a hierarchy spec; None or `{}` (no hierarchy) give None.

        Args:
            data: `{mode, dims, weights, normalize, temperature, learn_temperature}`;
                `weights` defaults to 1.0 per level, the others to off / 1.0.
            full_dim: the full embedding size the last level must equal (None: unchecked).
            where: what holds the spec, named in errors.

        Raises:
            HierarchyError: unknown or missing keys, a bad mode, dims that are not strictly
                increasing positive ints ending at `full_dim`, or weights of another length
                or sign.
        """
        if not data:
            return None
        if not isinstance(data, Mapping):
            raise HierarchyError(f"{where}: expected a mapping {{mode, dims, weights}}, got {data!r}")
        unknown = sorted(set(data) - set(HIERARCHY_KEYS))
        if unknown:
            raise HierarchyError(f"{where}: unknown key(s) {unknown}; expected {list(HIERARCHY_KEYS)}")
        mode = data.get("mode")
        if mode not in HIERARCHY_MODES:
            raise HierarchyError(f"{where}.mode: expected one of {HIERARCHY_MODES}, got {mode!r}")
        dims = data.get("dims")
        if not isinstance(dims, (list, tuple)) or not dims:
            raise HierarchyError(f"{where}.dims: expected a non-empty list of sizes, got {dims!r}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise HierarchyError(f"{where}.dims: every size must be a positive int, got {list(dims)}")
        if any(b <= a for a, b in itertools.pairwise(dims)):
            raise HierarchyError(f"{where}.dims: sizes must be strictly increasing, got {list(dims)}")
        weights = data.get("weights")
        if weights is None:
            weights = [1.0] * len(dims)
        if not isinstance(weights, (list, tuple)) or len(weights) != len(dims):
            raise HierarchyError(f"{where}.weights: expected {len(dims)} numbers (one per level), got {weights!r}")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise HierarchyError(f"{where}.weights: expected numbers, got {list(weights)}")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
            raise HierarchyError(f"{where}.weights: must be finite, >= 0 and not all 0, got {list(weights)}")
        flags = {}
        for key in ("normalize", "learn_temperature"):
            value = data.get(key, False)
            if not isinstance(value, bool):
                raise HierarchyError(f"{where}.{key}: expected true or false, got {value!r}")
            flags[key] = value
        temperature = data.get("temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            raise HierarchyError(f"{where}.temperature: expected a number > 0, got {temperature!r}")
        spec = cls(mode=mode, dims=tuple(dims), weights=tuple(float(w) for w in weights),
                   temperature=float(temperature), **flags)
        if full_dim is not None:
            spec.check_full_dim(full_dim, where)
        return spec

    @classmethod
    def from_config(cls, value: Any, where: str = "model.hierarchy") -> Hierarchy | None:
        """The run config's parser (`utils/config.py`): `from_dict` without the full size,
        which the model checks (`check_full_dim`)."""
        return cls.from_dict(value, None, where)

    def check_full_dim(self, full_dim: int, where: str = "model.hierarchy") -> None:
        """Refuse a last level that is not the full embedding size `full_dim`.

        Raises:
            HierarchyError: `dims[-1] != full_dim`.
        """
        if self.dims[-1] != full_dim:
            raise HierarchyError(
                f"{where}.dims: the last size must be the full embedding size {full_dim} "
                f"(model.project_dim, or the tower hidden size when project_dim is 0), got {list(self.dims)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (config files, checkpoints). The score options are written only
        when set, so a hierarchy without them is stored as before they existed."""
        data: dict[str, Any] = {"mode": self.mode, "dims": list(self.dims), "weights": list(self.weights)}
        defaults = Hierarchy(self.mode, self.dims, self.weights)
        for key in ("normalize", "temperature", "learn_temperature"):
            if getattr(self, key) != getattr(defaults, key):
                data[key] = getattr(self, key)
        return data

    def describe(self) -> str:
        """One-line description for messages, e.g. `heads [64, 256, 768]`."""
        return f"{self.mode} {list(self.dims)}"
