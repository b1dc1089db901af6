"""The three modalities. Everything that differs between speech, images and text lives below this folder.

Each modality is the package ``d2v/modalities/<m>/`` (model side: configs, encoder, masking, heads, Hugging
Face interchange; ``get(m)`` below) and its ``data.py`` (data side: prepare, shard, decode, collate; loaded
alone by the data stages). Plain modules, no registry. The names the shared code uses from them, with shapes,
are the contract in ``contract.py`` (``ModalityModel``, ``ModalityData``) and ``base.py`` (``Encoder``);
``tests/unit/test_modality_contract.py`` checks every modality against it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODALITIES = ("audio", "image", "text")
JOINT = "joint"
"""The name of the one Transformer pretrained on every modality at once (``d2v.joint``): the pretrain stage's
and its checkpoints' "modality"; not a modality package."""


def get(name: str) -> ModuleType:
    """The package of modality ``name``; ValueError listing the valid names otherwise."""
    if name not in MODALITIES:
        raise ValueError(f"unknown modality {name!r}; expected one of {list(MODALITIES)}")
    return importlib.import_module(f"d2v.modalities.{name}")
