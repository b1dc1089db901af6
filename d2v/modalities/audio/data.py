"""Speech: raw audio (espeak-ng synthesis + KLettres/KTuberling recordings, or the user's folder), 16 kHz
FLAC shard samples, decode, crop and collate with span masking.

Raw layout under ``<paths.raw>/audio/`` (the default data is written in the same layout as a user's):
- ``files/**.{wav,flac,ogg}``: audio files, any sample rate and channel count;
- ``metadata.tsv`` (optional): tab-separated with a header row: ``path`` (relative to ``files/``) and at least
  one of ``label`` (classification) / ``transcript`` (CTC), optionally ``speaker`` (splits keep speakers
  disjoint). Files not listed, or listed with neither, are unlabelled (pretraining).
Default (docs/datasets.md, Speech): ``files/read/`` Lee-corpus sentences read by espeak-ng voices,
``files/klettres/`` and ``files/ktuberling/`` (real voices, Debian ``klettres-data`` / ``ktuberling-data``),
``files/digits/<voice>/`` spoken digits (label ``0``-``9``, speaker = accent + variant),
``files/ctc/<voice>/`` digit strings with word transcripts ("three one four").
A user's LibriSpeech tree (``<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` beside
``<speaker>-<chapter>.trans.txt``, any folders above) needs no TSV: ``prepare`` writes ``metadata.tsv`` from
the transcripts (lower-cased: CTC letters) and the speaker ids (``librispeech_rows``).

Shard: each file is read with soundfile, downmixed to mono, resampled to 16 kHz with
``torchaudio.functional.resample`` and stored as 16-bit FLAC (``flac``; lossless for 16-bit sources).
Unreadable files, unsupported formats, clips shorter than 400 samples (the encoder's receptive field) and
all-zero clips are skipped and counted. Splits: ``pretrain``; ``train``/``valid``/``test`` (digit
classification, ``cls``) and ``ctc_train``/``ctc_valid``/``ctc_test`` (digit strings, ``transcript.txt``),
both split by speaker.

With ``shard.audio.preprocess_like`` (a published model's folder) the manifest records whether that model
normalises each utterance (``normalize``: its ``Wav2Vec2FeatureExtractor``'s ``do_normalize``, or the d2v
checkpoint's recorded entry); its sampling rate must be 16 kHz (:func:`like_preprocessing`).

Batches: ``inputs`` float [B, N] (per-utterance zero mean / unit variance when the manifest's ``normalize``
says so; manifests without it: when the model's ``normalize_waveform`` is on), ``padding_mask`` bool [B, N]
(True = padding); pretrain adds ``mask`` [B, T frames] from the audio ``make_mask``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch import Tensor
from tqdm import tqdm

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
    unpacked,
)
from d2v.data.stages import PrepareCommon, copy_source
from d2v.modalities.audio.frames import SAMPLE_RATE, normalize_waveform

MIN_SAMPLES = 400
"""Shorter clips are skipped: the 7-layer conv encoder needs 400 samples (25 ms) for one frame (§2.2)."""
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
    "en-us-nyc",
)  # fmt: skip
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
KLETTRES_DIR = Path("/usr/share/klettres")
KTUBERLING_DIR = Path("/usr/share/ktuberling/sounds")

__all__ = [
    "PrepareConfig", "ShardConfig", "load_audio", "to_waveform", "inference_inputs", "digit_voices",
    "like_preprocessing",
]  # fmt: skip

STRING_ITEMS = False
"""A ``str`` item given to ``embed`` is a file path (only text reads strings as content)."""


@dataclass(frozen=True)
class PrepareConfig(PrepareCommon):
    """The ``prepare.audio`` section (all but ``source``/``metadata``/``workers`` size the default data)."""

    metadata: str | None = None
    """User data: a TSV with header ``path``, ``label`` and/or ``transcript``, optional ``speaker``."""
    sentences: int = 600
    """Lee-corpus sentences read by espeak-ng for pretraining (2,619 available; ~7 s each)."""
    sentence_voices: tuple[str, ...] = (
        "en-us+m3",
        "en-gb+f2",
        "en-gb-scotland+m5",
        "en-029+f4",
        "en-gb-x-rp+m1",
    )
    """espeak-ng voices, cycled over the sentences."""
    klettres: int | None = None
    """KLettres clips kept (seeded subset); None: all 1,836; 0: none."""
    ktuberling: int | None = None
    """KTuberling clips kept (seeded subset); None: all 1,376; 0: none."""
    digit_voices: int = 96
    """Synthetic voices (accent x variant, accents interleaved) for the digits and CTC tasks (max 96)."""
    digit_rates: tuple[int, ...] = (120, 150, 180, 210)
    """espeak-ng speaking rates (words per minute) per voice."""
    digit_pitches: tuple[int, ...] = (35, 50, 65)
    """espeak-ng pitches per voice; clips per voice = 10 digits x rates x pitches."""
    ctc_strings: int = 2000
    """Digit strings (voice, rate, pitch, digits drawn with the seed) for the CTC task."""
    ctc_min_digits: int = 3
    """Shortest digit string."""
    ctc_max_digits: int = 6
    """Longest digit string."""
    workers: int = 2
    """Parallel espeak-ng | sox pipelines."""

    def __post_init__(self) -> None:
        if not 0 <= self.digit_voices <= len(ACCENTS) * len(VARIANTS):
            raise ConfigError(f"digit_voices must be in [0, 96], got {self.digit_voices}")
        if not 1 <= self.ctc_min_digits <= self.ctc_max_digits:
            raise ConfigError(
                f"ctc_min_digits must be in [1, ctc_max_digits = {self.ctc_max_digits}], got "
                f"{self.ctc_min_digits}"
            )
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class ShardConfig(ShardCommon):
    """The ``shard.audio`` section."""

    samples_per_shard: int = 1000
    """Clips per shard (~2-7 MB of FLAC)."""
    workers: int = 2
    """Processes decoding / resampling / FLAC-encoding clips."""


# ------------------------------------------------------------------------------------------------ prepare


def _need_tools() -> None:
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        raise FileNotFoundError(
            f"the default speech data is synthesised with espeak-ng and sox; missing: {', '.join(missing)}. "
            f"Install with `sudo apt-get install {' '.join(missing)}` (or set prepare.audio.source to your "
            "own folder of audio files)"
        )


def synthesize(text: str, voice: str, rate: int, pitch: int, out: Path) -> None:
    """``espeak-ng ... --stdout | sox`` -> 16 kHz mono 16-bit WAV (docs/datasets.md recipe; ``gain -1`` avoids
    clipping; ``-R -D``: repeatable, no dither, so the bytes are the same on every run)."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdin", "--stdout"],
        input=text.encode("utf-8"), capture_output=True, check=True,
    ).stdout  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["sox", "-V1", "-R", "-D", "-t", "wav", "-", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(out),
         "gain", "-1"],
        input=wav, capture_output=True, check=True,
    )  # fmt: skip


def digit_voices(n: int) -> list[str]:
    """The first n espeak-ng voices ``accent+variant``, accents interleaved (n = 16 covers all 8 accents)."""
    return [f"{a}+{v}" for v in VARIANTS for a in ACCENTS][:n]


def lee_sentences(n: int) -> list[str]:
    """The first n sentences (>= 4 words) of gensim's Lee background corpus."""
    try:
        import gensim
    except ImportError:
        raise FileNotFoundError("the read-speech sentences come from gensim: `pip install gensim`") from None
    path = Path(gensim.__file__).parent / "test/test_data/lee_background.cor"
    out = []
    for doc in path.read_text(encoding="utf-8").splitlines():
        for s in re.split(r"(?<=[.!?])\s+", doc.strip()):
            if len(s.split()) >= 4:
                out.append(s)
                if len(out) >= n:
                    return out
    return out


def _copy_recordings(src: Path, dst: Path, limit: int | None, seed: int, package: str) -> int:
    if limit == 0:
        return 0
    if not src.is_dir():
        raise FileNotFoundError(
            f"{src} not found: `sudo apt-get install {package}` (or set prepare.audio.{dst.name}: 0)"
        )
    files = sorted(src.rglob("*.ogg"))
    if limit is not None and limit < len(files):
        files = sorted(rng_for(seed, "prepare.audio", dst.name).sample(files, limit))
    for p in files:
        target = dst / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
    return len(files)


def _jobs(cfg: PrepareConfig, seed: int) -> tuple[list[tuple], list[dict[str, str]]]:
    """Synthesis jobs ``(text, voice, rate, pitch, relpath)`` and the metadata rows of the labelled clips."""
    jobs, rows = [], []
    voices = list(cfg.sentence_voices)
    for i, s in enumerate(lee_sentences(cfg.sentences)):
        jobs.append((s, voices[i % len(voices)], 160, 50, f"read/{i:05d}.wav"))
    dvoices = digit_voices(cfg.digit_voices)
    for v in dvoices:
        for rate in cfg.digit_rates:
            for pitch in cfg.digit_pitches:
                for d, word in enumerate(DIGITS):
                    rel = f"digits/{v}/{d}-r{rate}-p{pitch}.wav"
                    jobs.append((word, v, rate, pitch, rel))
                    rows.append({"path": rel, "label": str(d), "transcript": "", "speaker": v})
    rng = rng_for(seed, "prepare.audio", "ctc")
    for i in range(cfg.ctc_strings if dvoices else 0):
        v, rate, pitch = rng.choice(dvoices), rng.choice(cfg.digit_rates), rng.choice(cfg.digit_pitches)
        words = " ".join(
            DIGITS[rng.randrange(10)] for _ in range(rng.randint(cfg.ctc_min_digits, cfg.ctc_max_digits))
        )
        rel = f"ctc/{v}/{i:05d}.wav"
        jobs.append((words, v, rate, pitch, rel))
        rows.append({"path": rel, "label": "", "transcript": words, "speaker": v})
    return jobs, rows


def write_metadata(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["path", "label", "transcript", "speaker"], delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: r["path"]))


TRANS_FILE = re.compile(r"^(\d+)-(\d+)\.trans\.txt$")
"""A LibriSpeech chapter's transcripts, ``<speaker>-<chapter>.trans.txt``."""


def librispeech_rows(src: Path) -> tuple[list[dict[str, str]], list[Path]]:
    """``(metadata rows, transcript files)`` of the LibriSpeech chapters under ``src``; ([], []) when none.

    Each line ``<speaker>-<chapter>-<utt> TRANSCRIPT`` of a ``<speaker>-<chapter>.trans.txt`` names the audio
    file ``<speaker>-<chapter>-<utt>.<ext>`` beside it (flac, or wav/ogg after a conversion). The row keeps the
    transcript lower-cased (LibriSpeech's are upper-case A-Z, apostrophe and spaces: the CTC letters) and the
    speaker id, so the CTC splits keep speakers disjoint. A line whose audio file is absent still gets a row
    (with a ``.flac`` path), so ``shard`` lists it as missing.
    """
    rows, trans = [], []
    for t in sorted(src.rglob("*.trans.txt")):
        rel_dir = t.parent.relative_to(src)
        m = TRANS_FILE.match(t.name)
        if not m or any(part.startswith(".") for part in rel_dir.parts):  # copy_source skips hidden ones too
            continue
        trans.append(t)
        for lineno, line in enumerate(t.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            utt, _, words = line.strip().partition(" ")
            if not utt.startswith(f"{m[1]}-{m[2]}-") or not words.strip():
                raise ValueError(
                    f"{t}:{lineno}: expected '<speaker>-<chapter>-<utterance> TRANSCRIPT' for chapter "
                    f"{m[1]}-{m[2]}, got {line.strip()[:80]!r}"
                )
            names = [utt + suffix for suffix in AUDIO_SUFFIXES if (t.parent / (utt + suffix)).exists()]
            path = (rel_dir / (names[0] if names else f"{utt}.flac")).as_posix()
            transcript = " ".join(words.lower().split())
            rows.append({"path": path, "label": "", "transcript": transcript, "speaker": m[1]})
    return rows, trans


def prepare(cfg: PrepareConfig, out_dir: Path, seed: int) -> dict[str, Any]:
    """Materialise the raw audio in ``out_dir`` (see the module docstring for the layout)."""
    files = out_dir / "files"
    if cfg.source != "default":
        src = cfg.source_path("a folder of .wav/.flac/.ogg files")
        rows, trans = librispeech_rows(src) if src.is_dir() else ([], [])
        if trans:
            if cfg.metadata is not None:
                raise ValueError(
                    f"prepare.audio.metadata: {cfg.source!r} is a LibriSpeech tree, whose *.trans.txt files "
                    "give the transcripts and speakers; set metadata: null (or move the .trans.txt files away "
                    "to use your TSV)"
                )
            write_metadata(out_dir / "metadata.tsv", rows)
            n = copy_source(src, files, exclude=tuple(trans))
            speakers = len({r["speaker"] for r in rows})
            counts = {"files": n, "transcripts": len(rows), "speakers": speakers, "chapters": len(trans)}
            return {"source": cfg.source, "layout": "librispeech", "counts": counts}
        meta = None
        if cfg.metadata is not None:
            meta = Path(cfg.metadata).expanduser()
            if not meta.is_file():
                raise ValueError(f"prepare.audio.metadata: {cfg.metadata!r} is not a file (expected a TSV)")
            shutil.copyfile(meta, out_dir / "metadata.tsv")
        n = copy_source(src, files, exclude=(meta,) if meta else ())
        return {"source": cfg.source, "counts": {"files": n}}
    _need_tools()
    jobs, rows = _jobs(cfg, seed)
    with (
        ThreadPoolExecutor(cfg.workers) as pool,
        tqdm(total=len(jobs), desc="espeak-ng", unit="clip", file=sys.stderr, mininterval=1.0) as bar,
    ):
        for _ in pool.map(lambda j: synthesize(j[0], j[1], j[2], j[3], files / j[4]), jobs):
            bar.update(1)
    write_metadata(out_dir / "metadata.tsv", rows)
    counts = {
        "read_sentences": sum(j[4].startswith("read/") for j in jobs),
        "digit_clips": sum(j[4].startswith("digits/") for j in jobs),
        "ctc_strings": sum(j[4].startswith("ctc/") for j in jobs),
        "digit_voices": cfg.digit_voices,
        "klettres": _copy_recordings(KLETTRES_DIR, files / "klettres", cfg.klettres, seed, "klettres-data"),
        "ktuberling": _copy_recordings(
            KTUBERLING_DIR, files / "ktuberling", cfg.ktuberling, seed, "ktuberling-data"
        ),
    }
    return {
        "source": "default",
        "data": "espeak-ng synthesis (Lee sentences, digits, digit strings) + KLettres/KTuberling (GPL-2+)",
        "counts": counts,
    }


# -------------------------------------------------------------------------------------------------- shard


def read_metadata(path: Path) -> tuple[dict[str, dict[str, str]], list[Skip]]:
    """``{relative path: {label, transcript, speaker}}`` of ``metadata.tsv``; rows without a path come back
    as skips. A row with more or fewer fields than the header, or a file that is not UTF-8, is an error (a
    shifted column would silently move labels into the wrong field)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return _metadata_rows(csv.reader(f, delimiter="\t"), path)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); save the metadata TSV "
            "(prepare.audio.metadata) as UTF-8 and re-run `d2v prepare audio`"
        ) from None


def _metadata_rows(reader: Any, path: Path) -> tuple[dict[str, dict[str, str]], list[Skip]]:
    header = next(reader, [])
    cols = set(header)
    if "path" not in cols or not cols & {"label", "transcript"}:
        raise ValueError(
            f"{path}: expected a tab-separated header with 'path' and 'label' and/or 'transcript' "
            f"(optional 'speaker'), got {sorted(cols)}"
        )
    rows: dict[str, dict[str, str]] = {}
    skips = []
    for fields in reader:
        if not fields:  # a blank line
            continue
        if len(fields) != len(header):
            raise ValueError(
                f"{path}:{reader.line_num}: {len(fields)} tab-separated fields, the header has {len(header)} "
                f"({', '.join(header)}); fix the row in the metadata TSV (prepare.audio.metadata; leave a "
                "field empty rather than out) and re-run `d2v prepare audio`"
            )
        row = dict(zip(header, fields))
        p = row["path"].strip()
        if not p:
            skips.append(Skip(f"metadata.tsv:{reader.line_num}", "bad_record", "row without a path"))
            continue
        rows[Path(p).as_posix()] = {k: row.get(k, "").strip() for k in ("label", "transcript", "speaker")}
    return rows, skips


def scan(raw_dir: Path, cfg: ShardConfig) -> Scan:
    """Items of ``raw_dir/files``; labels/transcripts/speakers from ``metadata.tsv``."""
    root = raw_dir / "files"
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no raw audio; run `d2v prepare audio`")
    meta, skips = read_metadata(raw_dir / "metadata.tsv") if (raw_dir / "metadata.tsv").exists() else ({}, [])
    out = Scan(skipped=skips)
    pools: dict[str, list[Item]] = {"classification": [], "ctc": []}
    seen = set()
    for path in files_under(root):
        rel = path.relative_to(root).as_posix()
        name = f"files/{rel}"
        seen.add(rel)
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            out.skipped.append(
                Skip(
                    name,
                    "unsupported_format",
                    f"unsupported file type {path.suffix!r} (expected one of {' '.join(AUDIO_SUFFIXES)})",
                )  # fmt: skip
            )
            continue
        ref = str(path.resolve())
        m = meta.get(rel, {})
        speaker = m.get("speaker") or None
        if m.get("label"):
            pools["classification"].append(Item(name, ref, label=m["label"], group=speaker))
        if m.get("transcript"):
            pools["ctc"].append(Item(name, ref, transcript=m["transcript"], group=speaker))
        if not m.get("label") and not m.get("transcript"):
            out.unlabelled.append(Item(name, ref, group=speaker))
    for rel in sorted(set(meta) - seen):
        out.skipped.append(Skip(f"files/{rel}", "missing", "listed in metadata.tsv but not found"))
    if pools["classification"]:
        out.tasks["classification"] = Task(pools["classification"], "label")
    if pools["ctc"]:
        out.tasks["ctc"] = Task(pools["ctc"], "transcript", prefix="ctc_")
    return out


LIKE_KEY = "shard.audio.preprocess_like"


@dataclass(frozen=True)
class Context:
    like: dict[str, Any] | None = None
    """The ``preprocessing`` entry that ``shard.audio.preprocess_like`` dictates (:func:`like_preprocessing`);
    None: d2v's own."""


def setup(splits: dict[str, list[Item]], cfg: ShardConfig, work_dir: Path, seed: int) -> Context:
    """Nothing to fit for audio; with ``preprocess_like``, the folder's preprocessing (checked: 16 kHz)."""
    if cfg.preprocess_like is None:
        return Context()
    return Context(like_preprocessing(published.source(cfg.preprocess_like, "audio", LIKE_KEY)))


def resample(x: Tensor, rate: int, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """float32 [N] at ``rate`` -> at ``sample_rate``: ``torchaudio.functional.resample`` (its defaults)."""
    import torchaudio.functional as AF

    return AF.resample(x, rate, sample_rate) if rate != sample_rate and len(x) else x


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """float32 [N] mono at ``sample_rate``: soundfile read, channel mean, ``resample``."""
    try:
        with sf.SoundFile(str(path)) as f:
            declared, sr = f.frames, f.samplerate
            wav = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise BadInput("unreadable", f"audio cannot be read ({type(e).__name__}: {e})") from None
    if len(wav) < declared:
        raise BadInput(
            "truncated", f"truncated: {len(wav)} of the {declared} frames the header declares could be read"
        )
    missing = wav_missing_bytes(path)
    if missing:
        raise BadInput(
            "truncated",
            f"truncated: the WAV header declares {missing} more bytes of audio than the file holds "
            f"({len(wav)} frames could be read); re-export or re-copy the file",
        )
    return resample(torch.from_numpy(wav).mean(dim=1), sr, sample_rate)


def wav_missing_bytes(path: str | Path) -> int:
    """Bytes of a RIFF/WAVE file's ``data`` chunk that its header declares but the file lacks; 0 when
    complete, not a RIFF/WAVE file, or the size is a streaming placeholder (0 or 0xFFFFFFFF).

    libsndfile clamps the frame count of a cut WAV to what is there, so the cut is only visible here."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk, n = struct.unpack("<4sI", f.read(8))
            if chunk == b"data":
                return 0 if n in (0, 0xFFFFFFFF) else max(0, n - (size - pos - 8))
            pos += 8 + n + (n & 1)  # chunks are padded to an even size
    return 0


def to_pcm16(x: Tensor) -> np.ndarray:
    return np.round(x.clamp(-1.0, 1.0).numpy() * 32767.0).astype(np.int16)


def encode(item: Item, ctx: Context | None) -> list[Encoded]:
    """One clip as 16 kHz mono 16-bit FLAC; BadInput when unreadable, too short or all zero."""
    pcm = to_pcm16(load_audio(item.ref))
    if len(pcm) < MIN_SAMPLES:
        raise BadInput("too_short", f"{len(pcm)} samples at 16 kHz (< {MIN_SAMPLES}, one encoder frame)")
    if not pcm.any():
        raise BadInput("silent", "all samples are zero")
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    seconds = len(pcm) / SAMPLE_RATE
    return [Encoded({"flac": buf.getvalue()}, {"clips": 1, "seconds": seconds, "hours": seconds / 3600})]


def own_preprocessing() -> dict[str, Any]:
    """The manifest entry of shards made without ``preprocess_like`` (normalisation: the model's own)."""
    return {
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
        "resample": "soundfile read, mean over channels, torchaudio.functional.resample (defaults)",
        "storage": "FLAC PCM_16 (clipped to [-1, 1])",
        "min_samples": MIN_SAMPLES,
    }


pack = unpacked  # a clip is one sample


def preprocessing(ctx: Context | None, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What inference repeats: 16 kHz mono FLAC; with ``preprocess_like``, exactly what the folder dictates
    (``like_preprocessing``: adds ``normalize``)."""
    if ctx is not None and ctx.like is not None:
        return dict(ctx.like)
    return own_preprocessing()


# ------------------------------------------------------------------------ a published model's preprocessing

PROCESSOR_FILE = "preprocessor_config.json"
SAVE_HINT = (
    "transformers.AutoFeatureExtractor.from_pretrained('<the model, e.g. facebook/data2vec-audio-base>')"
    ".save_pretrained('{folder}')"
)


@dataclass(frozen=True)
class ExtractorSpec:
    """What a Data2VecAudio ``Wav2Vec2FeatureExtractor`` does to a waveform (its ``preprocessor_config.json``)."""

    sample_rate: int
    """``sampling_rate``: the rate it expects (Hz)."""
    normalize: bool
    """``do_normalize``: zero mean, unit variance per utterance."""


def read_feature_extractor(f: Path) -> ExtractorSpec:
    """The settings of a Data2VecAudio ``preprocessor_config.json`` ``f``; ValueError naming the file, the
    setting and what d2v supports (transformers' defaults for keys the file omits)."""
    d = published.read_settings(f, "feature extractor")
    kind = d.get("feature_extractor_type")
    if kind not in (None, "Wav2Vec2FeatureExtractor"):
        raise ValueError(f"{f}: a {kind}; d2v reads the Wav2Vec2FeatureExtractor of Data2VecAudio models")
    if d.get("feature_size", 1) != 1:
        raise ValueError(f"{f}: feature_size {d['feature_size']}; a waveform feature extractor has 1")
    rate = d.get("sampling_rate", 16_000)
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"{f}: sampling_rate must be a positive integer (Hz), got {rate!r}")
    normalize = d.get("do_normalize", True)  # transformers' default
    if not isinstance(normalize, bool):
        raise ValueError(f"{f}: do_normalize must be true or false, got {normalize!r}")
    return ExtractorSpec(rate, normalize)


def like_preprocessing(src: published.Source, key: str = LIKE_KEY) -> dict[str, Any]:
    """The manifest ``preprocessing`` entry of shards made like the model folder ``src``
    (``shard.audio.preprocess_like``): what ``preprocessing`` writes for them, from the folder alone.

    A Hugging Face folder: d2v's 16 kHz entry plus ``normalize`` = its feature extractor's ``do_normalize``.
    A d2v checkpoint: the entry of the shards it was trained on, as meta.json records it. Either way the
    rate must be 16 kHz, the rate data2vec's conv encoder is built for. ValueError naming ``key``, the file
    and what to do.
    """
    if src.kind == "d2v":
        prep, f = src.config.get("preprocessing"), src.path / "meta.json"
        if not isinstance(prep, dict) or "sample_rate" not in prep:
            raise ValueError(
                f"{key}: {f} records no audio preprocessing (sample_rate, of its shards); use a checkpoint "
                "written by `d2v pretrain audio` or `d2v finetune audio`, or a Hugging Face data2vec-audio folder"
            )
        prep, rate = json.loads(json.dumps(prep)), prep["sample_rate"]  # a JSON copy, as a manifest reads
    else:
        f = src.path / PROCESSOR_FILE
        if not f.is_file():
            raise ValueError(
                f"{key}: {src.path} has no {PROCESSOR_FILE}, which says at what rate the model hears and "
                f"whether it normalises each clip; save it into the folder: {SAVE_HINT.format(folder=src.path)}"
            )
        try:
            spec = read_feature_extractor(f)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        prep, rate = {**own_preprocessing(), "normalize": spec.normalize}, spec.sample_rate
    if rate != SAMPLE_RATE:
        raise ValueError(
            f"{key}: {f} says {rate} Hz, but data2vec's audio encoder runs at {SAMPLE_RATE} Hz (its conv "
            f"frames are 20 ms there) and audio shards hold {SAMPLE_RATE} Hz clips: use a {SAMPLE_RATE} Hz "
            "data2vec-audio model"
        )
    return prep


# --------------------------------------------------------------------------------------------------- load


def normalizes(prep: dict[str, Any], model_cfg: Any) -> bool:
    """Whether clips are normalised per utterance: the manifest's ``normalize`` (shards made with
    ``preprocess_like``), else the model's ``normalize_waveform`` (older manifests, d2v's own shards)."""
    if prep.get("normalize") is not None:
        return bool(prep["normalize"])
    return bool(getattr(model_cfg, "normalize_waveform", False))


def check_model(prep: dict[str, Any], model_cfg: Any) -> None:
    if prep["sample_rate"] != SAMPLE_RATE:
        raise ValueError(
            f"shards hold {prep['sample_rate']} Hz audio; the audio encoder expects {SAMPLE_RATE} Hz"
        )
    norm, model = prep.get("normalize"), getattr(model_cfg, "normalize_waveform", None)
    if norm is not None and model is not None and bool(norm) != bool(model):
        said = "normalised" if norm else "not normalised"
        raise ValueError(
            f"the shards' clips are {said} per utterance (manifest preprocessing normalize: "
            f"{str(bool(norm)).lower()}, as the shard.audio.preprocess_like folder's model does), but "
            f"model.audio.normalize_waveform is {str(bool(model)).lower()}: set model.audio.normalize_waveform: "
            f"{str(bool(norm)).lower()} (or re-run `d2v shard audio` with another shard.audio.preprocess_like)"
        )


def decode(sample: dict[str, bytes]) -> Tensor:
    """float32 [N] waveform from the ``flac`` field."""
    wav, sr = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
    assert sr == SAMPLE_RATE, sr
    return torch.from_numpy(wav)


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
    """Normalise the whole utterance (fairseq normalises before cropping) when ``normalizes`` says so, then
    fit ``max_len`` samples: a random crop in pretraining ([FS] ``RawAudioDataset.crop_to_max_size``), the
    head in fine-tuning (classification only; CTC targets would no longer match), nothing in eval."""
    if normalizes(prep, model_cfg):
        eps = {"eps": model_cfg.normalize_eps} if hasattr(model_cfg, "normalize_eps") else {}
        x = normalize_waveform(x[None], None, **eps)[0]
    if max_len is None or len(x) <= max_len or mode == "eval" or target == "transcript":
        return x
    start = rng.randrange(len(x) - max_len + 1) if mode == "pretrain" else 0
    return x[start : start + max_len]


def length(x: Tensor) -> int:
    return len(x)


FINETUNE_MASK = True
"""``collate`` takes a ``finetune_mask`` (wav2vec 2.0 fine-tuning masks, kept by data2vec for speech)."""


def collate(
    xs: list[Tensor],
    *,
    mode: str,
    model_cfg: Any,
    prep: dict[str, Any],
    generator: torch.Generator,
    finetune_mask: Any = None,
) -> dict[str, Tensor]:
    """Right-padded ``inputs`` [B, N] + ``padding_mask`` (absent when no row is padded); pretrain: every
    clip first cropped to the shortest at a random offset (``model.audio.crop_batches``), ``mask`` [B, T]
    (span masking); finetune with a ``FinetuneMask``: ``mask`` [B, T] and ``channel_mask`` [B, D]
    (``finetune_masks``)."""
    if mode == "pretrain" and getattr(model_cfg, "crop_batches", False):
        shortest = min(len(x) for x in xs)
        starts = [int(torch.randint(len(x) - shortest + 1, (), generator=generator)) for x in xs]
        xs = [x[s : s + shortest] for x, s in zip(xs, starts)]
    n = torch.tensor([len(x) for x in xs], dtype=torch.int64)
    N = int(n.max())
    wav = torch.zeros(len(xs), N, dtype=torch.float32)
    for i, x in enumerate(xs):
        wav[i, : len(x)] = x
    padding = padding_or_none(n, N)
    batch = {"inputs": wav} if padding is None else {"inputs": wav, "padding_mask": padding}
    if mode in ("pretrain", "finetune"):  # training only: the data stages never load the masking code
        from d2v.data2vec2 import keep_indices
        from d2v.modalities.audio.masking import finetune_masks, make_mask

    if mode == "pretrain":
        batch["mask"] = make_mask(n, model_cfg, generator)
        if model_cfg.algorithm == "data2vec2":  # the kept frames' indices, read here on the CPU
            batch["keep"] = keep_indices(batch["mask"])
    elif mode == "finetune" and finetune_mask is not None:
        batch["mask"], batch["channel_mask"] = finetune_masks(n, model_cfg, finetune_mask, generator)
    return batch


def _samples(a: Any) -> Tensor:
    """float32 [N] of a 1-D float array or tensor; ValueError naming what is wrong with it."""
    x = a.detach().cpu() if isinstance(a, Tensor) else torch.from_numpy(np.array(a))  # own, contiguous
    if not x.is_floating_point():
        raise ValueError(
            f"a waveform must be float (-1..1), got {x.dtype}: scale 16-bit PCM with x / 32768 first"
        )
    if x.ndim != 1:
        raise ValueError(
            f"a waveform must be 1-D (mono samples), got shape {tuple(x.shape)}: downmix [N, C] with "
            "x.mean(axis=1); pass several clips as a list of items"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("a waveform holds NaN or infinite samples")
    return x.float()


def to_waveform(item: Any, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """One ``embed`` item as float32 [N] mono at ``sample_rate`` (16 kHz).

    Accepted: a file path (``str`` or ``Path``: any rate and channel count, read as at shard time); a 1-D
    float numpy array or torch tensor already at ``sample_rate``; or a pair ``(waveform, rate)``, resampled
    from ``rate`` as at shard time (``torchaudio.functional.resample``). Raw samples, not normalised: the
    encoder normalises each utterance itself.
    """
    if isinstance(item, (str, Path)):
        path = item_file(item, "audio file")
        try:
            return load_audio(path, sample_rate)
        except BadInput as e:
            raise ValueError(f"{path}: {e.reason}") from None
    if isinstance(item, tuple) and len(item) == 2:
        wav, rate = item
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise ValueError(f"a (waveform, rate) pair needs a positive integer rate in Hz, got {rate!r}")
        return resample(_samples(wav), int(rate), sample_rate)
    if isinstance(item, (np.ndarray, Tensor)):
        return _samples(item)
    raise ValueError(
        f"an audio item is a file path, a 1-D float array or tensor at {sample_rate} Hz, or a "
        f"(waveform, rate) pair; got {type(item).__name__}"
    )


def inference_inputs(items: list[Any], prep: dict[str, Any], shard_dir: Path | None = None) -> list[Tensor]:
    """Waveforms for ``embed`` (items as ``to_waveform`` reads them), preprocessed as at shard time
    (16 kHz mono, then the 16-bit FLAC's quantisation); feed to ``transform`` and ``collate``."""
    out = []
    for item in items:
        pcm = to_pcm16(to_waveform(item))
        out.append(torch.from_numpy(pcm.astype(np.float32) / 32768.0))  # soundfile's int16 scale
    return out
