"""Starting from a published model, stage by stage: the pipeline's commands on the demo's data (the smoke
profile's amounts) with random Hugging Face data2vec folders in place of Meta's downloads.

    python benchmarks/published.py [--size tiny|base] [--modalities audio image text] [--steps 8]
        [--batch 4] [--precision fp32|bf16] [--arms] [--workdir DIR] [--json out.json]

``--size tiny``: toy-width folders (the tests' models): the plumbing, end to end, in seconds. ``--size base``:
folders with the published Base configs (``facebook/data2vec-{audio,vision,text}-base``: 12 x 768; images
224 px, patch 16; text RoBERTa's 50,265 rows) at random init: time and memory per pretraining step. Per
modality it runs, each as its own ``d2v`` process in a fresh workspace: ``prepare``, ``shard`` (with the
folder's preprocessing), ``pretrain`` with ``steps: 0`` (the published encoder as a checkpoint), then
``pretrain`` with ``--steps`` updates from it; ``--arms`` then fine-tunes the three arms of the sweep
(published, pretrained = continued, scratch) at 5 labels per class and evaluates them. Prints wall seconds
and peak RSS per stage, seconds per pretraining update, the steps-0 checkpoint's largest difference from
transformers' ``last_hidden_state``, and (``--arms``) each arm's accuracy. Random weights: accuracies show
that the arms run, not what Meta's models reach.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ("audio", "image", "text")

CORPUS = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran far away from the cat in the park",
    "stocks fell sharply as markets opened on monday",
    "the team won the match after a late goal",
    "rain is expected across the north later this week",
] * 8
"""Text the tiny tokenizer is trained on (the tests' sentences)."""

CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "audio": dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            conv_dim=(16,) * 7, num_conv_pos_embedding_groups=2, conv_pos_kernel_size=19,
            num_conv_pos_embeddings=3, layerdrop=0.0,
        ),
        "image": dict(
            image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, use_shared_relative_position_bias=True, use_mean_pooling=False,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
        ),
        "text": dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64 + 2, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
            bos_token_id=0, eos_token_id=2,
        ),
    },
    # the published Base configs: transformers' Data2VecAudioConfig defaults are data2vec-audio-base's; the
    # vision one is data2vec-vision-base's (pretrained only: one shared relative-position table, final LN);
    # text is RoBERTa-base's layout (50,265 rows, 514 positions, one token type)
    "base": {
        "audio": dict(layerdrop=0.0),
        "image": dict(use_shared_relative_position_bias=True, use_mean_pooling=False, layer_scale_init_value=0.1),
        "text": dict(
            vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
            pad_token_id=1, bos_token_id=0, eos_token_id=2,
        ),
    },
}  # fmt: skip
"""Folder configs per size and modality (transformers' config classes fill in the rest)."""

HF_CLASS = {"audio": "Data2VecAudio", "image": "Data2VecVision", "text": "Data2VecText"}


def roberta_tokenizer(folder: Path, vocab: int = 400):
    """A byte-level BPE with RoBERTa's layout (<s> <pad> </s> <unk> first, <mask> last), trained on
    ``CORPUS`` and saved by transformers' ``RobertaTokenizerFast`` into ``folder``; returns it."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS, vocab_size=vocab, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        show_progress=False,
    )  # fmt: skip
    bpe.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "bpe.json"))
    tok = RobertaTokenizerFast(tokenizer_file=str(folder / "bpe.json"))
    (folder / "bpe.json").unlink()
    tok.save_pretrained(folder)
    return tok


def write_published(
    modality: str, folder: str | Path, seed: int = 0, head: str | None = None, size: str = "tiny", **over
):
    """A random Hugging Face data2vec folder of ``modality`` (config, weights, processor files) in ``folder``;
    returns the transformers backbone (eval mode). Every weight random (HF zero-initialises some).
    ``head``: save a ``For<Task>`` model instead (``"ctc"``, ``"classification"``)."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kw = {**CONFIGS[size][modality], **over}
    if modality == "text":
        tok = roberta_tokenizer(folder)
        kw.setdefault("vocab_size", len(tok))
    name = HF_CLASS[modality]
    cfg = getattr(transformers, f"{name}Config")(**kw)
    task = "ImageClassification" if modality == "image" else "SequenceClassification"
    cls = {None: "Model", "ctc": "ForCTC", "classification": f"For{task}"}[head]
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}{cls}")(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            unit = "norm" in n.lower() and n.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if size == "base" else 0.1) + (1.0 if unit else 0.0))
    model.save_pretrained(folder)
    if modality == "audio":
        transformers.Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True, return_attention_mask=True
        ).save_pretrained(folder)
    elif modality == "image":
        side = cfg.image_size
        transformers.BeitImageProcessor(
            do_resize=True, size={"height": side, "width": side}, resample=2, do_center_crop=False,
            do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        ).save_pretrained(folder)  # fmt: skip
    backbone = {"audio": "data2vec_audio", "image": "data2vec_vision", "text": "data2vec_text"}[modality]
    return (model if head is None else getattr(model, backbone)).eval()


# ------------------------------------------------------------------------------------------------- runs

PEAK = "import resource, sys; from d2v.cli import main; rc = main(sys.argv[1:]); " + (
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


def stage(work: Path, *argv: str) -> dict[str, float]:
    """One ``d2v`` command in its own process: wall seconds and peak RSS (MiB)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PEAK, *argv], cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"d2v {' '.join(argv)} failed in {work}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    kb = next(int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return {"seconds": wall, "peak_mib": kb / 1024}


def params_for(modality: str, size: str, folder: str, steps: int, batch: int, precision: str) -> dict[str, Any]:
    """The demo's params with the smoke profile's data amounts, the run starting from ``folder``."""
    own = yaml.safe_load((ROOT / "params.yaml").read_text())
    smoke = own["profiles"]["smoke"]
    shard = dict(smoke["shard"][modality])
    if modality == "image":
        shard["image_size"] = CONFIGS[size]["image"].get("image_size", 224)
    pretrain = {"steps": steps, "batch_size": batch, "log_every": 1, "checkpoint_every": max(steps, 1),
                "guard_after": 10**6, "init": folder, "precision": precision}  # fmt: skip
    if modality == "text":
        pretrain["max_len"] = 64 if size == "tiny" else 128  # within the tiny model's 64 positions
    if modality == "audio":
        pretrain["max_len"] = 32000
    return {
        "seed": 0,
        "modalities": [modality],
        "paths": own["paths"],
        "tracking": {"mode": "disabled"},
        "prepare": {modality: smoke["prepare"][modality]},
        "shard": {modality: shard},
        "model": {modality: {"preset": "from_init", "algorithm": "data2vec"}},
        "pretrain": {modality: pretrain},
        "finetune": {modality: {**smoke["finetune"][modality], "precision": precision}},
        "evaluate": {modality: {**smoke["evaluate"][modality], "probe_inits": ["pretrained", "scratch", "published"]}},
        "sweep": {"budgets": [5], "seeds": [0], "inits": ["pretrained", "scratch", "published"]},
    }  # fmt: skip


def parity(modality: str, folder: Path, run: Path) -> float:
    """Largest |difference| between the steps-0 checkpoint's ``features`` and transformers'
    ``last_hidden_state`` on one padded batch (audio: each clip's valid frames)."""
    import torch
    import transformers

    from d2v.load import load_encoder

    hf = getattr(transformers, f"{HF_CLASS[modality]}Model").from_pretrained(folder).eval()
    enc = load_encoder(run)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if modality == "image":
            side = hf.config.image_size
            x = torch.randn(2, 3, side, side, generator=g)
            return (enc.features(x)[0] - hf(pixel_values=x).last_hidden_state).abs().max().item()
        if modality == "text":
            ids = torch.randint(5, 300, (3, 12), generator=g)
            pad = torch.arange(12)[None] >= torch.tensor([12, 7, 3])[:, None]
            ids = ids.masked_fill(pad, hf.config.pad_token_id)
            ref = hf(input_ids=ids, attention_mask=(~pad).long()).last_hidden_state
            return (enc.features(ids, pad)[0][~pad] - ref[~pad]).abs().max().item()
        from d2v.modalities.audio.frames import normalize_waveform

        lengths = [16_000, 11_000]
        wav = torch.randn(2, 16_000, generator=g)
        pad = torch.arange(16_000)[None] >= torch.tensor(lengths)[:, None]
        wav = wav.masked_fill(pad, 0.0)
        ours, frames = enc.features(wav, pad)
        worst = 0.0
        for b, n in enumerate(lengths):
            ref = hf(normalize_waveform(wav[b : b + 1, :n], None, 1e-7)).last_hidden_state[0]
            worst = max(worst, (ours[b][~frames[b]] - ref).abs().max().item())
        return worst


def one_modality(m: str, args: argparse.Namespace, base: Path) -> dict[str, Any]:
    work = base / m
    work.mkdir(parents=True)
    folder = f"published/{m}/data2vec-{m}-{args.size}"
    write_published(m, work / folder, size=args.size)
    params = params_for(m, args.size, folder, 0, args.batch, args.precision)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    row: dict[str, Any] = {"modality": m, "size": args.size}
    row["prepare"] = stage(work, "prepare", m)
    row["shard"] = stage(work, "shard", m)
    row["pretrain_steps0"] = stage(work, "pretrain", m)
    run = work / params["paths"]["checkpoints"] / "pretrain" / m
    row["parity_max_abs_diff"] = parity(m, work / folder, run)
    params["pretrain"][m]["steps"] = args.steps
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    row["pretrain"] = stage(work, "pretrain", m)
    pre = json.loads((work / params["paths"]["metrics"] / "pretrain" / f"{m}.json").read_text())
    row["pretrain_s_per_update"] = pre["pretrain/seconds"] / max(pre["pretrain/steps"], 1)
    row["pretrain_loss"] = pre.get("pretrain/loss")
    if args.arms:
        for arm in ("published", "pretrained", "scratch"):
            row[f"finetune_{arm}"] = stage(work, "finetune", m, "--init", arm, "--budget", "5", "--seed", "0")
        row["evaluate"] = stage(work, "evaluate", m)
        metrics = json.loads((work / params["paths"]["metrics"] / f"{m}.json").read_text())
        for arm in ("published", "pretrained", "scratch"):
            key = next((k for k in metrics if k.startswith(f"evaluate/{arm}/b5/s0/") and k.endswith("accuracy")), None)
            row[f"accuracy_{arm}"] = metrics.get(key) if key else None
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES))
    ap.add_argument("--steps", type=int, default=8, help="continued pretraining updates")
    ap.add_argument("--batch", type=int, default=4, help="pretraining batch size")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="pretrain and finetune")
    ap.add_argument("--arms", action="store_true", help="also fine-tune and evaluate the sweep's three arms")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the workspaces here (default: temporary)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        base = args.workdir or Path(tmp)
        rows = [one_modality(m, args, base) for m in args.modalities]
    head = "| modality | size | shard s | steps-0 s | parity max abs diff | pretrain s/update | pretrain peak MiB |"
    print(f"published-model runs ({platform.machine()}, {args.precision}, batch {args.batch}, {args.steps} updates)\n")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['modality']} | {r['size']} | {r['shard']['seconds']:.1f} | {r['pretrain_steps0']['seconds']:.1f} "
            f"| {r['parity_max_abs_diff']:.2e} | {r['pretrain_s_per_update']:.3f} | {r['pretrain']['peak_mib']:.0f} |"
        )
    if args.arms:
        print("\n| modality | accuracy published | pretrained (continued) | scratch | at 5 labels/class, 1 seed |")
        print("|---|---|---|---|---|")
        for r in rows:
            acc = [r.get(f"accuracy_{a}") for a in ("published", "pretrained", "scratch")]
            print(f"| {r['modality']} | " + " | ".join("—" if a is None else f"{100 * a:.1f}" for a in acc) + " | |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
