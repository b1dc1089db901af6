"""Time to accuracy: data2vec and data2vec 2.0 pretrained side by side, probed at fixed wall-clock intervals.

    .venv/bin/python benchmarks/time_to_accuracy.py [--modalities image audio text] [--minutes 5]
        [--interval 30] [--preset small] [--out benchmarks/results/time_to_accuracy]

[P2]'s claim is time to accuracy, not steps per second: multi-mask makes each 2.0 step do more work per
sample. For each modality, both algorithms pretrain the same model size (``--preset``) on the same shards
(``data/shards/<m>``: run ``dvc repro shard@<m>`` first) with the optimizer of ``pretrain.<m>`` in
params.yaml and their own recipe (masking, targets, decoder: ``model.<m>.algorithm``), and the teacher
schedule of ``model.<m>.ema`` stretched over the run's planned steps. Every
``--interval`` seconds of training (the probe's own time excluded) the student's frozen features are probed
with the evaluate stage's linear probe (``d2v.evaluate.probe``: ``evaluate.<m>.probe_budget`` labels per
class of the train split -> test split). Each run is a separate process, so its peak memory is its own.

Prints and writes (``<out>/<m>.json``, ``<out>/time_to_accuracy.png``): probe accuracy against training
time for both algorithms; the time 2.0 needs to reach 1.0's final accuracy and its ratio to 1.0's time;
samples/s counting each original sample once (2.0's clones are not extra samples); peak RSS. A
wall-clock measurement: compare figures only within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from d2v.config import PathsConfig, load_params, section, to_dict
from d2v.data.loader import LoaderSpec, build_loader, read_manifest
from d2v.data.remote import shard_location
from d2v.evaluate import EvaluateConfig, probe
from d2v.modalities import MODALITIES, get
from d2v.pretrain import PretrainConfig, pretrain

ALGORITHMS = ("data2vec", "data2vec2")


def measure(modality: str, algorithm: str, args: argparse.Namespace) -> dict:
    """One pretraining run of ``--minutes`` of training time, probed every ``--interval`` seconds."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    params = load_params(args.params, args.profile)
    paths = section(params, "paths", PathsConfig)
    shard_dir = shard_location(paths.shards, modality)
    manifest = read_manifest(shard_dir)
    mod = get(modality)
    user = dict((params.get("model") or {}).get(modality) or {})
    model_cfg = mod.model_config({**user, "preset": args.preset, "algorithm": algorithm}, f"model.{modality}")
    cfg = section(params, "pretrain", PretrainConfig, modality)
    # one probe seed and at most 100 valid/test items per class: probes stay short next to training
    eval_cfg = replace(
        section(params, "evaluate", EvaluateConfig, modality),
        probe_seeds=(0,),
        probe_eval_budget=args.eval_per_class,
    )
    seed = int(params.get("seed", 0))
    device = torch.device("cpu")

    def make_loader(epoch: int):
        return build_loader(shard_dir, "pretrain", model_cfg, LoaderSpec(
            batch_size=cfg.batch_size, mode="pretrain", seed=seed, max_len=cfg.max_len, min_len=cfg.min_len,
            epoch=epoch, length_buckets=cfg.length_buckets,
        ))  # fmt: skip

    scratch = Path(args.tmp) / f"{modality}-{algorithm}"
    shutil.rmtree(scratch, ignore_errors=True)  # never resume an earlier benchmark's checkpoint
    budget, interval = args.minutes * 60.0, args.interval
    # The LR schedule needs a step count: time a few steps first (after the loader's start and a warm-up
    # step), then plan the run's steps from the median step time.
    probe_steps = 6
    short = replace(cfg, steps=probe_steps, log_every=probe_steps, checkpoint_every=10**9, compile=False)
    stamps: list[float] = []
    pretrain(
        mod.build_pretrain_model(model_cfg), short, make_loader, scratch / "timing", {},
        after_step=lambda done: stamps.append(time.perf_counter()),
    )  # fmt: skip
    per_step = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))
    steps = max(int(budget / per_step), 10)
    run_cfg = replace(
        cfg, steps=steps, log_every=max(steps // 20, 1), checkpoint_every=10**9, guard_after=10**9
    )
    # Both algorithms get the teacher schedule of params.yaml (the demo's tau0 -> tau_end) stretched over
    # the planned steps. The papers' own schedules span 100k+ updates (image v2: 0.9998 at the start): in a
    # few thousand CPU steps their teacher would barely leave its random init, and the comparison would be
    # of teacher staleness, not of the algorithms.
    model_cfg = replace(model_cfg, ema=replace(model_cfg.ema, tau_n=steps))
    torch.manual_seed(seed)
    model = mod.build_pretrain_model(model_cfg)

    curve: list[dict] = []
    state = {"trained": 0.0, "since": time.perf_counter(), "next": 0.0, "steps": 0}

    def check(done: int) -> None:
        now = time.perf_counter()
        state["trained"] += now - state["since"]
        state["steps"] = done
        if state["trained"] >= state["next"] or done == steps:
            r = probe(model.student, manifest, shard_dir, eval_cfg, seed, device)
            acc, layer = r["accuracy"], int(r["s0/layer"])
            layers = [round(r[f"s0/layer{i}_accuracy"], 4) for i in range(1, model_cfg.transformer.depth + 2)]
            curve.append({"seconds": round(state["trained"], 2), "step": done, "accuracy": acc,
                          "layer": layer, "layer_accuracy": layers})  # fmt: skip
            print(
                f"  {modality} {algorithm}: {state['trained']:7.1f} s, step {done}, probe {acc:.4f} "
                f"(layer {layer}; every layer: {' '.join(f'{a:.3f}' for a in layers)})",
                flush=True,
            )
            state["next"] += interval
        state["since"] = time.perf_counter()  # the probe's time is not training time

    state["since"] = time.perf_counter()
    # a checkpoint d2v can load (benchmarks/layer_diagnostics.py reads it): the meta d2v pretrain writes
    meta = {"modality": modality, "kind": "pretrain", "model_config": to_dict(model_cfg),
            "encoder_prefix": "student."}  # fmt: skip
    pretrain(model, run_cfg, make_loader, scratch / "run", meta, seed=seed, after_step=check)
    return {
        "modality": modality,
        "algorithm": algorithm,
        "preset": args.preset,
        "batch_size": cfg.batch_size,
        "clones": model_cfg.v2.clones if algorithm == "data2vec2" else 1,
        "steps": state["steps"],
        "train_seconds": state["trained"],
        "samples_per_s": state["steps"] * cfg.batch_size / state["trained"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "curve": curve,
    }


def _child(modality: str, algorithm: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    queue.put(measure(modality, algorithm, args))


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Training seconds of the first probe at or above ``target`` (None if never)."""
    return next((p["seconds"] for p in curve if p["accuracy"] >= target), None)


def summarize(runs: dict[str, dict]) -> dict:
    """Per algorithm: the probe after the first step (~ its random init: the two recipes' encoders differ at
    init, e.g. 2.0's image encoder has fixed sin-cos positions) and at the end, and the gain between; with
    both algorithms, the time 2.0 needs to reach 1.0's final accuracy and the ratio to 1.0's time."""
    out: dict = {}
    for alg, r in runs.items():
        first, last = r["curve"][0]["accuracy"], r["curve"][-1]["accuracy"]
        out[alg] = {"first_accuracy": first, "final_accuracy": last, "gain": last - first}
    if "data2vec" in runs and "data2vec2" in runs:
        v1, v2 = runs["data2vec"], runs["data2vec2"]
        target = v1["curve"][-1]["accuracy"]
        t1, t2 = time_to_reach(v1["curve"], target), time_to_reach(v2["curve"], target)
        out.update({
            "v1_final_accuracy": target,
            "v2_final_accuracy": v2["curve"][-1]["accuracy"],
            "v1_seconds_to_target": t1,
            "v2_seconds_to_target": t2,
            "ratio_v2_over_v1": (t2 / t1) if (t1 and t2 is not None) else None,
        })  # fmt: skip
    return out


def plot(results: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(results), 3.4))
    for i, (m, r) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        for alg, run in r["runs"].items():
            c = run["curve"]
            ax.plot([p["seconds"] for p in c], [100 * p["accuracy"] for p in c], marker="o", ms=3, label=alg)
        ax.set_title(m)
        ax.set_xlabel("training seconds")
        ax.set_ylabel("linear probe accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    ap.add_argument("--minutes", type=float, default=5.0, help="training time per algorithm and modality")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds of training between probes")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--eval-per-class", type=int, default=100, help="valid/test items per class the probe scores"
    )
    ap.add_argument("--out", default="benchmarks/results/time_to_accuracy")
    ap.add_argument("--tmp", default=".tmp/time_to_accuracy", help="scratch checkpoints")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, "
          f"{args.minutes} min per run, probe every {args.interval} s", flush=True)  # fmt: skip
    ctx = mp.get_context("spawn")
    results: dict[str, dict] = {}
    for m in args.modalities:
        runs = {}
        for alg in args.algorithms:
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(m, alg, args, q))
            p.start()
            runs[alg] = q.get()
            p.join()
            if p.exitcode:
                sys.exit(f"{m} {alg}: the run failed (exit {p.exitcode})")
        results[m] = {"runs": runs, "summary": summarize(runs)}
        (out / f"{m}.json").write_text(json.dumps(results[m], indent=2) + "\n")
    plot(results, out / "time_to_accuracy.png")
    print(
        "\nmodality  algorithm  steps  samples/s  peak MB  probe at step 1  final probe  gain  s to 1.0's final"
    )
    for m, r in results.items():
        s = r["summary"]
        for alg, x in r["runs"].items():
            t = s.get("v1_seconds_to_target" if alg == "data2vec" else "v2_seconds_to_target")
            print(f"{m:9s} {alg:10s} {x['steps']:6d} {x['samples_per_s']:10.1f} {x['peak_rss_mb']:8.0f} "
                  f"{100 * s[alg]['first_accuracy']:16.2f} {100 * s[alg]['final_accuracy']:12.2f} "
                  f"{100 * s[alg]['gain']:+5.1f}  {t if t is not None else '-':>8}")  # fmt: skip
        if "ratio_v2_over_v1" in s:
            ratio = s["ratio_v2_over_v1"]
            shown = f"{ratio:.2f}" if ratio is not None else "not reached"
            print(f"{m:9s} time ratio 2.0 / 1.0 to 1.0's final accuracy: {shown}")
    print(f"wrote {out}/<modality>.json and {out}/time_to_accuracy.png")


if __name__ == "__main__":
    main()
