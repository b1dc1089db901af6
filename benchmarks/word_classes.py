"""Do an encoder's text features know what a word names? Single words in six semantic classes, probed per layer.

    .venv/bin/python benchmarks/word_classes.py CHECKPOINT [--json out.json]

CHECKPOINT is a text encoder ``d2v.load_encoder`` reads (a d2v checkpoint or an HF folder). The words come
from gensim's word-analogy file (``gensim/test/test_data/questions-words.txt``, Mikolov et al. 2013): each
word of its semantic sections gets the class of its column (``capital-*``: city, country; ``currency``:
country, currency; ``city-in-state``: city, US state; ``family``: family member;
``gram6-nationality-adjective``: country, nationality); a word found in two classes is dropped. Every word
is embedded alone (``embed(words, layer=i)``, mean-pooled, for i = 0..L: 0 the first block's input), and a
logistic-regression probe (``d2v.metrics.linear_probe``) is scored by 5-fold cross-validation (a seeded
split). The same for the same architecture at random init (seed 0): it sees the words' sub-word pieces
only. Prints the accuracy per layer, pretrained / random init; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from d2v import load_encoder
from d2v.metrics import linear_probe

COLUMNS = {
    "capital-common-countries": ("city", "country"),
    "capital-world": ("city", "country"),
    "currency": ("country", "currency"),
    "city-in-state": ("city", "US state"),
    "family": ("family member", "family member"),
    "gram6-nationality-adjective": ("country", "nationality"),
}
"""Section -> the class of its odd and even columns (an analogy line is ``a b c d``: a:b :: c:d)."""


def analogy_file() -> Path:
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data" / "questions-words.txt"


def word_classes(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """``(words, class names, labels [N])``: the words of one class only, sorted."""
    seen: dict[str, set[str]] = defaultdict(set)
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
        elif section in COLUMNS:
            for i, word in enumerate(line.split()):
                seen[word].add(COLUMNS[section][i % 2])
    words = sorted(w for w, c in seen.items() if len(c) == 1)
    names = sorted({next(iter(seen[w])) for w in words})
    return words, names, torch.tensor([names.index(next(iter(seen[w]))) for w in words])


def fold_indices(n: int, folds: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) item indices of ``folds`` seeded folds over ``n`` items."""
    parts = torch.randperm(n, generator=torch.Generator().manual_seed(0)).chunk(folds)
    return [(torch.cat([p for j, p in enumerate(parts) if j != k]), test) for k, test in enumerate(parts)]


def cross_validated(x_ND: torch.Tensor, y_N: torch.Tensor, classes: int, folds: int = 5) -> float:
    """Mean test accuracy of the logistic probe over ``folds`` seeded folds."""
    return statistics.fmean(
        (linear_probe(x_ND[train], y_N[train], x_ND[test], classes) == y_N[test]).float().mean().item()
        for train, test in fold_indices(len(y_N), folds)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--words", type=Path, default=None, help="the analogy file (default: gensim's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    words, names, y = word_classes(args.words or analogy_file())
    counts = {n: int((y == i).sum()) for i, n in enumerate(names)}
    print(f"{len(words)} words: {counts}")
    out: dict[str, list[float]] = {}
    for init, pretrained in (("pretrained", True), ("random init", False)):
        encoder = load_encoder(args.checkpoint, pretrained=pretrained, seed=0)
        if encoder.modality != "text":
            raise SystemExit(f"{args.checkpoint} is a {encoder.modality} encoder; word_classes.py needs text")
        depth = encoder.transformer.depth
        out[init] = [100 * cross_validated(torch.from_numpy(encoder.embed(words, layer=i)), y, len(names))
                     for i in range(depth + 1)]  # fmt: skip
    print("| layer | " + " | ".join(str(i) for i in range(len(out["pretrained"]))) + " |")
    print("|---|" + "---|" * len(out["pretrained"]))
    print("| pretrained / random init | "
          + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(out["pretrained"], out["random init"])) + " |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"words": counts, "accuracy": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
