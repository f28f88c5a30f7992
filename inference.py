"""Encode an evaluation split, build indexes, search both directions, report recall.

    python inference.py --config CONFIG --checkpoint CKPT --output_dir OUT [key=value ...]
    python inference.py query --index_dir OUT --checkpoint CKPT "two dogs running on a beach"
    python inference.py query --index_dir OUT --image NAME
    python inference.py serve --index_dir OUT --checkpoint CKPT [--reranker_checkpoint CE] \
        [--image_root DIR | --render_dir DIR] [--host 127.0.0.1 --port 8000]

CONFIG is one of our YAML configs or an original LightningDOT eval / fine-tuning JSON. The
split is `data.test_txt_db` / `data.test_img_db`, or the `val_*` pair with
`retrieval.eval_split=val`. CKPT is one of our checkpoints (the model is rebuilt from it
alone) or an original one (`biencoder.*.pt` with `model_dict`, or a pre-training
`model_step_N.pt` with `bert.` keys), in which case the towers come from the config's
`txt_model_config`, `img_model_config` and `project_dim`.

Written to OUT, each file atomically, `info.json` last (its presence marks a complete run):

* `img_emb.npy` (num_images, D) float32, images in the key order of the split's
  `img2txts.json`; `txt_emb.npy` (num_captions, D) float32, captions in `id2len.json` order
  after the `max_txt_len` filter;
* `ids.json`: `{"img_ids": [...], "txt_ids": [...]}`, the row order of both arrays;
* `img.index`, `txt.index`: faiss indexes (`retrieval.index`: type and parameters) of the image and caption
  embeddings; ids are row numbers of the arrays above;
* `topk.json`: `{"text_to_image": {caption id: [[image name, score], ...]},
  "image_to_text": {image name: [[caption id, score], ...]}}`, keyed by the QUERY, at most
  `retrieval.top_k` candidates per query, best first, never padded;
* `recall.json`: SPEC 7 recall (`utils/search/metrics.py` layout) of the exact dot-product ranking
  over the whole split, or the COCO 1K 5-fold average when `retrieval.coco_1k`;
* `info.json`: the split (paths, counts, reading parameters), the checkpoint, the bi-encoder
  config, the protocol, extra recalls (`recall_full_split` under COCO 1K, `recall_index` for
  an approximate index: recall of its top-k lists) and `timing` in seconds.

A model with an embedding hierarchy (`model.hierarchy`, levels `dims`) also writes, for every
level d but the full one, `img_emb.dD.npy` / `txt_emb.dD.npy` and `img.dD.index` /
`txt.dD.index` (e.g. `img_emb.d64.npy`), and `recall.json` gains `levels`: the exact recall
of each level alone (`{"64": {..., "seconds": s}, ...}`). With `retrieval.cascade` set
(`[{dim, keep}, ...]`, `utils/search/cascade.py`) the search is coarse-to-fine: the first
level's index over the whole corpus keeps `keep` candidates per query, each next level
re-scores the kept ones exactly; `topk.json` holds the last stage's lists (rerank.py then
re-ranks them as a further stage), `recall.json` gains `cascade` (per stage: dim, keep,
recall of its lists, seconds) next to the unchanged exact full-embedding recall, and
`info.json` gains `level_dims`, `cascade` and per-stage `timing` (`cascade_stageI_dD_s`).

Images and captions are encoded in batches sorted by length (longest first, so an
out-of-memory error shows at once), without gradient, under autocast on a GPU; every batch
carries its canonical positions, and the embeddings go through shards that are merged in
canonical order, so neither the order nor the corpus size depends on memory. Under torchrun
every rank encodes a share and rank 0 merges, searches and writes. Flat and IVF-PQ indexes are
built straight from the ranks' shards (IVF-PQ trained on a sample drawn across them), one
shard in memory at a time (`utils.search.indexes.index_shards`); HNSW from the merged array.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from utils.config import add_config_args
from utils.errors import MissingPathError, UsageError, run_cli
from utils.original_programs import LIGHTNINGDOT_EVAL_ITM
from utils.pipeline.inference_run import run_inference
from utils.pipeline.query import Searcher, TextReranker, search_index
from utils.pipeline.retrieval_dir import PRECISIONS
from utils.pipeline.run_config import run_config_from_args

# ---------------------------------------------------------------- main run


def build_parser() -> argparse.ArgumentParser:
    """Command line of the encode / index / evaluate run."""
    parser = argparse.ArgumentParser(
        description="Encode a split, build indexes, search and evaluate (see module docstring).",
        epilog="Search a built index: inference.py query --help; serve it: inference.py serve --help",
    )
    add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, help="our checkpoint or an original one")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="auto: autocast (bf16/fp16) on a GPU, fp32 on a CPU",
    )
    parser.add_argument("--batch_size", type=int, default=None,
                        help="encoding batch (default retrieval.inf_minibatch_size or train.val_batch_size)")
    parser.add_argument("--shard_size", type=int, default=65536, help="embeddings per shard file")
    return parser


# ---------------------------------------------------------------- query mode


def build_query_parser() -> argparse.ArgumentParser:
    """Command line of `inference.py query`."""
    parser = argparse.ArgumentParser(
        prog="inference.py query",
        description="Search a built index: a caption for images, or (--image) an image for captions.",
    )
    parser.add_argument("--index_dir", required=True, help="output directory of an inference run")
    parser.add_argument("--checkpoint", default=None, help="bi-encoder checkpoint (text queries)")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer directory (text queries)")
    parser.add_argument("--image", default=None, help="image name: list its best captions")
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("text", nargs="?", default=None, help="the caption to search images for")
    return parser


def query(argv: Sequence[str]) -> dict[str, Any]:
    """The `query` sub-command; prints the hits and returns `{"query", "results"}`."""
    args = build_query_parser().parse_args(list(argv))
    if (args.image is None) == (args.text is None):
        raise UsageError("give either a caption to search for, or --image NAME (not both)")
    hits = search_index(args.index_dir, text=args.text, image=args.image, top_k=args.top_k,
                        checkpoint=args.checkpoint, tokenizer=args.tokenizer)
    print(f"top {len(hits.results)} for {hits.label}:")
    for rank, (name, score) in enumerate(hits.results, 1):
        text = f"  {hits.texts[name]}" if name in hits.texts else ""
        print(f"{rank:3d}. {score:9.4f}  {name}{text}")
    return {"query": args.image if args.image is not None else args.text, "results": hits.results}


# ---------------------------------------------------------------- serve mode


def build_serve_parser() -> argparse.ArgumentParser:
    """Command line of `inference.py serve`."""
    parser = argparse.ArgumentParser(
        prog="inference.py serve",
        description="Serve a built index: a search page and a JSON API (see utils/pipeline/serving.py).",
    )
    parser.add_argument("--index_dir", required=True, help="output directory of an inference run")
    parser.add_argument("--checkpoint", required=True, help="bi-encoder checkpoint that built the index")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: info.json's)")
    parser.add_argument("--reranker_checkpoint", default=None, help="cross-encoder: adds a re-ranked list")
    parser.add_argument("--reranker_config", default=None, help="UNITER JSON config of an original cross-encoder")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the bi-encoder score when fusing")
    parser.add_argument("--top_m", type=int, default=20, help="bi-encoder candidates the re-ranker scores")
    parser.add_argument("--image_root", default=None, help="folder of the pictures, {name without .npz}.jpg")
    parser.add_argument("--render_dir", default=None, help="folder of rendered synthetic scenes, {stem}.png")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser


def serve(argv: Sequence[str]) -> dict[str, Any]:
    """The `serve` sub-command: load once, then answer until interrupted."""
    args = build_serve_parser().parse_args(list(argv))
    for key in ("image_root", "render_dir"):
        if getattr(args, key) is not None and not Path(getattr(args, key)).is_dir():
            raise MissingPathError(f"--{key} {getattr(args, key)} is not a directory")
    if args.top_m < 1:
        raise UsageError(f"--top_m must be at least 1, got {args.top_m}")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    # Imported here: the web framework loads only for this sub-command.
    from utils.pipeline import serving

    searcher = Searcher(args.index_dir, args.checkpoint, args.tokenizer)
    reranker = None
    if args.reranker_checkpoint is not None:
        reranker = TextReranker(searcher, args.reranker_checkpoint, args.reranker_config, args.alpha)
    app = serving.create_app(searcher, reranker, args.image_root, args.render_dir, top_m=args.top_m)
    print(f"serving {args.index_dir} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    serving.serve(app, args.host, args.port)
    return {"index_dir": args.index_dir, "host": args.host, "port": args.port}


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run inference (or `query ...`); returns the info dict with `recall`, or the hits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "query":
        return query(argv[1:])
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    out_dir = args.output_dir
    config = run_config_from_args(args, LIGHTNINGDOT_EVAL_ITM)
    if out_dir is None:
        out_dir = config.output_dir
    return run_inference(config, args.checkpoint, out_dir, args.precision, args.batch_size, args.shard_size)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_cli(main))
