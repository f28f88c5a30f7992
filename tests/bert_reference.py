"""Independent reference computations for the model tests, written with plain torch ops.

Nothing here imports `transformers` or `model/`: the formulas follow SPEC 3 / 4 and the
original BERT / UNITER code (post-LN, erf GELU, LayerNorm eps 1e-12, additive -10000 mask),
reading parameters from a state dict by their original key names.
"""
from __future__ import annotations

import math

import torch

TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 211,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
}
CLS, SEP = 101, 102


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Give every parameter a random value (LayerNorm-like 1-d weights around 1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=gen) * scale
        base = 1.0 if name.endswith("weight") and param.dim() == 1 else 0.0
        param.copy_(noise + base)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].t() + sd[f"{name}.bias"]


def ln(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return layer_norm(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def bert_layer(x: torch.Tensor, mask: torch.Tensor, sd: dict, p: str, heads: int) -> torch.Tensor:
    """One post-LN BERT layer; `mask` (B, L) is 1 for real positions."""
    b, length, hidden = x.shape
    d = hidden // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, length, heads, d).transpose(1, 2)

    q = split(linear(x, sd, f"{p}attention.self.query"))
    k = split(linear(x, sd, f"{p}attention.self.key"))
    v = split(linear(x, sd, f"{p}attention.self.value"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores + ((1.0 - mask.float()) * -10000.0)[:, None, None, :]
    probs = torch.exp(scores - scores.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)
    ctx = (probs @ v).transpose(1, 2).reshape(b, length, hidden)
    attn = ln(linear(ctx, sd, f"{p}attention.output.dense") + x, sd, f"{p}attention.output.LayerNorm")
    inter = gelu(linear(attn, sd, f"{p}intermediate.dense"))
    return ln(linear(inter, sd, f"{p}output.dense") + attn, sd, f"{p}output.LayerNorm")


def bert_encoder(x: torch.Tensor, mask: torch.Tensor, sd: dict, p: str, layers: int, heads: int) -> torch.Tensor:
    for i in range(layers):
        x = bert_layer(x, mask, sd, f"{p}encoder.layer.{i}.", heads)
    return x


def text_embeddings(input_ids: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    """LN(word + position(0..L-1) + token type 0)."""
    length = input_ids.shape[1]
    emb = (
        sd[f"{p}embeddings.word_embeddings.weight"][input_ids]
        + sd[f"{p}embeddings.position_embeddings.weight"][torch.arange(length)][None]
        + sd[f"{p}embeddings.token_type_embeddings.weight"][0]
    )
    return ln(emb, sd, f"{p}embeddings.LayerNorm")


def region_embeddings(
    feat: torch.Tensor, pos: torch.Tensor, sd: dict, p: str, masked: torch.Tensor | None = None
) -> torch.Tensor:
    """SPEC 3: LN(LN_img(img_linear(feat)) + LN_pos(pos_linear(box7)) + type_emb[1])."""
    e = f"{p}img_embeddings."
    if masked is not None:
        feat = feat + masked[..., None].float() * sd[f"{e}mask_embedding.weight"][1]
    img = ln(linear(feat, sd, f"{e}img_linear"), sd, f"{e}img_layer_norm")
    box = ln(linear(pos, sd, f"{e}pos_linear"), sd, f"{e}pos_layer_norm")
    return ln(img + box + sd[f"{p}embeddings.token_type_embeddings.weight"][1], sd, f"{e}LayerNorm")


def encode_proj(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    h = gelu(linear(x, sd, f"{p}encode_proj.0"))
    return linear(ln(h, sd, f"{p}encode_proj.2"), sd, f"{p}encode_proj.3")


def text_tower(input_ids: torch.Tensor, mask: torch.Tensor, sd: dict, cfg: dict, proj: bool) -> torch.Tensor:
    """Reference text embedding from `txt_model.*` keys."""
    h = bert_encoder(
        text_embeddings(input_ids, sd, "txt_model.bert."), mask, sd, "txt_model.bert.",
        cfg["num_hidden_layers"], cfg["num_attention_heads"],
    )[:, 0]
    return encode_proj(h, sd, "txt_model.") if proj else h


def image_sequence(
    feat: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, sd: dict, p: str, cfg: dict,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference image-tower last layer over [t_cls, boxes]."""
    b = feat.shape[0]
    t_cls = text_embeddings(torch.full((b, 1), CLS), sd, p)
    x = torch.cat([t_cls, region_embeddings(feat, pos, sd, p, masked)], dim=1)
    full_mask = torch.cat([torch.ones(b, 1, dtype=mask.dtype), mask], dim=1)
    return bert_encoder(x, full_mask, sd, p, cfg["num_hidden_layers"], cfg["num_attention_heads"])


def image_tower(
    feat: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, sd: dict, cfg: dict, proj: bool,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference image embedding from `img_model.*` keys."""
    h = image_sequence(feat, pos, mask, sd, "img_model.bert.", cfg, masked)[:, 0]
    return encode_proj(h, sd, "img_model.") if proj else h


def uniter_score(
    input_ids: torch.Tensor, txt_mask: torch.Tensor, feat: torch.Tensor, pos: torch.Tensor,
    img_mask: torch.Tensor, sd: dict, cfg: dict,
) -> torch.Tensor:
    """Reference cross-encoder score from `uniter.*` / `itm_output.*` keys."""
    p = "uniter."
    x = torch.cat([text_embeddings(input_ids, sd, p), region_embeddings(feat, pos, sd, p)], dim=1)
    mask = torch.cat([txt_mask, img_mask], dim=1)
    h = bert_encoder(x, mask, sd, p, cfg["num_hidden_layers"], cfg["num_attention_heads"])
    pooled = torch.tanh(linear(h[:, 0], sd, f"{p}pooler.dense"))
    return pooled @ sd["itm_output.weight"][1] + sd["itm_output.bias"][1]


def random_text(batch: int, lengths: list[int], vocab: int, seed: int, pad_to: int | None = None):
    """`[CLS] ids [SEP]` rows right-padded with 0; returns (input_ids, attention_mask)."""
    gen = torch.Generator().manual_seed(seed)
    width = pad_to or max(lengths) + 2
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        body = torch.randint(103, vocab, (n,), generator=gen)
        ids[i, : n + 2] = torch.cat([torch.tensor([CLS]), body, torch.tensor([SEP])])
        mask[i, : n + 2] = 1
    return ids, mask


def random_boxes(batch: int, counts: list[int], seed: int, pad_to: int | None = None, img_dim: int = 2048):
    """Random region inputs; padded rows hold garbage (they must not matter)."""
    gen = torch.Generator().manual_seed(seed)
    width = pad_to or max(counts)
    feat = torch.randn(batch, width, img_dim, generator=gen)
    pos = torch.rand(batch, width, 7, generator=gen)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, n in enumerate(counts):
        mask[i, :n] = 1
    return feat, pos, mask
