"""The three modalities. Everything that differs between speech, images and text lives below this folder.

Each ``d2v/modalities/<m>/`` package exports the same names (a plain module, no registry magic):

model side (``model.py``, ``masking.py``)
  ``ModelConfig``            frozen dataclass of the ``model.<m>`` params section (``preset`` + overrides)
  ``build_encoder(cfg)``     -> ``Encoder`` subclass (see ``base.py``), seeded init
  ``build_pretrain_model(cfg)`` -> ``d2v.model.Data2Vec`` (encoder + regression head + EMA teacher)
  ``make_mask(...)``         the modality's masking strategy (pure, takes a ``torch.Generator``)

checkpoint interchange (``hf.py``)
  ``HF_MODEL_TYPE``          transformers' ``model_type`` ("data2vec-audio" ...)
  ``config_from_hf(d)``      -> ModelConfig from a config.json dict (values read from it, never defaults)
  ``state_dict_from_hf(sd, cfg)`` -> encoder state dict;  ``to_hf(encoder)`` -> (config dict, state dict)
  ``processor_from_hf(folder, cfg)`` -> ``embed`` preprocessing from the folder's processor files

data side (``data.py``)
  ``PrepareConfig``, ``prepare(...)``, ``encode``/``decode`` of shard samples, ``collate(...)``
  ``inference_inputs(items, prep, files_dir)`` raw ``embed`` items as at shard time; ``STRING_ITEMS``: whether
  a ``str`` item is content (text) rather than a file path
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODALITIES = ("audio", "image", "text")


def get(name: str) -> ModuleType:
    """The package of modality ``name``; ValueError listing the valid names otherwise."""
    if name not in MODALITIES:
        raise ValueError(f"unknown modality {name!r}; expected one of {list(MODALITIES)}")
    return importlib.import_module(f"d2v.modalities.{name}")
