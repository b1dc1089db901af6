"""The training loop: pretraining of every modality, accumulation, host syncs, guards, data position."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from d2v import checkpoint, loop
from d2v import precision as prec
from d2v.config import ConfigError, to_dict
from d2v.data2vec import ema_decay
from d2v.load import load_finetune_model
from d2v.modalities import get
from d2v.optim import OptimConfig, build_optimizer, build_scheduler
from d2v.pretrain import CURVE_FIELDS, PretrainConfig, collapse_check, pretrain


def synthetic_batch(modality: str, cfg, B: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A pretraining batch of the modality's raw inputs and its own masking (tiny sizes)."""
    mod = get(modality)
    if modality == "audio":
        wav = torch.randn(B, 4000, generator=g)
        return {"inputs": wav, "mask": mod.make_mask(torch.full((B,), 4000), cfg, g)}
    if modality == "image":
        return {
            "inputs": torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g),
            "mask": mod.make_mask(B, cfg, g),
        }
    ids = torch.randint(cfg.num_special, cfg.vocab_size, (B, 24), generator=g)
    student, mask = mod.make_mask(ids, None, cfg, g)
    return {"inputs": ids, "student_inputs": student, "mask": mask}


def loader_factory(modality: str, cfg, B: int = 4, per_epoch: int = 3, seed: int = 0):
    def make(epoch: int):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        return [synthetic_batch(modality, cfg, B, g) for _ in range(per_epoch)]

    return make


def tiny(modality: str, **over):
    mod = get(modality)
    cfg = mod.model_config({"preset": "tiny", **over})
    torch.manual_seed(0)
    return cfg, mod.build_pretrain_model(cfg)


SHORT = PretrainConfig(steps=4, batch_size=4, log_every=2, checkpoint_every=2, guard_after=10**9,
                       optim=OptimConfig(lr=1e-3, warmup=0.25))  # fmt: skip


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_pretrain_runs_logs_and_checkpoints(tmp_path, modality):
    cfg, model = tiny(modality)
    key = next(k for k in model.student.state_dict() if k.endswith("blocks.0.attn.qkv.weight"))
    before = model.student.state_dict()[key].clone()
    history = pretrain(model, SHORT, loader_factory(modality, cfg), tmp_path, {"modality": modality})
    assert [r["step"] for r in history] == [2, 4]
    assert all(set(CURVE_FIELDS) == set(r) for r in history)
    assert all(
        torch.isfinite(torch.tensor([r["loss"], r["target_var"], r["pred_var"]])).all() for r in history
    )
    assert history[-1]["tau"] == ema_decay(4, model.ema)
    after = model.student.state_dict()[key]
    assert not torch.equal(before, after)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    state = checkpoint.load_train_state(tmp_path)
    assert state["step"] == 4 and state["data"] == [{"epoch": 1, "index": 1}] and state["history"] == history


def test_teacher_follows_the_ema():
    """After one step the teacher is tau * old + (1 - tau) * new student, in fp32 (§1.2)."""
    cfg, model = tiny("image")
    t0 = model.teacher.state_dict()["stack.blocks.0.mlp.fc1.weight"].clone()
    c = PretrainConfig(steps=1, batch_size=4, log_every=1, checkpoint_every=1, guard_after=10**9)
    opt = build_optimizer(model, c.optim)
    sched = build_scheduler(opt, c.optim, 1)
    stream = loop.EpochStream(loader_factory("image", cfg))

    def ema(done):
        model.ema_step(ema_decay(done, model.ema))
        return {}

    loop.run(model, opt, sched, stream, c, clip_norm=None, device=torch.device("cpu"), seed=0, after_step=ema)
    s1 = model.student.state_dict()["stack.blocks.0.mlp.fc1.weight"]
    tau = ema_decay(1, model.ema)
    expected = tau * t0 + (1 - tau) * s1
    assert torch.allclose(model.teacher.state_dict()["stack.blocks.0.mlp.fc1.weight"], expected, atol=1e-7)


# ------------------------------------------------------------------------------- a stand-in for the loop


class Toy(nn.Module):
    """Linear regression returning ``(loss, metrics)`` like Data2Vec; NaN from call ``nan_at`` on."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.calls, self.nan_at = 0, nan_at

    def forward(self, batch):
        self.calls += 1
        loss = ((self.lin(batch["inputs"]).squeeze(-1) - batch["y"]) ** 2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"loss": loss.detach(), "aux": loss.detach() * 2}


def toy_loader(epoch: int, B: int = 8, n: int = 5):
    g = torch.Generator().manual_seed(epoch)
    out = []
    for _ in range(n):
        x = torch.randn(B, 4, generator=g)
        out.append({"inputs": x, "y": x.sum(-1), "note": ["not a tensor"] * B})
    return out


def run_toy(
    model, steps=8, grad_accum=1, clip=None, split=1, on_save=None, log_every=4, ckpt=4, precision="fp32"
):
    c = PretrainConfig(
        steps=steps, batch_size=8, grad_accum=grad_accum, log_every=log_every, checkpoint_every=ckpt,
        precision=precision, optim=OptimConfig(lr=0.05, warmup=0.0),
    )  # fmt: skip
    opt = build_optimizer(model, c.optim)
    sched = build_scheduler(opt, c.optim, steps)

    def make(epoch):  # the same samples, cut into ``split`` micro-batches
        for b in toy_loader(epoch):
            for i in range(split):
                yield {k: v[i::split] for k, v in b.items()}

    stream = loop.EpochStream(make)
    cpu = torch.device("cpu")
    logs = []
    last = loop.run(model, opt, sched, stream, c, clip_norm=clip, device=cpu, seed=0,
                    on_log=lambda s, m: logs.append((s, m)), on_save=on_save)  # fmt: skip
    return last, logs


@pytest.mark.parametrize("compiled_batch", [8, None])
def test_a_short_batch_of_a_compiled_model_runs_eagerly(compiled_batch):
    """With ``compiled_batch`` a smaller batch (a loader worker's last) runs eagerly: the one compiled graph
    serves the full batches before and after it. Without, the short batch compiles a second graph, dynamic
    in the batch size, and every later batch runs on that one."""
    calls, compiled = [], []

    def backend(gm, example_inputs):  # records which compiled graph each call runs
        graph = len(compiled)
        compiled.append(graph)
        return lambda *args: (calls.append(graph), gm(*args))[1]

    class Lin(Toy):  # no call counter: dynamo would guard on its value and recompile every call
        def forward(self, batch):
            loss = ((self.lin(batch["inputs"]).squeeze(-1) - batch["y"]) ** 2).mean()
            return loss, {"loss": loss.detach()}

    torch._dynamo.reset()
    model = Lin()
    model.compile(backend=backend)
    opt = build_optimizer(model, OptimConfig(lr=0.05, warmup=0.0))
    sched = build_scheduler(opt, OptimConfig(lr=0.05, warmup=0.0), 10)
    batches = iter(
        [b if n == 8 else {k: v[:n] for k, v in b.items()} for b, n in zip(toy_loader(0), (8, 8, 5, 8))]
    )
    seen = [
        loop.train_step(model, opt, sched, batches, {}, params=list(model.parameters()), grad_accum=1,
                        clip_norm=None, device=torch.device("cpu"), amp=None, grad_norm=False,
                        compiled_batch=compiled_batch)
        for _ in range(4)
    ]  # fmt: skip
    assert seen == [8, 8, 5, 8]
    assert (compiled, calls) == (([0], [0, 0, 0]) if compiled_batch else ([0, 1], [0, 0, 1, 1]))


def test_gradient_accumulation_matches_the_full_batch():
    a, b = Toy(), Toy()
    b.load_state_dict(a.state_dict())
    run_toy(a)
    run_toy(b, grad_accum=2, split=2)
    # fp32: the two half-batch means are summed in another order than the full mean; 1e-6 is ~10 ulps here
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-6, atol=1e-6)


def test_one_host_read_per_log(monkeypatch):
    """Outside torch itself nothing reads a tensor on the host in the step; each log does one ``tolist()``.

    (torch's CPU AdamW reads its CPU step counters with ``item()``: not a device sync, and fused AdamW on
    CUDA keeps them on the device; so calls made from inside the torch package are not counted.)
    """
    torch_dir = str(Path(torch.__file__).parent)
    counts = {"tolist": 0, "item": 0, "__bool__": 0, "__float__": 0, "__int__": 0}
    for name in counts:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            if not sys._getframe(1).f_code.co_filename.startswith(torch_dir):
                counts[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    last, logs = run_toy(Toy(), steps=12, clip=1.0)
    monkeypatch.undo()
    assert [s for s, _ in logs] == [4, 8, 12]
    assert counts == {"tolist": 3, "item": 0, "__bool__": 0, "__float__": 0, "__int__": 0}
    assert set(last) == {"loss", "aux", "grad_norm", "lr"}
    assert last["aux"] == pytest.approx(2 * last["loss"])  # means over the steps since the last log


def test_non_finite_loss_halts_before_the_next_checkpoint():
    saved = []
    with pytest.raises(loop.TrainingHalted, match="non-finite.*lower learning rate"):
        run_toy(Toy(nan_at=6), steps=12, on_save=saved.append)
    assert saved == [4]  # the NaN of step 6 is caught at the step-8 log, before step 8 is saved


def test_bf16_setting_is_fp32_on_a_cpu_without_bf16_hardware(monkeypatch):
    monkeypatch.setattr(prec, "cpu_bf16", lambda: False)
    a, b = Toy(), Toy()
    b.load_state_dict(a.state_dict())
    run_toy(a, precision="fp32")
    run_toy(b, precision="bf16")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_bf16_on_cpu_keeps_the_fp32_loss_curve_and_the_fp32_state(tmp_path, modality, monkeypatch):
    """bf16 autocast where the CPU has bf16 hardware (forced here, so it runs on any CPU): the loss of every
    one of 8 steps within 3% of fp32's (measured: at most 1.2% on the tiny presets over 20 steps, 0.2% on
    the small ones), weights and teacher still fp32, and a second bf16 run gives the same losses."""
    monkeypatch.setattr(prec, "cpu_bf16", lambda: True)
    assert loop.autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    curves = {}
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16 again", "bf16")):
        cfg, model = tiny(modality)
        c = PretrainConfig(steps=8, batch_size=4, log_every=1, checkpoint_every=8, guard_after=10**9,
                           precision=precision, optim=OptimConfig(lr=1e-3, warmup=0.25))  # fmt: skip
        history = pretrain(model, c, loader_factory(modality, cfg), tmp_path / name, {"modality": modality})
        curves[name] = [r["loss"] for r in history]
        assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    assert curves["bf16"] == pytest.approx(curves["fp32"], rel=0.03)
    assert curves["bf16"] != curves["fp32"]  # autocast did run
    assert curves["bf16 again"] == curves["bf16"]


def test_bf16_on_cpu_keeps_the_fp32_finetune_curve(tmp_path, monkeypatch):
    """Fine-tuning runs the same loop: 6 steps of an image classifier, each loss within 3% of fp32's."""
    from d2v.finetune import FinetuneConfig, finetune
    from d2v.load import build_finetune_model

    monkeypatch.setattr(prec, "cpu_bf16", lambda: True)
    mod = get("image")
    cfg = mod.model_config({"preset": "tiny"})

    def make_loader(epoch):
        g = torch.Generator().manual_seed(epoch)
        return [{"inputs": torch.randn(4, 3, 28, 28, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
                for _ in range(3)]  # fmt: skip

    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_finetune_model("image", mod.build_encoder(cfg), "classification", 3, None)
        c = FinetuneConfig(steps=6, batch_size=4, log_every=1, checkpoint_every=6, precision=precision,
                           optim=OptimConfig(lr=1e-3))  # fmt: skip
        history = finetune(model, c, make_loader, tmp_path / precision, {"modality": "image"})
        curves[precision] = [r["loss"] for r in history]
    assert curves["bf16"] == pytest.approx(curves["fp32"], rel=0.03)


def test_collapse_guard_names_the_problem_and_the_checkpoint(tmp_path):
    cfg, model = tiny("image")
    c = PretrainConfig(
        steps=6, batch_size=4, log_every=2, checkpoint_every=2, guard_after=3, min_pred_var=100.0
    )
    with pytest.raises(loop.TrainingHalted) as e:
        pretrain(model, c, loader_factory("image", cfg), tmp_path, {"modality": "image"})
    msg = str(e.value)
    assert "collapse at step 4: pred_var" in msg and "lower learning rate" in msg and "tau" in msg
    assert f"last good checkpoint is {tmp_path / 'step-00000002'}" in msg  # step 4 was never written
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000002"]


def test_collapse_check_thresholds():
    c = PretrainConfig(guard_after=100, min_target_var=0.1, min_pred_var=0.01)
    ok = {"target_var": 0.5, "pred_var": 0.5}
    assert collapse_check(50, {"target_var": 0.0, "pred_var": 0.0}, c) is None  # still warming up
    assert collapse_check(100, ok, c) is None
    assert "target_var" in collapse_check(100, {**ok, "target_var": 0.09}, c)
    assert "pred_var" in collapse_check(100, {**ok, "pred_var": 0.009}, c)


# ------------------------------------------------------------------------------------------ data position


def test_epoch_stream_position_restores_the_sequence():
    def make(epoch):
        return [epoch * 10 + i for i in range(3)]

    s = loop.EpochStream(make)
    first = [next(s) for _ in range(5)]
    assert first == [0, 1, 2, 10, 11] and s.position() == {"epoch": 1, "index": 2}
    rest = [next(s) for _ in range(4)]
    again = loop.EpochStream(make, epoch=1, index=2)
    assert [next(again) for _ in range(4)] == rest == [12, 20, 21, 22]
    with pytest.raises(ValueError, match="yields no batches"):
        next(loop.EpochStream(lambda epoch: []))


# ----------------------------------------------------------------------------------------------- finetune


def test_finetune_freezes_then_trains_the_encoder_and_checkpoints_the_task_model(tmp_path):
    from d2v.finetune import FinetuneConfig, finetune
    from d2v.load import build_finetune_model

    mod = get("image")
    cfg = mod.model_config({"preset": "tiny"})
    torch.manual_seed(0)
    model = build_finetune_model("image", mod.build_encoder(cfg), "classification", 3, None)
    enc0 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head0 = model.classifier.weight.clone()

    def make_loader(epoch):
        g = torch.Generator().manual_seed(epoch)
        x = [torch.randn(4, 3, 28, 28, generator=g) for _ in range(3)]
        return [{"inputs": xi, "labels": torch.randint(0, 3, (4,), generator=g)} for xi in x]

    c = FinetuneConfig(steps=2, batch_size=4, log_every=1, checkpoint_every=2, freeze_encoder_steps=2,
                       optim=OptimConfig(lr=1e-2, layer_decay=0.65))  # fmt: skip
    meta = {
        "modality": "image", "kind": "finetune", "model_config": to_dict(model.encoder.config),
        "encoder_prefix": "encoder.", "task": "classification", "num_classes": 3, "head": None,
    }  # fmt: skip
    history = finetune(model, c, make_loader, tmp_path, meta)
    assert [r["step"] for r in history] == [1, 2] and {"loss", "accuracy", "lr"} <= set(history[0])
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in enc0.items())  # frozen 2 steps
    assert not torch.equal(head0, model.classifier.weight)
    c2 = FinetuneConfig(steps=4, batch_size=4, log_every=1, checkpoint_every=2, freeze_encoder_steps=2,
                        optim=OptimConfig(lr=1e-2, layer_decay=0.65))  # fmt: skip
    finetune(model, c2, make_loader, tmp_path, meta)  # resumes at step 2 of 4, encoder now trains
    assert not torch.equal(
        enc0["stack.blocks.0.attn.qkv.weight"], model.encoder.stack.blocks[0].attn.qkv.weight
    )

    again, meta_back = load_finetune_model(tmp_path)
    assert meta_back["step"] == 4 and not again.training
    x = {"inputs": torch.randn(2, 3, 28, 28)}
    model.eval()
    assert torch.equal(again.predict(x), model.predict(x))
    torch.testing.assert_close(again.logits(x), model.logits(x), rtol=0, atol=0)


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_head_init_probe_puts_the_fitted_regression_into_the_output_layer(modality):
    from d2v.finetune import fit_output_layer
    from d2v.load import build_finetune_model
    from d2v.metrics import fit_logistic

    mod = get(modality)
    torch.manual_seed(0)
    model = build_finetune_model(modality, mod.build_encoder(mod.model_config({"preset": "tiny"})),
                                 "classification", 3, None)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    if modality == "audio":
        x = [torch.randn(4, 3200, generator=g) for _ in range(3)]
    elif modality == "image":
        x = [torch.randn(4, 3, 28, 28, generator=g) for _ in range(3)]
    else:
        x = [torch.cat([torch.zeros(4, 1, dtype=torch.long), torch.randint(5, 200, (4, 8), generator=g)], 1)
             for _ in range(3)]  # fmt: skip
    batches = [{"inputs": xi, "labels": torch.randint(0, 3, (4,), generator=g)} for xi in x]
    enc0 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    model.train()
    acc = fit_output_layer(model, batches, l2=1e-2, max_items=8)  # the first two batches only
    assert model.training and all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in enc0.items())
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(b) for b in batches[:2]])
        labels = torch.cat([b["labels"] for b in batches[:2]])
        W, b = fit_logistic(feats, labels, 3, l2=1e-2)
        torch.testing.assert_close(model.output.weight.double(), W.T, rtol=1e-5, atol=1e-6)
        pred = torch.cat([model.logits(b) for b in batches[:2]]).argmax(-1)
    assert acc == pytest.approx((pred == labels).double().mean().item())
    assert acc > 0.5  # 8 items, 3 classes, a wider feature space: the fit beats chance on its own items


def test_head_init_on_train_mode_features_keeps_the_first_train_mode_logits_sane():
    """Items whose pooled features barely differ (one text repeated but for a token): standardising each feature
    scales the eval-mode fit up until dropout alone swings the train-mode logits; fitted on train-mode
    features (``head_init_features: train``, dropout drawn), the layer is the regression on exactly those
    draws and the first train-mode logits stay small."""
    import torch.nn.functional as F

    from d2v.finetune import TRAIN_MODE_DRAWS, fit_output_layer
    from d2v.load import build_finetune_model
    from d2v.metrics import fit_logistic

    mod = get("text")
    torch.manual_seed(0)
    model = build_finetune_model("text", mod.build_encoder(mod.model_config({"preset": "tiny"})),
                                 "classification", 2, None)  # fmt: skip
    base = torch.randint(5, 200, (1, 48), generator=torch.Generator().manual_seed(0))
    x = torch.cat([torch.zeros(8, 1, dtype=torch.long), base.repeat(8, 1)], 1)
    x[:, -1] = torch.arange(8) + 5  # the items differ in their last token only
    batches = [{"inputs": x, "labels": torch.arange(8) % 2}]

    def first_train_mode_loss() -> float:
        model.train()
        torch.manual_seed(1)
        with torch.no_grad():
            return F.cross_entropy(model.logits(batches[0]), batches[0]["labels"]).item()

    fit_output_layer(model, batches, l2=1e-2, max_items=8, features="eval")
    eval_fit = first_train_mode_loss()
    torch.manual_seed(0)
    fit_output_layer(model, batches, l2=1e-2, max_items=8, features="train")
    train_fit = first_train_mode_loss()
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        draws = [model.features(batches[0]) for _ in range(TRAIN_MODE_DRAWS)]
        W, _ = fit_logistic(torch.cat(draws), batches[0]["labels"].repeat(TRAIN_MODE_DRAWS), 2, l2=1e-2)
    torch.testing.assert_close(model.output.weight.double(), W.T, rtol=1e-5, atol=1e-6)
    assert eval_fit > 100 * train_fit  # 9,525 against 4.4 when written (chance: ln 2 = 0.69)


def test_head_init_probe_fits_once_and_a_resumed_run_keeps_its_checkpointed_head(tmp_path, monkeypatch):
    from d2v import finetune as ft
    from d2v.load import build_finetune_model

    mod = get("image")
    torch.manual_seed(0)
    model = build_finetune_model("image", mod.build_encoder(mod.model_config({"preset": "tiny"})),
                                 "classification", 3, None)  # fmt: skip

    def make_loader(epoch):
        g = torch.Generator().manual_seed(epoch)
        return [{"inputs": torch.randn(4, 3, 28, 28, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
                for _ in range(2)]  # fmt: skip

    fits = []
    real = ft.fit_output_layer
    monkeypatch.setattr(ft, "fit_output_layer", lambda *a, **k: fits.append(1) or real(*a, **k))
    meta = {"modality": "image", "kind": "finetune", "model_config": to_dict(model.encoder.config),
            "encoder_prefix": "encoder.", "task": "classification", "num_classes": 3, "head": None}  # fmt: skip
    kw = {"batch_size": 4, "log_every": 1, "checkpoint_every": 2, "head_init": "probe"}
    ft.finetune(model, ft.FinetuneConfig(steps=2, **kw), make_loader, tmp_path, meta,
                head_items=lambda: make_loader(0))  # fmt: skip
    assert fits == [1]
    head = model.output.weight.clone()
    ft.finetune(model, ft.FinetuneConfig(steps=4, **kw), make_loader, tmp_path, meta,
                head_items=lambda: make_loader(0))  # fmt: skip
    assert fits == [1]  # resumed at step 2: the checkpoint's head, no second fit
    assert not torch.equal(head, model.output.weight)  # and training went on from it
    with pytest.raises(ConfigError, match="head_init: probe fits a classifier"):
        ft.FinetuneConfig(task="ctc", head_init="probe")


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tmp_path):
    """``compile: true`` (~30 s of inductor compilation on CPU) keeps state-dict names and the numbers."""
    runs = {}
    for flag in (False, True):
        cfg, model = tiny("image")
        c = PretrainConfig(
            steps=2, batch_size=4, log_every=1, checkpoint_every=2, guard_after=10**9, compile=flag
        )
        runs[flag] = pretrain(model, c, loader_factory("image", cfg), tmp_path / str(flag), {})
    a, b = (checkpoint.load_weights(tmp_path / str(f)) for f in (False, True))
    assert a.keys() == b.keys()
    # inductor fuses and reorders fp32 arithmetic: agreement to ~1e-5 relative, not bitwise
    assert [r["loss"] for r in runs[True]] == pytest.approx([r["loss"] for r in runs[False]], rel=1e-4)


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("pretrain", {"batch_size": 0}, "pretrain.image.batch_size must be >= 1, got 0"),
        (
            "finetune",
            {"batch_size": 8, "grad_accum": 3},
            "finetune.text.batch_size must be a multiple of grad_accum (3), got 8",
        ),
        ("finetune", {"freeze_encoder_steps": -1}, "finetune.text.freeze_encoder_steps must be >= 0, got -1"),
    ],
)
def test_loop_config_errors_name_the_modality(name, data, message):
    from d2v.config import ConfigError, section
    from d2v.finetune import FinetuneConfig

    cls = PretrainConfig if name == "pretrain" else FinetuneConfig
    modality = "image" if name == "pretrain" else "text"
    with pytest.raises(ConfigError) as e:
        section({name: {modality: data}}, name, cls, modality)
    assert str(e.value) == message
