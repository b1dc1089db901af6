"""Frozen config dataclasses and a strict loader.

Every ``params.yaml`` section maps onto one frozen dataclass; ``from_dict`` rejects unknown keys and
values of the wrong type with a message that names the full key path (``model.audio.dim``), so a typo
in ``params.yaml`` or a ``dvc exp run -S`` override fails before any work starts.

Modality-specific sections (``model.<modality>`` etc.) are defined in ``d2v/modalities/<m>/``; this file
holds the modality-blind pieces and the loader.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A params.yaml / override problem; the message names the key path and what is expected."""


FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+(?=[eE]))([eE][-+]?\d+)?")
"""A decimal number with a dot or an exponent. YAML 1.1 (PyYAML) reads ``1e-3`` and ``-1e-3`` (no dot) as
strings, so a float key accepts such a string; plain integers and words stay errors."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a type annotation (subset of typing that configs use)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:  # try the next member of the union
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(known)}"
        )
    kwargs = {}
    for f in fields(cls):
        if not f.init or f.name not in data:
            continue
        path = f"{where}.{f.name}" if where else f.name
        kwargs[f.name] = _coerce(data[f.name], hints[f.name], path)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    except ConfigError as e:  # from __post_init__, which does not know where its section sits
        raise ConfigError(key_path(where, str(e), cls)) from None


_KEY = re.compile(r"[A-Za-z_][\w.]*")


def key_path(where: str, message: str, cls: type) -> str:
    """A ``cls.__post_init__`` error message placed at ``where``: the message names keys relative to its
    class (``lr must be > 0, got -0.001``), the result by their full path
    (``pretrain.image.optim.lr must be > 0, got -0.001``).

    A message that leads with a guessed path of its own (``optim.lr ...``, ``finetune: ...``) has it
    replaced, up to the first field of ``cls`` it names, so validators written that way read the same."""
    if not where:
        return message
    m = _KEY.match(message)
    if m:
        names = {f.name for f in fields(cls)}
        parts = m.group().split(".")
        for i, part in enumerate(parts):
            if part in names:
                return ".".join([where, *parts[i:]]) + message[m.end() :]
        if message[m.end() : m.end() + 1] == ":":  # a section label ('optim: ...'): use the real one
            return where + message[m.end() :]
    return f"{where}: {message}"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain (YAML/JSON-ready) dict of a config dataclass; tuples become lists."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that validates the new values like ``from_dict``."""
    merged = to_dict(cfg)
    merged.update(changes)
    return from_dict(type(cfg), merged, type(cfg).__name__)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found (run from the project root, or pass --params PATH)")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


@dataclass(frozen=True)
class TransformerConfig:
    """The block stack shared by every modality (data2vec §2.1)."""

    dim: int = 768
    """Width D (Base 768, Large 1024)."""
    depth: int = 12
    """Number of blocks L."""
    heads: int = 12
    """Attention heads (Base 12, Large 16)."""
    ffn_dim: int = 3072
    """FFN inner width (4 x D in the papers)."""
    layer_norm_first: bool = False
    """Pre-LN (BEiT vision) if true, post-LN (wav2vec 2.0 / RoBERTa) if false (§7.4)."""
    dropout: float = 0.1
    """Residual-branch dropout."""
    attention_dropout: float = 0.1
    """Dropout on the attention weights (wav2vec 2.0 / RoBERTa Base 0.1)."""
    activation_dropout: float = 0.0
    """Dropout after the FFN activation (0 in the data2vec Base configs)."""
    layerdrop: float = 0.0
    """Probability of skipping a whole block per batch in training (speech 0.05)."""
    drop_path: float = 0.0
    """Stochastic depth, linearly increasing with depth up to this value (vision 0.2-0.25)."""
    layer_scale_init: float | None = None
    """BEiT layer-scale init (0.1 for HF vision, 1e-4 in [DV] ViT-B); None disables it."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon (PyTorch's 1e-5; BEiT vision uses 1e-6)."""
    activation: Literal["gelu", "gelu_new", "relu"] = "gelu"
    """FFN activation: exact GELU as the papers; 'gelu_new' (tanh) and 'relu' for imported HF models."""

    def __post_init__(self) -> None:
        # messages name keys relative to this section; from_dict puts the section's path in front
        if self.heads < 1:
            raise ConfigError(f"heads must be >= 1, got {self.heads}")
        if self.dim % self.heads:
            raise ConfigError(f"dim must be divisible by heads ({self.heads}), got {self.dim}")
        if self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")
        for name in ("dropout", "attention_dropout", "activation_dropout", "layerdrop", "drop_path"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {v}")


# ----------------------------------------------------------------------------------- params.yaml loading

SECTIONS = (
    "seed", "modalities", "profile", "profiles", "paths", "tracking",
    "prepare", "shard", "model", "pretrain", "joint", "sweep", "finetune", "evaluate", "report",
)  # fmt: skip
"""Top-level keys of params.yaml; anything else is rejected."""

DVC_TEMPLATED = ("paths", "modalities", "sweep")
"""Keys dvc.yaml interpolates (stage names, paths, the finetune matrix): DVC reads them from the file, so a
profile may not override them (the stages DVC runs would disagree with the params the code reads)."""


TRANSFORMER_ARCHITECTURE: tuple[str, ...] = tuple(
    f"transformer.{k}"
    for k in ("dim", "depth", "heads", "ffn_dim", "layer_norm_first", "norm_eps", "activation")
)
"""The block stack's keys a published model fixes (each modality's ``ARCHITECTURE`` adds its own)."""

FROM_INIT = "from_init"
"""``model.<m>.preset: from_init``: the architecture of ``pretrain.<m>.init``'s model (``d2v.initialize``)."""


@dataclass(frozen=True)
class PathsConfig:
    """Where each stage reads and writes; dvc.yaml templates its deps/outs from these (declared once)."""

    raw: str = "data/raw"
    """``prepare`` writes each modality's raw inputs to ``<raw>/<m>``."""
    shards: str = "data/shards"
    """``shard`` writes WebDataset shards and ``manifest.json`` to ``<shards>/<m>``. The training stages also
    read an fsspec URL (``s3://bucket/prefix``, after ``d2v shard <m> --to`` it; ``pip install 'd2v[s3]'``):
    docs/recipes.md, "Shards in object storage"."""
    checkpoints: str = "checkpoints"
    """Run folders: ``<checkpoints>/pretrain/<m>`` and ``<checkpoints>/finetune/<m>/<run>``."""
    metrics: str = "metrics"
    """JSON metrics of every stage (DVC ``metrics:``)."""
    plots: str = "plots"
    """CSV curves and tables (DVC ``plots:``)."""
    reports: str = "reports"
    """The rendered benchmark report (``reports/benchmark.{md,html}``) and its figures."""
    published: str = "published"
    """Published models a run starts from (``pretrain.<m>.init``, ``shard.<m>.preprocess_like``) go in
    ``<published>/<m>/``: dvc.yaml lists that folder as a dependency of the stages that read it."""


@dataclass(frozen=True)
class TrackingConfig:
    """W&B settings. Offline by default; ``mode: online`` once the user has run ``wandb login``."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """'offline' (needs no account or network), 'online' after ``wandb login``, 'disabled': no W&B."""
    project: str = "d2v"
    """W&B project the runs are logged to."""
    entity: str | None = None
    """W&B team or user; None: the logged-in user's default entity."""
    dir: str = "wandb"
    """Local W&B directory (offline runs live in ``<dir>/wandb/offline-run-*``)."""
    artifacts: Literal["none", "final"] = "none"
    """'final': log the last checkpoint of each run as a W&B artifact (offline: copied to W&B staging)."""


@dataclass(frozen=True)
class ReportConfig:
    """params.yaml ``report:``: how the benchmark report is rendered and published."""

    primary_metric: str = "accuracy"
    """Metric the "What this shows" paragraph leads with (every metric found is tabled)."""
    dpi: int = 100
    """Resolution of the PNG figures (fixed so reruns are byte-identical)."""
    wandb_report: Literal["auto", "never"] = "auto"
    """``auto``: publish a W&B Report (wandb-workspaces) when ``tracking.mode`` is online; ``never``: not."""
    publish_timeout_s: float = 60.0
    """Give up publishing the W&B Report after this long (saving retries forever without a server)."""

    def __post_init__(self) -> None:
        if not 30 <= self.dpi <= 600:
            raise ConfigError(f"dpi must be an integer in [30, 600], got {self.dpi}")
        if self.publish_timeout_s <= 0:
            raise ConfigError(f"publish_timeout_s must be > 0, got {self.publish_timeout_s}")


def leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key (``prefix.a.b``) -> value of every leaf of a nested dict (an empty dict is a leaf)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(leaves(v, key))
        else:
            out[key] = v
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys on top, nested mappings merged key by key (``over`` wins)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_config(
    cls: type[T],
    d: dict[str, Any] | None,
    where: str,
    presets: dict[str, dict[str, Any]],
    v2: dict[str, Any],
    v2_presets: dict[str, dict[str, Any]],
) -> T:
    """A modality's ``model.<m>`` section as ``cls``: its preset's values, then (for ``algorithm:
    data2vec2``) the 2.0 recipe's (``v2``, then ``v2_presets[preset]``), then the user's keys on top.

    The one place that resolves ``model.<m>.preset``, so that every modality layers its presets the same
    way and a user's key always wins.
    """
    d = dict(d or {})
    name = d.get("preset", cls.preset)  # type: ignore[attr-defined]
    if not isinstance(name, str) or name not in presets:
        hint = " (with pretrain.<m>.init set)" if name == FROM_INIT else ""
        raise ConfigError(f"{where}.preset: {name!r}{hint} is not one of {list(presets)}")
    merged = deep_merge(to_dict(cls()), presets[name])
    if d.get("algorithm") == "data2vec2":
        merged = deep_merge(deep_merge(merged, v2), v2_presets[name])
    merged = deep_merge(merged, d)
    merged["preset"] = name
    return from_dict(cls, merged, where)


class Params(dict):
    """params.yaml as ``load_params`` returns it: the effective values (the profile applied), plus ``own``.

    ``own`` holds the file's own sections as written (no profile applied) when a profile replaced some of
    them, else None. It is an attribute, not a key, so the stages, the report and W&B see only the effective
    values; ``check_all`` validates it too, so a bad value that the profile hides fails now, not once the
    profile changes. A copy (``dict(params)``) is a plain dict without it.
    """

    own: dict[str, Any] | None = None


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    """Read params.yaml, reject unknown top-level keys, apply the selected profile's overrides.

    ``profile`` (or the file's ``profile:`` key) names an entry of ``profiles:`` whose nested keys replace
    the defaults (``profile: smoke`` is the seconds-per-stage profile of the e2e tests and CI). The file's
    own sections stay available as ``.own`` (see :class:`Params`).
    """
    raw = load_yaml(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; valid keys are {list(SECTIONS)}")
    name = (profile if profile is not None else raw.get("profile")) or "default"
    profiles = raw.get("profiles") or {}
    own = None
    # "default" is the file's own sections; its (empty) entry under profiles: exists for dvc.yaml, whose
    # stages depend on `profiles.${profile}` only, not on every profile.
    if profiles.get(name) or name != "default":
        if name not in profiles:
            raise ConfigError(
                f"{path}: profile {name!r} is not defined under 'profiles:' ({sorted(profiles)})"
            )
        bad = sorted(set(profiles[name]) - set(SECTIONS) - {"profiles", "profile"})
        if bad:
            raise ConfigError(f"{path}: profiles.{name}: unknown key(s) {bad}")
        templated = sorted(set(profiles[name]) & set(DVC_TEMPLATED))
        if templated:
            raise ConfigError(
                f"{path}: profiles.{name} overrides {templated}, which dvc.yaml interpolates from the file "
                "itself; set them at the top level instead"
            )
        own = raw
        raw = deep_merge(raw, profiles[name])
    out = Params(raw, profile=name or "default")
    out.own = own
    return out


def section(params: dict[str, Any], name: str, cls: type[T], modality: str | None = None) -> T:
    """The validated ``params[name]`` (or ``params[name][modality]``) as dataclass ``cls``."""
    data = params.get(name) or {}
    where = name
    if modality is not None:
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: expected a mapping of modalities, got {data!r}")
        data = data.get(modality) or {}
        where = f"{name}.{modality}"
    return from_dict(cls, data, where)
