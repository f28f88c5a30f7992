"""Pre-training heads: tied weights, VMLM / MRFR / MRC-kl / CMR against manual formulas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.biencoder import BiEncoder, BiEncoderConfig
from model.losses import contrastive_loss
from model.pretrain_model import PretrainModel, PretrainSettings
from tests import helpers as ref
from tests.helpers import TINY_BERT, gelu, layer_norm, tiny_bert_config
from utils.pipeline.pretrain_tasks import pretrain_model
from utils.pipeline.pretrain_tasks.smrm import masked_region_hidden

V = TINY_BERT["vocab_size"]


def tiny_pretrain(cls_concat: str = "add", seed: int = 0) -> PretrainModel:
    bi = BiEncoder(BiEncoderConfig(dict(TINY_BERT), dict(TINY_BERT), 16, cls_concat=cls_concat))
    model = pretrain_model(bi, PretrainSettings(img_label_dim=1601))
    ref.randomize_(model, seed)
    return model.eval()


def mlm_batch(seed: int = 0) -> dict:
    ids, mask = ref.random_text(2, [5, 3], V, seed=seed)
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[0, 4], labels[1, 1] = ids[0, 2], ids[0, 4], ids[1, 1]
    ids = ids.clone()
    ids[0, 2] = ids[1, 1] = 103
    feat, pos, img_mask = ref.random_boxes(2, [3, 4], seed=seed + 1)
    return {
        "txt": {"input_ids": ids, "attention_mask": mask},
        "img": {"img_feat": feat, "img_pos": pos, "img_mask": img_mask},
        "txt_labels": labels,
    }


def mrm_batch(seed: int = 0) -> dict:
    ids, mask = ref.random_text(2, [4, 6], V, seed=seed)
    feat, pos, img_mask = ref.random_boxes(2, [4, 3], seed=seed + 1)
    masked = torch.zeros(2, 4, dtype=torch.bool)
    masked[0, 0] = masked[0, 3] = masked[1, 2] = True
    targets = feat[masked].clone()
    feat = feat.masked_fill(masked[..., None], 0.0)
    soft = torch.softmax(torch.randn(3, 1601, generator=torch.Generator().manual_seed(seed)), -1)
    return {
        "txt": {"input_ids": ids, "attention_mask": mask},
        "img": {"img_feat": feat, "img_pos": pos, "img_mask": img_mask, "img_masked": masked},
        "feat_targets": targets,
        "label_targets": soft,
    }


def head_transform(h: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    x = gelu(h @ sd[f"{p}dense.weight"].t() + sd[f"{p}dense.bias"])
    return layer_norm(x, sd[f"{p}LayerNorm.weight"], sd[f"{p}LayerNorm.bias"])


def net3(h: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    x = gelu(h @ sd[f"{p}net.0.weight"].t() + sd[f"{p}net.0.bias"])
    return layer_norm(x, sd[f"{p}net.2.weight"], sd[f"{p}net.2.bias"])


def test_tied_weights_share_storage_and_gradients() -> None:
    model = tiny_pretrain()
    img_bert = model.bert.img_model.bert
    assert model.cls.predictions.decoder.weight is img_bert.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is img_bert.img_embeddings.img_linear.weight
    sd = model.state_dict()
    assert sd["cls.predictions.decoder.weight"].data_ptr() == sd["bert.img_model.bert.embeddings.word_embeddings.weight"].data_ptr()
    assert sd["feat_regress.weight"].data_ptr() == sd["bert.img_model.bert.img_embeddings.img_linear.weight"].data_ptr()
    # Each tied parameter is one parameter for the optimiser.
    names = [n for n, _ in model.named_parameters()]
    assert "cls.predictions.decoder.weight" not in names and "feat_regress.weight" not in names

    model.train()
    model(mlm_batch(), "mlm")["loss"].backward()
    word = img_bert.embeddings.word_embeddings.weight
    # Only the image tower's [CLS] id is embedded there, so any gradient on other rows comes
    # from the decoder: the tie really carries gradient.
    assert word.grad[torch.arange(V) != ref.CLS].abs().sum() > 0
    model.zero_grad()
    batch = mrm_batch()
    hidden = masked_region_hidden(model, batch).detach()
    F.mse_loss(model.feat_regress(hidden), batch["feat_targets"]).backward()
    assert img_bert.img_embeddings.img_linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["add", "multiply", "none"])
def test_vmlm_matches_manual(mode: str) -> None:
    model = tiny_pretrain(mode)
    batch = mlm_batch()
    sd = model.state_dict()
    txt, img = batch["txt"], batch["img"]
    with torch.no_grad():
        out = model(batch, "mlm")
        txt_seq = ref.bert_encoder(
            ref.text_embeddings(txt["input_ids"], sd, "bert.txt_model.bert."), txt["attention_mask"], sd,
            "bert.txt_model.bert.", 2, 2,
        )
        img_cls = ref.image_sequence(
            img["img_feat"], img["img_pos"], img["img_mask"], sd, "bert.img_model.bert.", TINY_BERT
        )[:, :1]
        seq = {"add": txt_seq + img_cls, "multiply": txt_seq * img_cls, "none": txt_seq}[mode]
        labels = batch["txt_labels"]
        h = head_transform(seq[labels != -100], sd, "cls.predictions.transform.")
        logits = h @ sd["bert.img_model.bert.embeddings.word_embeddings.weight"].t() + sd["cls.predictions.bias"]
        want = F.cross_entropy(logits, labels[labels != -100])
    torch.testing.assert_close(out["loss"], want, atol=1e-5, rtol=0)
    assert out["n_masked"].item() == 3
    assert out["n_correct"].item() == (logits.argmax(-1) == labels[labels != -100]).sum().item()


def _masked_hidden_reference(model: PretrainModel, batch: dict) -> torch.Tensor:
    sd = model.state_dict()
    txt, img = batch["txt"], batch["img"]
    txt_cls = ref.bert_encoder(
        ref.text_embeddings(txt["input_ids"], sd, "bert.txt_model.bert."), txt["attention_mask"], sd,
        "bert.txt_model.bert.", 2, 2,
    )[:, :1]
    img_seq = ref.image_sequence(
        img["img_feat"], img["img_pos"], img["img_mask"], sd, "bert.img_model.bert.", TINY_BERT,
        masked=img["img_masked"],
    )
    return (img_seq[:, 1:] + txt_cls)[img["img_masked"]]


def test_mrfr_matches_manual() -> None:
    model = tiny_pretrain()
    batch = mrm_batch()
    sd = model.state_dict()
    with torch.no_grad():
        out = model(batch, "mrfr")
        h = net3(_masked_hidden_reference(model, batch), sd, "feat_regress.")
        pred = h @ sd["bert.img_model.bert.img_embeddings.img_linear.weight"] + sd["feat_regress.bias"]
        want = ((pred - batch["feat_targets"]) ** 2).mean()
    assert pred.shape == (3, 2048)
    torch.testing.assert_close(out["loss"], want, atol=1e-5, rtol=1e-5)
    assert out["n_masked"].item() == 3


def test_mrckl_matches_manual() -> None:
    model = tiny_pretrain()
    batch = mrm_batch()
    sd = model.state_dict()
    with torch.no_grad():
        out = model(batch, "mrckl")
        h = net3(_masked_hidden_reference(model, batch), sd, "region_classifier.")
        logits = h @ sd["region_classifier.net.3.weight"].t() + sd["region_classifier.net.3.bias"]
        p = batch["label_targets"]
        log_q = torch.log_softmax(logits, -1)
        want = (p * (torch.log(p) - log_q)).sum() / p.numel()
    torch.testing.assert_close(out["loss"], want, atol=1e-6, rtol=1e-5)


def test_itm_is_contrastive_on_projected_embeddings() -> None:
    model = tiny_pretrain()
    ids, mask = ref.random_text(3, [3, 5, 4], V, seed=3)
    feat, pos, img_mask = ref.random_boxes(3, [2, 4, 3], seed=4)
    keys = torch.tensor([5, 6, 5])
    batch = {
        "txt": {"input_ids": ids, "attention_mask": mask},
        "img": {"img_feat": feat, "img_pos": pos, "img_mask": img_mask},
        "num_pos": 3,
        "txt_img_keys": keys,
        "img_keys": keys,
    }
    with torch.no_grad():
        out = model(batch, "itm")
        want = contrastive_loss(
            model.bert.encode_text(ids, mask), model.bert.encode_image(feat, pos, img_mask),
            num_pos=3, txt_img_keys=keys, img_keys=keys,
        )
    torch.testing.assert_close(out["loss"], want.loss)
    assert out["n_pos"].item() == 3


def test_state_dict_has_original_pretrain_keys_and_rejects_unknown_task() -> None:
    model = tiny_pretrain()
    heads = {k for k in model.state_dict() if not k.startswith("bert.")}
    assert heads == {
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.decoder.weight",
        "feat_regress.weight",
        "feat_regress.bias",
        "feat_regress.net.0.weight",
        "feat_regress.net.0.bias",
        "feat_regress.net.2.weight",
        "feat_regress.net.2.bias",
        "region_classifier.net.0.weight",
        "region_classifier.net.0.bias",
        "region_classifier.net.2.weight",
        "region_classifier.net.2.bias",
        "region_classifier.net.3.weight",
        "region_classifier.net.3.bias",
    }
    assert model.state_dict()["region_classifier.net.3.weight"].shape == (1601, 32)
    with pytest.raises(ValueError, match="unknown pre-training task"):
        model(mlm_batch(), "mrm-nce")


def test_mismatched_towers_refused() -> None:
    other = tiny_bert_config(300)
    with pytest.raises(ValueError, match="vocabularies"):
        pretrain_model(BiEncoder(BiEncoderConfig(other, dict(TINY_BERT), 8)))
