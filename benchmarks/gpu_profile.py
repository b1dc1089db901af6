"""Where the time of one GPU pretraining step goes: ``torch.profiler`` of the ``base`` image step in bf16.

    python benchmarks/gpu_profile.py [--algorithm data2vec2] [--batch 64] [--steps 5] [--out DIR]

Runs the step of ``benchmarks/gpu_image.py`` on one fixed batch and prints (and writes to ``--out``):
- the step's phases (local features, teacher, student blocks, decoder, loss, backward, clipping, AdamW,
  EMA) as ``record_function`` ranges with their CUDA time;
- the kernels by self CUDA time;
- the GPU's busy share of the wall time (kernels' summed time / step time): well under 1 means the host
  launches too slowly for the GPU (then fewer, larger kernels or CUDA graphs help, not faster kernels).
The phases are labelled here by wrapping the model's methods; the library itself carries no profiling code.
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

from d2v.data import build_loader
from d2v.decoder import conv_channels_last
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


def conv_variants(conv: torch.nn.Conv2d) -> dict:
    """Exact reformulations of a grouped k x k conv of a channels-last [B, h, w, C] -> [B, h, w, C']."""
    G, k = conv.groups, conv.kernel_size[0]

    def nchw(x):
        return conv(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)

    def split(x):  # one dense conv per group on its channels
        ws, cg = conv.weight.chunk(G), x.shape[-1] // G
        bs = conv.bias.chunk(G)
        ys = [torch.nn.functional.conv2d(x[..., g * cg:(g + 1) * cg].permute(0, 3, 1, 2), ws[g], bs[g],
                                         padding=k // 2) for g in range(G)]  # fmt: skip
        return torch.cat([y.permute(0, 2, 3, 1) for y in ys], -1)

    def unfold_bmm(x):  # im2col + one batched matmul over the groups
        B, h, w, C = x.shape
        cols = torch.nn.functional.unfold(x.permute(0, 3, 1, 2), k, padding=k // 2)  # [B, C*k*k, hw]
        cols = cols.view(B, G, -1, h * w)
        wt = conv.weight.view(G, -1, (C // G) * k * k)  # [G, C'/G, C/G*k*k]
        y = torch.einsum("gok,bgkl->bgol", wt.to(cols.dtype), cols).reshape(B, -1, h, w)
        return (y + conv.bias.to(y.dtype)[:, None, None]).permute(0, 2, 3, 1)

    return {"channels_last": lambda x: conv_channels_last(conv, x), "nchw": nchw, "split": split,
            "unfold_bmm": unfold_bmm}  # fmt: skip


def bench_decoder(cfg, B: int) -> None:
    """Forward + backward of the decoder's conv (each reformulation) and of the whole decoder, eager and
    compiled, at the step's shape, with and without ``cudnn.benchmark``."""
    from d2v.decoder import ConvDecoder

    dec = ConvDecoder(cfg.v2.decoder, cfg.transformer.dim, cfg.grid).to(DEV)
    h, w = cfg.grid
    x = torch.randn(B * cfg.v2.clones, h, w, cfg.transformer.dim, device=DEV, requires_grad=True)

    def ms(fn, reps=10):
        def once():
            with torch.autocast(DEV.type, torch.bfloat16):
                y = fn(x)
            y.float().square().mean().backward()

        for _ in range(3):
            once()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            once()
        sync()
        return 1e3 * (time.perf_counter() - t) / reps

    conv = dec.blocks[1][0]
    ref = conv_channels_last(conv, x[:2].detach())
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for name, fn in conv_variants(conv).items():
            err = (fn(x[:2].detach()) - ref).abs().max().item()
            print(f"conv {name:14s} cudnn.benchmark={bench!s:5s} fwd+bwd {ms(fn):7.2f} ms  max err {err:.1e}")
        print(
            f"decoder eager  cudnn.benchmark={bench!s:5s} fwd+bwd {ms(lambda x: dec(x.flatten(1, 2))):7.2f} ms",
            flush=True,
        )
    compiled = torch.compile(dec)
    print(
        f"decoder compiled cudnn.benchmark=True fwd+bwd {ms(lambda x: compiled(x.flatten(1, 2))):7.2f} ms",
        flush=True,
    )


def bench_attention(cfg, B: int) -> None:
    """SDPA's backends at the step's shapes, bf16: the student's (B x clones rows of the kept tokens + CLS)
    forward + backward, the teacher's (B rows of every token + CLS) forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, d = cfg.transformer.heads, cfg.transformer.dim // cfg.transformer.heads
    from d2v.modalities.image.masking import inverse_block_mask

    T = cfg.num_patches + 1  # + CLS
    mask = inverse_block_mask(1, cfg.grid, cfg.mask_ratio, cfg.mask_adjust, cfg.mask_block, torch.Generator())
    kept = int((~mask).sum()) + 1  # the student's tokens: every row keeps this many, + CLS
    shapes = {"student fwd+bwd": (B * cfg.v2.clones, kept, True), "teacher fwd": (B, T, False)}
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    for label, (n, t, grad) in shapes.items():
        q, k, v = (
            torch.randn(n, H, t, d, device=DEV, dtype=torch.bfloat16, requires_grad=grad) for _ in range(3)
        )
        for name, backend in backends.items():

            def once(backend=backend, q=q, k=k, v=v, grad=grad):
                with sdpa_kernel([backend]):
                    y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                if grad:
                    y.backward(torch.ones_like(y))

            try:
                for _ in range(3):
                    once()
            except RuntimeError as e:  # a backend that does not take this shape
                print(f"attention {label:16s} [{n}, {H}, {t}, {d}] {name:9s} unavailable: {str(e)[:80]}")
                continue
            sync()
            t0 = time.perf_counter()
            for _ in range(20):
                once()
            sync()
            ms = 1e3 * (time.perf_counter() - t0) / 20
            print(f"attention {label:16s} [{n}, {H}, {t}, {d}] {name:9s} {ms:7.3f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithm", default="data2vec2", choices=["data2vec", "data2vec2"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--decoder", action="store_true", help="time the decoder's conv reformulations only")
    ap.add_argument("--attention", action="store_true", help="time SDPA's backends at the step's shapes only")
    ap.add_argument("--compile-model", action="store_true", help="compile the whole forward (compile: true)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak()
    mod = get("image")
    cfg = mod.model_config({"preset": args.preset, "algorithm": args.algorithm})
    if args.decoder:
        return bench_decoder(cfg, args.batch)
    if args.attention:
        return bench_attention(cfg, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.batch, 4, cfg.image_size, per_shard=args.batch)
        loader = build_loader(shards, "pretrain", cfg, batch_size=args.batch, mode="pretrain", seed=0)
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
