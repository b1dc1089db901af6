"""Stream a shard split into batches for pretraining, fine-tuning or evaluation (modality-blind).

One pipeline per DataLoader worker, as a chain of small generator steps::

    shard list -> [seeded shard shuffle] -> split_by_node -> split_by_worker      (or: seeded resampling)
      -> read tar (sample counts checked against the manifest) -> [label-budget filter]
      -> [seeded shuffle buffer] -> decode -> transform (crop / augment) -> batch -> collate (+ masks)

Every random choice comes from a generator seeded by ``derive_seed(seed, <purpose>, epoch[, rank, worker])``:
the same (seed, epoch, rank, world size, workers) gives the same batches, so a run is reproducible and an
interrupted epoch can be replayed. The shard order is the same on every rank (seed + epoch only), so
``split_by_node`` hands each rank a disjoint set of whole shards; ``split_by_worker`` does the same across
DataLoader workers. Without ``resampled`` an epoch sees every sample exactly once (the last batch of each
worker may be short). ``resampled=True`` draws shards with replacement forever (per rank and worker seed) and
``epoch_len`` batches make an epoch: the mode for multi-GPU training, where uneven shard counts per rank
would otherwise make DDP wait on a rank that ran out of data (see docs/mlops-stack.md, WebDataset).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from d2v.data.remote import Location, is_url, join, location, name_of
from d2v.data.shards import (
    LABELS_SUFFIX,
    ShardError,
    check_files,
    derive_seed,
    read_manifest,
    read_shard,
    remote_side_file,
    split_shards,
)
from d2v.data.stages import data_module

Mode = Literal["pretrain", "finetune", "eval"]


def padding_or_none(lengths_B: torch.Tensor, T: int) -> torch.Tensor | None:
    """A collate's ``padding_mask`` [B, T] bool (True past each row's length), or None when every row is
    ``T`` long: batches of equal rows (pretraining's cropped clips and text blocks) then take the
    unmasked attention path (SDPA's fused kernel, a plain softmax) with no mask to build or apply,
    decided here on the host, not by a sync inside the step."""
    if bool((lengths_B == T).all()):
        return None
    return torch.arange(T)[None, :] >= lengths_B[:, None]


def _data(modality: str):
    return data_module(modality)


def _dist(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        return rank, world_size
    if rank is not None or world_size is not None:
        raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _split_labels(shard_dir: Location, split: str) -> list[int] | None:
    """The label id of every sample of ``split`` (its ``.labels.txt``); a transcript split: one class;
    None when the split has neither."""
    if is_url(shard_dir):
        manifest = read_manifest(shard_dir)
        name = f"{split}{LABELS_SUFFIX}"
        if name in manifest["files"]:
            return [int(v) for v in remote_side_file(shard_dir, manifest, name).decode().split()]
        entry = manifest["splits"].get(split)
    else:
        path = Path(shard_dir) / f"{split}{LABELS_SUFFIX}"
        manifest_path = Path(shard_dir) / "manifest.json"
        if path.exists():
            return [int(v) for v in path.read_text().split()]
        entry = json.loads(manifest_path.read_text())["splits"].get(split) if manifest_path.exists() else None
    if not (entry and entry.get("task")):
        return None
    return [0] * entry["samples"]  # transcripts: one class


def within_smallest_class(manifest: dict[str, Any], split: str, budget: int | float | None) -> int | float | None:
    """A per-class budget (an int) cut to the split's smallest class (``label_counts`` in the manifest), so
    that scoring "at most N a class" never asks a class for more than it has; a fraction or None as given."""
    counts = (manifest["splits"].get(split) or {}).get("label_counts") or {}
    return min(budget, *counts.values()) if isinstance(budget, int) and counts else budget


def budget_keys(shard_dir: Location, split: str, label_budget: int | float, seed: int) -> set[str]:
    """Keys of a seeded, class-stratified label budget of ``split``.

    ``int``: that many samples per class; ``float`` in (0, 1]: that fraction of each class (at least one).
    A task split whose targets are not classes (speech CTC: one transcript per sample) is one class: ``int``
    is that many transcribed samples. ValueError when a class has fewer samples than asked, or the split
    has no labels.
    """
    labels = _split_labels(shard_dir, split)
    if labels is None:
        raise ValueError(
            f"label_budget: split {split!r} has no labels ({split}{LABELS_SUFFIX} missing in {shard_dir})"
        )
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    if isinstance(label_budget, bool) or not isinstance(label_budget, (int, float)):
        raise ValueError(
            f"label_budget: expected an int (per class) or a float fraction, got {label_budget!r}"
        )
    rng = random.Random(derive_seed(seed, "label_budget", split))
    keep: list[int] = []
    for c in sorted(by_class):
        idx = by_class[c]
        if isinstance(label_budget, int):
            n = label_budget
            if n < 1:
                raise ValueError(f"label_budget: {n} labels per class; expected >= 1")
            if n > len(idx):
                raise ValueError(
                    f"label_budget: {n} labels per class, but class {c} of split {split!r} has only "
                    f"{len(idx)} samples (smallest class: {min(map(len, by_class.values()))})"
                )
        else:
            if not 0.0 < label_budget <= 1.0:
                raise ValueError(f"label_budget: fraction {label_budget} is not in (0, 1]")
            n = max(1, round(label_budget * len(idx)))
        keep += rng.sample(idx, n)
    return {f"{split}-{i:07d}" for i in keep}


SUBSET_CACHE_MAX = 5000
"""A label budget of at most this many samples keeps its raw samples in memory after the first pass: a few
labels per class are spread over every shard, and re-reading all of them each epoch would take most of a
few-label fine-tuning step (benchmarks/RESULTS.md). Same samples in the same order either way."""
_SUBSET_CACHE: dict[tuple[Location, int], list[dict[str, Any]]] = {}


class ShardStream(IterableDataset):
    """The per-worker sample -> batch pipeline (see the module docstring). Built by :func:`build_loader`."""

    def __init__(self, **spec: Any):
        super().__init__()
        self.spec = spec
        self.epoch = spec["epoch"]

    def _shards(self, wid: int, nw: int) -> Iterator[tuple[Location, int]]:
        s = self.spec
        shards = list(s["shards"])
        if s["resampled"]:
            rng = random.Random(derive_seed(s["seed"], "resample", self.epoch, s["rank"], wid))
            while True:
                yield rng.choice(shards)
        if s["shuffle"]:
            random.Random(derive_seed(s["seed"], "shards", self.epoch)).shuffle(shards)
        yield from shards[s["rank"] :: s["world_size"]][wid::nw]  # split_by_node, then split_by_worker

    def _samples(self, wid: int, nw: int) -> Iterator[dict[str, Any]]:
        keys = self.spec["keys"]
        cache = keys is not None and len(keys) <= SUBSET_CACHE_MAX
        for path, expected in self._shards(wid, nw):
            if cache and (path, self.spec["keys_id"]) in _SUBSET_CACHE:
                yield from _SUBSET_CACHE[path, self.spec["keys_id"]]
                continue
            shard = read_shard(path, expected, self.spec["sha256"].get(path))  # a URL: read whole, checked
            kept = [s for s in shard if keys is None or s["__key__"] in keys]
            if cache:
                _SUBSET_CACHE[path, self.spec["keys_id"]] = kept
            yield from kept

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        size = self.spec["shuffle_buffer"]
        if not self.spec["shuffle"] or size <= 1:
            yield from samples
            return
        buf: list[dict[str, Any]] = []
        for s in samples:
            if len(buf) < size:
                buf.append(s)
                continue
            i = rng.randrange(size)
            buf[i], s = s, buf[i]
            yield s
        rng.shuffle(buf)
        yield from buf

    def _decoded(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        s = self.spec
        data = _data(s["modality"])
        for raw in samples:
            try:
                x = data.decode(raw)
            except Exception as e:  # name the shard and sample, never hang or skip silently
                raise ShardError(
                    f"{raw['__shard__']}: sample {raw['__key__']} cannot be decoded "
                    f"({type(e).__name__}: {e}); "
                    f"re-run `d2v shard {s['modality']}`"
                ) from e
            if s["min_len"] and data.length(x) < s["min_len"]:
                continue  # [FS] min_sample_size: too short for the recipe's masks (pretraining only)
            x = data.transform(
                x, mode=s["mode"], max_len=s["max_len"], rng=rng, augment=s["augment"], prep=s["prep"],
                model_cfg=s["model_cfg"], target=s["target"],
            )  # fmt: skip
            out = {"key": raw["__key__"], "x": x}
            if s["mode"] != "pretrain":
                if "cls" in raw:
                    out["label"] = int(raw["cls"])
                if "transcript.txt" in raw:
                    out["transcript"] = raw["transcript.txt"].decode("utf-8")
            yield out

    def _batches(
        self, samples: Iterator[dict[str, Any]], rng: random.Random
    ) -> Iterator[list[dict[str, Any]]]:
        """Lists of ``batch_size`` samples (the last may be short). With ``length_buckets`` k > 1, pools of
        k batches are sorted by length and cut into batches emitted in (seeded) random order."""
        s = self.spec
        size, k = s["batch_size"], s["length_buckets"]
        pool_size = size * max(1, k)
        pool: list[dict[str, Any]] = []
        for sample in samples:
            pool.append(sample)
            if len(pool) == pool_size:
                yield from self._cut(pool, rng)
                pool = []
        if pool:
            yield from self._cut(pool, rng)

    def _cut(self, pool: list[dict[str, Any]], rng: random.Random) -> Iterator[list[dict[str, Any]]]:
        s = self.spec
        size = s["batch_size"]
        if s["length_buckets"] <= 1:
            yield from (pool[i : i + size] for i in range(0, len(pool), size))
            return
        data = _data(s["modality"])
        pool = sorted(pool, key=lambda b: data.length(b["x"]))
        batches = [pool[i : i + size] for i in range(0, len(pool), size)]
        if s["shuffle"]:
            rng.shuffle(batches)
        yield from batches

    def _collate(self, data: Any, batch: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        s = self.spec
        extra = {"finetune_mask": s["finetune_mask"]} if s["finetune_mask"] is not None else {}
        out = data.collate(
            [b["x"] for b in batch],
            mode=s["mode"],
            model_cfg=s["model_cfg"],
            prep=s["prep"],
            generator=gen,
            **extra,
        )
        if s["mode"] != "pretrain":
            if "label" in batch[0]:
                out["labels"] = torch.tensor([b["label"] for b in batch], dtype=torch.int64)
            if "transcript" in batch[0]:
                out["transcripts"] = [b["transcript"] for b in batch]
        out["keys"] = [b["key"] for b in batch]
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        s = self.spec
        stream = (s["seed"], self.epoch, s["rank"], wid)
        buffer_rng = random.Random(derive_seed(*stream, "buffer"))
        sample_rng = random.Random(derive_seed(*stream, "transform"))
        mask_gen = torch.Generator().manual_seed(derive_seed(*stream, "mask"))
        samples = self._shuffled(self._samples(wid, nw), buffer_rng)
        data = _data(s["modality"])
        for batch in self._batches(self._decoded(samples, sample_rng), buffer_rng):
            yield self._collate(data, batch, mask_gen)


class ShardLoader(wds.WebLoader):
    """A ``webdataset.WebLoader`` over a :class:`ShardStream`; ``set_epoch(e)`` reseeds the next pass."""

    def __init__(self, stream: ShardStream, num_workers: int, manifest: dict[str, Any]):
        super().__init__(stream, batch_size=None, num_workers=num_workers)
        self.stream = stream
        self.manifest = manifest

    def set_epoch(self, epoch: int) -> None:
        """Use seeds of ``epoch`` from the next ``iter()`` on (workers get a fresh copy of the stream)."""
        self.stream.epoch = epoch


@dataclass(frozen=True)
class LoaderSpec:
    """How :func:`build_loader` turns a split into batches: everything but the shards and the model config.

    Arguments that cannot work together (an unknown mode, ``resampled`` without ``epoch_len``) are a
    ValueError here, when the spec is made. ``dataclasses.replace(spec, epoch=e)`` gives the next epoch's.
    """

    batch_size: int
    """Samples per batch (per rank)."""
    mode: Mode
    """'pretrain' -> ``inputs`` (+ ``padding_mask``), ``mask`` (+ text ``student_inputs``);
    'finetune' / 'eval' -> ``inputs`` (+ ``padding_mask``) and ``labels`` int64 [B] or ``transcripts``
    list[str]. Every batch also has ``keys`` (list[str], sample ids). 'eval' never shuffles or augments."""
    seed: int
    """Seeds shard order, shuffle buffer, crops, augmentation and masks (with epoch, rank, worker)."""
    num_workers: int = 0
    """DataLoader worker processes (each reads whole shards)."""
    shuffle_buffer: int = 1000
    """Samples in the per-worker shuffle buffer (pretrain / finetune)."""
    max_len: int | None = None
    """Audio: samples (a seeded random crop in pretrain, the head in finetune for classification; CTC clips
    and eval are never cut); text: tokens (a random window in pretrain, the head otherwise; default
    ``model_cfg.max_positions``); images: ignored."""
    min_len: int | None = None
    """Skip examples shorter than this, in the unit of ``max_len`` (speech pretraining: [FS]
    ``min_sample_size``), before any crop; None keeps all."""
    resampled: bool = False
    """Draw shards with replacement forever (needs ``epoch_len``); for multi-GPU training."""
    epoch_len: int | None = None
    """Batches per epoch (per rank) via ``WebLoader.with_epoch``; None: one pass over the data."""
    label_budget: int | float | None = None
    """Labelled splits only: labels per class (int) or fraction of each class (float), a seeded subset
    independent of the epoch."""
    rank: int | None = None
    """This process's place among data-parallel ranks; None with ``world_size`` None: torch.distributed's."""
    world_size: int | None = None
    """Data-parallel ranks; see ``rank``."""
    epoch: int = 0
    """Seeds this pass (``loader.set_epoch(e)`` changes it for the next ``iter``)."""
    augment: bool | None = None
    """Images: random-resized crop + flip; None means on in 'pretrain' mode only."""
    length_buckets: int = 0
    """k > 1 sorts pools of k batches by length before cutting batches (emitted in seeded random order):
    less padding, and for speech rows of similar length, so ``require_same_masks`` does not trim every
    row's mask to the shortest row's (fairseq instead crops each batch to its shortest clip). 0: off."""
    finetune_mask: Any = None
    """'finetune' mode: a :class:`d2v.modalities.audio.FinetuneMask` -> ``mask`` [B, T] and ``channel_mask``
    [B, D] per batch, for modalities whose ``collate`` takes one (speech)."""

    def __post_init__(self) -> None:
        if self.mode not in get_args(Mode):
            raise ValueError(f"mode {self.mode!r}: expected one of {list(get_args(Mode))}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.resampled and not self.epoch_len:
            raise ValueError("resampled=True streams forever: pass epoch_len (batches per epoch)")


def build_loader(shard_dir: Location, split: str, model_cfg: Any, spec: LoaderSpec) -> ShardLoader:
    """A loader of batches (dicts of tensors) from ``<shard_dir>/<split>-*.tar``, cut as ``spec`` says.

    Every shard it will read and the manifest's side files are first checked against the sha256 the
    manifest records (once per file and process, :func:`d2v.data.shards.check_files`): a corrupt shard is a
    :class:`ShardError` naming it before any batch.

    At a URL (``s3://bucket/prefix/<m>``, any fsspec URL) the manifest and side files are read from it and
    checked, and the folder is listed once: a missing shard, or one of another size, is a ShardError before
    any batch. Each worker then reads whole shards and checks each one's sha256 before parsing it
    (:func:`d2v.data.shards.read_shard`); the loader carries URL strings only, and every worker opens its
    own filesystem object (:mod:`d2v.data.remote`).

    Args:
        shard_dir: ``<paths.shards>/<modality>`` (with ``manifest.json``; the modality is read from it): a
            folder, or a URL (``d2v.data.remote.shard_location``).
        split: ``pretrain``, ``train``, ``valid``, ``test`` (speech also ``ctc_train`` ...).
        model_cfg: the modality's ``ModelConfig`` (masking parameters; checked against the shards' format).
        spec: batch size, mode, seeds, workers, crops, budget, ranks, ... (see :class:`LoaderSpec`).
    """
    mode = spec.mode
    shard_dir = location(shard_dir)
    manifest = read_manifest(shard_dir)
    modality = manifest["modality"]
    entry = manifest["splits"].get(split)
    shards = split_shards(shard_dir, manifest, split)
    if not shards:
        hint = "check the shard params/inputs"
        if split == "pretrain":  # LibriSpeech, class folders: every input has a label or a transcript
            hint = (
                f"is every input labelled? then set shard.{modality}.pretrain_from: unlabelled+labelled and "
                f"re-run `d2v shard {modality}`"
            )
        raise ValueError(f"{shard_dir}: split {split!r} is empty (0 samples); {hint}")
    if mode != "pretrain" and "task" not in entry:
        raise ValueError(
            f"split {split!r} has no labels or transcripts; use mode='pretrain' or a labelled split"
        )
    rank, world_size = _dist(spec.rank, spec.world_size)
    if world_size > 1 and not spec.resampled and len(shards) < world_size:
        raise ValueError(
            f"{split}: {len(shards)} shard(s) for {world_size} ranks: some ranks would get no data. Lower "
            f"shard.{modality}.samples_per_shard, or use resampled=True with epoch_len"
        )
    data = _data(modality)
    if spec.finetune_mask is not None and (mode != "finetune" or not getattr(data, "FINETUNE_MASK", False)):
        raise ValueError(
            f"{modality}: masking while fine-tuning is a speech recipe (wav2vec 2.0 fine-tuning); "
            f"{modality} fine-tunes without it (drop finetune.{modality}.mask)"
            if mode == "finetune"
            else f"finetune_mask needs mode='finetune', got {mode!r}"
        )
    prep = manifest["preprocessing"]
    data.check_model(prep, model_cfg)
    positions = getattr(model_cfg, "max_positions", None)  # a model with a position table (text)
    if spec.max_len is not None and positions is not None and spec.max_len > positions:
        raise ValueError(
            f"{mode}.{modality}.max_len {spec.max_len} is longer than the model's {positions} positions "
            f"(model.{modality}.max_positions, or its init folder's): lower max_len to {positions} or less"
        )
    check_files(shard_dir, manifest, sorted(manifest["files"]))  # labels, tokenizer: before they are read
    keys = None
    if spec.label_budget is not None:
        keys = budget_keys(shard_dir, split, spec.label_budget, spec.seed)
        kept, start = [], 0
        for path, n in shards:  # skip shards that hold none of the kept keys
            if any(f"{split}-{i:07d}" in keys for i in range(start, start + n)):
                kept.append((path, n))
            start += n
        shards = kept
    check_files(shard_dir, manifest, [name_of(path) for path, _ in shards])  # never train on a corrupt shard
    # a URL's shards are checked as each is read, in the worker that reads it: their sha256 travel along
    sha256 = {
        join(shard_dir, s["file"]): s["sha256"] for s in entry["shards"]
    } if is_url(shard_dir) else {}  # fmt: skip
    keys_id = hash(frozenset(keys)) if keys is not None else None
    stream = ShardStream(
        modality=modality,
        shards=shards,
        sha256=sha256,
        keys=keys,
        keys_id=keys_id,
        mode=mode,
        model_cfg=model_cfg,
        prep=prep,
        batch_size=spec.batch_size,
        seed=spec.seed,
        epoch=spec.epoch,
        rank=rank,
        world_size=world_size,
        shuffle=mode != "eval",
        shuffle_buffer=spec.shuffle_buffer,
        resampled=spec.resampled,
        max_len=spec.max_len,
        min_len=spec.min_len,
        augment=(mode == "pretrain") if spec.augment is None else (spec.augment and mode != "eval"),
        target=manifest["tasks"][entry["task"]]["target"] if "task" in entry else None,
        length_buckets=spec.length_buckets,
        finetune_mask=spec.finetune_mask,
    )
    loader = ShardLoader(stream, num_workers=spec.num_workers, manifest=manifest)
    if spec.epoch_len:
        loader = loader.with_epoch(spec.epoch_len)
    return loader
