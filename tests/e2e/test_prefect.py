"""Prefect deployments end to end, with real components: ``prefect server start``, a process work pool,
``prefect deploy`` from prefect.yaml, ``prefect deployment run``, ``prefect worker start --run-once``.

The deployment runs a cheap stage that is independent of training: ``shard/cpu`` for images with the smoke
profile, i.e. ``dvc exp run -S profile=smoke shard@image`` (prepare@image runs first) in a copy of the
project. A second run with a profile that does not exist checks the failure path: the stage's error in
the run's log and no retry of a config error.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect_helpers import PREFECT, api_call, prefect_cli, start, stop, tail

from d2v.sweep import pretrain_stage
from pipelines.flows import (
    FINETUNE_JOINT_STAGE,
    FINETUNE_STAGE,
    d2v_command,
    dvc_command,
    expand_targets,
    stage_command,
)

POOL = "d2v-cpu"
PROFILE = "smoke"


# ------------------------------------------------------------------------------------------ the test


@pytest.mark.e2e
def test_deployment_runs_the_dvc_stage_on_a_process_worker(
    project_copy: Path, prefect_server: str, tmp_path: Path
) -> None:
    api = prefect_server
    prefect_cli("work-pool", "create", POOL, "--type", "process", cwd=project_copy)
    prefect_cli("--no-prompt", "deploy", "--name", "shard/cpu", cwd=project_copy)
    ok_params = ["-p", "modality=image", "-p", f"profile={PROFILE}"]
    prefect_cli("deployment", "run", "shard/cpu", *ok_params, cwd=project_copy)
    # the failure path, outside DVC so that it cannot race the run above in the same repo
    bad_params = ["-p", "modality=image", "-p", "runner=direct", "-p", "profile=no-such-profile"]
    prefect_cli("deployment", "run", "shard/cpu", *bad_params, cwd=project_copy)

    # The worker starts elsewhere: the pull step finds the project through D2V_ROOT (set by project_copy).
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    log = tmp_path / "prefect-worker.log"
    worker = start([*PREFECT, "worker", "start", "--pool", POOL, "--run-once"], log, elsewhere)
    try:
        worker.wait(timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker --run-once still running after 150 s:\n{tail(log)}")
    finally:
        stop(worker)
    assert worker.returncode == 0, tail(log)

    runs = api_call(f"{api}/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})
    assert len(runs) == 2, [r["name"] for r in runs]
    good, failed = sorted(runs, key=lambda r: r["parameters"].get("runner", "dvc") == "direct")
    assert good["state_type"] == "COMPLETED", f"{good['state']}\n{tail(log)}"
    assert failed["state_type"] == "FAILED", f"{failed['state']}\n{tail(log)}"

    # outputs: exactly what `dvc repro` makes, recorded in dvc.lock, and DVC sees nothing stale
    manifest = json.loads((project_copy / "data" / "shards" / "image" / "manifest.json").read_text())
    assert sum(e["samples"] for e in manifest["splits"].values()) > 0
    lock = (project_copy / "dvc.lock").read_text()
    assert "shard@image:" in lock and "prepare@image:" in lock
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", "shard@image"],
        cwd=project_copy,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(status.stdout) == {}, status.stdout  # `dvc status` exits 0 even when stale

    # the artifact of the good run: the manifest's counts
    arts = api_call(f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": ["d2v-shards-image"]}}})
    assert [a["flow_run_id"] for a in arts] == [good["id"]]
    for split, entry in manifest["splits"].items():
        assert f"| {split} | {len(entry['shards'])} | {entry['samples']} |" in arts[0]["data"]

    # the failed run: the stage's own error is in the run's log, and a config error is not retried
    logs = api_call(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [failed["id"]]}}})
    text = "\n".join(entry["message"] for entry in logs)
    assert "d2v shard: error:" in text and "no-such-profile" in text, text[-3000:]
    tasks = api_call(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [failed["id"]]}}})
    assert [(t["state_type"], t["run_count"]) for t in tasks] == [("FAILED", 1)]


# ----------------------------------------------------------------------- the commands the flows run


def test_stage_commands() -> None:
    py = sys.executable
    assert dvc_command(["pretrain@image"]) == [py, "-m", "dvc", "repro", "pretrain@image"]
    assert dvc_command([], "smoke") == [py, "-m", "dvc", "exp", "run", "-S", "params.yaml:profile=smoke"]
    options = {"budget": 0.1, "seed": None, "init": "scratch"}
    assert d2v_command("finetune", "text", "p.yaml", None, options) == [
        py, "-m", "d2v", "finetune", "text", "--params", "p.yaml", "--budget", "0.1", "--init", "scratch"
    ]  # fmt: skip
    direct = stage_command("report", None, "direct", "smoke", "other.yaml", ["report"])
    assert direct == [py, "-m", "d2v", "report", "--params", "other.yaml", "--profile", "smoke"]
    with pytest.raises(ValueError, match="needs runner='direct'"):
        stage_command("report", None, "dvc", None, "other.yaml", ["report"])


def test_expand_targets() -> None:
    names = [
        "prepare@image",
        "finetune@image-10-0-pretrained",
        "finetune@image-10-1-scratch",
        "finetune@text-10-0-scratch",
    ]
    pattern = FINETUNE_STAGE.format(modality="image", budget="*", seed="*", init="scratch")
    assert expand_targets([pattern, "report"], names) == ["finetune@image-10-1-scratch", "report"]
    assert expand_targets(["finetune@image-*"], names) == names[1:3]
    with pytest.raises(ValueError, match="no stage of dvc.yaml matches \\['finetune@audio-\\*'\\]"):
        expand_targets(["finetune@audio-*"], names)
    # the finetune flow asks for both families; no joint budgets in the sweep is not an error
    joint = FINETUNE_JOINT_STAGE.format(modality="image", budget="*", seed="*")
    assert expand_targets(["finetune@image-*", joint], names) == names[1:3]
    assert expand_targets([joint], [*names, "finetune-joint@image-5-0"]) == ["finetune-joint@image-5-0"]


def test_torchrun_command_of_a_node() -> None:
    from pipelines.flows import torchrun_command, torchrun_env

    py = sys.executable
    cmd = torchrun_command("audio", 4, 0, "node0:29500", "run-7", "gpu", 0, None, "params.yaml", None)
    assert cmd == [
        py, "-m", "torch.distributed.run", "--nnodes", "4", "--nproc-per-node", "gpu", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "node0:29500", "--rdzv-id", "run-7", "--rdzv-conf", "is_host=1", "--max-restarts",
        "0", "-m", "d2v", "pretrain", "audio", "--params", "params.yaml",
    ]  # fmt: skip
    other = torchrun_command("audio", 4, 3, "node0:29500", "run-7", 2, 1, "10.0.0.4", "p.yaml", "smoke")
    assert other[other.index("--rdzv-conf") + 1] == "is_host=0"  # only node 0 hosts the rendezvous
    assert other[other.index("--local-addr") + 1] == "10.0.0.4" and "--node-rank" not in other
    assert other[-6:] == ["pretrain", "audio", "--params", "p.yaml", "--profile", "smoke"]
    for node in (-1, 4):
        with pytest.raises(ValueError, match=f"node={node} is not one of the 4 nodes"):
            torchrun_command("audio", 4, node, "h:1", "x", 1, 0, None, "params.yaml", None)
    assert torchrun_env(0) == {} and torchrun_env(2) == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def test_commit_refusal_says_when_dvc_lock_could_not_record_the_run() -> None:
    from pipelines.flows import commit_refusal

    assert commit_refusal("params.yaml", None, "default", "data/shards") is None
    assert commit_refusal("params.yaml", "smoke", "smoke", "data/shards") is None
    assert "read other.yaml" in commit_refusal("other.yaml", None, "default", "data/shards")
    assert "profile 'smoke'" in commit_refusal("params.yaml", "smoke", "default", "data/shards")
    assert "s3://b/shards" in commit_refusal("params.yaml", None, "default", "s3://b/shards")


def test_pretrain_takes_joint_through_both_runners() -> None:
    py = sys.executable
    assert pretrain_stage("joint") == "pretrain-joint" and pretrain_stage("image") == "pretrain@image"
    assert stage_command("pretrain", "joint", "dvc", None, "params.yaml", [pretrain_stage("joint")]) == [
        py, "-m", "dvc", "repro", "pretrain-joint"
    ]  # fmt: skip
    assert stage_command("pretrain", "joint", "direct", None, "params.yaml", [pretrain_stage("joint")]) == [
        py, "-m", "d2v", "pretrain", "joint", "--params", "params.yaml"
    ]  # fmt: skip
    # dvc.yaml has the stage the flow names
    assert "pretrain-joint" in yaml.safe_load((Path(__file__).parents[2] / "dvc.yaml").read_text())["stages"]
