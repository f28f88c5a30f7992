"""`execution="packed"` against `execution="padded"` through the models' public API, fp32,
atol 1e-5 (forward outputs and gradients, dropout off): the evidence behind the default."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from model.biencoder import BiEncoder, BiEncoderConfig
from model.checkpoint import build_cross_encoder_from_checkpoint, make_checkpoint
from model.cross_encoder import CrossEncoderConfig, UniterCrossEncoder
from model.families import build_biencoder_from_checkpoint
from model.packed import (
    DEFAULT_EXECUTION,
    FixedShapeEncoder,
    bucket_length,
    use_execution,
    varlen_attention,
    varlen_layout,
)
from scripts.benchmark.batches import task_batch
from tests.helpers import tiny_bert_config
from utils.pipeline.pretrain_tasks import pretrain_model

ATOL = 1e-5
# Larger than the other tests' tower: three layers and four heads exercise more of the packing.
SMALL_BERT = tiny_bert_config(300, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                              max_position_embeddings=80, initializer_range=0.05)


def small_biencoder(
    dropout: float = 0.0, project_dim: int = 24, seed: int = 0, execution: str = "packed", **kwargs
) -> BiEncoder:
    torch.manual_seed(seed)
    model = BiEncoder(
        BiEncoderConfig(
            dict(SMALL_BERT), dict(SMALL_BERT), project_dim=project_dim, dropout=dropout,
            execution=execution, **kwargs,
        )
    )
    with torch.no_grad():
        # Non-trivial LayerNorm affine and biases, so a wrong residual or gather shows.
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def random_captions(lengths: list[int], pad_to: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), pad_to, dtype=torch.long)
    mask = torch.zeros(len(lengths), pad_to, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(104, SMALL_BERT["vocab_size"], (length,), generator=gen)
        ids[row, 0], ids[row, length - 1] = 101, 102
        mask[row, :length] = 1
    return ids, mask


def random_regions(counts: list[int], pad_to: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(len(counts), pad_to, 2048, generator=gen)
    pos = torch.rand(len(counts), pad_to, 7, generator=gen)
    mask = torch.zeros(len(counts), pad_to, dtype=torch.long)
    for row, count in enumerate(counts):
        mask[row, :count] = 1
    feat = feat * mask[..., None]
    return feat, pos, mask


def test_packed_is_the_default_and_checkpoints_keep_the_choice(tmp_path: Path) -> None:
    assert DEFAULT_EXECUTION == "packed"
    assert BiEncoderConfig({}, {}).execution == "packed"
    assert CrossEncoderConfig({}).execution == "packed"
    model = small_biencoder(execution="padded")
    assert model.txt_model.execution == model.img_model.execution == "padded"
    obj = make_checkpoint(model)
    assert obj["model_config"]["execution"] == "padded"
    torch.save(obj, tmp_path / "padded.pt")
    assert build_biencoder_from_checkpoint(tmp_path / "padded.pt").execution == "padded"
    # A checkpoint written before the field existed loads with the default.
    del obj["model_config"]["execution"]
    torch.save(obj, tmp_path / "old.pt")
    again = build_biencoder_from_checkpoint(tmp_path / "old.pt")
    assert again.execution == again.txt_model.execution == again.img_model.execution == "packed"
    cross = UniterCrossEncoder(CrossEncoderConfig(dict(SMALL_BERT), execution="padded"))
    obj = make_checkpoint(cross)
    del obj["model_config"]["execution"]
    torch.save(obj, tmp_path / "old_cross.pt")
    assert build_cross_encoder_from_checkpoint(tmp_path / "old_cross.pt").execution == "packed"
    with pytest.raises(ValueError, match="execution"):
        BiEncoderConfig({}, {}, execution="fast")
    with pytest.raises(ValueError, match="execution"):
        model.execution = "fast"


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_text_matches_plain(attn_implementation: str) -> None:
    model = small_biencoder(attn_implementation=attn_implementation)
    ids, mask = random_captions([5, 14, 2, 31, 9], pad_to=60, seed=1)
    with torch.no_grad():
        with use_execution(model, "padded"):
            want = model.encode_text(ids, mask)
        got = model.encode_text(ids, mask)
    assert model.execution == "packed"
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # The packed text states of every real token equal the padded ones.
    with torch.no_grad():
        rows, layout = model.text_hidden_packed(ids, mask)
        seq, _ = model.text_hidden(ids, mask)
    torch.testing.assert_close(rows, seq[mask.bool()], atol=ATOL, rtol=0)
    assert layout.batch_size == 5


def test_packed_text_falls_back_without_a_real_first_token() -> None:
    """A row whose position 0 is padding (left padding) takes the padded path: same result."""
    model = small_biencoder()
    ids, mask = random_captions([5, 3], pad_to=8, seed=13)
    ids, mask = ids.roll(2, dims=1), mask.roll(2, dims=1)
    with torch.no_grad():
        with use_execution(model, "padded"):
            want = model.encode_text(ids, mask)
        got = model.encode_text(ids, mask)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_image_matches_plain(attn_implementation: str) -> None:
    model = small_biencoder(seed=1, attn_implementation=attn_implementation)
    feat, pos, mask = random_regions([36, 10, 23], pad_to=36, seed=2)
    masked = torch.zeros(3, 36, dtype=torch.bool)
    masked[0, 3] = masked[2, 7] = True
    feat = feat.masked_fill(masked[..., None], 0.0)
    with torch.no_grad():
        with use_execution(model, "padded"):
            want = model.encode_image(feat, pos, mask, masked)
        got = model.encode_image(feat, pos, mask, masked)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_packed_gradients_match_plain() -> None:
    """Training through the packed path gives the plain path's gradients (dropout off)."""
    model = small_biencoder(seed=2).train()
    ids, mask = random_captions([7, 3, 12, 18], pad_to=20, seed=3)
    feat, pos, img_mask = random_regions([8, 8, 5, 8], pad_to=8, seed=4)
    grads = []
    for execution in ("padded", "packed"):
        model.zero_grad()
        model.execution = execution
        txt = model.encode_text(ids, mask)
        img = model.encode_image(feat, pos, img_mask)
        scores = txt @ img.t()
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(4))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, fast = grads
    # The [CLS]-only last layer leaves the last layer's query/FFN for non-[CLS] rows unused,
    # exactly as in the plain path where their outputs feed nothing: same parameter set.
    assert plain.keys() == fast.keys()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], atol=ATOL, rtol=1e-4, msg=name)


def test_dropout_runs_in_training() -> None:
    model = small_biencoder(dropout=0.1).train()
    ids, mask = random_captions([6, 9], pad_to=12, seed=5)
    first = model.encode_text(ids, mask)
    second = model.encode_text(ids, mask)
    assert torch.isfinite(first).all() and not torch.allclose(first, second)


def test_varlen_attention_matches_per_sequence_sdpa() -> None:
    gen = torch.Generator().manual_seed(6)
    lengths = [3, 1, 6]
    mask = torch.zeros(3, 8, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    layout = varlen_layout(mask)
    total = sum(lengths)
    q, k, v = (torch.randn(total, 2, 4, generator=gen) for _ in range(3))
    got = varlen_attention(q, k, v, layout, layout)
    start = 0
    for length in lengths:
        sl = slice(start, start + length)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1)
        ).transpose(0, 1)
        torch.testing.assert_close(got[sl], want, atol=ATOL, rtol=0)
        start += length


def test_varlen_layout() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    layout = varlen_layout(mask)
    assert layout.cu_seqlens.tolist() == [0, 2, 6, 7]
    assert layout.max_len == 4 and layout.first_token.tolist() == [0, 2, 6]
    assert layout.pos_index.tolist() == [0, 1, 0, 1, 2, 3, 0]
    with pytest.raises(ValueError, match="position 0"):
        varlen_layout(torch.tensor([[0, 1], [1, 1]]))


def test_bucket_length() -> None:
    assert [bucket_length(n) for n in (1, 8, 9, 60)] == [8, 8, 16, 64]
    assert bucket_length(60, max_length=62) == 62
    with pytest.raises(ValueError):
        bucket_length(0)


def test_fixed_shape_encoder_pads_rows_and_length() -> None:
    """The static-buffer path (a CUDA graph on GPU) returns the plain result for real rows."""
    model = small_biencoder(seed=3, execution="padded")
    ids, mask = random_captions([4, 11, 7], pad_to=11, seed=7)
    encoder = FixedShapeEncoder(
        model.encode_text, shapes=[(8, 16), (8, 16)], dtypes=[torch.long, torch.long], device=torch.device("cpu")
    )
    with torch.no_grad():
        want = model.encode_text(ids, mask)
    got = encoder(ids, mask)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):
        encoder(torch.zeros(9, 16, dtype=torch.long), torch.ones(9, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="CUDA"):
        FixedShapeEncoder(model.encode_text, [(2, 4)], [torch.long], torch.device("cpu"), use_graph=True)


@pytest.mark.parametrize("task", ["itm", "mlm", "mrfr", "mrckl"])
def test_packed_pretrain_tasks_match_plain(task: str) -> None:
    """Loss, metrics and gradients of every pre-training task equal the plain forward's."""
    model = pretrain_model(small_biencoder(seed=4)).train()
    assert model.execution == "packed"
    rng = np.random.default_rng(8)
    batch = task_batch(task, 6, SMALL_BERT["vocab_size"], num_bb=12, rng=rng, max_txt_len=30)
    results = []
    for execution in ("padded", "packed"):
        model.zero_grad()
        model.execution = execution
        assert model.bert.txt_model.execution == execution
        out = model(batch, task)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (plain, plain_grads), (fast, fast_grads) = results
    assert plain.keys() == fast.keys()
    for key in plain:
        torch.testing.assert_close(fast[key], plain[key], atol=ATOL, rtol=1e-5, msg=key)
    assert plain_grads.keys() == fast_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=ATOL, rtol=1e-4, msg=name)


def test_packed_cross_encoder_matches_plain() -> None:
    torch.manual_seed(9)
    model = UniterCrossEncoder(CrossEncoderConfig(dict(SMALL_BERT), dropout=0.0)).eval()
    assert model.execution == "packed"
    ids, mask = random_captions([5, 14, 2, 9], pad_to=16, seed=10)
    feat, pos, img_mask = random_regions([12, 12, 7, 12], pad_to=12, seed=11)
    with torch.no_grad():
        with use_execution(model, "padded"):
            want = model.score(ids, mask, feat, pos, img_mask)
        got = model.score(ids, mask, feat, pos, img_mask)
        with use_execution(model, "padded"):
            want_batched = model.score_batched(ids[:1], mask[:1], feat, pos, img_mask, batch_size=3)
        got_batched = model.score_batched(ids[:1], mask[:1], feat, pos, img_mask, batch_size=3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_batched, want_batched, atol=ATOL, rtol=0)


def test_packed_cross_encoder_gradients_match_plain() -> None:
    torch.manual_seed(14)
    model = UniterCrossEncoder(CrossEncoderConfig(dict(SMALL_BERT), dropout=0.0)).train()
    ids, mask = random_captions([5, 14, 2, 9], pad_to=16, seed=15)
    feat, pos, img_mask = random_regions([12, 12, 7, 12], pad_to=12, seed=16)
    batch = {
        "txt": {"input_ids": ids, "attention_mask": mask},
        "img": {"img_feat": feat, "img_pos": pos, "img_mask": img_mask},
        "group_size": 2,
    }
    results = []
    for execution in ("padded", "packed"):
        model.zero_grad()
        model.execution = execution
        out = model(batch)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out["loss"].detach(), grads))
    (plain_loss, plain), (fast_loss, fast) = results
    torch.testing.assert_close(fast_loss, plain_loss, atol=ATOL, rtol=1e-5)
    assert plain.keys() == fast.keys()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], atol=ATOL, rtol=1e-4, msg=name)


def test_packed_pretrain_model_keeps_the_original_keys() -> None:
    """The packed path is the model's own forward: no wrapper, original state-dict keys."""
    model = pretrain_model(small_biencoder(seed=5)).eval()
    padded = copy.deepcopy(model)
    padded.execution = "padded"
    assert model.execution == "packed" and model.bert.txt_model.execution == "packed"
    batch = task_batch("itm", 4, SMALL_BERT["vocab_size"], num_bb=6, rng=np.random.default_rng(12), max_txt_len=20)
    with torch.no_grad():
        torch.testing.assert_close(model(batch, "itm")["loss"], padded(batch, "itm")["loss"], atol=ATOL, rtol=0)
    assert set(model.state_dict()) == set(padded.state_dict())


def test_run_config_chooses_the_execution(tmp_path: Path) -> None:
    import json

    from utils.config import ModelConfig
    from utils.pipeline.model_setup import build_biencoder_for_run

    tower = tiny_bert_config(120, hidden_size=16, num_hidden_layers=1, intermediate_size=32, max_position_embeddings=32)
    (tmp_path / "tower.json").write_text(json.dumps(tower))
    path = str(tmp_path / "tower.json")
    assert ModelConfig().execution == "packed"
    for mode in ("padded", "packed"):
        model = build_biencoder_for_run(ModelConfig(txt_model_config=path, img_model_config=path, project_dim=8,
                                                    execution=mode))
        assert model.execution == mode and model.config.execution == mode
