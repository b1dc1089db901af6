"""The model folder a run starts from: a Hugging Face data2vec folder or a d2v checkpoint, checked once.

``pretrain.<m>.init`` (the weights a pretraining run starts from) and ``shard.<m>.preprocess_like`` (the
preprocessing shards are made with) name such a folder. :func:`source` reads what identifies it (its kind,
``model_type`` and the sha256 of its files) without loading weights, and says plainly when the folder is
not a data2vec model of the stage's modality. The shard stage reads it too, so this module imports no
model code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HF_MODEL_TYPES = {"audio": "data2vec-audio", "image": "data2vec-vision", "text": "data2vec-text"}
"""``config.json`` ``model_type`` of each modality's transformers classes (``Data2Vec{Audio,Vision,Text}``)."""
HF_FILES = (
    "config.json", "model.safetensors", "pytorch_model.bin", "preprocessor_config.json", "tokenizer.json",
    "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
)  # fmt: skip
"""The files of an HF folder that d2v reads (hashed into the record; other files are ignored)."""


@dataclass(frozen=True)
class Source:
    """A checked model folder."""

    kind: str
    """'hf' (a Hugging Face folder) or 'd2v' (a d2v checkpoint; ``path`` is then its step directory)."""
    path: Path
    modality: str
    model_type: str
    """HF: config.json's ``model_type``; d2v: ``d2v-<kind>`` (``d2v-pretrain``, ``d2v-finetune``)."""
    config: dict[str, Any]
    """HF: config.json; d2v: meta.json."""
    architectures: tuple[str, ...] = ()
    """HF: config.json's ``architectures`` (e.g. ``Data2VecAudioForCTC``); empty for d2v checkpoints."""

    def record(self) -> dict[str, Any]:
        """What manifests, checkpoints and the report keep of it: enough to tell two folders apart."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "model_type": self.model_type,
            "architectures": list(self.architectures),
            "sha256": files_sha256(self.path, self.kind),
        }


def files_sha256(path: Path, kind: str) -> str:
    """One sha256 over the folder's model files (names and contents) that d2v reads."""
    if kind == "d2v":
        names = sorted(p.name for p in path.iterdir() if p.is_file())
    else:
        names = [n for n in HF_FILES if (path / n).is_file()]
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0")
        with (path / n).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def source(path: str | Path, modality: str, key: str) -> Source:
    """The folder ``path`` named by params key ``key`` (e.g. ``pretrain.audio.init``), checked to be a
    data2vec model of ``modality``; ValueError naming the key, the folder and what it holds instead."""
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"{key}: {path} does not exist; give a Hugging Face data2vec folder (config.json + weights, "
            "downloaded once) or a d2v checkpoint"
        )
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{key}: {cfg_file} is not valid JSON ({e})") from None
        model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
        want = HF_MODEL_TYPES[modality]
        if model_type != want:
            other = next((m for m, t in HF_MODEL_TYPES.items() if t == model_type), None)
            what = (
                f"a data2vec {other} model" if other else f"model_type {model_type!r}, not a data2vec model"
            )
            raise ValueError(
                f"{key}: {path} holds {what}; a {modality} run needs model_type {want!r} "
                f"(e.g. facebook/{want}-base)"
            )
        return Source("hf", path, modality, model_type, cfg, tuple(cfg.get("architectures") or ()))
    from d2v import checkpoint  # only for d2v checkpoints; the prepare stage imports this module too

    try:
        step = checkpoint.resolve(path)
        meta = checkpoint.read_meta(step)
    except ValueError as e:
        raise ValueError(
            f"{key}: {path} is neither a Hugging Face folder (no config.json) nor a d2v checkpoint ({e})"
        ) from None
    if meta.get("modality") != modality:
        raise ValueError(
            f"{key}: {step} is a d2v {meta.get('modality')!r} checkpoint; a {modality} run needs a "
            f"{modality} one"
        )
    return Source("d2v", step, modality, f"d2v-{meta.get('kind')}", meta)


def read_settings(f: Path, what: str) -> dict[str, Any]:
    """The JSON object of a model folder's settings file ``f`` (``what``: "processor", "feature
    extractor" ...); ValueError naming the file and what to do when it cannot be read or is not an object."""
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{f}: cannot be read as JSON ({type(e).__name__}: {e}); save the {what} into the folder again "
            "with save_pretrained"
        ) from None
    if not isinstance(d, dict):
        raise ValueError(
            f"{f}: holds a JSON {type(d).__name__}, not an object of {what} settings; save the {what} into the "
            "folder again with save_pretrained"
        )
    return d
