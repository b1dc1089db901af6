"""Checkpoints on disk: one directory per saved step, written atomically, the last k kept.

This module is about files only (layout, atomic writes, meta, RNG states, compatibility checks); building
models from a checkpoint is ``d2v.load``.

Layout (other code relies on it)::

    <run_dir>/step-00000100/
        model.safetensors   full module state dict (pretrain: student.*, head.*, teacher.*)
        meta.json           modality, kind, model_config, step, encoder_prefix, config, preprocessing, ...
        train_state.pt      optimizer, scheduler, RNG states, step, data position, loss history
        <files>             preprocessing files that travel with the weights (e.g. tokenizer.json)

A step directory is built under ``<run_dir>/.tmp-*`` and renamed into place, so a run killed at any moment
(SIGKILL included) leaves only complete checkpoints; ``train_state.pt`` is read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from d2v.config import to_dict

Kind = Literal["pretrain", "finetune"]
WEIGHTS, META, STATE = "model.safetensors", "meta.json", "train_state.pt"
PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step directories of ``run_dir``, oldest first (temporary and trashed ones ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [
        p
        for p in run_dir.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and p.name[len(PREFIX) :].isdigit()
        and (p / META).exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve(path: str | Path) -> Path:
    """A step directory: ``path`` itself, or the latest step of the run directory ``path``."""
    path = Path(path)
    if (path / META).exists():
        return path
    last = latest(path)
    if last is None:
        raise ValueError(
            f"{path}: no d2v checkpoint here (expected {path}/{PREFIX}NNNNNNNN/{META}); "
            f"run the stage that writes it first (e.g. `d2v pretrain <modality>`)"
        )
    return last


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((resolve(path) / META).read_text())


def load_weights(path: str | Path) -> dict[str, Tensor]:
    return load_file(str(resolve(path) / WEIGHTS))


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Optimizer/scheduler/RNG/data state; ``weights_only=True``: never unpickles arbitrary objects."""
    return torch.load(resolve(path) / STATE, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- writing


def _cpu_unshared(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors; tied (memory-sharing) entries are cloned, which safetensors requires."""
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def save(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, Tensor],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    *,
    keep: int = 3,
    files: dict[str, Path] | None = None,
) -> Path:
    """Write ``<run_dir>/step-NNNNNNNN`` atomically, then delete all but the newest ``keep`` steps."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_cpu_unshared(model_state), str(tmp / WEIGHTS))
    (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True) + "\n")
    if train_state is not None:
        torch.save(train_state, tmp / STATE)
    for name, src in (files or {}).items():
        shutil.copyfile(src, tmp / name)
    if final.exists():  # the same step again (e.g. the final save of a resumed, finished run)
        _trash(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[: -max(keep, 1)]:
        _trash(old)
    return final


def _trash(path: Path) -> None:
    """Rename out of sight first (atomic), then delete: a kill mid-delete leaves no half checkpoint."""
    gone = path.with_name(f".trash-{path.name}-{os.getpid()}")
    path.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def clean_stale(run_dir: str | Path) -> None:
    """Remove the temporary/trash directories a killed run left behind."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for p in run_dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in run_dir.glob(".trash-*"):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------ RNG states


def rng_state() -> dict[str, Any]:
    """Every RNG the run may draw from, as tensors/ints (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------ validation


def check_compatible(path: str | Path, modality: str, model_config: Any, kind: Kind | None = None) -> None:
    """ValueError naming the checkpoint if it is of another modality/kind or another model config."""
    meta = read_meta(path)
    where = resolve(path)
    if meta.get("modality") != modality:
        raise ValueError(f"{where} is a {meta.get('modality')!r} checkpoint, not {modality!r}")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{where} is a {meta.get('kind')!r} checkpoint, expected a {kind!r} one")
    want = to_dict(model_config)
    diff = sorted(
        k for k in set(want) | set(meta["model_config"]) if want.get(k) != meta["model_config"].get(k)
    )
    if "algorithm" in diff:
        made, want_alg = meta["model_config"].get("algorithm", "data2vec"), want.get("algorithm")
        raise ValueError(
            f"{where} was pretrained by {made}, but model.{modality}.algorithm is {want_alg}: set "
            f"model.{modality}.algorithm: {made} to use it, or pretrain again with {want_alg}"
        )
    if diff:
        raise ValueError(
            f"{where} was trained with another model.{modality} config (differs in {diff}); "
            f"restore those params, or delete/move the checkpoint directory to start afresh"
        )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_run_dir(
    run_dir: str | Path, modality: str, kind: Kind, fingerprint: dict[str, Any], remove: bool = True
) -> bool:
    """Decide between resuming and starting over; True when the run resumes from its last checkpoint.

    ``fingerprint`` is everything that determines the result (model and stage config, seed, data, init).
    The same fingerprint: resume (a killed run continues). Another one (``dvc exp run -S ...`` with the
    persisted checkpoint folder of an earlier run): the old checkpoints are removed and the run starts over,
    so the same params always give the same result. A checkpoint of another modality/kind here means a
    wrong path: ValueError before any work. ``remove``: False on ranks other than 0 (they only decide).
    """
    last = latest(run_dir)
    if last is None:
        return False
    meta = read_meta(last)
    if (meta.get("modality"), meta.get("kind")) != (modality, kind):
        raise ValueError(
            f"{last} is a {meta.get('kind')!r} checkpoint of {meta.get('modality')!r}, not {kind} "
            f"{modality!r}: check paths.checkpoints, or move that folder away"
        )
    new = json.loads(json.dumps(fingerprint))  # tuples -> lists, as read back from meta.json
    old = meta.get("fingerprint") or {}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not diff:
        return True
    if remove:
        print(f"{run_dir}: its checkpoints were made with other settings ({', '.join(diff)}); starting over")
        for ckpt in list_checkpoints(run_dir):
            _trash(ckpt)
    return False
