"""A synthetic txt_db + img_db on disk, in the real formats, for the loader and eval sections."""
from __future__ import annotations

import os

import numpy as np

from scripts.benchmark.context import Sizes


def write_synthetic_dbs(root: str, n_images: int, captions_per_image: int, s: Sizes, seed: int) -> tuple[str, str]:
    """A txt_db and a 36-box img_db (conf_th -1) of random content, in the real formats."""
    from data.img_db import ImgDbWriter
    from data.txt_db import TxtDbWriter
    from scripts.benchmark.batches import caption_lengths

    rng = np.random.default_rng(seed)
    txt_dir, img_dir = os.path.join(root, "txt_db"), os.path.join(root, "img_db")
    meta = {"UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103, "v_range": [999, s.vocab], "bert": "synthetic"}
    lengths = caption_lengths(n_images * captions_per_image, rng, s.max_txt_len)
    with TxtDbWriter(txt_dir, meta) as txt_w, ImgDbWriter(img_dir, conf_th=-1, num_bb=s.num_bb) as img_w:
        for i in range(n_images):
            name = f"synthetic_{i:07d}.npz"
            feats = rng.standard_normal((s.num_bb, s.img_dim), dtype=np.float32)
            xy = rng.random((s.num_bb, 2), dtype=np.float32) * 0.5
            wh = rng.random((s.num_bb, 2), dtype=np.float32) * 0.5
            norm_bb = np.concatenate([xy, xy + wh, wh], axis=1)
            conf = np.sort(rng.random(s.num_bb, dtype=np.float32))[::-1]
            img_w.add(name, feats, norm_bb, conf)
            for j in range(captions_per_image):
                cid = i * captions_per_image + j
                ids = rng.integers(999, s.vocab, size=int(lengths[cid])).tolist()
                txt_w.add(str(cid), {"input_ids": ids, "img_fname": name})
    return txt_dir, img_dir
