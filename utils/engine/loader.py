"""Batches for the training engine: the resumable training loader and the evaluation loader.

`ResumableLoader` is the data half of exact resume (the rules are in `utils/engine/trainer.py`):
it hands out a batch sampler's batches epoch after epoch and restarts at the batch the loop had
consumed, with a private generator so that building its DataLoader leaves the global RNGs alone.
`eval_loader` is the evaluation counterpart. The batch helpers (`to_device`, `batch_ids`,
`count_examples`) read any nested batch of tensors, so the engine needs to know no batch layout.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from utils.rng import derive_seed

Batch = dict[str, Any]
# Keys of a batch that identify its examples, for error messages.
BATCH_ID_KEYS = ("txt_ids", "img_names", "ids", "index")


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device`; other values are left as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (torch.Tensor, Mapping)) for v in obj):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def batch_ids(batch: Mapping[str, Any], limit: int = 16) -> dict[str, list]:
    """The identifying entries of a batch (caption ids, image names), for error messages."""
    out: dict[str, list] = {}
    for key in BATCH_ID_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        values = value.tolist() if isinstance(value, torch.Tensor) else list(value)
        out[key] = values[:limit] + (["..."] if len(values) > limit else [])
    return out


def count_examples(batch: Any) -> int:
    """Rows of the first tensor found in a (nested) batch: its number of examples."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        for value in batch.values():
            n = count_examples(value)
            if n:
                return n
    return 0


class ResumableLoader:
    """Batches of a map-style dataset in batch-sampler order, resumable at any batch.

    Epoch after epoch without end: `next_batch()` rolls over to the next epoch when one is
    exhausted. The position (epoch, batches handed out this epoch) is what `state_dict`
    saves; batches that workers prefetched but the loop never took are rebuilt identically
    after a resume, because the sampler's order depends only on (seed, epoch) and the
    datasets draw their random choices (masking) from (seed, epoch, example index).

    Args:
        dataset: map-style dataset; its `set_epoch(epoch)` is called when it has one.
        batch_sampler: a `data.samplers` batch sampler (already sharded for this rank) with
            `set_epoch`, `skip_batches` and `__len__`.
        collate_fn: list of examples -> batch.
        seed: seed of the private generator of the DataLoader (worker base seeds).
        num_workers: DataLoader worker processes.
        pin_memory: pin batches (for CUDA).
        name: label used in logs and error messages.
    """

    def __init__(
        self,
        dataset: Any,
        batch_sampler: Any,
        collate_fn: Callable[[list], Batch],
        *,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        name: str = "train",
    ) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.collate_fn = collate_fn
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.name = name
        self.epoch = 0
        self.position = 0
        self._epoch_len: int | None = None
        self._iter: Iterator[Batch] | None = None

    def _set_epoch(self) -> None:
        self.batch_sampler.set_epoch(self.epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        self._epoch_len = len(self.batch_sampler)
        if self._epoch_len == 0:
            raise RuntimeError(
                f"loader {self.name!r}: the batch sampler yields no batch in epoch {self.epoch} "
                f"(dataset of {len(self.dataset)} examples); is the batch larger than the data?"
            )

    def batches_per_epoch(self) -> int:
        """Number of batches in the current epoch (on this rank)."""
        if self._epoch_len is None:
            self._set_epoch()
        return self._epoch_len

    def _make_iter(self) -> Iterator[Batch]:
        self._set_epoch()
        self.batch_sampler.skip_batches(self.position)
        # A private generator: creating the iterator must not consume the global RNG, or a
        # resumed run's dropout would drift from the uninterrupted one.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.position))
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
        )
        return iter(loader)

    def next_batch(self) -> Batch:
        """The next batch (rolling over to the next epoch at the end of one)."""
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self.position += 1
        if self.position >= self.batches_per_epoch():
            self.epoch += 1
            self.position = 0
            self._epoch_len = None
            self._iter = None
        return batch

    @property
    def at_epoch_start(self) -> bool:
        """True when the next batch is the first of an epoch."""
        return self.position == 0

    def describe_last(self) -> str:
        """`name epoch E batch P` of the batch `next_batch` handed out last."""
        if self.position == 0:
            return f"{self.name} epoch {self.epoch - 1}, its last batch"
        return f"{self.name} epoch {self.epoch} batch {self.position - 1}"

    def reset(self) -> None:
        """Drop prefetched batches (call after the dataset changed, e.g. new hard negatives)."""
        self._iter = None

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position."""
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._epoch_len = None
        self._iter = None


def eval_loader(
    dataset: Any,
    collate_fn: Callable[[list], Batch],
    batch_sampler: Any,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A plain DataLoader for evaluation that leaves the global RNG untouched."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )
