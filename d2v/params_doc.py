"""``d2v params-doc``: docs/params.md, every params.yaml key with its type, default and meaning.

Generated from the config dataclasses that params.yaml's sections map onto: a field's meaning is the
docstring right after it (the ``\"\"\"...\"\"\"`` string under ``name: type = default``), read from the source
with ``ast``. Every field must have one (``entries`` raises otherwise, and tests/unit/test_params_doc.py
fails, as it does when docs/params.md differs from ``render()``).

``d2v params-doc`` rewrites docs/params.md; ``d2v params-doc --check`` exits 1 when it is out of date.
``d2v show-params`` prints the values a run uses (params.yaml, its profile and these defaults).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from d2v.config import PathsConfig, ReportConfig, TrackingConfig, leaves, to_dict

DOC_PATH = Path("docs/params.md")
"""Where ``render()`` is written, relative to the project root."""
PER_MODALITY = ("prepare", "shard", "model", "pretrain", "finetune", "evaluate")
"""Sections with one entry per modality."""
REGENERATE = "d2v params-doc"
"""The command that rewrites docs/params.md (named by the check's failure message)."""

TOP_LEVEL: dict[str, tuple[str, Any, str]] = {
    "seed": (
        "int",
        0,
        "Seed of every draw the stages make from params (data subsets and splits, pretraining, the probes); "
        "each fine-tuning run takes its seed from `sweep.seeds`.",
    ),
    "modalities": (
        "list of 'audio' | 'image' | 'text'",
        [],
        "The modalities the DVC pipeline runs (dvc.yaml's `foreach`). Every per-modality section holds, and "
        "`d2v check-params` checks, all three whatever this lists. dvc.yaml reads it from the file itself, "
        "so no profile may set it.",
    ),
    "profile": (
        "str",
        "default",
        "The entry of `profiles:` applied on top of the sections (`dvc exp run -S profile=smoke`, or "
        "`--profile` of every `d2v` command); `default` is the sections as written.",
    ),
    "profiles": (
        "mapping",
        {"default": {}},
        "Named overrides, nested like the sections they replace keys of (any section but `paths`, "
        "`modalities` and `sweep`, which dvc.yaml interpolates from the file). `default: {}` stays: each "
        "stage depends on `profiles.${profile}` in dvc.yaml.",
    ),
}
"""Top-level keys that are not a config dataclass: (type, default, meaning)."""


# ------------------------------------------------------------------------------------ field docstrings


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str | None]:
    """``{field: docstring or None}`` of the fields written in ``cls``'s own class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    out: dict[str, str | None] = {}
    for node, after in zip(body, [*body[1:], None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = None
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                doc = after.value.value if isinstance(after.value.value, str) else None
            out[node.target.id] = doc
    return out


def field_docs(cls: type) -> dict[str, str | None]:
    """``{field: docstring or None}`` of every field of dataclass ``cls``, inherited ones included (the
    class that last declares a field gives its docstring)."""
    out: dict[str, str | None] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_field_docs(klass))
    return {f.name: out.get(f.name) for f in dataclasses.fields(cls)}


# ------------------------------------------------------------------------------------------ the schema


@dataclass(frozen=True)
class Entry:
    """One key of params.yaml."""

    path: str
    """Full key path (``model.audio.transformer.dim``)."""
    type: str
    """Its type in words (``int``, ``float | null``, ``'ddp' | 'fsdp'``, ``mapping``)."""
    default: Any
    """The value a run uses when params.yaml does not set the key; ``MAPPING`` for a nested section."""
    doc: str
    """The field's docstring (empty when it has none)."""
    owner: str
    """``module.Class.field`` that declares it (or ``params.yaml`` for the top-level keys)."""
    variants: str = ""
    """``model.<m>``: the values that other presets and ``algorithm: data2vec2`` give it."""


MAPPING = object()
"""``Entry.default`` of a nested section (its keys follow as entries of their own)."""


def type_name(tp: Any) -> str:
    """A params.yaml reader's name of a type annotation: ``int | null``, ``list of int``, ``'a' | 'b'``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return " | ".join(f"'{a}'" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return f"list [{', '.join(type_name(a) for a in args)}]"
        inner = type_name(args[0]) if args else "any"
        return f"list of {f'({inner})' if ' | ' in inner else inner}"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _dataclass_in(tp: Any) -> type | None:
    """The config dataclass ``tp`` is (or ``dataclass | None`` holds), else None."""
    for t in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(t) and isinstance(t, type):
            return t
    return None


def _walk(
    prefix: str,
    cls: type,
    default: dict[str, Any],
    expand: dict[str, tuple[type, dict[str, Any], str]] | None = None,
    variants: dict[str, str] | None = None,
) -> Iterator[Entry]:
    """The entries of dataclass ``cls`` at ``prefix``; ``default``: its resolved default values (nested
    dicts), ``expand``: fields typed ``dict`` whose keys a dataclass checks ({name: (class, defaults,
    type)}), ``variants``: the ``Entry.variants`` text by path."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = f"{prefix}.{f.name}"
        owner = next(k for k in cls.__mro__ if f.name in getattr(k, "__annotations__", {}))
        where = f"{owner.__module__}.{owner.__qualname__}.{f.name}"
        doc = docs[f.name] or ""
        sub = _dataclass_in(hints[f.name])
        if expand and f.name in expand:
            sub_cls, sub_default, tp = expand[f.name]
            yield Entry(path, tp, MAPPING, doc, where)
            yield from _walk(path, sub_cls, sub_default)
        elif sub is not None:
            yield Entry(path, type_name(hints[f.name]), MAPPING, doc, where)
            yield from _walk(path, sub, default[f.name], variants=variants)
        else:
            extra = (variants or {}).get(path, "")
            yield Entry(path, type_name(hints[f.name]), default[f.name], doc, where, extra)


def _model_variants(mod: types.ModuleType, prefix: str) -> dict[str, str]:
    """``{leaf path: "presets tiny `x`, base `y`; data2vec2: ..."}``: what the other presets and the
    data2vec 2.0 recipe set where they differ from the default (``small``, data2vec)."""
    presets = typing.get_args(typing.get_type_hints(mod.ModelConfig)["preset"])
    resolved = {
        (p, a): leaves(to_dict(mod.model_config({"preset": p, "algorithm": a})), prefix)
        for p in presets
        for a in ("data2vec", "data2vec2")
    }
    base = resolved[("small", "data2vec")]
    out: dict[str, str] = {}
    for path, value in base.items():
        if path in (f"{prefix}.preset", f"{prefix}.algorithm"):
            continue
        parts = []
        other = [p for p in presets if p != "small" and resolved[(p, "data2vec")][path] != value]
        if other:
            parts.append(
                "presets: " + ", ".join(f"{p} {_code(resolved[(p, 'data2vec')][path])}" for p in other)
            )
        v2 = {p: resolved[(p, "data2vec2")][path] for p in presets}
        changed = [p for p in presets if v2[p] != resolved[(p, "data2vec")][path]]
        if len(changed) == len(presets) and len({repr(v) for v in v2.values()}) == 1:
            parts.append(f"data2vec2: {_code(v2['small'])}")
        elif changed:
            parts.append("data2vec2: " + ", ".join(f"{p} {_code(v2[p])}" for p in changed))
        if parts:
            out[path] = "; ".join(parts)
    return out


def entries() -> list[Entry]:
    """Every key of params.yaml, in the file's order (sections, then modalities, then fields)."""
    from d2v.evaluate import EvaluateConfig
    from d2v.finetune import FinetuneConfig
    from d2v.joint import JointConfig
    from d2v.modalities import MODALITIES, get
    from d2v.pretrain import PretrainConfig
    from d2v.sweep import SweepConfig

    out = [Entry(k, t, d, doc, "params.yaml") for k, (t, d, doc) in TOP_LEVEL.items()]

    def plain(name: str, cls: type) -> None:
        out.append(Entry(name, "mapping", MAPPING, _class_doc(cls), f"{cls.__module__}.{cls.__qualname__}"))
        out.extend(_walk(name, cls, to_dict(cls())))

    def per_modality(name: str, make: Any) -> None:
        for m in MODALITIES:
            cls, default, kwargs = make(m)
            where = f"{cls.__module__}.{cls.__qualname__}"
            out.append(Entry(f"{name}.{m}", "mapping", MAPPING, _class_doc(cls), where))
            out.extend(_walk(f"{name}.{m}", cls, default, **kwargs))

    def data(kind: str) -> Any:
        def make(m: str) -> tuple[type, dict[str, Any], dict[str, Any]]:
            cls = getattr(importlib.import_module(f"d2v.modalities.{m}.data"), kind)
            return cls, to_dict(cls()), {}

        return make

    def model(m: str) -> tuple[type, dict[str, Any], dict[str, Any]]:
        mod = get(m)
        return (
            mod.ModelConfig,
            to_dict(mod.model_config({})),
            {"variants": _model_variants(mod, f"model.{m}")},
        )

    def finetune(m: str) -> tuple[type, dict[str, Any], dict[str, Any]]:
        mod = get(m)
        expand = {"head": (mod.HeadConfig, to_dict(mod.HeadConfig()), "mapping")}
        if mod.FinetuneMask is not None:
            expand["mask"] = (mod.FinetuneMask, to_dict(mod.FinetuneMask()), "mapping | null")
        return FinetuneConfig, to_dict(FinetuneConfig()), {"expand": expand}

    def shared(cls: type) -> Any:
        return lambda m: (cls, to_dict(cls()), {})

    plain("paths", PathsConfig)
    plain("tracking", TrackingConfig)
    per_modality("prepare", data("PrepareConfig"))
    per_modality("shard", data("ShardConfig"))
    per_modality("model", model)
    per_modality("pretrain", shared(PretrainConfig))
    plain("joint", JointConfig)
    plain("sweep", SweepConfig)
    per_modality("finetune", finetune)
    per_modality("evaluate", shared(EvaluateConfig))
    plain("report", ReportConfig)
    return out


def missing_docstrings() -> list[str]:
    """``module.Class.field`` of every config field without a docstring."""
    return sorted({e.owner for e in entries() if not e.doc.strip()})


# ------------------------------------------------------------------------------------------- rendering


def _class_doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n")[0]


def _markdown(doc: str) -> str:
    """A docstring as one Markdown paragraph: RST ``literals`` and :role:`refs` become `code`, None null."""
    text = " ".join(inspect.cleandoc(doc).split())
    text = re.sub(r":\w+:`~?([^`]+)`", r"``\1``", text)
    text = re.sub(r"\bNone\b", "null", text)  # the YAML spelling
    return text.replace("``", "`")


def _code(value: Any) -> str:
    """A value as params.yaml would write it, in backticks."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")].strip()
    elif text.endswith("..."):
        text = text[:-3].strip()
    return f"`{text}`"


HEADER = f"""\
# params.yaml reference

Every key of params.yaml: its type, its default and what it does. Generated from the docstrings of the
config dataclasses by `{REGENERATE}`; do not edit by hand (tests/unit/test_params_doc.py fails when this file
differs from what the code says).

- **Default** is the value a run uses when params.yaml does not set the key. params.yaml sets many keys
  to other values (the CPU demo's); `d2v show-params [--profile P]` prints every key with the value a run
  uses, and `d2v check-params` validates a file. Why the demo's values are what they are:
  benchmarks/RESULTS.md, "Why the defaults are what they are".
- **`model.<m>`**: the default is the `small` preset with `algorithm: data2vec`. `model.<m>.preset` and
  `model.<m>.algorithm` put other values under the keys you write (a key you write always wins); where
  they differ, the entry lists the other presets' values and the data2vec 2.0 recipe's (per preset).
- The per-modality sections (`prepare`, `shard`, `model`, `pretrain`, `finetune`, `evaluate`) have an
  entry for each of `audio`, `image` and `text`, whatever `modalities:` lists.
"""


def render() -> str:
    """docs/params.md as the code defines it."""
    lines = [HEADER, "## Top-level keys", ""]
    for e in entries():
        depth = e.path.count(".")
        if e.default is MAPPING and (depth == 0 or (depth == 1 and e.path.split(".")[0] in PER_MODALITY)):
            lines += ["", f"## `{e.path}`", "", _markdown(e.doc), ""]
        elif e.default is MAPPING:
            lines.append(f"- **`{e.path}`** ({e.type}): {_markdown(e.doc)}")
        else:
            detail = f"{e.type}; default {_code(e.default)}" + (f"; {e.variants}" if e.variants else "")
            lines.append(f"- **`{e.path}`** ({detail}): {_markdown(e.doc)}")
    return "\n".join(lines).rstrip() + "\n"


def key_paths() -> set[str]:
    """Every settable key path (a nested section's own path included)."""
    return {e.path for e in entries()}


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None, root: Path | None = None) -> int:
    """``d2v params-doc [--check]``: write docs/params.md, or (``--check``) exit 1 when it is out of date."""
    parser = argparse.ArgumentParser(prog="d2v params-doc", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/params.md is out of date")
    parser.add_argument("--out", default=None, help="file to write or check (default: docs/params.md)")
    args = parser.parse_args(argv)
    return run(check=args.check, out=args.out, root=root)


def run(check: bool = False, out: str | Path | None = None, root: Path | None = None) -> int:
    """Write (or check) ``out`` (default: ``<root>/docs/params.md``, root: the current directory)."""
    missing = missing_docstrings()
    if missing:
        print(f"config fields without a docstring: {missing}", file=sys.stderr)
        return 1
    path = Path(out) if out is not None else (root / DOC_PATH if root is not None else DOC_PATH)
    text = render()
    if check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is out of date; run `{REGENERATE}` from the project root", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.write_text(text)
    print(f"wrote {path} ({len(entries())} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
