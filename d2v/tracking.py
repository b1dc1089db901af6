"""Experiment tracking: every stage run logs to W&B (offline by default), or to a null tracker.

``start(params, stage, modality, config=...)`` returns a ``Tracker``: a ``WandbTracker`` on rank 0 when
``tracking.mode`` is offline/online and wandb imports, else ``NullTracker`` (same methods, no effect).
Offline runs land in ``<tracking.dir>/wandb/offline-run-*/run-*.wandb`` and never touch the network
(docs/mlops-stack.md: ``WANDB_MODE=offline`` plus every W&B directory inside the project, error reports off,
no ``wandb sync``). ``wandb sync <run dir>`` uploads them later, by hand.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from d2v.config import TrackingConfig, section


class NullTracker:
    """Tracking switched off (``tracking.mode: disabled``, wandb missing, or a rank other than 0)."""

    run_dir: Path | None = None
    log_checkpoints: bool = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def artifact(self, path: str | Path, name: str, type: str) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, run: Any, log_checkpoints: bool = False) -> None:
        self.run = run
        self.log_checkpoints = log_checkpoints
        self.run_dir = Path(run.dir).parent  # .../offline-run-DATE-ID (``run.dir`` is its files/)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update(metrics)

    def artifact(self, path: str | Path, name: str, type: str) -> None:
        import wandb

        art = wandb.Artifact(name, type=type)
        path = Path(path)
        art.add_dir(str(path)) if path.is_dir() else art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def git_commit(cwd: str | Path = ".") -> str | None:
    """HEAD's commit id, or None outside a git checkout / before the first commit."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def configure_env(cfg: TrackingConfig) -> Path:
    """Offline-safe W&B environment, every directory inside ``cfg.dir`` (explicit env vars still win)."""
    root = Path(cfg.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_MODE"] = cfg.mode
    os.environ.setdefault("WANDB_DIR", str(root))
    for var, sub in (
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
    ):
        os.environ.setdefault(var, str(root / sub))
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    return root


def start(
    params: dict[str, Any],
    stage: str,
    modality: str,
    *,
    config: dict[str, Any],
    name: str | None = None,
    rank: int = 0,
) -> NullTracker:
    """Open the run ``<stage>-<modality>[-<name>]`` grouped by the DVC experiment (``DVC_EXP_NAME``)."""
    cfg = section(params, "tracking", TrackingConfig)
    if cfg.mode == "disabled" or rank != 0:
        return NullTracker()
    try:
        import wandb
    except ImportError:  # W&B is optional at import time
        return NullTracker()
    root = configure_env(cfg)
    exp = os.environ.get("DVC_EXP_NAME")
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        dir=str(root),
        mode=cfg.mode,
        name="-".join(filter(None, (stage, modality, name))),
        group=exp or "workspace",
        job_type=stage,
        config={
            **config,
            "git_commit": git_commit(),
            "dvc_exp_name": exp,
            "stage": stage,
            "modality": modality,
        },
        reinit="create_new",
        # No console capture and no system-stats sampler: nothing to slow the step or reach the network.
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )
    return WandbTracker(run, log_checkpoints=cfg.artifacts == "final")


def teardown() -> None:
    """Stop W&B's background service (it outlives ``run.finish()``): end of a process or of a test run."""
    try:
        import wandb
    except ImportError:
        return
    wandb.teardown()
