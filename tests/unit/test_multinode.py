"""Several nodes under torchrun (c10d rendezvous) on loopback: two one-process "nodes" reading the shards
from an S3 server train like one node with two processes reading them from a local folder, a killed node is
relaunched to the same weights, an elastic restart resumes, and what cannot work is refused with a message:
a run folder the nodes do not share, a resume at another world size.

Each "node" is one torchrun agent of ``python -m d2v pretrain image`` on tiny image shards (6 shards, 3 per
rank), in its own process group so a whole node (agent and worker) can be SIGKILLed at once. The S3 server
is moto's, on loopback (``s3_server``, tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_distributed import free_port
from test_resume import write_params

from d2v import checkpoint, distributed, runner

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 40, 4
"""40 updates (about 6 epochs of 7 batches per rank) checkpointed every 4: long enough that a node killed
once the first checkpoint appears is killed mid-run, not after the end."""
RUN = Path("ckpt/pretrain/image")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Pretraining shards of 60 tiny images, 10 per shard: 3 whole shards for each of 2 ranks."""
    from d2v.cli import main

    root = tmp_path_factory.mktemp("data")
    write_params(root / "params.yaml", shard={"samples_per_shard": 10})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["prepare", "image"]) == 0 and main(["shard", "image"]) == 0
    assert len(list((root / "shards" / "image").glob("pretrain-*.tar"))) == 6
    return root / "shards"


@pytest.fixture(scope="module")
def s3_shards(shards, s3_server) -> tuple[str, dict[str, str]]:
    """The same shards published to a bucket of the S3 server (``d2v shard image --to``): their URL, and the
    environment that reaches the server."""
    pytest.importorskip("s3fs", reason="pip install -e '.[test]' (s3fs, moto[server])")
    from d2v.cli import main
    from d2v.data import remote

    url = f"s3://d2v-{uuid.uuid4().hex[:12]}/shards"
    with pytest.MonkeyPatch.context() as mp:
        s3_server.apply(mp)
        mp.setattr(remote, "_FS", {})  # no filesystem made for another test's server
        mp.chdir(shards.parent)
        fs, path = remote.filesystem(url)
        fs.mkdir(path.split("/")[0])  # the bucket
        assert main(["shard", "image", "--to", url]) == 0
    return url, s3_server.child_env(dict(os.environ))


def project(where: Path, shards: Path | str, **pretrain) -> Path:
    """A project folder (params.yaml, its own checkpoints and metrics) reading the shared shards."""
    where.mkdir(parents=True, exist_ok=True)
    write_params(
        where / "params.yaml",
        pretrain={"steps": STEPS, "batch_size": 8, "log_every": 2, "checkpoint_every": EVERY,
                  "keep_checkpoints": 2, "precision": "fp32", **pretrain},
    )  # fmt: skip
    params = yaml.safe_load((where / "params.yaml").read_text())
    params["paths"]["shards"] = str(shards)
    (where / "params.yaml").write_text(yaml.safe_dump(params))
    return where


def launch(
    cwd: Path, nodes: int, per_node: int, max_restarts: int = 0, tag: str = "", env: dict[str, Any] | None = None
) -> list[subprocess.Popen]:
    """``nodes`` torchrun agents of ``per_node`` processes each, rendezvousing (c10d) on a free loopback port;
    the first one hosts the rendezvous. Each agent logs to ``cwd/agent<i><tag>.log``. With restarts, the
    agents are told not to share their store with the workers (docs/recipes.md, "Several nodes": a restarted
    group can otherwise read the dead group's addresses from it). ``env``: the agents' environment (default:
    this process's)."""
    port, rdzv_id = free_port(), uuid.uuid4().hex
    env = {k: v for k, v in (env or os.environ).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    if max_restarts:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    procs = []
    for i in range(nodes):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node",
            str(per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
            rdzv_id, "--rdzv-conf", f"is_host={int(i == 0)}", "--local-addr", "127.0.0.1", "--max-restarts",
            str(max_restarts), "-m", "d2v", "pretrain", "image",
        ]  # fmt: skip
        log = open(cwd / f"agent{i}{tag}.log", "w")  # noqa: SIM115 (the child holds it)
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))  # fmt: skip
        log.close()
    return procs


def wait(procs: list[subprocess.Popen], cwd: Path, tag: str = "", timeout: float = 240) -> list[int]:
    """The agents' exit codes (all of them are killed if one outlives ``timeout``)."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"torchrun agents still running after {timeout} s:\n{logs(cwd, tag)}") from None


def logs(cwd: Path, tag: str = "") -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(cwd.glob(f"agent*{tag}.log")))


def run(cwd: Path, nodes: int, per_node: int, env: dict[str, Any] | None = None) -> None:
    assert wait(launch(cwd, nodes, per_node, env=env), cwd) == [0] * nodes, logs(cwd)


def first_checkpoint(run_dir: Path, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    """Return as soon as ``run_dir`` holds a checkpoint (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not checkpoint.list_checkpoints(run_dir):
        assert all(p.poll() is None for p in procs), "a node ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint in {run_dir} after {timeout} s"
        time.sleep(0.01)


def final_state(cwd: Path) -> tuple[dict[str, torch.Tensor], dict]:
    run_dir = cwd / RUN
    return checkpoint.load_weights(run_dir), checkpoint.load_train_state(run_dir)


def assert_same_run(cwd: Path, ref: Path) -> None:
    """Bit-identical weights and loss history. Tolerance 0: the ranks, their shards, their batches and the
    gloo all-reduce over TCP are the same whether two ranks share an agent or not (CPU, one thread), and a
    shard read from S3 is the local shard's bytes (its sha256 is checked before a sample is parsed)."""
    (a, sa), (b, sb) = final_state(ref), final_state(cwd)
    assert a.keys() == b.keys()
    assert {k for k in a if not torch.equal(a[k], b[k])} == set()
    assert sb["step"] == sa["step"] == STEPS and len(sb["data"]) == len(sa["data"]) == 2
    assert sb["history"] == sa["history"] and len(sb["history"]) == STEPS // 2
    assert sb["data"] == sa["data"]


@pytest.fixture(scope="module")
def one_node(shards, tmp_path_factory) -> Path:
    """The reference: one agent with two processes."""
    cwd = project(tmp_path_factory.mktemp("one-node"), shards)
    run(cwd, nodes=1, per_node=2)
    return cwd


def test_two_nodes_reading_s3_train_like_one_node_of_two_reading_a_folder(one_node, s3_shards, tmp_path):
    url, env = s3_shards
    cwd = project(tmp_path, url)
    run(cwd, nodes=2, per_node=1, env=env)
    assert_same_run(cwd, one_node)
    assert not (cwd / "shards").exists()  # the URL was the only way to the shards
    # the shared-folder check passed and left nothing in the run folder (a DVC output)
    assert sorted(p.name for p in (cwd / RUN).iterdir()) == [f"step-{STEPS - EVERY:08d}", f"step-{STEPS:08d}"]


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL a node: its agent and its workers (torchrun starts each worker in a process group of its own)."""
    workers = children(agent.pid)
    os.killpg(agent.pid, signal.SIGKILL)
    for pid in workers:
        os.killpg(pid, signal.SIGKILL)


@pytest.mark.slow  # about 20 s on epyc-2c: CI runs it (.ci/run)
def test_a_killed_node_is_relaunched_and_the_run_ends_with_the_same_weights(one_node, s3_shards, tmp_path):
    url, env = s3_shards
    cwd = project(tmp_path, url)
    procs = launch(cwd, nodes=2, per_node=1, env=env)
    first_checkpoint(cwd / RUN, procs)
    kill_node(procs[1])  # the node that does not host the rendezvous
    codes = wait(procs, cwd)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0  # the surviving node fails too (max-restarts 0)
    last = checkpoint.latest(cwd / RUN)
    assert last is not None and last.name < f"step-{STEPS:08d}", "the run ended before the kill"
    procs = launch(cwd, nodes=2, per_node=1, tag="-again", env=env)  # both relaunched, as a scheduler does
    assert wait(procs, cwd, "-again") == [0, 0], logs(cwd, "-again")
    assert_same_run(cwd, one_node)


@pytest.mark.slow
def test_an_elastic_restart_resumes_from_the_last_checkpoint(one_node, shards, tmp_path):
    """``--max-restarts 1``: one worker SIGKILLed; both agents restart their workers, which take over the dead
    rank 0's run-folder lock and resume from the last checkpoint, to the uninterrupted run's weights."""
    cwd = project(tmp_path, shards)
    procs = launch(cwd, nodes=2, per_node=1, max_restarts=1)
    first_checkpoint(cwd / RUN, procs)
    workers = children(procs[1].pid)
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)
    last = checkpoint.latest(cwd / RUN)  # no rank writes another one without the dead one
    assert last is not None and last.name < f"step-{STEPS:08d}", "the run ended before the kill"
    assert wait(procs, cwd) == [0, 0], logs(cwd)  # a dead worker and both agents succeed: they restarted
    assert_same_run(cwd, one_node)


def test_resuming_at_another_world_size_is_refused_unless_nothing_is_left(one_node, tmp_path, capsys):
    from d2v.cli import main

    cwd = tmp_path / "project"
    shutil.copytree(one_node, cwd, ignore=shutil.ignore_patterns("*.log"))
    final = cwd / RUN / f"step-{STEPS:08d}"
    weights = checkpoint.load_weights(final)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        # finished at 2 processes: a rerun at 1 has nothing to train and keeps the weights
        assert main(["pretrain", "image"]) == 0
        assert all(torch.equal(weights[k], v) for k, v in checkpoint.load_weights(cwd / RUN).items())
        # unfinished (the last checkpoint gone): 1 process cannot continue 2 ranks' data positions
        shutil.rmtree(final)
        capsys.readouterr()
        assert main(["pretrain", "image"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{RUN}: its checkpoint of step {STEPS - EVERY} was written by 2 process(es), this run has 1" in err
    )
    assert "rerun with 2 process(es) in all" in err and f"remove {RUN}" in err
    assert [p.name for p in checkpoint.list_checkpoints(cwd / RUN)] == [f"step-{STEPS - EVERY:08d}"]


def test_data_position_at_the_world_size_that_saved_it():
    one, two = distributed.DistInfo(), distributed.DistInfo(rank=1, world_size=2)
    where = Path("ckpt/pretrain/image")
    assert runner.data_position({}, two, where) == {}  # a new run
    # one saved position per rank: their number is the world size that wrote them
    old = {"step": 4, "data": [{"epoch": 1, "index": 2}]}
    assert runner.data_position(old, one, where) == {"epoch": 1, "index": 2}
    new = {"step": 4, "data": [{"epoch": 1, "index": 2}, {"epoch": 1, "index": 3}]}
    assert runner.data_position(new, two, where) == {"epoch": 1, "index": 3}
    for state, info in ((old, two), (new, one)):
        with pytest.raises(checkpoint.CheckpointError, match="written by"):
            runner.data_position(state, info, where)
    assert runner.data_position(new, one, where, finished=True) == {}


# --------------------------------------------------------------------------- the shared run folder check

# Each rank joins a gloo group from MASTER_ADDR/PORT (no torchrun needed) in its own working directory and
# checks the relative run folder, as two nodes each with their own clone of the project and a relative
# paths.checkpoints would: the same path, different storage.
CHECK = textwrap.dedent(
    """
    import sys
    from d2v import distributed

    info = distributed.init(timeout_s=60)
    try:
        distributed.check_shared_folder("ckpt/pretrain/image", info)
        print("shared")
    except ValueError as e:
        print(e)
    distributed.cleanup()
    """
)


def check_ranks(tmp_path: Path, cwds: list[Path]) -> list[str]:
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    port, procs = free_port(), []
    for rank, cwd in enumerate(cwds):
        cwd.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(len(cwds))}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(cwds), [err[-2000:] for _, err in outs]
    return [out.strip() for out, _ in outs]


def test_a_run_folder_the_nodes_do_not_share_is_refused_on_every_rank(tmp_path):
    import socket

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    said = check_ranks(tmp_path, [node0, node1])
    assert said[0] == said[1]  # every rank stops, with the same message
    host = socket.gethostname()
    assert said[0].startswith(f"{RUN}: not on storage shared by all nodes: rank 1 on host {host} cannot read")
    assert (
        str(node1 / RUN / distributed.SHARED_TOKEN) in said[0] and f"rank 0 wrote on host {host}" in said[0]
    )
    assert "mounted at the same path on every node" in said[0] and "flock" in said[0]
    assert list((node0 / RUN).iterdir()) == []  # rank 0 removed its token


def test_a_shared_run_folder_passes_and_is_left_as_it_was(tmp_path):
    assert check_ranks(tmp_path, [tmp_path, tmp_path]) == ["shared", "shared"]
    assert list((tmp_path / RUN).iterdir()) == []


# --------------------------------------------------------------------------- the process group's timeout


def test_dist_timeout_s_reaches_the_process_group(shards, tmp_path, monkeypatch):
    import datetime

    import torch.distributed as dist

    from d2v.cli import main

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.update(timeout=timeout))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    distributed.init(torch.device("cpu"), timeout_s=90)
    assert seen["timeout"] == datetime.timedelta(seconds=90)
    distributed.init(torch.device("cpu"))
    assert seen["timeout"] == datetime.timedelta(minutes=30)  # the default, as before it was a parameter

    # the CLI passes the stage's dist_timeout_s (stopped right there: no process group is wanted here)
    def stop(device=None, timeout_s=None):
        raise ValueError(f"init with timeout_s={timeout_s}")

    monkeypatch.setattr(distributed, "init", stop)
    monkeypatch.chdir(project(tmp_path, shards, dist_timeout_s=120))
    with pytest.raises(ValueError, match="timeout_s=120.0"):
        main(["pretrain", "image", "--debug"])


def test_a_restartable_torchrun_sharing_its_store_is_warned_about():
    shared = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    note = distributed.restart_store_note(shared)
    assert note and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in note and "--max-restarts 3" in note
    assert distributed.restart_store_note({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert distributed.restart_store_note({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert distributed.restart_store_note({}) is None  # not under torchrun
