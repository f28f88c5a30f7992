"""Build an img_db from a directory of per-image detector .npz files.

Example::

    python scripts/build_img_db.py --npz-dir bottom_up_out/flickr30k --out img_db/flickr30k \
        --variant msgpack --variant compressed
"""
from __future__ import annotations

import argparse
import sys

from data.converters import convert_npz_dir
from data.img_db import VARIANTS
from utils.errors import run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--npz-dir", required=True,
                   help="directory of NAME.npz files (features, norm_bb, conf, soft_labels)")
    p.add_argument("--out", required=True, help="img_db directory to create")
    p.add_argument("--conf-th", type=float, default=0.2,
                   help="box confidence threshold; -1 keeps --num-bb boxes (default 0.2)")
    p.add_argument("--max-bb", type=int, default=100)
    p.add_argument("--min-bb", type=int, default=10)
    p.add_argument("--num-bb", type=int, default=36, help="boxes kept when --conf-th is -1")
    p.add_argument("--variant", action="append", dest="variants", choices=VARIANTS,
                   help="feature LMDB variant(s) to write (repeatable; default msgpack)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    stats = convert_npz_dir(args.npz_dir, args.out, args.conf_th, args.max_bb, args.min_bb,
                            args.num_bb, args.variants or ["msgpack"], overwrite=args.overwrite,
                            progress=not args.no_progress)
    print(f"wrote {stats['images']} images to {stats['out_dir']}"
          + (f" ({stats['resorted']} re-sorted by confidence)" if stats["resorted"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
