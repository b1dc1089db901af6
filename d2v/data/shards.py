"""Write a modality's raw data as reproducible WebDataset shards plus ``manifest.json`` (modality-blind).

The shard stage is one loop over splits; everything that depends on the modality comes from its
``d2v/modalities/<m>/data.py`` through these functions (plain module functions, no registry):

``scan(raw_dir, cfg) -> Scan``
    list the raw inputs as :class:`Item` s (metadata only: name, label, transcript, speaker group)
    in pools: ``unlabelled`` and one :class:`Task` per labelled task; inputs that are already known to
    be bad (duplicates, unsupported files) come back as :class:`Skip` s.
``setup(splits, cfg, work_dir, seed) -> ctx``
    anything fitted on the split data before encoding (the text tokenizer, trained on ``pretrain``);
    files it writes into ``work_dir`` end up beside the shards and in the manifest. ``ctx`` is picklable.
``encode(item, ctx) -> list[Encoded]``
    read + convert one input to the payload fields of zero or more samples (text: one per chunk);
    raises :class:`BadInput` for an input to skip.
``preprocessing(ctx, stats) -> dict``
    what inference needs to reproduce the shard-time preprocessing (sample rate; image size/mean/std;
    tokenizer file), given the summed per-split stats.

Determinism: inputs are listed in sorted order, splits come from seeded RNGs derived from one seed, tar
members carry mtime 0, fixed uid/gid/uname/mode (webdataset ``TarWriter(..., mtime=0)``), no field is
gzip'ed, and the manifest has no wall-clock time and sorted keys, so the same inputs and params give
byte-identical shards and manifest.

Failure safety: everything is written into ``.<name>.tmp`` next to the output folder and renamed into place
at the end (:func:`publish_dir`), so a crash never leaves a half-written shard or manifest behind.

Output folder ``<paths.shards>/<m>/``:
- ``<split>-000000.tar`` ...: samples keyed ``<split>-<index>`` (index counts written samples from 0), with the
  modality's payload field(s) (``flac`` / ``png`` / ``ids.npy``), ``cls`` (label id, ASCII) in classification
  splits and ``transcript.txt`` in transcript (CTC) splits;
- ``<split>.labels.txt``: the label id of every sample of a classification split, in key order;
- files from ``setup`` (``tokenizer.json``);
- ``manifest.json``: ``splits.<split>`` = {inputs, samples, stats (summed per-sample stats: images / tokens /
  seconds + hours ...), label_counts, task, shards: [{file, samples, bytes, sha256}]}; ``tasks.<task>`` =
  {target: label | transcript, field, splits, labels (id order) | alphabet}; ``files`` (sha256 of the side
  files); ``preprocessing`` (what inference must repeat); ``skipped`` [{input, kind, reason}] and
  ``skipped_counts``; ``source`` (the raw folder's ``prepare.json``); ``params``; ``seed``; ``info``.

Split names: ``pretrain`` (labels dropped), then per task ``<prefix>train``, ``<prefix>valid``,
``<prefix>test``: prefix '' for classification, ``ctc_`` for speech recognition (``ctc_train`` ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import webdataset as wds
from tqdm import tqdm

from d2v import published
from d2v.config import ConfigError, to_dict
from d2v.data import remote
from d2v.data.remote import Location, is_url, join, name_of, parent_of

MANIFEST = "manifest.json"
FORMAT = "d2v-shards/1"
LABELS_SUFFIX = ".labels.txt"
"""Per labelled split, ``<split>.labels.txt`` holds one label id per line in sample order (label budgets)."""

PretrainFrom = Literal["unlabelled", "unlabelled+labelled"]


# --------------------------------------------------------------------------------------------- data types


class BadInput(ValueError):
    """An input the shard stage skips (``strict: false``) or rejects (``strict: true``).

    ``kind`` is a short category counted in the manifest (``unreadable``, ``unsupported_format``,
    ``too_short``, ``silent``, ``empty``, ``not_utf8``, ``duplicate``, ``decode_error`` ...).
    """

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def item_file(path: str | Path, what: str) -> Path:
    """``path`` when it is a file; else an error naming it (``embed`` never treats a missing path as data).

    ``what`` names the expected content for the message ("audio file", "image file", "text file").
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {what}")
    if not path.is_file():
        raise ValueError(f"{path}: not a {what} ({'a directory' if path.is_dir() else 'not a regular file'})")
    return path


@dataclass(frozen=True)
class Item:
    """One raw input, as metadata; ``ref`` is the modality's handle to the payload (path, array index ...)."""

    name: str
    """Stable, human-readable source name (a path relative to the raw folder, ``file.jsonl:12`` ...)."""
    ref: Any
    label: str | None = None
    transcript: str | None = None
    group: str | None = None
    """Splits keep groups disjoint (speakers); None: the item is its own group."""


@dataclass(frozen=True)
class Skip:
    """A skipped input and why (recorded in ``manifest.json``)."""

    input: str
    kind: str
    reason: str


@dataclass
class Task:
    """A labelled pool and how it is split into ``<prefix>train``, ``<prefix>valid``, ``<prefix>test``."""

    items: list[Item]
    target: Literal["label", "transcript"]
    prefix: str = ""
    """Split-name prefix: '' for the classification task, 'ctc_' for speech recognition."""
    test_items: list[Item] | None = None
    """A fixed test set (Fashion-MNIST t10k); None: the test split is carved from ``items``."""
    labels: list[str] | None = None
    """Label order (id = position) when the source defines one (Fashion-MNIST); None: sorted labels."""


@dataclass
class Scan:
    """What ``scan`` found in the raw folder."""

    unlabelled: list[Item] = field(default_factory=list)
    tasks: dict[str, Task] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    """Extra manifest facts from the modality (e.g. how many duplicates were removed)."""


class Encoded(NamedTuple):
    """One sample's payload fields (tar member suffix -> bytes) and its stats (summed per split)."""

    fields: dict[str, bytes]
    stats: dict[str, float | list[float]]


@dataclass(frozen=True)
class ShardCommon:
    """Shard params every modality has (each modality's ``ShardConfig`` adds its own fields)."""

    samples_per_shard: int = 1000
    """Samples per tar shard. Use enough shards for ranks x workers (each reads whole shards)."""
    shard_bytes: int = 256 * 2**20
    """Start a new shard after this many payload bytes (whichever of the two limits comes first)."""
    valid: float = 0.1
    """Fraction of each labelled pool (of its speaker groups, when it has groups) held out for validation."""
    test: float = 0.2
    """Fraction held out for testing; ignored when the source brings its own test set (Fashion-MNIST)."""
    max_train: int | None = None
    """Cap on the labelled train split(s) (class-balanced seeded subset; pretraining still sees the rest);
    None keeps all."""
    max_pretrain: int | None = None
    """Cap on the pretrain split (seeded subset); None keeps all."""
    pretrain_from: PretrainFrom = "unlabelled"
    """'unlabelled': only unlabelled inputs; 'unlabelled+labelled': also the train/valid inputs of the
    labelled tasks, labels dropped (never test)."""
    pretrain_tasks: tuple[str, ...] | None = None
    """With 'unlabelled+labelled', the labelled tasks whose train/valid inputs join pretraining (e.g.
    ``[classification]``); None: every task. A task left out is probed on inputs pretraining never saw."""
    strict: bool = False
    """True: a bad input (corrupt, unsupported, empty, silent ...) is an error naming the file, not a skip."""
    workers: int = 1
    """Processes that encode inputs (decode, resample, FLAC/PNG); sample order does not depend on it."""
    preprocess_like: str | None = None
    """A Hugging Face data2vec folder or a d2v checkpoint whose preprocessing the shards take instead of
    their own (text: its tokenizer; images: its size, resize and mean/std; audio: its sample rate and
    normalisation), so that a run starting from it (``pretrain.<m>.init``) sees inputs as it was trained
    on. The manifest records it. None: ``pretrain.<m>.init``'s folder when that is set, else the
    modality's own preprocessing."""

    def __post_init__(self) -> None:
        # messages name keys relative to this section; from_dict puts the section's path in front
        for name in ("samples_per_shard", "shard_bytes", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0.0 <= self.valid < 1.0 and 0.0 <= self.test < 1.0 and self.valid + self.test < 1.0):
            raise ConfigError(
                f"valid ({self.valid}) and test ({self.test}) must be fractions in [0, 1) summing to < 1"
            )
        for name in ("max_train", "max_pretrain"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 or null (all), got {v}")


# ------------------------------------------------------------------------------------------- determinism


def files_under(root: Path) -> list[Path]:
    """Every file under ``root``, sorted as ``sorted(root.rglob("*"))`` sorts them, with symlinked folders
    followed (``rglob`` leaves them out, so a class folder linked into a dataset would vanish silently). Each
    real folder is read once, the first time the sorted walk meets it: a link back up the tree is no loop,
    and one folder linked twice gives its files once. Paths keep the names under ``root``."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()  # a deterministic walk decides which name a twice-linked folder is read under
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        out += [Path(dirpath, f) for f in filenames]
    return sorted(p for p in out if p.is_file())


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed from ``seed`` and names (stable across runs and machines, unlike ``hash``)."""
    h = hashlib.sha256(repr((seed, *names)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def rng_for(seed: int, *names: object) -> random.Random:
    return random.Random(derive_seed(seed, *names))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent, trailing newline)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- splitting


def _balanced_order(items: Sequence[Item], rng: random.Random) -> list[Item]:
    """Items shuffled within each label, then interleaved label by label (a prefix is class-balanced)."""
    by_label: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_label[it.label or ""].append(it)
    queues = []
    for label in sorted(by_label):
        q = list(by_label[label])
        rng.shuffle(q)
        queues.append(q)
    out: list[Item] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def _at_least_one(n: int, test: float, valid: float) -> tuple[int, int]:
    """``(n_test, n_valid)`` of ``n`` groups or items: the rounded fractions, raised to one where a fraction
    is above zero and at least one is left for train."""
    n_test, n_valid = round(test * n), round(valid * n)
    if test > 0 and n_test == 0 and n - n_valid >= 2:
        n_test = 1
    if valid > 0 and n_valid == 0 and n - n_test >= 2:
        n_valid = 1
    return n_test, n_valid


def split_pool(
    items: Sequence[Item], valid: float, test: float, rng: random.Random, stratify: bool
) -> tuple[list[Item], list[Item], list[Item]]:
    """``(train, valid, test)`` of a labelled pool.

    With groups (speakers), whole groups go to one split: sorted groups are shuffled and the first
    ``round(test * n_groups)`` form test, the next ``round(valid * n_groups)`` valid. Without groups and
    with ``stratify``, each label is split in the same proportions; otherwise items are split at random.
    A fraction above zero that rounds to nothing still gets one group (or one item, from the largest
    label) while train keeps at least one: with 5 speakers, ``valid: 0.1`` is one speaker, not an empty
    split that the evaluate stage cannot use.
    """
    if not items:
        return [], [], []
    if any(it.group is not None for it in items):
        groups = sorted({it.group if it.group is not None else f"\0{it.name}" for it in items})
        rng.shuffle(groups)
        n_test, n_valid = _at_least_one(len(groups), test, valid)
        role = {g: "test" for g in groups[:n_test]}
        role.update({g: "valid" for g in groups[n_test : n_test + n_valid]})
        out: dict[str, list[Item]] = {"train": [], "valid": [], "test": []}
        for it in items:
            out[role.get(it.group if it.group is not None else f"\0{it.name}", "train")].append(it)
        return out["train"], out["valid"], out["test"]
    strata: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        strata[(it.label or "") if stratify else ""].append(it)
    counts = {key: (round(test * len(s)), round(valid * len(s))) for key, s in strata.items()}
    largest = max(sorted(strata), key=lambda key: len(strata[key]))  # the first of the largest labels
    n_test, n_valid = _at_least_one(len(strata[largest]), test, valid)
    if not any(c[0] for c in counts.values()):
        counts[largest] = (n_test, counts[largest][1])
    if not any(c[1] for c in counts.values()):
        counts[largest] = (counts[largest][0], n_valid)
    tr, va, te = [], [], []
    for key in sorted(strata):
        s = list(strata[key])
        rng.shuffle(s)
        n_test, n_valid = counts[key]
        te += s[:n_test]
        va += s[n_test : n_test + n_valid]
        tr += s[n_test + n_valid :]
    return tr, va, te


def plan_splits(scan: Scan, cfg: ShardCommon, seed: int) -> dict[str, list[Item]]:
    """Seeded splits of every pool, in writing order: ``pretrain`` then each task's train/valid/test.

    Each split's items are shuffled (so every shard mixes sources); labels are dropped in ``pretrain``.
    With ``unlabelled+labelled``, pretraining takes each input of the tasks' train and valid splits once
    (an input with a label and a transcript is in both tasks; only the tasks of ``pretrain_tasks`` when it
    is set) and none that any task holds out for test.
    """
    splits: dict[str, list[Item]] = {}
    extra_pretrain: list[Item] = []
    held_out: set[str] = set()
    for name in sorted(scan.tasks):
        task = scan.tasks[name]
        stratify = task.target == "label"
        test_frac = 0.0 if task.test_items is not None else cfg.test
        tr, va, te = split_pool(task.items, cfg.valid, test_frac, rng_for(seed, "split", name), stratify)
        if task.test_items is not None:
            te = list(task.test_items)
        held_out.update(it.name for it in te)
        joins = cfg.pretrain_tasks is None or name in cfg.pretrain_tasks
        if cfg.pretrain_from == "unlabelled+labelled" and joins:
            extra_pretrain += tr + va  # before the max_train cap: that cap is about labels
        if cfg.max_train is not None and len(tr) > cfg.max_train:
            order = _balanced_order(tr, rng_for(seed, "max_train", name)) if stratify else list(tr)
            if not stratify:
                rng_for(seed, "max_train", name).shuffle(order)
            tr = order[: cfg.max_train]
        for split, part in (("train", tr), ("valid", va), ("test", te)):
            splits[task.prefix + split] = part
    extra_pretrain = [it for it in {it.name: it for it in extra_pretrain}.values() if it.name not in held_out]
    pretrain = [replace(it, label=None, transcript=None) for it in list(scan.unlabelled) + extra_pretrain]
    rng_for(seed, "pretrain").shuffle(pretrain)
    if cfg.max_pretrain is not None:
        pretrain = pretrain[: cfg.max_pretrain]
    out = {"pretrain": pretrain}
    for split, part in splits.items():
        part = list(part)
        rng_for(seed, "order", split).shuffle(part)
        out[split] = part
    return out


# ------------------------------------------------------------------------------------------------ writing


class SplitWriter:
    """Rotating tar writer for one split: ``<split>-000000.tar`` ... with fixed tar metadata.

    Uses webdataset's ``TarWriter(..., mtime=0)`` (fixed mtime, uname/gname 'bigdata', mode 0444, USTAR)
    and records every closed shard's sample count, size and sha256.
    """

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int, shard_bytes: int):
        self.out_dir, self.split = out_dir, split
        self.samples_per_shard, self.shard_bytes = samples_per_shard, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._count = self._bytes = 0
        self.total = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._path = self.out_dir / name
        self._tar = wds.TarWriter(str(self._path), encoder=False, mtime=0, compress=False)
        self._count = self._bytes = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        self.shards.append(
            {
                "file": self._path.name,
                "samples": self._count,
                "bytes": self._path.stat().st_size,
                "sha256": sha256_file(self._path),
            }
        )

    def write(self, fields: dict[str, bytes]) -> str:
        """Write one sample; returns its key (``<split>-<index>``, unique within the shard folder)."""
        if self._tar is None or self._count >= self.samples_per_shard or self._bytes >= self.shard_bytes:
            self._close()
            self._open()
        key = f"{self.split}-{self.total:07d}"
        assert self._tar is not None
        self._bytes += self._tar.write({"__key__": key, **fields})
        self._count += 1
        self.total += 1
        return key

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


def _add_stats(acc: dict[str, Any], stats: dict[str, Any]) -> None:
    for k, v in stats.items():
        if isinstance(v, (list, tuple)):
            cur = acc.get(k) or [0.0] * len(v)
            acc[k] = [a + b for a, b in zip(cur, v)]
        else:
            acc[k] = acc.get(k, 0) + v


_WORKER: dict[str, Any] = {}


def _init_worker(encode: Callable, ctx: Any) -> None:
    _WORKER["encode"], _WORKER["ctx"] = encode, ctx


def _init_process(encode: Callable, ctx: Any) -> None:
    import torch

    torch.set_num_threads(1)  # parallelism comes from the processes; threads would oversubscribe the cores
    _init_worker(encode, ctx)


def clean_reason(reason: str, item: Item) -> str:
    """A skip reason without machine-specific text (absolute paths, object addresses): manifests must be
    identical wherever the raw folder lives."""
    refs = item.ref if isinstance(item.ref, (tuple, list)) else (item.ref,)
    for r in refs:
        # only absolute paths are machine-specific; a ref's other strings are tags ("file", "jsonl") that
        # also occur as ordinary words in reasons ("cannot identify image file ...")
        if isinstance(r, str) and os.path.isabs(r):
            reason = reason.replace(r, item.name)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", reason)


def _encode_safely(item: Item) -> list[Encoded] | Skip:
    try:
        return _WORKER["encode"](item, _WORKER["ctx"])
    except BadInput as e:
        return Skip(item.name, e.kind, clean_reason(e.reason, item))


@contextlib.contextmanager
def encoder_pool(
    encode: Callable, ctx: Any, workers: int, window: int = 256
) -> Iterator[Callable[[Sequence[Item]], Iterator[tuple[Item, list[Encoded] | Skip]]]]:
    """A function ``items -> (item, encoded samples or Skip)`` in input order.

    ``workers > 1`` encodes in a pool of *spawned* processes: forking after torch has run its OpenMP
    thread pool can deadlock the children. Results are consumed window by window so memory stays flat in
    the number of inputs.
    """
    if workers <= 1:
        _init_worker(encode, ctx)
        yield lambda items: ((it, _encode_safely(it)) for it in items)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_process, (encode, ctx)) as pool:

        def run(items: Sequence[Item]) -> Iterator[tuple[Item, list[Encoded] | Skip]]:
            for start in range(0, len(items), window):
                chunk = items[start : start + window]
                yield from zip(chunk, pool.imap(_encode_safely, chunk, chunksize=4))

        yield run


def _strict_error(skip: Skip) -> ValueError:
    return ValueError(
        f"{skip.input}: {skip.reason} (shard.strict is true; fix or remove the file, or set strict: false "
        "to skip such inputs and count them in manifest.json)"
    )


def write_splits(
    splits: dict[str, list[Item]],
    tasks: dict[str, Task],
    encode: Callable,
    ctx: Any,
    out_dir: Path,
    cfg: ShardCommon,
    pack: Callable | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[Skip]]:
    """Encode and write every split, the ``pretrain`` split's samples through ``pack(samples, ctx)`` (the
    modality's ``pack``); returns ``(split manifest entries, label maps per task, skips)``."""
    label_maps: dict[str, dict[str, Any]] = {}
    split_task: dict[str, tuple[str, Task]] = {}
    for name, task in tasks.items():
        every = task.items + (task.test_items or [])
        if task.target == "label":
            labels = task.labels if task.labels is not None else sorted({it.label for it in every})
            label_maps[name] = {"target": "label", "field": "cls", "labels": list(labels)}
        else:
            chars = sorted({c for it in every for c in (it.transcript or "")})
            label_maps[name] = {"target": "transcript", "field": "transcript.txt", "alphabet": "".join(chars)}
        label_maps[name]["splits"] = [task.prefix + s for s in ("train", "valid", "test")]
        for s in label_maps[name]["splits"]:
            split_task[s] = (name, task)

    entries: dict[str, Any] = {}
    skipped: list[Skip] = []
    with encoder_pool(encode, ctx, cfg.workers) as run:
        for split, items in splits.items():
            packer = pack if split == "pretrain" and pack is not None else None
            entries[split] = _write_split(
                split, items, run, split_task, label_maps, out_dir, cfg, skipped, packer, ctx
            )
    return entries, label_maps, skipped


def _write_split(
    split: str,
    items: list[Item],
    run: Callable,
    split_task: dict[str, tuple[str, Task]],
    label_maps: dict[str, dict[str, Any]],
    out_dir: Path,
    cfg: ShardCommon,
    skipped: list[Skip],
    pack: Callable | None = None,
    ctx: Any = None,
) -> dict[str, Any]:
    """Encode and write one split (appending its skips to ``skipped``), its samples through
    ``pack(samples, ctx)`` when given; returns its manifest entry."""
    task_name, task = split_task.get(split, (None, None))
    label_ids = {}
    if task is not None and task.target == "label":
        label_ids = {lab: i for i, lab in enumerate(label_maps[task_name]["labels"])}
    writer = SplitWriter(out_dir, split, cfg.samples_per_shard, cfg.shard_bytes)
    stats: dict[str, Any] = {}
    label_lines: list[str] = []
    label_counts: Counter[str] = Counter()
    n_inputs = 0
    bar = tqdm(total=len(items), desc=f"shard {split}", unit="input", file=sys.stderr, mininterval=1.0)

    def samples() -> Iterator[Encoded]:
        nonlocal n_inputs
        for item, result in run(items):
            bar.update(1)
            if isinstance(result, Skip):
                if cfg.strict:
                    bar.close()
                    raise _strict_error(result)
                skipped.append(result)
                continue
            n_inputs += 1
            for enc in result:
                fields = dict(enc.fields)
                if task is not None and task.target == "label":
                    assert item.label is not None, item
                    fields["cls"] = str(label_ids[item.label]).encode("ascii")
                    label_lines.append(fields["cls"].decode())
                    label_counts[item.label] += 1
                elif task is not None:
                    fields["transcript.txt"] = (item.transcript or "").encode("utf-8")
                yield Encoded(fields, enc.stats)

    for enc in samples() if pack is None else pack(samples(), ctx):
        writer.write(enc.fields)
        _add_stats(stats, enc.stats)
    bar.close()
    shards = writer.close()
    entry: dict[str, Any] = {"inputs": n_inputs, "samples": writer.total, "shards": shards, "stats": stats}
    if label_ids:
        (out_dir / f"{split}{LABELS_SUFFIX}").write_text("".join(s + "\n" for s in label_lines))
        entry["label_counts"] = dict(sorted(label_counts.items()))
    if task is not None:
        entry["task"] = task_name
    return entry


def unpacked(samples: Iterable[Encoded], ctx: Any) -> Iterator[Encoded]:
    """A modality's ``pack`` that writes the pretrain split's samples as they are (an input is a sample)."""
    return iter(samples)


# ------------------------------------------------------------------------------------------- publishing


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh ``.<name>.tmp`` beside ``final``; renamed onto ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)


def publish_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` with renames (the old folder is removed only after the swap)."""
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def write_shards(
    data: Any, raw_dir: Path, out_dir: Path, cfg: ShardCommon, seed: int, modality: str
) -> dict[str, Any]:
    """The shard stage: scan ``raw_dir`` with modality module ``data``, split, encode, write, publish.

    Returns the manifest (also written to ``out_dir/manifest.json``).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: no raw data; run `d2v prepare {modality}` first")
    # checked before any work: a folder that is not a data2vec model of this modality stops here
    like = published.source(cfg.preprocess_like, modality, f"shard.{modality}.preprocess_like") if (
        cfg.preprocess_like is not None
    ) else None  # fmt: skip
    scan = data.scan(raw_dir, cfg)
    if cfg.strict and scan.skipped:
        raise _strict_error(scan.skipped[0])
    unknown = sorted(set(cfg.pretrain_tasks or ()) - set(scan.tasks))
    if unknown:
        raise ConfigError(
            f"shard.{modality}.pretrain_tasks names {unknown}, but {raw_dir} has no labelled pool for them; "
            f"its tasks are {sorted(scan.tasks)}"
        )
    splits = plan_splits(scan, cfg, seed)
    with staging_dir(out_dir) as tmp:
        ctx = data.setup(splits, cfg, tmp, seed)
        entries, label_maps, skipped = write_splits(splits, scan.tasks, data.encode, ctx, tmp, cfg, data.pack)
        # an input can be in two splits (pretrain + train): record each skip once
        all_skipped = sorted(set(scan.skipped + skipped), key=lambda s: (s.input, s.kind, s.reason))
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file() and not p.name.endswith(".tar")
        }
        prepared = raw_dir / "prepare.json"
        manifest = {
            "format": FORMAT,
            "modality": modality,
            "seed": seed,
            "params": to_dict(cfg),
            "source": json.loads(prepared.read_text()) if prepared.exists() else None,
            "splits": entries,
            "tasks": label_maps,
            "files": files,
            "preprocessing": data.preprocessing(ctx, {s: e["stats"] for s, e in entries.items()}),
            "preprocess_like": like.record() if like is not None else None,
            "skipped": [{"input": s.input, "kind": s.kind, "reason": s.reason} for s in all_skipped],
            "skipped_counts": dict(sorted(Counter(s.kind for s in all_skipped).items())),
            "info": scan.info,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ reading


def _checked_format(manifest: dict[str, Any], where: Location, modality: str) -> dict[str, Any]:
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}; "
            f"re-run `d2v shard {manifest.get('modality', modality)}`"
        )
    return manifest


def read_manifest(shard_dir: Location) -> dict[str, Any]:
    """The manifest of a shard folder or URL; a clear error when it is missing or of another format."""
    if is_url(shard_dir):
        url = join(shard_dir, MANIFEST)
        try:
            raw = remote.read_bytes(url)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{url} not found: no shards at {shard_dir}; publish a shard folder there with "
                f"`d2v shard {name_of(shard_dir)} --to {parent_of(shard_dir)}`"
            ) from None
        return _checked_format(json.loads(raw.decode("utf-8")), url, name_of(shard_dir))
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: no shards in {shard_dir}; run `d2v shard {shard_dir.name}` first"
        )
    return _checked_format(json.loads(path.read_text(encoding="utf-8")), path, shard_dir.name)


def split_shards(shard_dir: Location, manifest: dict[str, Any], split: str) -> list[tuple[Location, int]]:
    """``[(shard path or URL, sample count)]`` of ``split``; ValueError listing the splits that exist."""
    if split not in manifest["splits"]:
        raise ValueError(f"{shard_dir}: no split {split!r}; the manifest has {sorted(manifest['splits'])}")
    return [(join(shard_dir, s["file"]), s["samples"]) for s in manifest["splits"][split]["shards"]]


_VERIFIED: dict[tuple[str, int, int, int, int], str] = {}
"""(path, device, inode, size, mtime_ns) -> the sha256 this process computed for that file."""


def rebuild_hint(modality: str) -> str:
    return f"rebuild the shards with `dvc repro -f shard@{modality}` (or `d2v shard {modality}`)"


def check_files(shard_dir: Location, manifest: dict[str, Any], names: Iterable[str]) -> None:
    """Check files of a shard folder against the sha256 its manifest records: :class:`ShardError` naming
    the first one that is missing or differs, and how to rebuild it. A URL: :func:`check_remote`.

    Each file is hashed once per process (the stages rebuild their loader every epoch), again only when it
    changed: the memo is keyed by (path, inode, size, mtime_ns). No cache file outlives the process: one
    would trust exactly what silent corruption leaves unchanged (size, mtime), and the shard folder is a
    DVC output that holds only what the shard stage wrote. The cost is one read per file and stage
    process (sha256 runs at about 1 GB/s on one core).
    """
    if is_url(shard_dir):
        check_remote(shard_dir, manifest, names)
        return
    shard_dir = Path(shard_dir)
    expected = {s["file"]: s["sha256"] for e in manifest["splits"].values() for s in e["shards"]}
    expected.update({name: f["sha256"] for name, f in manifest["files"].items()})
    for name in names:
        path = shard_dir / name
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ShardError(
                f"{path}: missing (manifest.json lists it); {rebuild_hint(manifest['modality'])}"
            ) from None
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            _VERIFIED[key] = sha256_file(path)
        if _VERIFIED[key] != expected[name]:
            raise ShardError(
                f"{path}: sha256 differs from manifest.json (corrupt or modified shard); "
                f"{rebuild_hint(manifest['modality'])}"
            )


def verify_shards(shard_dir: Path) -> None:
    """Check every shard and side file against the sha256 in the manifest (:class:`ShardError` naming it)."""
    manifest = read_manifest(shard_dir)
    names = [s["file"] for e in manifest["splits"].values() for s in e["shards"]]
    check_files(shard_dir, manifest, sorted([*names, *manifest["files"]]))


def manifest_sha256(shard_dir: Location) -> str:
    """sha256 of ``manifest.json`` (a run's data fingerprint): the same for a folder and its published copy,
    so a run resumes whether it reads the shards from the folder or from their URL."""
    if is_url(shard_dir):
        return hashlib.sha256(remote.read_bytes(join(shard_dir, MANIFEST))).hexdigest()
    return sha256_file(Path(shard_dir) / MANIFEST)


def preprocessing_files(manifest: dict[str, Any], shard_dir: Location) -> dict[str, Path | bytes]:
    """Files the manifest's preprocessing section names (e.g. the tokenizer), copied into each checkpoint:
    paths in a folder; from a URL, their checked bytes (:func:`remote_side_file`)."""
    prep = manifest.get("preprocessing") or {}
    if is_url(shard_dir):
        names = [v for v in prep.values() if isinstance(v, str) and v in manifest["files"]]
        return {Path(v).name: remote_side_file(shard_dir, manifest, v) for v in names}
    return {
        Path(v).name: shard_dir / v for v in prep.values() if isinstance(v, str) and (shard_dir / v).is_file()
    }


# ------------------------------------------------------------------------------- shards at a URL (fsspec)


def publish_hint(shard_url: str) -> str:
    """What to do about a missing or damaged object under the shard URL ``<root>/<m>``."""
    return (
        f"publish the shard folder again with `d2v shard {name_of(shard_url)} --to {parent_of(shard_url)}` "
        "(docs/recipes.md, Shards in object storage)"
    )


def fetch_verified(url: str, sha256: str) -> bytes:
    """The whole object at ``url``, once its sha256 is the one the manifest records.

    A mismatch is read once more (a read garbled on the way), then it is a :class:`ShardError` naming the
    URL. The object store's own checksums cannot stand in: for a multipart upload S3's ETag (and checksum)
    is computed per part, not over the file.
    """
    shard_url = str(url).rsplit("/", 1)[0]
    for _ in range(2):
        try:
            data = remote.read_bytes(url)
        except FileNotFoundError:
            raise ShardError(f"{url}: missing (manifest.json lists it); {publish_hint(shard_url)}") from None
        except OSError as e:
            raise ShardError(
                f"{url}: cannot be read ({type(e).__name__}: {e}); check the URL and the store's credentials "
                "(AWS_* variables for S3)"
            ) from e
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
    raise ShardError(
        f"{url}: sha256 differs from manifest.json on two reads (corrupt or modified object); "
        f"{publish_hint(shard_url)}"
    )


_FETCHED: dict[tuple[str, str], bytes] = {}
"""(URL, sha256) -> the checked bytes of a side file (labels, tokenizer: small), read once per process."""


def remote_side_file(shard_url: str, manifest: dict[str, Any], name: str) -> bytes:
    """The checked bytes of the side file ``name`` (a key of the manifest's ``files``) under ``shard_url``."""
    key = (str(join(shard_url, name)), manifest["files"][name]["sha256"])
    if key not in _FETCHED:
        _FETCHED[key] = fetch_verified(*key)
    return _FETCHED[key]


def check_remote(shard_url: str, manifest: dict[str, Any], names: Iterable[str]) -> None:
    """:func:`check_files` for a URL, before any batch: side files are read whole and checked against their
    sha256; the shards are listed (one listing of the folder) and each must be there with the manifest's
    size. :class:`ShardError` naming the object and what to do.

    A shard's sha256 is checked when a loader worker reads it (:func:`read_shard`), not here: hashing every
    shard up front would download the split twice.
    """
    files = manifest["files"]
    names = list(names)
    for name in names:
        if name in files:
            remote_side_file(shard_url, manifest, name)
    shards = [n for n in names if n not in files]
    if not shards:
        return
    listed = remote.list_sizes(shard_url)
    size = {s["file"]: s.get("bytes") for e in manifest["splits"].values() for s in e["shards"]}
    for name in shards:
        url = join(shard_url, name)
        if name not in listed:
            raise ShardError(f"{url}: missing (manifest.json lists it); {publish_hint(shard_url)}")
        if size[name] is not None and listed[name] != size[name]:
            raise ShardError(
                f"{url}: {listed[name]} bytes, manifest.json says {size[name]} (an unfinished or other "
                f"upload); {publish_hint(shard_url)}"
            )


def read_shard(path: Location, expected: int | None, sha256: str | None) -> Iterator[dict[str, Any]]:
    """Samples of one shard (:func:`iter_shard`). At a URL the object is read whole and checked against
    ``sha256`` first: no sample of a shard that differs from the manifest is ever parsed."""
    if not is_url(path):
        return iter_shard(path, expected)
    assert sha256 is not None, "a shard URL is read with its manifest sha256"
    return iter_shard(path, expected, content=fetch_verified(str(path), sha256))


def publish_shards(shard_dir: Path, shard_url: str) -> list[str]:
    """Upload the shard folder ``shard_dir`` to ``shard_url`` under the same plain names; returns them.

    Every file is checked against the manifest first (:func:`verify_shards`): a damaged shard is never
    published. The tars go first, the side files next and ``manifest.json`` last, so a new reader that
    finds the manifest finds every object it lists; then the URL is checked as a loader will check it.
    Objects already there that the manifest does not list are left alone (no reader opens them).
    """
    shard_dir = Path(shard_dir)
    verify_shards(shard_dir)
    manifest = read_manifest(shard_dir)
    shards = [s["file"] for e in manifest["splits"].values() for s in e["shards"]]
    names = [*shards, *sorted(manifest["files"]), MANIFEST]
    for name in names:
        remote.upload(shard_dir / name, str(join(shard_url, name)))
    check_remote(shard_url, manifest, [*shards, *sorted(manifest["files"])])
    return names


class ShardError(ValueError):
    """A shard that cannot be read as written (corrupt, truncated, missing); the message names it.

    A ValueError so the CLI prints the message instead of a traceback.
    """


def iter_shard(
    path: Location, expected: int | None = None, content: bytes | None = None
) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard as ``{"__key__", "__shard__", <suffix>: bytes}``, in file order.

    Members are grouped by key (the basename up to its first dot). Any read error, or a sample count that
    differs from ``expected`` (a shard cut at a member boundary reads as a shorter valid tar), raises
    :class:`ShardError` naming the shard. ``content``: the shard's bytes, already read (``path`` then only
    names them).
    """
    n = 0
    current: dict[str, Any] | None = None
    try:
        f = open(path, "rb") if content is None else io.BytesIO(content)  # noqa: SIM115 (closed by the with)
        with f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                key, dot, suffix = base.partition(".")
                if not dot:
                    continue
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if current is None or current["__key__"] != key:
                    if current is not None:
                        n += 1
                        yield current
                    current = {"__key__": key, "__shard__": str(path)}
                current[suffix.lower()] = data
                tar.members = []  # streaming: do not keep every TarInfo
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ShardError(f"{path}: corrupt or truncated shard ({e}); re-run `d2v shard`") from e
    if current is not None:
        n += 1
        yield current
    if expected is not None and n != expected:
        raise ShardError(
            f"{path}: {n} samples read, manifest.json says {expected} (truncated or corrupt shard); "
            "re-run `d2v shard`"
        )
