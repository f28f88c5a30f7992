"""Towers and bi-encoder against an independent computation (SPEC 3), padding, building."""
from __future__ import annotations

import json

import pytest
import torch

from model.biencoder import BiEncoder, BiEncoderConfig, build_biencoder
from model.cross_encoder import UniterCrossEncoder
from model.towers import UniterImageEmbeddings
from tests import helpers as ref
from tests.helpers import TINY_BERT

ATOL = 1e-5


def tiny_biencoder(project_dim: int = 16, seed: int = 0, **kwargs) -> BiEncoder:
    model = BiEncoder(BiEncoderConfig(dict(TINY_BERT), dict(TINY_BERT), project_dim=project_dim, **kwargs))
    ref.randomize_(model, seed)
    with torch.no_grad():
        # Row 0 of the mask embedding must never be used, whatever a checkpoint holds.
        model.img_model.bert.img_embeddings.mask_embedding.weight[0].fill_(3.0)
    return model.eval()


@pytest.mark.parametrize("project_dim", [0, 16])
def test_text_tower_matches_reference(project_dim: int) -> None:
    model = tiny_biencoder(project_dim)
    ids, mask = ref.random_text(3, [5, 2, 7], TINY_BERT["vocab_size"], seed=1)
    with torch.no_grad():
        got = model.encode_text(ids, mask)
        want = ref.text_tower(ids, mask, model.state_dict(), TINY_BERT, proj=project_dim > 0)
    assert got.shape == (3, project_dim or TINY_BERT["hidden_size"])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("project_dim", [0, 16])
def test_image_tower_matches_reference(project_dim: int) -> None:
    model = tiny_biencoder(project_dim)
    feat, pos, mask = ref.random_boxes(3, [4, 2, 5], seed=2)
    with torch.no_grad():
        got = model.encode_image(feat, pos, mask)
        want = ref.image_tower(feat, pos, mask, model.state_dict(), TINY_BERT, proj=project_dim > 0)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_image_tower_masked_regions_add_mask_embedding_row_1() -> None:
    model = tiny_biencoder()
    feat, pos, mask = ref.random_boxes(2, [4, 3], seed=3)
    masked = torch.zeros(2, 4, dtype=torch.bool)
    masked[0, 1] = masked[1, 0] = True
    feat = feat.masked_fill(masked[..., None], 0.0)
    with torch.no_grad():
        got, _ = model.image_hidden(feat, pos, mask, masked)
        want = ref.image_sequence(feat, pos, mask, model.state_dict(), "img_model.bert.", TINY_BERT, masked)
        unmasked, _ = model.image_hidden(feat, pos, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # The masked regions really change the output (the embedding row is not silently zero).
    assert not torch.allclose(got[:, 0], unmasked[:, 0], atol=1e-3)


def test_text_padding_invariance() -> None:
    model = tiny_biencoder()
    ids, mask = ref.random_text(2, [4, 6], TINY_BERT["vocab_size"], seed=4)
    wide_ids, wide_mask = ref.random_text(2, [4, 6], TINY_BERT["vocab_size"], seed=4, pad_to=15)
    wide_ids[wide_mask == 0] = 7  # garbage ids under padding must not matter either
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(ids, mask), model.encode_text(wide_ids, wide_mask), atol=ATOL, rtol=0
        )


def test_box_padding_invariance() -> None:
    model = tiny_biencoder()
    feat, pos, mask = ref.random_boxes(2, [3, 5], seed=5)
    wide_feat, wide_pos, wide_mask = ref.random_boxes(2, [3, 5], seed=6, pad_to=9)
    wide_feat[:, :5], wide_pos[:, :5] = feat, pos
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(feat, pos, mask),
            model.encode_image(wide_feat, wide_pos, wide_mask),
            atol=ATOL,
            rtol=0,
        )


def test_eager_and_sdpa_agree() -> None:
    sdpa = tiny_biencoder(attn_implementation="sdpa")
    eager = BiEncoder(BiEncoderConfig(dict(TINY_BERT), dict(TINY_BERT), 16, attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    feat, pos, mask = ref.random_boxes(2, [3, 5], seed=7)
    with torch.no_grad():
        torch.testing.assert_close(
            sdpa.encode_image(feat, pos, mask), eager.encode_image(feat, pos, mask), atol=ATOL, rtol=0
        )


def test_score_forward_and_freezing() -> None:
    model = tiny_biencoder()
    ids, mask = ref.random_text(3, [3, 4, 5], TINY_BERT["vocab_size"], seed=8)
    feat, pos, img_mask = ref.random_boxes(2, [3, 4], seed=9)
    batch = {
        "txt": {"input_ids": ids, "attention_mask": mask},
        "img": {"img_feat": feat, "img_pos": pos, "img_mask": img_mask},
    }
    [txt_emb], [img_emb] = model(batch)
    torch.testing.assert_close(model.score(txt_emb, img_emb), txt_emb @ img_emb.t())
    assert model({"txt": batch["txt"]})[1] is None

    model.train()
    model.fix_txt_encoder()
    [txt_emb], [img_emb] = model(batch)
    assert not txt_emb.requires_grad
    (txt_emb.detach() @ img_emb.t()).sum().backward()
    assert all(p.grad is None for p in model.txt_model.parameters())
    assert model.img_model.bert.img_embeddings.img_linear.weight.grad is not None
    model.fix_txt_encoder(False)
    assert all(p.requires_grad for p in model.txt_model.parameters())


def test_config_flags_and_dropout_override() -> None:
    model = BiEncoder(
        BiEncoderConfig(dict(TINY_BERT), dict(TINY_BERT), 8, dropout=0.3, fix_img_encoder=True, cls_concat="")
    )
    assert model.config.cls_concat == "none"
    assert not any(p.requires_grad for p in model.img_model.parameters())
    assert model.txt_model.bert.config.hidden_dropout_prob == 0.3
    assert model.img_model.bert.config.attention_probs_dropout_prob == 0.3
    with pytest.raises(ValueError, match="cls_concat"):
        BiEncoderConfig(dict(TINY_BERT), dict(TINY_BERT), cls_concat="concat")


def test_one_region_embedding_implementation() -> None:
    from model.cross_encoder import CrossEncoderConfig

    cross = UniterCrossEncoder(CrossEncoderConfig(dict(TINY_BERT)))
    assert type(cross.uniter.img_embeddings) is UniterImageEmbeddings
    assert type(tiny_biencoder().img_model.bert.img_embeddings) is UniterImageEmbeddings


def test_build_from_config_json_and_hub_name(tmp_path) -> None:
    cfg_file = tmp_path / "bert.json"
    cfg_file.write_text(json.dumps(TINY_BERT))
    model = build_biencoder(str(cfg_file), str(cfg_file), project_dim=8, dropout=None)
    assert model.txt_model.out_dim == 8 and model.img_model.out_dim == 8
    with pytest.raises(FileNotFoundError, match="local"):
        build_biencoder("bert-base-cased", str(cfg_file), 8, None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_biencoder(str(cfg_file), str(tmp_path / "missing.json"), 8, None)


def test_build_from_hf_directory(tmp_path) -> None:
    from transformers import BertConfig, BertModel

    hf_cfg = BertConfig(**TINY_BERT)
    bert = BertModel(hf_cfg).eval()
    ref.randomize_(bert, seed=11)
    bert.save_pretrained(tmp_path / "bert")
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((tmp_path / "bert" / "config.json").read_text())
    img_cfg = tmp_path / "img.json"
    img_cfg.write_text(json.dumps(TINY_BERT))

    model = build_biencoder(str(tmp_path / "bert"), str(img_cfg), project_dim=0, dropout=None).eval()
    ids, mask = ref.random_text(2, [3, 6], TINY_BERT["vocab_size"], seed=12)
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        torch.testing.assert_close(model.encode_text(ids, mask), want, atol=ATOL, rtol=0)
        random_model = build_biencoder(str(cfg_only), str(img_cfg), project_dim=0, dropout=None).eval()
        assert not torch.allclose(random_model.encode_text(ids, mask), want, atol=1e-3)
