"""Evaluation metrics against hand computations, and the linear probe on toy data."""

import collections
import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from d2v import checkpoint
from d2v.config import ConfigError, to_dict
from d2v.data.stages import data_module, shard
from d2v.evaluate import EvaluateConfig, cli_evaluate, evaluate, predict_many, predict_split, probe_metrics
from d2v.heads import HeadConfig, ctc_greedy_decode
from d2v.load import build_finetune_model, load_checkpoint_encoder, load_finetune_model
from d2v.metrics import (
    accuracy,
    cer,
    confusion_matrix,
    ctc_probe,
    edit_distance,
    frame_features,
    linear_probe,
    macro_f1,
    pooled_layer_features,
    task_metrics,
    wer,
)
from d2v.modalities import get
from d2v.sweep import DEFAULT_INITS, Run

PRED = torch.tensor([0, 0, 1, 2, 2, 2])
TARGET = torch.tensor([0, 1, 1, 2, 2, 0])


def test_accuracy_and_confusion_by_hand():
    assert accuracy(PRED, TARGET) == pytest.approx(4 / 6)
    cm = confusion_matrix(PRED, TARGET, 3)
    # rows = actual: class 0 -> predicted 0 once, 2 once; class 1 -> 0 once, 1 once; class 2 -> 2 twice
    assert cm.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert cm.sum() == 6


def test_macro_f1_by_hand_and_sklearn():
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2: tp 2, fp 1, fn 0 -> 0.8
    assert macro_f1(PRED, TARGET, 3) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    p, t = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 4, (200,), generator=g)
    assert macro_f1(p, t, 5) == pytest.approx(sk.f1_score(t.numpy(), p.numpy(), average="macro"), abs=1e-12)


def test_metrics_reject_bad_ids():
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(torch.tensor([0]), torch.tensor([0, 1]), 2)


@pytest.mark.parametrize(
    "ref, hyp, d",
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2), ("same", "same", 0)],
)
def test_edit_distance_classics(ref, hyp, d):
    assert edit_distance(ref, hyp) == d
    assert edit_distance(list(ref), list(hyp)) == d


def test_wer_and_cer_by_hand():
    refs = ["one two three", "nine"]
    hyps = ["one too three four", "nine"]  # 1 substitution + 1 insertion over 4 reference words
    assert wer(refs, hyps) == pytest.approx(2 / 4)
    # chars: "one two three" (13) vs "one too three four": 'w'->'o' + " four" inserted = 6; "nine" 4 chars
    assert cer(refs, hyps) == pytest.approx(6 / 17)
    assert wer(["a b"], ["  a   b "]) == 0.0
    with pytest.raises(ValueError, match="no words"):
        wer([""], ["x"])
    with pytest.raises(ValueError, match="2 references but 1"):
        cer(["a", "b"], ["a"])


def test_greedy_decode_is_reexported():
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 1, 0, 1]]), 3).float()
    assert ctc_greedy_decode(logits) == [[1, 1]]


def test_linear_probe_separates_separable_toy_set():
    # three Gaussian blobs 8 std apart in 5-D: a linear classifier is ~100 % (failure odds per point of
    # landing on the wrong side of a bisecting plane 4 std away: ~3e-5)
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[8.0, 0, 0, 0, 0], [0, 8.0, 0, 0, 0], [0, 0, 8.0, 0, 0]])
    y = torch.arange(3).repeat(40)
    x = centres[y] + torch.randn(120, 5, generator=g)
    yt = torch.arange(3).repeat(20)
    xt = centres[yt] + torch.randn(60, 5, generator=g)
    pred = linear_probe(x, y, xt, 3, max_iter=30)  # separable: the loss keeps falling, stop early
    assert pred.shape == (60,) and pred.dtype == torch.int64
    assert accuracy(pred, yt) == 1.0
    assert torch.equal(pred, linear_probe(x, y, xt, 3, max_iter=30))  # deterministic


def test_linear_probe_is_chance_on_noise_and_checks_shapes():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 4, generator=g), torch.randint(0, 2, (200,), generator=g)
    xt, yt = torch.randn(400, 4, generator=g), torch.randint(0, 2, (400,), generator=g)
    # labels independent of features: accuracy ~ Binomial(400, 0.5)/400, std 0.025; |acc - 0.5| < 0.15 fails
    # with odds < 1e-9
    assert abs(accuracy(linear_probe(x, y, xt, 2), yt) - 0.5) < 0.15
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        linear_probe(x, y, torch.randn(3, 5), 2)


def test_ctc_probe_transcribes_when_frames_encode_letters_and_not_on_noise():
    # each letter is 3 frames of its own one-hot direction (+ noise), a space-free toy alphabet: a linear
    # CTC head can read them exactly; on frames independent of the text it cannot
    alphabet, g = "abcd", torch.Generator().manual_seed(0)

    def clip(text, informative=True):
        ids = torch.tensor([alphabet.index(c) for c in text]).repeat_interleave(3)
        x = torch.nn.functional.one_hot(ids, 8).float() * 4 if informative else torch.zeros(len(ids), 8)
        return (x + 0.3 * torch.randn(x.shape, generator=g))[None].repeat(2, 1, 1)  # [L=2, T, D]

    texts = ["".join(alphabet[int(i)] for i in torch.randint(0, 4, (5,), generator=g)) for _ in range(80)]
    texts = [t for t in texts if all(a != b for a, b in zip(t, t[1:]))] or ["abcd"]  # repeats need a blank
    test = texts[:20]
    hyps = ctc_probe([clip(t) for t in texts], texts, [clip(t) for t in test], alphabet, steps=300, seed=0)
    assert cer(test, hyps) < 0.05
    state = torch.random.get_rng_state()
    seen: list[int] = []

    def progress(steps):  # a progress bar sees every step, and changes nothing
        for i in steps:
            seen.append(i)
            yield i

    again = ctc_probe(
        [clip(t) for t in texts], texts, [clip(t) for t in test], alphabet, steps=300, seed=0, progress=progress
    )
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded by its argument, not the global RNG
    assert again == hyps and seen == list(range(300))  # and the same transcripts again
    noise = ctc_probe(
        [clip(t, False) for t in texts], texts, [clip(t, False) for t in test], alphabet, steps=300, seed=0
    )
    assert cer(test, noise) > 0.4
    with pytest.raises(ValueError, match=r"\['z'\] are not in the alphabet"):
        ctc_probe([clip("ab")], ["az"], [clip("ab")], alphabet, steps=1, seed=0)


def test_frame_features_keep_each_items_valid_frames_and_match_layer_features():
    torch.manual_seed(0)
    mod = get("audio")
    enc = mod.build_encoder(mod.model_config({"preset": "tiny"})).eval()
    pad = torch.zeros(2, 4000, dtype=torch.bool)
    pad[1, 3000:] = True
    batch = {"inputs": torch.randn(2, 4000), "padding_mask": pad, "transcripts": ["one", "two"]}
    xs, texts = frame_features(enc, [batch], torch.device("cpu"))
    assert texts == ["one", "two"] and len(xs) == 2
    assert xs[0].shape[0] == enc.config.transformer.depth + 1 and xs[1].shape[1] < xs[0].shape[1]
    pooled, labels = pooled_layer_features(
        enc, [{**batch, "labels": torch.tensor([3, 4])}], torch.device("cpu"), ("mean", "first")
    )
    assert labels.tolist() == [3, 4]
    torch.testing.assert_close(pooled["mean"][:, 1], xs[1].mean(1))  # the same frames, mean-pooled
    torch.testing.assert_close(pooled["first"][:, 1], xs[1][:, 0])  # and its first frame


# ------------------------------------------------------------------------------------------ the stage


def _save_pretrain(ck_dir, cfg, encoder, prep):
    meta = {
        "modality": "image",
        "kind": "pretrain",
        "model_config": to_dict(cfg),
        "encoder_prefix": "student.",
    }
    sd = {f"student.{k}": v for k, v in encoder.state_dict().items()}
    checkpoint.save(ck_dir, 1, sd, {**meta, "preprocessing": prep})


def _save_finetune(run_dir, model, manifest):
    meta = {
        "modality": model.encoder.modality, "kind": "finetune", "model_config": to_dict(model.encoder.config),
        "encoder_prefix": "encoder.", "task": model.task, "num_classes": model.num_classes,
        "head": to_dict(HeadConfig()), "preprocessing": manifest["preprocessing"],
        "task_info": manifest["tasks"]["classification"],
    }  # fmt: skip
    checkpoint.save(run_dir, 2, model.state_dict(), meta)


@pytest.fixture(scope="module")
def image_project(tmp_path_factory):
    """Tiny image shards (3 brightness classes x 10 PNGs) + a pretrain and two fine-tuning checkpoints."""
    root = tmp_path_factory.mktemp("proj")
    raw = root / "raw" / "image"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["dark", "grey", "light"]):
        d = raw / "files" / name
        d.mkdir(parents=True)
        for i in range(10):
            arr = np.clip(rng.normal(60 + 70 * c, 20, (28, 28)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, mode="L").save(d / f"{i}.png")
    manifest = shard(
        "image", data_module("image").ShardConfig(samples_per_shard=8), raw, root / "shards" / "image", 0
    )
    mod = get("image")
    cfg = mod.model_config({"preset": "tiny"})
    torch.manual_seed(0)
    ck = root / "checkpoints"
    _save_pretrain(ck / "pretrain" / "image", cfg, mod.build_encoder(cfg), manifest["preprocessing"])
    for init in DEFAULT_INITS:
        enc = load_checkpoint_encoder(ck / "pretrain" / "image", pretrained=init == "pretrained", seed=1)
        model = build_finetune_model("image", enc, "classification", 3, HeadConfig())
        _save_finetune(ck / "finetune" / "image" / f"b2-s0-{init}", model, manifest)
    params = {
        "seed": 0,
        "paths": {k: str(root / k) for k in ("raw", "shards", "checkpoints", "metrics", "plots", "reports")},
        "sweep": {"budgets": [2], "seeds": [0], "inits": ["pretrained", "scratch"]},
        "tracking": {"mode": "disabled"},
        "model": {"image": {"preset": "tiny"}},
        "evaluate": {"image": {"batch_size": 4}},
    }
    return root, params, manifest


def _args(**kw):
    return SimpleNamespace(**{"modality": "image", "budget": None, "seed": None, "init": None, **kw})


def test_evaluate_stage_writes_namespaced_metrics_and_confusion(image_project, capsys):
    root, params, manifest = image_project
    assert cli_evaluate(params, _args()) == 0
    metrics = json.loads((root / "metrics" / "image.json").read_text())
    want = {f"evaluate/{i}/b2/s0/{m}" for i in DEFAULT_INITS for m in ("accuracy", "macro_f1")}
    # the probe: per seed, the layer chosen on valid (tiny: 2 blocks + the final output) and every layer
    per_seed = ("accuracy", "macro_f1", "layer", "layer1_accuracy", "layer2_accuracy", "layer3_accuracy",
                "embed_accuracy")  # fmt: skip
    want |= {f"probe/{i}/s{s}/{m}" for i in DEFAULT_INITS for s in (0, 1, 2) for m in per_seed}
    assert set(metrics) == want
    for i in DEFAULT_INITS:  # embed's default features: the final output, mean-pooled
        assert all(metrics[f"probe/{i}/s{s}/embed_accuracy"] == metrics[f"probe/{i}/s{s}/layer3_accuracy"]
                   for s in (0, 1, 2))  # fmt: skip
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if not k.endswith("/layer"))
    assert all(metrics[f"probe/{i}/s{s}/layer"] in (1.0, 2.0, 3.0) for i in DEFAULT_INITS for s in (0, 1, 2))
    # brightness classes 70 grey levels apart (3.5 noise std): mean-pooled features separate them linearly
    assert all(metrics[f"probe/pretrained/s{s}/accuracy"] == 1.0 for s in (0, 1, 2))
    with (root / "plots" / "evaluate" / "image_confusion.csv").open() as f:
        rows = list(csv.DictReader(f))
    n_test = manifest["splits"]["test"]["samples"]
    assert len(rows) == n_test and {r["actual"] for r in rows} <= {"dark", "grey", "light"}
    # evaluation is deterministic: the same checkpoints give the same file; a CTC probe asked of shards
    # without transcripts (the default asks it of every speech project) is skipped, and says so
    first = (root / "metrics" / "image.json").read_bytes()
    section = params.get("evaluate") or {}
    ctc = {
        **params,
        "evaluate": {**section, "image": {**(section.get("image") or {}), "ctc_probe_budget": 10}},
    }
    cli_evaluate(ctc, _args())
    assert (root / "metrics" / "image.json").read_bytes() == first
    assert "no transcribed ('ctc') task, so no CTC probe" in capsys.readouterr().out


def test_accuracy_matches_the_models_own_predictions(image_project):
    root, _, _ = image_project
    ft = root / "checkpoints" / "finetune" / "image"
    model, _ = load_finetune_model(ft / "b2-s0-pretrained", "image")
    from d2v.data.loader import LoaderSpec, build_loader

    shards = root / "shards" / "image"
    spec = LoaderSpec(batch_size=100, mode="eval", seed=0)
    batch = next(iter(build_loader(shards, "test", model.encoder.config, spec)))
    pred = model.predict(batch)
    cfg = EvaluateConfig(batch_size=2, probe_inits=())  # other batching, same numbers
    metrics, rows = evaluate("image", [Run("pretrained", 2, 0)], shards, root / "nowhere", ft, cfg)
    assert metrics == {
        "evaluate/pretrained/b2/s0/accuracy": pytest.approx(accuracy(pred, batch["labels"])),
        "evaluate/pretrained/b2/s0/macro_f1": pytest.approx(macro_f1(pred, batch["labels"], 3)),
    }
    assert len(rows) == len(pred)


def test_test_budget_scores_every_run_on_one_stratified_draw(image_project):
    root, _, manifest = image_project
    ft = root / "checkpoints" / "finetune" / "image"
    shards = root / "shards" / "image"
    runs = [Run(init, 2, 0) for init in DEFAULT_INITS]
    per_class = manifest["splits"]["test"]["label_counts"]
    k = min(per_class.values()) - 1  # fewer than every class has: a real draw
    cfg = EvaluateConfig(batch_size=2, probe_inits=(), test_budget=k)
    metrics, rows = evaluate("image", runs, shards, root / "nowhere", ft, cfg)
    assert len(rows) == k * len(per_class)
    assert sorted(collections.Counter(a for a, _ in rows).values()) == [k] * len(per_class)
    # the draw is the params seed's: the same items (and numbers) every time, whatever the batch size
    again, rows_again = evaluate("image", runs, shards, root / "nowhere", ft, EvaluateConfig(
        batch_size=3, probe_inits=(), test_budget=k))  # fmt: skip
    assert again == metrics and sorted(rows_again) == sorted(rows)
    # the budget is cut to the smallest class, and a bad one is refused when the config is built
    _, capped = evaluate("image", runs, shards, root / "nowhere", ft, EvaluateConfig(probe_inits=(), test_budget=1000))
    assert len(capped) == min(per_class.values()) * len(per_class)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="test_budget"):
            EvaluateConfig(test_budget=bad)


def test_missing_runs_manifest_and_wrong_checkpoints_are_named(image_project, tmp_path):
    root, params, _ = image_project
    with pytest.raises(ValueError, match=r"b5-s0-pretrained"):
        cli_evaluate({**params, "sweep": {"budgets": [2, 5], "seeds": [0]}}, _args())
    no_shards = {**params, "paths": {**params["paths"], "shards": str(tmp_path / "nowhere")}}
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        cli_evaluate(no_shards, _args())
    with pytest.raises(ValueError, match="'pretrain' checkpoint"):
        load_finetune_model(root / "checkpoints" / "pretrain" / "image")
    with pytest.raises(ValueError, match="not 'audio'"):
        load_finetune_model(root / "checkpoints" / "finetune" / "image" / "b2-s0-scratch", "audio")
    bigger = {**params, "model": {"image": {"preset": "tiny", "transformer": {"depth": 3}}}}
    with pytest.raises(ValueError, match="another model.image config"):
        cli_evaluate(bigger, _args())
    no_probe = {**bigger, "evaluate": {"image": {"probe_inits": []}}}
    with pytest.raises(ValueError, match=r"b2-s0-pretrained/step-\d+ was fine-tuned with another"):
        cli_evaluate(no_probe, _args())
    too_many = {**params, "evaluate": {"image": {"probe_budget": 50}}}
    with pytest.raises(ValueError, match="label_budget: 50 labels per class"):
        cli_evaluate(too_many, _args())


def test_ctc_predictions_give_wer_and_cer():
    ah = __import__("d2v.modalities.audio.heads", fromlist=["x"])
    torch.manual_seed(0)
    mod = get("audio")
    model = ah.build_finetune_model(
        mod.build_encoder(mod.model_config({"preset": "tiny"})), "ctc", None
    ).eval()
    pad = torch.zeros(2, 4000, dtype=torch.bool)
    pad[1, 3000:] = True
    loader = [{"inputs": torch.randn(2, 4000), "padding_mask": pad, "transcripts": ["one two", "three"]}]
    preds, targets = predict_split(model, loader, torch.device("cpu"))
    assert targets == ["one two", "three"] and len(preds) == 2 and all(isinstance(p, str) for p in preds)
    m = task_metrics("ctc", preds, targets, None)
    assert m == {"wer": wer(targets, preds), "cer": cer(targets, preds)}
    assert task_metrics("ctc", targets, targets, None) == {"wer": 0.0, "cer": 0.0}


def test_predict_many_reads_the_split_once_and_predicts_as_each_model_alone():
    """The sweep's runs are scored in one pass over their test split: each model's predictions are those it
    gives alone, and models of different tasks are refused."""
    ih = __import__("d2v.modalities.image.heads", fromlist=["x"])
    mod = get("image")
    cfg = mod.model_config({"preset": "tiny"})
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(ih.build_finetune_model(mod.build_encoder(cfg), "classification", 4).eval())
    reads = []

    def loader():
        for i in range(3):
            reads.append(i)
            g = torch.Generator().manual_seed(i)
            yield {"inputs": torch.randn(5, 3, cfg.image_size, cfg.image_size, generator=g),
                   "labels": torch.randint(0, 4, (5,), generator=g)}  # fmt: skip

    preds, targets = predict_many(models, list(loader()), torch.device("cpu"))
    assert reads == [0, 1, 2] and len(targets) == 15
    for p, model in zip(preds, models):
        assert (p, targets) == predict_split(model, list(loader()), torch.device("cpu"))
    assert preds[0] != preds[1]  # two different models, so the check above compares something
    ah = __import__("d2v.modalities.audio.heads", fromlist=["x"])
    a = get("audio")
    ctc = ah.build_finetune_model(a.build_encoder(a.model_config({"preset": "tiny"})), "ctc", None)
    with pytest.raises(ValueError, match="different tasks"):
        predict_many([models[0], ctc], [], torch.device("cpu"))


def test_the_progress_bar_passes_batches_through_and_prints_nothing_to_stdout(capsys):
    from d2v.evaluate import progress

    batches = [{"labels": torch.arange(3), "transcripts": ["a", "b", "c"]}, {"inputs": torch.zeros(2, 5)}]
    manifest = {"splits": {"test": {"samples": 5}}}
    assert list(progress(iter(batches), "scoring", manifest, "test")) == batches
    assert capsys.readouterr().out == ""


def test_every_labelled_task_gets_its_probe_with_both_pools(tmp_path):
    """A user's JSONL with a second task (``"task": "mood"``): the probe scores it beside the headline task,
    its metrics named ``mood_*``, mean-pooled and first-token per layer, and at ``embed``'s default features.
    A record naming a reserved task is skipped and counted."""
    from d2v.data import prepare_raw
    from d2v.modalities.text.data import PrepareConfig, ShardConfig

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    filler = ["the", "a", "cat", "sat", "on", "mat", "while", "dogs", "ran", "past", "hills", "rain"]

    def line(word: str) -> str:  # the label's word anywhere among filler words
        words = list(rng.choice(filler, 8))
        words.insert(int(rng.integers(0, 9)), word)
        return " ".join(words)

    records = [{"text": line(t), "label": t} for t in ("sport", "tech") for _ in range(20)]
    records += [{"text": line(m), "label": m, "task": "mood"} for m in ("good", "bad") for _ in range(20)]
    records += [{"text": "a reserved name", "label": "x", "task": "ctc"}]
    (src / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    raw, out = tmp_path / "raw", tmp_path / "shards" / "text"
    prepare_raw("text", PrepareConfig(source=str(src)), raw, seed=0)
    manifest = shard("text", ShardConfig(vocab_size=300, min_frequency=1, max_tokens=24, samples_per_shard=16,
                                         pretrain_from="unlabelled+labelled"),
                     raw, out, seed=0)  # fmt: skip
    assert manifest["skipped_counts"] == {"bad_record": 1}
    assert manifest["tasks"]["mood"]["splits"] == ["mood_train", "mood_valid", "mood_test"]
    mod = get("text")
    cfg = mod.model_config({"preset": "tiny", "vocab_size": 300, "max_positions": 32})
    torch.manual_seed(0)
    enc = mod.build_encoder(cfg)
    meta = {"modality": "text", "kind": "pretrain", "model_config": to_dict(cfg), "encoder_prefix": "student.",
            "preprocessing": manifest["preprocessing"]}  # fmt: skip
    checkpoint.save(tmp_path / "pre", 1, {f"student.{k}": v for k, v in enc.state_dict().items()}, meta)
    step = checkpoint.resolve(tmp_path / "pre")
    ev = EvaluateConfig(batch_size=8, probe_pools=("mean", "first"), probe_seeds=(0, 1))
    metrics = probe_metrics("text", manifest, out, {"scratch": step}, ev, 0, torch.device("cpu"))
    depth = cfg.transformer.depth + 1
    per_seed = ["accuracy", "macro_f1", "layer", "embed_accuracy"]
    per_seed += [f"{p}layer{i}_accuracy" for p in ("", "first_") for i in range(1, depth + 1)]
    want = {f"probe/scratch/s{s}/{t}{m}" for s in (0, 1) for t in ("", "mood_") for m in per_seed}
    assert set(metrics) == want
    # one word decides the label: a random encoder's mean-pooled tokens carry it; the two tasks differ
    assert all(metrics[f"probe/scratch/s{s}/mood_accuracy"] >= 0.75 for s in (0, 1))
    assert metrics["probe/scratch/s0/mood_embed_accuracy"] == metrics[f"probe/scratch/s0/mood_layer{depth}_accuracy"]
