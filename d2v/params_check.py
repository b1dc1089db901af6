"""``d2v check-params``: validate every section of params.yaml (all modalities) before any stage runs."""

from __future__ import annotations

import importlib
from typing import Any

from d2v.config import ConfigError, PathsConfig, TrackingConfig, section
from d2v.evaluate import EvaluateConfig
from d2v.finetune import FinetuneConfig, modality_options
from d2v.modalities import MODALITIES, get
from d2v.report import ReportConfig
from d2v.sweep import SweepConfig
from d2v.train import PretrainConfig


def check_all(params: dict[str, Any]) -> int:
    """Build every config dataclass the stages would build; raise ConfigError naming the first bad key."""
    section(params, "paths", PathsConfig)
    section(params, "tracking", TrackingConfig)
    section(params, "sweep", SweepConfig)
    section(params, "report", ReportConfig)
    modalities = params.get("modalities") or []
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ConfigError(
            f"modalities: {unknown} are not modalities; expected a subset of {list(MODALITIES)}"
        )
    for name in ("prepare", "shard", "model", "pretrain", "finetune", "evaluate"):
        extra = sorted(set(params.get(name) or {}) - set(MODALITIES))
        if extra:
            raise ConfigError(f"{name}: unknown modality key(s) {extra}; expected {list(MODALITIES)}")
    for m in MODALITIES:
        mod, data = get(m), importlib.import_module(f"d2v.modalities.{m}.data")
        section(params, "prepare", data.PrepareConfig, m)
        section(params, "shard", data.ShardConfig, m)
        mod.model_config((params.get("model") or {}).get(m), f"model.{m}")
        section(params, "pretrain", PretrainConfig, m)
        modality_options(section(params, "finetune", FinetuneConfig, m), m)
        section(params, "evaluate", EvaluateConfig, m)
    print(f"params OK (profile {params.get('profile', 'default')})")
    return 0
