"""`inference.py serve`: the app answers like `inference.py query`, refuses bad input with 4xx."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import inference
from data.scene_render import render_split
from data.txt_db import TxtDb
from utils.errors import MissingPathError
from utils.pipeline.query import Searcher, TextReranker
from utils.pipeline.serving import create_app


@pytest.fixture(scope="module")
def searcher(workspace, retrieval_dir):
    return Searcher(retrieval_dir, str(workspace.our_ckpt))


@pytest.fixture(scope="module")
def client(searcher, workspace, tmp_path_factory):
    scenes = tmp_path_factory.mktemp("scenes")
    render_split(workspace.data["root"], "test", scenes, size=32)
    reranker = TextReranker(searcher, str(workspace.our_cross_ckpt), alpha=0.25)
    return TestClient(create_app(searcher, reranker, render_dir=scenes, top_m=6))


def _caption(workspace, searcher, row: int) -> tuple[str, str]:
    db = TxtDb(workspace.data["txt_db"]["test"])
    txt_id = searcher.txt_ids[row]
    return txt_id, db.record(txt_id)["raw"]


def test_search_equals_query_command(workspace, retrieval_dir, searcher, client, capsys):
    _, caption = _caption(workspace, searcher, 3)
    expected = inference.main(["query", "--index_dir", str(retrieval_dir), "--checkpoint", str(workspace.our_ckpt),
                               "--top_k", "5", caption])["results"]
    capsys.readouterr()
    got = client.get("/api/search", params={"q": caption, "k": 5, "rerank": 0})
    assert got.status_code == 200
    body = got.json()
    assert body["reranked"] is None and body["k"] == 5
    assert [h["image"] for h in body["results"]] == [n for n, _ in expected]
    np.testing.assert_allclose([h["score"] for h in body["results"]], [s for _, s in expected], rtol=1e-5)
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    assert set(body["timing_ms"]) == {"encode_ms", "search_ms", "total_ms"}

    # The page linked with ?q= lists the same images, in order, in its bi-encoder column.
    page = client.get("/", params={"q": caption, "k": 5})
    assert page.status_code == 200
    column = page.text.split("id='biencoder'")[1].split("</ol>")[0]
    assert re.findall(r"data-image='([^']+)'", column) == [n for n, _ in expected]


def test_rerank_column_matches_pair_scorer(workspace, searcher, client):
    """The re-ranked list = bi-encoder top-M re-scored by the cross-encoder over the txt_db caption."""
    from data.img_db import ImgDb
    from utils.pipeline.reranking import CrossEncoderScorer, load_cross_encoder
    from utils.precision import resolve_precision

    txt_id, caption = _caption(workspace, searcher, 7)
    body = client.get("/api/search", params={"q": caption, "k": 4}).json()
    top_m = searcher.search_images(searcher.encode_text(caption), 6)
    model, _ = load_cross_encoder(workspace.our_cross_ckpt, None)
    split = searcher.info["split"]
    img_db = ImgDb(split["img_db"], conf_th=split["conf_th"], max_bb=split["max_bb"], min_bb=split["min_bb"],
                   num_bb=split["num_bb"])
    scorer = CrossEncoderScorer(model, TxtDb(split["txt_db"], split["max_txt_len"]), img_db, 4,
                                torch.device("cpu"), resolve_precision("fp32", torch.device("cpu")))
    cross = scorer([(txt_id, name) for name, _ in top_m])
    fused = [(name, 0.25 * bi + 0.75 * c, c) for (name, bi), c in zip(top_m, cross)]
    fused.sort(key=lambda r: -r[1])
    assert [h["image"] for h in body["reranked"]] == [n for n, _, _ in fused[:4]]
    np.testing.assert_allclose([h["score"] for h in body["reranked"]], [f for _, f, _ in fused[:4]], rtol=1e-4)
    np.testing.assert_allclose([h["cross"] for h in body["reranked"]], [c for _, _, c in fused[:4]],
                               rtol=1e-4, atol=1e-5)
    assert body["alpha"] == 0.25 and body["timing_ms"]["rerank_ms"] > 0
    page = client.get("/", params={"q": caption, "k": 4}).text
    assert "id='reranked'" in page and "re-rank" in page


def test_image_to_captions(workspace, retrieval_dir, searcher, client, capsys):
    name = searcher.img_ids[2]
    expected = inference.main(["query", "--index_dir", str(retrieval_dir), "--image", name, "--top_k", "3"])
    capsys.readouterr()
    body = client.get(f"/api/image/{name}", params={"k": 3}).json()
    assert [c["txt_id"] for c in body["captions"]] == [t for t, _ in expected["results"]]
    db = TxtDb(workspace.data["txt_db"]["test"])
    assert [c["text"] for c in body["captions"]] == [db.record(t)["raw"] for t, _ in expected["results"]]
    page = client.get("/", params={"image": name}).text
    assert body["captions"][0]["text"] in page and f"/image/{name}" in page


def test_pictures_rendered_or_placeholder(workspace, searcher, client, tmp_path):
    name = searcher.img_ids[0]
    got = client.get(f"/image/{name}")
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    rendered = tmp_path / "one"
    paths = render_split(workspace.data["root"], "test", rendered, size=32)
    assert got.content == (rendered / (name.removesuffix(".npz") + ".png")).read_bytes()
    assert len(paths) == len(searcher.img_ids)

    # No picture folder: a placeholder PNG, not an error.
    bare = TestClient(create_app(searcher, warm_up=False))
    placeholder = bare.get(f"/image/{name}")
    assert placeholder.status_code == 200 and placeholder.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert placeholder.content != got.content

    # --image_root wins: {root}/{name without .npz}.jpg.
    (tmp_path / "jpg").mkdir()
    (tmp_path / "jpg" / (name.removesuffix(".npz") + ".jpg")).write_bytes(b"\xff\xd8\xff fake jpeg")
    real = TestClient(create_app(searcher, image_root=tmp_path / "jpg", warm_up=False)).get(f"/image/{name}")
    assert real.headers["content-type"] == "image/jpeg" and real.content.endswith(b"fake jpeg")


@pytest.mark.parametrize("path, params, status, message", [
    ("/api/search", {"q": ""}, 400, "empty query"),
    ("/api/search", {"q": "   "}, 400, "empty query"),
    ("/api/search", {}, 400, "empty query"),
    ("/api/search", {"q": "a dog", "k": 0}, 422, "k must lie in [1, 12]"),
    ("/api/search", {"q": "a dog", "k": 13}, 422, "k must lie in [1, 12]"),
    ("/api/search", {"q": "a dog", "k": "many"}, 422, "k must be an integer"),
    ("/api/search", {"q": "x" * 1001}, 400, "query too long"),
    ("/api/image/not_an_image.npz", {}, 404, "unknown image id 'not_an_image.npz'"),
    ("/api/image/../../etc/passwd", {}, 404, ""),
    ("/image/not_an_image.npz", {}, 404, "unknown image id"),
])
def test_bad_input_is_4xx_with_message(client, path, params, status, message):
    got = client.get(path, params=params)
    assert got.status_code == status
    if message:
        assert message in got.json()["error"]


def test_bad_input_on_the_page(client):
    got = client.get("/", params={"q": ""})
    assert got.status_code == 400 and "empty query" in got.text
    got = client.get("/", params={"q": "a dog", "k": "0"})
    assert got.status_code == 422 and "k must lie in" in got.text
    got = client.get("/", params={"image": "nope"})
    assert got.status_code == 404 and "unknown image id" in got.text
    assert client.get("/").status_code == 200


def test_serve_command_errors(workspace, retrieval_dir, tmp_path):
    with pytest.raises(MissingPathError, match="--render_dir"):
        inference.main(["serve", "--index_dir", str(retrieval_dir), "--checkpoint", str(workspace.our_ckpt),
                        "--render_dir", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        inference.main(["serve", "--index_dir", str(retrieval_dir)])  # --checkpoint is required
