"""VLDeformer (model/vldeformer.py): both passes against plain-torch references over the same
weights, padding invariance, the decomposition of UNITER / cross-encoder checkpoints, our
checkpoints rebuilding it, the temperature of the loss, and train_itm + inference end to end.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import inference
import rerank
import train_itm
from model.checkpoint import load_vldeformer_init_file, make_checkpoint
from model.cross_encoder import CrossEncoderConfig, UniterCrossEncoder
from model.families import build_biencoder_from_checkpoint, check_model_section
from model.losses import contrastive_loss
from model.state_dicts import CheckpointError
from model.vldeformer import VLDeformer, VLDeformerConfig
from tests.helpers import (
    CLS,
    bert_encoder,
    itm_config,
    random_boxes,
    random_text,
    randomize_,
    region_embeddings,
    text_embeddings,
    tiny_bert_config,
    write_config,
)
from utils.config import load_config
from utils.engine.run_dir import list_states
from utils.errors import ConfigError
from utils.pipeline.model_setup import build_biencoder_for_run
from utils.pipeline.query import Searcher
from utils.pipeline.run_config import load_run_config

CFG = tiny_bert_config(dropout=0.0)
IMG_DIM = 24


def _model(**options) -> VLDeformer:
    model = VLDeformer(VLDeformerConfig(dict(CFG), img_dim=IMG_DIM, **options)).eval()
    randomize_(model, seed=3)
    return model


def _pool_reference(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return states[:, 0]
    rows = [states[i, mask[i].bool()].mean(0) for i in range(states.shape[0])]
    return torch.stack(rows)


def _finish_reference(pooled: torch.Tensor, score: str, tanh: bool) -> torch.Tensor:
    if tanh:
        pooled = torch.tanh(pooled)
    if score == "cosine":
        pooled = pooled / pooled.norm(dim=-1, keepdim=True)
    return pooled


def _sd(model: VLDeformer) -> dict:
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("execution", ["padded", "packed"])
@pytest.mark.parametrize("pooling,score,tanh", [("mean", "cosine", True), ("cls", "dot", False)])
def test_text_pass_is_uniter_on_text_alone(execution, pooling, score, tanh):
    model = _model(execution=execution, pooling=pooling, score=score, pool_tanh=tanh)
    ids, mask = random_text(3, [5, 1, 8], CFG["vocab_size"], seed=1)
    sd = _sd(model)
    states = bert_encoder(text_embeddings(ids, sd, "uniter."), mask, sd, "uniter.",
                          CFG["num_hidden_layers"], CFG["num_attention_heads"])
    expected = _finish_reference(_pool_reference(states, mask, pooling), score, tanh)
    with torch.no_grad():
        got = model.encode_text(ids, mask)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("execution", ["padded", "packed"])
@pytest.mark.parametrize("image_cls", [False, True])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_image_pass_is_uniter_on_regions_alone(execution, image_cls, pooling):
    model = _model(execution=execution, image_cls=image_cls, pooling=pooling)
    feat, pos, mask = random_boxes(3, [4, 7, 2], seed=2, img_dim=IMG_DIM)
    sd = _sd(model)
    x = region_embeddings(feat, pos, sd, "uniter.")
    full_mask = mask
    if image_cls:
        x = torch.cat([text_embeddings(torch.full((3, 1), CLS), sd, "uniter."), x], dim=1)
        full_mask = torch.cat([torch.ones(3, 1, dtype=mask.dtype), mask], dim=1)
    states = bert_encoder(x, full_mask, sd, "uniter.", CFG["num_hidden_layers"], CFG["num_attention_heads"])
    expected = _finish_reference(_pool_reference(states, full_mask, pooling), "cosine", True)
    with torch.no_grad():
        got = model.encode_image(feat, pos, mask)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("execution", ["padded", "packed"])
def test_masked_mean_is_invariant_to_padding(execution):
    model = _model(execution=execution, pooling="mean", score="dot", pool_tanh=False)
    ids, mask = random_text(2, [4, 6], CFG["vocab_size"], seed=4)
    wide_ids, wide_mask = random_text(2, [4, 6], CFG["vocab_size"], seed=4, pad_to=20)
    feat, pos, bmask = random_boxes(2, [3, 5], seed=5, img_dim=IMG_DIM)
    wide_feat, wide_pos, wide_bmask = random_boxes(2, [3, 5], seed=6, pad_to=11, img_dim=IMG_DIM)
    wide_feat[:, :5], wide_pos[:, :5] = feat, pos  # same real regions, other garbage after them
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids, mask), model.encode_text(wide_ids, wide_mask),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_image(feat, pos, bmask),
                                   model.encode_image(wide_feat, wide_pos, wide_bmask), atol=1e-5, rtol=1e-5)
        # Alone in its batch or next to a longer row: the same embedding.
        alone = model.encode_text(ids[:1, :6], mask[:1, :6])
    torch.testing.assert_close(alone[0], model.encode_text(ids, mask)[0], atol=1e-5, rtol=1e-5)


def _original_uniter_file(path, seed: int = 11) -> dict:
    """An original-format UNITER ITM file (SPEC 4): `uniter.*` with every LayerNorm as
    gamma/beta, `itm_output.*`, no `rank_output`. Returns its state dict (new names)."""
    cross = UniterCrossEncoder(CrossEncoderConfig(dict(CFG), img_dim=IMG_DIM))
    randomize_(cross, seed=seed)
    state = {k: v.clone() for k, v in cross.state_dict().items() if not k.startswith("rank_output.")}
    original = {}
    for key, value in state.items():
        if "LayerNorm" in key or "layer_norm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        original[key] = value
    assert any(k.endswith(".gamma") for k in original)
    torch.save(original, path)
    return state


def test_original_uniter_checkpoint_fills_every_shared_weight(tmp_path):
    state = _original_uniter_file(tmp_path / "uniter.pt")
    model = VLDeformer(VLDeformerConfig(dict(CFG), img_dim=IMG_DIM, project_dim=8))
    proj_before = {k: v.clone() for k, v in model.encode_proj.state_dict().items()}
    report = load_vldeformer_init_file(model, tmp_path / "uniter.pt")
    body = {k: v for k, v in model.state_dict().items() if k.startswith("uniter.")}
    assert set(body) == {k for k in state if k.startswith("uniter.")}
    for key, value in body.items():
        assert torch.equal(value, state[key]), key
    assert report["used"] == sorted(body)
    assert report["unused"] == ["itm_output.bias", "itm_output.weight"]
    for key, value in model.encode_proj.state_dict().items():
        assert torch.equal(value, proj_before[key])


def test_cross_encoder_checkpoint_decomposes_and_our_checkpoint_rebuilds(tmp_path):
    cross = UniterCrossEncoder(CrossEncoderConfig(dict(CFG), img_dim=IMG_DIM))
    randomize_(cross, seed=12)
    torch.save(make_checkpoint(cross), tmp_path / "cross.pt")
    model = VLDeformer(VLDeformerConfig(dict(CFG), img_dim=IMG_DIM, image_cls=True)).eval()
    report = load_vldeformer_init_file(model, tmp_path / "cross.pt")
    assert set(report["unused"]) == {"itm_output.weight", "itm_output.bias", "rank_output.weight",
                                     "rank_output.bias"}
    # The text pass of the decomposed model is the cross-encoder's UNITER on the text alone.
    ids, mask = random_text(2, [3, 5], CFG["vocab_size"], seed=8)
    sd = {k: v.detach() for k, v in cross.state_dict().items()}
    states = bert_encoder(text_embeddings(ids, sd, "uniter."), mask, sd, "uniter.", 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids, mask),
                                   _finish_reference(_pool_reference(states, mask, "mean"), "cosine", True),
                                   atol=2e-5, rtol=1e-4)
    # Our checkpoint rebuilds the same model, family included.
    torch.save(make_checkpoint(model), tmp_path / "vld.pt")
    rebuilt = build_biencoder_from_checkpoint(tmp_path / "vld.pt").eval()
    assert isinstance(rebuilt, VLDeformer) and rebuilt.config == model.config
    feat, pos, bmask = random_boxes(2, [3, 4], seed=9, img_dim=IMG_DIM)
    with torch.no_grad():
        assert torch.equal(rebuilt.encode_image(feat, pos, bmask), model.encode_image(feat, pos, bmask))
    # A bi-encoder checkpoint is no cross-encoder to decompose.
    with pytest.raises(CheckpointError, match="starts from a UNITER cross-encoder"):
        load_vldeformer_init_file(model, tmp_path / "vld.pt")


def test_temperature_scales_the_loss_logits():
    txt = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.7, 0.7]]), dim=-1)
    img = F.normalize(torch.tensor([[0.9, 0.1], [0.3, 1.0], [-1.0, 0.4]]), dim=-1)
    tau = 0.05
    out = contrastive_loss(txt, img, num_pos=2, gather=False, temperature=tau)
    s = (txt @ img.t()).tolist()
    # t2i: rows 0, 1 over the 3 images; i2t: images 0, 1 over the 3 captions.
    t2i = [-s[r][r] / tau + math.log(sum(math.exp(s[r][c] / tau) for c in range(3))) for r in range(2)]
    i2t = [-s[r][r] / tau + math.log(sum(math.exp(s[c][r] / tau) for c in range(3))) for r in range(2)]
    assert out.loss.item() == pytest.approx(0.5 * sum(t2i) / 2 + 0.5 * sum(i2t) / 2, rel=1e-5)


def _vld_config(tiny_data, tiny_models, **model):
    cfg = itm_config(tiny_data, tiny_models, num_train_steps=4, valid_steps=4)
    cfg["model"] = {"type": "vldeformer", "img_model_config": tiny_models["img"], "project_dim": 0,
                    "dropout": 0.0, "temperature": 0.05, **model}
    return cfg


def test_config_picks_the_family_and_refuses_lightningdot_keys(tiny_data, tiny_models, tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", _vld_config(tiny_data, tiny_models, image_cls=True)))
    model = build_biencoder_for_run(cfg.model)
    assert isinstance(model, VLDeformer) and model.config.image_cls and model.loss_temperature == 0.05
    cfg.model.txt_checkpoint = str(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="txt_checkpoint"):
        check_model_section(cfg.model)
    with pytest.raises(ConfigError, match="hierarchy"):
        load_run_config(write_config(tmp_path / "h.yaml", _vld_config(
            tiny_data, tiny_models, hierarchy={"mode": "prefix", "dims": [8, 32]})))


def test_train_itm_and_inference_run_a_decomposed_model(tiny_data, tiny_models, tmp_path):
    """Cross-encoder checkpoint -> train_itm (with bi-modal negatives) -> checkpoint -> inference.py."""
    # A cross-encoder over the synthetic vocabulary and real-size regions.
    cfg_json = json.loads(Path(tiny_models["img"]).read_text())
    cross = UniterCrossEncoder(CrossEncoderConfig(cfg_json))
    randomize_(cross, seed=13)
    torch.save(make_checkpoint(cross), tmp_path / "cross.pt")
    cfg = _vld_config(tiny_data, tiny_models, uniter_checkpoint=str(tmp_path / "cross.pt"))
    cfg["model"].pop("img_model_config")  # the architecture comes from the cross-encoder file
    cfg["data"]["bimodal_negatives"] = {"text": 1, "image": 1, "vocab": tiny_data["root"] + "/object_vocab.txt"}
    # Hard negatives mined with the model itself, on top of the composed ones.
    cfg["retrieval"] = {"num_hard_negatives": 1, "hard_negatives_sampling": "top", "steps_per_hard_neg": 2}
    out = tmp_path / "run"
    results = train_itm.main(["--config", write_config(tmp_path / "c.yaml", cfg), "--output_dir", str(out)])
    assert results["test"]["rsum"] > 0
    state = max(list_states(out))
    assert torch.load(state, weights_only=False)["stateful"]["hard_negatives"]["txt2neg_imgs"]
    best = out / "ckpt" / "biencoder.best.pt"
    model = build_biencoder_from_checkpoint(best)
    assert isinstance(model, VLDeformer)
    info = inference.main(["--config", str(tmp_path / "c.yaml"), "--checkpoint", str(best),
                           "--output_dir", str(tmp_path / "inf")])
    assert info["model_config"]["model_type"] == "vldeformer"
    assert info["recall"]["rsum"] == pytest.approx(results["test"]["rsum"], abs=1e-6)
    # A free-text query embeds as the model does; the index holds unit (cosine) vectors.
    searcher = Searcher(tmp_path / "inf", str(best), tokenizer=tiny_data["tokenizer"])
    ids = searcher.tokenize("a small red dog")
    with torch.no_grad():
        expected = model.encode_text(ids, torch.ones_like(ids)).numpy()
    assert np.allclose(searcher.encode_text("a small red dog"), expected, atol=1e-6)
    assert abs(float(np.linalg.norm(expected)) - 1.0) < 1e-5
    assert len(searcher.search_text("a small red dog", 3).results) == 3
    # Its top-M re-ranked by the cross-encoder it was decomposed from.
    reranked = rerank.main(["--config", str(tmp_path / "c.yaml"), "--retrieval_dir", str(tmp_path / "inf"),
                            "--reranker_checkpoint", str(tmp_path / "cross.pt"), "--top_m", "3",
                            "--output_dir", str(tmp_path / "rr")])
    assert reranked["top_m"] == 3


def test_compare_systems_table_matches_brute_force(workspace, tmp_path, capsys):
    """The comparison table on the first 6 test images and all their captions: every row
    equals brute-force recall over scores computed one caption / image / pair at a time, and
    the re-ranked row is LightningDOT's brute-force top 2 re-ordered by those pair scores."""
    from data.txt_db import TxtDb
    from model.checkpoint import build_cross_encoder_from_checkpoint
    from scripts import compare_systems, report
    from tests.helpers import assert_same, brute_force_recall
    from utils.pipeline.evaluation import open_img_db

    vld = VLDeformer(VLDeformerConfig(json.loads(Path(workspace.uniter_config).read_text()),
                                      temperature=0.05)).eval()
    load_vldeformer_init_file(vld, workspace.our_cross_ckpt)
    torch.save(make_checkpoint(vld), tmp_path / "vld.pt")
    out = tmp_path / "compare"
    result = compare_systems.main([
        "--config", str(workspace.config), "--output_dir", str(out), "--lightningdot", str(workspace.our_ckpt),
        "--vldeformer", str(tmp_path / "vld.pt"), "--cross_encoder", str(workspace.our_cross_ckpt),
        "--num_images", "6", "--ratio_images", "3", "--top_m", "2"])
    printed = capsys.readouterr().out
    assert "| cross_encoder |" in printed and "| vldeformer |" in printed and "(projected)" in printed
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(result))
    assert list(result["rows"]) == ["cross_encoder", "lightningdot", "lightningdot_reranked", "vldeformer"]
    assert "| cross_encoder | test[:6] |" in report.main([str(out / "summary.json")]).replace(f"{out} / rows / ", "")

    cfg = load_config(workspace.config)
    txt_db, img_db = TxtDb(workspace.data["txt_db"]["test"], cfg.data.max_txt_len), open_img_db(workspace.data["img_db"], cfg.data)
    images = list(txt_db.img_order)[:6]
    captions = [t for t in txt_db.ids if txt_db.txt2img[t] in images]
    txt2img = [images.index(txt_db.txt2img[t]) for t in captions]
    assert (result["split"]["images"], result["split"]["captions"]) == (6, len(captions))

    def text(t):
        ids = torch.tensor([[txt_db.cls_id, *txt_db.input_ids(t), txt_db.sep_id]])
        return ids, torch.ones_like(ids)

    def image(name):
        feat, pos, _ = img_db.tensors(name, with_soft_labels=False)
        return feat[None], pos[None], torch.ones(1, feat.shape[0], dtype=torch.long)

    def recall_of(row):
        recall = {k: v for k, v in result["rows"][row].items() if k not in ("timing", "split")}
        return {**recall, "ar": recall["rsum"] / 6}

    bi_scores = {}
    with torch.no_grad():
        for name, path in (("lightningdot", workspace.our_ckpt), ("vldeformer", tmp_path / "vld.pt")):
            model = build_biencoder_from_checkpoint(path).eval()
            t_emb = [model.encode_text(*text(t))[0] for t in captions]
            i_emb = [model.encode_image(*image(n))[0] for n in images]
            bi_scores[name] = [[float(a @ b) for b in i_emb] for a in t_emb]
            assert_same(recall_of(name), brute_force_recall(bi_scores[name], txt2img, 6))
        cross = build_cross_encoder_from_checkpoint(workspace.our_cross_ckpt).eval()
        scores = [[float(cross.score(*text(t), *image(n))) for n in images] for t in captions]
    assert_same(recall_of("cross_encoder"), brute_force_recall(scores, txt2img, 6))
    # Re-ranked: only LightningDOT's top 2 of every query keep their cross-encoder score; the
    # rest fall below them, in any order, so recall@1 follows the cross-encoder among the 2.
    ldot = bi_scores["lightningdot"]
    t2i_hits = 0
    for t, truth in enumerate(txt2img):
        top2 = sorted(range(6), key=lambda i: -ldot[t][i])[:2]
        t2i_hits += max(top2, key=lambda i: scores[t][i]) == truth
    assert result["rows"]["lightningdot_reranked"]["text_to_image"]["R@1"] == pytest.approx(100 * t2i_hits / len(captions))
    i2t_hits = 0
    for i in range(6):
        top2 = sorted(range(len(captions)), key=lambda t: -ldot[t][i])[:2]
        i2t_hits += txt2img[max(top2, key=lambda t: scores[t][i])] == i
    assert result["rows"]["lightningdot_reranked"]["image_to_text"]["R@1"] == pytest.approx(100 * i2t_hits / 6)
    # The cost ratio at 3 and 6 images; chance: 1/6 of the images for every caption.
    assert [m["images"] for m in result["cost_ratio"]["measured"]] == [3, 6]
    assert result["chance"]["text_to_image"]["R@1"] == pytest.approx(100 / 6)


def test_compare_systems_refuses_what_it_cannot_measure(workspace, tmp_path):
    from scripts import compare_systems

    base = ["--config", str(workspace.config), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match="give at least one bi-encoder"):
        compare_systems.main(base)
    with pytest.raises(ConfigError, match="give --lightningdot too"):
        compare_systems.main([*base, "--vldeformer", "v.pt", "--cross_encoder", "c.pt"])
    with pytest.raises(ConfigError, match="retrieval.cascade is empty"):
        compare_systems.main([*base, "--hivlp", "h.pt", "--hivlp_config", str(workspace.config)])


@pytest.mark.parametrize("name,bimodal", [
    ("itm/flickr30k_vldeformer", True), ("itm/flickr30k_vldeformer_no_bimodal", False),
    ("itm/coco_vldeformer", True), ("itm/coco_vldeformer_no_bimodal", False), ("demo/vldeformer", True)])
def test_shipped_configs_load_and_name_the_missing_path(name, bimodal, tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    cfg = load_config(repo / "configs" / f"{name}.yaml")
    assert cfg.model.type == "vldeformer" and cfg.model.biencoder_checkpoint is None
    assert (cfg.data.bimodal_negatives is not None) == bimodal
    # The shipped paths may exist in a checkout that ran `make demo`: name one that cannot.
    with pytest.raises(FileNotFoundError, match=r"train_txt_dbs\[0\]"):
        missing = ", ".join(str(tmp_path / f"missing_txt_db{i}") for i in range(len(cfg.data.train_txt_dbs)))
        train_itm.main(["--config", f"configs/{name}.yaml", "--output_dir", str(tmp_path / "o"),
                        f"data.train_txt_dbs=[{missing}]"])
