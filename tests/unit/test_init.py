"""Pretraining that starts from a published model (``pretrain.<m>.init``), through the CLI on real shards.

Tiny random Hugging Face folders (tests/conftest.py ``published``) stand in for Meta's checkpoints: the same
classes, files and processors at toy width. Raw data is a user's folder of files (``prepare.<m>.source``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
import yaml
from PIL import Image

from d2v import checkpoint
from d2v.cli import main
from d2v.config import ConfigError
from d2v.load import load_encoder

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4  # fp32 on CPU, the two sides differ in summation order only (as tests/unit/test_hf_*.py)
WORDS = "the cat sat on the mat and looked at the dog while rain fell across the north".split()  # noqa: SIM905


def raw_source(modality: str, folder: Path, n: int = 24) -> Path:
    """A user's folder of inputs: class sub-folders of images or texts, or 16 kHz clips (unlabelled)."""
    g = np.random.default_rng(0)
    for i in range(n):
        cls = folder / f"c{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        if modality == "image":
            Image.fromarray(g.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(cls / f"{i}.png")
        elif modality == "text":
            words = g.choice(WORDS, size=int(g.integers(8, 40)))
            (cls / f"{i}.txt").write_text(" ".join(words), encoding="utf-8")
        else:
            t = np.arange(int(g.integers(8_000, 20_000))) / 16_000
            wav = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.05 * g.standard_normal(len(t))
            sf.write(folder / f"c{i % 2}" / f"{i}.wav", wav.astype(np.float32), 16_000)
    return folder


def write_params(tmp: Path, modality: str, init: str | None, model: dict | None = None, **pretrain) -> None:
    params = {
        "seed": 0,
        "paths": {"raw": "raw", "shards": "shards", "checkpoints": "ckpt", "metrics": "metrics", "plots": "plots",
                  "published": "published"},
        "tracking": {"mode": "disabled"},
        "prepare": {modality: {"source": "source"}},
        "shard": {modality: {"samples_per_shard": 8, "valid": 0.2, "test": 0.2,
                             "pretrain_from": "unlabelled+labelled"}},
        "model": {modality: model if model is not None else {"preset": "from_init"}},
        "pretrain": {modality: {"steps": 0, "batch_size": 4, "log_every": 1, "checkpoint_every": 2,
                                "guard_after": 1000, "init": init, **pretrain}},
    }  # fmt: skip
    if modality == "image":
        params["shard"][modality]["image_size"] = 28
    if modality == "text":
        params["pretrain"][modality]["max_len"] = 32
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def hf_reference(modality: str, hf, enc) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2v ``features``, transformers ``last_hidden_state``) on a padded batch (audio: each clip's valid
    frames, as tests/unit/test_hf_audio.py compares them: transformers' positional convs see the padding)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if modality == "image":
            x = torch.randn(2, 3, 28, 28, generator=g)
            return enc.features(x)[0], hf(pixel_values=x).last_hidden_state
        if modality == "text":
            ids = torch.randint(5, 300, (3, 12), generator=g)
            pad = torch.arange(12)[None] >= torch.tensor([12, 7, 3])[:, None]
            ids = ids.masked_fill(pad, 1)
            ours = enc.features(ids, pad)[0]
            ref = hf(input_ids=ids, attention_mask=(~pad).long()).last_hidden_state
            return ours[~pad], ref[~pad]
        from d2v.modalities.audio.frames import normalize_waveform

        lengths = [16_000, 11_000]
        wav = torch.randn(2, 16_000, generator=g)
        pad = torch.arange(16_000)[None] >= torch.tensor(lengths)[:, None]
        wav = wav.masked_fill(pad, 0.0)
        ours, frames = enc.features(wav, pad)
        rows, mine = [], []
        for b, n in enumerate(lengths):
            x = wav[b : b + 1, :n]
            ref = hf(normalize_waveform(x, None, 1e-7)).last_hidden_state[0]
            rows.append(ref)
            mine.append(ours[b][~frames[b]])
        return torch.cat(mine), torch.cat(rows)


@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_steps_0_writes_the_published_encoder_as_a_checkpoint(workspace, published, modality, capsys):
    """``steps: 0``: the stage's checkpoint is the published encoder; its ``features`` equal transformers'
    ``last_hidden_state`` (padded batches), and the shards were made with the folder's preprocessing."""
    folder = workspace / "published" / modality / "tiny"
    hf = published(modality, folder)
    raw_source(modality, workspace / "source")
    write_params(workspace, modality, str(folder))
    assert main(["prepare", modality]) == 0 and main(["shard", modality]) == 0
    manifest = json.loads((workspace / "shards" / modality / "manifest.json").read_text())
    assert manifest["preprocess_like"]["path"] == str(folder)  # pretrain.<m>.init's folder by default
    assert main(["pretrain", modality]) == 0
    run = workspace / "ckpt" / "pretrain" / modality
    meta = checkpoint.read_meta(run)
    assert meta["step"] == 0 and meta["init"]["path"] == str(folder) and meta["init"]["kind"] == "hf"
    enc = load_encoder(run)
    ours, ref = hf_reference(modality, hf, enc)
    diff = (ours - ref).abs().max().item()
    print(f"{modality}: steps 0 checkpoint vs transformers, max |diff| {diff:.2e}")
    assert diff < ATOL
    # the teacher is the student's copy
    w = checkpoint.load_weights(run)
    for k, v in w.items():
        if k.startswith("student.") and f"teacher.{k[8:]}" in w:
            assert torch.equal(v, w[f"teacher.{k[8:]}"]), k


def test_continued_pretraining_resumes_bit_exactly_after_a_kill(workspace, published):
    """steps > 0 from a published text model: SIGKILL after the first checkpoint, rerun: the same final
    weights as an uninterrupted run."""
    folder = workspace / "published" / "text" / "tiny"
    published("text", folder)
    raw_source("text", workspace / "source")
    write_params(workspace, "text", str(folder), steps=4)
    assert main(["prepare", "text"]) == 0 and main(["shard", "text"]) == 0
    run = workspace / "ckpt" / "pretrain" / "text"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killer = textwrap.dedent(
        """
        import os, signal, sys
        from d2v import pretrain
        real = pretrain.pretrain_job
        def job(*a, **kw):
            def hook(done):
                if done == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **{**kw, "after_step": hook})
        pretrain.pretrain_job = job
        from d2v.cli import main
        sys.exit(main(["pretrain", "text"]))
        """
    )
    r = subprocess.run([sys.executable, "-c", killer], cwd=workspace, env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-00000002"]
    assert main(["pretrain", "text"]) == 0
    resumed = checkpoint.load_weights(run)
    history = checkpoint.load_train_state(run)["history"]
    for p in run.iterdir():
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
    assert main(["pretrain", "text"]) == 0
    straight = checkpoint.load_weights(run)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert history == checkpoint.load_train_state(run)["history"]
    assert checkpoint.read_meta(run)["step"] == 4
    # the student moved away from the published weights, and export-hf of it loads in transformers
    start = load_encoder(folder).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in load_encoder(run).state_dict().items())
    assert (
        checkpoint.read_meta(run)["model_config"]["mask_id"]
        == len(transformers.AutoTokenizer.from_pretrained(folder)) - 1
    )
    out = workspace / "exported"
    assert main(["export-hf", str(run), str(out)]) == 0
    hf = transformers.Data2VecTextModel.from_pretrained(out).eval()
    enc = load_encoder(run)
    ids = torch.tensor([[0, 40, 41, 42, 2], [0, 43, 2, 1, 1]])
    pad = ids.eq(1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=(~pad).long()).last_hidden_state
        assert (enc.features(ids, pad)[0][~pad] - ref[~pad]).abs().max().item() < ATOL


def test_a_fine_tuned_folder_s_head_is_ignored_with_a_line(workspace, published, capsys):
    folder = workspace / "published" / "image" / "ft"
    published("image", folder, head="classification", num_labels=3)
    raw_source("image", workspace / "source")
    write_params(workspace, "image", str(folder))
    assert main(["prepare", "image"]) == 0 and main(["shard", "image"]) == 0
    assert main(["pretrain", "image"]) == 0
    out = capsys.readouterr().out
    assert "Data2VecVisionForImageClassification; its task head is ignored" in out


def test_model_keys_that_contradict_the_folder_are_named(workspace, published):
    folder = workspace / "published" / "image" / "tiny"
    published("image", folder)
    from d2v import initialize

    src = initialize.init_source(str(folder), "image")
    with pytest.raises(ConfigError, match=r"transformer\.depth: 6 \(the folder's: 2\)"):
        initialize.model_config({"preset": "from_init", "transformer": {"depth": 6}}, "image", src)
    with pytest.raises(ConfigError, match="Set model.image.preset: from_init"):
        initialize.model_config({"preset": "tiny"}, "image", src)
    with pytest.raises(ConfigError, match="pretrain.image.init, which is not set"):
        initialize.model_config({"preset": "from_init"}, "image", None)
    # the recipe is the user's: a non-architecture key is kept
    cfg = initialize.model_config({"preset": "from_init", "mask_ratio": 0.5}, "image", src)
    assert cfg.mask_ratio == 0.5 and cfg.transformer.depth == 2 and cfg.patch_size == 7


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda f, p: p("text", f), "holds a data2vec text model; a image run needs"),
        (lambda f, p: (f.mkdir(parents=True), (f / "config.json").write_text('{"model_type": "bert"}')),
         "model_type 'bert', not a data2vec model"),
        (lambda f, p: (p("image", f), (f / "model.safetensors").write_bytes(b"\0" * 100)), "unreadable"),
        (lambda f, p: (p("image", f), (f / "model.safetensors").unlink()), "no weights found"),
        (lambda f, p: None, "does not exist"),
    ],
)  # fmt: skip
def test_bad_init_folders_are_named_and_leave_no_checkpoint(workspace, published, make, match):
    folder = workspace / "published" / "image" / "bad"
    make(folder, published)
    good = workspace / "published" / "image" / "good"
    published("image", good)
    raw_source("image", workspace / "source")
    write_params(workspace, "image", str(good))
    assert main(["prepare", "image"]) == 0 and main(["shard", "image"]) == 0
    write_params(workspace, "image", str(folder))
    from d2v.config import load_params
    from d2v.pretrain import cli_pretrain

    with pytest.raises(ValueError, match=match):
        cli_pretrain(load_params("params.yaml"), type("A", (), {"modality": "image"}))
    assert not (workspace / "ckpt" / "pretrain" / "image").exists() or not checkpoint.list_checkpoints(
        workspace / "ckpt" / "pretrain" / "image"
    )


def test_shards_of_another_preprocessing_are_refused_naming_both(workspace, published):
    """Shards made with the image model's own preprocessing (their data's mean/std), then a run that
    starts from a published model: an error naming the model's and the shards' values."""
    folder = workspace / "published" / "image" / "tiny"
    published("image", folder)
    raw_source("image", workspace / "source")
    write_params(workspace, "image", None, model={"preset": "tiny", "image_size": 28}, steps=2)
    assert main(["prepare", "image"]) == 0 and main(["shard", "image"]) == 0
    write_params(workspace, "image", str(folder))
    from d2v.config import load_params
    from d2v.pretrain import cli_pretrain

    with pytest.raises(ValueError, match=r"expects other inputs than the shards in shards/image .*Re-shard"):
        cli_pretrain(load_params("params.yaml"), type("A", (), {"modality": "image"}))


def test_the_published_arm_is_the_folder_as_it_is_and_notices_a_change(workspace, published):
    """``finetune --init published`` / the probe read the folder the pretrain run started from, checked
    against the run's record of it; a run from random init has no published arm."""
    from d2v.load import published_encoder

    folder = workspace / "published" / "image" / "tiny"
    published("image", folder)
    raw_source("image", workspace / "source")
    write_params(workspace, "image", str(folder), steps=2)
    assert main(["prepare", "image"]) == 0 and main(["shard", "image"]) == 0 and main(["pretrain", "image"]) == 0
    step = checkpoint.resolve(workspace / "ckpt" / "pretrain" / "image")
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = published_encoder(step).features(x)[0]
        assert torch.equal(ours, load_encoder(folder).features(x)[0])
        assert not torch.equal(ours, load_encoder(step).features(x)[0])  # continued pretraining moved it
    assert main(["finetune", "image", "--init", "published", "--budget", "2"]) == 0
    meta = checkpoint.read_meta(workspace / "ckpt" / "finetune" / "image" / "b2-s0-published")
    assert meta["init"] == "published"
    published("image", folder, seed=1)  # the folder replaced since pretraining
    with pytest.raises(ValueError, match="changed since .* rerun `d2v pretrain image`"):
        published_encoder(step)
    write_params(workspace, "image", None, model={"preset": "tiny"}, steps=2)
    assert main(["pretrain", "image"]) == 0
    with pytest.raises(ValueError, match="started from random init, so there is no published model"):
        published_encoder(checkpoint.resolve(workspace / "ckpt" / "pretrain" / "image"))
