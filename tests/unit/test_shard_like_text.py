"""Text shards made with a published model's tokenizer (``shard.text.preprocess_like``).

A tiny random HF data2vec-text folder (tests/conftest.py ``published``; its RoBERTa-style tokenizer puts
``<mask>`` last, as RoBERTa's 50264) or a d2v checkpoint gives the tokenizer: the shards' ids are
transformers' ids, the manifest records the folder's special ids, the loader masks and pads with them, and a
folder whose tokenizer cannot be its model's is refused before any shard is written.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v import checkpoint
from d2v.config import replace
from d2v.data import LoaderSpec, build_loader, iter_shard, prepare_raw, shard
from d2v.modalities import text
from d2v.modalities.text.data import OWN_IDS, PrepareConfig, ShardConfig
from d2v.preprocessing import ItemPreprocessing
from d2v.published import source

LABELLED = {
    "news": ["stocks fell sharply as markets opened on monday.", "Rain is expected across the north, later!"],
    "sport": ["the team won the match after a late goal", "a dog ran far away from the cat — in the park"],
}
UNLABELLED = [
    "the cat sat on the mat and looked at the dog",
    "the cat sat on the mat " * 12 + "and then the team won",
    "rain is expected",
]


def raw_folder(root: Path) -> Path:
    """Class folders (one labelled document per file) and unlabelled top-level documents, prepared."""
    src = root / "src"
    for label, docs in LABELLED.items():
        (src / label).mkdir(parents=True)
        for i, doc in enumerate(docs):
            (src / label / f"{i}.txt").write_text(doc + "\n", encoding="utf-8")
    for i, doc in enumerate(UNLABELLED):
        (src / f"u{i}.txt").write_text(doc, encoding="utf-8")
    prepare_raw("text", PrepareConfig(source=str(src)), root / "raw", seed=0)
    return root / "raw"


def run(raw: Path, out: Path, like: Path | None, **kw) -> dict:
    cfg = ShardConfig(
        preprocess_like=None if like is None else str(like), max_tokens=16, valid=0.25, test=0.25
    )
    return shard("text", replace(cfg, **kw), raw, out, seed=0)


def samples(out: Path, manifest: dict, splits) -> list[list[int]]:
    ids = []
    for split in splits:
        for entry in manifest["splits"][split]["shards"]:
            for s in iter_shard(out / entry["file"], entry["samples"]):
                x = np.load(io.BytesIO(s["ids.npy"]))
                assert x.dtype == np.uint16
                ids.append(x.tolist())
    return ids


@pytest.fixture
def hf(tmp_path, published):
    """``(hf folder, raw folder)``."""
    published("text", tmp_path / "hf")
    return tmp_path / "hf", raw_folder(tmp_path)


def test_labelled_documents_get_the_ids_transformers_gives(hf, tmp_path):
    from transformers import AutoTokenizer

    folder, raw = hf
    m = run(raw, tmp_path / "text", folder)
    tok = AutoTokenizer.from_pretrained(folder)
    got = samples(tmp_path / "text", m, ("train", "valid", "test"))
    want = [tok(doc).input_ids for docs in LABELLED.values() for doc in docs]
    assert sorted(got) == sorted(want)
    assert tok.mask_token_id == len(tok) - 1 > 4  # the layout the module constants do not have
    pretrain = samples(tmp_path / "text", m, ("pretrain",))
    assert all(x[0] == tok.bos_token_id and x[-1] == tok.eos_token_id and len(x) <= 16 for x in pretrain)


def test_manifest_preprocessing_is_what_the_folder_dictates_and_shards_are_reproducible(hf, tmp_path):
    folder, raw = hf
    a = run(raw, tmp_path / "a", folder)
    run(raw, tmp_path / "b", folder)
    like = text.like_preprocessing(source(folder, "text", "x"))
    assert a["preprocessing"] == {"tokenizer": "tokenizer.json", "max_tokens": 16, **like}
    assert like == text.like_preprocessing(source(folder, "text", "x"))  # deterministic
    n = json.loads((folder / "config.json").read_text())["vocab_size"]
    assert like["vocab_size"] == n and like["special_ids"] == {
        "bos": 0,
        "pad": 1,
        "eos": 2,
        "unk": 3,
        "mask": n - 1,
    }
    assert like["specials"] == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": n - 1}
    assert a["files"]["tokenizer.json"]["sha256"] == like["tokenizer_sha256"]
    assert (tmp_path / "a/tokenizer.json").read_text() == text.like_tokenizer(source(folder, "text", "x"))[0]
    assert a["preprocess_like"]["kind"] == "hf"
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_pretrain_batches_mask_and_pad_with_the_folder_s_ids(hf, tmp_path):
    folder, raw = hf
    m = run(raw, tmp_path / "text", folder)
    mask_id = m["preprocessing"]["special_ids"]["mask"]
    model = text.config_from_hf(json.loads((folder / "config.json").read_text()))
    assert model.mask_id == 4  # config.json records no mask id: the RoBERTa-base default, wrong here
    with pytest.raises(ValueError, match=rf"mask_id.*{mask_id}.*preprocess_like"):
        build_loader(tmp_path / "text", "pretrain", model, LoaderSpec(batch_size=8, mode="pretrain", seed=0))
    model = replace(model, mask_id=mask_id)
    spec = LoaderSpec(batch_size=8, mode="pretrain", seed=0)
    b = next(iter(build_loader(tmp_path / "text", "pretrain", model, spec)))
    assert b["padding_mask"].any()  # chunks of different lengths: some rows are padded
    assert bool((b["inputs"][b["padding_mask"]] == 1).all())
    assert b["mask"].any() and bool((b["student_inputs"][b["mask"]] == mask_id).all())
    assert not bool((b["inputs"] == mask_id).any())


def d2v_checkpoint(run_dir: Path, shard_dir: Path, manifest: dict) -> Path:
    """A d2v text checkpoint as the stages write one: meta.json with the shards' preprocessing, the
    tokenizer file beside the weights (no weights needed here)."""
    prep = manifest["preprocessing"]
    meta = {"modality": "text", "kind": "pretrain", "preprocessing": prep, "model_config": {}}
    files = {"tokenizer.json": shard_dir / prep["tokenizer"]}
    return checkpoint.save(run_dir, 10, {"w": torch.zeros(1)}, meta, files=files)


def test_a_d2v_checkpoint_gives_the_tokenizer_it_was_trained_with(hf, tmp_path):
    from transformers import AutoTokenizer

    folder, raw = hf
    m = run(raw, tmp_path / "text", folder)
    step = d2v_checkpoint(tmp_path / "run", tmp_path / "text", m)
    again = run(raw, tmp_path / "again", tmp_path / "run")
    assert again["preprocess_like"]["kind"] == "d2v"
    assert (tmp_path / "again/tokenizer.json").read_bytes() == (tmp_path / "text/tokenizer.json").read_bytes()
    assert again["preprocessing"] == m["preprocessing"]
    assert text.like_preprocessing(source(tmp_path / "run", "text", "x")) == text.like_preprocessing(
        source(folder, "text", "x")
    )
    # inference from the checkpoint (embed): <s> ... </s> as transformers, padded with <pad>
    tok = AutoTokenizer.from_pretrained(folder)
    mask_id = m["preprocessing"]["special_ids"]["mask"]
    model = replace(text.config_from_hf(json.loads((folder / "config.json").read_text())), mask_id=mask_id)
    sentence = "the team won the match after a late goal"
    batch = ItemPreprocessing("text", m["preprocessing"], model, step)([f" {sentence}\n", "a dog"])
    assert batch["inputs"][0].tolist() == tok(sentence).input_ids
    short, pad = batch["inputs"][1], batch["padding_mask"][1]
    assert short[~pad].tolist() == tok("a dog").input_ids and set(short[pad].tolist()) == {1}


def test_a_checkpoint_of_our_own_tokenizer_and_old_manifests_keep_their_ids(tmp_path):
    raw = raw_folder(tmp_path)
    own = run(raw, tmp_path / "own", None, vocab_size=300, min_frequency=1)
    assert own["preprocessing"]["special_ids"] == OWN_IDS
    assert own["preprocessing"]["specials"] == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    assert own["preprocessing"]["tokenization"] == "byte-level BPE (no prefix space); <s> ids </s>"
    old = {k: v for k, v in own["preprocessing"].items() if k != "special_ids"}  # written before the entry
    assert text.special_ids(old) == text.special_ids({}) == OWN_IDS
    d2v_checkpoint(tmp_path / "run", tmp_path / "own", {"preprocessing": old})
    like = run(raw, tmp_path / "like", tmp_path / "run")
    assert like["preprocessing"] == own["preprocessing"]
    model = text.model_config({"preset": "tiny", "vocab_size": 300})
    text.data.check_model(old, model)
    x = [torch.tensor([0, 7, 2]), torch.tensor([0, 2])]
    batch = text.data.collate(x, mode="eval", model_cfg=model, prep=old, generator=torch.Generator())
    assert batch["inputs"][1, 2] == 1


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def _config(**over):
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(cfg | over))

    return edit


def _unreadable(folder: Path) -> None:
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            _no_tokenizer,
            r"hf has no tokenizer \(tokenizer.json, or vocab.json \+ merges.txt\).*save_pretrained",
        ),
        (_config(vocab_size=300), r"tokenizer.json does not fit .*config.json: \d+ tokens, more than .* 300"),
        (_config(bos_token_id=3), r"frames a text as \[0, 2\], but config.json has bos_token_id 3"),
        (_config(pad_token_id=3), r"pad token '<pad>' has id 1, but config.json has pad_token_id 3"),
        (_unreadable, r"tokenizer.json: not a readable tokenizer"),
    ],
    ids=["no-tokenizer", "vocab", "framing", "pad", "unreadable"],
)
def test_a_tokenizer_that_is_not_the_model_s_is_refused_before_any_shard(hf, tmp_path, edit, match):
    folder, raw = hf
    edit(folder)
    with pytest.raises(ValueError, match=match) as e:
        run(raw, tmp_path / "text", folder)
    assert str(e.value).startswith("shard.text.preprocess_like: ") and "re-run `d2v shard text`" in str(
        e.value
    )
    assert not (tmp_path / "text").exists() and not (tmp_path / ".text.tmp").exists()


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_checkpoint_without_its_tokenizer_is_refused(hf, tmp_path, damage):
    folder, raw = hf
    m = run(raw, tmp_path / "text", folder)
    step = d2v_checkpoint(tmp_path / "run", tmp_path / "text", m)
    if damage == "changed":
        (step / "tokenizer.json").write_text((step / "tokenizer.json").read_text() + " ")
    else:
        (step / "tokenizer.json").unlink()
    match = "sha256" if damage == "changed" else "missing"
    with pytest.raises(ValueError, match=rf"shard.text.preprocess_like: .*tokenizer.json.*{match}"):
        run(raw, tmp_path / "again", tmp_path / "run")
    assert not (tmp_path / "again").exists() and not (tmp_path / ".again.tmp").exists()
