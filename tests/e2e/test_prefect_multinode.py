"""Multi-node pretraining launched by Prefect, with real components on loopback: ``prefect server start``, the
process pools ``d2v-cpu`` (the ``pretrain_multinode`` flow) and ``d2v-nodes`` (concurrency 2, queues node-0 and
node-1), the deployments of prefect.yaml, and three ``prefect worker start``: one per node queue and one for
the flow that places them. A run for one node more than the pool runs at once is refused before any node
starts.

Each node run starts a torchrun agent (one process) in the same clone, as two nodes sharing the project on
network storage would. Node 1's torchrun is SIGKILLed once the first checkpoint is written; its task's retry
relaunches it, node 0's agent fails with its peer and is relaunched by its own retry, and the two meet again
in the same rendezvous. The run must end Completed, with the weights and loss history of one agent running
two processes, and with ``pretrain@image`` committed to dvc.lock (``dvc status`` clean).
"""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from prefect_helpers import PREFECT, api_call, prefect_cli, start, stop, tail

from d2v import checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS, EVERY = 40, 4
"""Long enough that node 1, killed at the first checkpoint, dies mid-run (as tests/unit/test_multinode.py)."""
RUN = Path("checkpoints/pretrain/image")
REF = Path("ref-checkpoints/pretrain/image")


def _write_params(cwd: Path) -> None:
    """params.yaml's smoke run with a longer image pretraining checkpointed often, as a profile of its own
    selected by the file (so that what ran is what dvc.lock records); ``ref.yaml``: the same, its outputs
    elsewhere."""
    params = yaml.safe_load((cwd / "params.yaml").read_text())
    profile = copy.deepcopy(params["profiles"]["smoke"])
    profile["pretrain"]["image"].update(
        steps=STEPS, checkpoint_every=EVERY, keep_checkpoints=2, batch_size=8, precision="fp32"
    )
    params["profiles"]["multinode"] = profile
    params.update(profile="multinode", modalities=["image"])
    params["tracking"]["mode"] = "disabled"
    assert params["paths"]["checkpoints"] == str(RUN.parents[1])
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    params["paths"].update(checkpoints=str(REF.parents[1]), metrics="ref-metrics", plots="ref-plots")
    (cwd / "ref.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


def _processes() -> list[tuple[int, list[str]]]:
    """(pid, argv) of every live process (from /proc)."""
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        out.append((int(entry.name), [a.decode(errors="replace") for a in argv if a]))
    return out


def _kill_node(is_host: int) -> int:
    """SIGKILL the torchrun agent started with ``is_host=<is_host>``, and its workers (each in a process
    group of its own); returns the agent's pid."""
    procs = _processes()
    agents = [p for p, argv in procs if "torch.distributed.run" in argv and f"is_host={is_host}" in argv]
    assert len(agents) == 1, agents
    agent = agents[0]
    workers = [p for p, _ in procs if _parent(p) == agent]
    os.killpg(agent, signal.SIGKILL)  # run_command starts the agent as a process group leader
    for pid in workers:
        os.killpg(pid, signal.SIGKILL)
    return agent


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_multinode_flow_relaunches_a_killed_node_and_commits_the_stage(
    project_copy: Path, prefect_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, cwd = prefect_server, project_copy
    py = sys.executable
    # the agents' environment, inherited through the workers: loopback only, one thread per process
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _write_params(cwd)
    _run([py, "-m", "dvc", "repro", "shard@image"], cwd)
    # the reference: one agent with two processes
    _run([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "d2v", "pretrain",
          "image", "--params", "ref.yaml"], cwd)  # fmt: skip

    prefect_cli("work-pool", "create", "d2v-cpu", "--type", "process", cwd=cwd)
    prefect_cli("work-pool", "create", "d2v-nodes", "--type", "process", cwd=cwd)
    prefect_cli("work-pool", "set-concurrency-limit", "d2v-nodes", "2", cwd=cwd)
    for node in (0, 1):
        prefect_cli("work-queue", "create", f"node-{node}", "--pool", "d2v-nodes", cwd=cwd)
    prefect_cli("--no-prompt", "deploy", "--name", "pretrain_node/multinode", "--name", "pretrain_multinode/cpu",
             cwd=cwd)  # fmt: skip
    with socket.socket() as sock:  # not the free_port fixture: the server took that one
        sock.bind(("127.0.0.1", 0))
        rdzv = f"127.0.0.1:{sock.getsockname()[1]}"
    prefect_cli("deployment", "run", "pretrain_multinode/cpu", "-p", "modality=image", "-p", "nodes=2",
             "-p", f"rdzv_endpoint={rdzv}", "-p", "nproc_per_node=1", "-p", "local_addr=127.0.0.1",
             "-p", "retry_delay_s=2", "-p", "poll_s=1", cwd=cwd)  # fmt: skip
    # one node more than the pool runs at once: refused before any node starts
    prefect_cli("deployment", "run", "pretrain_multinode/cpu", "-p", "modality=image", "-p", "nodes=3",
                "-p", f"rdzv_endpoint={rdzv}", cwd=cwd)  # fmt: skip

    workers = {
        name: start([*PREFECT, "worker", "start", "--pool", pool, *queue], tmp_path / f"worker-{name}.log", tmp_path)
        for name, pool, queue in (
            ("cpu", "d2v-cpu", []),
            ("node-0", "d2v-nodes", ["--work-queue", "node-0"]),
            ("node-1", "d2v-nodes", ["--work-queue", "node-1"]),
        )
    }
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.list_checkpoints(cwd / RUN):
            assert time.monotonic() < deadline, "no checkpoint after 300 s:\n" + _worker_logs(tmp_path)
            time.sleep(0.05)
        _kill_node(is_host=0)  # node 1: the node that does not host the rendezvous
        assert checkpoint.latest(cwd / RUN).name < f"step-{STEPS:08d}", "the run ended before the kill"
        parent = _wait_parent(api, deadline=time.monotonic() + 420, logs=tmp_path)
    finally:
        for proc in workers.values():
            stop(proc)

    assert parent["state_type"] == "COMPLETED", f"{parent['state']}\n{_worker_logs(tmp_path)}"
    refused = _top_runs(api, nodes=3)[0]
    assert refused["state_type"] == "FAILED", refused["state"]
    logs = api_call(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [refused["id"]]}}})
    said = "\n".join(entry["message"] for entry in logs)
    assert "'d2v-nodes' runs 2 flow run(s) at once and this run needs 3" in said, said[-2000:]
    assert "set-concurrency-limit d2v-nodes 3" in said
    nodes = api_call(f"{api}/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": False}}})
    assert sorted(r["name"] for r in nodes) == ["pretrain image: node 0 of 2", "pretrain image: node 1 of 2"]
    assert all(r["state_type"] == "COMPLETED" for r in nodes), [r["state"] for r in nodes]
    # both nodes' torchrun ran twice: node 1's was killed, node 0's failed with its peer
    tasks = api_call(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [r["id"] for r in nodes]}}})
    assert sorted(t["run_count"] for t in tasks) == [2, 2], [(t["name"], t["run_count"]) for t in tasks]
    queues = {r["name"]: r["work_queue_name"] for r in nodes}
    assert queues == {"pretrain image: node 0 of 2": "node-0", "pretrain image: node 1 of 2": "node-1"}

    # the same run as one agent with two processes: bit-identical (as tests/unit/test_multinode.py)
    a, b = checkpoint.load_weights(cwd / REF), checkpoint.load_weights(cwd / RUN)
    assert a.keys() == b.keys() and {k for k in a if not torch.equal(a[k], b[k])} == set()
    sa, sb = checkpoint.load_train_state(cwd / REF), checkpoint.load_train_state(cwd / RUN)
    assert sb["step"] == sa["step"] == STEPS and sb["history"] == sa["history"]

    # dvc.lock records what ran, and DVC sees nothing stale
    assert "pretrain@image:" in (cwd / "dvc.lock").read_text()
    status = subprocess.run([py, "-m", "dvc", "status", "--json", "pretrain@image"], cwd=cwd,
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(status.stdout) == {}, status.stdout


def _top_runs(api: str, nodes: int) -> list[dict]:
    """The ``pretrain_multinode`` flow runs for ``nodes`` nodes."""
    runs = api_call(f"{api}/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": True}}})
    return [r for r in runs if r["parameters"]["nodes"] == nodes]


def _wait_parent(api: str, deadline: float, logs: Path) -> dict:
    """The two-node ``pretrain_multinode`` flow run, once it is in a final state."""
    while True:
        runs = _top_runs(api, nodes=2)
        assert len(runs) == 1, [r["name"] for r in runs]
        if runs[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return runs[0]
        assert time.monotonic() < deadline, f"still {runs[0]['state_type']}:\n{_worker_logs(logs)}"
        time.sleep(1)


def _worker_logs(where: Path) -> str:
    return "\n".join(f"--- {p.name}\n{tail(p, 60)}" for p in sorted(where.glob("worker-*.log")))
