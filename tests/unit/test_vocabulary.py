"""The repository speaks to its users: results are named by date, commit and machine, never by the work
units they were made in ("stop 22", "issue 12", "this session", "a GPU was lent"), which mean nothing to a
reader. Checked in every tracked file, in result file names, and in the commit messages since the last
release tag."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORK_UNITS = re.compile(
    r"\bstops? \d+|_stop\d+|\bissues? #?\d+|\btasks? #?\d+\b|\bsessions?\b|\blent\b", re.IGNORECASE
)
"""A work-unit number, or 'session' / 'lent' as a reader of a lab notebook would meet them."""
TECHNICAL = re.compile(
    r"session[- ]scoped|scope=[\"']session|pytest_session|test session|(?:W&B|wandb|HTTP|requests)[ .]session",
    re.IGNORECASE,
)
"""Uses of 'session' that name a software thing (pytest's session scope, a W&B or HTTP session)."""


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
    bad = ["measured in stop 22", "stop 19-27", "step_cpu_stop27.json", "see issue 12", "this session's run",
           "next session", "no GPU was lent", "Stops 19 and 20"]  # fmt: skip
    good = ["a session-scoped fixture", "@pytest.fixture(scope=\"session\")", "stop the W&B session",
            "the loss stops falling", "stop_gradient", "2026-11-28, 2b0e85b, xeon-amx-2c", "silent"]  # fmt: skip
    assert [b for b in bad if not offending_lines(b)] == []
    assert [g for g in good if offending_lines(g)] == []


def test_no_tracked_file_names_a_work_unit():
    me = Path(__file__).resolve()
    found = []
    for path in tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if WORK_UNITS.search(rel):
            found.append(f"{rel}: its name")
        if path.resolve() == me or not path.is_file():
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
