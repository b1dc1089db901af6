"""The one stage runner of pretraining and fine-tuning: resume, train, guard, checkpoint, time, write, track.

``pretrain`` (``d2v.pretrain``) and ``finetune`` (``d2v.finetune``) build a model, a loader and a :class:`Job`
saying only what differs between them (the optimizer's parameter groups, what runs after each update, the
guards, the logged curve); :func:`fit` runs it and :func:`run_stage` wraps it as a CLI stage. A killed
run resumes bit-exactly from its last checkpoint: weights, optimizer, scheduler, RNG states, the data
position of every rank and the loss history are restored (``d2v.loop`` reseeds every update), at the world
size that wrote it (another one is refused: :func:`data_position`).

Timings never enter a checkpoint (the same params give byte-identical checkpoints, so DVC keeps everything
downstream): a run's wall seconds live in its stage metrics file, rewritten at every checkpoint, and a
resumed run counts on from there.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from d2v import checkpoint, distributed, loop, tracking
from d2v.config import to_dict
from d2v.modalities.base import Encoder
from d2v.optim import build_optimizer, build_scheduler

Kind = Literal["pretrain", "finetune"]
RESUME_NEUTRAL = ("log_every", "checkpoint_every", "keep_checkpoints", "dist_timeout_s")
"""Stage-config fields that do not change the trained weights: a change keeps the run resumable."""


@dataclass
class Job:
    """One training run: everything that differs between pretraining and fine-tuning.

    ``make_loader(epoch)`` yields this rank's batches of one epoch (deterministic per epoch). ``meta`` goes
    into every checkpoint's meta.json and ``files`` are copied next to the weights.
    """

    kind: Kind
    """The stage: metric prefix (``pretrain/loss``), checkpoint kind, W&B job type."""
    model: nn.Module
    cfg: Any
    """The stage section (``PretrainConfig`` / ``FinetuneConfig``: a ``LoopConfig`` with ``optim``)."""
    make_loader: Callable[[int], Iterable[dict[str, Any]]]
    run_dir: Path
    meta: dict[str, Any]
    curve_fields: tuple[str, ...]
    """The logged metrics kept in the loss history (and the plots CSV), ``step`` first."""
    files: dict[str, Path | bytes] | None = None
    layer_ids: Callable[[], dict[str, int]] | None = None
    """Parameter name -> layer id for layer-wise LR decay (fine-tuning); None: no layer decay."""
    on_start: Callable[[int], None] = lambda step: None
    """Runs once the model is built and resumed, with the step the run continues from."""
    after_step: Callable[[int], dict[str, float]] = lambda step: {}
    """Runs after every optimizer update (the EMA teacher); returns scalars to log (tau)."""
    check: Callable[[int, dict[str, float]], str | None] = lambda step, metrics: None
    """At every log: what went wrong (collapse), which halts the run before it saves, or None."""
    # What joint pretraining (``d2v.joint``) changes; None: the single-modality behaviour.
    build_optim: Callable[[nn.Module], tuple[Any, Any]] | None = None
    """The (unwrapped) model -> (optimizer, LR scheduler); None: ``cfg.optim``'s AdamW and schedule."""
    clip_norm: Callable[[], float | None] | None = None
    """The clipping norm of the update that just ran; None: ``cfg.optim.clip_norm``."""
    grad_metrics: Callable[[], dict[str, Any]] | None = None
    """Gradient statistics summed into the logged metrics (``loop.train_step``)."""
    after_backward: Callable[[], None] | None = None
    """Runs after every micro-step's backward (``loop.train_step``)."""
    summarize: Callable[[dict[str, float], list[dict[str, Any]]], dict[str, float | None]] | None = None
    """(the logged means, the history so far) -> what is logged, kept and checked (per-modality means of
    joint pretraining)."""
    make_stream: Callable[[dict[str, Any]], Any] | None = None
    """A saved data position -> the batch stream (``position()`` saves it); None: ``loop.EpochStream``."""


@dataclass
class Outputs:
    """Where a CLI stage writes its flat metrics JSON and its curve CSV (DVC ``metrics`` / ``plots``)."""

    metrics: Path
    curve: Path
    batch_size: int = 1
    """Samples per update over all ranks: ``samples_per_s`` = steps x batch / seconds."""
    info: dict[str, Any] = field(default_factory=dict)
    """Fixed entries added to the metrics JSON (``<kind>/<key>``): where a pretraining run started."""


# ------------------------------------------------------------------------------------------- pieces


def compile_model(model: nn.Module) -> None:
    """``torch.compile`` the model's whole forward in place (``nn.Module.compile``: state-dict names
    unchanged): the student, the teacher's targets, the decoder and the loss in one graph. Compiling the
    blocks alone gains nothing measurable; the whole forward lets inductor fuse the norms, activations and
    residuals of the decoder and the loss around them (``benchmarks/gpu_profile.py``,
    benchmarks/RESULTS.md)."""
    model.compile()


def tune_backends(model: nn.Module, device: torch.device) -> None:
    """CUDA: ``cudnn.benchmark`` when the encoder's batches all have one shape (``Encoder.static_shapes``)."""
    if device.type == "cuda":
        enc = next((m for m in model.modules() if isinstance(m, Encoder)), None)
        torch.backends.cudnn.benchmark = bool(enc is not None and enc.static_shapes)


def train_state(
    model: nn.Module, opt, sched, stream: loop.EpochStream, step: int, history: list
) -> dict[str, Any]:
    """What a resume needs besides the weights; the data position of every rank (a collective: one entry
    per rank, so its length is the world size that wrote it)."""
    return {
        "step": step,
        "optimizer": distributed.optimizer_state(model, opt),
        "scheduler": sched.state_dict(),
        "rng": checkpoint.rng_state(),
        "data": distributed.gather_objects(stream.position()),
        "history": history,
    }


def data_position(
    state: dict[str, Any], info: distributed.DistInfo, run_dir: Path, finished: bool = False
) -> dict[str, int]:
    """This rank's saved data position (epoch 0 for a new run, or for a ``finished`` one).

    A position is a place in one rank's slice of the shards, read in that rank's seeded order with that
    world size's per-rank batch, so no other world size can continue it: resuming at another one (the
    number of saved positions) is refused with a CheckpointError saying what to do, unless nothing is left
    to train.
    """
    if not state:
        return {}
    saved = state["data"]
    written = len(saved)
    if written == info.world_size:
        return saved[info.rank]
    if finished:
        return {}
    raise checkpoint.CheckpointError(
        run_dir,
        f"its checkpoint of step {state['step']} was written by {written} process(es), this run has "
        f"{info.world_size}: each rank's data position belongs to that world size",
        todo=f"rerun with {written} process(es) in all (torchrun: nodes x --nproc-per-node = {written}) to "
        f"continue it, or start over: remove {run_dir} (or `dvc exp run` with another seed)",
    )


def code_fingerprint() -> str:
    """sha256 of the ``d2v`` package's source (every ``.py``, with its path). Part of every run's fingerprint:
    DVC keeps a stage's checkpoints across runs (``persist``) so that a killed run resumes, and without the
    code in the fingerprint a stage rerun after a code change would resume the old code's finished
    checkpoint and report it as the new code's. Conservative: any change to the package starts runs over."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def resume(model: nn.Module, opt, sched, run_dir: Path, set_aside: bool = True) -> dict[str, Any] | None:
    """Load the newest intact checkpoint of ``run_dir`` into model/optimizer/scheduler; its train state or
    None. Damaged newer steps are reported and, with ``set_aside`` (rank 0), moved aside
    (``checkpoint.latest_intact``)."""
    last = checkpoint.latest_intact(run_dir, set_aside=set_aside)
    if last is None:
        return None
    distributed.load_model_state(model, checkpoint.load_weights(last, check=False))  # just verified
    state = checkpoint.load_train_state(last, check=False)
    distributed.load_optimizer_state(model, opt, state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(state["rng"])
    return state


def write_outputs(history: list[dict[str, float]], prefix: str, out: Outputs, seconds: float) -> dict:
    """Flat ``<prefix>/*`` metrics JSON and the curve CSV for DVC plots.

    The metrics are the last logged values, the steps, and the run's wall seconds of training (summed over
    resumes; setup and data preparation excluded) with the samples/s they imply.
    """
    last = history[-1] if history else {}
    metrics = {f"{prefix}/{k}": v for k, v in last.items() if k != "step"}
    steps = metrics[f"{prefix}/steps"] = int(last.get("step", 0))
    metrics[f"{prefix}/seconds"] = seconds
    metrics[f"{prefix}/samples_per_s"] = steps * out.batch_size / seconds if seconds > 0 else 0.0
    metrics.update({f"{prefix}/{k}": v for k, v in out.info.items()})
    out.metrics.parent.mkdir(parents=True, exist_ok=True)
    out.metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    out.curve.parent.mkdir(parents=True, exist_ok=True)
    with out.curve.open("w", newline="") as f:
        # every key any row has, in first-seen order (joint pretraining's per-modality means appear once the
        # modality has had an update)
        fields = list(dict.fromkeys(k for row in history for k in row)) if history else ["step"]
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(history)
    return metrics


def seconds_so_far(out: Outputs | None, prefix: str, step: int) -> float:
    """The training seconds the metrics file recorded at ``step`` (the checkpoint a run resumes from)."""
    if out is None or step == 0 or not out.metrics.is_file():
        return 0.0
    try:
        m = json.loads(out.metrics.read_text())
    except ValueError:
        return 0.0  # a metrics file from an interrupted write: the time is lost, never the run
    return float(m.get(f"{prefix}/seconds", 0.0)) if m.get(f"{prefix}/steps") == step else 0.0


@contextlib.contextmanager
def halt_note(run_dir: Path) -> Iterator[None]:
    """Add the last good checkpoint (never one written after the problem, nor a damaged one) to a
    ``TrainingHalted``."""
    try:
        yield
    except loop.TrainingHalted as e:
        last = checkpoint.latest_intact(run_dir, set_aside=False)
        where = (
            f"the last good checkpoint is {last}; rerunning the stage resumes from it"
            if last
            else "no checkpoint was written yet"
        )
        raise loop.TrainingHalted(f"{e}. Stopped: {where}.") from None


# -------------------------------------------------------------------------------------------- train


def fit(
    job: Job,
    *,
    seed: int = 0,
    info: distributed.DistInfo | None = None,
    tracker: tracking.NullTracker | None = None,
    outputs: Outputs | None = None,
    clock: loop.Stopwatch | None = None,
) -> list[dict[str, float]]:
    """Train ``job.model`` to ``cfg.steps`` updates, resuming from ``job.run_dir``; the logged history.

    ``outputs``: the metrics / curve files, rewritten at every checkpoint (rank 0). ``clock`` ends up
    holding the run's training seconds (resumes included).
    """
    info = info or distributed.DistInfo()
    tracker = tracker or tracking.NullTracker()
    cfg, run_dir = job.cfg, Path(job.run_dir)
    if info.is_main:
        checkpoint.clean_stale(run_dir)
    job.model.to(info.device)
    tune_backends(job.model, info.device)
    if cfg.compile:
        compile_model(job.model)
    wrapped = distributed.wrap(job.model, info, cfg.parallel)
    model = distributed.unwrap(wrapped)
    depth = model.encoder.transformer.depth if job.layer_ids is not None else 0
    layer_ids = job.layer_ids() if job.layer_ids is not None else None
    if job.build_optim is not None:
        opt, sched = job.build_optim(model)
    else:
        opt = build_optimizer(model, cfg.optim, layer_ids, depth)
        sched = build_scheduler(opt, cfg.optim, cfg.steps)
    state = resume(wrapped, opt, sched, run_dir, set_aside=info.is_main) or {}
    step, history = state.get("step", 0), state.get("history", [])
    position = data_position(state, info, run_dir, finished=step >= cfg.steps)
    if job.make_stream is not None:
        stream = job.make_stream(position)
    else:
        stream = loop.EpochStream(job.make_loader, **position)
    clock = clock or loop.Stopwatch()
    clock.restart(seconds_so_far(outputs, job.kind, step))
    job.on_start(step)

    def on_log(done: int, m: dict[str, float]) -> None:
        if job.summarize is not None:
            m = job.summarize(m, history)
        history.append({"step": done, **{k: m[k] for k in job.curve_fields[1:] if k in m}})
        tracker.log({f"{job.kind}/{k}": v for k, v in m.items() if v is not None}, step=done)
        problem = job.check(done, m)
        if problem:
            raise loop.TrainingHalted(problem)

    def on_save(done: int) -> None:
        sd = distributed.model_state(wrapped)  # a collective under FSDP: every rank calls it
        st = train_state(wrapped, opt, sched, stream, done, history)
        if info.is_main:
            checkpoint.save(run_dir, done, sd, job.meta, st, keep=cfg.keep_checkpoints, files=job.files)
            if outputs is not None:  # the time so far, for a run that is killed and resumed
                write_outputs(history, job.kind, outputs, clock.seconds())
        distributed.barrier()

    with halt_note(run_dir):
        loop.run(
            wrapped, opt, sched, stream, cfg, clip_norm=job.clip_norm or cfg.optim.clip_norm, device=info.device,
            seed=seed, start_step=step, rank=info.rank, world_size=info.world_size, after_step=job.after_step,
            on_log=on_log, on_save=on_save, grad_metrics=job.grad_metrics, after_backward=job.after_backward,
        )  # fmt: skip
        if cfg.steps == 0 and not state:
            on_save(0)  # nothing to train (a published model used as is): its weights as a checkpoint
    return history


# ---------------------------------------------------------------------------------------------- CLI


def resume_relevant(cfg: Any) -> dict[str, Any]:
    """The stage config without the fields that leave the weights unchanged (``RESUME_NEUTRAL``)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in RESUME_NEUTRAL}


def per_rank_batch(batch_size: int, grad_accum: int, info: distributed.DistInfo, where: str) -> int:
    n = grad_accum * info.world_size
    if batch_size % n:
        raise ValueError(
            f"{where}.batch_size={batch_size} does not split into {info.world_size} rank(s) x {grad_accum} "
            f"micro-step(s); use a multiple of {n}"
        )
    return batch_size // n


def run_stage(
    job: Job,
    *,
    params: dict[str, Any],
    modality: str,
    fingerprint: dict[str, Any],
    outputs: Outputs,
    run_config: dict[str, Any],
    seed: int,
    info: distributed.DistInfo,
    name: str | None = None,
) -> dict[str, Any]:
    """A training stage from the CLI: decide resume or restart, train, write the outputs, track, report.

    ``fingerprint`` is everything that determines the result (the package's source is added here); a
    checkpoint folder made with another one starts over (``checkpoint.prepare_run_dir``). The caller has
    checked its inputs (``make_loader(0)``) before any model was trained. Rank 0 holds the run folder's
    lock from the resume decision to the last output (``checkpoint.run_lock``: a second writer of the
    folder fails naming this one's pid; the kernel drops the lock of a killed holder, so a run restarted
    by torchrun ``--max-restarts`` takes it over). On several processes every rank must see rank 0's
    files in the run folder (``distributed.check_shared_folder``). Returns the stage metrics (rank 0; {}
    elsewhere).
    """
    fingerprint = {**fingerprint, "code": code_fingerprint()}
    lock = checkpoint.run_lock(job.run_dir) if info.is_main else contextlib.nullcontext()
    with lock:
        distributed.check_shared_folder(job.run_dir, info)  # before any rank decides from what it finds there
        checkpoint.prepare_run_dir(job.run_dir, modality, job.kind, fingerprint, remove=info.is_main)
        distributed.barrier()
        job.meta = {**job.meta, "fingerprint": fingerprint}
        config = {**run_config, "seed": seed, "profile": params.get("profile")}
        tracker = tracking.start(params, job.kind, modality, config=config, name=name, rank=info.rank)
        clock = loop.Stopwatch()
        try:
            history = fit(job, seed=seed, info=info, tracker=tracker, outputs=outputs, clock=clock)
        except BaseException:
            tracker.finish(exit_code=1)
            raise
        metrics: dict[str, Any] = {}
        if info.is_main:
            metrics = write_outputs(history, job.kind, outputs, clock.seconds())
            tracker.summary(metrics)
            if tracker.log_checkpoints:
                label = f"{job.kind}-{modality}" + (f"-{name}" if name else "")
                tracker.artifact(checkpoint.latest(job.run_dir), label, "model")
            loss = metrics.get(f"{job.kind}/loss", float("nan"))
            print(
                f"{job.kind} {modality}{' ' + name if name else ''}: {metrics[f'{job.kind}/steps']} steps, "
                f"loss {loss:.4f}; checkpoints in {job.run_dir}, metrics in {outputs.metrics}"
            )
    tracker.finish()
    distributed.cleanup()
    return metrics
