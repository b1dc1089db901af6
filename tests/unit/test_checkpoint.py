"""Checkpoint layout, atomic writes, pruning, RNG state round trip and rebuilding encoders from meta.json."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import d2v
from d2v import checkpoint
from d2v.config import to_dict
from d2v.load import load_checkpoint_encoder
from d2v.modalities import get


def tiny(modality: str, **over):
    mod = get(modality)
    cfg = mod.model_config({"preset": "tiny", **over})
    torch.manual_seed(0)
    return cfg, mod.build_pretrain_model(cfg)


def meta_for(modality: str, cfg) -> dict:
    return {
        "modality": modality,
        "kind": "pretrain",
        "model_config": to_dict(cfg),
        "encoder_prefix": "student.",
    }


def save_tiny(run_dir, modality: str, step: int = 10, **kw):
    cfg, model = tiny(modality)
    return checkpoint.save(run_dir, step, model.state_dict(), meta_for(modality, cfg), **kw), cfg, model


def test_layout_and_latest(tmp_path):
    for step in (5, 10, 100):
        save_tiny(tmp_path, "image", step, train_state={"step": step}, keep=5)
    (tmp_path / ".tmp-step-00000200-123").mkdir()  # a write killed half-way
    (tmp_path / "notes").mkdir()
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-00000005", "step-00000010", "step-00000100"]
    last = checkpoint.latest(tmp_path)
    assert checkpoint.resolve(tmp_path) == last
    assert sorted(p.name for p in last.iterdir()) == ["meta.json", "model.safetensors", "train_state.pt"]
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 100 and meta["modality"] == "image" and meta["kind"] == "pretrain"
    assert checkpoint.load_train_state(tmp_path) == {"step": 100}
    keys = checkpoint.load_weights(last).keys()
    assert {k.split(".")[0] for k in keys} == {"student", "head", "teacher"}
    checkpoint.clean_stale(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))


def test_keeps_the_last_k_and_overwrites_a_repeated_step(tmp_path):
    for step in (1, 2, 3, 4):
        save_tiny(tmp_path, "image", step, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    save_tiny(tmp_path, "image", 4, keep=2, files={"extra.txt": _write(tmp_path / "x.txt", "hi")})
    assert (checkpoint.latest(tmp_path) / "extra.txt").read_text() == "hi"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp", ".trash"))]


def _write(path, text):
    path.write_text(text)
    return path


def test_tied_tensors_are_saved(tmp_path):
    w = torch.randn(3, 3)
    checkpoint.save(tmp_path, 1, {"a": w, "b": w}, {"modality": "image"})
    sd = checkpoint.load_weights(tmp_path)
    assert torch.equal(sd["a"], w) and torch.equal(sd["b"], w)


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_load_encoder_rebuilds_the_student(tmp_path, modality):
    step_dir, cfg, model = save_tiny(tmp_path, modality)
    enc = load_checkpoint_encoder(tmp_path)
    assert type(enc) is type(model.student) and not enc.training
    sd, ref = enc.state_dict(), model.student.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    assert to_dict(enc.config) == to_dict(cfg)
    same = d2v.load_encoder(step_dir)  # the library entry point dispatches d2v checkpoints here
    assert all(torch.equal(same.state_dict()[k], ref[k]) for k in ref)


def test_load_encoder_from_scratch_is_seeded(tmp_path):
    save_tiny(tmp_path, "image")
    a = load_checkpoint_encoder(tmp_path, pretrained=False, seed=1).state_dict()
    b = load_checkpoint_encoder(tmp_path, pretrained=False, seed=1).state_dict()
    c = load_checkpoint_encoder(tmp_path, pretrained=True).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["stack.blocks.0.attn.qkv.weight"], c["stack.blocks.0.attn.qkv.weight"])


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path / "nothing")):
        load_checkpoint_encoder(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no d2v checkpoint"):
        checkpoint.resolve(tmp_path)


def test_mismatched_checkpoint_is_rejected(tmp_path):
    step_dir, cfg, _ = save_tiny(tmp_path, "image")
    checkpoint.check_compatible(tmp_path, "image", cfg, "pretrain")  # the same: fine
    with pytest.raises(ValueError, match="'image' checkpoint, not 'audio'"):
        checkpoint.check_compatible(tmp_path, "audio", get("audio").model_config({"preset": "tiny"}))
    with pytest.raises(ValueError, match="expected a 'finetune'"):
        checkpoint.check_compatible(tmp_path, "image", cfg, "finetune")
    bigger = get("image").model_config({"preset": "small"})
    with pytest.raises(ValueError, match=r"differs in \[.*transformer"):
        checkpoint.check_compatible(tmp_path, "image", bigger)
    # weights that do not fit the config named in meta.json
    meta = json.loads((step_dir / "meta.json").read_text())
    meta["model_config"] = to_dict(bigger)
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit"):
        load_checkpoint_encoder(step_dir)
    meta["modality"] = "smell"
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        load_checkpoint_encoder(step_dir)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = checkpoint.rng_state()
    checkpoint.save(tmp_path, 1, {"w": torch.zeros(1)}, {"modality": "image"}, {"rng": state})
    expected = (torch.rand(4), random.random(), np.random.rand(2))
    checkpoint.set_rng_state(checkpoint.load_train_state(tmp_path)["rng"])  # weights_only=True inside
    again = (torch.rand(4), random.random(), np.random.rand(2))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2])


def test_prepare_run_dir_resumes_same_settings_and_starts_over_otherwise(tmp_path, capsys):
    fp = {"config": {"lr": 1e-3, "betas": (0.9, 0.98)}, "seed": 0}
    cfg, model = tiny("image")
    assert checkpoint.prepare_run_dir(tmp_path, "image", "pretrain", fp) is False  # nothing there
    checkpoint.save(tmp_path, 2, model.state_dict(), {**meta_for("image", cfg), "fingerprint": fp})
    assert checkpoint.prepare_run_dir(tmp_path, "image", "pretrain", fp) is True  # tuples == JSON lists
    other = {**fp, "seed": 1}
    assert checkpoint.prepare_run_dir(tmp_path, "image", "pretrain", other, remove=False) is False
    assert checkpoint.latest(tmp_path) is not None  # a rank other than 0 only decides
    assert checkpoint.prepare_run_dir(tmp_path, "image", "pretrain", other) is False
    assert "other settings (seed); starting over" in capsys.readouterr().out
    assert checkpoint.latest(tmp_path) is None
    checkpoint.save(tmp_path, 2, model.state_dict(), {**meta_for("image", cfg), "fingerprint": fp})
    with pytest.raises(ValueError, match="'pretrain' checkpoint of 'image', not pretrain 'audio'"):
        checkpoint.prepare_run_dir(tmp_path, "audio", "pretrain", fp)
    with pytest.raises(ValueError, match="not finetune 'image'"):
        checkpoint.prepare_run_dir(tmp_path, "image", "finetune", fp)


# ------------------------------------------------------------------------------------------ integrity


def flip_bit(path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def tensor_data_offset(path) -> int:
    """Where a safetensors file's tensor bytes start (after the 8-byte length and the JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_checksums_are_recorded_and_a_flipped_mantissa_bit_is_detected(tmp_path):
    step_dir, _, _ = save_tiny(tmp_path, "image", train_state={"step": 10},
                               files={"extra.txt": _write(tmp_path / "x.txt", "hi")})  # fmt: skip
    sums = json.loads((step_dir / "meta.json").read_text())["sha256"]
    assert sums == {
        n: checkpoint.file_sha256(step_dir / n) for n in ("model.safetensors", "train_state.pt", "extra.txt")
    }
    weights = step_dir / "model.safetensors"
    # the lowest mantissa bit of the first float32 (little endian): loads fine, changes one weight by 1 ulp
    flip_bit(weights, tensor_data_offset(weights))
    for load in (checkpoint.load_weights, load_checkpoint_encoder, d2v.load_encoder):
        with pytest.raises(
            checkpoint.CheckpointError, match=rf"{weights}: sha256 differs.*rerun `d2v pretrain image`"
        ):
            load(step_dir)
    flip_bit(step_dir / "train_state.pt", 200)
    with pytest.raises(checkpoint.CheckpointError, match=r"train_state\.pt: sha256 differs"):
        checkpoint.load_train_state(step_dir)


def legacy(step_dir):
    """A checkpoint as saved before checksums were recorded."""
    meta = json.loads((step_dir / "meta.json").read_text())
    del meta["sha256"]
    (step_dir / "meta.json").write_text(json.dumps(meta))
    return step_dir


def test_unreadable_files_are_named_even_without_checksums(tmp_path):
    step_dir, _, model = save_tiny(tmp_path, "image", train_state={"step": 10})
    legacy(step_dir)
    sd = checkpoint.load_weights(step_dir)  # no checksum recorded: loads unverified
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    weights, state = step_dir / "model.safetensors", step_dir / "train_state.pt"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(checkpoint.CheckpointError, match=rf"{weights}: unreadable \(.*incomplete metadata"):
        checkpoint.load_weights(step_dir)
    state.write_bytes(state.read_bytes()[:300])
    with pytest.raises(
        checkpoint.CheckpointError, match=rf"{state}: unreadable \(not a complete torch.save archive"
    ):
        checkpoint.load_train_state(step_dir)
    (step_dir / "meta.json").write_text("")
    with pytest.raises(checkpoint.CheckpointError, match=rf"{step_dir / 'meta.json'}: not valid JSON"):
        checkpoint.read_meta(step_dir)


@pytest.mark.parametrize("damage", ["truncate", "mantissa", "meta", "missing", "legacy-truncate"])
def test_latest_intact_sets_a_corrupt_newest_step_aside(tmp_path, capsys, damage):
    for step in (2, 4):
        save_tiny(tmp_path, "image", step, train_state={"step": step})
    newest = tmp_path / "step-00000004"
    weights = newest / "model.safetensors"
    if damage.startswith("legacy"):
        legacy(newest)
    if damage.endswith("truncate"):
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "mantissa":
        flip_bit(weights, tensor_data_offset(weights) + 4)
    elif damage == "meta":
        (newest / "meta.json").write_text("{not json")
    else:
        (newest / "train_state.pt").unlink()
    assert checkpoint.latest(tmp_path) == newest  # the plain listing does not look inside
    assert checkpoint.latest_intact(tmp_path, set_aside=False) == tmp_path / "step-00000002"
    assert newest.exists() and capsys.readouterr().err == ""  # only reported where it is set aside
    assert checkpoint.latest_intact(tmp_path) == tmp_path / "step-00000002"
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 1 and err[0].startswith(f"{newest}: ") and "set aside as corrupt-step-00000004" in err[0]
    )
    assert not newest.exists() and (tmp_path / "corrupt-step-00000004" / "meta.json").exists()  # kept
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000002"]
    # the same step corrupt again later: a second folder beside the first, nothing overwritten
    save_tiny(tmp_path, "image", 4, train_state={"step": 4})
    (newest / "train_state.pt").write_bytes(b"")
    assert checkpoint.latest_intact(tmp_path) == tmp_path / "step-00000002"
    assert capsys.readouterr().err.endswith(
        "set aside as corrupt-step-00000004-2, resuming from step-00000002\n"
    )
    (tmp_path / "step-00000002" / "meta.json").write_text("[]")  # none left: the run starts from scratch
    assert checkpoint.latest_intact(tmp_path) is None
    assert (
        "meta.json: not a JSON object (a list); set aside as corrupt-step-00000002, no intact step left: "
        "starting from scratch" in capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corrupt-step-00000002", "corrupt-step-00000004", "corrupt-step-00000004-2"
    ]  # fmt: skip


def test_prepare_run_dir_skips_a_corrupt_newest_step(tmp_path, capsys):
    fp = {"seed": 0}
    cfg, model = tiny("image")
    for step in (2, 4):
        checkpoint.save(tmp_path, step, model.state_dict(), {**meta_for("image", cfg), "fingerprint": fp})
    (tmp_path / "step-00000004" / "meta.json").write_text("garbage")
    assert checkpoint.prepare_run_dir(tmp_path, "image", "pretrain", fp) is True
    assert "set aside as corrupt-step-00000004" in capsys.readouterr().err
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000002"


# ---------------------------------------------------------------------------------------------- lock

HOLD = """
import sys, time
from d2v.checkpoint import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_run_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path / "ckpt" / "pretrain" / "image"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        busy = rf"{run_dir}: another run is writing it \(pid {proc.pid}"
        with pytest.raises(checkpoint.CheckpointError, match=busy), checkpoint.run_lock(run_dir):
            pass
    finally:
        proc.kill()
        proc.wait()
    with checkpoint.run_lock(run_dir) as lock:  # the kernel dropped the dead holder's lock: taken over
        assert lock == tmp_path / "ckpt" / "pretrain" / "image.lock"  # beside the DVC output, not in it
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists() and not run_dir.exists()


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock = tmp_path / "run.lock"
    lock.write_text(dead.stdout)
    with checkpoint.run_lock(tmp_path / "run") as held:
        assert held == lock and lock.read_text().strip() == str(os.getpid())
        not_reentrant = pytest.raises(checkpoint.CheckpointError, match=f"pid {os.getpid()}")
        with not_reentrant, checkpoint.run_lock(tmp_path / "run"):
            pass
    assert not lock.exists()
