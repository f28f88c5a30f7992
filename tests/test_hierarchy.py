"""HiVLP embedding hierarchy (training side): spec checks, levels, losses, checkpoints, two ranks."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

import pretrain
import train_itm
from model.biencoder import BiEncoder, BiEncoderConfig
from model.checkpoint import (
    CheckpointError,
    load_biencoder_weights,
    load_pretrain_weights,
    make_checkpoint,
    read_checkpoint,
)
from model.families import build_biencoder_from_checkpoint
from model.losses import contrastive_loss, hierarchical_contrastive_loss
from tests.helpers import (
    itm_config,
    pretrain_config,
    random_boxes,
    random_text,
    save_checkpoint,
    spawn_gloo,
    tiny_bert_config,
    write_config,
)
from utils.config import load_config
from utils.errors import ConfigError
from utils.hierarchy import Hierarchy, HierarchyError
from utils.pipeline.model_setup import build_biencoder_for_run
from utils.pipeline.pretrain_tasks import pretrain_model

REPO = Path(__file__).resolve().parents[1]
BERT = tiny_bert_config(dropout=0.0)
FULL = 16
HEADS = {"mode": "heads", "dims": [4, 8, FULL], "weights": [0.5, 1.0, 2.0]}
PREFIX = {"mode": "prefix", "dims": [4, 8, FULL], "weights": [0.25, 1.0, 1.5]}


def make_model(hierarchy: dict | None, seed: int = 0, project_dim: int = FULL) -> BiEncoder:
    torch.manual_seed(seed)
    return BiEncoder(BiEncoderConfig(BERT, BERT, project_dim=project_dim, hierarchy=hierarchy))


def retrieval_batch(n_pos: int, n_txt_neg: int, n_img_neg: int, keys: list[int], seed: int) -> dict:
    """A retrieval batch (docs/architecture.md layout) of fixed widths, so shards concatenate."""
    n_txt, n_img = n_pos + n_txt_neg, n_pos + n_img_neg
    gen = torch.Generator().manual_seed(seed)
    ids, mask = random_text(n_txt, torch.randint(1, 6, (n_txt,), generator=gen).tolist(), 211, seed, pad_to=8)
    feat, pos, img_mask = random_boxes(n_img, torch.randint(1, 4, (n_img,), generator=gen).tolist(), seed, pad_to=4)
    return {
        "txt": {"input_ids": ids, "attention_mask": mask},
        "img": {"img_feat": feat, "img_pos": pos, "img_mask": img_mask},
        "num_pos": n_pos,
        "txt_img_keys": torch.tensor(keys + [900 + seed * 10 + i for i in range(n_txt_neg)]),
        "img_keys": torch.tensor(keys + [700 + seed * 10 + i for i in range(n_img_neg)]),
    }


# ---------------------------------------------------------------- the spec


def test_spec_parses_with_default_weights_and_round_trips():
    spec = Hierarchy.from_dict({"mode": "prefix", "dims": [64, 256, 768]}, 768)
    assert spec == Hierarchy("prefix", (64, 256, 768), (1.0, 1.0, 1.0))
    assert Hierarchy.from_dict(spec.to_dict()) == spec
    assert Hierarchy.from_dict({}) is None and Hierarchy.from_dict(None) is None


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"mode": "tree", "dims": [8, 16]}, r"model\.hierarchy\.mode: expected one of"),
        ({"mode": "prefix", "dims": [8, 8, 16]}, r"model\.hierarchy\.dims: sizes must be strictly increasing"),
        ({"mode": "prefix", "dims": [16, 8]}, r"model\.hierarchy\.dims: sizes must be strictly increasing"),
        ({"mode": "prefix", "dims": [0, 16]}, r"model\.hierarchy\.dims: every size must be a positive int"),
        ({"mode": "prefix", "dims": []}, r"model\.hierarchy\.dims: expected a non-empty list"),
        ({"mode": "prefix", "dims": [8, 12]}, r"model\.hierarchy\.dims: the last size must be the full embedding size 16"),
        ({"mode": "heads", "dims": [8, 16], "weights": [1.0]}, r"model\.hierarchy\.weights: expected 2 numbers"),
        ({"mode": "heads", "dims": [8, 16], "weights": [1.0, -1.0]}, r"model\.hierarchy\.weights: must be finite, >= 0"),
        ({"mode": "heads", "dims": [8, 16], "weights": [0, 0]}, r"model\.hierarchy\.weights: must be finite, >= 0"),
        ({"mode": "heads", "dims": [8, 16], "levels": 2}, r"model\.hierarchy: unknown key\(s\) \['levels'\]"),
    ],
)
def test_bad_spec_is_a_config_error_naming_the_key(spec, match, tmp_path):
    with pytest.raises(HierarchyError, match=match):
        Hierarchy.from_dict(spec, FULL)
    path = write_config(tmp_path / "c.yaml", {"model": {"project_dim": FULL, "hierarchy": spec}})
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_project_dim_zero_checks_the_hidden_size_at_build(tiny_models):
    cfg = load_config(REPO / "configs" / "demo" / "finetune.yaml",
                      [f"txt_model_config={tiny_models['txt']}", f"img_model_config={tiny_models['img']}",
                       "project_dim=0", "model.hierarchy={mode: prefix, dims: [8, 16]}"])
    # The tiny towers are 32 wide: with no projection the last level must be 32.
    with pytest.raises(ConfigError, match=r"model\.hierarchy\.dims: the last size must be the full embedding size 32"):
        build_biencoder_for_run(cfg.model)
    cfg.model.hierarchy = Hierarchy.from_dict({"mode": "heads", "dims": [8, 32]})
    model = build_biencoder_for_run(cfg.model)
    assert model.level_dims == [8, 32] and model.config.hierarchy.weights == (1.0, 1.0)


def test_repo_configs_are_small_overrides_with_the_hierarchy(monkeypatch):
    monkeypatch.chdir(REPO)
    pairs = [("itm/flickr30k", "itm/flickr30k_hivlp_"), ("itm/coco", "itm/coco_hivlp_"),
             ("pretrain/paper", "pretrain/hivlp_")]
    for base_name, prefix in pairs:
        base = load_config(f"configs/{base_name}.yaml")
        for mode in ("prefix", "heads"):
            cfg = load_config(f"configs/{prefix}{mode}.yaml")
            assert cfg.model.hierarchy.to_dict() == {"mode": mode, "dims": [64, 256, 768], "weights": [1.0, 1.0, 1.0],
                                                     "normalize": True, "temperature": 0.05}
            assert (cfg.data, cfg.train) == (base.data, base.train)
            assert cfg.output_dir != base.output_dir
    demo = load_config("configs/demo/finetune_hivlp.yaml")
    assert demo.model.hierarchy.mode == "prefix" and demo.model.hierarchy.dims[-1] == demo.model.project_dim
    assert load_config("configs/demo/finetune.yaml").model.hierarchy is None


# ---------------------------------------------------------------- levels


def test_prefix_levels_are_slices_of_the_full_embedding():
    model = make_model(PREFIX).eval()
    batch = retrieval_batch(3, 0, 1, [1, 2, 3], seed=1)
    txt, img = batch["txt"], batch["img"]
    with torch.no_grad():
        levels = model.encode_text_levels(txt["input_ids"], txt["attention_mask"])
        full = model.encode_text(txt["input_ids"], txt["attention_mask"])
        img_levels = model.encode_image_levels(img["img_feat"], img["img_pos"], img["img_mask"])
        img_full = model.encode_image(img["img_feat"], img["img_pos"], img["img_mask"])
    assert model.level_dims == [4, 8, FULL]
    assert [t.shape for t in levels] == [(3, 4), (3, 8), (3, FULL)]
    assert [t.shape for t in img_levels] == [(4, 4), (4, 8), (4, FULL)]
    for d, level, img_level in zip(model.level_dims, levels, img_levels):
        assert torch.equal(level, full[:, :d]) and torch.equal(img_level, img_full[:, :d])
    # No weights of its own: the same keys as a flat model, and the same initial weights.
    flat = make_model(None)
    assert flat.level_dims == [FULL]
    assert model.state_dict().keys() == flat.state_dict().keys()


def test_heads_levels_are_linear_heads_on_the_cls_state():
    model = make_model(HEADS).eval()
    batch = retrieval_batch(2, 1, 0, [1, 2], seed=2)
    txt, img = batch["txt"], batch["img"]
    with torch.no_grad():
        levels = model.encode_text_levels(txt["input_ids"], txt["attention_mask"])
        img_levels = model.encode_image_levels(img["img_feat"], img["img_pos"], img["img_mask"])
        cls = model.txt_model.hidden(txt["input_ids"], txt["attention_mask"])[:, 0]
        img_cls = model.img_model.hidden(img["img_feat"], img["img_pos"], img["img_mask"])[:, 0]
        sd = model.state_dict()
        for i, d in enumerate([4, 8]):
            want = cls @ sd[f"txt_model.level_proj.{i}.weight"].t() + sd[f"txt_model.level_proj.{i}.bias"]
            img_want = img_cls @ sd[f"img_model.level_proj.{i}.weight"].t() + sd[f"img_model.level_proj.{i}.bias"]
            assert levels[i].shape == (3, d)
            torch.testing.assert_close(levels[i], want, atol=1e-5, rtol=0)
            torch.testing.assert_close(img_levels[i], img_want, atol=1e-5, rtol=0)
        assert torch.equal(levels[-1], model.encode_text(txt["input_ids"], txt["attention_mask"]))
        assert torch.equal(img_levels[-1], model.encode_image(img["img_feat"], img["img_pos"], img["img_mask"]))
    assert sorted(k for k in sd if "level_proj" in k) == sorted(
        f"{tower}.level_proj.{i}.{p}" for tower in ("txt_model", "img_model") for i in (0, 1) for p in ("weight", "bias")
    )
    # The heads come after the towers: the towers start as a flat model of the same seed does.
    flat = make_model(None).state_dict()
    assert all(torch.equal(flat[k], sd[k]) for k in flat)


def test_forward_returns_levels_and_uses_every_head():
    model = make_model(HEADS)
    batch = retrieval_batch(2, 0, 0, [1, 2], seed=3)
    txt_levels, img_levels = model(batch)
    assert isinstance(txt_levels, list) and len(txt_levels) == len(img_levels) == 3
    sum(t.sum() + i.sum() for t, i in zip(txt_levels, img_levels)).backward()
    heads = [p for n, p in model.named_parameters() if "level_proj" in n]
    assert heads and all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)


# ---------------------------------------------------------------- losses


def _nll(target: float, row: list[float]) -> float:
    return -math.log(math.exp(target) / sum(math.exp(s) for s in row))


def _pair_loss(s: list[list[float]]) -> float:
    """0.5 * (t2i + i2t) cross-entropy of a square score matrix, by hand."""
    n = len(s)
    t2i = sum(_nll(s[i][i], s[i]) for i in range(n)) / n
    i2t = sum(_nll(s[i][i], [s[j][i] for j in range(n)]) for i in range(n)) / n
    return 0.5 * t2i + 0.5 * i2t


def test_hierarchical_loss_is_the_weighted_sum_by_hand():
    txt = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [1.0, 1.0, 0.5]])
    img = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, -1.0, 1.0]])
    # Prefix levels of sizes 1, 2 and 3: score matrices over the first d coordinates.
    levels_t = [txt[:, :1], txt[:, :2], txt]
    levels_i = [img[:, :1], img[:, :2], img]
    weights = [0.5, 1.0, 2.0]

    def scores(d: int) -> list[list[float]]:
        return [[sum(txt[a, k].item() * img[b, k].item() for k in range(d)) for b in range(3)] for a in range(3)]

    want = sum(w * _pair_loss(scores(d)) for w, d in zip(weights, (1, 2, 3)))
    out = hierarchical_contrastive_loss(levels_t, levels_i, weights)
    assert out.loss.item() == pytest.approx(want, abs=1e-6)
    assert (out.loss_t2i * 0.5 + out.loss_i2t * 0.5).item() == pytest.approx(want, abs=1e-6)
    # Accuracies are those of the full level: row argmaxes of scores(3) are 0, 1, 0 -> 2 correct.
    full = contrastive_loss(txt, img)
    assert out.n_correct_t2i.item() == full.n_correct_t2i.item() == 2 and out.n_pos == 3
    with pytest.raises(ValueError, match="one text level, image level and weight per level"):
        hierarchical_contrastive_loss(levels_t, levels_i[:2], weights)


def test_one_full_level_equals_the_flat_loss_exactly():
    gen = torch.Generator().manual_seed(5)
    txt, img = torch.randn(5, 6, generator=gen), torch.randn(7, 6, generator=gen)
    keys = {"txt_img_keys": torch.tensor([1, 2, 3, 1, 9]), "img_keys": torch.tensor([1, 2, 3, 4, 5, 6, 7])}
    flat = contrastive_loss(txt, img, num_pos=4, **keys)
    one = hierarchical_contrastive_loss([txt], [img], [1.0], num_pos=4, **keys)
    assert torch.equal(one.loss, flat.loss) and torch.equal(one.n_correct_i2t, flat.n_correct_i2t)


def test_prefix_at_the_full_size_trains_exactly_as_today():
    flat, prefix = make_model(None), make_model({"mode": "prefix", "dims": [FULL]})
    batch = retrieval_batch(3, 1, 2, [1, 2, 1], seed=4)
    out_flat = train_itm.itm_loss(flat, batch, "itm")
    out_prefix = train_itm.itm_loss(prefix, batch, "itm")
    for key in ("loss", "acc_t2i", "acc_i2t"):
        assert torch.equal(out_flat[key], out_prefix[key]), key
    out_flat["loss"].backward()
    out_prefix["loss"].backward()
    grads = dict(prefix.named_parameters())
    assert all(
        (p.grad is None and grads[n].grad is None) or torch.equal(p.grad, grads[n].grad)
        for n, p in flat.named_parameters()
    )


@pytest.mark.parametrize("spec", [HEADS, PREFIX], ids=["heads", "prefix"])
def test_itm_and_cmr_losses_are_the_weighted_level_losses(spec):
    model = make_model(spec)
    batch = retrieval_batch(3, 1, 2, [1, 2, 1], seed=6)
    txt, img = batch["txt"], batch["img"]
    txt_levels = model.encode_text_levels(txt["input_ids"], txt["attention_mask"])
    img_levels = model.encode_image_levels(img["img_feat"], img["img_pos"], img["img_mask"])
    per_level = [
        contrastive_loss(t, i, num_pos=3, txt_img_keys=batch["txt_img_keys"], img_keys=batch["img_keys"]).loss
        for t, i in zip(txt_levels, img_levels)
    ]
    want = sum(w * loss.item() for w, loss in zip(spec["weights"], per_level))
    assert train_itm.itm_loss(model, batch, "itm")["loss"].item() == pytest.approx(want, abs=1e-6)
    cmr = pretrain_model(model)(batch, "itm")
    assert cmr["loss"].item() == pytest.approx(want, abs=1e-6)
    assert cmr["n_pos"].item() == 3


# ---------------------------------------------------------------- two ranks

# rank -> (positives, text hard negatives, image hard negatives, positive image keys)
SHARDS = {0: (3, 1, 2, [1, 2, 3]), 1: (2, 0, 1, [4, 1])}
SPECS = {"heads": HEADS, "prefix": PREFIX}


def _shard(rank: int) -> dict:
    n_pos, n_txt_neg, n_img_neg, keys = SHARDS[rank]
    return retrieval_batch(n_pos, n_txt_neg, n_img_neg, keys, seed=10 + rank)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, spec in SPECS.items():
            model = make_model(spec)
            out = train_itm.itm_loss(model, _shard(rank), "itm")
            out["loss"].backward()
            grads = {n: p.grad for n, p in model.named_parameters() if "level_proj" in n or "encode_proj" in n}
            torch.save({"loss": out["loss"].detach(), "grads": grads}, os.path.join(out_dir, f"{name}{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _concatenated(shards: list[dict]) -> dict:
    """One process's batch: every rank's positives, then every rank's negatives (gather order)."""
    def rows(side: str, key: str, get) -> torch.Tensor:
        pos = [get(s)[: s["num_pos"]] for s in shards]
        neg = [get(s)[s["num_pos"]:] for s in shards]
        return torch.cat(pos + neg)

    txt = {k: rows("txt", k, lambda s, k=k: s["txt"][k]) for k in shards[0]["txt"]}
    img = {k: rows("img", k, lambda s, k=k: s["img"][k]) for k in shards[0]["img"]}
    return {
        "txt": txt,
        "img": img,
        "num_pos": sum(s["num_pos"] for s in shards),
        "txt_img_keys": rows("txt", "k", lambda s: s["txt_img_keys"]),
        "img_keys": rows("img", "k", lambda s: s["img_keys"]),
    }


def test_two_gloo_ranks_give_the_first_step_loss_of_one_process(tmp_path):
    world = 2
    spawn_gloo(_worker, world, tmp_path)

    batch = _concatenated([_shard(r) for r in range(world)])
    for spec_name, spec in SPECS.items():
        model = make_model(spec)
        single = train_itm.itm_loss(model, batch, "itm")
        single["loss"].backward()
        # Key 1 is on both ranks: duplicate masking acts on the global batch, at every level.
        unmasked = hierarchical_contrastive_loss(
            *model(batch), spec["weights"], num_pos=batch["num_pos"], gather=False
        )
        assert unmasked.loss.item() != pytest.approx(single["loss"].item())

        got = [torch.load(tmp_path / f"{spec_name}{r}.pt", weights_only=True) for r in range(world)]
        for rank_out in got:
            torch.testing.assert_close(rank_out["loss"], single["loss"].detach(), atol=1e-6, rtol=0)
        # DDP averages the ranks' gradients; each rank's holds the sum over ranks of its rows' part.
        checked = 0
        for name, param in model.named_parameters():
            if "level_proj" in name or "encode_proj" in name:
                mean = sum(g["grads"][name] for g in got) / world
                torch.testing.assert_close(mean, param.grad, atol=1e-6, rtol=1e-5, msg=f"{spec_name} {name}")
                checked += 1
        # encode_proj: 3 layers with weights and biases per tower; heads: 2 linear heads per tower.
        assert checked == (12 + 8 if spec_name == "heads" else 12)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_records_the_hierarchy_and_rebuilds_the_model(tmp_path):
    model = make_model(HEADS, seed=3).eval()
    path = tmp_path / "bi.pt"
    save_checkpoint(model, path)
    assert read_checkpoint(path)["model_config"]["hierarchy"] == HEADS
    rebuilt = build_biencoder_from_checkpoint(path).eval()
    assert rebuilt.hierarchy == model.hierarchy and rebuilt.level_dims == [4, 8, FULL]
    batch = retrieval_batch(2, 0, 0, [1, 2], seed=7)
    with torch.no_grad():
        for a, b in zip(model(batch)[0] + model(batch)[1], rebuilt(batch)[0] + rebuilt(batch)[1]):
            assert torch.equal(a, b)
    # Loading into a model of the same hierarchy works (what train_itm does for the test split).
    load_biencoder_weights(make_model(HEADS, seed=9), path)


def test_old_checkpoints_without_the_field_load_as_flat(tmp_path):
    flat = make_model(None)
    ckpt = make_checkpoint(flat)
    assert ckpt["model_config"]["hierarchy"] is None
    del ckpt["model_config"]["hierarchy"]
    torch.save(ckpt, tmp_path / "old.pt")
    rebuilt = build_biencoder_from_checkpoint(tmp_path / "old.pt")
    assert rebuilt.hierarchy is None and rebuilt.level_dims == [FULL]


def test_flat_and_heads_checkpoints_do_not_mix(tmp_path):
    save_checkpoint(make_model(None), tmp_path / "flat.pt")
    save_checkpoint(make_model(HEADS), tmp_path / "heads.pt")
    with pytest.raises(CheckpointError, match=r"lacks: missing img_model\.level_proj\.0\.bias, .*txt_model\.level_proj\.1\.weight") as err:
        load_biencoder_weights(make_model(HEADS), tmp_path / "flat.pt")
    assert str(tmp_path / "flat.pt") in str(err.value)
    with pytest.raises(CheckpointError, match=r"unexpected img_model\.level_proj\.0\.bias, .*txt_model\.level_proj\.1\.weight"):
        load_biencoder_weights(make_model(None), tmp_path / "heads.pt")
    with pytest.raises(CheckpointError, match=r"unexpected .*txt_model\.level_proj\.0\.weight"):
        load_biencoder_weights(make_model(PREFIX), tmp_path / "heads.pt")
    # Prefix mode adds no weights: flat weights fine-tune as prefix, and the other way.
    prefix = make_model(PREFIX, seed=5)
    load_biencoder_weights(prefix, tmp_path / "flat.pt")
    flat_sd = make_model(None).state_dict()
    assert all(torch.equal(v, flat_sd[k]) for k, v in prefix.state_dict().items())
    # Pre-training checkpoints: the keys sit under `bert.`.
    save_checkpoint(pretrain_model(make_model(None)), tmp_path / "pre_flat.pt")
    with pytest.raises(CheckpointError, match=r"missing bert\.img_model\.level_proj\.0\.bias"):
        load_pretrain_weights(pretrain_model(make_model(HEADS)), tmp_path / "pre_flat.pt")
    save_checkpoint(pretrain_model(make_model(HEADS)), tmp_path / "pre_heads.pt")
    load_biencoder_weights(make_model(HEADS), tmp_path / "pre_heads.pt")


# ---------------------------------------------------------------- the training scripts


def test_train_itm_and_pretrain_record_the_hierarchy(tiny_data, tiny_models, tmp_path):
    cfg = itm_config(tiny_data, tiny_models, num_train_steps=2, valid_steps=2)
    cfg["model"]["hierarchy"] = {"mode": "heads", "dims": [4, 16]}
    out = tmp_path / "itm"
    train_itm.main(["--config", write_config(tmp_path / "itm.yaml", cfg), "--output_dir", str(out)])
    best = read_checkpoint(out / "ckpt" / "biencoder.best.pt")
    assert best["model_config"]["hierarchy"] == {"mode": "heads", "dims": [4, 16], "weights": [1.0, 1.0]}
    assert build_biencoder_from_checkpoint(out / "ckpt" / "biencoder.best.pt").level_dims == [4, 16]

    pcfg = pretrain_config(tiny_data, tiny_models, ["itm", "mlm"], [1, 1], num_train_steps=2, valid_steps=2)
    pcfg["model"]["hierarchy"] = {"mode": "prefix", "dims": [8, 16], "weights": [0.5, 1.0]}
    pout = tmp_path / "pre"
    pretrain.main(["--config", write_config(tmp_path / "pre.yaml", pcfg), "--output_dir", str(pout)])
    final = read_checkpoint(pout / "ckpt" / "model_final.pt")
    assert final["model_config"]["hierarchy"] == {"mode": "prefix", "dims": [8, 16], "weights": [0.5, 1.0]}
    # A heads fine-tuning run starts from this prefix pre-training checkpoint: the towers load,
    # the level heads are new, and the run records heads.
    cfg["model"]["biencoder_checkpoint"] = str(pout / "ckpt" / "model_final.pt")
    train_itm.main(["--config", write_config(tmp_path / "itm2.yaml", cfg), "--output_dir", str(tmp_path / "x")])
    tuned = read_checkpoint(tmp_path / "x" / "ckpt" / "biencoder.best.pt")
    assert tuned["model_config"]["hierarchy"]["mode"] == "heads"
    assert "img_model.level_proj.0.bias" in tuned["model"]


# ---------------------------------------------------------------- normalised levels with a temperature


def test_normalised_levels_with_a_fixed_temperature_by_hand():
    spec = {**PREFIX, "normalize": True, "temperature": 0.1}
    model = make_model(spec, seed=4).eval()
    flat = make_model(PREFIX, seed=4).eval()
    batch = retrieval_batch(3, 1, 0, [1, 2, 3], seed=6)
    with torch.no_grad():
        txt_levels, img_levels = model(batch)
        raw_txt, raw_img = flat(batch)
        for got, raw in zip(txt_levels + img_levels, raw_txt + raw_img):
            torch.testing.assert_close(got, raw / raw.norm(dim=1, keepdim=True), atol=1e-6, rtol=0)
        torch.testing.assert_close(model.encode_text(batch["txt"]["input_ids"], batch["txt"]["attention_mask"]),
                                   txt_levels[-1])
        out = train_itm.itm_loss(model, batch, "itm")
        want = hierarchical_contrastive_loss(txt_levels, img_levels, PREFIX["weights"], num_pos=3,
                                             txt_img_keys=batch["txt_img_keys"], img_keys=batch["img_keys"],
                                             temperature=0.1)
    torch.testing.assert_close(out["loss"], want.loss)
    # The logits of a level are its cosines / 0.1: the first level's loss by hand.
    scores = txt_levels[0] @ img_levels[0].t() / 0.1  # 4 captions (the last a negative) x 3 images
    by_hand = 0.5 * torch.nn.functional.cross_entropy(scores[:3], torch.arange(3)) + \
        0.5 * torch.nn.functional.cross_entropy(scores.t(), torch.arange(3))
    first = contrastive_loss(txt_levels[0], img_levels[0], num_pos=3, txt_img_keys=batch["txt_img_keys"],
                             img_keys=batch["img_keys"], temperature=0.1)
    torch.testing.assert_close(first.loss, by_hand, atol=1e-5, rtol=0)


def test_a_learned_temperature_trains_is_not_decayed_and_round_trips(tmp_path):
    from optim.optimizer import split_decay_groups

    spec = {**HEADS, "normalize": True, "temperature": 0.05, "learn_temperature": True}
    model = make_model(spec, seed=5)
    assert model.loss_temperature.item() == pytest.approx(0.05)
    train_itm.itm_loss(model, retrieval_batch(3, 0, 0, [1, 2, 3], seed=7), "itm")["loss"].backward()
    assert model.level_log_temperature.grad.abs().item() > 0
    decay, no_decay = split_decay_groups(model)
    assert any(p is model.level_log_temperature for p in no_decay)
    assert not any(p is model.level_log_temperature for p in decay)
    with torch.no_grad():
        model.level_log_temperature.fill_(math.log(0.2))
    save_checkpoint(model, tmp_path / "t.pt")
    rebuilt = build_biencoder_from_checkpoint(tmp_path / "t.pt")
    assert rebuilt.loss_temperature.item() == pytest.approx(0.2)
    assert rebuilt.config.hierarchy == model.config.hierarchy
    # Only the options that are set are stored: a hierarchy without them reads as before.
    assert read_checkpoint(tmp_path / "t.pt")["model_config"]["hierarchy"] == {**HEADS, 
        "weights": [0.5, 1.0, 2.0], "normalize": True, "temperature": 0.05, "learn_temperature": True}
    assert Hierarchy.from_dict(PREFIX).to_dict() == {**PREFIX, "weights": [0.25, 1.0, 1.5]}
    with pytest.raises(HierarchyError, match=r"model\.hierarchy\.temperature: expected a number > 0"):
        Hierarchy.from_dict({**PREFIX, "temperature": 0})


def test_a_heads_model_starts_from_a_flat_checkpoint_with_new_heads(tmp_path, caplog):
    """Fine-tuning HiVLP heads from LightningDOT's flat pre-training: the towers load, the level
    heads keep their initialisation; a trained heads model without its heads is still refused."""
    import logging

    from model.checkpoint import initialise_biencoder

    flat = make_model(None, seed=3)
    save_checkpoint(flat, tmp_path / "flat.pt")
    model = make_model(HEADS, seed=4)
    fresh_heads = {k: v.clone() for k, v in model.state_dict().items() if ".level_proj." in k}
    with caplog.at_level(logging.INFO):
        initialise_biencoder(model, biencoder_checkpoint=tmp_path / "flat.pt")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in flat.state_dict().items())
    assert fresh_heads and all(torch.equal(state[k], v) for k, v in fresh_heads.items())
    assert "lacks the hierarchy's own weights; they start from their initialisation: img_model.level_proj.0.bias" in caplog.text
    learned = make_model({**HEADS, "normalize": True, "temperature": 0.05, "learn_temperature": True}, seed=4)
    initialise_biencoder(learned, biencoder_checkpoint=tmp_path / "flat.pt")
    assert learned.loss_temperature.item() == pytest.approx(0.05)
    with pytest.raises(CheckpointError, match="missing .*level_proj"):
        load_biencoder_weights(make_model(HEADS), tmp_path / "flat.pt")
