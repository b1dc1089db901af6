"""Prefect deployments end to end, with real components: ``prefect server start``, a process work pool,
``prefect deploy`` from prefect.yaml, ``prefect deployment run``, ``prefect worker start --run-once``.

The deployment runs a cheap stage that is independent of training: ``shard/cpu`` for images with the smoke
profile, i.e. ``dvc exp run -S profile=smoke shard@image`` (prepare@image runs first) in a copy of the
project. A second run with a profile that does not exist checks the failure path: the stage's error in
the run's log and no retry of a config error.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.flows import FINETUNE_STAGE, d2v_command, dvc_command, expand_targets, stage_command

POOL = "d2v-cpu"
PROFILE = "smoke"
PREFECT = [sys.executable, "-m", "prefect"]


# ------------------------------------------------------------------------------ processes and the API


def _start(cmd: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so that stopping it stops its children), output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT, twice (a Prefect worker can ignore SIGTERM for minutes), then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, 10), (signal.SIGINT, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def _api(url: str, body: dict | None = None) -> object:
    """GET ``url`` (POST ``body`` as JSON when given) and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _prefect(*args: str, cwd: Path, timeout: float = 120) -> str:
    done = subprocess.run([*PREFECT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture
def prefect_server(
    isolated_env: dict[str, str], free_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """``prefect server start`` on a free loopback port (state in the isolated PREFECT_HOME); yields the API
    URL, also set as PREFECT_API_URL for every prefect command the test runs. Stopped even on failure."""
    url = f"http://127.0.0.1:{free_port}/api"
    log = tmp_path / "prefect-server.log"
    cmd = [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(free_port), "--analytics-off"]
    proc = _start(cmd, log, tmp_path)
    try:
        deadline = time.monotonic() + 120  # seconds usually; a fresh database under load takes longer
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited {proc.returncode}:\n{_tail(log)}")
            try:
                if _api(f"{url}/health") is True:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after 120 s:\n{_tail(log)}")
            time.sleep(0.5)
        monkeypatch.setenv("PREFECT_API_URL", url)
        yield url
    finally:
        _stop(proc)


# ------------------------------------------------------------------------------------------ the test


@pytest.mark.e2e
def test_deployment_runs_the_dvc_stage_on_a_process_worker(
    project_copy: Path, prefect_server: str, tmp_path: Path
) -> None:
    api = prefect_server
    _prefect("work-pool", "create", POOL, "--type", "process", cwd=project_copy)
    _prefect("--no-prompt", "deploy", "--name", "shard/cpu", cwd=project_copy)
    ok_params = ["-p", "modality=image", "-p", f"profile={PROFILE}"]
    _prefect("deployment", "run", "shard/cpu", *ok_params, cwd=project_copy)
    # the failure path, outside DVC so that it cannot race the run above in the same repo
    bad_params = ["-p", "modality=image", "-p", "runner=direct", "-p", "profile=no-such-profile"]
    _prefect("deployment", "run", "shard/cpu", *bad_params, cwd=project_copy)

    # The worker starts elsewhere: the pull step finds the project through D2V_ROOT (set by project_copy).
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    log = tmp_path / "prefect-worker.log"
    worker = _start([*PREFECT, "worker", "start", "--pool", POOL, "--run-once"], log, elsewhere)
    try:
        worker.wait(timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker --run-once still running after 150 s:\n{_tail(log)}")
    finally:
        _stop(worker)
    assert worker.returncode == 0, _tail(log)

    runs = _api(f"{api}/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})
    assert len(runs) == 2, [r["name"] for r in runs]
    good, failed = sorted(runs, key=lambda r: r["parameters"].get("runner", "dvc") == "direct")
    assert good["state_type"] == "COMPLETED", f"{good['state']}\n{_tail(log)}"
    assert failed["state_type"] == "FAILED", f"{failed['state']}\n{_tail(log)}"

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
    arts = _api(f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": ["d2v-shards-image"]}}})
    assert [a["flow_run_id"] for a in arts] == [good["id"]]
    for split, entry in manifest["splits"].items():
        assert f"| {split} | {len(entry['shards'])} | {entry['samples']} |" in arts[0]["data"]

    # the failed run: the stage's own error is in the run's log, and a config error is not retried
    logs = _api(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [failed["id"]]}}})
    text = "\n".join(entry["message"] for entry in logs)
    assert "d2v shard: error:" in text and "no-such-profile" in text, text[-3000:]
    tasks = _api(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [failed["id"]]}}})
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
    with pytest.raises(ValueError, match="no stage of dvc.yaml matches 'finetune@audio-\\*'"):
        expand_targets(["finetune@audio-*"], names)
