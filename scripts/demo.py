"""The whole pipeline on generated data, and the three papers' claims measured on it: `make demo`.

    python scripts/demo.py [--run_dir runs/demo] [--preset demo|tiny] [--seed 42] [--fresh]
    python scripts/demo.py --seeds 42,43,44 [--run_dir runs/demo_seeds]   # the three-seed table

Stages (each skipped when its output is already there, unless --fresh), run by two worker
processes of one thread each, every stage as soon as what it needs is built:

1. generate the structured synthetic dataset (train / val / test) in the real formats, and
   render the test split's scenes as PNGs (for the search page);
2. LightningDOT: pre-train a tiny bi-encoder with CMR + VMLM + SMRM (`pretrain.py`), fine-tune
   it (`train_itm.py`);
3. HiVLP: fine-tune it again with the embedding hierarchy, searched flat and coarse to fine;
4. the cross-encoder, trained as UNITER's was (`rerank.py train`): pre-training on
   image-caption pairs (ITM with random negatives), then ITM ranking fine-tuning on hard
   negatives it mines itself;
5. VLDeformer: decompose that cross-encoder into one text / image encoder and fine-tune it with
   and without bi-modal negatives (`train_itm.py`, `model.type: vldeformer`);
6. evaluate every system on one fixed split, the first `eval_images` images of the test split
   and their captions (`retrieval.eval_images`): the cross-encoder ranking all pairs, every
   bi-encoder, LightningDOT's top-M re-ranked by the cross-encoder (the fusion weight chosen on
   the val split); and the cross-encoder's cost of both at two sizes;
7. print one table (recall and wall time of every row, chance level, each paper's claim next
   to what the rows show) and the wall time of each stage, write both to `summary.json`, write
   the plots (training curves; recall@K of every system on one figure), run two example text
   queries and print the command that serves the index.

Every stage calls the entry point's `main(argv)` in a worker, exactly as the command line would.
With `--seeds`, the whole pipeline runs once per seed (the data shared) and the mean and spread
of every row go to `seeds_summary.json`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data.synthetic import OBJECT_VOCAB
from scripts.comparison import (
    DIRECTIONS,
    RECALL_KS,
    ROW_NAMES,
    SOURCES,
    cost_ratio,
    format_summary,
    read_json,
    summarize,
)
from utils.errors import UsageError, run_cli
from utils.files import atomic_write_json
from utils.run_files import (
    BIENCODER_BEST,
    CKPT_DIR,
    CROSS_ENCODER_BEST,
    INFO_FILE,
    PRETRAIN_FINAL,
    RERANK_FILE,
    SCORES_FILE,
    SUMMARY_FILE,
    TEST_RESULTS_FILE,
)

logger = logging.getLogger("demo")

DEMO_CONFIGS = REPO / "configs" / "demo"
SCENES_DIR = "scenes"
SEEDS_SUMMARY_FILE = "seeds_summary.json"
# Worker processes, one thread each: the tiny models run faster on one thread per process
# than on two, and two stages at once keep both cores busy.
WORKERS = 2


@dataclass(frozen=True)
class Preset:
    """Data sizes, the evaluation split and the step counts of one demo scale."""

    num_train: int
    num_val: int
    num_test: int
    # The fixed split of the comparison table: the first N test images and their captions.
    eval_images: int
    # The second, smaller size at which the cross-encoder's cost of both rankings is measured.
    ratio_images: int
    # Re-ranked candidates per query: at most a tenth of `eval_images`.
    top_m: int
    pretrain_steps: int
    finetune_epochs: int
    cross_encoder_pretrain_steps: int
    cross_encoder_steps: int
    vldeformer_steps: int
    overrides: tuple[str, ...] = field(default_factory=tuple)


PRESETS = {
    # `make demo`: a few thousand images; under 10 minutes on 2 cores.
    "demo": Preset(num_train=3000, num_val=200, num_test=500, eval_images=100, ratio_images=50, top_m=10,
                   pretrain_steps=800, finetune_epochs=3, cross_encoder_pretrain_steps=600,
                   cross_encoder_steps=900, vldeformer_steps=600),
    # The reduced pipeline `make test` runs (tests/test_demo_pipeline.py).
    "tiny": Preset(num_train=600, num_val=50, num_test=100, eval_images=100, ratio_images=50, top_m=10,
                   pretrain_steps=200, finetune_epochs=4, cross_encoder_pretrain_steps=200,
                   cross_encoder_steps=200, vldeformer_steps=200, overrides=("valid_steps=100",)),
}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data, indent=2)


@dataclass(frozen=True)
class Demo:
    """The stages of one demo run; picklable, so the worker processes can run them."""

    run_dir: Path
    preset: Preset
    fresh: bool
    seed: int
    data_dir: Path

    # ------------------------------------------------------------------ helpers
    def _stage(self, name: str, done_marker: Path) -> bool:
        """True when the stage must run; prints what is reused."""
        if done_marker.exists() and not self.fresh:
            print(f"[demo] {name}: reusing {done_marker.relative_to(self.run_dir)}", flush=True)
            return False
        print(f"[demo] {name} ...", flush=True)
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

    def _datasets_overrides(self, tasks: str, ratios: str) -> list[str]:
        """Pre-training datasets (train split to train, val split to validate) of `tasks`."""
        d = self.data_dir
        train = f"{{name: synthetic, db: [{d / 'txt_db/train'}], img: [{d / 'img_db'}], tasks: [{tasks}], mix_ratio: [{ratios}]}}"
        val = f"{{name: synthetic, db: [{d / 'txt_db/val'}], img: [{d / 'img_db'}], tasks: [{tasks}]}}"
        return [f"data.train_datasets=[{train}]", f"data.val_datasets=[{val}]", f"model.tokenizer={d / 'tokenizer'}"]

    def _run_overrides(self) -> list[str]:
        return [f"train.seed={self.seed}", *self.preset.overrides]

    def path(self, name: str) -> Path:
        """The output directory of a stage."""
        return self.run_dir / name

    # ------------------------------------------------------------------ training stages
    def pretrain(self) -> bool:
        import pretrain

        out = self.path("pretrain")
        if not self._stage("LightningDOT pre-training (CMR + VMLM + SMRM)", out / CKPT_DIR / PRETRAIN_FINAL):
            return False
        pretrain.main([
            "--config", str(DEMO_CONFIGS / "pretrain.yaml"), "--output_dir", str(out), "--overwrite",
            f"num_train_steps={self.preset.pretrain_steps}",
            *self._datasets_overrides("itm, mlm, mrfr, mrckl", "4, 2, 1, 1"), *self._run_overrides(),
        ])
        return True

    def _finetune(self, name: str, config: str, init: Sequence[str], what: str, length: str) -> bool:
        """`train_itm.py` with a demo config from the initial weights `init` names."""
        import train_itm

        out = self.path(name)
        if not self._stage(what, out / TEST_RESULTS_FILE):
            return False
        train_itm.main([
            "--config", str(DEMO_CONFIGS / config), "--output_dir", str(out), "--overwrite", *init, length,
            *self._data_overrides(), *self._run_overrides(),
        ])
        return True

    def finetune(self) -> bool:
        return self._finetune("finetune", "finetune.yaml", [f"model.biencoder_checkpoint={self.pretrained}"],
                              "LightningDOT fine-tuning", f"num_train_epochs={self.preset.finetune_epochs}")

    def finetune_hivlp(self) -> bool:
        return self._finetune("finetune_hivlp", "finetune_hivlp.yaml",
                              [f"model.biencoder_checkpoint={self.pretrained}"],
                              "HiVLP fine-tuning (embedding hierarchy)",
                              f"num_train_epochs={self.preset.finetune_epochs}")

    def cross_encoder_pretrain(self) -> bool:
        import rerank

        out = self.path("cross_encoder_pretrain")
        if not self._stage("cross-encoder pre-training (UNITER's ITM)", out / CKPT_DIR / CROSS_ENCODER_BEST):
            return False
        rerank.main([
            "train", "--config", str(DEMO_CONFIGS / "cross_encoder_pretrain.yaml"), "--output_dir", str(out),
            "--overwrite", f"num_train_steps={self.preset.cross_encoder_pretrain_steps}",
            *self._data_overrides(), *self._datasets_overrides("itm", "1"), *self._run_overrides(),
        ])
        return True

    def cross_encoder(self) -> bool:
        import rerank

        out = self.path("cross_encoder")
        if not self._stage("cross-encoder ITM fine-tuning on its own hard negatives", out / CKPT_DIR / CROSS_ENCODER_BEST):
            return False
        rerank.main([
            "train", "--config", str(DEMO_CONFIGS / "rerank.yaml"), "--output_dir", str(out), "--overwrite",
            f"cross_encoder.checkpoint={self.path('cross_encoder_pretrain') / CKPT_DIR / CROSS_ENCODER_BEST}",
            f"num_train_steps={self.preset.cross_encoder_steps}",
            *self._data_overrides(), *self._run_overrides(),
        ])
        return True

    def _vldeformer(self, name: str, config: str, what: str) -> bool:
        return self._finetune(
            name, config,
            [f"model.uniter_checkpoint={self.reranker}", f"data.bimodal_negatives.vocab={self.data_dir / OBJECT_VOCAB}"],
            what, f"num_train_steps={self.preset.vldeformer_steps}",
        )

    def vldeformer(self) -> bool:
        return self._vldeformer("vldeformer", "vldeformer.yaml",
                                "VLDeformer: decompose the cross-encoder, bi-modal negatives")

    def vldeformer_no_bimodal(self) -> bool:
        return self._vldeformer("vldeformer_no_bimodal", "vldeformer_no_bimodal.yaml",
                                "VLDeformer without bi-modal negatives")

    # ------------------------------------------------------------------ checkpoints
    @property
    def pretrained(self) -> Path:
        return self.path("pretrain") / CKPT_DIR / PRETRAIN_FINAL

    @property
    def reranker(self) -> Path:
        return self.path("cross_encoder") / CKPT_DIR / CROSS_ENCODER_BEST

    def checkpoint(self, run: str) -> Path:
        return self.path(run) / CKPT_DIR / BIENCODER_BEST

    # ------------------------------------------------------------------ evaluation stages
    def _evaluate(self, name: str, checkpoint: Path, config: str = "finetune.yaml", split: str = "test",
                  images: int | None = None, top_k: int | None = None) -> bool:
        """`inference.py` on the first `images` images of `split` (default: the table's split)."""
        import inference

        out = self.path(name)
        if not self._stage(f"evaluation '{name}'", out / INFO_FILE):
            return False
        images = images or self.preset.eval_images
        inference.main([
            "--config", str(DEMO_CONFIGS / config), "--checkpoint", str(checkpoint), "--output_dir", str(out),
            f"retrieval.eval_split={split}", f"retrieval.eval_images={images}",
            # Complete lists: the all-pairs cross-encoder re-ranks every image and caption.
            f"retrieval.top_k={top_k or 5 * images}", *self._data_overrides(),
        ])
        return True

    def eval_zero_shot(self) -> bool:
        return self._evaluate("eval_zero_shot", self.pretrained)

    def eval_lightningdot(self) -> bool:
        return self._evaluate("eval_lightningdot", self.checkpoint("finetune"))

    def eval_lightningdot_val(self) -> bool:
        return self._evaluate("eval_lightningdot_val", self.checkpoint("finetune"), split="val")

    def eval_lightningdot_small(self) -> bool:
        return self._evaluate("eval_lightningdot_small", self.checkpoint("finetune"), images=self.preset.ratio_images)

    def eval_hivlp(self) -> bool:
        return self._evaluate("eval_hivlp", self.checkpoint("finetune_hivlp"))

    def eval_hivlp_cascade(self) -> bool:
        # The cascade keeps the re-ranker's top-M lists at its last stage (finetune_hivlp.yaml).
        return self._evaluate("eval_hivlp_cascade", self.checkpoint("finetune_hivlp"), config="finetune_hivlp.yaml",
                              top_k=self.preset.top_m)

    def eval_vldeformer(self) -> bool:
        return self._evaluate("eval_vldeformer", self.checkpoint("vldeformer"), config="vldeformer.yaml")

    def eval_vldeformer_no_bimodal(self) -> bool:
        return self._evaluate("eval_vldeformer_no_bimodal", self.checkpoint("vldeformer_no_bimodal"),
                              config="vldeformer.yaml")

    def _rerank(self, name: str, retrieval_dir: str, top_m: int, alpha: float | None = None,
                split: str = "test", images: int | None = None) -> bool:
        """`rerank.py` of a retrieval directory's top-M; `alpha` None: the one chosen on val."""
        import rerank

        out = self.path(name)
        if not self._stage(f"re-ranking '{name}'", out / RERANK_FILE):
            return False
        if alpha is None:
            alpha = choose_alpha(read_json(self.path("rerank_val") / RERANK_FILE)["alpha_sweep"])
        out.mkdir(parents=True, exist_ok=True)
        rerank.main([
            "--config", str(DEMO_CONFIGS / "rerank.yaml"), "--retrieval_dir", str(self.path(retrieval_dir)),
            "--reranker_checkpoint", str(self.reranker), "--top_m", str(top_m), "--alpha", str(alpha),
            "--output_dir", str(out), f"retrieval.eval_split={split}",
            f"retrieval.eval_images={images or self.preset.eval_images}", *self._data_overrides(),
        ])
        return True

    def rerank_val(self) -> bool:
        # The fusion weight is chosen on the val split (the alpha sweep of rerank.json).
        return self._rerank("rerank_val", "eval_lightningdot_val", self.preset.top_m, alpha=0.0, split="val")

    def rerank(self) -> bool:
        return self._rerank("rerank", "eval_lightningdot", self.preset.top_m)

    def rerank_small(self) -> bool:
        return self._rerank("rerank_small", "eval_lightningdot_small", self.preset.top_m,
                            images=self.preset.ratio_images)

    def cross_encoder_all_pairs(self) -> bool:
        # Every caption against every image: the complete lists re-ranked by the cross-encoder alone.
        return self._rerank("cross_encoder_all_pairs", "eval_lightningdot", 5 * self.preset.eval_images, alpha=0.0)

    def cross_encoder_all_pairs_small(self) -> bool:
        return self._rerank("cross_encoder_all_pairs_small", "eval_lightningdot_small", 5 * self.preset.ratio_images,
                            alpha=0.0, images=self.preset.ratio_images)

    # ------------------------------------------------------------------ after the stages
    def examples(self) -> list[dict[str, Any]]:
        """Two test captions as typed queries: bi-encoder top 3, then the re-ranked top 3."""
        import inference
        from data.synthetic import COLOURS
        from data.txt_db import TxtDb

        objects = read_json(self.data_dir / "objects.json")
        fused = read_json(self.path("rerank") / SCORES_FILE)["text_to_image"]
        test_db = TxtDb(str(self.data_dir / "txt_db" / "test"), num_images=self.preset.eval_images)
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
                    "query", "--index_dir", str(self.path("eval_lightningdot")), "--checkpoint",
                    str(self.checkpoint("finetune")), "--tokenizer", str(self.data_dir / "tokenizer"), "--top_k", "3",
                    text,
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


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: a `Demo` method, run once everything in `deps` is built."""

    name: str
    deps: tuple[str, ...] = ()


# In priority order: when more stages are ready than workers are free, the earlier goes first
# (the cross-encoder chain is the longest, so it starts at once).
STAGES = (
    Stage("cross_encoder_pretrain"),
    Stage("pretrain"),
    Stage("cross_encoder", ("cross_encoder_pretrain",)),
    Stage("finetune", ("pretrain",)),
    Stage("eval_zero_shot", ("pretrain",)),
    Stage("finetune_hivlp", ("pretrain",)),
    Stage("vldeformer", ("cross_encoder",)),
    Stage("vldeformer_no_bimodal", ("cross_encoder",)),
    Stage("eval_lightningdot", ("finetune",)),
    Stage("eval_lightningdot_val", ("finetune",)),
    Stage("eval_lightningdot_small", ("finetune",)),
    Stage("eval_hivlp", ("finetune_hivlp",)),
    Stage("eval_hivlp_cascade", ("finetune_hivlp",)),
    Stage("rerank_val", ("eval_lightningdot_val", "cross_encoder")),
    Stage("rerank", ("eval_lightningdot", "rerank_val")),
    Stage("rerank_small", ("eval_lightningdot_small", "rerank_val")),
    Stage("cross_encoder_all_pairs", ("eval_lightningdot", "cross_encoder")),
    Stage("cross_encoder_all_pairs_small", ("eval_lightningdot_small", "cross_encoder")),
    Stage("eval_vldeformer", ("vldeformer",)),
    Stage("eval_vldeformer_no_bimodal", ("vldeformer_no_bimodal",)),
)


def _single_thread_worker() -> None:
    """A worker process: one thread for torch and OpenMP, progress as plain lines (two stages
    write to one terminal at once)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["LIGHTNINGDOT_PROGRESS"] = "lines"
    import torch

    torch.set_num_threads(1)


def _run_stage(demo: Demo, name: str) -> tuple[bool, float]:
    """Run one stage in a worker: (whether it ran, its wall seconds)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    ran = getattr(demo, name)()
    return ran, time.perf_counter() - t0


def run_stages(demo: Demo, stages: Sequence[Stage], workers: int = WORKERS) -> dict[str, tuple[bool, float]]:
    """Run every stage, each as soon as its dependencies are built, on `workers` processes.

    Returns:
        Stage name -> (whether it ran, wall seconds), in completion order.
    """
    by_name = {s.name: s for s in stages}
    done: dict[str, tuple[bool, float]] = {}
    running: dict[concurrent.futures.Future, str] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_single_thread_worker) as pool:
        while len(done) < len(stages):
            ready = [s for s in stages if s.name not in done and s.name not in running.values()
                     and all(d in done for d in s.deps)]
            for stage in ready[: workers - len(running)]:
                running[pool.submit(_run_stage, demo, stage.name)] = stage.name
            if not running:
                missing = {s.name: [d for d in s.deps if d not in by_name] for s in stages if s.name not in done}
                raise RuntimeError(f"stages that can never run: {missing}")
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                done[running.pop(future)] = future.result()
    return done


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


def choose_alpha(sweep: Mapping[str, Mapping[str, Any]]) -> float:
    """The fusion weight with the best R@1 (both directions summed; RSUM breaks ties).

    alpha 1.0 (the bi-encoder alone) is left out: the point is the re-ranker's contribution.
    """
    def key(item: tuple[str, Mapping[str, Any]]) -> tuple[float, float]:
        recall = item[1]
        return (recall["text_to_image"]["R@1"] + recall["image_to_text"]["R@1"], recall["rsum"])

    candidates = [(a, r) for a, r in sweep.items() if float(a) < 1.0]
    return float(max(candidates, key=key)[0])


def format_stage_times(stage_s: Mapping[str, float], reused: Sequence[str], wall_s: float) -> str:
    """One line per stage with its wall time; reused stages say so."""
    lines = ["Wall time per stage (s; two stages run at a time):"]
    for name, seconds in stage_s.items():
        lines.append(f"  {name:<30} {seconds:8.1f}{'  (reused)' if name in reused else ''}")
    lines.append(f"  {'total (wall clock)':<30} {wall_s:8.1f}")
    return "\n".join(lines)


def write_plots(demo: Demo, rows: Mapping[str, Any]) -> list[Path]:
    """Training curves of every run and one recall@K figure with every system of the table."""
    from scripts.plots import find_outputs, plot_recall_curves, plot_training
    from utils.run_files import PLOTS_DIR, RECALL_PLOT, TRAINING_PLOT_SUFFIX

    out = demo.run_dir / PLOTS_DIR
    runs, _ = find_outputs(demo.run_dir)
    written = [plot_training(run, out / f"{run.name}{TRAINING_PLOT_SUFFIX}") for run in runs]
    written.append(plot_recall_curves({name: demo.path(SOURCES[name]) for name in rows}, out / RECALL_PLOT))
    return written


def serve_command(demo: Demo) -> str:
    """The one command that serves the demo's test index with its re-ranker."""
    def rel(path: Path) -> str:
        # Relative to the repository when inside it: the command is run from there.
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)

    alpha = read_json(demo.path("rerank") / RERANK_FILE)["alpha"]
    return (f".venv/bin/python inference.py serve --index_dir {rel(demo.path('eval_lightningdot'))} "
            f"--checkpoint {rel(demo.checkpoint('finetune'))} --reranker_checkpoint {rel(demo.reranker)} "
            f"--alpha {alpha:.1f} --render_dir {rel(demo.run_dir / SCENES_DIR)}")


def prepare_data(run_dir: Path, preset: Preset, fresh: bool) -> Path:
    """The synthetic dataset (reused when its arguments match) and the test split's scenes."""
    from data.scene_render import render_split
    from data.synthetic import SyntheticConfig, generate

    data_dir = run_dir / "data"
    cfg = SyntheticConfig(num_train=preset.num_train, num_val=preset.num_val, num_test=preset.num_test)
    if fresh and data_dir.exists():
        shutil.rmtree(data_dir)
    print("[demo] synthetic data (reused when its arguments match) ...", flush=True)
    generate(str(data_dir), cfg, progress=True)
    scenes = run_dir / SCENES_DIR
    if fresh or not (scenes / ".done").exists():
        print("[demo] test-split scenes (PNG) ...", flush=True)
        render_split(data_dir, "test", scenes)
        (scenes / ".done").touch()
    return data_dir


def run(run_dir: Path, preset: Preset, fresh: bool, seed: int = 42, examples: bool = True,
        data_dir: Path | None = None) -> dict[str, Any]:
    """All stages; returns the summary written to `run_dir/summary.json`."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if data_dir is None:
        data_dir = prepare_data(run_dir, preset, fresh)
    data_s = time.perf_counter() - t0
    demo = Demo(run_dir, preset, fresh, seed, data_dir)
    results = run_stages(demo, STAGES)
    previous = read_json(run_dir / SUMMARY_FILE) if (run_dir / SUMMARY_FILE).is_file() else {}
    # A reused stage keeps the time of the run that made it; a wholly reused run its wall time.
    stage_s = {"data": data_s, **{name: seconds if ran else previous.get("stage_s", {}).get(name, seconds)
                                  for name, (ran, seconds) in results.items()}}
    reused = [name for name, (ran, _) in results.items() if not ran]
    ran_any = len(reused) < len(results)

    summary = summarize(run_dir, list(ROW_NAMES), cost_ratio(run_dir))
    wall_s = time.perf_counter() - started
    summary |= {"seed": seed, "stage_s": stage_s, "total_s": wall_s if ran_any else previous.get("total_s", wall_s)}
    _write_json(run_dir / SUMMARY_FILE, summary)
    print()
    print(format_summary(summary, (
        f"Recall (%) and seconds on one split, {summary['split']['subset']}; re-ranking the top "
        f"{summary['top_m']} with alpha {summary['alpha']:.1f} x bi-encoder + {1 - summary['alpha']:.1f} x "
        f"cross-encoder (seed {seed})")))
    print()
    print(format_stage_times(stage_s, reused, summary["total_s"]))
    print("\n[demo] plots:")
    for path in write_plots(demo, summary["rows"]):
        print(f"  {path}")
    if examples:
        demo.examples()
    print(f"\n[demo] done in {time.perf_counter() - started:.0f} s; everything is in {run_dir}")
    print(f"[demo] summary: {run_dir / SUMMARY_FILE}")
    print("[demo] search it in a browser (then open http://127.0.0.1:8000/?q=a+red+dog):")
    print("  " + serve_command(demo))
    return summary


def run_seeds(run_dir: Path, preset: Preset, fresh: bool, seeds: Sequence[int]) -> dict[str, Any]:
    """The whole pipeline once per seed on the same data; mean and spread of every row."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(run_dir, preset, fresh)
    summaries = {seed: run(run_dir / f"seed{seed}", preset, fresh, seed, examples=False, data_dir=data_dir)
                 for seed in seeds}
    table = seeds_table(summaries)
    _write_json(run_dir / SEEDS_SUMMARY_FILE, table)
    print()
    print(f"Mean and spread (min to max) over seeds {list(seeds)}, {table['split']['subset']}:")
    print(format_seeds_table(table))
    return table


def seeds_table(summaries: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Per row and metric: the mean, the minimum and the maximum over the seeds' summaries."""
    first = next(iter(summaries.values()))
    rows = {}
    for name in first["rows"]:
        metrics: dict[str, list[float]] = {}
        for summary in summaries.values():
            row = summary["rows"][name]
            for direction in DIRECTIONS:
                for k in RECALL_KS:
                    metrics.setdefault(f"{direction}/R@{k}", []).append(row[direction][f"R@{k}"])
            metrics.setdefault("rsum", []).append(row["rsum"])
        rows[name] = {key: {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "values": v}
                      for key, v in metrics.items()}
    met = {c["claim"]: [s["claims"][i]["met"] for s in summaries.values()] for i, c in enumerate(first["claims"])}
    return {"seeds": list(summaries), "split": first["split"], "rows": rows, "claims_met": met}


def format_seeds_table(table: Mapping[str, Any]) -> str:
    """Markdown: mean (min to max) of R@1 both ways and RSUM per row."""
    lines = ["| system | TR R@1 | IR R@1 | RSUM |", "|---|---|---|---|"]
    for name, row in table["rows"].items():
        cells = [f"{row[key]['mean']:.1f} ({row[key]['min']:.1f} to {row[key]['max']:.1f})"
                 for key in ("image_to_text/R@1", "text_to_image/R@1", "rsum")]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", default=None, help="where everything is written (default runs/demo, "
                        "runs/demo_seeds with --seeds)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--seed", type=int, default=42, help="train.seed of every training stage")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds: the pipeline once per seed, "
                        "mean and spread of every row")
    parser.add_argument("--fresh", action="store_true", help="rebuild every stage")
    parser.add_argument("--no-examples", dest="examples", action="store_false", help="skip the example queries")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Relative paths in the demo configs (model JSONs) resolve from the repository root.
    os.chdir(REPO)
    preset = PRESETS[args.preset]
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
        run_dir = Path(args.run_dir or REPO / "runs" / "demo_seeds").resolve()
        return run_seeds(run_dir, preset, args.fresh, seeds)
    run_dir = Path(args.run_dir or REPO / "runs" / "demo").resolve()
    return run(run_dir, preset, args.fresh, args.seed, args.examples)


if __name__ == "__main__":
    sys.exit(run_cli(main))
