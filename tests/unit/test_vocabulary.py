"""The repository speaks to its users: results are named by date, commit and machine, never by the work
units they were made in (numbered work periods or tickets), which mean nothing to a reader. Checked in every
tracked file, in result file names, and in the commit messages since the last release tag."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORD = "ses" "sion"  # assembled, as the examples below, so that this file passes its own check
WORK_UNITS = re.compile(
    rf"\bstops? \d+|_stop\d+|\bissues? #?\d+|\btasks? #?\d+\b|\b{WORD}s?\b|\blent\b", re.IGNORECASE
)
"""A work-unit number, or the words a lab notebook uses for a work period and a borrowed machine."""
TECHNICAL = re.compile(
    rf"{WORD}[- ]scoped|scope=[\"']{WORD}|pytest_{WORD}|test {WORD}|(?:W&B|wandb|HTTP|requests)[ .]{WORD}",
    re.IGNORECASE,
)
"""Uses of that word that name a software thing (pytest's fixture scope, a W&B or HTTP connection)."""


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.decode().split("\0") if p]


def offending_lines(text: str) -> list[str]:
    return [
        line.strip()
        for line in text.splitlines()
        if WORK_UNITS.search(TECHNICAL.sub("", line))
    ]


def test_the_checker_catches_work_units_and_spares_technical_words():
    stop, issue, borrowed = "st" "op", "is" "sue", "le" "nt"
    bad = [f"measured in {stop} 22", f"{stop} 19-27", f"step_cpu_{stop}27.json", f"see {issue} 12",
           f"this {WORD}'s run", f"next {WORD}", f"no GPU was {borrowed}", f"{stop.title()}s 19 and 20"]  # fmt: skip
    good = [f"a {WORD}-scoped fixture", f"@pytest.fixture(scope='{WORD}')", f"stop the W&B {WORD}",
            "the loss stops falling", "stop_gradient", "2026-11-28, 2b0e85b, xeon-amx-2c", "silent"]  # fmt: skip
    assert [b for b in bad if not offending_lines(b)] == []
    assert [g for g in good if offending_lines(g)] == []


def test_no_tracked_file_names_a_work_unit():
    found = []
    for path in tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if WORK_UNITS.search(rel):
            found.append(f"{rel}: its name")
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary
        found += [f"{rel}: {line[:120]}" for line in offending_lines(text)]
    assert not found, "name results by date, commit and machine instead:\n" + "\n".join(found[:40])


def test_commit_messages_since_the_last_release_name_no_work_unit():
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout

    tag = git("describe", "--tags", "--abbrev=0").strip()
    if not tag:
        pytest.skip("no release tag in this clone")
    messages = git("log", f"{tag}..HEAD", "--format=%h %B%x00").split("\0")
    found = [m.strip().splitlines()[0] for m in messages if m.strip() and offending_lines(m)]
    assert not found, f"commit messages since {tag} that name a work unit: {found}"
