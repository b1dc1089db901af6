"""Prefect flows over the d2v stages: one flow per stage word, plus ``pipeline`` for the whole chain.

A flow run executes the *DVC stage* (``dvc repro <stage>@<modality>``) in the project directory, so its
outputs are exactly the files ``dvc repro`` makes and ``dvc.lock`` stays truthful; the stage's output streams
into the Prefect log line by line. With ``profile=...`` the command is ``dvc exp run -S profile=...``: DVC
applies the profile to params.yaml and records the run as an experiment (``dvc exp show``).
``runner="direct"`` runs the same ``d2v <stage>`` command the DVC stage runs, without DVC (another params
file, a budget or seed outside the params grid); it records nothing in dvc.lock.

Retries rerun the same command: DVC skips the stages that are up to date and the training code resumes
from its last checkpoint (checkpoint outputs are ``persist: true`` in dvc.yaml, so DVC keeps them). A
config error (``d2v <stage>: error: ...``, exit 2) is not retried: the same params would fail the same way.

No ``from __future__ import annotations`` in this module: deployments build their parameter schema from
the annotations and fail validation with string annotations (PrefectHQ/prefect#19447).
"""

import fnmatch
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal, get_args

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from d2v.config import PathsConfig, load_params, load_yaml, section
from d2v.modalities import JOINT, MODALITIES
from d2v.sweep import FINETUNE_JOINT_STAGE, FINETUNE_STAGE, Init, pretrain_stage

Modality = Literal["audio", "image", "text"]
assert get_args(Modality) == MODALITIES, "keep Modality in step with d2v.modalities.MODALITIES"
Runner = Literal["dvc", "direct"]
PretrainTarget = Literal["audio", "image", "text", "joint"]
"""What ``pretrain`` trains: one modality, or ``joint`` (one Transformer for all of them, ``d2v.joint``)."""
assert get_args(PretrainTarget) == (*MODALITIES, JOINT)

PROJECT_DIR = Path(__file__).resolve().parents[1]
"""The clone these flows live in: every command runs here, whatever the worker's directory."""

DVC_PARAMS = "params.yaml"
"""The params file dvc.yaml reads; ``runner="dvc"`` only works with this one."""

REPORT_ARTIFACT_KEY = "d2v-benchmark"
"""Artifact key of reports/benchmark.md (keys: lowercase letters, digits, dashes)."""

CONFIG_ERROR = re.compile(r"^d2v [\w-]+: error: ")
"""The line d2v/cli.py prints before exiting 2 on bad params or input."""

TAIL_LINES = 30
"""Lines of a failed command's output repeated in the task's failure message."""

NODE_DEPLOYMENT = "pretrain_node/multinode"
"""The deployment ``pretrain_multinode`` runs once per node (prefect.yaml)."""

NODE_QUEUE = "node-{node}"
"""The work queue of node ``node`` in the node deployment's pool: each node's worker polls its own."""


# ------------------------------------------------------------------------------------- commands (pure)


def dvc_command(targets: list[str], profile: str | None = None) -> list[str]:
    """``dvc repro TARGETS`` (all stages if empty); with a profile ``dvc exp run -S profile=P TARGETS``."""
    cmd = [sys.executable, "-m", "dvc"]
    cmd += ["repro"] if profile is None else ["exp", "run", "-S", f"{DVC_PARAMS}:profile={profile}"]
    return cmd + list(targets)


def d2v_command(
    stage: str,
    modality: str | None,
    params_path: str,
    profile: str | None,
    options: dict[str, Any] | None = None,
) -> list[str]:
    """The ``d2v <stage> [modality] --params P [--profile X] [--option value ...]`` command line.

    ``options`` maps option names to values; None leaves the option out.
    """
    cmd = [sys.executable, "-m", "d2v", stage]
    if modality is not None:
        cmd.append(modality)
    cmd += ["--params", params_path]
    if profile is not None:
        cmd += ["--profile", profile]
    for name, value in (options or {}).items():
        if value is not None:
            cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd


def torchrun_command(
    modality: str,
    nodes: int,
    node: int,
    rdzv_endpoint: str,
    rdzv_id: str,
    nproc_per_node: int | str,
    max_restarts: int,
    local_addr: str | None,
    params_path: str,
    profile: str | None,
) -> list[str]:
    """torchrun (``python -m torch.distributed.run``) of node ``node`` of ``nodes``, at a c10d rendezvous,
    running ``d2v pretrain <modality>``.

    Node 0 hosts the rendezvous (``is_host=1``, the others 0), so ``rdzv_endpoint`` must be node 0's
    address; forcing it keeps two agents on one host (or behind one name) from both trying to host. No
    ``--node-rank``: c10d assigns the ranks itself.
    """
    if not 0 <= node < nodes:
        raise ValueError(f"node={node} is not one of the {nodes} nodes 0..{nodes - 1}")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node",
        str(nproc_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id,
        "--rdzv-conf", f"is_host={int(node == 0)}", "--max-restarts", str(max_restarts),
    ]  # fmt: skip
    if local_addr:
        cmd += ["--local-addr", local_addr]
    return cmd + d2v_command("pretrain", modality, params_path, profile)[1:]  # `-m d2v pretrain ...`


def torchrun_env(max_restarts: int) -> dict[str, str]:
    """What a node's torchrun needs in its environment: with restarts, workers that do not share the agent's
    store (a restarted group could read the dead group's addresses from it; docs/recipes.md, "Several
    nodes")."""
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if max_restarts else {}


def commit_refusal(params_path: str, profile: str | None, file_profile: str, shards: str) -> str | None:
    """Why ``dvc commit pretrain@<m>`` would record something other than what ran (None: it would not).

    dvc.lock records params.yaml's values and the hash of the local shard folder, so the run must have read
    params.yaml with its own profile, and shards DVC can hash.
    """
    if params_path != DVC_PARAMS:
        return f"the run read {params_path}; the DVC stage reads {DVC_PARAMS}"
    if profile is not None and profile != file_profile:
        return f"the run used profile {profile!r}; {DVC_PARAMS} says profile: {file_profile}"
    from d2v.data.remote import is_url  # lazily: d2v.data imports webdataset (and torch)

    if is_url(shards):
        return f"paths.shards is a URL ({shards}), which DVC does not hash as the stage's dependency"
    return None


def expand_targets(patterns: list[str], stage_names: list[str]) -> list[str]:
    """Expand shell-style patterns (``finetune@image-*``) against dvc.yaml's stage names, in their order.

    ``dvc exp run`` has no ``--glob``, so the flows expand patterns themselves; a pattern that matches
    nothing is a ValueError (a typo in a budget would otherwise run nothing and succeed), unless another
    pattern of the same call matched (``finetune-joint@image-*`` with no joint budgets in ``sweep``).
    """
    targets: list[str] = []
    for pattern in patterns:
        if not any(ch in pattern for ch in "*?["):
            targets.append(pattern)
            continue
        targets += fnmatch.filter(stage_names, pattern)
    if not targets:
        raise ValueError(f"no stage of dvc.yaml matches {patterns}; the stages are {stage_names}")
    return targets


def dvc_stage_names() -> list[str]:
    """Every stage name of the project's dvc.yaml, ``foreach``/``matrix`` items expanded."""
    cmd = [sys.executable, "-m", "dvc", "stage", "list", "--name-only", "--fail"]
    done = subprocess.run(cmd, cwd=PROJECT_DIR, env=_child_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed in {PROJECT_DIR}:\n{done.stdout}{done.stderr}")
    return done.stdout.split()


def stage_command(
    stage: str,
    modality: str | None,
    runner: Runner,
    profile: str | None,
    params_path: str,
    dvc_targets: list[str],
    options: dict[str, Any] | None = None,
) -> list[str]:
    """The command of one flow: the DVC targets (``runner="dvc"``) or the d2v stage (``"direct"``)."""
    if runner == "direct":
        return d2v_command(stage, modality, params_path, profile, options)
    if params_path != DVC_PARAMS:
        raise ValueError(
            f"params_path={params_path!r} needs runner='direct': DVC stages read {DVC_PARAMS} (dvc.yaml); "
            f"use profile=NAME to run a profile of {DVC_PARAMS} through DVC"
        )
    if any(ch in t for t in dvc_targets for ch in "*?["):
        dvc_targets = expand_targets(dvc_targets, dvc_stage_names())
    return dvc_command(dvc_targets, profile)


# ---------------------------------------------------------------------------------------------- tasks


class StageFailed(RuntimeError):
    """A stage command exited non-zero; ``retryable`` is False for a d2v config error."""

    def __init__(self, cmd: list[str], returncode: int, tail: list[str], config_error: bool):
        self.retryable = not config_error
        super().__init__(f"`{shlex.join(cmd)}` exited with {returncode}; last lines:\n" + "\n".join(tail))


def _retry_unless_config_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry anything but a config error."""
    return not (isinstance(state.data, StageFailed) and not state.data.retryable)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # dvc.yaml's commands (`d2v ...`) come from the venv that runs the flow, even when the worker was
    # started without it on the PATH (an entry already on the PATH keeps its place)
    venv_bin = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if venv_bin not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join([venv_bin, path]) if path else venv_bin
    env.setdefault("DVC_NO_ANALYTICS", "1")  # else DVC spawns an analytics daemon after every command
    env.setdefault("PYTHONUNBUFFERED", "1")  # stream lines as they are printed, not at exit
    # progress bars redraw with '\r', which the pipe turns into one log line per redraw
    env.setdefault("TQDM_MININTERVAL", "30")
    return env


@task(
    retries=2,
    retry_delay_seconds=[30, 120],
    retry_condition_fn=_retry_unless_config_error,
    task_run_name="{label}",
)
def run_command(cmd: list[str], label: str, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` in the project directory, streaming its output to the Prefect log.

    Raises StageFailed with the last lines of output when it exits non-zero. ``label`` names the task
    run in the UI; ``env`` adds variables to the command's environment. The command runs in its own
    process group so that cancelling the flow run stops the stage too (dvc and the training process it
    started).
    """
    logger = get_run_logger()
    logger.info("$ %s  (in %s)", shlex.join(cmd), PROJECT_DIR)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    config_error = False
    proc = subprocess.Popen(
        cmd,
        cwd=PROJECT_DIR,
        env={**_child_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            logger.info(line)
            tail.append(line)
            config_error = config_error or bool(CONFIG_ERROR.match(line))
        returncode = proc.wait()
    except BaseException:  # cancellation, Ctrl-C: stop the whole stage, not just our end of the pipe
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    if returncode != 0:
        raise StageFailed(cmd, returncode, list(tail), config_error)


def _paths(params_path: str, profile: str | None) -> PathsConfig:
    return section(load_params(PROJECT_DIR / params_path, profile), "paths", PathsConfig)


def publish_shards(modality: str, params_path: str, profile: str | None) -> dict[str, int]:
    """The shard manifest's counts as a markdown artifact ``d2v-shards-<modality>``; returns samples/split."""
    from d2v.data.remote import is_url, shard_location  # lazily: d2v.data imports webdataset (and torch)
    from d2v.data.shards import read_manifest

    shard_dir = shard_location(_paths(params_path, profile).shards, modality, base=PROJECT_DIR)
    manifest = read_manifest(shard_dir)
    splits = manifest["splits"]
    samples = {split: entry["samples"] for split, entry in splits.items()}
    rows = "\n".join(f"| {s} | {len(e['shards'])} | {e['samples']} |" for s, e in splits.items())
    create_markdown_artifact(
        f"# d2v shards: {modality}\n\n| split | shards | samples |\n|---|---|---|\n{rows}\n\n"
        f"skipped inputs: {manifest['skipped_counts'] or 'none'}\n",
        key=f"d2v-shards-{modality}",
        description=f"{shard_dir if is_url(shard_dir) else shard_dir.relative_to(PROJECT_DIR)}/manifest.json",
    )
    return samples


def publish_metrics(modality: str, params_path: str, profile: str | None) -> dict[str, Any]:
    """``metrics/<modality>.json`` as a markdown table artifact ``d2v-metrics-<modality>``; returns it."""
    path = PROJECT_DIR / _paths(params_path, profile).metrics / f"{modality}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the evaluate stage finished without writing its metrics")
    metrics = json.loads(path.read_text())
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in sorted(metrics.items()))
    create_markdown_artifact(
        f"# d2v metrics: {modality}\n\n| metric | value |\n|---|---|\n{rows}\n",
        key=f"d2v-metrics-{modality}",
        description=f"{path.relative_to(PROJECT_DIR)}",
    )
    return metrics


def publish_report(params_path: str, profile: str | None) -> Path:
    """``reports/benchmark.md`` as the markdown artifact ``d2v-benchmark``; returns its path."""
    path = PROJECT_DIR / _paths(params_path, profile).reports / "benchmark.md"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the report stage finished without writing it")
    create_markdown_artifact(
        path.read_text(), key=REPORT_ARTIFACT_KEY, description=f"{path.relative_to(PROJECT_DIR)}"
    )
    return path


def _run(
    stage: str,
    modality: str | None,
    runner: Runner,
    profile: str | None,
    params_path: str,
    dvc_targets: list[str],
    options: dict[str, Any] | None = None,
) -> None:
    cmd = stage_command(stage, modality, runner, profile, params_path, dvc_targets, options)
    run_command(cmd, label=shlex.join(cmd[2:]))


# ---------------------------------------------------------------------------------------------- flows
# Shared parameters: ``runner`` (see the module docstring), ``profile`` (an entry of params.yaml's
# ``profiles:``; None: the file's ``profile:`` key) and ``params_path`` (runner="direct" only).


@flow(name="prepare")
def prepare(
    modality: Modality, runner: Runner = "dvc", profile: str | None = None, params_path: str = DVC_PARAMS
) -> None:
    """Materialise the raw data of one modality (``prepare@<modality>``)."""
    _run("prepare", modality, runner, profile, params_path, [f"prepare@{modality}"])


@flow(name="shard")
def shard(
    modality: Modality, runner: Runner = "dvc", profile: str | None = None, params_path: str = DVC_PARAMS
) -> dict[str, int]:
    """Write the WebDataset shards of one modality (``shard@<modality>``, after prepare if stale);
    publishes the manifest's counts as an artifact and returns the samples per split."""
    _run("shard", modality, runner, profile, params_path, [f"shard@{modality}"])
    return publish_shards(modality, params_path, profile)


@flow(name="pretrain")
def pretrain(
    modality: PretrainTarget, runner: Runner = "dvc", profile: str | None = None, params_path: str = DVC_PARAMS
) -> None:
    """data2vec pretraining of one modality (``pretrain@<modality>`` and its stale upstream stages), or
    ``joint``: one Transformer for every modality of ``joint.modalities`` (``pretrain-joint``)."""
    _run("pretrain", modality, runner, profile, params_path, [pretrain_stage(modality)])


@flow(name="finetune")
def finetune(
    modality: Modality,
    budget: int | float | None = None,
    seed: int | None = None,
    init: Init | None = None,
    runner: Runner = "dvc",
    profile: str | None = None,
    params_path: str = DVC_PARAMS,
) -> None:
    """Fine-tune one modality: the ``finetune@<modality>-<budget>-<seed>-<init>`` runs of dvc.yaml (and the
    joint arm's ``finetune-joint@<modality>-<budget>-<seed>``), every one a None leaves open
    (runner="dvc"), or one ``d2v finetune`` with these options (runner="direct").
    ``budget``: labels per class (int) or a fraction of the labels (float).
    """
    options = {"budget": budget, "seed": seed, "init": init}
    unset_as_glob = {k: "*" if v is None else v for k, v in options.items()}
    targets = []
    if init != JOINT:
        targets.append(FINETUNE_STAGE.format(modality=modality, **unset_as_glob))
    if init in (None, JOINT):
        unset_as_glob.pop("init")
        targets.append(FINETUNE_JOINT_STAGE.format(modality=modality, **unset_as_glob))
    _run("finetune", modality, runner, profile, params_path, targets, options)


@flow(name="evaluate")
def evaluate(
    modality: Modality, runner: Runner = "dvc", profile: str | None = None, params_path: str = DVC_PARAMS
) -> dict[str, Any]:
    """Evaluate one modality (``evaluate@<modality>``); publishes its metrics as an artifact."""
    _run("evaluate", modality, runner, profile, params_path, [f"evaluate@{modality}"])
    return publish_metrics(modality, params_path, profile)


@flow(name="report")
def report(runner: Runner = "dvc", profile: str | None = None, params_path: str = DVC_PARAMS) -> str:
    """Render reports/benchmark.{md,html} (``report``); publishes the markdown as an artifact."""
    _run("report", None, runner, profile, params_path, ["report"])
    return str(publish_report(params_path, profile))


@flow(name="pipeline")
def pipeline(profile: str | None = None) -> str:
    """The whole chain: ``dvc repro`` (every stale stage, in DVC's order), then the report artifact.

    One command rather than one task per stage: the DAG is dvc.yaml's, and a retry reruns only what is
    stale (a half-trained stage resumes from its checkpoint).
    """
    _run("pipeline", None, "dvc", profile, DVC_PARAMS, [])
    return str(publish_report(DVC_PARAMS, profile))


# ---------------------------------------------------------------------------------- several nodes
# One torchrun agent per node, each started by the node's own worker: ``pretrain_multinode`` runs the
# ``pretrain_node`` deployment once per node, on the queues node-0 ... node-N-1 of its pool, and waits for
# all of them. torchrun does the rest (c10d rendezvous, ranks, elastic restarts); d2v builds no launcher.


@flow(name="pretrain_node")
def pretrain_node(
    modality: Modality,
    nodes: int,
    node: int,
    rdzv_endpoint: str,
    rdzv_id: str,
    nproc_per_node: int | Literal["gpu"] = "gpu",
    max_restarts: int = 0,
    local_addr: str | None = None,
    retries: int = 2,
    retry_delay_s: float = 30,
    profile: str | None = None,
    params_path: str = DVC_PARAMS,
) -> None:
    """One node of a multi-node pretraining: torchrun of ``d2v pretrain <modality>`` (``torchrun_command``).

    A failed torchrun is relaunched ``retries`` times, ``retry_delay_s`` apart, into the same rendezvous
    (``rdzv_id``): the ranks start again from the run's last checkpoint. When one node dies the others' workers
    fail too (``max_restarts: 0``) and are relaunched by their own retries with the same delay, so they meet
    again; with ``max_restarts`` above 0 their agents restart the workers and wait for it instead.
    """
    cmd = torchrun_command(
        modality, nodes, node, rdzv_endpoint, rdzv_id, nproc_per_node, max_restarts, local_addr, params_path,
        profile,
    )  # fmt: skip
    launch = run_command.with_options(retries=retries, retry_delay_seconds=retry_delay_s)
    launch(cmd, label=f"node {node} of {nodes}: torchrun d2v pretrain {modality}", env=torchrun_env(max_restarts))


def _check_node_pool(client: Any, deployment: str, nodes: int) -> str:
    """The node deployment's pool, after checking that it runs ``nodes`` flow runs at once and has the queues
    node-0 ... node-<nodes-1>: a node left waiting for a slot or a queue would hold the others at the
    rendezvous until it times out."""
    try:
        pool_name = client.read_deployment_by_name(deployment).work_pool_name
    except ObjectNotFound:
        raise ValueError(f"no deployment {deployment!r}: `prefect --no-prompt deploy --name multinode`") from None
    pool = client.read_work_pool(pool_name)
    if pool.concurrency_limit is not None and pool.concurrency_limit < nodes:
        raise ValueError(
            f"work pool {pool_name!r} runs {pool.concurrency_limit} flow run(s) at once and this run needs "
            f"{nodes}: `prefect work-pool set-concurrency-limit {pool_name} {nodes}`"
        )
    logger = get_run_logger()
    for node in range(nodes):
        queue = NODE_QUEUE.format(node=node)
        try:
            found = client.read_work_queue_by_name(queue, work_pool_name=pool_name)
        except ObjectNotFound:
            raise ValueError(
                f"work pool {pool_name!r} has no queue {queue!r}: on node {node}, "
                f"`prefect worker start --pool {pool_name} --work-queue {queue}`"
            ) from None
        if found.is_paused or (found.concurrency_limit is not None and found.concurrency_limit < 1):
            raise ValueError(f"queue {queue!r} of pool {pool_name!r} is paused or has no run slot")
        if str(found.status).upper().endswith("NOT_READY"):
            logger.warning("no worker has polled queue %s lately: node %d waits for one", queue, node)
    return pool_name


@flow(name="pretrain_multinode")
def pretrain_multinode(
    modality: Modality,
    nodes: int,
    rdzv_endpoint: str,
    nproc_per_node: int | Literal["gpu"] = "gpu",
    rdzv_id: str | None = None,
    max_restarts: int = 0,
    local_addr: str | None = None,
    node_retries: int = 2,
    retry_delay_s: float = 30,
    poll_s: float = 5,
    profile: str | None = None,
    params_path: str = DVC_PARAMS,
    node_deployment: str = NODE_DEPLOYMENT,
) -> dict[str, str]:
    """Pretrain one modality on ``nodes`` nodes: one ``pretrain_node`` run per node, each on its node's queue
    (node-0 ... node-N-1), then ``dvc commit -f`` of its stage (``pretrain@<modality>``, ``pretrain-joint``) so
    that dvc.lock records the result.

    ``rdzv_endpoint`` is ``HOST:PORT`` of node 0, whose agent hosts the rendezvous; ``rdzv_id`` defaults to
    this flow run's id, unique per run. Returns each node run's final state; raises if one did not complete.
    The commit is left out, with a warning, when dvc.lock could not record what ran (``commit_refusal``).
    """
    from prefect.runtime import flow_run

    if nodes < 1:
        raise ValueError(f"nodes={nodes}: at least 1")
    logger = get_run_logger()
    rdzv_id = rdzv_id or str(flow_run.id)
    with get_client(sync_client=True) as client:
        pool = _check_node_pool(client, node_deployment, nodes)
        runs = []
        for node in range(nodes):
            parameters = {
                "modality": modality, "nodes": nodes, "node": node, "rdzv_endpoint": rdzv_endpoint,
                "rdzv_id": rdzv_id, "nproc_per_node": nproc_per_node, "max_restarts": max_restarts,
                "local_addr": local_addr, "retries": node_retries, "retry_delay_s": retry_delay_s,
                "profile": profile, "params_path": params_path,
            }  # fmt: skip
            run = run_deployment(
                node_deployment,
                parameters=parameters,
                work_queue_name=NODE_QUEUE.format(node=node),
                flow_run_name=f"pretrain {modality}: node {node} of {nodes}",
                timeout=0,  # start them all, then wait for all
            )
            logger.info("node %d: flow run %s on %s/%s", node, run.name, pool, NODE_QUEUE.format(node=node))
            runs.append(run)
        final = _wait_for(client, runs, poll_s)
    states = {NODE_QUEUE.format(node=i): run.state.name for i, run in enumerate(final)}
    failed = {q: s for (q, s), run in zip(states.items(), final) if not run.state.is_completed()}
    if failed:
        raise RuntimeError(f"node run(s) did not complete: {failed}; each node run's log says why")

    paths = _paths(params_path, profile)
    stage = pretrain_stage(modality)
    file_profile = load_yaml(PROJECT_DIR / DVC_PARAMS).get("profile") or "default"
    reason = commit_refusal(params_path, profile, file_profile, str(paths.shards))
    if reason:
        logger.warning("%s not recorded in dvc.lock: %s", stage, reason)
    else:
        run_command([sys.executable, "-m", "dvc", "commit", "-f", stage], label="dvc commit")
    return states


def _wait_for(client: Any, runs: list[Any], poll_s: float) -> list[Any]:
    """The flow runs ``runs`` once every one is in a final state, read every ``poll_s`` seconds; a state change
    is logged."""
    logger = get_run_logger()
    seen: dict[Any, str] = {}
    while True:
        current = [client.read_flow_run(run.id) for run in runs]
        for run in current:
            if seen.get(run.id) != run.state.name:
                seen[run.id] = run.state.name
                logger.info("%s: %s", run.name, run.state.name)
        if all(run.state.is_final() for run in current):
            return current
        time.sleep(poll_s)
