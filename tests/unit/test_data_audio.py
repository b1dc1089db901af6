"""Speech data: user folders with a TSV and bad files, resampling, espeak-ng synthesis, batches."""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from d2v.data import LoaderSpec, build_loader, iter_shard, prepare_raw, shard
from d2v.data.shards import Item, plan_splits
from d2v.modalities import audio
from d2v.modalities.audio import data as A
from d2v.modalities.audio.data import PrepareConfig, ShardConfig

TINY = audio.model_config({"preset": "tiny"})
HAVE_ESPEAK = shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def tone(seconds: float, sr: int, freq: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def user_folder(root: Path) -> tuple[Path, Path]:
    """6 speakers x 2 digit labels + 4 CTC clips + 3 unlabelled, in 3 formats / rates; 5 bad entries."""
    formats = [("wav", 8000, 2), ("flac", 16000, 1), ("ogg", 22050, 1)]
    rows = ["path\tlabel\ttranscript\tspeaker"]
    for s in range(6):
        ext, sr, ch = formats[s % 3]
        for d in range(2):
            rel = f"spk{s}/{d}.{ext}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / rel, tone(0.5 + 0.1 * d, sr, 200 + 50 * s + 10 * d, ch), sr)
            rows.append(f"{rel}\t{d}\t\tspk{s}")
    for i in range(4):
        sf.write(root / f"ctc/{i}.wav" if (root / "ctc").exists() else _mk(root / "ctc") / f"{i}.wav",
                 tone(1.0 + 0.25 * i, 16000, 300), 16000)  # fmt: skip
        rows.append(f"ctc/{i}.wav\t\tone two{' three' * i}\tspk{i % 2}")
    for i in range(3):
        sf.write(_mk(root / "free") / f"{i}.flac", tone(2.0, 44100, 440, channels=2), 44100)
    (root / "free" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 4)
    (root / "free" / "readme.md").write_text("# not audio")
    sf.write(root / "free" / "silent.wav", np.zeros(16000), 16000)
    sf.write(root / "free" / "short.wav", tone(0.01, 16000, 300), 16000)  # 160 samples
    rows.append("gone.wav\t3\t\tspk9")
    tsv = root.parent / "labels.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    return root, tsv


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def run(tmp: Path, src: Path, tsv: Path, **kw) -> tuple[Path, dict]:
    raw, out = tmp / "raw", tmp / "audio"
    prepare_raw("audio", PrepareConfig(source=str(src), metadata=str(tsv)), raw, seed=0)
    cfg = ShardConfig(samples_per_shard=4, valid=0.2, test=0.2, workers=1, **kw)
    return out, shard("audio", cfg, raw, out, seed=0)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio")
    return run(tmp, *user_folder(tmp / "src"))


def test_user_audio_with_tsv_is_sharded_and_bad_files_counted(sharded):
    out, m = sharded
    assert m["skipped_counts"] == {
        "missing": 1,
        "silent": 1,
        "too_short": 1,
        "unreadable": 1,
        "unsupported_format": 1,
    }
    n = {s: e["samples"] for s, e in m["splits"].items()}
    assert n["pretrain"] == 3
    assert n["train"] + n["valid"] + n["test"] == 12 and n["test"] >= 2  # whole speakers (2 clips each)
    assert n["ctc_train"] + n["ctc_valid"] + n["ctc_test"] == 4
    assert m["tasks"]["ctc"]["alphabet"] == " eehnortw".replace("ee", "e")
    assert m["preprocessing"]["sample_rate"] == 16000
    assert m["splits"]["pretrain"]["stats"]["seconds"] == pytest.approx(6.0)  # 3 x 2 s at any rate


def test_clips_are_16khz_mono_with_their_duration_kept(sharded):
    out, m = sharded
    for split in ("train", "valid", "test"):
        for entry in m["splits"][split]["shards"]:
            for s in iter_shard(out / entry["file"], entry["samples"]):
                wav, sr = sf.read(io.BytesIO(s["flac"]))
                assert sr == 16000 and wav.ndim == 1
                assert len(wav) in (8000, 9600)  # 0.5 s / 0.6 s at 8, 16 or 22.05 kHz, resampled exactly


def test_splits_are_disjoint_by_speaker(tmp_path):
    src, tsv = user_folder(tmp_path / "src")
    prepare_raw("audio", PrepareConfig(source=str(src), metadata=str(tsv)), tmp_path / "raw", seed=0)
    cfg = ShardConfig(valid=0.2, test=0.2)
    splits = plan_splits(A.scan(tmp_path / "raw", cfg), cfg, seed=0)
    speakers = [{it.group for it in splits[s]} for s in ("train", "valid", "test")]
    assert all(speakers) and not (
        speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2]
    )


def test_strict_names_the_bad_file(tmp_path):
    src, tsv = user_folder(tmp_path / "src")
    tsv.write_text("\n".join(tsv.read_text().splitlines()[:-1]) + "\n")  # drop the row of the missing file
    (src / "free" / "readme.md").unlink()
    with pytest.raises(ValueError, match=r"files/free/(corrupt|silent|short)\.wav.*strict"):
        run(tmp_path, src, tsv, strict=True)


def test_a_tsv_without_the_expected_columns_is_explained(tmp_path):
    src, tsv = user_folder(tmp_path / "src")
    tsv.write_text("file\tlabel\nx.wav\t1\n")
    with pytest.raises(ValueError, match="'path' and 'label' and/or 'transcript'"):
        run(tmp_path, src, tsv)


@pytest.mark.parametrize(
    "row, fields",
    [("spk0/0.wav\t0\t\tspk0\tloud", 5), ("spk0/0.wav\t0", 2)],  # a field too many / two too few
)
def test_a_tsv_row_with_extra_or_missing_fields_is_named_by_line(tmp_path, row, fields):
    src, tsv = user_folder(tmp_path / "src")
    lines = tsv.read_text().splitlines()
    tsv.write_text("\n".join([*lines[:3], row, *lines[3:]]) + "\n")
    with pytest.raises(ValueError) as e:
        run(tmp_path, src, tsv)
    assert f"metadata.tsv:4: {fields} tab-separated fields, the header has 4" in str(e.value)


def test_a_tsv_that_is_not_utf8_is_named(tmp_path):
    src, tsv = user_folder(tmp_path / "src")
    tsv.write_bytes(tsv.read_bytes().replace(b"one two\t", "un deux trois café\t".encode("latin-1"), 1))
    with pytest.raises(ValueError) as e:
        run(tmp_path, src, tsv)
    assert str(tmp_path / "raw" / "metadata.tsv") in str(e.value)
    assert "not UTF-8 (byte 0xe9" in str(e.value) and "as UTF-8" in str(e.value)


LIBRI_WORDS = ["HE HOPED THERE WOULD BE STEW FOR DINNER", "IT'S  A TEST", "STUFF IT INTO YOU"]


def librispeech_tree(root: Path, speakers: tuple[int, ...] = (19, 26, 32, 39, 40)) -> Path:
    """LibriSpeech's layout: ``<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` beside
    ``<speaker>-<chapter>.trans.txt``, 2 transcribed utterances per speaker; plus one untranscribed FLAC
    and the corpus's top-level SPEAKERS.TXT."""
    for k, spk in enumerate(speakers):
        chapter = 198 + k
        d = _mk(root / "train-clean-100" / str(spk) / str(chapter))
        lines = []
        for u in range(2):
            utt = f"{spk}-{chapter}-{u:04d}"
            sf.write(d / f"{utt}.flac", tone(0.5, 16000, 200 + 40 * k + 10 * u), 16000)
            lines.append(f"{utt} {LIBRI_WORDS[(k + u) % len(LIBRI_WORDS)]}")
        (d / f"{spk}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    sf.write(root / "train-clean-100" / "19" / "198" / "19-198-0099.flac", tone(1.0, 16000, 500), 16000)
    (root / "SPEAKERS.TXT").write_text(";ID  |SEX| SUBSET | MINUTES | NAME\n19 | F | train-clean-100 | 25\n")
    return root


def test_a_librispeech_tree_gives_transcripts_and_speaker_disjoint_ctc_splits(tmp_path):
    from d2v.modalities.audio.heads import decode_ids, encode_transcript

    src, raw = librispeech_tree(tmp_path / "LibriSpeech"), tmp_path / "raw"
    info = prepare_raw("audio", PrepareConfig(source=str(src)), raw, seed=0)
    assert info["layout"] == "librispeech"
    assert info["counts"] == {"files": 12, "transcripts": 10, "speakers": 5, "chapters": 5}
    rows = (raw / "metadata.tsv").read_text().splitlines()
    assert rows[0] == "path\tlabel\ttranscript\tspeaker"
    assert "train-clean-100/26/199/26-199-0000.flac\t\tit's a test\t26" in rows  # lower-cased, one space
    assert not list((raw / "files").rglob("*.trans.txt"))  # read into metadata.tsv, not copied as audio
    cfg = ShardConfig(samples_per_shard=4, valid=0.2, test=0.2, pretrain_from="unlabelled+labelled")
    splits = plan_splits(A.scan(raw, cfg), cfg, seed=0)
    speakers = [{it.group for it in splits[f"ctc_{s}"]} for s in ("train", "valid", "test")]
    assert [len(s) for s in speakers] == [3, 1, 1]  # 5 speakers: round(0.2 x 5) = 1 each for valid, test
    assert not (speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2])
    for it in splits["ctc_train"] + splits["ctc_valid"] + splits["ctc_test"]:
        assert decode_ids(encode_transcript(it.transcript)) == it.transcript  # CTC letters, nothing dropped
    m = shard("audio", cfg, raw, tmp_path / "audio", seed=0)
    n = {s: e["samples"] for s, e in m["splits"].items()}
    assert n == {"pretrain": 1 + 6 + 2, "ctc_train": 6, "ctc_valid": 2, "ctc_test": 2}  # + ctc train/valid
    assert m["tasks"]["ctc"]["alphabet"] == "".join(sorted(set(" ".join(LIBRI_WORDS).lower())))
    assert m["skipped_counts"] == {"unsupported_format": 1}  # SPEAKERS.TXT


def test_an_all_transcribed_tree_says_how_to_pretrain_on_it(tmp_path):
    src, raw = librispeech_tree(tmp_path / "LibriSpeech"), tmp_path / "raw"
    (src / "train-clean-100" / "19" / "198" / "19-198-0099.flac").unlink()  # every clip transcribed now
    prepare_raw("audio", PrepareConfig(source=str(src)), raw, seed=0)
    shard("audio", ShardConfig(samples_per_shard=4), raw, tmp_path / "audio", seed=0)
    with pytest.raises(ValueError, match="'pretrain' is empty.*shard.audio.pretrain_from: unlabelled"):
        build_loader(tmp_path / "audio", "pretrain", TINY, LoaderSpec(batch_size=2, mode="pretrain", seed=0))


def test_a_librispeech_tree_with_a_tsv_as_well_is_explained(tmp_path):
    src = librispeech_tree(tmp_path / "LibriSpeech")
    (tmp_path / "meta.tsv").write_text("path\tlabel\n")
    with pytest.raises(ValueError, match="LibriSpeech tree.*set metadata: null"):
        prepare_raw("audio", PrepareConfig(source=str(src), metadata=str(tmp_path / "meta.tsv")),
                    tmp_path / "raw", seed=0)  # fmt: skip


def cut_wav_folder(root: Path) -> Path:
    """Three good clips and one WAV cut short of the data size its header declares."""
    for i in range(3):
        sf.write(_mk(root) / f"{i}.wav", tone(0.5, 16000, 300 + 50 * i), 16000)
    whole = (root / "0.wav").read_bytes()
    (root / "cut.wav").write_bytes(whole[: len(whole) // 2])  # 0.25 s of the 0.5 s the header declares
    return root


def test_a_truncated_wav_is_skipped_as_truncated_or_an_error_when_strict(tmp_path):
    src = cut_wav_folder(tmp_path / "src")
    raw = tmp_path / "raw"
    prepare_raw("audio", PrepareConfig(source=str(src)), raw, seed=0)
    m = shard("audio", ShardConfig(samples_per_shard=4), raw, tmp_path / "audio", seed=0)
    assert m["skipped_counts"] == {"truncated": 1} and m["splits"]["pretrain"]["inputs"] == 3
    (skip,) = m["skipped"]
    assert skip["input"] == "files/cut.wav"
    assert skip["reason"].startswith("truncated: the WAV header declares"), skip
    with pytest.raises(ValueError, match=r"files/cut\.wav: truncated.*strict"):
        shard("audio", ShardConfig(strict=True), raw, tmp_path / "strict", seed=0)


def test_wav_missing_bytes_reads_the_header_not_libsndfile(tmp_path):
    buf = io.BytesIO()
    sf.write(buf, tone(0.1, 16000, 300), 16000, format="WAV", subtype="PCM_16")
    whole = buf.getvalue()
    assert whole[36:40] == b"data"  # soundfile's 44-byte header: the data size is at bytes 40-43

    def missing(data: bytes) -> int:
        (tmp_path / "x.wav").write_bytes(data)
        return A.wav_missing_bytes(tmp_path / "x.wav")

    assert missing(whole) == 0 and missing(whole[:-100]) == 100
    assert missing(whole[:40] + b"\xff\xff\xff\xff" + whole[44:-100]) == 0  # a streaming writer's "unknown"
    assert sf.info(tmp_path / "x.wav").frames == (len(whole) - 144) // 2  # libsndfile: what is there


def test_pretrain_batches_crop_normalise_and_mask(sharded):
    out, _ = sharded
    spec = LoaderSpec(batch_size=3, mode="pretrain", seed=0, max_len=8000)
    b = next(iter(build_loader(out, "pretrain", TINY, spec)))
    x = b["inputs"]
    assert x.shape == (3, 8000) and "padding_mask" not in b  # 2 s clips cropped to 0.5 s: no padding
    # normalised over the whole 2 s utterance before cropping: a crop of a pure tone stays ~unit variance
    assert float(x.std(dim=1).min()) == pytest.approx(1.0, abs=0.05)
    T = int(audio.feature_lengths(torch.tensor(8000), TINY))
    assert b["mask"].shape == (3, T) and b["mask"].dtype == torch.bool and bool(b["mask"].any())


def test_pretraining_skips_clips_under_min_len(tmp_path):
    """``min_len`` ([FS] ``min_sample_size``) drops short clips before the crop; the others are all kept."""
    out, _ = run(tmp_path, *user_folder(tmp_path / "src"), pretrain_from="unlabelled+labelled")

    def lengths(**kw) -> list[int]:
        loader = build_loader(out, "pretrain", TINY, LoaderSpec(batch_size=1, mode="pretrain", seed=0, **kw))
        return sorted(int(b["inputs"].shape[1]) for b in loader)

    every = lengths()
    assert min(every) < 24_000 <= max(every)  # 0.5 s digits, 1-1.75 s CTC clips, 2 s unlabelled clips
    assert lengths(min_len=24_000) == [n for n in every if n >= 24_000]
    assert lengths(min_len=24_000, max_len=8000) == [8000] * len([n for n in every if n >= 24_000])


def test_finetune_and_ctc_batches(sharded):
    out, m = sharded
    # 2 CTC speakers of 2 clips: round(0.2 x 2) = 0 rounds test up to one speaker (train keeps the other),
    # and leaves valid empty (no third speaker for it)
    assert [m["splits"][f"ctc_{s}"]["samples"] for s in ("train", "valid", "test")] == [2, 0, 2]
    head = LoaderSpec(batch_size=8, mode="finetune", seed=0, max_len=8000)
    b = next(iter(build_loader(out, "train", TINY, head)))
    assert b["labels"].dtype == torch.int64 and b["inputs"].shape[1] == 8000  # 0.6 s clips cut to the head
    assert "padding_mask" not in b  # every clip cut to 8000 samples: rows of one length
    assert float(b["inputs"][0].mean()) == pytest.approx(0.0, abs=0.05)
    ctc = list(build_loader(out, "ctc_train", TINY, replace(head, max_len=4000)))
    transcripts = sorted(t for b in ctc for t in b["transcripts"])
    assert len(transcripts) == 2 and all(t.startswith("one two") for t in transcripts)
    assert max(b["inputs"].shape[1] for b in ctc) > 4000  # CTC clips are never cut
    assert any("padding_mask" in b for b in ctc)  # ... so their rows differ in length


def test_finetune_batches_carry_the_finetune_masks(sharded):
    from d2v.modalities.audio import FinetuneMask

    out, _ = sharded
    mask = FinetuneMask(channel_length=4)  # tiny: D = 16, 1 or 2 spans
    spec = LoaderSpec(batch_size=4, mode="finetune", seed=0, finetune_mask=mask)
    b = next(iter(build_loader(out, "train", TINY, spec)))
    T = int(audio.feature_lengths(torch.tensor(b["inputs"].shape[1]), TINY))
    assert b["mask"].shape == (4, T) and bool(b["mask"].any())
    assert b["channel_mask"].shape == (4, TINY.transformer.dim) and bool(b["channel_mask"].any())
    plain = next(iter(build_loader(out, "train", TINY, LoaderSpec(batch_size=4, mode="finetune", seed=0))))
    assert "mask" not in plain and "channel_mask" not in plain
    with pytest.raises(ValueError, match="mode='finetune'"):
        build_loader(out, "test", TINY, LoaderSpec(batch_size=4, mode="eval", seed=0, finetune_mask=mask))


def test_missing_tools_say_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setattr(A.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng sox"):
        prepare_raw("audio", PrepareConfig(), tmp_path / "raw", seed=0)
    assert not (tmp_path / "raw").exists()


@pytest.mark.skipif(not HAVE_ESPEAK, reason="needs espeak-ng and sox")
def test_default_synthesis_small(tmp_path):
    cfg = PrepareConfig(sentences=2, digit_voices=2, digit_rates=(150,), digit_pitches=(50,), ctc_strings=3,
                        klettres=2, ktuberling=2)  # fmt: skip
    info = prepare_raw("audio", cfg, tmp_path / "a", seed=0)
    assert info["counts"] == {"read_sentences": 2, "digit_clips": 20, "ctc_strings": 3, "digit_voices": 2,
                              "klettres": 2, "ktuberling": 2}  # fmt: skip
    prepare_raw("audio", cfg, tmp_path / "b", seed=0)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for rel in files:  # espeak-ng | sox -R -D is repeatable
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    m = shard("audio", ShardConfig(workers=2), tmp_path / "a", tmp_path / "audio", seed=0)
    assert m["splits"]["pretrain"]["samples"] == 6 and not m["skipped"]
    assert m["tasks"]["classification"]["labels"] == [str(d) for d in range(10)]
    assert sum(m["splits"][s]["samples"] for s in ("ctc_train", "ctc_valid", "ctc_test")) == 3


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ESPEAK, reason="needs espeak-ng and sox")
def test_default_synthesis_one_voice_per_accent(tmp_path):
    cfg = PrepareConfig(sentences=20, digit_voices=16, ctc_strings=50, klettres=50, ktuberling=50)
    prepare_raw("audio", cfg, tmp_path / "raw", seed=0)
    m = shard("audio", ShardConfig(), tmp_path / "raw", tmp_path / "audio", seed=0)
    assert sum(m["splits"][s]["samples"] for s in ("train", "valid", "test")) == 16 * 12 * 10
    assert not m["skipped"]


def test_audio_shards_are_reproducible(sharded, tmp_path):
    out, _ = sharded
    again = tmp_path / "audio"
    shard(
        "audio",
        ShardConfig(samples_per_shard=4, valid=0.2, test=0.2, workers=2),
        out.parent / "raw",
        again,
        0,
    )
    for p in sorted(out.iterdir()):
        if p.name != "manifest.json":  # the manifest records workers (1 vs 2); everything else is identical
            assert p.read_bytes() == (again / p.name).read_bytes(), p.name


def test_inference_preprocessing_matches_the_shards(sharded):
    out, m = sharded
    path = out.parent / "raw" / "files" / "spk0" / "1.wav"  # 8 kHz stereo
    stored = A.decode(A.encode(Item("x", str(path)), None)[0].fields)
    (again,) = A.inference_inputs([str(path)], m["preprocessing"])
    assert torch.equal(stored, again) and len(again) == 9600
