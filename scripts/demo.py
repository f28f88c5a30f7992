"""The whole pipeline on generated data: what `make demo` runs.

    python scripts/demo.py [--run_dir runs/demo] [--preset demo|tiny] [--fresh]

Stages (each skipped when its output is already there, unless --fresh):

1. generate the structured synthetic dataset (train / val / test) in the real formats, and
   render the test split's scenes as PNGs (for the search page);
2. pre-train a tiny bi-encoder with CMR + VMLM + SMRM (`pretrain.py`);
3. evaluate it zero-shot on the test split (`inference.py`);
4. fine-tune it (`train_itm.py`) and evaluate the best checkpoint (`inference.py`);
5. fine-tune it again with the HiVLP prefix hierarchy and evaluate it twice: flat search of
   the full embedding, and the coarse-to-fine cascade over its prefixes (`retrieval.cascade`);
6. train a tiny UNITER-style cross-encoder (`rerank.py train`) and re-rank the fine-tuned
   bi-encoder's top-M (`rerank.py`), the fusion weight chosen on the val split;
7. decompose that cross-encoder into a VLDeformer bi-encoder and fine-tune it with bi-modal
   hard negatives (`train_itm.py`, `model.type: vldeformer`), then evaluate it;
8. print one table (every row, with chance level and timings) and the wall time of each
   stage, write both to `summary.json`, write the plots (training curves, recall@K) to
   `plots/`, run two example text queries and print the command that serves the index.

Every stage calls the entry point's `main(argv)` in this process, exactly as the command line
would.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data.synthetic import OBJECT_VOCAB
from utils.errors import run_cli
from utils.files import atomic_write_json
from utils.run_files import (
    BIENCODER_BEST,
    CKPT_DIR,
    CROSS_ENCODER_BEST,
    INFO_FILE,
    PRETRAIN_FINAL,
    RECALL_FILE,
    RERANK_FILE,
    SCORES_FILE,
    SUMMARY_FILE,
    TEST_RESULTS_FILE,
)

logger = logging.getLogger("demo")

DEMO_CONFIGS = REPO / "configs" / "demo"
SCENES_DIR = "scenes"
RECALL_KS = (1, 5, 10)


@dataclass(frozen=True)
class Preset:
    """Data sizes and step counts of one demo scale."""

    num_train: int
    num_val: int
    num_test: int
    pretrain_steps: int
    finetune_epochs: int
    rerank_steps: int
    vldeformer_steps: int
    top_m: int
    overrides: tuple[str, ...] = field(default_factory=tuple)


PRESETS = {
    # `make demo`: a few thousand images, 500 x 5 in test; under 10 minutes on 2 cores.
    "demo": Preset(num_train=3000, num_val=200, num_test=500, pretrain_steps=800,
                   finetune_epochs=3, rerank_steps=600, vldeformer_steps=600, top_m=20),
    # The reduced pipeline `make test` runs (tests/test_demo_pipeline.py).
    "tiny": Preset(num_train=600, num_val=50, num_test=100, pretrain_steps=200,
                   finetune_epochs=4, rerank_steps=300, vldeformer_steps=200, top_m=10,
                   overrides=("valid_steps=100",)),
}


def _chance_recall(num_images: int, captions_per_image: int) -> dict[str, Any]:
    """Expected recall of random scores, in percent.

    Image retrieval: the one right image among N lands in the top k with probability k / N.
    Text retrieval: at least one of the image's c captions among the top k of the c * N
    captions: 1 - C(cN - c, k) / C(cN, k).
    """
    num_captions = num_images * captions_per_image
    t2i = {f"R@{k}": 100.0 * min(1.0, k / num_images) for k in RECALL_KS}
    i2t = {}
    for k in RECALL_KS:
        miss = math.comb(num_captions - captions_per_image, k) / math.comb(num_captions, k)
        i2t[f"R@{k}"] = 100.0 * (1.0 - miss)
    rsum = sum(t2i.values()) + sum(i2t.values())
    return {"text_to_image": t2i, "image_to_text": i2t, "rsum": rsum}


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data, indent=2)


class Demo:
    """Runs the stages in order, reusing finished ones."""

    def __init__(self, run_dir: Path, preset: Preset, fresh: bool) -> None:
        self.run_dir = run_dir
        self.preset = preset
        self.fresh = fresh
        self.data_dir = run_dir / "data"
        # Wall seconds of each stage that ran in this invocation (reused ones keep the
        # figure of the run that made them, read back from summary.json).
        self.stage_s: dict[str, float] = {}
        self.reused: list[str] = []
        # Steps that ran (not reused) so far.
        self.ran = 0

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the wall time of one stage under `name`.

        A stage whose every step was reused keeps the time of the run that made it.
        """
        ran_before = self.ran
        t0 = time.perf_counter()
        yield
        elapsed = time.perf_counter() - t0
        if self.ran == ran_before:
            previous = _read_json(self.run_dir / SUMMARY_FILE) if (self.run_dir / SUMMARY_FILE).is_file() else {}
            elapsed = previous.get("stage_s", {}).get(name, elapsed)
        self.stage_s[name] = elapsed

    def stage_seconds(self) -> dict[str, float]:
        """Wall seconds per stage, in the order they ran."""
        return dict(self.stage_s)

    # ------------------------------------------------------------------ helpers
    def _stage(self, name: str, done_marker: Path) -> bool:
        """True when the stage must run; prints what is reused."""
        if done_marker.exists() and not self.fresh:
            print(f"[demo] {name}: reusing {done_marker.relative_to(self.run_dir)}")
            self.reused.append(name)
            return False
        print(f"[demo] {name} ...", flush=True)
        self.ran += 1
        return True

    def _data_overrides(self) -> list[str]:
        """Point the demo configs (written for runs/demo/data) at this run's data."""
        d = self.data_dir
        return [
            f"data.train_txt_dbs=[{d / 'txt_db/train'}]",
            f"data.train_img_dbs=[{d / 'img_db'}]",
            f"data.val_txt_db={d / 'txt_db/val'}",
            f"data.val_img_db={d / 'img_db'}",
            f"data.test_txt_db={d / 'txt_db/test'}",
            f"data.test_img_db={d / 'img_db'}",
            f"model.tokenizer={d / 'tokenizer'}",
        ]

    def _pretrain_overrides(self) -> list[str]:
        d = self.data_dir
        datasets = (
            f"data.train_datasets=[{{name: synthetic, db: [{d / 'txt_db/train'}], img: [{d / 'img_db'}], "
            "tasks: [itm, mlm, mrfr, mrckl], mix_ratio: [4, 2, 1, 1]}]"
        )
        val = (
            f"data.val_datasets=[{{name: synthetic, db: [{d / 'txt_db/val'}], img: [{d / 'img_db'}], "
            "tasks: [itm, mlm, mrfr, mrckl]}]"
        )
        return [datasets, val, f"model.tokenizer={d / 'tokenizer'}"]

    # ------------------------------------------------------------------ stages
    def generate_data(self) -> dict[str, Any]:
        from data.synthetic import SyntheticConfig, generate

        cfg = SyntheticConfig(
            num_train=self.preset.num_train, num_val=self.preset.num_val, num_test=self.preset.num_test
        )
        if self.fresh and self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        print("[demo] synthetic data (reused when its arguments match) ...", flush=True)
        return generate(str(self.data_dir), cfg, progress=True)

    def render_scenes(self) -> Path:
        """Pictures of the test split's scenes, for the search page."""
        from data.scene_render import render_split

        out = self.run_dir / SCENES_DIR
        if self._stage("test-split scenes (PNG)", out / ".done"):
            render_split(self.data_dir, "test", out)
            (out / ".done").touch()
        return out

    def plots(self) -> list[Path]:
        """Training curves of every run and recall@K curves of every evaluated row."""
        from scripts.plots import write_plots

        return write_plots([self.run_dir])

    def pretrain(self) -> Path:
        import pretrain

        out = self.run_dir / "pretrain"
        ckpt = out / CKPT_DIR / PRETRAIN_FINAL
        if self._stage("pre-training (CMR + VMLM + SMRM)", ckpt):
            pretrain.main([
                "--config", str(DEMO_CONFIGS / "pretrain.yaml"), "--output_dir", str(out), "--overwrite",
                f"num_train_steps={self.preset.pretrain_steps}",
                *self._pretrain_overrides(), *self.preset.overrides,
            ])
        return ckpt

    def evaluate(self, name: str, checkpoint: Path, split: str = "test", config: str = "finetune.yaml") -> dict[str, Any]:
        import inference

        out = self.run_dir / name
        if self._stage(f"evaluation '{name}'", out / INFO_FILE):
            inference.main([
                "--config", str(DEMO_CONFIGS / config), "--checkpoint", str(checkpoint),
                "--output_dir", str(out), f"retrieval.eval_split={split}", *self._data_overrides(),
            ])
        return {"recall": _read_json(out / RECALL_FILE), "info": _read_json(out / INFO_FILE)}

    def finetune(self, name: str, config: str, init: Sequence[str], what: str = "fine-tuning",
                 length: str | None = None) -> Path:
        """`train_itm.py` with a demo config from the initial weights `init` names.

        `length` is the run-length override (default: the preset's fine-tuning epochs).
        """
        import train_itm

        out = self.run_dir / name
        best = out / CKPT_DIR / BIENCODER_BEST
        if self._stage(what, out / TEST_RESULTS_FILE):
            train_itm.main([
                "--config", str(DEMO_CONFIGS / config), "--output_dir", str(out), "--overwrite", *init,
                length or f"num_train_epochs={self.preset.finetune_epochs}",
                *self._data_overrides(), *self.preset.overrides,
            ])
        return best

    def train_reranker(self, pretrained: Path, biencoder: Path) -> Path:
        import rerank

        out = self.run_dir / "reranker"
        best = out / CKPT_DIR / CROSS_ENCODER_BEST
        if self._stage("cross-encoder training", best):
            rerank.main([
                "train", "--config", str(DEMO_CONFIGS / "rerank.yaml"), "--output_dir", str(out), "--overwrite",
                # UNITER-style init from the pre-trained image tower (the paper re-ranks with
                # a pre-trained UNITER); hard negatives mined with the fine-tuned bi-encoder.
                f"cross_encoder.checkpoint={pretrained}",
                f"model.biencoder_checkpoint={biencoder}",
                f"num_train_steps={self.preset.rerank_steps}",
                *self._data_overrides(), *self.preset.overrides,
            ])
        return best

    def rerank(self, name: str, retrieval_dir: Path, reranker: Path, alpha: float, split: str = "test") -> dict[str, Any]:
        import rerank

        out = self.run_dir / name
        if self._stage(f"re-ranking '{name}'", out / RERANK_FILE):
            out.mkdir(parents=True, exist_ok=True)
            rerank.main([
                "--config", str(DEMO_CONFIGS / "rerank.yaml"), "--retrieval_dir", str(retrieval_dir),
                "--reranker_checkpoint", str(reranker), "--top_m", str(self.preset.top_m),
                "--alpha", str(alpha), "--output_dir", str(out), f"retrieval.eval_split={split}",
                *self._data_overrides(),
            ])
        return _read_json(out / RERANK_FILE)

    def examples(self, index_dir: Path, checkpoint: Path, reranked_dir: Path) -> list[dict[str, Any]]:
        """Two test captions as typed queries: bi-encoder top 3, then the re-ranked top 3."""
        import inference
        from data.synthetic import COLOURS
        from data.txt_db import TxtDb

        objects = _read_json(self.data_dir / "objects.json")
        fused = _read_json(reranked_dir / SCORES_FILE)["text_to_image"]
        test_db = TxtDb(str(self.data_dir / "txt_db" / "test"))
        # Captions that bind colours to two objects show what the models must get right.
        chosen: list[str] = []
        for txt_id in test_db.ids:
            words = test_db.record(txt_id)["raw"].split()
            if sum(w in COLOURS for w in words) >= 2 and test_db.txt2img[txt_id] not in {test_db.txt2img[c] for c in chosen}:
                chosen.append(txt_id)
            if len(chosen) == 2:
                break
        shown = []
        for txt_id in chosen:
            text, truth = test_db.record(txt_id)["raw"], test_db.txt2img[txt_id]
            print(f"\nquery: {text!r}  (its image {truth}: {_describe(objects.get(truth, []))})")
            # The query CLI prints bare names; the demo prints them with their objects instead.
            with contextlib.redirect_stdout(io.StringIO()):
                hits = inference.main([
                    "query", "--index_dir", str(index_dir), "--checkpoint", str(checkpoint),
                    "--tokenizer", str(self.data_dir / "tokenizer"), "--top_k", "3", text,
                ])
            print("  bi-encoder top 3:")
            for rank, (name, _) in enumerate(hits["results"], 1):
                print(f"    {rank}. {'*' if name == truth else ' '} {name}: {_describe(objects.get(name, []))}")
            print("  after re-ranking:")
            for rank, row in enumerate(fused.get(txt_id, [])[:3], 1):
                print(f"    {rank}. {'*' if row[0] == truth else ' '} {row[0]}: {_describe(objects.get(row[0], []))}")
            shown.append({"caption": text, "image": truth, "biencoder": hits["results"],
                          "reranked": fused.get(txt_id, [])[:3]})
        print("  (* marks the image the caption was written for)")
        return shown


def _describe(objs: list[Any]) -> str:
    """Human-readable objects of a synthetic image."""
    parts = []
    for obj in objs:
        if isinstance(obj, dict):
            words = [str(obj[key]) for key in ("size", "colour", "object") if obj.get(key)]
            parts.append(" ".join(words) if words else json.dumps(obj))
        else:
            parts.append(str(obj))
    return ", ".join(parts) if parts else "(no objects recorded)"


def choose_alpha(sweep: dict[str, dict[str, Any]]) -> float:
    """The fusion weight with the best R@1 (both directions summed; RSUM breaks ties).

    alpha 1.0 (the bi-encoder alone) is left out: the point is the re-ranker's contribution.
    """
    def key(item: tuple[str, dict[str, Any]]) -> tuple[float, float]:
        recall = item[1]
        return (recall["text_to_image"]["R@1"] + recall["image_to_text"]["R@1"], recall["rsum"])

    candidates = [(a, r) for a, r in sweep.items() if float(a) < 1.0]
    return float(max(candidates, key=key)[0])


def _row(recall: dict[str, Any]) -> dict[str, Any]:
    return {
        "text_to_image": {f"R@{k}": recall["text_to_image"][f"R@{k}"] for k in RECALL_KS},
        "image_to_text": {f"R@{k}": recall["image_to_text"][f"R@{k}"] for k in RECALL_KS},
        "rsum": recall["rsum"],
    }


def format_table(rows: dict[str, dict[str, Any]], chance: dict[str, Any], timings: dict[str, dict[str, float]]) -> str:
    """The demo's one table as markdown."""
    head = ("| setting | TR R@1 | TR R@5 | TR R@10 | IR R@1 | IR R@5 | IR R@10 | RSUM "
            "| encode s | search s | re-rank s |")
    lines = [head, "|" + "---|" * 11]
    for name, row in [("chance", chance), *rows.items()]:
        tr, ir = row["image_to_text"], row["text_to_image"]
        t = timings.get(name, {})
        cells = [name, *(f"{tr[f'R@{k}']:.2f}" for k in RECALL_KS), *(f"{ir[f'R@{k}']:.2f}" for k in RECALL_KS),
                 f"{row['rsum']:.2f}"]
        cells += [f"{t[key]:.2f}" if key in t else "" for key in ("encode", "search", "rerank")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(run_dir: Path, preset: Preset, fresh: bool, examples: bool = True) -> dict[str, Any]:
    """All stages; returns the summary written to `run_dir/summary.json`."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    demo = Demo(run_dir, preset, fresh)
    with demo.timed("data"):
        manifest = demo.generate_data()
        scenes = demo.render_scenes()
    with demo.timed("pretrain"):
        pretrained = demo.pretrain()
    with demo.timed("eval_zero_shot"):
        zero_shot = demo.evaluate("eval_zero_shot", pretrained)
    with demo.timed("finetune"):
        finetuned_ckpt = demo.finetune("finetune", "finetune.yaml", [f"model.biencoder_checkpoint={pretrained}"])
    with demo.timed("eval_finetuned"):
        finetuned = demo.evaluate("eval_finetuned", finetuned_ckpt)
        # The weight of the bi-encoder score in the fused ranking is chosen on the val split.
        demo.evaluate("eval_finetuned_val", finetuned_ckpt, split="val")
    with demo.timed("finetune_hivlp"):
        hivlp_ckpt = demo.finetune("finetune_hivlp", "finetune_hivlp.yaml", [f"model.biencoder_checkpoint={pretrained}"],
                                   "fine-tuning with the HiVLP hierarchy")
    with demo.timed("eval_hivlp"):
        # The same embeddings searched flat at full dimension, then by the cascade over prefixes.
        hivlp = demo.evaluate("eval_hivlp", hivlp_ckpt)
        hivlp_cascade = demo.evaluate("eval_hivlp_cascade", hivlp_ckpt, config="finetune_hivlp.yaml")
    with demo.timed("train_reranker"):
        reranker = demo.train_reranker(pretrained, finetuned_ckpt)
    with demo.timed("rerank"):
        tuning = demo.rerank("reranked_val", run_dir / "eval_finetuned_val", reranker, 0.0, split="val")
        alpha = choose_alpha(tuning["alpha_sweep"])
        print(f"[demo] fused re-ranking weight chosen on val: alpha = {alpha:.1f}")
        reranked = demo.rerank(f"reranked_alpha{alpha:.1f}", run_dir / "eval_finetuned", reranker, alpha)

    with demo.timed("vldeformer"):
        vldeformer_ckpt = demo.finetune(
            "vldeformer", "vldeformer.yaml",
            [f"model.uniter_checkpoint={reranker}", f"data.bimodal_negatives.vocab={demo.data_dir / OBJECT_VOCAB}"],
            "VLDeformer: decompose the cross-encoder, fine-tune with bi-modal negatives",
            length=f"num_train_steps={preset.vldeformer_steps}",
        )
        vldeformer = demo.evaluate("eval_vldeformer", vldeformer_ckpt, config="vldeformer.yaml")

    test_counts = manifest["counts"]["test"]
    captions_per_image = test_counts["captions"] // test_counts["images"]
    chance = _chance_recall(test_counts["images"], captions_per_image)
    rows = {
        "zero_shot": _row(zero_shot["recall"]),
        "finetuned": _row(finetuned["recall"]),
        "reranked": _row(reranked["after"]),
        "hivlp": _row(hivlp["recall"]),
        # The cascade's recall is that of its last stage's lists (top_k per query).
        "hivlp_cascade": _row(hivlp_cascade["recall"]["cascade"]["stages"][-1]["recall"]),
        "vldeformer": _row(vldeformer["recall"]),
    }
    timings = {}
    for name, result in (("zero_shot", zero_shot), ("finetuned", finetuned), ("hivlp", hivlp),
                         ("hivlp_cascade", hivlp_cascade), ("vldeformer", vldeformer)):
        timing = result["info"]["timing"]
        timings[name] = {"encode": timing["encode_s"], "search": timing["search_s"]}
    timings["reranked"] = {**timings["finetuned"], "rerank": reranked["timing"]["rerank_s"]}
    summary = {
        "rows": rows,
        "chance": chance,
        "timing_s": timings,
        "stage_s": demo.stage_seconds(),
        "test_split": {"images": test_counts["images"], "captions": test_counts["captions"]},
        "top_m": reranked.get("top_m"),
        "alpha": alpha,
        "reranked_before": _row(reranked["before"]),
    }
    summary["total_s"] = sum(summary["stage_s"].values())
    _write_json(run_dir / SUMMARY_FILE, summary)
    print()
    print(f"Recall (%) on the synthetic test split: {test_counts['images']} images x "
          f"{captions_per_image} captions; re-ranking the top {reranked.get('top_m')} "
          f"with alpha {alpha:.1f} x bi-encoder + {1 - alpha:.1f} x cross-encoder")
    print(format_table(rows, chance, timings))
    print()
    print(format_stage_times(summary["stage_s"], demo.reused))
    print("\n[demo] plots:")
    for path in demo.plots():
        print(f"  {path}")
    if examples:
        demo.examples(run_dir / "eval_finetuned", finetuned_ckpt, run_dir / f"reranked_alpha{alpha:.1f}")
    print(f"\n[demo] done in {time.perf_counter() - started:.0f} s; everything is in {run_dir}")
    print(f"[demo] summary: {run_dir / 'summary.json'}")
    print("[demo] search it in a browser (then open http://127.0.0.1:8000/?q=a+red+dog):")
    print("  " + serve_command(run_dir, finetuned_ckpt, reranker, alpha, scenes))
    return summary


def serve_command(run_dir: Path, checkpoint: Path, reranker: Path, alpha: float, scenes: Path) -> str:
    """The one command that serves the demo's test index with its re-ranker."""
    def rel(path: Path) -> str:
        # Relative to the repository when inside it: the command is run from there.
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)

    return (f".venv/bin/python inference.py serve --index_dir {rel(run_dir / 'eval_finetuned')} "
            f"--checkpoint {rel(checkpoint)} --reranker_checkpoint {rel(reranker)} --alpha {alpha:.1f} "
            f"--render_dir {rel(scenes)}")


def format_stage_times(stage_s: dict[str, float], reused: list[str]) -> str:
    """One line per stage with its wall time; reused stages say so."""
    lines = ["Wall time per stage (s):"]
    for name, seconds in stage_s.items():
        lines.append(f"  {name:<16} {seconds:8.1f}")
    lines.append(f"  {'total':<16} {sum(stage_s.values()):8.1f}")
    if reused:
        lines.append("  (stages reused from an earlier run show that run's time)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", default=str(REPO / "runs" / "demo"), help="where everything is written")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--fresh", action="store_true", help="rebuild every stage")
    parser.add_argument("--no-examples", dest="examples", action="store_false", help="skip the example queries")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Relative paths in the demo configs (model JSONs) resolve from the repository root.
    os.chdir(REPO)
    return run(Path(args.run_dir).resolve(), PRESETS[args.preset], args.fresh, args.examples)


if __name__ == "__main__":
    sys.exit(run_cli(main))
