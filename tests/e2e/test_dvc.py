"""The whole pipeline through real DVC on the smoke profile (real data, real shards, real W&B offline runs).

One `dvc repro` in a committed copy of the project, then: a second repro is a no-op (`dvc status --json`
is `{}`: `dvc status` exits 0 even when stale), one modality's param invalidates only that modality's
stages, the offline W&B runs hold the config and metrics, the report was rendered from the metrics, and
data2vec 2.0 pretrains and fine-tunes every modality on the same shards, and `benchmarks/pretrain_seeds.py`
runs on them. One test, one project copy: the data stages run once (the suite's time bound).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]
WANDB = str(Path(sys.executable).parent / "wandb")
MODALITIES = ("audio", "image", "text")


def run(cmd: list[str], cwd: Path, timeout: int = 1200) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (
        f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    )
    return p.stdout + p.stderr


def status(cwd: Path) -> dict:
    return json.loads(run([*DVC, "status", "--json"], cwd))


def test_dvc_repro_smoke_end_to_end(project_copy: Path):
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    params["profile"] = "smoke"
    # one budget, two seeds: every code path of the sweep (seed spread, the report's CI) at half the stages
    params["sweep"]["budgets"], params["sweep"]["seeds"] = [5], [0, 1]
    params["joint"]["modalities"] = list(MODALITIES)  # the joint arm, off in the default demo
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run([*DVC, "repro"], project_copy)

    # every stage ran and wrote its outputs
    for m in MODALITIES:
        manifest = json.loads((project_copy / "data/shards" / m / "manifest.json").read_text())
        assert manifest["splits"]["pretrain"]["samples"] > 0 and manifest["splits"]["test"]["samples"] > 0
        metrics = json.loads((project_copy / "metrics" / f"{m}.json").read_text())
        assert any(k.startswith("evaluate/pretrained/") for k in metrics)
        assert any(k.startswith("evaluate/scratch/") for k in metrics)
        pre = json.loads((project_copy / "metrics/pretrain" / f"{m}.json").read_text())
        assert pre["pretrain/steps"] == 4 and pre["pretrain/loss"] > 0 and pre["pretrain/seconds"] > 0
        # the joint arm: fine-tuned at sweep.joint_budgets, and probed beside the others
        assert any(k.startswith("evaluate/joint/b5/") for k in metrics), sorted(metrics)
        assert any(k.startswith("probe/joint/") for k in metrics), sorted(metrics)
    joint = json.loads((project_copy / "metrics/pretrain/joint.json").read_text())
    assert joint["pretrain/steps"] == 12 and all(joint[f"pretrain/updates_{m}"] == 4 for m in MODALITIES)
    md = (project_copy / "reports/benchmark.md").read_text()
    # the run-time table is filled from the stage metrics (pretrain s, samples/s, fine-tuning s)
    times = md.split("## Run times", 1)[1].split("\n## ", 1)[0]
    assert [r for r in times.splitlines() if r.startswith("| audio")] and "—" not in times, times
    html = (project_copy / "reports/benchmark.html").read_text()
    assert "## Results" in md and "<img" in html and 'src="http' not in html
    # every stage before the report recorded its wall time, and the report sums them by kind
    lock = yaml.safe_load((project_copy / "dvc.lock").read_text())["stages"]
    timed = {f.stem for f in (project_copy / "timings").glob("*.json")}
    assert set(lock) - {"report"} <= timed, sorted(set(lock) - timed)
    walls = md.split("## Stage wall times", 1)[1].split("\n## ", 1)[0]
    for kind in ("prepare", "shard", "pretrain", "finetune", "evaluate"):
        assert any(r.startswith(f"| {kind} |") for r in walls.splitlines()), walls

    # a second repro is a no-op: nothing stale, nothing rerun
    assert status(project_copy) == {}
    again = run([*DVC, "repro"], project_copy)
    assert "Running stage" not in again

    # one modality's param invalidates only that modality's stages, the joint arm (which reads every
    # modality's pretrain section) with every evaluate that probes it, and the report
    log_every = params["pretrain"]["image"]["log_every"]
    params["pretrain"]["image"]["log_every"] = log_every + 1
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = status(project_copy)
    ok = ("image", "joint", "evaluate@", "report")
    assert stale and all(any(w in name for w in ok) for name in stale), sorted(stale)
    assert "pretrain@image" in stale and "pretrain-joint" in stale
    assert not any(n.startswith(("pretrain@", "finetune@")) and "image" not in n for n in stale), sorted(stale)
    params["pretrain"]["image"]["log_every"] = log_every
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert status(project_copy) == {}

    # `dvc exp run -S` sets a param from the command line and reruns only the stages that read it
    out = run([*DVC, "exp", "run", "-S", "finetune.text.optim.lr=2e-4"], project_copy)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran and all(
        n.startswith(("finetune@text-", "finetune-joint@text-", "evaluate@text")) or n == "report" for n in ran
    ), ran
    assert "evaluate@text" in ran
    assert "finetune.text.optim.lr" in run([*DVC, "params", "diff"], project_copy)
    assert "metrics/text.json" in run([*DVC, "metrics", "show"], project_copy)
    shown = json.dumps(json.loads(run([*DVC, "exp", "show", "--json"], project_copy)))
    assert "2e-4" in shown or "0.0002" in shown, "dvc exp show does not list the experiment's param"
    run([*DVC, "metrics", "diff"], project_copy)

    # `dvc plots show` renders offline: the vega scripts are inlined by dvc_plots/template.html
    run([*DVC, "plots", "show", "-o", "plots_html"], project_copy)
    page = (project_copy / "plots_html" / "index.html").read_text()
    assert "vegaEmbed" in page and not re.search(r"<script[^>]*\bsrc=", page)  # nothing fetched

    # the default remote (a folder beside the clone) takes the shards and checkpoints and gives them back
    run([*DVC, "push"], project_copy)
    assert (project_copy.parent / "d2v-dvc-remote").is_dir()
    shard = project_copy / "data/shards/image/manifest.json"
    before = shard.read_bytes()
    run(["rm", "-rf", "data/shards/image", "checkpoints/pretrain/image"], project_copy)
    run([*DVC, "pull"], project_copy)
    assert shard.read_bytes() == before and (project_copy / "checkpoints/pretrain/image").is_dir()

    # W&B offline runs: one per training/evaluating stage, with the params and the metrics. Read until the
    # runs checked below are found (each `wandb leet inspect` is a process of ~1 s; the project has ~40 runs)
    runs = sorted((project_copy / "wandb" / "wandb").glob("offline-run-*"))
    wanted = {f"pretrain-{m}" for m in MODALITIES}
    summaries = {}
    for rd in runs:
        if wanted <= set(summaries) and any(name.startswith("finetune-") for name in summaries):
            break
        out = subprocess.run(
            [WANDB, "leet", "inspect", "--summary", "--json", str(rd)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env=os.environ,
        ).stdout
        s = json.loads(out)
        summaries[s["name"]] = s
    for m in MODALITIES:
        s = summaries[f"pretrain-{m}"]
        assert s["state"] == "finished" and s["config"]["stage"] == "pretrain"
        assert "model" in s["config"] and s["config"]["git_commit"]
        assert s["summary"]["pretrain/loss"] > 0
    assert any(name.startswith("finetune-") for name in summaries)

    # the other algorithm of each modality (the demo's image runs data2vec 2.0, audio and text data2vec)
    # through the same stages, on the shards already written: `model.<m>.algorithm` reruns pretraining and a
    # fine-tune from its checkpoint; `d2v embed` reads the checkpoint (the encoder then sees every token)
    own = yaml.safe_load((project_copy / "params.yaml").read_text())["model"]
    other = {m: "data2vec" if own[m].get("algorithm") == "data2vec2" else "data2vec2" for m in MODALITIES}
    sets = [a for m in MODALITIES for a in ("-S", f"model.{m}.algorithm={other[m]}")]
    targets = [f"finetune@{m}-5-0-pretrained" for m in MODALITIES]  # and their stale upstream stages
    out = run([*DVC, "exp", "run", *sets, *targets], project_copy)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert {f"pretrain@{m}" for m in MODALITIES} <= ran and not any(n.startswith("shard@") for n in ran), ran
    for m in MODALITIES:
        step = sorted((project_copy / "checkpoints/pretrain" / m).glob("step-*"))[-1]
        assert json.loads((step / "meta.json").read_text())["model_config"]["algorithm"] == other[m]
        ft = json.loads((project_copy / "metrics/finetune" / m / "b5-s0-pretrained.json").read_text())
        assert ft["finetune/steps"] == 3 and ft["finetune/loss"] > 0
    pixels = np.load(project_copy / "data/raw/image/fashion-mnist/test-images.npy")[:2]
    files = [project_copy / f"item{i}.png" for i in range(2)]
    for f, p in zip(files, pixels):
        Image.fromarray(p).save(f)
    run(["d2v", "embed", "checkpoints/pretrain/image", *map(str, files), "--out", "f.npy"], project_copy)
    assert np.load(project_copy / "f.npy").shape == (2, 16)  # the tiny preset's width

    # benchmarks/pretrain_seeds.py: one `d2v pretrain` per seed on the project's shards, each fine-tuned
    # against scratch (which runs once: it does not depend on the pretraining seed)
    script = project_copy / "benchmarks/pretrain_seeds.py"
    argv = [
        sys.executable,
        str(script),
        str(project_copy),
        "image",
        "--seeds",
        "0",
        "1",
        "--finetune-seeds",
        "0",
        "1",
    ]
    out = run([*argv, "--json", "seeds.jsonl"], project_copy)
    (line,) = (project_copy / "seeds.jsonl").read_text().splitlines()
    rows = json.loads(line)["rows"]
    assert [r["pretrain_seed"] for r in rows] == [0, 1] and rows[0]["final_loss"] != rows[1]["final_loss"]
    assert all(len(r["pretrained"]) == 2 and r["scratch"] == rows[0]["scratch"] for r in rows), rows
    assert all(f"| {r['pretrain_seed']} | {r['final_loss']:.3f} |" in out for r in rows), out
