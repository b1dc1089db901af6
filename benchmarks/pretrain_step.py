"""Samples/s of one data2vec pretraining step (forward + backward + AdamW + EMA) per modality, on CPU.

    .venv/bin/python benchmarks/pretrain_step.py [--preset small] [--steps 5] [--warmup 2] [--threads N]

Synthetic batches of realistic size with each modality's own masking: audio 8 clips of 2 s (16 kHz),
image 32 images of 28x28, text 16 sequences of 128 tokens. Prints the median over ``--steps`` timed steps
after ``--warmup`` untimed ones, and torch's thread count. (A wall-clock measurement: never a DVC output.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from d2v.modalities import MODALITIES, get
from d2v.model import ema_decay
from d2v.optim import OptimConfig, build_optimizer

SIZES = {"audio": "8 x 2 s clips (32,000 samples)", "image": "32 x 28x28 images", "text": "16 x 128 tokens"}


def batch_for(modality: str, cfg, g: torch.Generator) -> dict[str, torch.Tensor]:
    mod = get(modality)
    if modality == "audio":
        n = torch.full((8,), 32_000)
        return {"inputs": torch.randn(8, 32_000, generator=g), "mask": mod.make_mask(n, cfg, g)}
    if modality == "image":
        x = torch.randn(32, 3, cfg.image_size, cfg.image_size, generator=g)
        return {"inputs": x, "mask": mod.make_mask(32, cfg, g)}
    ids = torch.randint(cfg.num_special, cfg.vocab_size, (16, 128), generator=g)
    ids[:, 0], ids[:, -1] = cfg.bos_id, cfg.eos_id
    student, mask = mod.make_mask(ids, None, cfg, g)
    return {"inputs": ids, "student_inputs": student, "mask": mask}


def bench(modality: str, preset: str, steps: int, warmup: int) -> tuple[float, int]:
    mod = get(modality)
    cfg = mod.model_config({"preset": preset})
    torch.manual_seed(0)
    model = mod.build_pretrain_model(cfg).train()
    opt = build_optimizer(model, OptimConfig())
    batch = batch_for(modality, cfg, torch.Generator().manual_seed(0))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss, _ = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.ema_step(ema_decay(i + 1, model.ema))
        times.append(time.perf_counter() - t0)
    n = len(batch["inputs"])
    return n / statistics.median(times[warmup:]), sum(p.numel() for p in model.student.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modalities", nargs="+", default=list(MODALITIES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")  # fmt: skip
    for m in args.modalities:
        sps, n_params = bench(m, args.preset, args.steps, args.warmup)
        print(f"{m:6s} {SIZES[m]:32s} student {n_params / 1e6:5.2f} M params  {sps:8.1f} samples/s")


if __name__ == "__main__":
    main()
