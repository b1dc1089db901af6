"""W&B tracking: an offline run's records are read back; null tracker when disabled / not rank 0 / missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2v import tracking
from d2v.pretrain import PretrainConfig, pretrain

WANDB = str(Path(sys.executable).parent / "wandb")
WANDB_VARS = ("WANDB_MODE", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR",
              "WANDB_SILENT", "WANDB_ERROR_REPORTING", "DVC_EXP_NAME")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _stop_wandb_service():
    yield
    tracking.teardown()  # the wandb-core service outlives run.finish()


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for var in WANDB_VARS:  # restored after the test; start() sets them for this process
        monkeypatch.delenv(var, raising=False)
    return {"tracking": {"mode": "offline", "dir": str(tmp_path / "wandb")}}


def inspect(run_dir: Path, summary: bool) -> object:
    """``wandb leet inspect --json`` (every record, JSON lines) or ``--summary --json`` (one object)."""
    cmd = [WANDB, "leet", "inspect", *(["--summary"] if summary else []), "--json", str(run_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out) if summary else [json.loads(line) for line in out.splitlines() if line.strip()]


def test_offline_run_holds_config_history_and_summary(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    config = {"pretrain": {"steps": 3, "optim": {"lr": 0.5}}, "seed": 1}
    offline["tracking"]["artifacts"] = "final"
    tr = tracking.start(offline, "pretrain", "audio", config=config)
    assert isinstance(tr, tracking.WandbTracker) and tr.log_checkpoints
    for step in (1, 2, 3):
        tr.log({"pretrain/loss": 1.0 / step, "pretrain/lr": 0.1 * step}, step=step)
    tr.summary({"pretrain/final": 42.0})
    ckpt = tmp_path / "step-00000003"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text("{}")
    tr.artifact(ckpt, "pretrain-audio", "model")
    tr.finish()
    assert tr.run_dir.parent == tmp_path / "wandb" / "wandb" and tr.run_dir.name.startswith("offline-run-")

    s = inspect(tr.run_dir, summary=True)
    assert s["name"] == "pretrain-audio" and s["state"] == "finished" and s["exit_code"] == 0
    assert s["config"]["pretrain"] == {"steps": 3, "optim": {"lr": 0.5}} and s["config"]["seed"] == 1
    assert s["config"]["dvc_exp_name"] == "exp-abc" and "git_commit" in s["config"]
    assert s["summary"]["pretrain/final"] == 42.0 and s["summary"]["pretrain/loss"] == pytest.approx(1 / 3)

    records = inspect(tr.run_dir, summary=False)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["run_group"] == "exp-abc" and run["job_type"] == "pretrain"
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["pretrain/lr"] for h in history] == pytest.approx([0.1, 0.2, 0.3])
    assert any(r["type"] == "artifact" for r in records)


def test_pretrain_logs_its_metrics(offline):
    from d2v.modalities import get

    mod = get("image")
    cfg = mod.model_config({"preset": "tiny"})
    torch.manual_seed(0)
    model = mod.build_pretrain_model(cfg)

    def make_loader(epoch):
        g = torch.Generator().manual_seed(epoch)
        return [{"inputs": torch.randn(2, 3, 28, 28, generator=g), "mask": mod.make_mask(2, cfg, g)}]

    tr = tracking.start(offline, "pretrain", "image", config={})
    c = PretrainConfig(steps=2, batch_size=2, log_every=1, checkpoint_every=2, guard_after=10**9)
    pretrain(model, c, make_loader, Path(offline["tracking"]["dir"]).parent / "ckpt", {}, tracker=tr)
    tr.finish()
    history = [r["history"]["item"] for r in inspect(tr.run_dir, summary=False) if r["type"] == "history"]
    assert len(history) == 2
    for key in ("loss", "lr", "tau", "target_var", "pred_var", "grad_norm", "samples_per_s"):
        assert all(f"pretrain/{key}" in h for h in history), key


def test_null_tracker_when_disabled_not_rank_0_or_not_installed(offline, monkeypatch, tmp_path):
    off = {"tracking": {"mode": "disabled", "dir": str(tmp_path / "w")}}
    assert type(tracking.start(off, "pretrain", "text", config={})) is tracking.NullTracker
    assert type(tracking.start(offline, "pretrain", "text", config={}, rank=1)) is tracking.NullTracker
    monkeypatch.setitem(sys.modules, "wandb", None)  # ``import wandb`` now raises ImportError
    tr = tracking.start(offline, "pretrain", "text", config={})
    assert type(tr) is tracking.NullTracker
    tr.log({"a": 1.0}, step=1)
    tr.summary({"a": 1.0})
    tr.artifact(tmp_path, "x", "model")
    tr.finish()
    assert not (tmp_path / "w").exists() and not (tmp_path / "wandb").exists()
