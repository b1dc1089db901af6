"""Processes and API calls of the Prefect e2e tests: start and stop servers and workers, call the CLI and
the REST API. The ``prefect_server`` fixture that uses them is in conftest.py."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

PREFECT = [sys.executable, "-m", "prefect"]


def start(cmd: list[str], log: Path, cwd: Path) -> subprocess.Popen:
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


def stop(proc: subprocess.Popen) -> None:
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


def tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def api_call(url: str, body: dict | None = None) -> object:
    """GET ``url`` (POST ``body`` as JSON when given) and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def prefect_cli(*args: str, cwd: Path, timeout: float = 120) -> str:
    done = subprocess.run([*PREFECT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout
