"""Where the time of one GPU pretraining step goes: ``torch.profiler`` of the ``base`` image step in bf16.

    python benchmarks/gpu_profile.py [--algorithm data2vec2] [--batch 64] [--steps 5] [--compile-model]
        [--preset base] [--out DIR]

Runs the step of ``benchmarks/gpu_image.py`` on one fixed batch: first timed alone (ms a step, beside the
bf16 matmul peak), then under the profiler, and prints (and writes to ``--out``):
- the step's phases (local features, teacher, student blocks, decoder, AdamW, EMA) as ``record_function``
  ranges with their device and host time (eager only: ``--compile-model`` compiles the whole forward, as
  ``compile: true`` does, and the ranges would break its graph);
- the GPU's busy share of the wall time (kernels' summed time / step time): well under 1 means the host
  launches too slowly for the GPU (then fewer, larger kernels or CUDA graphs help, not faster kernels);
- the kernels' time a step by kind (matmul, attention, d2v's Triton convs, inductor's fused kernels, other);
- the kernels by self time.
The phases are labelled here by wrapping the model's methods; the library itself carries no profiling code.
What SDPA's backends or the decoder's convs do in the step is measured by ``benchmarks/gpu_image.py
--variants`` / ``--decoder-conv``; the decoder's convs alone by ``benchmarks/gpu_conv.py``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from gpu_image import DEV, make_shards, matmul_peak, step_fn, sync, timed
from torch.profiler import ProfilerActivity, profile, record_function

from d2v.data import LoaderSpec, build_loader
from d2v.modalities import get
from d2v.optim import OptimConfig, build_optimizer
from d2v.runner import compile_model, tune_backends


def labelled(fn, name: str):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with record_function(name):
            return fn(*a, **k)

    return wrapper


def label_phases(model, opt) -> None:
    """Wrap the step's phases in ``record_function`` ranges (instance attributes: the class is unchanged)."""
    model.student.local_features = labelled(model.student.local_features, "phase:local_features")
    model.teacher_targets = labelled(model.teacher_targets, "phase:teacher")
    model.student.encode_tokens = labelled(model.student.encode_tokens, "phase:student_blocks")
    model.head.forward = labelled(model.head.forward, "phase:decoder")
    opt.step = labelled(opt.step, "phase:adamw")
    model.ema_step = labelled(model.ema_step, "phase:ema")


KERNEL_KINDS = {  # substrings of CUDA kernel names, first match wins
    "d2v conv (Triton)": ("_conv_kernel", "_wgrad_kernel"),
    "attention": ("sdpa", "flash", "fmha", "attention", "dot_do_o", "convert_dq"),
    "matmul": ("gemm", "nvjet", "sm90_", "sm80_", "cutlass", "xmma", "cublas"),
    "inductor fused (Triton)": ("triton_",),
}


def kernel_kinds(events, steps: int) -> str:
    """Self CUDA time per step by kind of kernel (matmul, attention, d2v's conv, inductor's fused element-wise
    kernels, the rest: aten's own element-wise and reduction kernels, copies)."""
    ms: dict[str, float] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA or e.key.startswith("phase:"):
            continue  # the kernels themselves: not the CPU ops that launched them, nor the ranges' GPU spans
        t = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
        if t <= 0:
            continue
        name = e.key.lower()
        kind = next((k for k, subs in KERNEL_KINDS.items() if any(s.lower() in name for s in subs)), "other")
        ms[kind] = ms.get(kind, 0.0) + t / 1e3 / steps
    total = sum(ms.values()) or 1.0
    return "\n".join(f"kernels {k:24s} {v:8.1f} ms/step ({100 * v / total:4.1f} %)"
                     for k, v in sorted(ms.items(), key=lambda kv: -kv[1]))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithm", default="data2vec2", choices=["data2vec", "data2vec2"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--compile-model", action="store_true", help="compile the whole forward (compile: true)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak()
    mod = get("image")
    cfg = mod.model_config({"preset": args.preset, "algorithm": args.algorithm})
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.batch, 4, cfg.image_size, per_shard=args.batch)
        spec = LoaderSpec(batch_size=args.batch, mode="pretrain", seed=0)
        loader = build_loader(shards, "pretrain", cfg, spec)
        fixed = next(iter(loader))
    torch.manual_seed(0)
    model = mod.build_pretrain_model(cfg).to(DEV).train()
    tune_backends(model, DEV)  # as d2v pretrain: cudnn.benchmark for images
    opt = build_optimizer(model, OptimConfig(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05))
    if args.compile_model:
        t = time.perf_counter()
        compile_model(model)  # what compile: true does
    step = step_fn(model, opt)
    if args.compile_model:
        step({k: v.to(DEV) if torch.is_tensor(v) else v for k, v in fixed.items()})
        sync()
        print(f"compiled in {time.perf_counter() - t:.0f} s", flush=True)
    s_step = timed(step, itertools.repeat(fixed), 10)
    print(
        f"bf16 peak {peak / 1e12:.0f} TFLOP/s; step {1e3 * s_step:.1f} ms ({args.batch / s_step:.0f} img/s)"
    )

    if not args.compile_model:  # a compiled forward would only graph-break on the ranges
        label_phases(model, opt)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    batch = {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in fixed.items()}
    step(batch)
    sync()
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(args.steps):
            with record_function("phase:step"):
                step(batch)
        sync()
        wall = (time.perf_counter() - t) / args.steps
    ev = prof.key_averages()
    sort = "self_cuda_time_total" if DEV.type == "cuda" else "self_cpu_time_total"
    kernels = ev.table(sort_by=sort, row_limit=50, max_name_column_width=90)
    phases = [e for e in ev if e.key.startswith("phase:")]
    dev_attr = "device_time_total" if hasattr(phases[0], "device_time_total") else "cuda_time_total"
    on_gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    on_gpu = [e for e in on_gpu if not e.name.startswith("phase:")]  # a range's GPU span is no kernel
    busy = sum(e.device_time for e in on_gpu) / args.steps / 1e6  # us -> s; CPU: no kernels, busy 0
    lines = [f"wall per step {1e3 * wall:.1f} ms under the profiler; kernels busy {1e3 * busy:.1f} ms "
             f"({100 * busy / wall:.0f} % of wall)"]  # fmt: skip
    for e in sorted(phases, key=lambda e: -getattr(e, dev_attr)):
        lines.append(f"{e.key:24s} device {getattr(e, dev_attr) / 1e3 / args.steps:8.1f} ms/step  "
                     f"cpu {e.cpu_time_total / 1e3 / args.steps:8.1f} ms/step")  # fmt: skip
    if DEV.type == "cuda":
        lines.append(kernel_kinds(ev, args.steps))
    report = "\n".join(lines)
    print(report, kernels, sep="\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile_{args.algorithm}_b{args.batch}.txt").write_text(report + "\n" + kernels)
        summary = {"step_ms": 1e3 * s_step, "busy_ms": 1e3 * busy, "peak_tflops": peak / 1e12}
        (args.out / f"profile_{args.algorithm}_b{args.batch}.json").write_text(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
