"""Do an encoder's features carry over to data the demo never saw? Held-out sets per modality, pretrained
against random init, as a user would first try an encoder: ``embed`` and a logistic regression.

    .venv/bin/python benchmarks/heldout.py CHECKPOINT [--modality M] [--sets NAME ...] [--layers] [--json out.json]

CHECKPOINT is anything ``d2v.load_encoder`` reads (a d2v checkpoint, a joint one with ``--modality``, an HF
folder). The sets are built at run time from installed packages; none is in any shard or in this repository:

- image ``digits``: scikit-learn's 1,797 handwritten digits (UCI optdigits, 8x8 grey, 10 classes), read by
  the checkpoint's own preprocessing (resized as its shards were). Handwriting, where the demo saw clothing.
- audio ``spoken-digits``: espeak-ng saying 0-9 in ten languages the demo's digits do not use (de, fr, es, it,
  nl, pt, pl, sv, cs, fi), at 2 rates and 2 pitches (400 clips, 10 classes): the class is the number, whatever
  the words sound like.
- text ``fortunes``: Debian's fortune cookies (``apt-get install fortunes``), 10 of their categories, up to
  200 each: jokes, quotes, definitions, poems, short and unlike news.

Each item is embedded once per encoder (``embed``'s default: the mean over the last layer; ``--layers``:
every layer, 0 = the first block's input), then a logistic-regression probe (``d2v.metrics.linear_probe``) is
scored by 5 seeded folds. Every item is predicted once per encoder, so pretrained minus random init (the same
architecture, seed 0) is a paired difference over the items, printed with its 95 % interval (normal
approximation). A set whose source is missing is skipped with a line saying how to install it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/word_classes.py: the same folds
from word_classes import fold_indices  # noqa: E402

from d2v import load_encoder  # noqa: E402
from d2v.metrics import linear_probe  # noqa: E402

Set = tuple[list, list[int], list[str]]
"""(items as ``embed`` takes them, class index per item, class names)."""

LANGUAGES = ("de", "fr", "es", "it", "nl", "pt", "pl", "sv", "cs", "fi")
FORTUNE_CLASSES = (
    "computers", "definitions", "food", "law", "literature", "love", "politics", "science", "songs-poems", "work",
)  # fmt: skip
FORTUNES = Path("/usr/share/games/fortunes")


class Missing(Exception):
    """A set's source is not installed; the message says how to get it."""


def image_digits() -> Set:
    """scikit-learn's digits: 8x8 values 0..16 as uint8 grey images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise Missing("scikit-learn is not installed (pip install -e '.[test]')") from None
    d = load_digits()
    images = [np.round(x * (255 / 16)).astype(np.uint8) for x in d.images]
    return images, [int(t) for t in d.target], [str(i) for i in range(10)]


def spoken_digits(rates: tuple[int, ...] = (130, 190), pitches: tuple[int, ...] = (35, 65)) -> Set:
    """espeak-ng saying each digit in each of ``LANGUAGES`` at each rate and pitch: (waveform, rate) pairs."""
    import soundfile

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise Missing("espeak-ng is not installed (apt-get install espeak-ng; scripts/setup.sh does)")
    items, labels = [], []
    for lang in LANGUAGES:
        for digit in range(10):
            for rate in rates:
                for pitch in pitches:
                    cmd = [exe, "-v", lang, "-s", str(rate), "-p", str(pitch), "--stdout", str(digit)]
                    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
                    x, sr = soundfile.read(io.BytesIO(wav), dtype="float32")
                    items.append((x if x.ndim == 1 else x.mean(1), int(sr)))
                    labels.append(digit)
    return items, labels, [str(i) for i in range(10)]


def fortunes(folder: Path = FORTUNES, per_class: int = 200, min_words: int = 4) -> Set:
    """The first ``per_class`` fortunes of at least ``min_words`` words of each of ``FORTUNE_CLASSES`` in
    ``folder`` (split at ``%`` lines, whitespace collapsed)."""
    if not all((folder / c).is_file() for c in FORTUNE_CLASSES):
        raise Missing(f"the fortune files {list(FORTUNE_CLASSES)} are not all in {folder} (Debian: apt-get "
                      "install fortunes; elsewhere --fortunes FOLDER)")  # fmt: skip
    items, labels = [], []
    for i, c in enumerate(FORTUNE_CLASSES):
        text = (folder / c).read_text(encoding="utf-8", errors="replace")
        kept = [" ".join(f.split()) for f in text.split("\n%\n")]
        kept = [f for f in kept if len(f.split()) >= min_words][:per_class]
        items += kept
        labels += [i] * len(kept)
    return items, labels, list(FORTUNE_CLASSES)


SETS: dict[str, dict[str, Callable[[], Set]]] = {
    "image": {"digits": image_digits},
    "audio": {"spoken-digits": spoken_digits},
    "text": {"fortunes": fortunes},
}


def cv_predictions(x_ND: torch.Tensor, y_N: torch.Tensor, classes: int, folds: int = 5) -> torch.Tensor:
    """Each item's prediction [N] by the probe trained on the other ``folds`` - 1 folds (seeded split)."""
    pred = torch.empty_like(y_N)
    for train, test in fold_indices(len(y_N), folds):
        pred[test] = linear_probe(x_ND[train], y_N[train], x_ND[test], classes)
    return pred


def paired(a_N: torch.Tensor, b_N: torch.Tensor) -> tuple[float, float, float]:
    """Mean of a - b (per-item 0/1 correctness, in %) and its 95 % interval (normal approximation)."""
    d = (a_N.float() - b_N.float()) * 100
    half = 1.96 * float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half


def measure(encoders: dict[str, object], data: Set, layers: list[int | None]) -> dict[str, object]:
    """Accuracy % per encoder and layer, and pretrained minus random init with its interval."""
    items, labels, names = data
    y = torch.tensor(labels)
    out: dict[str, object] = {"items": len(items), "classes": len(names)}
    for layer in layers:
        correct = {}
        for init, encoder in encoders.items():
            x = torch.from_numpy(encoder.embed(items, layer=layer))
            correct[init] = cv_predictions(x, y, len(names)) == y
        key = "embed" if layer is None else f"layer{layer}"
        diff, lo, hi = paired(correct["pretrained"], correct["random init"])
        out[key] = {init: 100 * float(c.float().mean()) for init, c in correct.items()}
        out[key]["diff"], out[key]["ci"] = diff, [lo, hi]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--modality", default=None, help="which encoder of a joint checkpoint")
    ap.add_argument("--sets", nargs="+", default=None, help="of the modality's (default: all of them)")
    ap.add_argument("--layers", action="store_true", help="also every layer, 0 = the first block's input")
    ap.add_argument("--fortunes", type=Path, default=FORTUNES, help="the fortune files' folder (text)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    encoders = {
        "pretrained": load_encoder(args.checkpoint, modality=args.modality),
        "random init": load_encoder(args.checkpoint, pretrained=False, seed=0, modality=args.modality),
    }
    m = encoders["pretrained"].modality
    own = {**SETS[m]}
    if m == "text":
        own["fortunes"] = lambda: fortunes(args.fortunes)
    unknown = sorted(set(args.sets or []) - set(own))
    if unknown:
        raise SystemExit(f"--sets {unknown}: {m} has {sorted(own)}")
    layers: list[int | None] = [None]
    if args.layers:
        layers += list(range(encoders["pretrained"].transformer.depth + 1))
    results: dict[str, object] = {}
    print(f"| {m} set | items | classes | layer | pretrained | random init | difference (95 % CI) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sets or sorted(own):
        try:
            data = own[name]()
        except Missing as e:
            print(f"{name}: skipped: {e}")
            continue
        r = results[name] = measure(encoders, data, layers)
        for layer in layers:
            row = r["embed" if layer is None else f"layer{layer}"]
            lo, hi = row["ci"]
            where = "embed's default" if layer is None else str(layer)
            print(f"| {name} | {r['items']} | {r['classes']} | {where} | {row['pretrained']:.1f} | "
                  f"{row['random init']:.1f} | {row['diff']:+.1f} ({lo:+.1f} to {hi:+.1f}) |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "modality": m, "sets": results},
                                        indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
