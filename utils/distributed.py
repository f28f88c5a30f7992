"""Distributed set-up in one place: single process, torchrun (DDP) or horovodrun (Horovod).

Every other module asks this one for the rank, the world size and the collective ops, so
the training loop reads the same whichever launcher started it. The active backend is
derived from library state (`torch.distributed.is_initialized()`, `hvd.is_initialized()`),
never kept in a module global.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

DISTRIBUTED_MODES = ("auto", "none", "ddp", "horovod")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    backend: str  # "none" | "ddp" | "horovod"
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or self.backend != "none"


def _launched_by_horovod() -> bool:
    return "HOROVOD_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _import_horovod():
    try:
        import horovod.torch as hvd
    except ImportError as err:
        raise RuntimeError(
            "distributed=horovod was requested (or the job was started by horovodrun) but "
            "Horovod is not installed in this environment. Build it with `make horovod` "
            "(see README), or launch with torchrun / a single process instead."
        ) from err
    return hvd


def _horovod_if_initialized():
    """The horovod.torch module if Horovod is imported and initialised, else None."""
    if "horovod.torch" not in sys.modules:
        return None
    hvd = sys.modules["horovod.torch"]
    try:
        return hvd if hvd.is_initialized() else None
    except (AttributeError, ValueError):
        return None


def resolve_mode(mode: str) -> str:
    """Turn `auto` into the launcher actually used; validate explicit modes."""
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed mode must be one of {DISTRIBUTED_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if _launched_by_horovod():
        return "horovod"
    if _launched_by_torchrun():
        return "ddp"
    return "none"


def init_distributed(mode: str = "auto", device: str = "auto") -> DistEnv:
    """Initialise the process group (if any) and pick this rank's device.

    Args:
        mode: auto | none | ddp | horovod. `auto` follows the launcher's environment.
        device: auto | cpu | cuda. `auto` takes the local GPU when there is one.
    """
    mode = resolve_mode(mode)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if mode == "horovod":
        hvd = _import_horovod()
        if not hvd.is_initialized():
            hvd.init()
        rank, world, local = hvd.rank(), hvd.size(), hvd.local_rank()
    elif mode == "ddp":
        if not _launched_by_torchrun():
            raise RuntimeError(
                "distributed=ddp needs the RANK/WORLD_SIZE environment of torchrun; launch with "
                "`torchrun --nproc_per_node N script.py ...`"
            )
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        if not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(local)
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30)
            )
    else:
        rank, world, local = 0, 1, 0
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return DistEnv(backend=mode, rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown(env: DistEnv) -> None:
    """Tear down the process group started by `init_distributed`."""
    if env.backend == "ddp" and dist.is_initialized():
        # gloo's worker threads free a finished collective's tensors just after it completes,
        # which needs the GIL; a group destroyed meanwhile (its destructor joins them while
        # holding the GIL, e.g. when a DDP reducer drops the last reference) deadlocks.
        # Releasing the GIL for a moment lets them finish first.
        time.sleep(0.1)
        dist.destroy_process_group()


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the active backend, (0, 1) when not distributed."""
    hvd = _horovod_if_initialized()
    if hvd is not None:
        return hvd.rank(), hvd.size()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def _all_gather_no_grad(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's `x` along dim 0 (sizes may differ); also return the sizes."""
    hvd = _horovod_if_initialized()
    if hvd is not None:
        sizes = hvd.allgather(torch.tensor([x.shape[0]], dtype=torch.long)).tolist()
        return hvd.allgather(x.contiguous()), sizes
    sizes = _gather_sizes(x.shape[0], x.device)
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(pieces, sizes)], dim=0), sizes


def _all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    hvd = _horovod_if_initialized()
    if hvd is not None:
        return hvd.allreduce(x, op=hvd.Sum)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for the local slice.

    Each rank computes the same global loss on the gathered tensor; summing the gradients
    that all ranks send to this rank's rows, followed by the usual gradient averaging of
    DDP / Horovod, gives exactly the gradient of one process on the concatenated batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        gathered, sizes = _all_gather_no_grad(x)
        rank, _ = world_info()
        ctx.start = sum(sizes[:rank])
        ctx.length = sizes[rank]
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = _all_reduce_sum_(grad.contiguous().clone())
        return grad[ctx.start : ctx.start + ctx.length]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, keeping the autograd graph.

    First-dim sizes may differ between ranks. Returns `x` itself when not distributed.
    """
    _, world = world_info()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 without autograd (sizes may differ)."""
    _, world = world_info()
    if world == 1:
        return x
    return _all_gather_no_grad(x.detach())[0]


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum or average a tensor over ranks (returns a new tensor; identity when single)."""
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
    _, world = world_info()
    if world == 1:
        return x.clone()
    out = _all_reduce_sum_(x.detach().clone())
    return out / world if op == "mean" else out


def all_gather_object(obj: object) -> list[object]:
    """Gather one picklable object per rank (small things only: ids, metrics)."""
    _, world = world_info()
    if world == 1:
        return [obj]
    hvd = _horovod_if_initialized()
    if hvd is not None:
        # Horovod names the collective after type(obj) unless told: ranks passing objects
        # of different types (None on some) would wait on different collectives forever.
        return hvd.allgather_object(obj, name="all_gather_object")
    out: list[object] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, root: int = 0) -> object:
    """Send `obj` from `root` to every rank."""
    _, world = world_info()
    if world == 1:
        return obj
    hvd = _horovod_if_initialized()
    if hvd is not None:
        return hvd.broadcast_object(obj, root_rank=root, name="broadcast_object")
    box = [obj]
    dist.broadcast_object_list(box, src=root)
    return box[0]


def barrier() -> None:
    """Wait for every rank."""
    _, world = world_info()
    if world == 1:
        return
    hvd = _horovod_if_initialized()
    if hvd is not None:
        hvd.allreduce(torch.zeros(1), name="barrier")
    else:
        dist.barrier()


def wrap_model(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DDP-wrap under torchrun; under Horovod broadcast rank 0's weights instead."""
    if env.backend == "ddp" and env.world_size > 1:
        ids = [env.local_rank] if env.device.type == "cuda" else None
        # Frozen towers and task-specific heads leave parameters unused on some steps.
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=True
        )
    if env.backend == "horovod":
        hvd = _import_horovod()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return model


def wrap_optimizer(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, env: DistEnv, accumulation: int = 1
) -> torch.optim.Optimizer:
    """Under Horovod, average gradients through `hvd.DistributedOptimizer`."""
    if env.backend != "horovod":
        return optimizer
    hvd = _import_horovod()
    # Horovod fills an empty optimizer state with a zero-gradient step(), which applies
    # AdamW's weight decay and advances its step count: a fresh optimizer is identical on
    # every rank anyway, so only a loaded (non-empty) state is broadcast.
    if optimizer.state_dict()["state"]:
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        backward_passes_per_step=accumulation,
        op=hvd.Average,
    )


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside the trainer's wrappers (`torch.compile` around DDP)."""
    if hasattr(model, "_orig_mod"):  # torch.compile's wrapper
        model = model._orig_mod
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
