"""Each stage's wall time, from the start of its process to its end, for the report's "Stage wall times".

A stage command (``d2v pretrain image``, ``d2v finetune audio --budget 5 ...``) writes
``timings/<stage>.json`` under the project (``<stage>`` is its dvc.yaml name, ``finetune@audio-5-0-scratch``)
when it succeeds. The files sit beside the pipeline's outputs, never in them: no stage declares them, so a
wall time never enters a file DVC hashes, and the stages' outputs stay byte-identical from run to run. A
stage that DVC skipped keeps the time of its last run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from d2v.sweep import finetune_stage, pretrain_stage

TIMINGS_DIR = Path("timings")
"""Relative to the project (the directory the stage runs in, as under ``dvc repro``)."""

_IMPORTED = time.time()


def process_seconds() -> float:
    """Seconds since this process started: interpreter start-up and imports included (Linux's
    ``/proc/self/stat``), else since this module was imported."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5), counted after the ')' of the command name
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )  # fmt: skip
        return max(0.0, time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time() - _IMPORTED


def stage_name(command: str, modality: str | None = None, budget: str | None = None,
               seed: int | None = None, init: str | None = None) -> str:  # fmt: skip
    """The dvc.yaml name of a stage command: ``pretrain@image``, ``finetune@audio-5-0-scratch``,
    ``finetune-joint@audio-5-0``, ``pretrain-joint``, ``report``."""
    if modality is None:
        return command
    if command == "finetune" and budget is not None and seed is not None and init is not None:
        return finetune_stage(modality, budget, seed, init)
    if command == "pretrain":
        return pretrain_stage(modality)
    return f"{command}@{modality}"


def record(stage: str, seconds: float, root: Path = Path(".")) -> Path:
    """Write ``<root>/timings/<stage>.json`` ({"stage", "wall_s"}) whole or not at all."""
    out = root / TIMINGS_DIR / f"{stage}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"stage": stage, "wall_s": round(seconds, 1)}) + "\n")
    os.replace(tmp, out)
    return out


def read_all(root: Path = Path(".")) -> dict[str, float]:
    """Every recorded stage's wall seconds, by stage name; unreadable files are skipped."""
    out: dict[str, float] = {}
    for f in sorted((root / TIMINGS_DIR).glob("*.json")):
        try:
            d = json.loads(f.read_text())
            out[str(d["stage"])] = float(d["wall_s"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


STAGE_ORDER = ("prepare", "shard", "pretrain", "finetune", "evaluate", "report")


def by_kind(times: dict[str, float]) -> list[tuple[str, int, float]]:
    """``(kind, stages, seconds)`` per stage kind (the name before '@'), in pipeline order."""
    sums: dict[str, list[float]] = {}
    for name, s in times.items():
        sums.setdefault(name.split("@", 1)[0], []).append(s)
    order = [k for k in STAGE_ORDER if k in sums] + sorted(set(sums) - set(STAGE_ORDER))
    return [(k, len(sums[k]), sum(sums[k])) for k in order]
