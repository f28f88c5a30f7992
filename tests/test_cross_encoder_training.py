"""The cross-encoder trained as UNITER's was: the joint pre-training objectives against hand
computations, self-mined hard negatives against a brute-force ranking, both modes end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rerank
from data.datasets import ItmRankDataset, itm_rank_collate
from data.img_db import ImgDb
from data.txt_db import TxtDb
from model.cross_encoder import CrossEncoderConfig, UniterCrossEncoder
from model.families import build_biencoder_from_checkpoint
from tests import helpers as ref
from tests.helpers import TINY_BERT, gelu, layer_norm, write_config
from utils.pipeline.cross_encoder_training import (
    HardNegativeLoss,
    hardest_rows,
    take_rows,
)
from utils.pipeline.pretrain_tasks import (
    CROSS_ENCODER_TASKS,
    cross_encoder_pretrain_model,
)

V = TINY_BERT["vocab_size"]
LAYERS, HEADS = TINY_BERT["num_hidden_layers"], TINY_BERT["num_attention_heads"]


def tiny_pretrain_model(seed: int = 0):
    model = cross_encoder_pretrain_model(UniterCrossEncoder(CrossEncoderConfig(dict(TINY_BERT))))
    ref.randomize_(model, seed)
    return model.eval()


def joint_reference(batch: dict, sd: dict, masked: torch.Tensor | None = None) -> torch.Tensor:
    """UNITER's joint last layer from the state dict alone: text embeddings, then regions."""
    p = "bert.uniter."
    txt, img = batch["txt"], batch["img"]
    x = torch.cat([ref.text_embeddings(txt["input_ids"], sd, p),
                   ref.region_embeddings(img["img_feat"], img["img_pos"], sd, p, masked)], dim=1)
    mask = torch.cat([txt["attention_mask"], img["img_mask"]], dim=1)
    return ref.bert_encoder(x, mask, sd, p, LAYERS, HEADS)


def pair_batch(seed: int = 0) -> dict:
    ids, mask = ref.random_text(3, [4, 2, 5], V, seed=seed)
    feat, pos, img_mask = ref.random_boxes(3, [3, 5, 2], seed=seed + 1)
    return {"txt": {"input_ids": ids, "attention_mask": mask},
            "img": {"img_feat": feat, "img_pos": pos, "img_mask": img_mask}}


def test_joint_itm_is_the_cross_entropy_of_the_itm_head():
    model = tiny_pretrain_model()
    batch = {**pair_batch(), "labels": torch.tensor([1, 0, 1])}
    sd = model.state_dict()
    with torch.no_grad():
        out = model(batch, "itm")
        pooled = torch.tanh(joint_reference(batch, sd)[:, 0] @ sd["bert.uniter.pooler.dense.weight"].t()
                            + sd["bert.uniter.pooler.dense.bias"])
        logits = pooled @ sd["bert.itm_output.weight"].t() + sd["bert.itm_output.bias"]
        want = -torch.log_softmax(logits, dim=1)[torch.arange(3), batch["labels"]].mean()
    torch.testing.assert_close(out["loss"], want, atol=1e-5, rtol=0)
    assert out["n_pairs"].item() == 3 and out["n_correct"].item() == (logits.argmax(1) == batch["labels"]).sum().item()
    # Column 1 of the ITM head is the retrieval score the re-ranker ranks by.
    torch.testing.assert_close(model.bert.score(**{**batch["txt"], **batch["img"]}), logits[:, 1], atol=1e-5, rtol=0)


def test_joint_mlm_decodes_masked_tokens_from_the_joint_states():
    model = tiny_pretrain_model(seed=1)
    batch = pair_batch(seed=2)
    labels = torch.full_like(batch["txt"]["input_ids"], -100)
    labels[0, 2], labels[1, 1], labels[2, 4] = 7, 9, 11
    batch["txt_labels"] = labels
    sd = model.state_dict()
    with torch.no_grad():
        out = model(batch, "mlm")
        text_states = joint_reference(batch, sd)[:, : labels.shape[1]]
        p = "cls.predictions.transform."
        h = gelu(text_states[labels != -100] @ sd[f"{p}dense.weight"].t() + sd[f"{p}dense.bias"])
        h = layer_norm(h, sd[f"{p}LayerNorm.weight"], sd[f"{p}LayerNorm.bias"])
        logits = h @ sd["bert.uniter.embeddings.word_embeddings.weight"].t() + sd["cls.predictions.bias"]
        want = F.cross_entropy(logits, labels[labels != -100])
    torch.testing.assert_close(out["loss"], want, atol=1e-5, rtol=0)
    assert out["n_masked"].item() == 3


@pytest.mark.parametrize("task", ["mrfr", "mrckl"])
def test_joint_region_objectives_from_the_masked_regions_states(task):
    model = tiny_pretrain_model(seed=3)
    batch = pair_batch(seed=4)
    masked = torch.zeros_like(batch["img"]["img_mask"], dtype=torch.bool)
    masked[0, 1], masked[1, 4], masked[2, 0] = True, True, True
    batch["img"]["img_masked"] = masked
    batch["feat_targets"] = torch.randn(3, 2048, generator=torch.Generator().manual_seed(5))
    soft = torch.rand(3, 1601, generator=torch.Generator().manual_seed(6))
    batch["label_targets"] = soft / soft.sum(1, keepdim=True)
    sd = model.state_dict()
    with torch.no_grad():
        out = model(batch, task)
        states = joint_reference(batch, sd, masked)[:, batch["txt"]["input_ids"].shape[1]:][masked]
        head = "feat_regress" if task == "mrfr" else "region_classifier"
        h = gelu(states @ sd[f"{head}.net.0.weight"].t() + sd[f"{head}.net.0.bias"])
        h = layer_norm(h, sd[f"{head}.net.2.weight"], sd[f"{head}.net.2.bias"])
        if task == "mrfr":
            pred = h @ sd["bert.uniter.img_embeddings.img_linear.weight"] + sd["feat_regress.bias"]
            want = ((pred - batch["feat_targets"]) ** 2).mean()
        else:
            log_probs = torch.log_softmax(h @ sd[f"{head}.net.3.weight"].t() + sd[f"{head}.net.3.bias"], dim=1)
            want = (soft / soft.sum(1, keepdim=True) * (torch.log(batch["label_targets"]) - log_probs)).mean()
    torch.testing.assert_close(out["loss"], want, atol=1e-5, rtol=1e-5)
    assert out["n_masked"].item() == 3


def test_the_joint_tasks_tie_the_cross_encoders_weights():
    model = tiny_pretrain_model()
    assert list(model.objectives) == list(CROSS_ENCODER_TASKS) == ["itm", "mlm", "mrfr", "mrckl"]
    assert model.cls.predictions.decoder.weight is model.bert.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.bert.uniter.img_embeddings.img_linear.weight


def test_self_mined_hard_negatives_equal_a_brute_force_ranking(tiny_data):
    """The kept negatives are the highest-scored of each side's sampled pool, scoring every pair
    on its own; the step's loss is the ranking loss of that group."""
    cross = UniterCrossEncoder(CrossEncoderConfig(tiny_config(tiny_data), rank_loss="softmax"))
    ref.randomize_(cross, seed=8)
    cross.eval()
    pool, keep = 5, 2
    dataset = ItmRankDataset([TxtDb(tiny_data["txt_db"]["train"])], [ImgDb(tiny_data["img_db"])], pool, seed=3)
    batch = itm_rank_collate([dataset[i] for i in (0, 7, 13)])
    txt, img = batch["txt"], batch["img"]
    with torch.no_grad():
        scores = cross.score(txt["input_ids"], txt["attention_mask"], img["img_feat"], img["img_pos"], img["img_mask"])
        rows = hardest_rows(scores, batch["group_size"], pool, keep)
        alone = []
        for r in range(len(batch["txt_ids"])):
            n_txt, n_img = int(txt["attention_mask"][r].sum()), int(img["img_mask"][r].sum())
            alone.append(float(cross.score(txt["input_ids"][r:r + 1, :n_txt], txt["attention_mask"][r:r + 1, :n_txt],
                                           img["img_feat"][r:r + 1, :n_img], img["img_pos"][r:r + 1, :n_img],
                                           img["img_mask"][r:r + 1, :n_img])))
    group = batch["group_size"]
    want = []
    for g in range(3):
        base = g * group
        images = sorted(range(base + 1, base + 1 + pool), key=lambda r: -alone[r])[:keep]
        captions = sorted(range(base + 1 + pool, base + group), key=lambda r: -alone[r])[:keep]
        want += [base, *images, *captions]
    assert rows.tolist() == want
    hard = take_rows(batch, rows, 1 + 2 * keep)
    assert hard["txt_ids"] == [batch["txt_ids"][r] for r in want] and hard["labels"].tolist() == [1, 0, 0, 0, 0] * 3

    loss = HardNegativeLoss(pool, keep)(cross, batch, "itm_rank")["loss"]
    grouped = torch.tensor([alone[r] for r in want]).view(3, 1 + 2 * keep)
    torch.testing.assert_close(loss, F.cross_entropy(grouped, torch.zeros(3, dtype=torch.long)), atol=1e-4, rtol=0)


def tiny_config(tiny_data) -> dict:
    """A tiny UNITER config over the synthetic vocabulary, dropout off."""
    meta = json.loads((Path(tiny_data["txt_db"]["train"]) / "meta.json").read_text())
    return ref.tiny_bert_config(int(meta["v_range"][1]), dropout=0.0)


def test_rerank_train_pretrains_then_ranks_with_its_own_hard_negatives(tiny_data, tiny_models, tmp_path):
    from tests.helpers import itm_config, pretrain_config

    pretraining = pretrain_config(tiny_data, tiny_models, ["itm", "mlm", "mrfr", "mrckl"], [2, 1, 1, 1],
                                  num_train_steps=6, valid_steps=3)
    pretraining["cross_encoder"] = {"mode": "pretrain", "model_config": tiny_models["img"]}
    out = tmp_path / "pre"
    result = rerank.main(["train", "--config", write_config(tmp_path / "pre.yaml", pretraining), "--output_dir", str(out)])
    assert result["step"] == 6 and "itm/acc" in result["best"] and "mlm/loss" in result["val"]
    pretrained = out / "ckpt" / "cross_encoder.best.pt"
    with pytest.raises(Exception, match="cross-encoder"):
        build_biencoder_from_checkpoint(pretrained)

    ranking = itm_config(tiny_data, tiny_models)
    ranking["cross_encoder"] = {"model_config": tiny_models["img"], "checkpoint": str(pretrained),
                                "negative_size": 3, "hard_neg_size": 1}
    result = rerank.main(["train", "--config", write_config(tmp_path / "rank.yaml", ranking),
                          "--output_dir", str(tmp_path / "rank")])
    assert result["step"] == 6 and 0 <= result["best"]["accuracy"] <= 100


@pytest.mark.parametrize("name", ["flickr30k_hn", "coco_hn"])
def test_the_uniter_hard_negative_configs_carry_uniters_settings(name, monkeypatch):
    """configs/rerank/*_hn.yaml against UNITER's train-itm-{flickr,coco}-base-16gpu-hn.json,
    numbers copied here by hand: 399 sampled, 31 hardest, hinge margin 0.2, lr 5e-5, 5,000
    updates after 500 warm-up, 8 positives accumulated per rank."""
    from utils.pipeline.run_config import TRAIN_CROSS_ENCODER, load_run_config

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = load_run_config(f"configs/rerank/{name}.yaml", trainer=TRAIN_CROSS_ENCODER)
    ce, train = cfg.cross_encoder, cfg.train
    assert (ce.mode, ce.negative_size, ce.hard_neg_size, ce.rank_loss, ce.margin) == ("rank", 399, 31, "hinge", 0.2)
    assert (train.learning_rate, train.num_train_steps, train.warmup_steps, train.grad_norm) == (5e-5, 5000, 500, 2.0)
    assert train.train_batch_size * train.gradient_accumulation_steps == 8
    assert (cfg.data.max_txt_len, cfg.data.num_bb, cfg.data.min_bb, cfg.data.max_bb) == (60, 36, 10, 100)
