"""``d2v embed``: pooled encoder features [N, D] of raw items, preprocessed as the model's folder says
(``Encoder.embed`` with the preprocessing ``d2v.load_encoder`` attaches: a d2v checkpoint's pipeline
preprocessing, or an HF folder's processor files), written to a ``.npy`` file. ``--layer`` / ``--pool`` are
``embed``'s ``layer`` / ``pool`` (default: the mean over the last layer's tokens, for every modality).

On the command line every input is a file (text files are read whole as UTF-8); a missing path or a
directory is an error naming it, never embedded as text. Literal strings come only from ``--text`` or,
with ``-`` as the only input, from stdin, one per line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from d2v.data.shards import item_file
from d2v.data.stages import data_module
from d2v.load import load_encoder
from d2v.preprocessing import Unavailable

STDIN = "-"


def cli_items(inputs: Sequence[str], texts: Sequence[str] = (), stdin: TextIO | None = None) -> list[Any]:
    """Items of ``d2v embed``: the input files as ``Path`` s, then the literal ``texts`` (``--text``).

    ``-`` as the only input reads one text per line from ``stdin`` instead of files (row i = line i).
    FileNotFoundError / ValueError naming a missing path or a directory; ValueError when nothing is given.
    """
    if STDIN in inputs:
        if list(inputs) != [STDIN]:
            raise ValueError("'-' (texts from stdin, one per line) must be the only input")
        items: list[Any] = (stdin if stdin is not None else sys.stdin).read().splitlines()
    else:
        try:
            items = [item_file(a, "file") for a in inputs]
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} (a literal text goes in --text STRING)") from None
    items += texts
    if not items:
        raise ValueError("nothing to embed: give input files, --text STRING, or '-' to read texts from stdin")
    return items


def cli_embed(args: Any) -> int:
    """``d2v embed CHECKPOINT INPUTS... [--text STRING]... [--layer INT] [--pool {mean,first}] --out
    features.npy``."""
    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: expected a .npy path")
    texts = list(args.text or [])
    items = cli_items(args.inputs, texts)  # before loading the model: a wrong path fails fast
    encoder = load_encoder(args.checkpoint, modality=getattr(args, "modality", None))
    literal = bool(texts) or list(args.inputs) == [STDIN]
    if literal and not data_module(encoder.modality).STRING_ITEMS:
        raise ValueError(
            f"--text and '-' give literal strings, which only text models embed; {args.checkpoint} is a "
            f"{encoder.modality!r} model: pass its files"
        )
    if isinstance(encoder.preprocessing, Unavailable):  # say what the folder lacks, before any work
        raise ValueError(encoder.preprocessing.reason)
    layer, pool = getattr(args, "layer", None), getattr(args, "pool", "mean")  # callers may omit both
    feats = encoder.embed(items, layer=layer, pool=pool)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, feats)
    how = f"{pool} pooling of {'the last layer' if layer is None else f'layer {layer}'}"
    print(f"wrote {out}: {feats.shape[0]} x {feats.shape[1]} features ({encoder.modality}, {how})")
    return 0
