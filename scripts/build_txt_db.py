"""Build a txt_db from a Karpathy-split caption JSON or from Multi30K caption files.

Examples::

    python scripts/build_txt_db.py --karpathy dataset_coco.json --split train --split restval \
        --tokenizer /models/bert-base-cased --out txt_db/itm_coco_train
    python scripts/build_txt_db.py --multi30k-captions train.de --multi30k-images train_images.txt \
        --tokenizer /models/bert-base-multilingual-cased --out txt_db/multi30k_train_de
"""
from __future__ import annotations

import argparse
import sys

from data.converters import convert_karpathy, convert_multi30k
from utils.errors import run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--karpathy", metavar="JSON", help="Karpathy-split caption JSON")
    src.add_argument("--multi30k-captions", nargs="+", metavar="TXT",
                     help="Multi30K caption file(s), one caption per line")
    p.add_argument("--split", action="append", dest="splits",
                   help="Karpathy split to include (repeatable), e.g. train, restval, val, test")
    p.add_argument("--multi30k-images", metavar="TXT",
                   help="image-name list aligned with the Multi30K caption lines")
    p.add_argument("--tokenizer", required=True,
                   help="LOCAL directory of a Hugging Face tokenizer (never downloaded)")
    p.add_argument("--out", required=True, help="txt_db directory to create")
    p.add_argument("--img-prefix", default="",
                   help="prefix of image names, to match an existing img_db (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.karpathy and not args.splits:
        p.error("--karpathy needs at least one --split")
    if args.multi30k_captions and not args.multi30k_images:
        p.error("--multi30k-captions needs --multi30k-images")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    if args.karpathy:
        stats = convert_karpathy(args.karpathy, args.out, args.tokenizer, args.splits,
                                 img_prefix=args.img_prefix, overwrite=args.overwrite,
                                 progress=not args.no_progress)
    else:
        stats = convert_multi30k(args.multi30k_captions, args.multi30k_images, args.out,
                                 args.tokenizer, img_prefix=args.img_prefix,
                                 overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {stats['captions']} captions of {stats['images']} images to {stats['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
