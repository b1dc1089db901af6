"""Checkpoints on disk: one directory per saved step, written atomically, the last k kept.

This module is about files only (layout, atomic writes, meta, RNG states, compatibility checks); building
models from a checkpoint is ``d2v.load``.

Layout (other code relies on it)::

    <run_dir>/step-00000100/
        model.safetensors   full module state dict (pretrain: student.*, head.*, teacher.*)
        meta.json           modality, kind, model_config, step, encoder_prefix, config, preprocessing, ...,
                            sha256: {file name: sha256} of every other file of the step
        train_state.pt      optimizer, scheduler, RNG states, step, data position, loss history
        <files>             preprocessing files that travel with the weights (e.g. tokenizer.json)
    <run_dir>/corrupt-step-00000200/   a step that failed its checks on resume, set aside (never deleted)
    <run_dir>.lock                     held by the run writing <run_dir> (:func:`run_lock`)

A step directory is built under ``<run_dir>/.tmp-*`` and renamed into place, so a run killed at any moment
(SIGKILL included) leaves only complete checkpoints; ``train_state.pt`` is read with ``weights_only=True``.
Whatever damages a step later (a bad disk, a truncated copy, an edit) is caught by the sha256 sums: every
load checks the file it reads, and a resume skips a damaged step (:func:`latest_intact`). Anything wrong
with a checkpoint file is a :class:`CheckpointError` naming it and saying what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import random
import shutil
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from d2v.config import to_dict

Kind = Literal["pretrain", "finetune"]
WEIGHTS, META, STATE = "model.safetensors", "meta.json", "train_state.pt"
PREFIX = "step-"
CORRUPT = "corrupt-"
"""A step that failed its checks is renamed ``corrupt-step-NNNNNNNN`` (ignored by :func:`list_checkpoints`)."""
CHECKSUMS = "sha256"
"""The meta.json key: file name -> sha256 of the weights, the train state and the copied files."""


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or differs from the sha256 meta.json recorded (or a
    run folder another run is writing).

    ``file`` and ``what`` name it; the message adds what to do (``todo``, by default how to rerun the stage
    that wrote it, from its ``meta``). A ValueError so the CLI prints it.
    """

    def __init__(
        self, file: str | Path, what: str, meta: dict[str, Any] | None = None, todo: str | None = None
    ):
        self.file, self.what = Path(file), what
        super().__init__(f"{file}: {what}; {todo or rerun_hint(meta or {})}")


def rerun_hint(meta: dict[str, Any]) -> str:
    """How to get an intact checkpoint back: rerun the stage that wrote it (named from its meta)."""
    kind, m = meta.get("kind"), meta.get("modality")
    if kind == "finetune" and m and all(k in meta for k in ("budget", "seed", "init")):
        stage = f"`d2v finetune {m} --budget {meta['budget']} --seed {meta['seed']} --init {meta['init']}`"
    elif kind in ("pretrain", "finetune") and m:
        stage = f"`d2v {kind} {m}`"
    else:
        stage = "the stage that wrote it"
    return (
        f"rerun {stage} (or `dvc repro`): a rerun sets the step aside and resumes from the newest intact one"
    )


def _brief(e: BaseException) -> str:
    """The first line (and sentence) of an error from a file reader."""
    lines = str(e).strip().splitlines()
    return lines[0].split(". ")[0] if lines else type(e).__name__


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step directories of ``run_dir``, oldest first (temporary, trashed and corrupt ones ignored).

    A listing only: nothing is read or checked (:func:`latest_intact` checks).
    """
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
    """meta.json of a step (or of the latest step of a run directory); CheckpointError unless a JSON object."""
    file = resolve(path) / META
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(file, f"not valid JSON ({_brief(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(file, f"not a JSON object (a {type(meta).__name__})")
    return meta


def _check_file(step_dir: Path, name: str, meta: dict[str, Any], look: bool = False) -> Path:
    """``step_dir/name`` if it exists and matches the sha256 meta.json recorded (a full read); else
    CheckpointError. Steps saved before sums were recorded cannot be verified: with ``look``, the file is
    only checked to open as what it is (the safetensors header, the train state's zip directory)."""
    file = step_dir / name
    if not file.is_file():
        raise CheckpointError(
            file, "missing (meta.json records it)" if CHECKSUMS in meta else "missing", meta
        )
    sums = meta.get(CHECKSUMS)
    if sums is not None:
        if name in sums and file_sha256(file) != sums[name]:
            raise CheckpointError(
                file, "sha256 differs from the one meta.json recorded (corrupt or modified checkpoint)", meta
            )
    elif look:
        problem = _does_not_open(file)
        if problem:
            raise CheckpointError(file, f"unreadable ({problem})", meta)
    return file


def _does_not_open(file: Path) -> str | None:
    """Why the weights or the train state do not even open (a cheap look at the header / zip directory)."""
    try:
        if file.name == WEIGHTS:
            with safe_open(str(file), "pt"):
                pass
        elif file.name == STATE:
            zipfile.ZipFile(file).close()
    except SafetensorError as e:
        return _brief(e)
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a complete torch.save archive: {_brief(e)}"
    return None


def verify(path: str | Path) -> Path:
    """The step directory of ``path`` once every file of it is intact; CheckpointError naming the first
    that is not (meta.json unreadable, a file missing or differing from its recorded sha256).

    Checkpoints saved before sums were recorded (no ``sha256`` in meta.json) cannot be verified: their
    weights and train state are only checked to open.
    """
    step_dir = resolve(path)
    meta = read_meta(step_dir)
    names = sorted(meta[CHECKSUMS]) if CHECKSUMS in meta else [WEIGHTS]
    if CHECKSUMS not in meta and (step_dir / STATE).exists():
        names.append(STATE)
    for name in names:
        _check_file(step_dir, name, meta, look=True)
    return step_dir


def latest_intact(run_dir: str | Path, *, set_aside: bool = True) -> Path | None:
    """The newest step of ``run_dir`` that passes :func:`verify`, or None.

    ``set_aside``: each newer step that fails is reported (one line on stderr: the step, the file, why, what
    the run does instead) and renamed to ``corrupt-step-NNNNNNNN`` in ``run_dir`` (kept for inspection, never
    deleted; ignored by :func:`list_checkpoints`), so a rerun resumes from the newest intact step instead of
    failing on the damaged one forever. False (ranks other than 0, naming only): they are skipped, nothing
    is moved or printed.
    """
    found, damaged = None, []
    for step_dir in reversed(list_checkpoints(run_dir)):
        try:
            found = verify(step_dir)
            break
        except CheckpointError as e:
            if set_aside:
                damaged.append((step_dir, e, _set_aside(step_dir)))
    then = f"resuming from {found.name}" if found else "no intact step left: starting from scratch"
    for step_dir, e, gone in damaged:
        print(f"{step_dir}: {e.file.name}: {e.what}; set aside as {gone.name}, {then}", file=sys.stderr)
    return found


def _set_aside(step_dir: Path) -> Path:
    dest, n = step_dir.with_name(CORRUPT + step_dir.name), 2
    while dest.exists():
        dest, n = step_dir.with_name(f"{CORRUPT}{step_dir.name}-{n}"), n + 1
    step_dir.rename(dest)
    return dest


def load_weights(path: str | Path, *, check: bool = True) -> dict[str, Tensor]:
    """The state dict of a step (or of the latest step of a run directory), checked against its sha256.

    CheckpointError naming the file when it is missing, differs from its sum or does not parse. A checkpoint
    saved before sums were recorded loads unverified. ``check=False``: the step was just verified.
    """
    step_dir = resolve(path)
    meta = read_meta(step_dir)
    file = _check_file(step_dir, WEIGHTS, meta) if check else step_dir / WEIGHTS
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(file, f"unreadable ({_brief(e)})", meta) from None


def load_train_state(path: str | Path, *, check: bool = True) -> dict[str, Any]:
    """Optimizer/scheduler/RNG/data state; ``weights_only=True``: never unpickles arbitrary objects.

    Checked like :func:`load_weights` (CheckpointError naming the file; unverified without sums).
    """
    step_dir = resolve(path)
    meta = read_meta(step_dir)
    file = _check_file(step_dir, STATE, meta) if check else step_dir / STATE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # torch's say little (Errno 22)
        raise CheckpointError(file, f"unreadable ({_does_not_open(file) or _brief(e)})", meta) from None


# ---------------------------------------------------------------------------------------------- writing


def state_mismatch(ref: dict[str, Tensor], sd: dict[str, Tensor]) -> str | None:
    """What keeps ``sd`` from loading into a module whose state dict is ``ref`` (missing, unexpected and
    other-shape keys, the first 4 of each), or None when it fits exactly."""
    missing, unexpected = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
    wrong = sorted(k for k in set(ref) & set(sd) if ref[k].shape != sd[k].shape)
    if not (missing or unexpected or wrong):
        return None
    return f"missing {missing[:4]}, unexpected {unexpected[:4]}, other shape {wrong[:4]}"


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
    files: dict[str, Path | bytes] | None = None,
) -> Path:
    """Write ``<run_dir>/step-NNNNNNNN`` atomically, then delete all but the newest ``keep`` steps.

    meta.json gets ``step`` and the sha256 of every other file (``CHECKSUMS``), hashed as written to disk.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_cpu_unshared(model_state), str(tmp / WEIGHTS))
    if train_state is not None:
        torch.save(train_state, tmp / STATE)
    for name, src in (files or {}).items():  # a path, or bytes read (and checked) from a shard URL
        dest = tmp / name  # "<m>/tokenizer.json": a joint checkpoint keeps each modality's in its folder
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dest.write_bytes(src)
        else:
            shutil.copyfile(src, dest)
    sums = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    meta = {**meta, "step": step, CHECKSUMS: sums}
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
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


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``<run_dir>.lock`` while writing ``run_dir``: one writer per checkpoint folder.

    An exclusive ``flock`` on a file holding the holder's pid. A second writer (say, a second ``dvc repro``
    while the ``d2v`` stage of a killed first one still runs) gets a CheckpointError naming that pid. The
    kernel drops a flock when its holder dies, so the file of a killed run (a dead pid) is simply taken
    over; the holder removes it on exit. It lies beside the folder, not in it: the folder is a DVC output
    (``persist: true``) and a file inside would enter its cache. Not reentrant. Yields the lock file.
    """
    run_dir = Path(run_dir)
    path = run_dir.with_name(run_dir.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                run_dir,
                f"another run is writing it (pid {pid}, holding {path})",
                todo=f"wait for it to end, or stop it (`kill {pid}`): a killed `dvc repro` can leave its "
                "`d2v` stage running",
            ) from None
        # the holder may have removed the file between our open and flock: then ours is a dead inode
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # still holding the lock: a waiting opener re-checks the inode
        os.close(fd)


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
    The last checkpoint is the newest intact one: damaged newer ones are set aside (:func:`latest_intact`).
    A switched-off arm's note (:func:`write_off`, a persisted folder) goes: the run now writes real weights.
    """
    if remove:
        Path(run_dir, OFF).unlink(missing_ok=True)
    last = latest_intact(run_dir, set_aside=remove)
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


OFF = "OFF.txt"
"""The note that stands in a run folder of an arm that is switched off (``joint.modalities: []``)."""


def write_off(run_dir: Path, note: str, metrics: Path, curve: Path | None = None) -> None:
    """The outputs of a switched-off run, so that its DVC stage has them: a run folder holding only
    :data:`OFF` (no checkpoint, so every reader finds no weights), an empty metrics object and, where the
    stage has one, a curve with its header only."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / OFF).write_text(note)
    for path, text in ((metrics, "{}\n"), (curve, "step,loss\n")):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    print(note, end="")


def is_off(run_dir: str | Path) -> bool:
    """True for the run folder of a switched-off arm (:func:`write_off`)."""
    return (Path(run_dir) / OFF).is_file()
