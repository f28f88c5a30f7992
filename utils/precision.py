"""Mixed precision in one place: fp32, fp16 with loss scaling, or bf16, all via torch.amp."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

logger = logging.getLogger(__name__)


@dataclass
class Precision:
    """The autocast context and (for fp16 on CUDA) the gradient scaler of a run."""

    name: str
    device_type: str
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes; a no-op for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=_DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass through the scaler when loss scaling is on."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Optimizer step; returns False when fp16 overflow made the scaler skip it."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """Pick the precision actually used on `device`.

    fp16 autocast on CPU is slow and numerically poor, so a CPU run asked for fp16 (every
    original config says `fp16: true`) trains in fp32 and says so once.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if device.type != "cuda" and requested == "fp16":
        logger.warning("fp16 requested on %s: running in fp32 (use bf16 for CPU autocast)", device)
        requested = "fp32"
    if device.type == "cuda" and requested == "bf16" and not torch.cuda.is_bf16_supported():
        logger.warning("bf16 is not supported on this GPU: falling back to fp16 with loss scaling")
        requested = "fp16"
    scaler = torch.amp.GradScaler("cuda") if requested == "fp16" else None
    return Precision(name=requested, device_type=device.type, scaler=scaler)
