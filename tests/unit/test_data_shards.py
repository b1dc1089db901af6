"""Modality-blind shard pieces: splits, tar writing/reading, atomic publishing, manifest, label budgets."""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from d2v.config import ConfigError
from d2v.data import prepare_raw, shard
from d2v.data.loader import budget_keys
from d2v.data.shards import (
    Item,
    Scan,
    ShardCommon,
    ShardError,
    SplitWriter,
    Task,
    clean_reason,
    files_under,
    iter_shard,
    plan_splits,
    read_manifest,
    split_pool,
    staging_dir,
)
from d2v.modalities.text.data import PrepareConfig, ShardConfig


def items(n: int, labels: int = 2, groups: int | None = None, prefix: str = "x") -> list[Item]:
    return [
        Item(f"{prefix}{i:03d}", i, label=str(i % labels), group=None if groups is None else f"g{i % groups}")
        for i in range(n)
    ]


def test_grouped_split_keeps_groups_disjoint_and_is_seeded():
    pool = items(120, groups=12)
    tr, va, te = split_pool(pool, 0.25, 0.25, random.Random(0), stratify=True)
    groups = [{it.group for it in part} for part in (tr, va, te)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert [len(g) for g in groups] == [6, 3, 3]  # round(0.25 * 12) groups each
    assert len(tr) + len(va) + len(te) == 120
    again = split_pool(pool, 0.25, 0.25, random.Random(0), stratify=True)
    assert again == (tr, va, te)
    other = split_pool(pool, 0.25, 0.25, random.Random(1), stratify=True)
    assert other != (tr, va, te)  # 12!/(6!3!3!) = 18,480 assignments: a collision has odds ~5e-5


def test_stratified_split_keeps_label_proportions():
    pool = items(100, labels=4)
    tr, va, te = split_pool(pool, 0.1, 0.2, random.Random(0), stratify=True)
    assert Counter(it.label for it in te) == {str(c): 5 for c in range(4)}
    assert Counter(it.label for it in va) == {str(c): 2 for c in range(4)}  # round(2.5) = 2 per class
    assert len(tr) == 100 - 20 - 8


def test_plan_splits_pretrain_from_and_caps():
    scan = Scan(
        unlabelled=items(10, labels=1, prefix="u"),
        tasks={"classification": Task(items(50, labels=5), "label")},
    )
    only = plan_splits(scan, ShardCommon(), seed=0)
    assert len(only["pretrain"]) == 10 and all(it.label is None for it in only["pretrain"])
    both = plan_splits(scan, ShardCommon(pretrain_from="unlabelled+labelled", max_train=10), seed=0)
    test_names = {it.name for it in both["test"]}
    assert len(both["train"]) == 10 and Counter(it.label for it in both["train"]) == {
        str(c): 2 for c in range(5)
    }
    assert not test_names & {it.name for it in both["pretrain"]}  # test inputs never leak into pretraining
    assert len(both["pretrain"]) == 10 + 50 - len(test_names)  # the max_train cap is about labels only
    assert all(it.label is None for it in both["pretrain"])
    assert plan_splits(scan, ShardCommon(), seed=0) == only


def test_bad_split_fractions_are_rejected():
    with pytest.raises(ValueError, match="fractions"):
        ShardCommon(valid=0.5, test=0.5)


def write_split(tmp: Path, n: int, per_shard: int) -> list[dict]:
    w = SplitWriter(tmp, "train", per_shard, 1 << 30)
    for i in range(n):
        w.write({"bin": bytes([i]) * (i + 1), "cls": str(i % 3).encode()})
    return w.close()


def test_writer_rotates_shards_and_reader_round_trips(tmp_path):
    shards = write_split(tmp_path, 7, 3)
    assert [s["samples"] for s in shards] == [3, 3, 1]
    samples = [s for sh in shards for s in iter_shard(tmp_path / sh["file"], sh["samples"])]
    assert [s["__key__"] for s in samples] == [f"train-{i:07d}" for i in range(7)]
    assert samples[4]["bin"] == bytes([4]) * 5 and samples[4]["cls"] == b"1"
    with tarfile.open(tmp_path / shards[0]["file"]) as tar:  # fixed metadata: reproducible tars
        assert {(m.mtime, m.uname, m.gname, m.mode) for m in tar.getmembers()} == {
            (0, "bigdata", "bigdata", 0o444)
        }


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary", "garbage"])
def test_corrupt_or_truncated_shard_raises_naming_it(tmp_path, cut):
    shards = write_split(tmp_path, 6, 6)
    path = tmp_path / shards[0]["file"]
    data = path.read_bytes()
    if cut == "mid_member":
        data = data[:1500]
    elif (
        cut == "member_boundary"
    ):  # 2 samples x 2 members x (512 header + 512 data): valid tar, too few samples
        data = data[: 4 * 1024]
    else:
        data = b"not a tar file at all" * 50
    path.write_bytes(data)
    with pytest.raises(ShardError, match=path.name):
        list(iter_shard(path, shards[0]["samples"]))


def test_files_under_follows_linked_folders_once(tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    (elsewhere / "b").mkdir(parents=True)
    (root / "a" / "1.txt").write_text("x")
    (elsewhere / "b" / "2.txt").write_text("y")
    (root / "b").symlink_to(elsewhere / "b")  # a class folder linked in
    (root / "c").symlink_to(elsewhere / "b")  # the same folder linked twice: read once, as b
    (root / "a" / "up").symlink_to(root)  # a loop
    (root / "gone.txt").symlink_to(tmp_path / "missing")  # a broken link is no file
    assert [p.relative_to(root).as_posix() for p in files_under(root)] == ["a/1.txt", "b/2.txt"]
    for link in ("b", "c", "a/up"):
        (root / link).unlink()
    (root / "a" / "z").mkdir()
    (root / "a" / "z" / "3.txt").write_text("z")
    assert files_under(root) == sorted(p for p in root.rglob("*") if p.is_file())  # without links: rglob's


def test_staging_dir_leaves_the_old_output_on_failure(tmp_path):
    final = tmp_path / "out"
    with staging_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), staging_dir(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("crash mid-stage")
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


def test_missing_manifest_says_which_stage_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="d2v shard audio"):
        read_manifest(tmp_path / "audio")


def test_label_budget_per_class_and_fraction(tmp_path):
    (tmp_path / "train.labels.txt").write_text("".join(f"{i % 3}\n" for i in range(30)))
    keys = budget_keys(tmp_path, "train", 4, seed=0)
    labels = {f"train-{i:07d}": i % 3 for i in range(30)}
    assert Counter(labels[k] for k in keys) == {0: 4, 1: 4, 2: 4}
    assert budget_keys(tmp_path, "train", 4, seed=0) == keys
    assert budget_keys(tmp_path, "train", 4, seed=1) != keys  # C(10,4)^3 = 9.3e6 subsets: odds ~1e-7
    assert len(budget_keys(tmp_path, "train", 0.5, seed=0)) == 15
    with pytest.raises(ValueError, match="only 10 samples"):
        budget_keys(tmp_path, "train", 11, seed=0)
    with pytest.raises(ValueError, match="no labels"):
        budget_keys(tmp_path, "pretrain", 1, seed=0)


def test_label_budget_of_a_transcript_split_counts_samples(tmp_path):
    # speech CTC: no classes, so an int budget is that many transcribed samples (finetune.audio.task: ctc)
    splits = {"ctc_train": {"samples": 40, "task": "ctc"}, "pretrain": {"samples": 40}}
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": splits}))
    keys = budget_keys(tmp_path, "ctc_train", 7, seed=0)
    assert len(keys) == 7 and keys <= {f"ctc_train-{i:07d}" for i in range(40)}
    assert budget_keys(tmp_path, "ctc_train", 7, seed=1) != keys
    assert len(budget_keys(tmp_path, "ctc_train", 0.25, seed=0)) == 10
    with pytest.raises(ValueError, match="only 40 samples"):
        budget_keys(tmp_path, "ctc_train", 41, seed=0)
    with pytest.raises(ValueError, match="no labels"):
        budget_keys(tmp_path, "pretrain", 1, seed=0)


def test_skip_reason_replaces_only_the_absolute_path(tmp_path):
    path = str(tmp_path / "files" / "shoe.png")
    item = Item("files/shoe.png", ("file", path))
    reason = f"image failed to decode (UnidentifiedImageError: cannot identify image file '{path}')"
    assert clean_reason(reason, item) == (
        "image failed to decode (UnidentifiedImageError: cannot identify image file 'files/shoe.png')"
    )
    text = Item("files/a.jsonl:3", ("jsonl", "/data/files/a.jsonl", 120))
    assert clean_reason("bad jsonl record in file /data/files/a.jsonl", text) == (
        "bad jsonl record in file files/a.jsonl:3"
    )


@pytest.mark.parametrize("groups", [None, 5])
def test_a_fraction_that_rounds_to_nothing_still_gets_one_group_or_item(groups):
    """5 speakers at valid 0.1 (or 3 items a label at test 0.1) round to empty splits, which the evaluate stage
    cannot use: each still gets one, train keeps the rest; fractions of zero stay empty."""
    pool = items(15, labels=5, groups=groups)  # 3 items a label; 5 groups
    tr, va, te = split_pool(pool, 0.1, 0.1, random.Random(0), stratify=True)
    if groups is None:
        assert len(te) == 1 and len(va) == 1 and len(tr) == 13
    else:
        assert [len({it.group for it in part}) for part in (tr, va, te)] == [3, 1, 1]
    tr, va, te = split_pool(pool, 0.0, 0.1, random.Random(0), stratify=True)
    assert not va and te and len(tr) + len(te) == 15
    two = items(2, labels=1, groups=None if groups is None else 2)
    tr, va, te = split_pool(two, 0.1, 0.1, random.Random(0), stratify=True)
    assert len(tr) == 1 and len(te) == 1 and not va  # train keeps one


def test_pretraining_takes_each_input_once_and_no_task_s_test_input():
    """An input with a label and a transcript is in both tasks, split by each with its own draw: pretraining
    takes it once, and never when either task holds it out for test."""
    both = [Item(f"a{i:02d}", i, label=str(i % 2), transcript="x y", group=f"s{i % 10}") for i in range(40)]
    scan = Scan(
        unlabelled=items(4, labels=1, prefix="u"),
        tasks={"classification": Task(both, "label"), "ctc": Task(both, "transcript", prefix="ctc_")},
    )
    out = plan_splits(scan, ShardCommon(pretrain_from="unlabelled+labelled"), seed=0)
    names = [it.name for it in out["pretrain"]]
    assert len(names) == len(set(names))
    held_out = {it.name for it in out["test"] + out["ctc_test"]}
    assert held_out and not held_out & set(names)
    kept = {it.name for s in ("train", "valid", "ctc_train", "ctc_valid") for it in out[s]} - held_out
    assert set(names) == kept | {f"u{i:03d}" for i in range(4)}


def test_pretrain_tasks_keeps_a_task_s_inputs_out_of_pretraining(tmp_path):
    """``pretrain_tasks`` names the tasks whose train/valid inputs join pretraining: the others' inputs are
    probed on text pretraining never saw, their own splits unchanged; a task the data lacks is an error."""
    scan = Scan(
        unlabelled=items(4, labels=1, prefix="u"),
        tasks={"classification": Task(items(30, prefix="c"), "label"),
               "sentiment": Task(items(20, prefix="s"), "label", prefix="sentiment_")},
    )  # fmt: skip
    every = plan_splits(scan, ShardCommon(pretrain_from="unlabelled+labelled"), seed=0)
    one = plan_splits(scan, ShardCommon(pretrain_from="unlabelled+labelled", pretrain_tasks=("classification",)), 0)
    assert {it.name[0] for it in every["pretrain"]} == {"u", "c", "s"}
    assert {it.name[0] for it in one["pretrain"]} == {"u", "c"}
    assert all(one[s] == every[s] for s in every if s != "pretrain")

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("some unlabelled words to pretrain on.")
    prepare_raw("text", PrepareConfig(source=str(src)), tmp_path / "raw", seed=0)
    with pytest.raises(ConfigError, match=r"shard\.text\.pretrain_tasks names \['sentiment'\]"):
        shard("text", ShardConfig(pretrain_tasks=("sentiment",)), tmp_path / "raw", tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()
