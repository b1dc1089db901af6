"""``d2v embed``: mean-pooled encoder features [N, D] of raw items, preprocessed exactly as the pipeline does
(``Encoder.embed`` with the checkpoint's ``d2v.preprocessing``), written to a ``.npy`` file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d2v.load import load_encoder
from d2v.preprocessing import checkpoint_preprocessing


def cli_items(args: Sequence[str]) -> list[Any]:
    """Command-line inputs: an existing file becomes a ``Path`` (read by the modality), anything else stays
    a string (text: the string itself; audio/images: a path, which the modality reports as missing)."""
    return [Path(a) if Path(a).is_file() else a for a in args]


def cli_embed(args: Any) -> int:
    """``d2v embed CHECKPOINT INPUTS... --out features.npy``."""
    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: expected a .npy path")
    encoder = load_encoder(args.checkpoint)
    feats = encoder.embed(cli_items(args.inputs), preprocessing=checkpoint_preprocessing(args.checkpoint, encoder))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, feats)
    print(f"wrote {out}: {feats.shape[0]} x {feats.shape[1]} features ({encoder.modality})")
    return 0
