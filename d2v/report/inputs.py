"""Reading the stages' files (metrics, curves, confusion rows, manifests, dvc.lock) and the provenance."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from d2v.report import plots

SourceStatus = Literal["ok", "missing", "unreadable"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
"""``d2v.data.remote.is_url``'s test, repeated: importing ``d2v.data`` loads torch, which the report needs
only when ``paths.shards`` is a URL."""


@dataclass(frozen=True)
class Source:
    """One input file and whether it could be used (the report's list of what it read)."""

    path: str
    what: str
    status: SourceStatus
    detail: str = ""


class Inputs:
    """Reads files relative to ``root``, remembering each one's status for the "Inputs" section."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sources: list[Source] = []

    def _note(self, path: str, what: str, status: SourceStatus, detail: str = "") -> None:
        self.sources.append(Source(path, what, status, detail))

    def json(self, path: str, what: str) -> dict[str, Any] | None:
        return self.json_and_bytes(path, what)[0]

    def json_and_bytes(self, path: str, what: str) -> tuple[dict[str, Any] | None, bytes | None]:
        """The JSON object in ``path`` (relative to ``root``, or a URL: shards in object storage) and the
        bytes it was read from; ``(None, None)`` when it is missing or unreadable (noted either way)."""
        try:
            raw = self._read_bytes(path)
        except FileNotFoundError:
            self._note(path, what, "missing")
            return None, None
        except (OSError, ValueError) as e:
            self._note(path, what, "unreadable", f"{type(e).__name__}: {e}")
            return None, None
        try:
            data = json.loads(raw)
        except ValueError as e:
            self._note(path, what, "unreadable", f"{type(e).__name__}: {e}")
            return None, None
        if not isinstance(data, dict):
            self._note(path, what, "unreadable", "expected a JSON object at the top level")
            return None, None
        self._note(path, what, "ok")
        return data, raw

    def _read_bytes(self, path: str) -> bytes:
        if _URL.match(path):
            from d2v.data import remote  # only here: it loads torch

            return remote.read_bytes(path)
        p = self.root / path
        if not p.is_file():
            raise FileNotFoundError(p)
        return p.read_bytes()

    def csv(self, path: str, what: str, required: tuple[str, ...]) -> list[dict[str, str]] | None:
        p = self.root / path
        if not p.is_file():
            self._note(path, what, "missing")
            return None
        try:
            with p.open(newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                header = reader.fieldnames or []
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            self._note(path, what, "unreadable", f"{type(e).__name__}: {e}")
            return None
        lacking = [c for c in required if c not in header]
        if lacking:
            self._note(path, what, "unreadable", f"no column(s) {lacking}; header is {header}")
            return None
        if not rows:
            self._note(path, what, "unreadable", "no data rows")
            return None
        self._note(path, what, "ok", f"{len(rows)} rows")
        return rows

    def json_dir(self, path: str, what: str) -> dict[str, dict[str, Any]]:
        """Every ``*.json`` directly in ``path`` (by file stem): one line for the folder, one per bad file."""
        d = self.root / path
        if not d.is_dir():
            self._note(path + "/", what, "missing")
            return {}
        out, before = {}, len(self.sources)
        for p in sorted(d.glob("*.json")):
            data = self.json(f"{path}/{p.name}", what)
            if data is not None:
                out[p.stem] = data
        bad = [s for s in self.sources[before:] if s.status != "ok"]
        self.sources[before:] = bad
        self._note(path + "/", what, "ok" if out else "missing", f"{len(out)} readable *.json")
        return out


def _float(s: str | None) -> float:
    try:
        return float(s) if s not in (None, "") else math.nan
    except ValueError:
        return math.nan


def curve_columns(rows: list[dict[str, str]]) -> dict[str, list[float]]:
    """Pretraining CSV rows -> {column: values}, stably sorted by step (a resumed run's rows keep order)."""
    rows = sorted(rows, key=lambda r: _float(r.get("step")))
    cols = [c for c in plots.PRETRAIN_COLUMNS if c in rows[0]]
    return {c: [_float(r.get(c)) for r in rows] for c in cols}


def _natural(label: str) -> tuple:
    return (0, int(label), label) if re.fullmatch(r"-?\d+", label) else (1, 0, label)


def confusion_counts(rows: list[dict[str, str]]) -> tuple[list[str], list[list[int]]]:
    """(labels, counts[actual][predicted]) from one ``actual,predicted`` row per evaluated item."""
    pairs = Counter((r["actual"], r["predicted"]) for r in rows)
    labels = sorted({a for a, _ in pairs} | {p for _, p in pairs}, key=_natural)
    return labels, [[pairs.get((a, p), 0) for p in labels] for a in labels]


def label_names(manifest: dict[str, Any] | None) -> dict[str, str]:
    """Class index (as the confusion CSV writes it) -> name, from the manifest's label map if it has one.

    Accepts ``{name: index}``, ``{"index": name}`` or ``[name, ...]`` under ``label_map``, ``labels``
    or ``classes``.
    """
    for key in ("label_map", "labels", "classes"):
        v = (manifest or {}).get(key)
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return {str(i): x for i, x in enumerate(v)}
        if isinstance(v, dict) and v:
            if all(isinstance(i, int) and not isinstance(i, bool) for i in v.values()):
                return {str(i): str(name) for name, i in v.items()}
            if all(re.fullmatch(r"\d+", str(k)) for k in v):
                return {str(k): str(name) for k, name in v.items()}
    return {}


# ---------------------------------------------------------------------------------------------- provenance


def _run(cmd: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def code_version(root: Path) -> list[tuple[str, str]]:
    """Git commit and whether tracked files differ from it (untracked files do not count)."""
    head = _run(["git", "rev-parse", "HEAD"], root)
    if head is None:
        return [("git commit", "unknown (not a git checkout, or no commit yet)")]
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], root) or ""
    changed = sorted(line[3:] for line in status.splitlines() if line.strip())
    dirty = (
        "no"
        if not changed
        else f"yes: {len(changed)} changed tracked file(s): "
        + ", ".join(f"`{p}`" for p in changed[:10])
        + (", …" if len(changed) > 10 else "")
    )
    return [("git commit", f"`{head.strip()}`"), ("dirty", dirty)]


def dvc_lock_rows(root: Path, inputs: Inputs) -> list[tuple[str, str, str]]:
    """(stage, output path, md5) of every output in ``dvc.lock`` (the report's own stage left out)."""
    p = root / "dvc.lock"
    if not p.is_file():
        inputs._note("dvc.lock", "DVC lock file", "missing")
        return []
    try:
        lock = yaml.safe_load(p.read_text()) or {}
        stages = lock.get("stages") or {}
        assert isinstance(stages, dict)
    except (yaml.YAMLError, AssertionError, AttributeError) as e:
        inputs._note("dvc.lock", "DVC lock file", "unreadable", type(e).__name__)
        return []
    inputs._note("dvc.lock", "DVC lock file", "ok")
    rows = []
    for stage, entry in stages.items():
        if stage == "report" or not isinstance(entry, dict):
            continue
        for out in entry.get("outs") or []:
            if isinstance(out, dict) and "path" in out:
                rows.append((stage, str(out["path"]), str(out.get("md5") or out.get("etag") or "—")))
    return rows


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware() -> list[tuple[str, str]]:
    """The machine rendering the report (the DVC stages of one ``repro`` run on the same one)."""
    rows = [
        ("CPU", _cpu_model()),
        ("CPU cores", str(os.cpu_count())),
        ("platform", f"{platform.system()} {platform.machine()}"),
        ("Python", platform.python_version()),
    ]
    try:
        import torch
    except ImportError:
        return [*rows, ("torch", "not installed")]
    rows.append(("torch", torch.__version__))
    if torch.cuda.is_available():
        names = sorted(
            Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())).items()
        )
        rows.append(("CUDA devices", ", ".join(f"{n} × {name}" for name, n in names)))
        rows.append(("CUDA", str(torch.version.cuda)))
    else:
        rows.append(("CUDA devices", "none"))
    return rows
