"""``d2v check-params``: validate every section of params.yaml (all modalities) before any stage runs."""

from __future__ import annotations

import importlib
from typing import Any

from d2v.config import ConfigError, PathsConfig, ReportConfig, TrackingConfig, section
from d2v.evaluate import EvaluateConfig
from d2v.finetune import FinetuneConfig, modality_options
from d2v.modalities import MODALITIES, get
from d2v.pretrain import PretrainConfig
from d2v.sweep import SweepConfig


def check_all(params: dict[str, Any], quiet: bool = False) -> int:
    """Build every config dataclass the stages would build; raise ConfigError naming the first bad key.

    Checks the effective params and, when a profile was applied, the file's own sections as well
    (``params.own``, kept by ``load_params``): a bad value the profile overrides fails now, not on the first
    run without the profile. ``quiet``: no "params OK" line (for stages that check before they run)."""
    _check_sections(params)
    own = getattr(params, "own", None)
    if own is not None:
        try:
            _check_sections(own)
        except ConfigError as e:
            raise ConfigError(
                f"{e} (in the file's own sections: profile {params.get('profile')!r} overrides this value, "
                "so it fails only without the profile; fix it there)"
            ) from None
    if not quiet:
        print(f"params OK (profile {params.get('profile', 'default')})")
    return 0


def _check_sections(params: dict[str, Any]) -> None:
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
