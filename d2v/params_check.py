"""``d2v check-params``: validate every section of params.yaml (all modalities) before any stage runs.

``resolve`` builds every section as the stages do and returns all of it, defaults included: what
``check_all`` validates and ``d2v show-params`` prints (``d2v.params_show``)."""

from __future__ import annotations

import importlib
from typing import Any

from d2v import initialize
from d2v.config import SECTIONS, ConfigError, PathsConfig, ReportConfig, TrackingConfig, section, to_dict
from d2v.evaluate import EvaluateConfig
from d2v.finetune import FinetuneConfig, modality_options
from d2v.modalities import MODALITIES
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
            # the values one by one; their fit to a published model is the effective params' to check (a
            # profile such as published-base sets model.<m>.preset: from_init for the file's init folders)
            resolve(own, with_folders=False)
        except ConfigError as e:
            raise ConfigError(
                f"{e} (in the file's own sections: profile {params.get('profile')!r} overrides this value, "
                "so it fails only without the profile; fix it there)"
            ) from None
    if not quiet:
        print(f"params OK (profile {params.get('profile', 'default')})")
    return 0


def _check_sections(params: dict[str, Any]) -> None:
    resolve(params)


PER_MODALITY = ("prepare", "shard", "model", "pretrain", "finetune", "evaluate")
"""Sections with one entry per modality (every modality's, whatever ``modalities:`` runs)."""


def resolve(params: dict[str, Any], with_folders: bool = True) -> dict[str, Any]:
    """Every section of ``params`` (a profile already applied) built as the stages build it, as a plain dict:
    every key with its value, the defaults a section leaves out included (``model.<m>`` through its preset,
    ``finetune.<m>.head`` / ``mask`` through the modality's ``HeadConfig`` / ``FinetuneMask``).

    The result is a complete params file without profiles (``profile: default``, ``profiles: {default:
    {}}``): ``load_params`` + ``resolve`` of it gives it back (``d2v show-params``). ConfigError naming the
    first bad key, as ``check_all``."""
    seed = params.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")
    out: dict[str, Any] = {"seed": seed}
    modalities = params.get("modalities") or []
    if not isinstance(modalities, list):
        raise ConfigError(f"modalities: expected a list of modalities, got {modalities!r}")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ConfigError(
            f"modalities: {unknown} are not modalities; expected a subset of {list(MODALITIES)}"
        )
    out["modalities"] = list(modalities)
    out["profile"] = "default"
    out["profiles"] = {"default": {}}
    out["paths"] = to_dict(section(params, "paths", PathsConfig))
    out["tracking"] = to_dict(section(params, "tracking", TrackingConfig))
    sweep = to_dict(section(params, "sweep", SweepConfig))
    report = to_dict(section(params, "report", ReportConfig))
    for name in PER_MODALITY:
        extra = sorted(set(params.get(name) or {}) - set(MODALITIES))
        if extra:
            raise ConfigError(f"{name}: unknown modality key(s) {extra}; expected {list(MODALITIES)}")
        out[name] = {}
    for m in MODALITIES:
        data = importlib.import_module(f"d2v.modalities.{m}.data")
        out["prepare"][m] = to_dict(section(params, "prepare", data.PrepareConfig, m))
        out["shard"][m] = to_dict(section(params, "shard", data.ShardConfig, m))
        out["model"][m] = initialize.checked_model_section(params, m, with_folders)
        out["pretrain"][m] = to_dict(section(params, "pretrain", PretrainConfig, m))
        finetune = section(params, "finetune", FinetuneConfig, m)
        head, mask = modality_options(finetune, m)
        out["finetune"][m] = {
            **to_dict(finetune),
            "head": to_dict(head),
            "mask": None if mask is None else to_dict(mask),
        }
        out["evaluate"][m] = to_dict(section(params, "evaluate", EvaluateConfig, m))
    from d2v.joint import joint_section  # lazily: it imports the training code

    out["joint"] = to_dict(joint_section(params))
    out["sweep"], out["report"] = sweep, report
    return {k: out[k] for k in SECTIONS}
