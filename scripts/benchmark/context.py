"""What every section shares: the problem sizes, the result row and the run context."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The repository root: the demo configs and `inference.py` that the serve section uses.
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one benchmark mode."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    project_dim: int
    batch: int
    num_bb: int
    img_dim: int
    max_txt_len: int
    encode_txt_batch: int
    encode_img_batch: int
    search_n: int
    search_dim: int
    search_queries: tuple[int, ...]
    k: int
    ann_n: int
    ann_queries: int
    cross_batch: int
    eval_images: int
    captions_per_image: int
    loader_images: int
    warmup: int
    steps: int
    peak_n: int
    # The cascade section: corpus size and full embedding size.
    cascade_n: int = 20_000
    cascade_dim: int = 768
    # Variance of coordinate j of the cascade's vectors: (j+1)^-decay.
    cascade_decay: float = 1.0


QUICK = Sizes(
    hidden=64, layers=2, heads=2, intermediate=128, vocab=1000, project_dim=64, batch=16,
    num_bb=36, img_dim=2048, max_txt_len=60, encode_txt_batch=64, encode_img_batch=32,
    search_n=20_000, search_dim=64, search_queries=(1, 64, 1024), k=10, ann_n=20_000,
    ann_queries=256, cross_batch=32, eval_images=100, captions_per_image=5, loader_images=128,
    warmup=1, steps=2, peak_n=512,
)
# Paper sizes: BERT-base towers (bert-base-cased vocabulary), 768-d projection, CMR batch 256.
FULL = Sizes(
    hidden=768, layers=12, heads=12, intermediate=3072, vocab=28996, project_dim=768, batch=256,
    num_bb=36, img_dim=2048, max_txt_len=60, encode_txt_batch=1024, encode_img_batch=512,
    search_n=1_000_000, search_dim=768, search_queries=(1, 64, 1024), k=10, ann_n=1_000_000,
    ann_queries=1024, cross_batch=256, eval_images=1000, captions_per_image=5,
    loader_images=2048, warmup=3, steps=10, peak_n=8192, cascade_n=1_000_000,
)


@dataclass
class Row:
    """One line of the result table."""

    section: str
    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    check: str = ""
    ok: bool | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass
class Context:
    """What every section needs: device, precision, sizes, the measured peaks, the rows."""

    device: torch.device
    sizes: Sizes
    autocast_dtype: torch.dtype | None
    seed: int
    rows: list[Row]
    peak_flops: float | None = None
    peak_bandwidth: float | None = None
    train_samples_per_s: float | None = None
    workdir: str | None = None
    triton_configs: bool = False
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # section-specific options

    def autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        """The run's autocast; CUDA-graph capture needs `cache_enabled=False`."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=cache_enabled)

    @property
    def rel_tol(self) -> float:
        """Tolerance of a fast-vs-plain relative error at the run's precision (METHOD.md)."""
        return 1e-4 if self.autocast_dtype is None else 3e-2

    def add(self, row: Row) -> Row:
        """Append `row` to the result table and return it."""
        self.rows.append(row)
        return row
