"""Checkpoint import from state dicts written with the original key names (SPEC 4)."""
from __future__ import annotations

import pytest
import torch

from model.biencoder import BiEncoder, BiEncoderConfig
from model.checkpoint import (
    CheckpointError,
    build_cross_encoder_from_checkpoint,
    load_biencoder_weights,
    load_cross_encoder_weights,
    load_image_tower_from_uniter,
    load_pretrain_weights,
    load_text_tower_weights,
    read_checkpoint,
)
from model.cross_encoder import CrossEncoderConfig, UniterCrossEncoder
from model.families import build_biencoder_from_checkpoint
from model.pretrain_model import PretrainSettings
from tests import helpers as ref
from tests.helpers import TINY_BERT, save_checkpoint, tiny_bert_config
from utils.pipeline.model_setup import build_pretrain_model_from_checkpoint
from utils.pipeline.pretrain_tasks import pretrain_model

H, LAYERS, V, IMG_DIM = TINY_BERT["hidden_size"], TINY_BERT["num_hidden_layers"], TINY_BERT["vocab_size"], 2048
LAYER_KEYS = [
    f"{name}.{p}"
    for name in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
        "output.dense", "output.LayerNorm",
    )
    for p in ("weight", "bias")
]


def bert_body_shapes(img: bool) -> dict[str, tuple[int, ...]]:
    """Original key names and shapes of a (UNITER when `img`) BERT body, tiny config."""
    shapes = {
        "embeddings.word_embeddings.weight": (V, H),
        "embeddings.position_embeddings.weight": (TINY_BERT["max_position_embeddings"], H),
        "embeddings.token_type_embeddings.weight": (2, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
        "pooler.dense.weight": (H, H),
        "pooler.dense.bias": (H,),
    }
    for i in range(LAYERS):
        for key in LAYER_KEYS:
            module, kind = key.rsplit(".", 1)
            if module == "intermediate.dense":
                shape = (64, H) if kind == "weight" else (64,)
            elif module == "output.dense":
                shape = (H, 64) if kind == "weight" else (H,)
            elif module.endswith("LayerNorm"):
                shape = (H,)
            else:
                shape = (H, H) if kind == "weight" else (H,)
            shapes[f"encoder.layer.{i}.{key}"] = shape
    if img:
        e = "img_embeddings."
        shapes.update({
            f"{e}img_linear.weight": (H, IMG_DIM), f"{e}img_linear.bias": (H,),
            f"{e}pos_linear.weight": (H, 7), f"{e}pos_linear.bias": (H,),
            f"{e}mask_embedding.weight": (2, IMG_DIM),
        })
        for ln in ("img_layer_norm", "pos_layer_norm", "LayerNorm"):
            shapes.update({f"{e}{ln}.weight": (H,), f"{e}{ln}.bias": (H,)})
    return shapes


def proj_shapes(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}encode_proj.0.weight": (2 * H, H), f"{prefix}encode_proj.0.bias": (2 * H,),
        f"{prefix}encode_proj.2.weight": (2 * H,), f"{prefix}encode_proj.2.bias": (2 * H,),
        f"{prefix}encode_proj.3.weight": (dim, 2 * H), f"{prefix}encode_proj.3.bias": (dim,),
    }


def original_biencoder_state(seed: int = 0, project_dim: int = 16) -> dict[str, torch.Tensor]:
    """A fine-tuned bi-encoder `model_dict` written with the SPEC 4 names (no position_ids)."""
    shapes = {f"img_model.bert.{k}": s for k, s in bert_body_shapes(img=True).items()}
    shapes.update({f"txt_model.bert.{k}": s for k, s in bert_body_shapes(img=False).items()})
    shapes.update(proj_shapes("img_model.", project_dim))
    shapes.update(proj_shapes("txt_model.", project_dim))
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()}


def new_biencoder(project_dim: int = 16) -> BiEncoder:
    return BiEncoder(BiEncoderConfig(dict(TINY_BERT), dict(TINY_BERT), project_dim)).eval()


def assert_loaded(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    own = module.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(own[prefix + key], value, atol=0, rtol=0, msg=key)


def test_our_keys_are_the_original_keys() -> None:
    assert set(new_biencoder().state_dict()) == set(original_biencoder_state())
    assert set(new_biencoder(0).state_dict()) == {
        k for k in original_biencoder_state() if "encode_proj" not in k
    }


def test_original_finetuned_biencoder(tmp_path) -> None:
    state = original_biencoder_state()
    with_buffer = dict(state)
    with_buffer["txt_model.bert.embeddings.position_ids"] = torch.arange(64)[None]
    for name, sd in (("old.pt", with_buffer), ("new.pt", state)):
        path = tmp_path / name
        torch.save(
            {"model_dict": sd, "optimizer_dict": {"state": {}}, "scheduler_dict": {}, "offset": 3,
             "epoch": 2, "encoder_params": {"project_dim": 16}},
            path,
        )
        model = new_biencoder()
        load_biencoder_weights(model, path)
        assert_loaded(model, state)
    # The loaded model computes what the reference computes from the original weights.
    ids, mask = ref.random_text(2, [3, 5], V, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(ids, mask), ref.text_tower(ids, mask, state, TINY_BERT, True), atol=1e-5, rtol=0
        )


def original_pretrain_state(seed: int = 0) -> dict[str, torch.Tensor]:
    body = original_biencoder_state(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    heads = {
        "cls.predictions.bias": torch.randn(V, generator=gen),
        "cls.predictions.transform.dense.weight": torch.randn(H, H, generator=gen),
        "cls.predictions.transform.dense.bias": torch.randn(H, generator=gen),
        "cls.predictions.transform.LayerNorm.weight": torch.randn(H, generator=gen),
        "cls.predictions.transform.LayerNorm.bias": torch.randn(H, generator=gen),
        "cls.predictions.decoder.weight": body["img_model.bert.embeddings.word_embeddings.weight"],
        "feat_regress.weight": body["img_model.bert.img_embeddings.img_linear.weight"],
        "feat_regress.bias": torch.randn(IMG_DIM, generator=gen),
        "feat_regress.net.0.weight": torch.randn(H, H, generator=gen),
        "feat_regress.net.0.bias": torch.randn(H, generator=gen),
        "feat_regress.net.2.weight": torch.randn(H, generator=gen),
        "feat_regress.net.2.bias": torch.randn(H, generator=gen),
        "region_classifier.net.0.weight": torch.randn(H, H, generator=gen),
        "region_classifier.net.0.bias": torch.randn(H, generator=gen),
        "region_classifier.net.2.weight": torch.randn(H, generator=gen),
        "region_classifier.net.2.bias": torch.randn(H, generator=gen),
        "region_classifier.net.3.weight": torch.randn(1601, H, generator=gen),
        "region_classifier.net.3.bias": torch.randn(1601, generator=gen),
        "itm_output.weight": torch.randn(2, H, generator=gen),
        "itm_output.bias": torch.randn(2, generator=gen),
    }
    return {**{f"bert.{k}": v for k, v in body.items()}, **heads}


def test_original_pretrain_checkpoint(tmp_path) -> None:
    state = original_pretrain_state()
    path = tmp_path / "model_step_10.pt"
    torch.save(state, path)

    bi = new_biencoder()
    load_biencoder_weights(bi, path)
    assert_loaded(bi, {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")})

    model = pretrain_model(new_biencoder())
    load_pretrain_weights(model, path)
    assert_loaded(model, {k: v for k, v in state.items() if not k.startswith("itm_output.")})
    img_bert = model.bert.img_model.bert
    assert model.cls.predictions.decoder.weight is img_bert.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is img_bert.img_embeddings.img_linear.weight


def uniter_state(seed: int = 0, finetuned: bool = True, gamma_beta: bool = True) -> dict[str, torch.Tensor]:
    """A UNITER file: `uniter.*` + ITM/rank heads (fine-tuned) or pre-training heads."""
    gen = torch.Generator().manual_seed(seed)
    state = {f"uniter.{k}": torch.randn(s, generator=gen) * 0.1 for k, s in bert_body_shapes(img=True).items()}
    state["itm_output.weight"] = torch.randn(2, H, generator=gen)
    state["itm_output.bias"] = torch.randn(2, generator=gen)
    if finetuned:
        state["rank_output.weight"] = torch.randn(1, H, generator=gen)  # stale: must be re-tied
        state["rank_output.bias"] = torch.randn(1, generator=gen)
    else:
        state["cls.predictions.bias"] = torch.randn(V, generator=gen)
        state["cls.predictions.decoder.weight"] = state["uniter.embeddings.word_embeddings.weight"]
        state["feat_regress.weight"] = state["uniter.img_embeddings.img_linear.weight"]
        state["region_classifier.net.3.bias"] = torch.randn(1601, generator=gen)
    if gamma_beta:
        renamed = {}
        for k, v in state.items():
            if "LayerNorm" in k or "layer_norm" in k:
                k = k.replace(".weight", ".gamma").replace(".bias", ".beta")
            renamed[k] = v
        state = renamed
    return state


def test_original_uniter_cross_encoder(tmp_path) -> None:
    raw = uniter_state()
    assert "uniter.embeddings.LayerNorm.gamma" in raw
    path = tmp_path / "uniter_itm.pt"
    torch.save(raw, path)
    model = UniterCrossEncoder(CrossEncoderConfig(dict(TINY_BERT))).eval()
    load_cross_encoder_weights(model, path)
    torch.testing.assert_close(model.rank_output.weight[0], raw["itm_output.weight"][1])
    sd = model.state_dict()
    torch.testing.assert_close(sd["uniter.embeddings.LayerNorm.weight"], raw["uniter.embeddings.LayerNorm.gamma"])
    ids, mask = ref.random_text(2, [3, 5], V, seed=2)
    feat, pos, img_mask = ref.random_boxes(2, [4, 2], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            model.score(ids, mask, feat, pos, img_mask),
            ref.uniter_score(ids, mask, feat, pos, img_mask, sd, TINY_BERT),
            atol=1e-5,
            rtol=0,
        )
    # A pre-trained UNITER (no rank_output, pre-training heads) loads too.
    torch.save(uniter_state(finetuned=False), tmp_path / "uniter-base.pt")
    load_cross_encoder_weights(model, tmp_path / "uniter-base.pt")


def test_uniter_base_initialises_image_tower(tmp_path) -> None:
    raw = uniter_state(seed=4, finetuned=False)
    path = tmp_path / "uniter-base.pt"
    torch.save(raw, path)
    model = new_biencoder()
    proj_before = model.img_model.encode_proj[0].weight.clone()
    load_image_tower_from_uniter(model.img_model, path)
    normalised = uniter_state(seed=4, finetuned=False, gamma_beta=False)
    assert_loaded(
        model.img_model.bert, {k[len("uniter."):]: v for k, v in normalised.items() if k.startswith("uniter.")}
    )
    torch.testing.assert_close(model.img_model.encode_proj[0].weight, proj_before)


def test_hf_bert_weights_for_text_tower(tmp_path) -> None:
    from transformers import BertConfig, BertForPreTraining, BertModel

    cfg = BertConfig(**TINY_BERT)
    pretraining = BertForPreTraining(cfg).eval()
    ref.randomize_(pretraining, seed=5)
    prefixed = dict(pretraining.state_dict())
    prefixed["bert.embeddings.position_ids"] = torch.arange(64)[None]
    bare = {k[len("bert."):]: v for k, v in prefixed.items() if k.startswith("bert.") and "position_ids" not in k}
    torch.save(prefixed, tmp_path / "prefixed.pt")
    torch.save(bare, tmp_path / "bert-base-cased.pt")
    pretraining.bert.save_pretrained(tmp_path / "hf_dir")

    ids, mask = ref.random_text(2, [4, 2], V, seed=6)
    with torch.no_grad():
        want = pretraining.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    for source in ("prefixed.pt", "bert-base-cased.pt", "hf_dir"):
        model = new_biencoder(0)
        load_text_tower_weights(model.txt_model, tmp_path / source)
        with torch.no_grad():
            torch.testing.assert_close(model.encode_text(ids, mask), want, atol=1e-5, rtol=0, msg=source)
    assert isinstance(pretraining.bert, BertModel)


def test_errors_name_keys_shapes_and_file(tmp_path) -> None:
    state = original_biencoder_state()
    missing = dict(state)
    del missing["img_model.bert.img_embeddings.pos_linear.weight"]
    torch.save({"model_dict": missing}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing\.pt(.|\n)*missing keys \(1\): img_model\.bert\.img_embeddings\.pos_linear\.weight"):
        load_biencoder_weights(new_biencoder(), tmp_path / "missing.pt")

    extra = dict(state, **{"txt_model.bert.embeddings.foo": torch.zeros(1)})
    torch.save({"model_dict": extra}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): txt_model\.bert\.embeddings\.foo"):
        load_biencoder_weights(new_biencoder(), tmp_path / "extra.pt")

    wide = BiEncoder(BiEncoderConfig(tiny_bert_config(hidden_size=48), tiny_bert_config(hidden_size=48), 16))
    torch.save({"model_dict": wide.state_dict()}, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"wide\.pt: shape mismatch for 'txt_model\.bert\.embeddings\.word_embeddings\.weight'.*expects \[211, 32\], the file has \[211, 48\]"):
        load_biencoder_weights(new_biencoder(), tmp_path / "wide.pt")

    stray = original_pretrain_state()
    stray["nce_output.weight"] = torch.zeros(1)
    torch.save(stray, tmp_path / "stray.pt")
    with pytest.raises(CheckpointError, match="nce_output.weight"):
        load_biencoder_weights(new_biencoder(), tmp_path / "stray.pt")

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="not a dict"):
        load_biencoder_weights(new_biencoder(), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="no 'format'"):
        read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):
        load_biencoder_weights(new_biencoder(), tmp_path / "nope.pt")


def test_our_format_round_trips(tmp_path) -> None:
    bi = new_biencoder()
    ref.randomize_(bi, seed=7)
    save_checkpoint(bi, tmp_path / "bi.pt", run_config={"train": {"learning_rate": 2e-5}}, extra={"step": 5})
    obj = read_checkpoint(tmp_path / "bi.pt")
    assert obj["run_config"] == {"train": {"learning_rate": 2e-5}} and obj["extra"] == {"step": 5}
    assert obj["model_config"]["txt_config"]["hidden_size"] == H
    rebuilt = build_biencoder_from_checkpoint(tmp_path / "bi.pt").eval()
    feat, pos, img_mask = ref.random_boxes(2, [3, 4], seed=8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(feat, pos, img_mask), bi.encode_image(feat, pos, img_mask))

    pre = pretrain_model(new_biencoder(), PretrainSettings(mask_duplicates=False))
    ref.randomize_(pre, seed=9)
    save_checkpoint(pre, tmp_path / "pre.pt")
    pre2 = build_pretrain_model_from_checkpoint(tmp_path / "pre.pt")
    assert not pre2.settings.mask_duplicates
    assert_loaded(pre2, pre.state_dict())
    assert pre2.cls.predictions.decoder.weight is pre2.bert.img_model.bert.embeddings.word_embeddings.weight
    assert_loaded(build_biencoder_from_checkpoint(tmp_path / "pre.pt"), pre.bert.state_dict())
    load_biencoder_weights(new_biencoder(), tmp_path / "pre.pt")

    cross = UniterCrossEncoder(CrossEncoderConfig(dict(TINY_BERT), rank_loss="softmax"))
    ref.randomize_(cross, seed=10)
    save_checkpoint(cross, tmp_path / "cross.pt")
    cross2 = build_cross_encoder_from_checkpoint(tmp_path / "cross.pt")
    assert cross2.config.rank_loss == "softmax"
    assert_loaded(cross2, cross.state_dict())
    with pytest.raises(CheckpointError, match="cross-encoder"):
        build_biencoder_from_checkpoint(tmp_path / "cross.pt")


def test_initialise_biencoder_applies_tower_checkpoints(tmp_path) -> None:
    from model.checkpoint import initialise_biencoder

    txt = {k[len("txt_model.bert."):]: v for k, v in original_biencoder_state(seed=11).items()
           if k.startswith("txt_model.bert.")}
    torch.save(txt, tmp_path / "bert-base-cased.pt")
    torch.save(uniter_state(seed=12, finetuned=False), tmp_path / "uniter-base.pt")
    model = new_biencoder()
    initialise_biencoder(model, tmp_path / "bert-base-cased.pt", tmp_path / "uniter-base.pt")
    assert_loaded(model.txt_model.bert, txt)
    img = uniter_state(seed=12, finetuned=False, gamma_beta=False)
    assert_loaded(model.img_model.bert, {k[len("uniter."):]: v for k, v in img.items() if k.startswith("uniter.")})


def test_cross_encoder_initialised_from_our_biencoder_image_tower(tmp_path) -> None:
    biencoder = new_biencoder()
    save_checkpoint(biencoder, tmp_path / "bi.pt")
    model = UniterCrossEncoder(CrossEncoderConfig(dict(TINY_BERT))).eval()
    head_before = model.itm_output.weight.clone()
    with pytest.raises(CheckpointError, match="not a cross-encoder"):
        load_cross_encoder_weights(model, tmp_path / "bi.pt")
    load_cross_encoder_weights(model, tmp_path / "bi.pt", allow_biencoder_init=True)
    tower = biencoder.img_model.bert.state_dict()
    body = model.uniter.state_dict()
    assert set(tower) == set(body)
    for key, value in tower.items():
        assert torch.equal(body[key], value), key
    # The ITM head is not part of an image tower: it keeps its initialisation.
    assert torch.equal(model.itm_output.weight, head_before)
    torch.testing.assert_close(model.rank_output.weight[0], model.itm_output.weight[1])


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_checkpoints_in_both_torch_save_formats_load(tmp_path, zip_format) -> None:
    # Checkpoints from 2020 may predate torch's zip format, which cannot be memory-mapped.
    from model.state_dicts import read_weights

    state = {"encoder.weight": torch.randn(3, 4), "encoder.bias": torch.randn(3)}
    path = tmp_path / "weights.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = read_weights(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value)


def test_one_registry_names_every_checkpoint_format():
    from model.checkpoint import CHECKPOINT_FORMATS, OUR_FORMATS, detect_format

    weight = torch.zeros(1)
    cases = {
        **{name: {"format": name, "model": {}} for name in OUR_FORMATS},
        "original-biencoder": {"model_dict": {}, "epoch": 1},
        "original-pretrain": {"bert.img_model.x": weight, "cls.predictions.bias": weight},
        "original-uniter": {"uniter.embeddings.x": weight, "itm_output.weight": weight},
        "state-dict": {"txt_model.bert.x": weight},
    }
    assert set(cases) == set(CHECKPOINT_FORMATS)
    assert {name: detect_format(obj) for name, obj in cases.items()} == {name: name for name in cases}
