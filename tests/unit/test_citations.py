"""Citations resolve inside the repository (docs/references.md): source tags, spec sections, documents."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = [
    p
    for pattern in ("d2v/**/*.py", "pipelines/**/*.py", "tests/**/*.py", "benchmarks/**/*.py", "scripts/*")
    for p in ROOT.glob(pattern)
    if p.name != "test_citations.py"
] + [ROOT / "params.yaml", ROOT / "dvc.yaml", ROOT / "README.md"]
TOKENS = {"[CLS]", "[BOS]", "[EOS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"}
"""Bracketed words that are special tokens, not source tags."""
TAG = re.compile(r"\[[A-Z][A-Z0-9]{1,3}\]")
# a section with no source tag right before it (across a line break and a comment's '#'): the spec's
UNTAGGED = re.compile(r"(?<![\]\w])(?:spec )?§(\d+(?:\.\d+)*)")
TAGGED = re.compile(r"\[[A-Z][A-Z0-9]{1,3}\][\s#*\"]*(?:Table \d+, )?§\d+(?:\.\d+)*")


def spec_sections() -> set[str]:
    heads = re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", (ROOT / "docs/spec.md").read_text(), flags=re.M)
    return set(heads)


def test_every_source_tag_is_listed_in_references():
    listed = set(re.findall(r"\*\*(\[[A-Z][A-Z0-9]{1,3}\])\*\*", (ROOT / "docs/references.md").read_text()))
    assert {"[P1]", "[FS]", "[DV]", "[HF]"} <= listed
    for path in CODE:
        used = set(TAG.findall(path.read_text())) - TOKENS
        assert used <= listed, f"{path.relative_to(ROOT)} cites {sorted(used - listed)}, not in docs/references.md"


def test_every_untagged_section_is_a_section_of_the_spec():
    sections = spec_sections()
    assert {"1.9", "2.2", "5.4", "7.4"} <= sections  # the checker reads the headings
    for path in CODE:
        text = TAGGED.sub("", path.read_text())  # a paper's own sections ([P1] §3.3) are not the spec's
        missing = sorted(set(UNTAGGED.findall(text)) - sections)
        assert not missing, f"{path.relative_to(ROOT)} cites spec §{missing}, which docs/spec.md lacks"


def test_cited_documents_are_in_the_repository():
    for path in CODE:
        text = path.read_text()
        assert "reference §" not in text, f"{path.relative_to(ROOT)}: write 'spec §x' (docs/spec.md)"
        assert "shared/" not in text, f"{path.relative_to(ROOT)} cites a file outside the repository"
        for doc in re.findall(r"\bdocs/[\w.-]+\.md\b", text):
            assert (ROOT / doc).is_file(), f"{path.relative_to(ROOT)} cites {doc}, which does not exist"
