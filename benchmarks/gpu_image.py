"""The ``base`` image preset on one GPU, bf16: step throughput, FLOPs, share of the measured bf16 matmul
peak and memory for data2vec and data2vec 2.0, and how long the real shard loader keeps the GPU waiting.

    python benchmarks/gpu_image.py [--steps 20] [--images 2048] [--workers 8] [--compile]
        [--decoder-conv triton cudnn] [--variants d2v sdpa-flash ...] [--json out.json]

Per algorithm, at the papers' per-GPU batch (data2vec [DV]: 128 images; data2vec 2.0 [FS]: 16 images x 16
masks): the pretraining step (student and EMA teacher forward, backward, clipping, AdamW, EMA) under bf16
autocast with the teacher, targets, loss and EMA in fp32, as ``d2v pretrain`` runs on CUDA. FLOPs per step
come from ``benchmarks/flops.py`` (teacher included); the peak is a bf16 8192^3 matmul timed in the
same run. The loader: ``--images`` random smooth 224 px PNGs are prepared and sharded by d2v's own
``prepare`` / ``shard`` code, then the same steps run once on a fixed batch and once fed by
``build_loader`` (``--workers`` workers); the extra time is the GPU waiting for data. A wall-clock
measurement of one machine: the figures go to ``benchmarks/RESULTS.md`` with the device and command.
``--decoder-conv`` runs data2vec 2.0 with the decoder's grouped convs as d2v's Triton kernels
(``d2v/gpu_conv.py``, the default), with cuDNN's, or both in turn; the FLOPs are counted with the aten convs.
``--variants`` runs each configuration as d2v runs it, with SDPA held to one backend, or with inductor's GEMM
autotuning (``max-autotune``), each compiled afresh.
``--images`` must fill whole batches in every shard (a loader worker's last batch is short otherwise: with
few shards a worker, as here, that is most of its batches).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from d2v import gpu_conv
from d2v.config import from_dict
from d2v.data import LoaderSpec, build_loader, data_module, prepare_raw, shard
from d2v.data2vec import ema_decay
from d2v.loop import to_device
from d2v.modalities import get
from d2v.optim import OptimConfig, build_optimizer
from d2v.runner import compile_model, tune_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/flops.py
from flops import flop_counter  # noqa: E402

BATCH = {"data2vec": 128, "data2vec2": 16}


def _sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel([getattr(SDPBackend, backend)])


def _max_autotune():
    """inductor's GEMM autotuning with its Triton templates, whose epilogues can take the GELU and bias that
    otherwise run as separate element-wise kernels (with ``--compile``; minutes more of compilation)."""
    import torch._inductor.config as inductor

    return inductor.patch(max_autotune=True, max_autotune_gemm_backends="ATEN,TRITON")


# --variants: d2v as it is, or with one thing changed (each compiled afresh in this process)
VARIANTS = {
    "d2v": contextlib.nullcontext,
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
    "max-autotune": _max_autotune,
}
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke test of the script


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(n: int = 8192, reps: int = 20) -> float:
    if DEV.type == "cpu":
        n, reps = 512, 3
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def step_fn(model, opt):
    params = [p for p in model.parameters() if p.requires_grad]
    count = [0]

    def step(batch) -> torch.Tensor:
        with torch.autocast(DEV.type, torch.bfloat16):
            loss, _ = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        count[0] += 1
        model.ema_step(ema_decay(count[0], model.ema))
        return loss

    return step


def timed(step, batches, n: int) -> float:
    """Seconds per step over ``n`` steps after 3 warm-up steps (batches: an iterator)."""
    for _ in range(3):
        step(to_device(next(batches), DEV))
    sync()
    t = time.perf_counter()
    for _ in range(n):
        step(to_device(next(batches), DEV))
    sync()
    return (time.perf_counter() - t) / n


def make_shards(root: Path, n: int, workers: int, size: int, per_shard: int = 128) -> Path:
    """``n`` images sharded ``per_shard`` a shard. Each loader worker reads whole shards and its last batch
    is short unless they hold whole batches: with a shard or two a worker, most of its batches."""
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):  # smooth images: realistic PNG sizes, unlike white noise
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(src / f"{i:05d}.png")
    data = data_module("image")
    prepare_raw(
        "image", from_dict(data.PrepareConfig, {"source": str(src)}, "prepare.image"), root / "raw", 0
    )
    cfg = from_dict(
        data.ShardConfig, {"image_size": size, "samples_per_shard": per_shard, "workers": workers}, "s"
    )
    shard("image", cfg, root / "raw", root / "shards", seed=0)
    return root / "shards"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--algorithms", nargs="+", default=list(BATCH), choices=list(BATCH))
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: the papers' per GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the whole forward (compile: true)")
    ap.add_argument("--decoder-conv", nargs="+", default=["triton"], choices=["triton", "cudnn"],
                    help="the data2vec 2.0 decoder's grouped convs: d2v's Triton kernels (default) or cuDNN")  # fmt: skip
    ap.add_argument("--variants", nargs="+", default=["d2v"], choices=list(VARIANTS),
                    help="d2v as it is (torch picks SDPA's backend), with one SDPA backend only, or inductor's GEMM autotuning")  # fmt: skip
    ap.add_argument("--count-only", action="store_true",
                    help="only the counted FLOPs per image, with torch's own conv formula beside (runs on a CPU)")  # fmt: skip
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = float("nan") if args.count_only else statistics.median(matmul_peak() for _ in range(3))
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu"
    print(f"{name}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s", flush=True)
    results = {"device": name, "preset": args.preset, "bf16_peak_tflops": peak / 1e12, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        size = get("image").model_config({"preset": args.preset}).image_size
        # every batch full: shards hold whole batches of each algorithm (make_shards)
        per_shard = math.lcm(*(args.batch or BATCH[a] for a in args.algorithms))
        if args.images % per_shard:
            ap.error(
                f"--images {args.images} must be a multiple of {per_shard} (whole batches in every shard)"
            )
        shards = make_shards(Path(tmp), args.images, args.workers, size, per_shard)
        print(f"sharded {args.images} images in {time.perf_counter() - t:.0f} s", flush=True)
        mod = get("image")
        for alg, conv, variant in itertools.product(args.algorithms, args.decoder_conv, args.variants):
            if alg == "data2vec" and conv != args.decoder_conv[0]:
                continue  # no decoder
            torch._dynamo.reset()  # every variant compiles afresh: no graph of another one is reused
            with VARIANTS[variant]():  # the change stays in place while this variant runs
                gpu_conv.ENABLED = conv == "triton"
                B = args.batch or BATCH[alg]
                cfg = mod.model_config({"preset": args.preset, "algorithm": alg})
                torch.manual_seed(0)
                model = mod.build_pretrain_model(cfg).to(DEV).train()
                tune_backends(model, DEV)  # as d2v pretrain: cudnn.benchmark for images
                opt = build_optimizer(
                    model, OptimConfig(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
                )
                step = step_fn(model, opt)

                def loader(epoch: int, B=B, cfg=cfg):
                    spec = LoaderSpec(
                        batch_size=B, mode="pretrain", seed=0, num_workers=args.workers, epoch=epoch
                    )
                    return build_loader(shards, "pretrain", cfg, spec)

                def endless():
                    epoch = 0
                    while True:
                        yield from loader(epoch)
                        epoch += 1

                fixed = next(iter(loader(0)))
                if len(fixed["keys"]) != B:  # the rates below divide by B
                    raise RuntimeError(f"the loader's first batch holds {len(fixed['keys'])} images, not {B}")
                # counted as the aten convs they compute (the counter skips custom ops)
                gpu_conv.ENABLED = False
                with flop_counter() as fc:
                    step(to_device(fixed, DEV))
                flops = fc.get_total_flops()
                gpu_conv.ENABLED = conv == "triton"
                if args.count_only:
                    with FlopCounterMode(display=False) as torchs:
                        step(to_device(fixed, DEV))
                    print(f"{alg}: {flops / B / 1e9:.1f} GFLOP per image counted ({torchs.get_total_flops() / B / 1e9:.1f} "
                          "with torch 2.11's grouped-conv backward formula)", flush=True)  # fmt: skip
                    continue
                if args.compile:  # after counting: dynamo runs a frame eagerly under a dispatch mode
                    compile_model(model)
                if DEV.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                s_fixed = timed(step, itertools.repeat(fixed), args.steps)
                mem = torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else float("nan")
                s_loader = timed(step, endless(), args.steps)
                r = {
                    "batch_images": B,
                    "clones": cfg.v2.clones if alg == "data2vec2" else 1,
                    "step_s": s_fixed,
                    "images_per_s": B / s_fixed,
                    "tflop_per_step": flops / 1e12,
                    "fraction_of_bf16_peak": flops / s_fixed / peak,
                    "peak_memory_gib": mem,
                    "step_s_with_loader": s_loader,
                    "loader_wait_fraction": max(0.0, (s_loader - s_fixed) / s_loader),
                }
                name = (
                    f"{alg}-b{B}"
                    + ("-compiled" if args.compile else "")
                    + (f"-{conv}" if alg == "data2vec2" else "")
                    + ("" if variant == "d2v" else f"-{variant}")
                )
                results["runs"][name] = r
                if args.json:  # after each run: a later one that fails loses nothing
                    args.json.write_text(json.dumps(results, indent=2) + "\n")
                print(f"{variant:14s} {conv:6s} {alg:9s} {B:4d} img/step  {r['images_per_s']:8.1f} img/s  {r['tflop_per_step']:.2f} TFLOP/step  "
                      f"{100 * r['fraction_of_bf16_peak']:.1f} % of peak  {mem:.1f} GiB  "
                      f"loader wait {100 * r['loader_wait_fraction']:.1f} %", flush=True)  # fmt: skip
            del model, opt, step
            if DEV.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
