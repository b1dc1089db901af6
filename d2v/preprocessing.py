"""Raw items -> encoder batches (``Encoder.embed`` uses it), as the model's folder says to make them.

A d2v checkpoint: exactly as the pipeline preprocesses, with the modality's own code
(``d2v/modalities/<m>/data.py``): ``inference_inputs`` reads raw items as at shard time (audio: 16 kHz
mono; images: resize + centre crop; text: the shards' tokenizer), ``transform`` in ``eval`` mode (audio:
per-utterance normalisation; text: truncation) and ``collate`` (padding; image mean/std). The checkpoint
carries what that needs: ``meta.json["preprocessing"]`` (the shard manifest's entry) and its files
(``tokenizer.json``) in the step directory.

A Hugging Face folder: transformers' processor, read from its files by the modality
(``d2v/modalities/<m>/hf.py`` ``processor_from_hf``: ``preprocessor_config.json``, the tokenizer).

What a raw item may be (a path, an array, a PIL image, a string ...) is the modality's too: ``data.py``
``to_waveform`` / ``to_image`` / ``to_text``.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d2v import checkpoint
from d2v.data.stages import data_module
from d2v.hf import is_hf_dir
from d2v.modalities import JOINT, get
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
    if meta.get("modality") == JOINT:  # one entry per modality, each one's files in its own folder
        prep = (meta.get("preprocessing") or {}).get(encoder.modality)
        return ItemPreprocessing(encoder.modality, prep, encoder.config, step / encoder.modality)
    if meta.get("modality") != encoder.modality:
        raise ValueError(f"{step} is a {meta.get('modality')!r} checkpoint, not {encoder.modality!r}")
    prep = meta.get("preprocessing")
    if not prep:
        raise ValueError(
            f"{step}/meta.json records no preprocessing (checkpoints from `d2v pretrain`/`finetune` carry "
            "the shard manifest's); embed needs it to read raw items as the pipeline does"
        )
    return ItemPreprocessing(encoder.modality, prep, encoder.config, step)


def item_preprocessing(path: str | Path, encoder: Encoder) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """The ``embed`` preprocessing that goes with the model at ``path``: an HF folder's processor files, or
    a d2v checkpoint's recorded preprocessing; ValueError naming what is missing and what to do."""
    if is_hf_dir(path):
        return get(encoder.modality).processor_from_hf(Path(path), encoder.config)
    return checkpoint_preprocessing(path, encoder)


@dataclass(frozen=True)
class Unavailable:
    """Stands in for a preprocessing the model's folder lacks: ``embed`` then says why. The error waits
    for ``embed`` because ``load_encoder`` also serves ``features`` and fine-tuning, which need none."""

    reason: str

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        raise ValueError(f"this encoder has no item preprocessing: {self.reason}")


def attach_preprocessing(encoder: Encoder, path: str | Path) -> Encoder:
    """Set ``encoder.preprocessing`` (for ``Encoder.embed``) from the model's folder; when it has none,
    an ``Unavailable`` that tells ``embed``'s caller what is missing."""
    try:
        encoder.preprocessing = item_preprocessing(path, encoder)
    except ValueError as e:
        encoder.preprocessing = Unavailable(str(e))
    return encoder
