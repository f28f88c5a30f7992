"""The sections by name, in the order a run takes them.

Cross-section figures need their producers first: peak (MFU), train (loader ratio), cross
(evaluation speed-up).
"""
from __future__ import annotations

from collections.abc import Callable

from scripts.benchmark.ann import section_ann
from scripts.benchmark.cascade import section_cascade
from scripts.benchmark.context import Context
from scripts.benchmark.cross import section_cross
from scripts.benchmark.encode import section_encode
from scripts.benchmark.eval import section_eval
from scripts.benchmark.loader import section_loader
from scripts.benchmark.peak import section_peak
from scripts.benchmark.search import section_search
from scripts.benchmark.serve import section_serve
from scripts.benchmark.train import section_pretrain, section_train

SectionFn = Callable[[Context], None]

SECTION_FNS: dict[str, SectionFn] = {
    "peak": section_peak,
    "train": section_train,
    "pretrain": section_pretrain,
    "encode": section_encode,
    "search": section_search,
    "ann": section_ann,
    "cascade": section_cascade,
    "cross": section_cross,
    "eval": section_eval,
    "loader": section_loader,
    "serve": section_serve,
}
SECTIONS = tuple(SECTION_FNS)
