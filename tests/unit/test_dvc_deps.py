"""dvc.yaml is truthful about code: every d2v module a stage's CLI can import is one of the stage's deps.

A stage whose deps miss a module it runs would not rerun when that module changes (a stale `dvc.lock`
that still claims to describe the outputs). The closure is read from the source (``import`` statements
anywhere in a module, relative ones resolved); ``d2v.modalities.get(m)`` is the one dynamic import, and it
loads ``d2v/modalities/<m>``, which every stage that calls it must list.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from d2v.cli import STAGES
from d2v.modalities import MODALITIES

ROOT = Path(__file__).resolve().parents[2]
INFRA = {
    # Parsing params (tracked as params deps), logging, process groups, the CLI and the registry: they do
    # not change what a stage writes for the same params, so listing them would only rerun everything.
    "d2v/__init__.py",
    "d2v/__main__.py",
    "d2v/cli.py",
    "d2v/config.py",
    "d2v/tracking.py",
    "d2v/distributed.py",
    "d2v/modalities/__init__.py",
    "d2v/data/__init__.py",
}


MODALITY_ENTRY = {"prepare": "data.py", "shard": "data.py"}


def module_file(name: str) -> str | None:
    """``d2v.a.b`` -> ``d2v/a/b.py`` or ``d2v/a/b/__init__.py`` (None outside d2v)."""
    if name != "d2v" and not name.startswith("d2v."):
        return None
    base = ROOT / name.replace(".", "/")
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.exists():
            return p.relative_to(ROOT).as_posix()
    return None


def imported(path: str, lazy: bool = False) -> set[str]:
    """d2v files imported by ``path`` at module level (``lazy``: also inside functions); ``from pkg import
    mod`` counts ``mod`` when it is a module."""
    tree = ast.parse((ROOT / path).read_text())
    package = path.rsplit("/", 1)[0].replace("/", ".")
    if path.endswith("__init__.py"):
        package = path[: -len("/__init__.py")].replace("/", ".")
    out: set[str] = set()
    for node in ast.walk(tree) if lazy else tree.body:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = package.split(".")
                mod = ".".join(parts[: len(parts) - node.level + 1] + ([mod] if mod else []))
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for n in names:
            f = module_file(n)
            if f is not None:
                out.add(f)
    return out


def closure(start: set[str], entry: str) -> set[str]:
    """Files loaded by the stage: the entry module's imports, lazy ones included (its CLI function imports
    what it runs), then the module-level imports of everything reached (lazy imports elsewhere serve other
    code paths, e.g. ``checkpoint`` loading a fine-tuned model for ``embed``)."""
    seen, todo = {entry}, list(start | imported(entry, lazy=True))
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        if f not in INFRA:  # package inits and the CLI import lazily for convenience, not for the stage
            todo.extend(imported(f) - seen)
    return seen


def stage_deps(stage: dict, item: str) -> list[str]:
    deps = []
    for d in stage.get("deps", []):
        d = d.replace("${item}", item).replace("${item.modality}", item)
        if d.startswith("d2v"):
            deps.append(d)
    return deps


def covered(f: str, deps: list[str]) -> bool:
    return any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("modality", MODALITIES)
def test_each_stage_lists_the_code_it_runs(stage, modality):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    body = spec.get("do", spec)
    deps = stage_deps(body, modality)
    entry = module_file(STAGES[stage][0])
    assert entry is not None
    # get(modality) is dynamic: the data stages run the modality's data.py, the training stages its package
    start = (
        set()
        if stage == "report"
        else {f"d2v/modalities/{modality}/{MODALITY_ENTRY.get(stage, '__init__.py')}"}
    )
    code = closure(start, entry)
    other = [f"d2v/modalities/{m}/" for m in MODALITIES if m != modality]
    missing = sorted(
        f for f in code if f not in INFRA and not covered(f, deps) and not f.startswith(tuple(other))
    )
    assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not list it in deps"


@pytest.mark.parametrize("modality", MODALITIES)
def test_the_joint_fine_tuning_lists_the_code_it_runs(modality):
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["finetune-joint"]
    deps = stage_deps(body, modality)
    code = closure({f"d2v/modalities/{modality}/__init__.py"}, "d2v/finetune.py")
    other = [f"d2v/modalities/{m}/" for m in MODALITIES if m != modality]
    missing = sorted(f for f in code if f not in INFRA and not covered(f, deps) and not f.startswith(tuple(other)))
    assert not missing, f"dvc.yaml stage 'finetune-joint' runs {missing} but does not list it in deps"
    assert "${paths.checkpoints}/pretrain/joint" in body["deps"]


def test_the_joint_pretraining_lists_the_code_it_runs():
    # it runs every modality's package, and reads every modality's params
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["pretrain-joint"]
    deps = stage_deps(body, "")
    code = closure({f"d2v/modalities/{m}/__init__.py" for m in MODALITIES}, "d2v/joint.py")
    missing = sorted(f for f in code if f not in INFRA and not covered(f, deps))
    assert not missing, f"dvc.yaml stage 'pretrain-joint' runs {missing} but does not list it in deps"
    assert {"model", "pretrain", "joint"} <= set(body["params"])


def test_each_stage_depends_on_the_selected_profile_only():
    # every stage reads the profile that overrides its sections, but not every preset: `profiles` whole
    # would copy all presets into each of the 49 stages' dvc.lock entries (DVC re-reads and rewrites that
    # file after every stage, so every stage would pay for the whole lock file)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        params = (stage.get("do") or stage)["params"]
        assert "profile" in params and "profiles.${profile}" in params, name
        assert "profiles" not in params, name
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["profile"] in params["profiles"]  # DVC fails on a missing params key
