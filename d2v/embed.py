"""``d2v embed``: mean-pooled encoder features [N, D] of raw items, preprocessed exactly as the pipeline does.

The preprocessing is the modality's own (``d2v/modalities/<m>/data.py``): ``inference_inputs`` reads raw
items as at shard time (audio: 16 kHz mono; images: resize + centre crop; text: the shards' tokenizer),
``transform`` in ``eval`` mode (audio: per-utterance normalisation; text: truncation) and ``collate``
(padding; image mean/std). A d2v checkpoint carries what that needs: ``meta.json["preprocessing"]`` (the
shard manifest's entry) and its files (``tokenizer.json``) in the step directory.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2v.modalities.base import Encoder

Preprocess = Callable[[Sequence[Any]], dict[str, Any]]
"""Raw items -> a batch ``{"inputs": Tensor, "padding_mask": Tensor (optional)}`` for the encoder."""


def embed(
    encoder: Encoder,
    items: Sequence[Any],
    preprocessing: Preprocess,
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Mean-pooled last-layer features (prefix tokens and padding excluded): float32 [N, D], in item order.

    Runs in eval mode under ``no_grad`` (``Encoder.embed_pooled``), ``batch_size`` items at a time.
    """
    if isinstance(items, (str, Path)):
        raise ValueError("embed: pass a list of items (file paths, strings, arrays), not a single item")
    if batch_size < 1:
        raise ValueError(f"embed: batch_size must be >= 1, got {batch_size}")
    items = list(items)
    dev = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for i in range(0, len(items), batch_size):
            batch = preprocessing(items[i : i + batch_size])
            pad = batch.get("padding_mask")
            pooled = encoder.embed_pooled(batch["inputs"].to(dev), None if pad is None else pad.to(dev))
            out.append(pooled.float().cpu())
    finally:
        encoder.train(was_training)
    if not out:
        return np.zeros((0, encoder.transformer.dim), dtype=np.float32)
    return torch.cat(out).numpy()


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
        from d2v.data.stages import data_module

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
    from d2v import checkpoint

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


def cli_items(args: Sequence[str]) -> list[Any]:
    """Command-line inputs: an existing file becomes a ``Path`` (read by the modality), anything else stays
    a string (text: the string itself; audio/images: a path, which the modality reports as missing)."""
    return [Path(a) if Path(a).is_file() else a for a in args]


def cli_embed(args: Any) -> int:
    """``d2v embed CHECKPOINT INPUTS... --out features.npy``."""
    from d2v import load_encoder

    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: expected a .npy path")
    encoder = load_encoder(args.checkpoint)
    feats = embed(encoder, cli_items(args.inputs), checkpoint_preprocessing(args.checkpoint, encoder))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, feats)
    print(f"wrote {out}: {feats.shape[0]} x {feats.shape[1]} features ({encoder.modality})")
    return 0
