"""How much of a `dvc repro` is DVC's own work? The smoke pipeline in a copy of this project, timed.

    .venv/bin/python benchmarks/dvc_overhead.py [--rounds 3] [--keep DIR] [--json out.json]

Copies the project as the e2e test does (the files git sees, committed in a fresh repository), sets the
smoke profile with the e2e test's sweep (5 labels/class, seeds 0 and 1, the joint arm on), runs `dvc repro`
once and `dvc status` and a no-op `dvc repro` ``--rounds`` times each. Every stage writes its process's wall
time to `timings/<stage>.json`; DVC's own time is the repro's wall time less their sum: reading params.yaml
for each stage's params, hashing, caching outputs and rewriting dvc.lock after each stage. Also prints which
YAML parser DVC's safe loader gets (ruamel's C parser or its pure-Python one). Takes about 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def copy_project(dst: Path) -> None:
    """The files git sees (tracked, and untracked ones not ignored), committed in a fresh repository."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.split(b"\0")  # fmt: skip
    for rel in sorted({os.fsdecode(p) for p in listed if p}):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    ident = ["-c", "user.name=d2v-bench", "-c", "user.email=bench@d2v.invalid", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(["git", *ident, *args], cwd=dst, check=True, capture_output=True)


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.perf_counter() - start


def yaml_parser() -> str:
    from ruamel.yaml import YAML

    return "C (ruamel.yaml.clib)" if YAML(typ="safe").Parser.__name__ == "CParser" else "pure Python"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed `dvc status` and no-op `dvc repro` runs")
    ap.add_argument("--keep", type=Path, default=None, help="build the project here and keep it")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="dvc-overhead-"))
    project, state = work / "project", work / "state"
    project.mkdir(parents=True)
    copy_project(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profile"] = "smoke"
    params["sweep"]["budgets"], params["sweep"]["seeds"] = [5], [0, 1]
    params["joint"]["modalities"] = ["audio", "image", "text"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": str(state / "wandb"), "D2V_ROOT": str(project),
           "PYTHONPATH": os.pathsep.join([str(project), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    dvc = [sys.executable, "-m", "dvc"]
    repro = timed([*dvc, "repro"], project, env)
    stages = {f.stem: json.loads(f.read_text())["wall_s"] for f in (project / "timings").glob("*.json")}
    status = [timed([*dvc, "status"], project, env) for _ in range(args.rounds)]
    noop = [timed([*dvc, "repro"], project, env) for _ in range(args.rounds)]
    own = repro - sum(stages.values())
    out = {
        "yaml_parser": yaml_parser(), "stages": len(stages), "repro_s": round(repro, 1),
        "stage_processes_s": round(sum(stages.values()), 1), "dvc_own_s": round(own, 1),
        "dvc_own_per_stage_s": round(own / max(len(stages), 1), 2),
        "status_s": round(statistics.median(status), 2), "noop_repro_s": round(statistics.median(noop), 2),
        "dvc_lock_lines": len((project / "dvc.lock").read_text().splitlines()),
    }  # fmt: skip
    print(f"DVC's YAML parser: {out['yaml_parser']}")
    print("| stages | dvc repro | stage processes | DVC's own (per stage) | dvc status | no-op repro | dvc.lock lines |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {out['stages']} | {repro:.1f} s | {out['stage_processes_s']:.1f} s | {own:.1f} s "
          f"({out['dvc_own_per_stage_s']:.2f} s) | {out['status_s']:.2f} s | {out['noop_repro_s']:.2f} s | "
          f"{out['dvc_lock_lines']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
