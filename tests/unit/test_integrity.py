"""Integrity end to end, through the CLI: corrupt shards and checkpoints are caught and named, never trained
on or trusted; every expected failure is one line and exit code 2 (``--debug`` keeps the traceback); two
writers never share a checkpoint folder.

One tiny image project (prepare, shard, 4 pretraining steps, one 2-step fine-tuning run) is built once and
copied for each test.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_resume import write_params

from d2v import checkpoint
from d2v.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        write_params(root / "params.yaml")
        for argv in (["prepare", "image"], ["shard", "image"], ["pretrain", "image"], ["finetune", "image"]):
            assert main(argv) == 0
    return root


@pytest.fixture
def project(built, tmp_path, monkeypatch, capsys) -> Path:
    root = tmp_path / "project"
    shutil.copytree(built, root)
    monkeypatch.chdir(root)
    Image.new("L", (28, 28)).save("x.png")  # an intact item to embed: the checkpoint is what is at fault
    capsys.readouterr()
    return root


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


PROGRESS = re.compile(r"\d+%\||\d+ ?(?:item|it)/s|\?(?:item|it)/s")
"""A tqdm bar's line: ``... 35%|###  | 7/20 [00:01<00:02, 6.1item/s]``."""


def error_line(capsys) -> str:
    """The one line of stderr besides progress bars (tqdm's, and the blanks that clear them)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(err) == 1, err
    return err[0]


PRETRAIN = Path("ckpt/pretrain/image")
FINETUNE = Path("ckpt/finetune/image/b2-s0-pretrained")


# -------------------------------------------------------------------------------------------- shards


@pytest.mark.parametrize(
    "argv, split, untouched",
    [
        (["pretrain", "image"], "pretrain", PRETRAIN),
        (["finetune", "image"], "train", FINETUNE),
        (
            ["evaluate", "image", "--init", "pretrained", "--budget", "2", "--seed", "0"],
            "test",
            "metrics/image.json",
        ),
    ],
)
def test_a_corrupt_shard_stops_every_stage_before_any_step(project, capsys, argv, split, untouched):
    shutil.rmtree(project / "ckpt" / "pretrain" / "image") if split == "pretrain" else None
    shutil.rmtree(project / "ckpt" / "finetune") if split == "train" else None
    shards = sorted((project / "shards" / "image").glob(f"{split}-*.tar"))
    flip(shards[-1], 512 + 100, 0x10)  # a byte of the first member's payload: still a valid tar
    assert main(argv) == 2
    assert error_line(capsys) == (
        f"d2v {argv[0]}: error: shards/image/{shards[-1].name}: sha256 differs from manifest.json (corrupt or "
        "modified shard); rebuild the shards with `dvc repro -f shard@image` (or `d2v shard image`)"
    )
    assert not (project / untouched).exists()  # nothing trained or written
    with pytest.raises(ValueError, match="sha256 differs"):  # --debug: the exception, with its traceback
        main(["--debug", *argv])


# --------------------------------------------------------------------------------------- checkpoints


def test_a_corrupt_checkpoint_is_named_by_every_command_that_loads_it(project, capsys):
    weights = PRETRAIN / "step-00000004" / "model.safetensors"
    flip(weights, 8 + int.from_bytes(weights.read_bytes()[:8], "little"))  # the lowest mantissa bit
    expected = (
        f"{weights}: sha256 differs from the one meta.json recorded (corrupt or modified checkpoint); "
        "rerun `d2v pretrain image` (or `dvc repro`): a rerun sets the step aside and resumes from the "
        "newest intact one"
    )
    for argv in (
        ["embed", str(PRETRAIN), "x.png", "--out", "f.npy"],
        ["export-hf", str(PRETRAIN), "hf"],
        ["finetune", "image", "--budget", "1"],  # its pretrained source
        ["evaluate", "image", "--init", "pretrained", "--budget", "2", "--seed", "0"],  # the linear probe
    ):
        assert main(argv) == 2, argv
        assert error_line(capsys) == f"d2v {argv[0]}: error: {expected}"
    assert not Path("hf").exists() and not Path("f.npy").exists()


@pytest.mark.parametrize(
    "damage", ["truncated weights", "truncated train state", "garbage meta.json", "mantissa bit"]
)
def test_rerunning_the_stage_sets_a_corrupt_step_aside_and_resumes(project, capsys, damage):
    step = PRETRAIN / "step-00000004"
    final = {k: v.clone() for k, v in checkpoint.load_weights(step).items()}  # not the file's mmap
    if damage == "truncated weights":
        (step / "model.safetensors").write_bytes((step / "model.safetensors").read_bytes()[:5000])
    elif damage == "truncated train state":
        (step / "train_state.pt").write_bytes((step / "train_state.pt").read_bytes()[:5000])
    elif damage == "garbage meta.json":
        (step / "meta.json").write_text("Expecting value")
    else:
        weights = step / "model.safetensors"
        flip(weights, 8 + int.from_bytes(weights.read_bytes()[:8], "little") + 2)
    assert main(["pretrain", "image"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "set aside" in line]
    assert (
        len(err) == 1
        and err[0].startswith(f"{step}: ")
        and err[0].endswith("set aside as corrupt-step-00000004, resuming from step-00000002")
    )
    assert (PRETRAIN / "corrupt-step-00000004").is_dir()
    again = checkpoint.load_weights(step)  # steps 3-4 redone from step 2: the same weights, bit for bit
    assert {k for k in final if not torch.equal(final[k], again[k])} == set()


def test_unreadable_checkpoint_files_are_one_line_naming_the_file(project, capsys):
    step = PRETRAIN / "step-00000004"
    meta = step / "meta.json"
    meta_text = meta.read_text()
    meta.write_text("")
    assert main(["embed", str(step), "x.png", "--out", "f.npy"]) == 2
    assert error_line(capsys).startswith(f"d2v embed: error: {meta}: not valid JSON (Expecting value: line 1")
    meta.write_text(meta_text)
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert main(["export-hf", str(step), "hf"]) == 2
    assert error_line(capsys).startswith(f"d2v export-hf: error: {weights}: ")


def test_export_hf_onto_an_existing_file_names_it(project, capsys):
    Path("taken").write_text("mine")
    assert main(["export-hf", str(PRETRAIN), "taken"]) == 2
    assert error_line(capsys) == (
        "d2v export-hf: error: taken: exists and is not a folder; name a new output folder (or remove the file)"
    )
    assert Path("taken").read_text() == "mine"
    for argv in (
        ["--debug", "export-hf", str(PRETRAIN), "taken"],
        ["export-hf", "--debug", str(PRETRAIN), "taken"],
    ):
        with pytest.raises(ValueError, match="taken: exists"):
            main(argv)
    assert main(["export-hf", str(PRETRAIN), "hf"]) == 0


def test_a_worker_error_prints_the_original_message_only():
    from d2v.cli import message

    wrapped = ValueError(
        "Caught ShardError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\nd2v.data.shards.ShardError: a.tar: sample a-0 cannot be decoded'
    )
    assert message(wrapped) == "a.tar: sample a-0 cannot be decoded"
    assert message(ValueError("plain")) == "plain"


# --------------------------------------------------------------------------------------------- lock


def test_a_second_writer_of_a_run_folder_is_refused(project, capsys):
    import os

    with checkpoint.run_lock(PRETRAIN):  # as if an orphaned `d2v pretrain` of a killed `dvc repro` held it
        assert main(["pretrain", "image"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"d2v pretrain: error: {PRETRAIN}: another run is writing it (pid {os.getpid()}")
    assert main(["pretrain", "image"]) == 0  # released
    assert not Path(f"{PRETRAIN}.lock").exists()
