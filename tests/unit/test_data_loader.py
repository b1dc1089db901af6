"""The modality-blind loader: coverage across ranks x workers, seeding, resampling, budgets, bad shards.

Uses tiny image shards (the cheapest modality to decode); the per-modality batch contents are tested in
test_data_{audio,image,text}.py.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2v.data import LoaderSpec, ShardError, build_loader, prepare_raw, read_manifest, shard
from d2v.data.shards import sha256_file
from d2v.modalities import image
from d2v.modalities.image.data import PrepareConfig, ShardConfig

TINY = image.model_config({"preset": "tiny"})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """3 classes x 12 labelled + 12 unlabelled 28 px images; 4 samples per shard."""
    tmp = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    for i in range(12):
        for c in ("a", "b", "c"):
            (tmp / "src" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp / "src" / c / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp / "src" / f"u{i}.png")
    prepare_raw("image", PrepareConfig(source=str(tmp / "src")), tmp / "raw", seed=0)
    shard("image", ShardConfig(samples_per_shard=4, valid=0.0, test=0.25), tmp / "raw", tmp / "image", seed=0)
    return tmp / "image"


def keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["keys"]]


@pytest.mark.parametrize("mode, split", [("pretrain", "pretrain"), ("finetune", "train"), ("eval", "test")])
def test_two_ranks_two_workers_see_every_sample_exactly_once(shards, mode, split):
    n = read_manifest(shards)["splits"][split]["samples"]
    seen = []
    for rank in (0, 1):
        spec = LoaderSpec(batch_size=3, mode=mode, seed=0, num_workers=2, rank=rank, world_size=2)
        loader = build_loader(shards, split, TINY, spec)
        seen += keys(loader)
    assert len(seen) == n and len(set(seen)) == n


def test_same_seed_same_batches_and_epochs_differ(shards):
    def run(epoch: int, workers: int = 2):
        spec = LoaderSpec(
            batch_size=4, mode="pretrain", seed=3, num_workers=workers, shuffle_buffer=8, epoch=epoch
        )
        loader = build_loader(shards, "pretrain", TINY, spec)
        return [(b["keys"], b["mask"], b["inputs"]) for b in loader]

    a, b = run(0), run(0)
    assert [x[0] for x in a] == [x[0] for x in b]
    assert all(torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(a, b))
    # 36 samples in 9 shards: another epoch gives the same order with odds far below 1e-6
    assert [x[0] for x in run(1)] != [x[0] for x in a]
    assert sorted(k for x in run(1) for k in x[0]) == sorted(k for x in a for k in x[0])


def test_set_epoch_reseeds_the_next_pass(shards):
    spec = LoaderSpec(batch_size=4, mode="pretrain", seed=0, epoch=0)
    loader = build_loader(shards, "pretrain", TINY, spec)
    first = keys(loader)
    loader.set_epoch(1)
    second = keys(loader)
    assert second != first and sorted(second) == sorted(first)
    assert keys(build_loader(shards, "pretrain", TINY, replace(spec, epoch=1))) == second


def test_eval_reads_in_shard_order(shards):
    got = keys(build_loader(shards, "test", TINY, LoaderSpec(batch_size=5, mode="eval", seed=0)))
    assert got == sorted(got)


def test_resampled_mode_has_a_fixed_epoch_length(shards):
    for rank in (0, 1):
        spec = LoaderSpec(
            batch_size=4, mode="pretrain", seed=0, resampled=True, epoch_len=7, rank=rank, world_size=2,
            num_workers=2,
        )  # fmt: skip
        loader = build_loader(shards, "pretrain", TINY, spec)
        batches = list(loader)
        assert len(batches) == 7 and {len(b["keys"]) for b in batches} == {4}


def test_label_budget(shards):
    spec = LoaderSpec(batch_size=4, mode="finetune", seed=0, label_budget=2)
    labels = torch.cat([b["labels"] for b in build_loader(shards, "train", TINY, spec)])
    assert Counter(labels.tolist()) == {0: 2, 1: 2, 2: 2}
    with pytest.raises(ValueError, match="only 9 samples"):
        build_loader(shards, "train", TINY, replace(spec, label_budget=10))


def test_finetune_masks_are_speech_only(shards):
    from d2v.modalities.audio import FinetuneMask

    with pytest.raises(ValueError, match=r"speech recipe.*finetune.image.mask"):
        spec = LoaderSpec(batch_size=4, mode="finetune", seed=0, finetune_mask=FinetuneMask())
        build_loader(shards, "train", TINY, spec)


def test_corrupt_shard_raises_an_error_naming_it_not_a_hang(shards, tmp_path):
    bad = tmp_path / "image"
    shutil.copytree(shards, bad)
    victim = sorted(bad.glob("pretrain-*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:1800])
    with pytest.raises(ShardError, match=victim.name):
        spec = LoaderSpec(batch_size=4, mode="pretrain", seed=0, num_workers=2)
        keys(build_loader(bad, "pretrain", TINY, spec))


@pytest.mark.parametrize("split, mode", [("pretrain", "pretrain"), ("train", "finetune"), ("test", "eval")])
def test_flipped_bytes_are_caught_before_any_batch(shards, tmp_path, split, mode):
    """A flipped byte inside a sample's payload reads as a valid tar (pixels silently changed): only the
    manifest's sha256 tells, and the loader checks it when it is built."""
    bad = tmp_path / "image"
    shutil.copytree(shards, bad)
    victim = bad / read_manifest(bad)["splits"][split]["shards"][-1]["file"]
    data = bytearray(victim.read_bytes())
    data[512 + 100] ^= 0x10  # inside the first member's data (after its 512-byte header)
    victim.write_bytes(bytes(data))
    with pytest.raises(
        ShardError, match=rf"{victim}: sha256 differs .*`dvc repro -f shard@image` \(or `d2v shard image`\)"
    ):
        build_loader(bad, split, TINY, LoaderSpec(batch_size=4, mode=mode, seed=0))
    (bad / "tokenizer.json").write_text("{}")  # side files too (not listed in an image manifest: ignored)
    (bad / "train.labels.txt").write_text("0\n")
    with pytest.raises(ShardError, match=r"train\.labels\.txt: sha256 differs"):
        build_loader(bad, "pretrain", TINY, LoaderSpec(batch_size=4, mode="pretrain", seed=0))
    (bad / "train.labels.txt").unlink()
    with pytest.raises(ShardError, match=r"train\.labels\.txt: missing"):
        build_loader(bad, "pretrain", TINY, LoaderSpec(batch_size=4, mode="pretrain", seed=0))


def test_each_file_is_hashed_once_per_process_unless_it_changes(shards, tmp_path, monkeypatch):
    from d2v.data import shards as shards_module

    copy = tmp_path / "image"
    shutil.copytree(shards, copy)
    hashed = []
    real = shards_module.sha256_file
    monkeypatch.setattr(shards_module, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    for epoch in range(3):  # the stages rebuild the loader every epoch
        build_loader(copy, "pretrain", TINY, LoaderSpec(batch_size=4, mode="pretrain", seed=0, epoch=epoch))
    manifest = read_manifest(copy)
    n = len(manifest["splits"]["pretrain"]["shards"]) + len(manifest["files"])  # shards + labels files
    assert len(hashed) == len(set(hashed)) == n
    first = copy / "pretrain-000000.tar"
    first.write_bytes(first.read_bytes())  # rewritten (same bytes, new mtime): hashed again, and passes
    hashed.clear()
    build_loader(copy, "pretrain", TINY, LoaderSpec(batch_size=4, mode="pretrain", seed=0))
    assert hashed == ["pretrain-000000.tar"]


def test_a_sample_that_cannot_be_decoded_names_shard_and_key(shards, tmp_path):
    import tarfile

    from d2v.data.shards import SplitWriter

    bad = tmp_path / "image"
    shutil.copytree(shards, bad)
    entry = read_manifest(bad)["splits"]["test"]["shards"][0]
    with tarfile.open(bad / entry["file"]) as tar:
        names = sorted({m.name.split(".")[0] for m in tar.getmembers()})
    w = SplitWriter(tmp_path, "test", 100, 1 << 30)
    for _ in names:
        w.write({"png": b"garbage", "cls": b"0"})
    w.close()
    shutil.copyfile(tmp_path / "test-000000.tar", bad / entry["file"])
    manifest = json.loads((bad / "manifest.json").read_text())  # a shard that matches its manifest
    manifest["splits"]["test"]["shards"][0]["sha256"] = sha256_file(bad / entry["file"])
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match=r"test-000000\.tar: sample test-0000000 cannot be decoded"):
        keys(build_loader(bad, "test", TINY, LoaderSpec(batch_size=4, mode="eval", seed=0)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "train"}, "mode"),
        ({"split": "pretrain", "mode": "finetune"}, "no labels"),
        ({"split": "nope"}, "no split 'nope'"),
        ({"resampled": True}, "epoch_len"),
        ({"rank": 0, "world_size": 50}, "ranks"),
        ({"rank": 3, "world_size": 2}, "rank 3"),
    ],
)
def test_bad_arguments_are_explained(shards, kwargs, match):
    args = {"split": "train", "mode": "eval", **kwargs}
    split = args.pop("split")
    with pytest.raises(ValueError, match=match):
        build_loader(shards, split, TINY, LoaderSpec(batch_size=2, seed=0, **args))
