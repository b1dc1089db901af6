"""A pretraining run SIGKILLed mid-way and restarted ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from d2v import checkpoint
from d2v.load import load_finetune_model

ROOT = Path(__file__).resolve().parents[2]

# One process = one run of ``pretrain`` on a tiny image model with dropout and drop path switched on (so
# the RNG matters), 3 batches per epoch (so the run crosses epochs), 2 accumulation micro-steps, and a hook
# that SIGKILLs the process right after optimizer step ``kill_at``.
DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from d2v.modalities import get
    from d2v.optim import OptimConfig
    from d2v.pretrain import PretrainConfig, pretrain

    run_dir, steps, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    mod = get("image")
    cfg = mod.model_config({"preset": "tiny", "transformer": {"dropout": 0.1, "drop_path": 0.1}})
    torch.manual_seed(0)
    model = mod.build_pretrain_model(cfg)

    def make_loader(epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(3):
            yield {"inputs": torch.randn(2, 3, 28, 28, generator=g), "mask": mod.make_mask(2, cfg, g)}

    def after_step(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    c = PretrainConfig(steps=steps, batch_size=4, grad_accum=2, log_every=2, checkpoint_every=4,
                       keep_checkpoints=1, guard_after=10**9, optim=OptimConfig(lr=2e-3, warmup=0.25))
    pretrain(model, c, make_loader, run_dir, {"modality": "image"}, seed=7, after_step=after_step)
    """
)


def run_driver(tmp_path: Path, run_dir: Path, steps: int, kill_at: int = -1) -> int:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script), str(run_dir), str(steps), str(kill_at)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode


def test_sigkill_and_resume_gives_the_uninterrupted_weights(tmp_path):
    n = 4
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert run_driver(tmp_path, reference, 2 * n) == 0

    # killed after step n + 2: the last checkpoint is step n, steps n+1..n+2 are lost and redone
    assert run_driver(tmp_path, resumed, 2 * n, kill_at=n + 2) == -signal.SIGKILL
    assert [p.name for p in checkpoint.list_checkpoints(resumed)] == [f"step-{n:08d}"]
    (resumed / ".tmp-step-00000008-999").mkdir()  # as if a kill had hit a checkpoint write
    assert run_driver(tmp_path, resumed, 2 * n) == 0
    assert not list(resumed.glob(".tmp-*"))

    # Same ops in the same order on CPU with one thread: bitwise equality (tolerance 0) is expected.
    a, b = checkpoint.load_weights(reference), checkpoint.load_weights(resumed)
    assert a.keys() == b.keys()
    assert {k for k in a if not torch.equal(a[k], b[k])} == set()
    sa, sb = checkpoint.load_train_state(reference), checkpoint.load_train_state(resumed)
    assert sa["step"] == sb["step"] == 2 * n
    assert sa["history"] == sb["history"] and len(sa["history"]) == n  # the loss curve has no gap/duplicate
    assert sa["data"] == sb["data"] == [{"epoch": 5, "index": 1}]  # 16 micro-batches at 3 per epoch
    moments = [
        (s["exp_avg"], sb["optimizer"]["state"][i]["exp_avg"]) for i, s in sa["optimizer"]["state"].items()
    ]
    assert all(torch.equal(x, y) for x, y in moments)


def test_a_finished_run_is_not_retrained(tmp_path):
    from d2v.modalities import get
    from d2v.pretrain import PretrainConfig, pretrain

    mod = get("image")
    cfg = mod.model_config({"preset": "tiny"})

    def make_loader(epoch):
        g = torch.Generator().manual_seed(epoch)
        return [{"inputs": torch.randn(2, 3, 28, 28, generator=g), "mask": mod.make_mask(2, cfg, g)}]

    c = PretrainConfig(steps=2, batch_size=2, log_every=1, checkpoint_every=2, guard_after=10**9)
    torch.manual_seed(0)
    pretrain(mod.build_pretrain_model(cfg), c, make_loader, tmp_path, {})
    before = checkpoint.load_weights(tmp_path)
    steps_run = []
    torch.manual_seed(1)  # another init: the checkpoint must win
    history = pretrain(
        mod.build_pretrain_model(cfg), c, make_loader, tmp_path, {}, after_step=steps_run.append
    )
    assert steps_run == [] and [r["step"] for r in history] == [1, 2]
    after = checkpoint.load_weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)


def tiny_pretrain(run_dir: Path, steps: int = 6, init_seed: int = 0, after_step=None):
    """A tiny image pretraining run in-process (checkpoints every 2 steps, all kept)."""
    from d2v.modalities import get
    from d2v.pretrain import PretrainConfig, pretrain

    mod = get("image")
    cfg = mod.model_config({"preset": "tiny", "transformer": {"dropout": 0.1}})

    def make_loader(epoch):
        g = torch.Generator().manual_seed(epoch)
        return [{"inputs": torch.randn(2, 3, 28, 28, generator=g), "mask": mod.make_mask(2, cfg, g)}] * 2

    c = PretrainConfig(steps=steps, batch_size=2, log_every=1, checkpoint_every=2, keep_checkpoints=5,
                       guard_after=10**9)  # fmt: skip
    torch.manual_seed(init_seed)
    return pretrain(mod.build_pretrain_model(cfg), c, make_loader, run_dir, {}, seed=3, after_step=after_step)


@pytest.mark.parametrize("damage", ["truncated weights", "flipped mantissa bit", "truncated train state"])
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    tmp_path, capsys, damage
):
    reference, run = tmp_path / "reference", tmp_path / "run"
    tiny_pretrain(reference)
    tiny_pretrain(run)
    newest = run / "step-00000006"
    victim = newest / ("train_state.pt" if "state" in damage else "model.safetensors")
    data = bytearray(victim.read_bytes())
    if "truncated" in damage:
        data = data[: len(data) // 2]
    else:
        data[8 + int.from_bytes(data[:8], "little")] ^= 1  # the first weight's lowest mantissa bit
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    steps_run: list[int] = []
    tiny_pretrain(run, init_seed=1, after_step=steps_run.append)
    assert steps_run == [5, 6]  # resumed from step 4, the newest intact one
    err = [line for line in capsys.readouterr().err.splitlines() if "set aside" in line]
    assert len(err) == 1 and err[0].startswith(f"{newest}: {victim.name}: ")
    assert (run / "corrupt-step-00000006" / victim.name).read_bytes() == bytes(data)  # kept as it was
    a, b = checkpoint.load_weights(reference), checkpoint.load_weights(run)
    assert {k for k in a if not torch.equal(a[k], b[k])} == set()  # bit-exact resume (CPU, tolerance 0)


def test_halt_note_names_the_newest_intact_checkpoint(tmp_path):
    from d2v import loop, runner

    for step in (2, 4):
        checkpoint.save(tmp_path, step, {"w": torch.ones(3) * step}, {"modality": "image"}, {"step": step})
    weights = tmp_path / "step-00000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x40  # an exponent bit of the last weight: the run would diverge from it
    weights.write_bytes(bytes(data))
    halted = pytest.raises(loop.TrainingHalted, match=r"the last good checkpoint is \S*step-00000002;")
    with halted, runner.halt_note(tmp_path):
        raise loop.TrainingHalted("non-finite loss")
    assert weights.exists()  # named, not moved: the rerun sets it aside


# ------------------------------------------------------------------------------- the CLI on real shards


def write_params(path: Path, **over) -> None:
    import yaml

    params = {
        "seed": 0,
        "paths": {
            "raw": "raw",
            "shards": "shards",
            "checkpoints": "ckpt",
            "metrics": "metrics",
            "plots": "plots",
        },
        "tracking": {"mode": "disabled"},
        "prepare": {"image": {"max_train": 60, "max_test": 20}},
        "shard": {"image": {"samples_per_shard": 20}},
        "model": {"image": {"preset": "tiny"}},
        "pretrain": {"image": {"steps": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 2}},
        "finetune": {"image": {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 2}},
        "sweep": {"budgets": [2], "seeds": [0]},
    }
    for key, value in over.items():
        params[key]["image"].update(value)
    path.write_text(yaml.safe_dump(params))


def test_cli_pretrain_resume_and_finetune_on_image_shards(tmp_path, monkeypatch, capsys):
    from d2v.cli import main

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    assert main(["prepare", "image"]) == 0 and main(["shard", "image"]) == 0
    assert main(["pretrain", "image"]) == 0
    run = tmp_path / "ckpt" / "pretrain" / "image"
    meta = checkpoint.read_meta(run)
    assert meta["kind"] == "pretrain" and meta["step"] == 4 and meta["encoder_prefix"] == "student."
    assert meta["preprocessing"]["image_size"] == 28 and meta["config"]["steps"] == 4
    metrics = json.loads((tmp_path / "metrics" / "pretrain" / "image.json").read_text())
    logged = ("loss", "target_var", "pred_var", "lr", "tau", "steps", "seconds", "samples_per_s")
    counts = ("encoder_params", "stack_params")  # the report's parameter counts (the joint model's section)
    assert set(metrics) == {f"pretrain/{k}" for k in (*logged, *counts)}
    assert 0 < metrics["pretrain/stack_params"] < metrics["pretrain/encoder_params"]
    # the report's run-time table: wall seconds of training, and the samples/s they imply (batch 8, 4 steps)
    assert metrics["pretrain/seconds"] > 0
    assert metrics["pretrain/samples_per_s"] == pytest.approx(32 / metrics["pretrain/seconds"], rel=1e-3)
    curve = (tmp_path / "plots" / "pretrain" / "image.csv").read_text().splitlines()
    assert curve[0] == "step,loss,target_var,pred_var,lr,tau" and len(curve) == 3

    # the same params again: resumes at the end, nothing is retrained; logging settings do not matter
    weights = checkpoint.load_weights(run)
    write_params(tmp_path / "params.yaml", pretrain={"log_every": 1, "keep_checkpoints": 1})
    assert main(["pretrain", "image"]) == 0
    assert all(torch.equal(weights[k], v) for k, v in checkpoint.load_weights(run).items())
    again = json.loads((tmp_path / "metrics" / "pretrain" / "image.json").read_text())
    saved = metrics["pretrain/seconds"]  # what the first run measured, kept in its metrics file
    assert 0 < saved <= again["pretrain/seconds"] < saved + 5  # counted on from it, not from zero
    assert "seconds" not in checkpoint.load_train_state(run)  # timings never enter a checkpoint

    # other params (dvc exp run -S ... with the persisted folder): the old checkpoints go, the run starts over
    capsys.readouterr()
    write_params(tmp_path / "params.yaml", pretrain={"steps": 6})
    assert main(["pretrain", "image"]) == 0
    assert "made with other settings (config); starting over" in capsys.readouterr().out
    state = checkpoint.load_train_state(run)
    assert state["step"] == 6 and [r["step"] for r in state["history"]] == [2, 4, 6]
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-00000004", "step-00000006"]

    # other code (a pull that changed d2v/, so DVC reruns the stage): starts over, never resumes the old
    # code's finished checkpoint as the new code's
    from d2v import runner

    monkeypatch.setattr(runner, "code_fingerprint", lambda: "another version of d2v")
    assert main(["pretrain", "image"]) == 0
    assert "made with other settings (code); starting over" in capsys.readouterr().out
    assert checkpoint.read_meta(run)["fingerprint"]["code"] == "another version of d2v"

    write_params(tmp_path / "params.yaml")
    assert main(["finetune", "image"]) == 0
    assert main(["finetune", "image", "--init", "scratch", "--budget", "0.5", "--seed", "1"]) == 0
    names = sorted(p.name for p in (tmp_path / "metrics" / "finetune" / "image").iterdir())
    assert names == ["b0.5-s1-scratch.json", "b2-s0-pretrained.json"]
    model, meta = load_finetune_model(tmp_path / "ckpt" / "finetune" / "image" / "b2-s0-pretrained")
    assert meta["init"] == "pretrained" and meta["num_classes"] == 10 and meta["budget"] == 2
    assert meta["pretrained_from"].endswith("step-00000006")


def test_a_forced_rerun_from_scratch_writes_byte_identical_checkpoints(tmp_path, monkeypatch):
    """The same params from scratch (``dvc repro -f`` after deleting the folder) give the same bytes, so DVC
    keeps every downstream stage. A new process starts Python's and NumPy's global RNGs from OS entropy:
    seeded differently here, as two processes would be."""
    import hashlib
    import random
    import shutil

    import numpy as np

    from d2v.cli import main

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    assert main(["prepare", "image"]) == 0 and main(["shard", "image"]) == 0
    run = tmp_path / "ckpt" / "pretrain" / "image"

    def from_scratch(entropy: int) -> dict[str, str]:
        random.seed(entropy)
        np.random.seed(entropy)
        shutil.rmtree(run, ignore_errors=True)
        assert main(["pretrain", "image"]) == 0
        return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*")
                if p.is_file()}  # fmt: skip

    first = from_scratch(1)
    assert sorted(first) == [f"step-0000000{s}/{f}" for s in (2, 4)
                             for f in ("meta.json", "model.safetensors", "train_state.pt")]  # fmt: skip
    assert from_scratch(2) == first
