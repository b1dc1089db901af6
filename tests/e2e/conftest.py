"""Shared fixtures of the e2e tests: real DVC / Prefect / W&B processes, kept off the network and away from
the user's state (settings measured in docs/mlops-stack.md, as in scripts/env.sh)."""

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect_helpers import PREFECT, api_call, start, stop, tail

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reported free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set (in os.environ, so every child process inherits it) what keeps DVC, Prefect and W&B offline,
    with their state in a temporary folder; returns the variables it set.

    PREFECT_API_URL is removed: a test that wants a server starts its own.
    """
    state = tmp_path_factory.mktemp("tool-state")
    env = {
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # the ephemeral server's default 20 s start-up timeout was exceeded under load on 2 cores
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "WANDB_MODE": "offline",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(state / "wandb"),
        "WANDB_CONFIG_DIR": str(state / "wandb" / ".config"),
        "WANDB_CACHE_DIR": str(state / "wandb" / ".cache"),
        "WANDB_DATA_DIR": str(state / "wandb" / ".data"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    return env


def _git(cwd: Path, *args: str) -> None:
    ident = ["-c", "user.name=d2v-tests", "-c", "user.email=tests@d2v.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", *ident, *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def project_copy(tmp_path: Path, isolated_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clone-like copy of the project in ``tmp_path/project``: the files git sees (tracked, plus untracked
    ones that are not ignored), committed in a fresh git repo (``dvc exp run`` needs a commit).

    ``D2V_ROOT`` points at it (as ``source scripts/env.sh`` would) and ``d2v`` on the PATH runs the copy's
    code: the venv's ``d2v`` script would import the editable install of the original instead.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    dst = tmp_path / "project"
    for rel in sorted({os.fsdecode(p) for p in listed if p}):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the working tree is listed but absent
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    _git(dst, "init", "-q")
    _git(dst, "config", "user.name", "d2v-tests")  # `dvc exp run` commits the experiment
    _git(dst, "config", "user.email", "tests@d2v.invalid")
    _git(dst, "add", "-A")
    _git(dst, "commit", "-q", "-m", "e2e copy")

    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    shim = shim_dir / "d2v"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m d2v "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    venv_bin = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join([str(shim_dir), venv_bin, os.environ.get("PATH", "")]))
    monkeypatch.setenv("D2V_ROOT", str(dst))
    return dst


@pytest.fixture
def prefect_server(
    isolated_env: dict[str, str], free_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """``prefect server start`` on a free loopback port (state in the isolated PREFECT_HOME); yields the API
    URL, also set as PREFECT_API_URL for every prefect command the test runs. Stopped even on failure."""
    url = f"http://127.0.0.1:{free_port}/api"
    log = tmp_path / "prefect-server.log"
    cmd = [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(free_port), "--analytics-off"]
    proc = start(cmd, log, tmp_path)
    try:
        deadline = time.monotonic() + 120  # seconds usually; a fresh database under load takes longer
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited {proc.returncode}:\n{tail(log)}")
            try:
                if api_call(f"{url}/health") is True:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after 120 s:\n{tail(log)}")
            time.sleep(0.5)
        monkeypatch.setenv("PREFECT_API_URL", url)
        yield url
    finally:
        stop(proc)
