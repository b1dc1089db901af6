"""Hugging Face data2vec checkpoints in and out (data2vec 1.0 only: transformers has no 2.0 models).

``load_hf_encoder(path)`` takes a directory with ``config.json`` plus ``model.safetensors`` or
``pytorch_model.bin`` of ``Data2Vec{Audio,Text,Vision}Model`` or one of their ``For<Task>`` models (the
backbone is taken) and returns a d2v encoder (``d2v.load_encoder`` dispatches here for such folders). The per-modality key maps live in
``d2v/modalities/<m>/hf.py``; this file only dispatches on ``model_type`` and does the file I/O.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from d2v.modalities import MODALITIES, get
from d2v.modalities.base import Encoder

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model folder (``config.json``) rather than a d2v checkpoint."""
    return (Path(path) / CONFIG_FILE).is_file()


def _modality_for(model_type: str, where: Path) -> str:
    for m in MODALITIES:
        if model_type == get(m).HF_MODEL_TYPE:
            return m
    known = [get(m).HF_MODEL_TYPE for m in MODALITIES]
    raise ValueError(
        f"{where}: model_type {model_type!r} is not a data2vec 1.0 model; expected one of {known}"
    )


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an HF directory; never unpickles arbitrary objects (``weights_only=True``).

    ValueError naming the file when it does not parse (truncated, corrupt)."""
    for name in WEIGHT_FILES:
        f = path / name
        if f.exists():
            try:
                if f.suffix == ".safetensors":
                    return load_file(str(f))
                return torch.load(f, map_location="cpu", weights_only=True)
            except (SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(f"{f}: unreadable ({first}); download or export it again") from None
    raise ValueError(f"{path}: no weights found; expected one of {list(WEIGHT_FILES)} beside config.json")


def backbone_state_dict(sd: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Strip the ``data2vec_<m>.`` prefix of ``For<Task>`` models and drop their task heads."""
    prefix = model_type.replace("-", "_") + "."
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def hf_encoder_state(path: str | Path, cfg) -> dict[str, torch.Tensor]:
    """The d2v encoder state dict of an HF folder's weights (a ``For<Task>`` model's backbone), for an
    encoder of ``cfg`` (its ``ModelConfig``); ValueError naming the file when it is missing or unreadable."""
    path = Path(path)
    model_type = json.loads((path / CONFIG_FILE).read_text())["model_type"]
    mod = get(_modality_for(model_type, path))
    return mod.state_dict_from_hf(backbone_state_dict(read_hf_weights(path), model_type), cfg)


def load_hf_encoder(path: str | Path, pretrained: bool = True, seed: int = 0) -> Encoder:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{path}: no config.json; expected a Hugging Face data2vec model directory")
    hf_cfg = json.loads(cfg_file.read_text())
    model_type = hf_cfg.get("model_type", "")
    mod = get(_modality_for(model_type, path))
    cfg = mod.config_from_hf(hf_cfg)
    torch.manual_seed(seed)
    encoder = mod.build_encoder(cfg)
    if pretrained:
        sd = hf_encoder_state(path, cfg)
        missing, unexpected = encoder.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not match a {model_type} encoder of this config: "
                f"missing {sorted(missing)[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
    return encoder.eval()


def export_hf(encoder: Encoder, out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that transformers' ``from_pretrained`` loads.

    ValueError when ``out_dir`` (or a parent) is an existing file."""
    out = Path(out_dir)
    hf_cfg, sd = get(encoder.modality).to_hf(encoder)  # ValueError for an architecture HF has no class for
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        file = next((q for q in (out, *out.parents) if q.exists() and not q.is_dir()), out)
        raise ValueError(
            f"{file}: exists and is not a folder; name a new output folder (or remove the file)"
        ) from None
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp))
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    return out
