"""``d2v show-params``: the configuration a run uses, every key written out, as a params file.

params.yaml sets only what differs from the code's defaults (about half the keys); ``show-params`` prints
all of them: the file, then ``-S`` overrides (as ``dvc exp run -S`` writes them into the file), then the
profile, then every default (``model.<m>`` through its preset and algorithm). The output is itself a valid
params file with the profile already applied (``profile: default``, ``profiles: {default: {}}``):
``d2v check-params --params`` accepts it and ``show-params`` of it prints the same values. The meaning of
every key: docs/params.md (``d2v params-doc``).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from d2v.config import SECTIONS, ConfigError, load_params, load_yaml


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b.c=value"`` -> ``("a.b.c", value)``, the value read as YAML (``-S`` of ``dvc exp run``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"-S {text!r}: expected KEY=VALUE (e.g. -S pretrain.audio.steps=10)")
    try:
        return key, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"-S {key}: the value {value!r} is not YAML ({e})") from None


def check_key(key: str) -> None:
    """ConfigError naming ``key`` unless it is a key of params.yaml (a section's path included); under
    ``profiles.`` any key (``load_params`` checks the profile it applies)."""
    from d2v.params_doc import key_paths

    parts = key.split(".")
    if parts[0] == "profiles" and len(parts) > 1 and all(parts):
        return
    known = key_paths() | set(SECTIONS)
    if key in known:
        return
    parent = ".".join(parts[:-1])
    while parent and parent not in known:
        parent = parent.rpartition(".")[0]
    where = f"{parent}." if parent else ""
    valid = sorted({k[len(where) :].split(".")[0] for k in known if k.startswith(where) and k != parent})
    raise ConfigError(
        f"-S {key}: unknown key; valid keys {'under ' + parent if parent else 'at the top level'} are {valid}"
    )


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``raw`` (a params file's content) with each ``KEY=VALUE`` set, nested mappings created as needed."""
    out = _copy(raw)
    for text in overrides:
        key, value = parse_override(text)
        check_key(key)
        *parents, last = key.split(".")
        node = out
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                if node.get(part) is not None:
                    raise ConfigError(
                        f"-S {key}: {'.'.join(parents[: i + 1])} is {node[part]!r}, not a mapping"
                    )
                node[part] = {}
            node = node[part]
        node[last] = value
    return out


def _copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_copy(v) for v in d]
    return d


def load(path: str | Path = "params.yaml", profile: str | None = None, overrides: Iterable[str] = ()):
    """``load_params(path, profile)`` of the file with ``overrides`` (``KEY=VALUE``) set in it first."""
    overrides = list(overrides)
    if not overrides:
        return load_params(path, profile)
    raw = apply_overrides(load_yaml(path), overrides)
    with tempfile.TemporaryDirectory() as tmp:
        changed = Path(tmp) / Path(path).name
        changed.write_text(yaml.safe_dump(raw, sort_keys=False))
        try:
            params = load_params(changed, profile)
        except ConfigError as e:
            raise ConfigError(str(e).replace(str(changed), f"{path} (with -S)")) from None
    name = params.get("profile", "default")
    entry = (params.own or {}).get("profiles", {}).get(name) if params.own is not None else None
    for text in overrides:
        key = parse_override(text)[0]
        if entry and _sets(entry, key.split(".")):
            print(
                f"note: profile {name!r} sets {key} over -S {text} (as `dvc exp run` does: -S writes the "
                "file, the profile then replaces its keys)",
                file=sys.stderr,
            )
    return params


def _sets(entry: dict[str, Any], parts: list[str]) -> bool:
    """Whether a profile's ``entry`` replaces (part of) the value at key path ``parts``."""
    node: Any = entry
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def resolved(path: str | Path = "params.yaml", profile: str | None = None, overrides: Iterable[str] = ()):
    """Every key a run of ``path`` (``profile``, ``overrides``) uses, with its value (see module doc)."""
    from d2v.params_check import check_all, resolve

    params = load(path, profile, overrides)
    check_all(params, quiet=True)  # the file's own sections too, as every stage checks them
    return resolve(params), params.get("profile", "default")


class _Dumper(yaml.SafeDumper):
    """Block mappings, lists of scalars on one line (``betas: [0.9, 0.98]``), as params.yaml writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def to_yaml(params: dict[str, Any]) -> str:
    """The sections as YAML, one blank line between top-level keys."""
    return "\n".join(
        yaml.dump({k: v}, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)
        for k, v in params.items()
    )


def show(path: str | Path = "params.yaml", profile: str | None = None, overrides: Iterable[str] = ()) -> str:
    """The text ``d2v show-params`` prints."""
    overrides = list(overrides)
    values, applied = resolved(path, profile, overrides)
    header = f"# d2v show-params: {path} with profile {applied!r} applied, every default written out\n"
    if overrides:
        header += "#" + "".join(f" -S {o}" for o in overrides) + "\n"
    header += (
        "# A complete params file (d2v check-params --params FILE accepts it); the profile is already\n"
        "# applied, so profile: default. Meaning of each key: docs/params.md.\n"
    )
    return header + to_yaml(values)


def cli_show(args) -> int:
    """``d2v show-params [--params FILE] [--profile P] [-S KEY=VALUE ...] [--out FILE]``."""
    text = show(args.params, args.profile, args.set or ())
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0
