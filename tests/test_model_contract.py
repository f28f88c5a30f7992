"""The model contract (model/retrieval.py), the family registry (model/families.py) and what
rests on them: pre-training of any family, loading by family, config sections checked at load."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

import inference
import pretrain
from model.biencoder import BiEncoderConfig
from model.checkpoint import load_vldeformer_init_file, make_checkpoint
from model.families import (
    FAMILIES,
    build_biencoder_from_checkpoint,
    check_model_section,
    load_retrieval_model,
)
from model.state_dicts import CheckpointError
from model.vldeformer import VLDeformerConfig
from tests import helpers as ref
from tests.helpers import TINY_BERT, pretrain_config, randomize_, write_config
from utils.config import BimodalNegatives, ModelConfig, RunConfig, load_config
from utils.errors import ConfigError
from utils.pipeline.model_setup import (
    build_biencoder_for_run,
    build_pretrain_model_for_run,
)
from utils.pipeline.pretrain_tasks import pretrain_model
from utils.pipeline.run_config import (
    PRETRAIN,
    TRAIN_CROSS_ENCODER,
    TRAIN_ITM,
    warn_ignored_options,
)

# A small model of every family, from its own config class.
FAMILY_CONFIGS = {
    "lightningdot": BiEncoderConfig(dict(TINY_BERT), dict(TINY_BERT), project_dim=16,
                                    hierarchy={"mode": "heads", "dims": [4, 16]}),
    "vldeformer": VLDeformerConfig(dict(TINY_BERT), project_dim=8, temperature=0.05),
}


def test_every_family_is_tested_here():
    assert set(FAMILY_CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_every_family_meets_the_contract(name, tmp_path):
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.build(dataclasses.replace(FAMILY_CONFIGS[name]))
    randomize_(model, seed=1)
    model.eval()
    assert model.family == name and len(model.level_weights) == len(model.level_dims)
    assert model.embedding_dim == model.level_dims[-1]
    ids, mask = ref.random_text(3, [4, 2, 6], TINY_BERT["vocab_size"], seed=2)
    feat, pos, img_mask = ref.random_boxes(2, [3, 5], seed=3)
    batch = {"txt": {"input_ids": ids, "attention_mask": mask},
             "img": {"img_feat": feat, "img_pos": pos, "img_mask": img_mask}}
    with torch.no_grad():
        txt_levels, img_levels = model(batch)
        assert [t.shape for t in txt_levels] == [(3, d) for d in model.level_dims]
        assert [t.shape for t in img_levels] == [(2, d) for d in model.level_dims]
        torch.testing.assert_close(model.encode_text(ids, mask), txt_levels[-1])
        torch.testing.assert_close(model.encode_image(feat, pos, img_mask), img_levels[-1])
        torch.testing.assert_close(model.score(txt_levels[-1], img_levels[-1]), txt_levels[-1] @ img_levels[-1].t())
        assert model({"txt": batch["txt"]})[1] is None
        # The execution mode is the contract's and computes the same function.
        model.execution = "padded"
        torch.testing.assert_close(model.encode_text(ids, mask), txt_levels[-1], atol=1e-5, rtol=0)
    # Our checkpoint alone rebuilds the family's model.
    torch.save(make_checkpoint(model), tmp_path / "m.pt")
    rebuilt = build_biencoder_from_checkpoint(tmp_path / "m.pt").eval()
    assert rebuilt.family == name and rebuilt.checkpoint_config() == model.checkpoint_config()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(feat, pos, img_mask), img_levels[-1])


def test_the_model_section_is_checked_against_its_family():
    assert check_model_section(ModelConfig()) is FAMILIES["lightningdot"]
    with pytest.raises(ConfigError, match=r"model.type: 'dual' is not a model family; known: \['lightningdot', 'vldeformer'\]"):
        check_model_section(ModelConfig(type="dual"))
    with pytest.raises(ConfigError, match="model.pooling is for model.type vldeformer"):
        check_model_section(ModelConfig(pooling="cls"))
    with pytest.raises(ConfigError, match="model.fix_txt_encoder is for model.type lightningdot"):
        check_model_section(ModelConfig(type="vldeformer", fix_txt_encoder=True))


def _vldeformer_section(workspace) -> ModelConfig:
    return ModelConfig(type="vldeformer", img_model_config=str(workspace.uniter_config), project_dim=0)


def test_an_original_uniter_checkpoint_is_decomposed_for_inference(workspace, tmp_path):
    """inference.py with `model.type: vldeformer` and an original UNITER file decomposes it, as
    train_itm.py does with `model.uniter_checkpoint`; the LightningDOT family refuses it."""
    section = _vldeformer_section(workspace)
    loaded, fmt = load_retrieval_model(workspace.uniter_ckpt, section)
    assert fmt == "original-uniter"
    torch.manual_seed(5)
    trained_start = build_biencoder_for_run(dataclasses.replace(section, uniter_checkpoint=str(workspace.uniter_ckpt)))
    reference = FAMILIES["vldeformer"].build(trained_start.config)
    load_vldeformer_init_file(reference, workspace.uniter_ckpt)
    for state in (trained_start.state_dict(), reference.state_dict()):
        assert state.keys() == loaded.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())

    out = tmp_path / "inf"
    info = inference.main(["--config", str(workspace.config), "--checkpoint", str(workspace.uniter_ckpt),
                           "--output_dir", str(out), "model.type=vldeformer", f"model.img_model_config={workspace.uniter_config}",
                           "model.txt_model_config=", "project_dim=0"])
    assert info["checkpoint_format"] == "original-uniter" and info["model_config"]["model_type"] == "vldeformer"
    reference.eval()
    img = np.load(out / "img_emb.npy")
    assert img.shape[1] == reference.embedding_dim
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)  # cosine scores

    with pytest.raises(CheckpointError, match="it starts model.type vldeformer"):
        load_retrieval_model(workspace.uniter_ckpt, load_config(workspace.config).model)


def test_pretraining_biencoder_checkpoint_fills_the_heads_as_the_original(tiny_models, tmp_path, caplog):
    section = ModelConfig(txt_model_config=tiny_models["txt"], img_model_config=tiny_models["img"], project_dim=16)
    torch.manual_seed(3)
    source = build_pretrain_model_for_run(section)
    randomize_(source, seed=4)
    # The original pretrain.py's checkpoint: the whole model's state dict (+ its unused ITM head).
    original = {**source.state_dict(), "itm_output.weight": torch.zeros(2, 32), "itm_output.bias": torch.zeros(2)}
    torch.save(original, tmp_path / "model_step_10.pt")
    with caplog.at_level(logging.INFO):
        model = build_pretrain_model_for_run(dataclasses.replace(section, biencoder_checkpoint=str(tmp_path / "model_step_10.pt")))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    assert "no pre-training heads" not in caplog.text

    # A fine-tuned bi-encoder has no heads: it fills the towers and says so in one line.
    torch.save(make_checkpoint(source.bert), tmp_path / "biencoder.pt")
    caplog.clear()
    torch.manual_seed(3)
    fresh = build_pretrain_model_for_run(section)
    torch.manual_seed(3)
    with caplog.at_level(logging.INFO):
        model = build_pretrain_model_for_run(dataclasses.replace(section, biencoder_checkpoint=str(tmp_path / "biencoder.pt")))
    state, fresh_state = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(state[k], source.state_dict()[k]) for k in state if k.startswith("bert."))
    # The heads' own weights (not the two tied to the image tower) keep their initialisation.
    tied = ("cls.predictions.decoder.weight", "feat_regress.weight")
    heads = [k for k in state if not k.startswith("bert.") and k not in tied]
    assert heads and all(torch.equal(state[k], fresh_state[k]) for k in heads)
    warnings = [r for r in caplog.records if "no pre-training heads" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_any_family_pretrains_the_tasks_it_can_run(tiny_data, tiny_models, tmp_path, caplog):
    config = pretrain_config(tiny_data, tiny_models, ["itm"], [1], num_train_steps=2, valid_steps=2)
    config["model"] = {"type": "vldeformer", "img_model_config": tiny_models["img"], "project_dim": 0,
                       "temperature": 0.05, "dropout": 0.0}
    config["data"]["bimodal_negatives"] = {"image": 1}
    path = write_config(tmp_path / "vld.yaml", config)
    with caplog.at_level(logging.WARNING):
        result = pretrain.main(["--config", path, "--output_dir", str(tmp_path / "run")])
    assert result["step"] == 2 and "itm/loss" in result["val"]
    assert "data.bimodal_negatives is set in the config, but pretrain.py does not read it" in caplog.text
    final = build_biencoder_from_checkpoint(tmp_path / "run" / "ckpt" / "model_final.pt")
    assert final.family == "vldeformer"

    cfg = load_config(path)
    with pytest.raises(ConfigError, match=r"pre-training task 'mlm' needs token_states .* model family 'vldeformer' "
                                          r"does not provide; it can run: itm"):
        build_pretrain_model_for_run(cfg.model, ["itm", "mlm"])
    assert list(pretrain_model(FAMILIES["vldeformer"].build(FAMILY_CONFIGS["vldeformer"])).objectives) == ["itm"]


def test_training_programs_warn_about_options_they_ignore(caplog):
    cfg = RunConfig()
    cfg.data.bimodal_negatives = BimodalNegatives(image=1)
    cfg.model.hierarchy = None
    with caplog.at_level(logging.WARNING):
        assert warn_ignored_options(cfg, PRETRAIN) == ["data.bimodal_negatives"]
        assert warn_ignored_options(cfg, TRAIN_ITM) == []
        assert warn_ignored_options(cfg, TRAIN_CROSS_ENCODER) == ["data.bimodal_negatives"]
    assert caplog.text.count("data.bimodal_negatives is set") == 2


def test_bimodal_negatives_are_a_data_section_and_the_old_spelling_loads(tmp_path):
    old = load_config(write_config(tmp_path / "old.yaml", {"train": {"bimodal_negatives": {"image": 2}}}))
    new = load_config(write_config(tmp_path / "new.yaml", {"data": {"bimodal_negatives": {"image": 2}}}))
    assert old.data.bimodal_negatives == new.data.bimodal_negatives == BimodalNegatives(image=2)
    assert load_config(tmp_path / "new.yaml", ["train.bimodal_negatives.image=0"]).data.bimodal_negatives is None
    with pytest.raises(ConfigError, match=r"new.yaml: data.bimodal_negatives.region_mix must be in \(0, 1\)"):
        load_config(tmp_path / "new.yaml", ["data.bimodal_negatives.region_mix=1.5"])
