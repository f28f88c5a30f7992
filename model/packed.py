"""Unpadded ("packed") execution of the BERT encoders: the `execution="packed"` code path.

The towers (`model/towers.py`), the cross-encoder (`model/cross_encoder.py`) and the
pre-training model (`model/pretrain_heads.py`) take an `execution` option, `padded` or
`packed`, like `attn_implementation`. Both compute the same function (held equal within 1e-5
in fp32, outputs and gradients, by `tests/test_packed.py`); `packed` is faster:

* A caption batch padded to 60 tokens holds about 14 real tokens per row, so a padded BERT
  spends most of its GEMM time on padding. Here the real tokens are gathered into one (T, H)
  matrix; every Linear / LayerNorm / GELU runs on T rows, and attention runs either through
  flash variable-length attention (CUDA, half precision, SDPA, no attention dropout) or
  through SDPA / eager attention on a re-padded (B, Lmax) view, cheap because captions are
  short.
* [CLS]-only last layer: the embedding of both towers (and the cross-encoder's score) is the
  last layer's state at position 0, so the last layer needs keys and values for every token
  but queries, output projection and feed-forward for the [CLS] row alone.

Everything here runs the HF `BertEncoder`'s own layers: no weight is copied, so the packed
path trains, checkpoints and runs under DDP like the padded one.

`FixedShapeEncoder` (static buffers replayed as a CUDA graph) lives here too: it serves
small-batch encoding with either execution.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EXECUTIONS = ("padded", "packed")
# Packed is the default of every model: tests/test_packed.py holds it equal to the padded
# path within 1e-5 in fp32 (forward outputs and gradients, dropout off) for the towers, the
# cross-encoder and every pre-training task, and the reference tests pass on it.
DEFAULT_EXECUTION = "packed"


def check_execution(execution: str) -> str:
    """`execution` if it is one of `EXECUTIONS`, else ValueError."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    return execution


@contextlib.contextmanager
def use_execution(model: Any, execution: str) -> Iterator[Any]:
    """Run `model` (anything with a settable `execution`) with `execution` inside the block,
    restoring its own afterwards: the benchmark's way to time both paths on one instance."""
    previous = model.execution
    model.execution = check_execution(execution)
    try:
        yield model
    finally:
        model.execution = previous


@dataclass(frozen=True)
class VarlenLayout:
    """Where the real tokens of a padded (B, L) batch sit once packed row after row.

    Attributes:
        flat_index: (T,) positions of the real tokens in the flattened (B * L) batch.
        batch_index: (T,) row of each packed token.
        pos_index: (T,) rank of each packed token among the real tokens of its row.
        cu_seqlens: (B + 1,) int32 offsets of each row's first token in the packed order.
        max_len: longest row (real tokens).
        batch_size: B.
    """

    flat_index: torch.Tensor
    batch_index: torch.Tensor
    pos_index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    batch_size: int

    @property
    def first_token(self) -> torch.Tensor:
        """(B,) packed position of each row's first real token (the [CLS] slot)."""
        return self.cu_seqlens[:-1].long()


def packable(mask: torch.Tensor) -> bool:
    """Whether the packed path applies to this (B, L) mask: B > 0 and position 0 is real in
    every row (the packed path reads the [CLS] slot from the first real token). Callers fall
    back to the padded path otherwise, which computes the same function."""
    return mask.dim() == 2 and mask.shape[0] > 0 and mask.shape[1] > 0 and bool(mask[:, 0].bool().all())


def varlen_layout(mask: torch.Tensor) -> VarlenLayout:
    """Layout of the real tokens of a 0/1 (B, L) mask.

    Raises:
        ValueError: a row has no real token at position 0 (the [CLS] slot must be real).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, L), got {tuple(mask.shape)}")
    real = mask.bool()
    if not bool(real[:, 0].all()):
        raise ValueError("every row must have a real token at position 0 (its [CLS] slot)")
    lengths = real.sum(dim=1)
    flat_index = real.flatten().nonzero().squeeze(1)
    batch_index = flat_index // mask.shape[1]
    pos_index = (real.cumsum(dim=1) - 1).flatten()[flat_index]
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return VarlenLayout(
        flat_index=flat_index,
        batch_index=batch_index,
        pos_index=pos_index,
        cu_seqlens=cu_seqlens,
        max_len=int(lengths.max()),
        batch_size=mask.shape[0],
    )


def _cls_layout(batch_size: int, device: torch.device) -> VarlenLayout:
    """Layout of one query token per row (the [CLS]-only last layer)."""
    rows = torch.arange(batch_size, device=device)
    return VarlenLayout(
        flat_index=rows,
        batch_index=rows,
        pos_index=torch.zeros_like(rows),
        cu_seqlens=torch.arange(batch_size + 1, device=device, dtype=torch.int32),
        max_len=1,
        batch_size=batch_size,
    )


def _flash_varlen() -> Callable[..., torch.Tensor] | None:
    """`torch.nn.attention.varlen.varlen_attn` where this torch has it (2.9+), else None."""
    try:
        module = importlib.import_module("torch.nn.attention.varlen")
    except ImportError:
        return None
    return getattr(module, "varlen_attn", None)


def _repad(x: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
    """(T, heads, dim) packed -> (B, heads, Lmax, dim) zero-padded."""
    padded = x.new_zeros((layout.batch_size, layout.max_len, *x.shape[1:]))
    padded = padded.index_put((layout.batch_index, layout.pos_index), x)
    return padded.transpose(1, 2)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_layout: VarlenLayout,
    k_layout: VarlenLayout,
    dropout_p: float = 0.0,
    scale: float | None = None,
    use_flash: bool = True,
    implementation: str = "sdpa",
) -> torch.Tensor:
    """Bidirectional attention of packed sequences: each row attends only to its own keys.

    Args:
        query: (Tq, heads, dim) packed queries.
        key: (Tk, heads, dim) packed keys.
        value: (Tk, heads, dim) packed values.
        q_layout: layout of the queries.
        k_layout: layout of the keys and values (same number of rows).
        dropout_p: attention-probability dropout (training).
        scale: softmax scale; 1/sqrt(dim) when None.
        use_flash: allow flash variable-length attention where it applies (CUDA, fp16/bf16,
            SDPA, no dropout); otherwise attention runs on a re-padded view.
        implementation: `sdpa` (F.scaled_dot_product_attention) or `eager` (explicit
            softmax(QK^T) V, as HF's eager attention), the model's `attn_implementation`.

    Returns:
        (Tq, heads, dim) attention output, packed like the queries.
    """
    flash = _flash_varlen() if use_flash and implementation == "sdpa" else None
    if (
        flash is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and dropout_p == 0.0
    ):
        try:
            return flash(
                query,
                key,
                value,
                q_layout.cu_seqlens,
                k_layout.cu_seqlens,
                q_layout.max_len,
                k_layout.max_len,
                scale=scale,
            )
        except (TypeError, RuntimeError) as err:
            # An older / different varlen API, or a GPU its kernels do not support: the
            # re-padded attention below computes the same function. `warnings` shows this once.
            warnings.warn(f"flash varlen attention unavailable ({err}); using padded SDPA", stacklevel=2)
    q = _repad(query, q_layout)
    k = _repad(key, k_layout)
    v = _repad(value, k_layout)
    key_real = torch.zeros(
        (k_layout.batch_size, k_layout.max_len), dtype=torch.bool, device=key.device
    ).index_put((k_layout.batch_index, k_layout.pos_index), torch.ones_like(k_layout.pos_index, dtype=torch.bool))
    key_real = key_real[:, None, None, :]
    if implementation == "eager":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~key_real, torch.finfo(scores.dtype).min)
        probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p, training=dropout_p > 0.0)
        out = torch.matmul(probs, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_real, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)[q_layout.batch_index, q_layout.pos_index]


def _bert_layer_packed(
    layer: nn.Module,
    hidden: torch.Tensor,
    layout: VarlenLayout,
    cls_only: bool,
    use_flash: bool,
) -> torch.Tensor:
    """One HF `BertLayer` on packed tokens; with `cls_only`, returns only the [CLS] rows."""
    attn = layer.attention.self
    heads, head_dim = attn.num_attention_heads, attn.attention_head_size
    dropout_p = attn.dropout.p if attn.training else 0.0
    if cls_only:
        query_in = hidden[layout.first_token]
        q_layout = _cls_layout(layout.batch_size, hidden.device)
    else:
        query_in = hidden
        q_layout = layout
    implementation = getattr(attn.config, "_attn_implementation", None) or "sdpa"
    query = attn.query(query_in).view(query_in.shape[0], heads, head_dim)
    key = attn.key(hidden).view(hidden.shape[0], heads, head_dim)
    value = attn.value(hidden).view(hidden.shape[0], heads, head_dim)
    context = varlen_attention(
        query, key, value, q_layout, layout, dropout_p, attn.scaling, use_flash,
        "eager" if implementation == "eager" else "sdpa",
    )
    attn_out = layer.attention.output(context.reshape(query_in.shape[0], -1), query_in)
    return layer.output(layer.intermediate(attn_out), attn_out)


def encoder_packed(
    encoder: nn.Module,
    embeddings: torch.Tensor,
    mask: torch.Tensor,
    cls_only_last: bool = False,
    use_flash: bool = True,
) -> tuple[torch.Tensor, VarlenLayout]:
    """Run a HF `BertEncoder` on the real tokens of a padded batch.

    Args:
        encoder: a `transformers` BertEncoder (its `layer` list is used directly).
        embeddings: (B, L, H) input embeddings of the padded batch.
        mask: (B, L) 1 for real tokens; position 0 must be real in every row.
        cls_only_last: run the last layer for the [CLS] rows only.
        use_flash: allow flash variable-length attention (see `varlen_attention`).

    Returns:
        The last-layer states, (T, H) packed row after row (or (B, H) [CLS] rows with
        `cls_only_last`), and the layout that maps packed rows back to the batch. Packed
        rows keep the row-major order of the padded batch, so selecting rows of the packed
        states by a (B, L) mask flattened through `layout.flat_index` gives `seq[mask]`.
    """
    layout = varlen_layout(mask)
    hidden = embeddings.reshape(-1, embeddings.shape[-1])[layout.flat_index]
    layers = list(encoder.layer)
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        hidden = _bert_layer_packed(layer, hidden, layout, cls_only_last and last, use_flash)
    if cls_only_last and not layers:
        hidden = hidden[layout.first_token]
    return hidden, layout


def encoder_cls_packed(
    encoder: nn.Module,
    embeddings: torch.Tensor,
    mask: torch.Tensor,
    cls_only_last: bool = True,
    use_flash: bool = True,
) -> torch.Tensor:
    """(B, H) last-layer hidden state at position 0 of a HF `BertEncoder`, on real tokens.

    Equals `encoder(embeddings, attention_mask=<mask>).last_hidden_state[:, 0]` of the
    padded path (up to float rounding). Arguments as `encoder_packed`.
    """
    hidden, layout = encoder_packed(encoder, embeddings, mask, cls_only_last, use_flash)
    return hidden if cls_only_last else hidden[layout.first_token]


# ----------------------------------------------------------------------------- CUDA graphs


def bucket_length(length: int, multiple: int = 8, max_length: int | None = None) -> int:
    """Round a sequence length up to a multiple, so a graph / compile cache sees few shapes."""
    if length < 1 or multiple < 1:
        raise ValueError(f"length and multiple must be positive, got {length}, {multiple}")
    bucket = -(-length // multiple) * multiple
    return min(bucket, max_length) if max_length is not None else bucket


def _pad_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad `x` at the end of each dimension to `shape`."""
    pad: list[int] = []
    for have, want in zip(reversed(x.shape), reversed(shape)):
        if have > want:
            raise ValueError(f"tensor of shape {tuple(x.shape)} does not fit {tuple(shape)}")
        pad.extend((0, want - have))
    return F.pad(x, pad)


class FixedShapeEncoder:
    """Runs an encoder on fixed-shape static buffers, replayed as a CUDA graph on a GPU.

    A CUDA graph replays recorded kernels without the CPU launching each one, which is what
    keeps small-batch encoding (one query, a few images) from being launch-bound. Graphs need
    fixed shapes and fixed memory: every call copies its inputs into static buffers of the
    shape given at construction (rows and trailing dims zero-padded), replays, and returns
    the first rows of the static output. Padding rows must not change the real rows' result
    (true for the towers: rows are independent and padded tokens are masked). Capture needs
    a fixed sequence of kernels: give it a model in `padded` execution (the packed path's
    token count depends on the data).

    On CPU, or with `use_graph=False`, the same buffers are used but the function runs
    eagerly, so the padding logic is testable anywhere.

    Args:
        fn: the encoder, called as `fn(*buffers)`; must return one (rows, D) tensor.
        shapes: the fixed shape of each input buffer (rows first).
        dtypes: dtype of each buffer.
        device: where the buffers live.
        use_graph: capture a CUDA graph (CUDA devices only); None = when on CUDA.
        warmup: eager calls on a side stream before capture (lets lazy init happen).
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        shapes: Sequence[Sequence[int]],
        dtypes: Sequence[torch.dtype],
        device: torch.device,
        use_graph: bool | None = None,
        warmup: int = 3,
    ) -> None:
        if len(shapes) != len(dtypes):
            raise ValueError("one dtype per buffer shape is needed")
        self.fn = fn
        self.device = torch.device(device)
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.buffers = [torch.zeros(tuple(s), dtype=d, device=self.device) for s, d in zip(shapes, dtypes)]
        self.rows = self.buffers[0].shape[0]
        self.graph: Any = None
        self.static_out: torch.Tensor | None = None
        if self.use_graph:
            self._capture(warmup)

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.fn(*self.buffers)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.fn(*self.buffers)

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Encode inputs of at most the fixed shape; returns (rows of the input, D)."""
        if len(inputs) != len(self.buffers):
            raise ValueError(f"expected {len(self.buffers)} inputs, got {len(inputs)}")
        rows = inputs[0].shape[0]
        for buf, x in zip(self.buffers, inputs):
            buf.copy_(_pad_to(x.to(device=buf.device, dtype=buf.dtype), buf.shape))
        if self.graph is not None:
            self.graph.replay()
            out = self.static_out
        else:
            out = self.fn(*self.buffers)
        # Clone: the next replay overwrites the static output.
        return out[:rows].clone()
