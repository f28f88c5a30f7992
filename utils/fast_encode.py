"""Fast paths for the two towers that compute the same function as the plain forward.

* Unpadded ("packed") encoding: a caption batch padded to 60 tokens holds about 14 real
  tokens per row, so a padded BERT spends most of its GEMM time on padding. Here the real
  tokens are gathered into one (T, H) matrix; every Linear / LayerNorm / GELU runs on T rows,
  and attention runs either through flash variable-length attention (CUDA, half precision,
  no attention dropout) or through SDPA on a re-padded (B, Lmax) view, which stays cheap
  because captions are short.
* [CLS]-only last layer: the embedding of both towers is the last layer's hidden state at
  position 0, so the last layer needs keys and values for every token but queries, output
  projection and feed-forward for the [CLS] row alone.
* The same packing for the pre-training tasks (`pretrain_forward_packed`: VMLM decodes the
  masked packed rows, SMRM the masked region rows) and for the UNITER cross-encoder
  (`cross_encoder_score_packed`: caption padding between text and regions is dropped).
* Fixed-shape encoding (`FixedShapeEncoder`): pads batches to a few fixed shapes with static
  input buffers so a CUDA graph (or `torch.compile(mode="reduce-overhead")`) can replay them.

The functions reuse the towers' own modules (`model/towers.py`): no weight is copied, so
they train, checkpoint and run under DDP like the plain path. Each is checked against the
plain forward in `tests/test_fast_encode.py`.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.cross_encoder import UniterCrossEncoder
from model.losses import mlm_loss, mrckl_loss, mrfr_loss
from model.pretrain_heads import TASKS, PretrainModel, combine_cls
from model.towers import CLS_TOKEN_ID, ImageTower, TextTower, UniterModel


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
    """(T, heads, dim) packed -> (B, heads, Lmax, dim) zero-padded, for SDPA."""
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
            no dropout); otherwise SDPA runs on a re-padded view.

    Returns:
        (Tq, heads, dim) attention output, packed like the queries.
    """
    flash = _flash_varlen() if use_flash else None
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
            # re-padded SDPA below computes the same function. `warnings` shows this once.
            warnings.warn(f"flash varlen attention unavailable ({err}); using padded SDPA", stacklevel=2)
    q = _repad(query, q_layout)
    k = _repad(key, k_layout)
    v = _repad(value, k_layout)
    key_real = torch.zeros(
        (k_layout.batch_size, k_layout.max_len), dtype=torch.bool, device=key.device
    ).index_put((k_layout.batch_index, k_layout.pos_index), torch.ones_like(k_layout.pos_index, dtype=torch.bool))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=key_real[:, None, None, :], dropout_p=dropout_p, scale=scale
    )
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
    query = attn.query(query_in).view(query_in.shape[0], heads, head_dim)
    key = attn.key(hidden).view(hidden.shape[0], heads, head_dim)
    value = attn.value(hidden).view(hidden.shape[0], heads, head_dim)
    context = varlen_attention(
        query, key, value, q_layout, layout, dropout_p, attn.scaling, use_flash
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
        `cls_only_last`), and the layout that maps packed rows back to the batch.
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


def _trainable_context(module: nn.Module) -> contextlib.AbstractContextManager:
    # A frozen tower (fix_txt_encoder / fix_img_encoder) needs no graph, as in BiEncoder.
    if any(p.requires_grad for p in module.parameters()):
        return contextlib.nullcontext()
    return torch.no_grad()


def text_cls_packed(
    tower: TextTower,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cls_only_last: bool = True,
    use_flash: bool = True,
) -> torch.Tensor:
    """(B, H) unprojected [CLS] hidden state of the text tower, computed on real tokens only.

    Same function as `tower.hidden(input_ids, attention_mask)[:, 0]`.
    """
    with _trainable_context(tower):
        bert = tower.bert
        embeddings = bert.embeddings(input_ids=input_ids)
        return encoder_cls_packed(bert.encoder, embeddings, attention_mask, cls_only_last, use_flash)


def encode_text_packed(
    tower: TextTower,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cls_only_last: bool = True,
    use_flash: bool = True,
) -> torch.Tensor:
    """(B, D) text embeddings; same function as `tower(input_ids, attention_mask)`."""
    with _trainable_context(tower):
        cls = text_cls_packed(tower, input_ids, attention_mask, cls_only_last, use_flash)
        return tower.project(cls)


def uniter_embeddings(
    uniter: UniterModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    img_feat: torch.Tensor,
    img_pos: torch.Tensor,
    img_mask: torch.Tensor,
    img_masked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """UNITER's input sequence (text tokens, then regions) and its (B, L + N) mask.

    Mirrors `UniterModel.forward` up to the encoder (SPEC 3, 4); the tests hold the fast
    paths built on it equal to the plain forward, so a drift shows there.
    """
    txt_emb = uniter.embeddings(input_ids=input_ids)
    img_type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
    img_type = uniter.embeddings.token_type_embeddings(img_type_ids)
    img_emb = uniter.img_embeddings(img_feat, img_pos, img_type, img_masked)
    hidden = torch.cat([txt_emb, img_emb.to(txt_emb.dtype)], dim=1)
    mask = torch.cat([attention_mask.to(img_mask.dtype), img_mask], dim=1)
    return hidden, mask


def image_embeddings(
    tower: ImageTower,
    img_feat: torch.Tensor,
    img_pos: torch.Tensor,
    img_mask: torch.Tensor,
    img_masked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tower's input sequence `[t_cls, box_1 .. box_n]` and its (B, 1 + n) mask."""
    batch = img_feat.shape[0]
    cls_ids = torch.full((batch, 1), CLS_TOKEN_ID, dtype=torch.long, device=img_feat.device)
    cls_mask = torch.ones((batch, 1), dtype=img_mask.dtype, device=img_mask.device)
    return uniter_embeddings(tower.bert, cls_ids, cls_mask, img_feat, img_pos, img_mask, img_masked)


def image_cls_packed(
    tower: ImageTower,
    img_feat: torch.Tensor,
    img_pos: torch.Tensor,
    img_mask: torch.Tensor,
    img_masked: torch.Tensor | None = None,
    cls_only_last: bool = True,
    use_flash: bool = True,
) -> torch.Tensor:
    """(B, H) unprojected position-0 hidden state of the image tower, on real boxes only."""
    with _trainable_context(tower):
        hidden, mask = image_embeddings(tower, img_feat, img_pos, img_mask, img_masked)
        return encoder_cls_packed(tower.bert.encoder, hidden, mask, cls_only_last, use_flash)


def encode_image_packed(
    tower: ImageTower,
    img_feat: torch.Tensor,
    img_pos: torch.Tensor,
    img_mask: torch.Tensor,
    img_masked: torch.Tensor | None = None,
    cls_only_last: bool = True,
    use_flash: bool = True,
) -> torch.Tensor:
    """(B, D) image embeddings; same function as `tower(img_feat, img_pos, img_mask)`.

    With a fixed number of boxes nothing is padded, so the gain here is the [CLS]-only last
    layer; with a variable box count (conf_th rule, 10..100 boxes) padding is skipped too.
    """
    with _trainable_context(tower):
        cls = image_cls_packed(tower, img_feat, img_pos, img_mask, img_masked, cls_only_last, use_flash)
        return tower.project(cls)


def cross_encoder_score_packed(
    model: UniterCrossEncoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    img_feat: torch.Tensor,
    img_pos: torch.Tensor,
    img_mask: torch.Tensor,
    use_flash: bool = True,
) -> torch.Tensor:
    """(B,) re-ranking scores; same function as `model.score(...)`, on real tokens only.

    The caption padding between the text and the regions is dropped, and only the [CLS] row
    goes through the last layer (the score reads the pooler of position 0 alone).
    """
    uniter = model.uniter
    hidden, mask = uniter_embeddings(uniter, input_ids, attention_mask, img_feat, img_pos, img_mask)
    cls = encoder_cls_packed(uniter.encoder, hidden, mask, True, use_flash)
    pooled = uniter.pooler(cls.unsqueeze(1))
    return F.linear(pooled, model.itm_output.weight[1:], model.itm_output.bias[1:]).squeeze(-1)


def _combine_rows(rows: torch.Tensor, other_cls: torch.Tensor, mode: str) -> torch.Tensor:
    """`combine_cls` for packed rows: row i gets `other_cls[i]` (its sequence's [CLS])."""
    return combine_cls(rows.unsqueeze(1), other_cls, mode).squeeze(1)


def pretrain_forward_packed(
    model: PretrainModel, batch: Mapping[str, Any], task: str, use_flash: bool = True
) -> dict[str, torch.Tensor]:
    """Same function as `model(batch, task)` (SPEC 5), with both towers on real tokens only.

    Args:
        model: the pre-training model (bi-encoder `bert` + heads).
        batch: a batch in the docs/architecture.md layout for `task`.
        task: `itm` | `mlm` | `mrfr` | `mrckl`.
        use_flash: allow flash variable-length attention (see `varlen_attention`).

    Returns:
        The dict `model(batch, task)` returns.
    """
    bienc = model.bert
    txt, img = batch["txt"], batch["img"]
    if task == "itm":
        txt_emb = encode_text_packed(bienc.txt_model, txt["input_ids"], txt["attention_mask"], use_flash=use_flash)
        img_emb = encode_image_packed(
            bienc.img_model, img["img_feat"], img["img_pos"], img["img_mask"], img.get("img_masked"),
            use_flash=use_flash,
        )
        return model.cmr_outputs(txt_emb, img_emb, batch)
    if task == "mlm":
        labels = batch["txt_labels"]
        with _trainable_context(bienc.txt_model):
            bert = bienc.txt_model.bert
            emb = bert.embeddings(input_ids=txt["input_ids"])
            txt_seq, layout = encoder_packed(bert.encoder, emb, txt["attention_mask"], use_flash=use_flash)
        img_cls = image_cls_packed(bienc.img_model, img["img_feat"], img["img_pos"], img["img_mask"], use_flash=use_flash)
        # Packed rows keep the row-major order of the padded batch, so selecting the masked
        # rows here gives `seq[masked]` of the plain path, in the same order.
        packed_labels = labels.flatten()[layout.flat_index]
        rows = (packed_labels != -100).nonzero().squeeze(1)
        hidden = _combine_rows(txt_seq[rows], img_cls[layout.batch_index[rows]], model.cls_concat)
        logits = model.cls(hidden)
        targets = packed_labels[rows]
        return {
            "loss": mlm_loss(logits, targets),
            "n_correct": (logits.argmax(dim=-1) == targets).sum().detach(),
            "n_masked": torch.tensor(targets.numel(), device=logits.device),
        }
    if task in ("mrfr", "mrckl"):
        img_masked = img["img_masked"].bool()
        txt_cls = text_cls_packed(bienc.txt_model, txt["input_ids"], txt["attention_mask"], use_flash=use_flash)
        with _trainable_context(bienc.img_model):
            emb, mask = image_embeddings(bienc.img_model, img["img_feat"], img["img_pos"], img["img_mask"], img_masked)
            img_seq, layout = encoder_packed(bienc.img_model.bert.encoder, emb, mask, use_flash=use_flash)
        # Column 0 of the tower's sequence is the [CLS] slot; img_masked covers the regions.
        slot_masked = F.pad(img_masked, (1, 0)).flatten()[layout.flat_index]
        rows = slot_masked.nonzero().squeeze(1)
        hidden = _combine_rows(img_seq[rows], txt_cls[layout.batch_index[rows]], model.cls_concat)
        if task == "mrfr":
            loss = mrfr_loss(model.feat_regress(hidden), batch["feat_targets"])
        else:
            loss = mrckl_loss(model.region_classifier(hidden), batch["label_targets"])
        return {"loss": loss, "n_masked": torch.tensor(hidden.shape[0], device=hidden.device)}
    raise ValueError(f"unknown pre-training task {task!r}; expected one of {TASKS}")


class PackedPretrainModel(nn.Module):
    """`pretrain_forward_packed` as a module, so DDP can wrap it.

    DDP synchronises gradients only for forwards that go through its own `forward`; calling
    `pretrain_forward_packed(ddp.module, ...)` would skip that. Wrap this module instead and
    save `self.model` in checkpoints (its keys keep the original layout).
    """

    def __init__(self, model: PretrainModel, use_flash: bool = True) -> None:
        super().__init__()
        self.model = model
        self.use_flash = use_flash

    def forward(self, batch: Mapping[str, Any], task: str) -> dict[str, torch.Tensor]:
        """Same result as `self.model(batch, task)`."""
        return pretrain_forward_packed(self.model, batch, task, self.use_flash)


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
    (true for the towers: rows are independent and padded tokens are masked).

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
