"""Write the object-word vocabulary of the composed caption negatives for real data.

    python scripts/make_object_vocab.py --objects objects_vocab.txt \
        --tokenizer /models/bert-base-cased --output data/vg_object_vocab.txt

`--objects` is the Visual Genome object list of the bottom-up-attention detector (1,600 lines,
`objects_vocab.txt`; a line may hold comma-separated synonyms). Each name goes through the
run's tokenizer (a local HF directory, as `model.tokenizer` / `txt_model_config`); names that
become one word piece are written (`ID object  # name`), in one group, since a replacement keeps
the caption's length. Multi-piece names (e.g. "traffic light") are counted and skipped. The
file is `data.bimodal_negatives.vocab` (data/composed_negatives.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data.composed_negatives import read_object_vocab, write_object_vocab
from utils.config import require_path
from utils.errors import DataError, run_cli


def object_names(path: str) -> list[str]:
    """Every name of the object list, synonyms included, in file order, without repeats."""
    names: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        names += [n.strip() for n in line.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def single_piece_ids(names: list[str], tokenizer) -> tuple[list[int], list[str], list[str]]:
    """(token ids, their names, skipped names): one id per name that is one word piece;
    a name whose piece was already taken by an earlier name is skipped."""
    ids, kept, skipped = [], [], []
    for name in names:
        pieces = tokenizer(name, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1 and pieces[0] not in ids and pieces[0] != tokenizer.unk_token_id:
            ids.append(pieces[0])
            kept.append(name)
        else:
            skipped.append(name)
    return ids, kept, skipped


def main(argv: list[str] | None = None) -> int:
    """Write the vocabulary file; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", required=True, help="the VG objects_vocab.txt")
    parser.add_argument("--tokenizer", required=True, help="local HF tokenizer directory of the run")
    parser.add_argument("--output", required=True, help="vocabulary file to write")
    args = parser.parse_args(argv)
    require_path(args.objects, "--objects", "file")
    require_path(args.tokenizer, "--tokenizer", "dir")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    ids, kept, skipped = single_piece_ids(object_names(args.objects), tokenizer)
    if len(ids) < 2:
        raise DataError(f"{args.objects}: fewer than two names are single word pieces of {args.tokenizer}")
    write_object_vocab(args.output, ids, ["object"] * len(ids), kept)
    read_object_vocab(args.output)  # the file the training run will read
    print(f"{args.output}: {len(ids)} single-piece object words; {len(skipped)} names skipped "
          f"(several word pieces or a repeated piece)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
