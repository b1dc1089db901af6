"""One pretraining step, measured: d2v beside the community alternative, against this machine's own peak.

    python benchmarks/step.py [--preset small] [--modalities audio image text]
        [--algorithms data2vec data2vec2] [--dtypes fp32 bf16] [--rounds 7] [--warmup 2]
        [--json out.json] [--no-alternative] [--no-memory] [--no-loader] [--threads N] [--compile]
        [--no-retain-memory]

For every modality x algorithm x dtype it runs ``d2v.loop.train_step`` (what ``d2v pretrain`` runs: the
forward of student and EMA teacher, backward, clipping, AdamW, LR schedule) plus the EMA update, on batches
of the demo's shapes (``params.yaml``: ``pretrain.<m>.batch_size`` / ``max_len``, ``model.<m>`` with the
preset and algorithm set) made by the modality's own ``collate`` (masks included), and reports

- samples/s and tokens/s (tokens at the model's rate: 20 ms frames, patches, BPE tokens; data2vec 2.0
  counts the original samples, not the clones);
- model FLOPs per sample (``benchmarks/flops.py``: ``FlopCounterMode`` over forward + backward, teacher
  included) and the achieved fraction of this machine's peak in the same dtype, the peak being a
  2048^3 matmul in fp32 / bf16 timed in the same rounds as the steps;
- peak memory: the resident-set high-water mark of a fresh process that builds the variant and runs two
  steps, minus the resident set after ``import torch, d2v`` (``--no-memory`` skips these subprocesses);
- the loader's samples/s beside the step's: ``d2v.data.build_loader`` over ``<paths.shards>/<m>`` when it
  exists, else over small synthetic shards written by ``d2v.data.stages.shard`` into a temporary folder;
- for data2vec 1.0, the alternative (``benchmarks/hf_alternative.py``: transformers' Data2Vec*Model,
  deepcopy EMA teacher, community-style step) at the same sizes, batch, masks and loss, fp32, and the
  ratio of samples/s.

``--compile`` adds a ``d2v-compiled`` row per dtype: the same step with the model's forward
``torch.compile``d in place (what ``compile: true`` of a pretrain section does; compilation happens in the warm-up steps,
so give it ``--warmup 3`` or more). Its FLOPs are counted on the uncompiled model (the same math).

Every variant of one modality/algorithm is timed in the same rounds (A, B, C, peak, A, B, C, peak ...) and
the median is reported, so load from other processes hits them alike. A wall-clock measurement: never a
DVC output.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/hf_alternative.py, flops.py
from flops import flop_counter  # noqa: E402

from d2v import loop  # noqa: E402
from d2v.config import load_params, section  # noqa: E402
from d2v.data.remote import is_url, shard_location  # noqa: E402
from d2v.data.stages import data_module  # noqa: E402
from d2v.data2vec import ema_decay  # noqa: E402
from d2v.hostmem import retain_freed_memory  # noqa: E402
from d2v.modalities import MODALITIES, get  # noqa: E402
from d2v.optim import build_optimizer, build_scheduler  # noqa: E402
from d2v.precision import cpu_bf16  # noqa: E402
from d2v.pretrain import PretrainConfig  # noqa: E402
from d2v.runner import compile_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILED = "d2v-compiled"
PREP = {"image": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


# ------------------------------------------------------------------------------------------- the setup


def configs(params: dict[str, Any], m: str, preset: str, algorithm: str) -> tuple[Any, PretrainConfig]:
    """``model.<m>`` with ``preset``/``algorithm`` set, and ``pretrain.<m>``, from the params file."""
    model = {**((params.get("model") or {}).get(m) or {}), "preset": preset, "algorithm": algorithm}
    return get(m).model_config(model, f"model.{m}"), section(params, "pretrain", PretrainConfig, m)


def raw_items(m: str, model_cfg: Any, n: int, length: int | None, g: torch.Generator) -> list[torch.Tensor]:
    """What the loader's ``transform`` hands to ``collate``: crops of ``length`` (audio, text), images."""
    if m == "audio":
        return [torch.randn(length or 32_000, generator=g) for _ in range(n)]
    if m == "image":
        s = model_cfg.image_size
        return [torch.randint(0, 256, (1, s, s), generator=g, dtype=torch.uint8) for _ in range(n)]
    L = length or model_cfg.max_positions
    out = []
    for _ in range(n):
        ids = torch.randint(model_cfg.num_special, model_cfg.vocab_size, (L,), generator=g)
        ids[0], ids[-1] = model_cfg.bos_id, model_cfg.eos_id
        out.append(ids)
    return out


def make_batches(m: str, model_cfg: Any, pcfg: PretrainConfig, n: int = 4) -> list[dict[str, Any]]:
    """``n`` micro-batches of the demo's shapes through the modality's ``collate`` (masks included)."""
    g = torch.Generator().manual_seed(0)
    data = data_module(m)
    B = pcfg.batch_size // pcfg.grad_accum
    return [
        data.collate(
            raw_items(m, model_cfg, B, pcfg.max_len, g),
            mode="pretrain",
            model_cfg=model_cfg,
            prep=PREP.get(m, {}),
            generator=g,
        )  # fmt: skip
        for _ in range(n)
    ]


class D2VStep:
    """``d2v.loop.train_step`` + the EMA update, as ``d2v pretrain`` runs them (one update per call)."""

    def __init__(
        self, m: str, model_cfg: Any, pcfg: PretrainConfig, dtype: str, compiled: bool = False
    ) -> None:
        torch.manual_seed(0)
        self.model = get(m).build_pretrain_model(model_cfg).train()
        if compiled:
            compile_model(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = build_optimizer(self.model, pcfg.optim)
        self.sched = build_scheduler(self.opt, pcfg.optim, 10**6)
        self.pcfg = pcfg
        self.amp = DTYPES[dtype] if dtype != "fp32" else None
        self.updates = 0

    def __call__(self, batch: dict[str, Any]) -> None:
        torch.manual_seed(loop.step_seed(0, self.updates, 0))
        loop.train_step(
            self.model, self.opt, self.sched, itertools.repeat(batch), {}, params=self.params,
            grad_accum=self.pcfg.grad_accum, clip_norm=self.pcfg.optim.clip_norm, device=CPU, amp=self.amp,
            grad_norm=False,
        )  # fmt: skip
        self.updates += 1
        self.model.ema_step(ema_decay(self.updates, self.model.ema))

    def forward_backward(self, batch: dict[str, Any]) -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=self.amp is not None):
            loss, _ = self.model(batch)
            loss.backward()
        self.opt.zero_grad(set_to_none=True)


class AltStep:
    """The community alternative (``hf_alternative.CommunityStep``), fp32."""

    def __init__(self, m: str, model_cfg: Any, pcfg: PretrainConfig) -> None:
        from hf_alternative import CommunityStep

        torch.manual_seed(0)
        self.step = CommunityStep(m, get(m).build_encoder(model_cfg), model_cfg, pcfg.optim)

    def __call__(self, batch: dict[str, Any]) -> None:
        self.step(batch)

    def forward_backward(self, batch: dict[str, Any]) -> None:
        self.step.model(batch).backward()
        self.step.opt.zero_grad(set_to_none=True)


def build(impl: str, m: str, model_cfg: Any, pcfg: PretrainConfig, dtype: str):
    if impl == "alt":
        return AltStep(m, model_cfg, pcfg)
    return D2VStep(m, model_cfg, pcfg, dtype, compiled=impl == COMPILED)


# ----------------------------------------------------------------------------------------- measurements


def matmul_seconds(dtype: torch.dtype, n: int = 2048, _cache: dict = {}) -> float:  # noqa: B006
    """Seconds of one n x n x n matmul (operands made once per dtype)."""
    if dtype not in _cache:
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
        torch.mm(a, b)
        _cache[dtype] = (a, b)
    a, b = _cache[dtype]
    t = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - t


def step_flops(step, batch: dict[str, Any]) -> int:
    with flop_counter() as fc:
        step.forward_backward(batch)
    return fc.get_total_flops()


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_probe(args: argparse.Namespace) -> None:
    """``--probe m algorithm impl dtype``: build one variant, run two steps, print the RSS figures."""
    m, algorithm, impl, dtype = args.probe
    base = rss_kb("VmRSS")
    model_cfg, pcfg = configs(load_params(args.params), m, args.preset, algorithm)
    batches = make_batches(m, model_cfg, pcfg, n=2)
    step = build(impl, m, model_cfg, pcfg, dtype)
    for b in batches:
        step(b)
    print(json.dumps({"import_mb": base / 1024, "peak_mb": rss_kb("VmHWM") / 1024}))


def peak_memory_mb(args: argparse.Namespace, m: str, algorithm: str, impl: str, dtype: str) -> float | None:
    cmd = [sys.executable, __file__, "--probe", m, algorithm, impl, dtype, "--preset", args.preset,
           "--params", str(args.params)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not args.retain_memory:
        cmd += ["--no-retain-memory"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"memory probe failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["peak_mb"] - r["import_mb"]


# ------------------------------------------------------------------------------------------------ loader


def synthetic_raw(m: str, raw: Path, g: torch.Generator) -> None:
    """A small folder of inputs for ``prepare.<m>.source``: noise images, noisy tones, random-word text."""
    raw.mkdir(parents=True)
    if m == "image":
        from PIL import Image

        for i in range(1024):
            px = torch.randint(0, 256, (28, 28), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(raw / f"{i:04d}.png")
    elif m == "audio":
        import soundfile as sf

        for i in range(48):
            t = torch.arange(48_000) / 16_000
            wav = 0.3 * torch.sin(2 * torch.pi * (200 + 10 * i) * t) + 0.05 * torch.randn(48_000, generator=g)
            sf.write(raw / f"{i:03d}.wav", wav.numpy(), 16_000, subtype="PCM_16")
    else:
        words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(n),), generator=g))
                 for n in torch.randint(2, 9, (3000,), generator=g)]  # fmt: skip
        for i in range(40):
            idx = torch.randint(0, len(words), (3000,), generator=g)
            (raw / f"{i:03d}.txt").write_text(" ".join(words[int(j)] for j in idx) + "\n")


def synthetic_shards(m: str, tmp: Path) -> Path:
    from d2v.config import from_dict
    from d2v.data import prepare_raw, shard

    data = data_module(m)
    synthetic_raw(m, tmp / "src" / m, torch.Generator().manual_seed(0))
    prepare_raw(m, from_dict(data.PrepareConfig, {"source": str(tmp / "src" / m)}), tmp / "raw" / m, seed=0)
    per_shard = {"image": 256, "audio": 12, "text": 16}[m]
    cfg = from_dict(data.ShardConfig, {"samples_per_shard": per_shard, "valid": 0.0, "test": 0.0})
    shard(m, cfg, tmp / "raw" / m, tmp / "shards" / m, seed=0)
    return tmp / "shards" / m


def loader_rate(m: str, model_cfg: Any, pcfg: PretrainConfig, shard_dir: Path, seconds: float) -> float:
    """Samples/s of ``build_loader`` (the stage's settings: workers, crops, buckets, masks), epoch after
    epoch for about ``seconds`` (the first batch, i.e. worker start-up, excluded)."""
    from d2v.data import LoaderSpec, build_loader

    n, t0, epoch = 0, None, 0
    while True:
        loader = build_loader(shard_dir, "pretrain", model_cfg, LoaderSpec(
            batch_size=pcfg.batch_size, mode="pretrain", seed=0, num_workers=pcfg.num_workers,
            shuffle_buffer=pcfg.shuffle_buffer, max_len=pcfg.max_len, epoch=epoch,
            length_buckets=pcfg.length_buckets,
        ))  # fmt: skip
        for batch in loader:
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += len(batch["keys"])
            if time.perf_counter() - t0 > seconds:
                return n / (time.perf_counter() - t0)
        epoch += 1


# -------------------------------------------------------------------------------------------------- main


def measure(args: argparse.Namespace, params: dict[str, Any], m: str, algorithm: str) -> list[dict[str, Any]]:
    model_cfg, pcfg = configs(params, m, args.preset, algorithm)
    batches = make_batches(m, model_cfg, pcfg)
    T = batches[0]["mask"].shape[1]
    variants = [("d2v", d) for d in args.dtypes]
    if args.compile:
        variants += [(COMPILED, d) for d in args.dtypes]
    if algorithm == "data2vec" and args.alternative:
        variants.append(("alt", "fp32"))
    steps = {v: build(v[0], m, model_cfg, pcfg, v[1]) for v in variants}
    flops = {v: step_flops(steps[v], batches[0]) for v in variants if v[0] != COMPILED}
    flops.update({v: flops[("d2v", v[1])] for v in variants if v[0] == COMPILED})  # the same math
    for v in variants:
        for i in range(args.warmup):
            steps[v](batches[i % len(batches)])
    times: dict[Any, list[float]] = {v: [] for v in variants}
    # only the dtypes measured: a bf16 peak on a CPU without bf16 hardware is emulated, ~17 s a matmul
    peaks: dict[str, list[float]] = {d: [] for d in args.dtypes}
    for r in range(args.rounds):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotate the order
            gc.collect()
            t = time.perf_counter()
            steps[v](batches[r % len(batches)])
            times[v].append(time.perf_counter() - t)
        for d in peaks:
            peaks[d].append(matmul_seconds(DTYPES[d]))
    peak_gflops = {d: 2 * 2048**3 / statistics.median(s) / 1e9 for d, s in peaks.items()}
    B = pcfg.batch_size
    rows = []
    for v in variants:
        sec = statistics.median(times[v])
        gflops = flops[v] / sec / 1e9
        rows.append({
            "modality": m, "algorithm": algorithm, "preset": args.preset, "impl": v[0], "dtype": v[1],
            "batch": B, "tokens_per_sample": T, "step_s": sec, "step_s_all": times[v],
            "samples_per_s": B / sec, "tokens_per_s": B * T / sec, "gflop_per_sample": flops[v] / B / 1e9,
            "gflop_per_s": gflops, "peak_gflop_per_s": peak_gflops[v[1]],
            "peak_fraction": gflops / peak_gflops[v[1]],
        })  # fmt: skip
    alt = next((r for r in rows if r["impl"] == "alt"), None)
    for r in rows:
        r["vs_alt"] = r["samples_per_s"] / alt["samples_per_s"] if alt else None
    del steps
    gc.collect()
    return rows


def fmt_table(rows: list[dict[str, Any]]) -> str:
    cols = ["modality", "algorithm", "impl", "dtype", "samples/s", "tokens/s", "GFLOP/sample", "% peak",
            "peak MB", "x alt", "loader samples/s"]  # fmt: skip
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        mem = r.get("peak_mb")
        ld = r.get("loader_samples_per_s")
        cells = [
            r["modality"], r["algorithm"], r["impl"], r["dtype"], f"{r['samples_per_s']:.1f}",
            f"{r['tokens_per_s']:,.0f}", f"{r['gflop_per_sample']:.2f}",
            f"{100 * r['peak_fraction']:.0f}% of {r['peak_gflop_per_s']:.0f}",
            "-" if mem is None else f"{mem:,.0f}", "-" if r["vs_alt"] is None else f"{r['vs_alt']:.2f}",
            "-" if ld is None else f"{ld:,.0f} ({ld / r['samples_per_s']:.0f}x)",
        ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    ap.add_argument("--algorithms", nargs="+", default=["data2vec", "data2vec2"],
                    choices=["data2vec", "data2vec2"])  # fmt: skip
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--rounds", type=int, default=7, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure here")
    ap.add_argument("--no-alternative", dest="alternative", action="store_false")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--no-loader", dest="loader", action="store_false")
    ap.add_argument("--loader-seconds", type=float, default=10.0)
    ap.add_argument("--compile", action="store_true", help="also time the step with the forward compiled")
    ap.add_argument("--no-retain-memory", dest="retain_memory", action="store_false",
                    help="keep glibc's malloc thresholds (what d2v.hostmem's raising them gains)")  # fmt: skip
    ap.add_argument("--probe", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # as the d2v CLI does for every command (d2v.hostmem); the alternative, timed in this process, gets it too
    heap = retain_freed_memory() if args.retain_memory else False
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        memory_probe(args)
        return 0
    if "bf16" in args.dtypes and not cpu_bf16():
        print("this CPU has no bf16 hardware (AMX / AVX512-BF16): bf16 rows are emulated", file=sys.stderr)
    params = load_params(args.params)
    machine = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or "?",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_hardware": cpu_bf16(),
        "load_average": os.getloadavg(), "retain_freed_memory": heap,
    }  # fmt: skip
    print(f"torch {machine['torch']}, {machine['threads']} threads, {machine['cpu_capability']}, bf16 hardware "
          f"{machine['bf16_hardware']}, load average {machine['load_average'][0]:.1f}; preset {args.preset}, "
          f"median of {args.rounds} steps after {args.warmup}", flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="d2v-step-") as tmp:
        for m in args.modalities:
            loader = None
            if args.loader:
                shard_dir = shard_location(params["paths"]["shards"], m)
                if not is_url(shard_dir) and not (shard_dir / "manifest.json").is_file():
                    print(f"{m}: no shards in {shard_dir} (dvc repro shard@{m}); writing synthetic ones",
                          file=sys.stderr)  # fmt: skip
                    shard_dir = synthetic_shards(m, Path(tmp))
                model_cfg, pcfg = configs(params, m, args.preset, "data2vec")
                loader = loader_rate(m, model_cfg, pcfg, shard_dir, args.loader_seconds)
            for algorithm in args.algorithms:
                new = measure(args, params, m, algorithm)
                for r in new:
                    r["loader_samples_per_s"] = loader
                    if args.memory:
                        r["peak_mb"] = peak_memory_mb(args, m, algorithm, r["impl"], r["dtype"])
                rows += new
                print(f"{m} {algorithm}: " + ", ".join(
                    f"{r['impl']} {r['dtype']} {r['samples_per_s']:.1f}/s" for r in new), flush=True)  # fmt: skip
    print()
    print(fmt_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
