"""The pipeline through real DVC from a published model: a tiny random Hugging Face data2vec-vision folder under
``published/image/`` stands in for ``facebook/data2vec-vision-base``. The smoke profile on images only, with
the sweep's three arms: the published model as it is, after continued pretraining on the shards, and scratch.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]


def run(cmd: list[str], cwd: Path, timeout: int = 1200) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def stale(cwd: Path) -> set[str]:
    return set(json.loads(run([*DVC, "status", "--json"], cwd)))


@pytest.mark.slow  # about 75 s on epyc-2c: CI runs it (.ci/run)
def test_dvc_repro_from_a_published_model(project_copy: Path, published):
    folder = "published/image/data2vec-vision-tiny"
    published("image", project_copy / folder)
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    params["profile"] = "smoke"
    params["modalities"] = ["image"]
    params["sweep"] = {"budgets": [5], "seeds": [0], "inits": ["pretrained", "scratch", "published"],
                       "joint_budgets": []}
    params["joint"]["modalities"] = []  # a published model is one modality's: no joint arm
    params["pretrain"]["image"]["init"] = folder
    params["evaluate"]["image"]["probe_inits"] = ["pretrained", "scratch", "published"]
    # the folder's architecture; data2vec (1.0) as the published vision model (its relative positions need
    # every patch, which data2vec 2.0 drops)
    params["profiles"]["smoke"]["model"]["image"] = {"preset": "from_init", "algorithm": "data2vec"}
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run([*DVC, "repro"], project_copy)

    manifest = json.loads((project_copy / "data/shards/image/manifest.json").read_text())
    assert manifest["preprocess_like"]["path"] == folder  # the shards follow pretrain.image.init
    assert manifest["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # the processor's, not the data's
    meta = json.loads(sorted((project_copy / "checkpoints/pretrain/image").glob("step-*"))[-1].joinpath(
        "meta.json").read_text())  # fmt: skip
    assert meta["step"] == 4 and meta["init"]["path"] == folder
    assert meta["model_config"]["patch_size"] == 7 and meta["model_config"]["transformer"]["dim"] == 32
    metrics = json.loads((project_copy / "metrics/image.json").read_text())
    for arm in ("pretrained", "scratch", "published"):
        assert any(k.startswith(f"evaluate/{arm}/") for k in metrics), arm
        assert any(k.startswith(f"probe/{arm}/") for k in metrics), arm
    md = (project_copy / "reports/benchmark.md").read_text()
    assert f"starts from `{folder}` (data2vec-vision, 2 x 32" in md and "4 steps of continued pretraining" in md
    assert "continued pretraining − the published model" in md
    assert "| label budget | pretrained | scratch | published |" in md
    assert "## The joint model" not in md and (project_copy / "checkpoints/pretrain/joint/OFF.txt").is_file()

    # DVC tracks the folder: nothing is stale, and a changed model reruns the image stages from shard on
    assert stale(project_copy) == set()
    lock = yaml.safe_load((project_copy / "dvc.lock").read_text())["stages"]
    assert any(d["path"] == "published/image" for d in lock["pretrain@image"]["deps"])
    published("image", project_copy / folder, seed=1)
    assert {"shard@image", "pretrain@image"} <= stale(project_copy)
