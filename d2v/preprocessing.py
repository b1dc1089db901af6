"""Raw items -> encoder batches, exactly as the pipeline preprocesses them (``Encoder.embed`` uses it).

The preprocessing is the modality's own (``d2v/modalities/<m>/data.py``): ``inference_inputs`` reads raw
items as at shard time (audio: 16 kHz mono; images: resize + centre crop; text: the shards' tokenizer),
``transform`` in ``eval`` mode (audio: per-utterance normalisation; text: truncation) and ``collate``
(padding; image mean/std). A d2v checkpoint carries what that needs: ``meta.json["preprocessing"]`` (the
shard manifest's entry) and its files (``tokenizer.json``) in the step directory.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d2v import checkpoint
from d2v.data.stages import data_module
from d2v.modalities.base import Encoder


@dataclass(frozen=True)
class ItemPreprocessing:
    """The modality's eval-mode pipeline for raw items, from the shards' ``preprocessing`` entry.

    ``files_dir`` holds the files ``prep`` names (a checkpoint step directory, or the shard folder).
    A plain dataclass, so an encoder carrying it still pickles / deep-copies.
    """

    modality: str
    prep: dict[str, Any]
    model_cfg: Any
    files_dir: Path

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        data = data_module(self.modality)
        read = data.inference_inputs
        # text needs the folder of its tokenizer; audio/image read everything from the items themselves
        if len(inspect.signature(read).parameters) >= 3:
            xs = read(list(items), self.prep, self.files_dir)
        else:
            xs = read(list(items), self.prep)
        rng = random.Random(0)  # eval mode draws nothing; fixed anyway
        kw = {
            "mode": "eval",
            "max_len": None,
            "augment": False,
            "prep": self.prep,
            "model_cfg": self.model_cfg,
        }
        xs = [data.transform(x, rng=rng, **kw) for x in xs]
        return data.collate(
            xs, mode="eval", model_cfg=self.model_cfg, prep=self.prep, generator=torch.Generator()
        )


def checkpoint_preprocessing(path: str | Path, encoder: Encoder) -> ItemPreprocessing:
    """The preprocessing recorded with a d2v checkpoint; ValueError naming the checkpoint if it has none."""
    step = checkpoint.resolve(path)
    meta = checkpoint.read_meta(step)
    if meta.get("modality") != encoder.modality:
        raise ValueError(f"{step} is a {meta.get('modality')!r} checkpoint, not {encoder.modality!r}")
    prep = meta.get("preprocessing")
    if not prep:
        raise ValueError(
            f"{step}/meta.json records no preprocessing (checkpoints from `d2v pretrain`/`finetune` carry "
            "the shard manifest's); embed needs it to read raw items as the pipeline does"
        )
    return ItemPreprocessing(encoder.modality, prep, encoder.config, step)


def attach_preprocessing(encoder: Encoder, path: str | Path) -> Encoder:
    """Set ``encoder.preprocessing`` from a d2v checkpoint when it records one (for ``Encoder.embed``)."""
    try:
        encoder.preprocessing = checkpoint_preprocessing(path, encoder)
    except ValueError:
        encoder.preprocessing = None  # Encoder.embed then says how to get one
    return encoder
