"""Generate the structured synthetic dataset (txt_db per split, img_db, tokenizer).

Example::

    python scripts/make_synthetic.py --out runs/synthetic            # demo size
    python scripts/make_synthetic.py --out /tmp/synth_tiny --tiny    # for tests
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from data.synthetic import TINY, SyntheticConfig, generate
from utils.errors import run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=SyntheticConfig.seed)
    p.add_argument("--num-train", type=int, help=f"train images (default "
                   f"{SyntheticConfig.num_train}; --tiny: {TINY.num_train})")
    p.add_argument("--num-val", type=int, help=f"val images (default {SyntheticConfig.num_val}; "
                   f"--tiny: {TINY.num_val})")
    p.add_argument("--num-test", type=int, help=f"test images (default "
                   f"{SyntheticConfig.num_test}; --tiny: {TINY.num_test})")
    p.add_argument("--captions-per-image", type=int, default=SyntheticConfig.captions_per_image)
    p.add_argument("--tiny", action="store_true", help="a few dozen images, for tests")
    p.add_argument("--keep-npz", action="store_true",
                   help="keep the per-image detector .npz files (OUT/npz)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SyntheticConfig:
    """The generator config the command line asks for."""
    base = TINY if args.tiny else SyntheticConfig()
    counts = {k: getattr(args, k) for k in ("num_train", "num_val", "num_test")
              if getattr(args, k) is not None}
    return dataclasses.replace(base, seed=args.seed, captions_per_image=args.captions_per_image,
                               keep_npz=args.keep_npz, **counts)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    manifest = generate(args.out, config_from_args(args), progress=not args.no_progress)
    summary = ", ".join(f"{s}: {c['images']} images / {c['captions']} captions"
                        for s, c in manifest["counts"].items())
    print(f"synthetic dataset at {manifest['root']} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
