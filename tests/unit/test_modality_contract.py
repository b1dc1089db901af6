"""The modality contract (``d2v.modalities.contract``, ``d2v.modalities.base.Encoder``), checked once for
every modality on the ``tiny`` preset.

Batches are made the way the loader makes them (``transform`` then ``collate`` of the modality's
``data.py``) from decoded samples; :func:`decoded_samples` is the only modality-specific code here.
What differs per modality (conv lengths, masking geometry, CLS, input-check messages, the paper recipes)
stays in ``test_<m>_model.py``; parity with transformers in ``test_hf_<m>.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

from d2v.config import ConfigError, to_dict
from d2v.data.shards import ShardCommon
from d2v.data.stages import PrepareCommon, data_module
from d2v.data2vec import Data2Vec
from d2v.heads import HeadConfig as BaseHeadConfig
from d2v.modalities import MODALITIES, get
from d2v.modalities.base import Encoder
from d2v.modalities.contract import ModalityData, ModalityModel

each_modality = pytest.mark.parametrize("m", MODALITIES)


@functools.cache
def tiny(m: str) -> Any:
    return get(m).model_config({"preset": "tiny"})


def decoded_samples(m: str, cfg: Any) -> tuple[list[Tensor], dict[str, Any]]:
    """Samples as the modality's ``decode`` returns them, and a manifest ``prep`` that fits ``cfg``. Rows
    differ in length where the modality pads, and the longest is not padded."""
    g = torch.Generator().manual_seed(0)
    if m == "audio":  # float32 waveforms [N] at 16 kHz, 31 and 24 frames (two short rows: convs are costly)
        return [torch.randn(n, generator=g) * 0.1 for n in (10_240, 8_000)], {"sample_rate": 16_000}
    if m == "image":  # uint8 [C, H, W], grey (the data code repeats it to 3 channels)
        images = [torch.randint(0, 256, (1, 28, 28), generator=g, dtype=torch.uint8) for _ in range(4)]
        return images, {"image_size": 28, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert m == "text"  # int64 ids <s> ... </s>
    rows = []
    for n in (32, 20, 9, 32):
        ids = torch.randint(cfg.num_special, cfg.vocab_size, (n,), generator=g)
        ids[0], ids[-1] = cfg.bos_id, cfg.eos_id
        rows.append(ids)
    return rows, {"vocab_size": cfg.vocab_size}


def make_batch(m: str, mode: str = "pretrain", seed: int = 0, generator: torch.Generator | None = None):
    """A batch of the tiny config as the loader builds it: ``transform`` (no crop, no augmentation), then
    ``collate`` with ``generator`` (default: a fresh one seeded with ``seed``, cached: tests only read it)."""
    if generator is None:
        return _seeded_batch(m, mode, seed)
    return _collate(m, mode, seed, generator)


@functools.cache
def _seeded_batch(m: str, mode: str, seed: int) -> dict[str, Tensor]:
    return _collate(m, mode, seed, torch.Generator().manual_seed(seed))


def _collate(m: str, mode: str, seed: int, gen: torch.Generator) -> dict[str, Tensor]:
    data, cfg = data_module(m), tiny(m)
    xs, prep = decoded_samples(m, cfg)
    rng = random.Random(seed)
    kw = {"max_len": None, "augment": False, "prep": prep, "model_cfg": cfg}
    xs = [data.transform(x, mode=mode, rng=rng, **kw) for x in xs]
    return data.collate(xs, mode=mode, model_cfg=cfg, prep=prep, generator=gen)


def fresh_encoder(m: str) -> Encoder:
    torch.manual_seed(0)
    return get(m).build_encoder(tiny(m))


@functools.cache
def eval_run(m: str) -> SimpleNamespace:
    """One tiny encoder (eval mode) on the eval batch, computed once for the tests that only read it:
    ``local_features``, then ``contextualize`` with each tap (``Encoder.features`` is the two in a row)."""
    enc = fresh_encoder(m).eval()
    batch = make_batch(m, mode="eval")
    inputs, pad = batch["inputs"], batch.get("padding_mask")
    with torch.no_grad():
        x, pad_BT = enc.local_features(inputs, pad)
        out = {tap: enc.contextualize(x, pad_BT, tap=tap) for tap in ("ffn", "block")}
    return SimpleNamespace(enc=enc, inputs=inputs, pad=pad, x=x, pad_BT=pad_BT, out=out)


def flat(tensors: dict[str, Tensor], names: list[str] | None = None) -> Tensor:
    """The tensors (all, or those named) as one fp32 vector: one comparison instead of one per tensor."""
    vs = [tensors[n] for n in names] if names is not None else list(tensors.values())
    return torch.cat([v.detach().float().flatten() for v in vs]) if vs else torch.zeros(0)


def perturb_(module: torch.nn.Module, scale: float) -> None:
    """Move every parameter off its init (zero biases, zero tables), so a dropped or swapped tensor shows."""
    params = list(module.parameters())
    noise = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1))
    chunks = noise.split([p.numel() for p in params])
    with torch.no_grad():
        torch._foreach_add_(params, [c.view_as(p) for c, p in zip(chunks, params)], alpha=scale)


# ---------------------------------------------------------------------------------------------- members


def protocol_members(proto: type) -> tuple[list[str], dict[str, inspect.Signature]]:
    """``(attribute names, method signatures without self)`` declared by a Protocol class."""
    methods = {
        name: inspect.signature(f)
        for name, f in vars(proto).items()
        if inspect.isfunction(f) and not name.startswith("_")
    }
    methods = {n: s.replace(parameters=list(s.parameters.values())[1:]) for n, s in methods.items()}
    return list(proto.__annotations__), methods


def incompatibilities(want: inspect.Signature, got: inspect.Signature) -> list[str]:
    """Why a function with signature ``got`` cannot be called as ``want`` says (empty: it can).

    Positional parameters match by position, and by name too unless ``want`` makes them positional-only;
    keyword-only ones by name; a parameter with a default in ``want`` needs one in ``got`` (callers may
    leave it out); every extra parameter of ``got`` needs a default.
    """
    P = inspect.Parameter
    out, used = [], set()
    positional = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
    got_pos = [q for q in got.parameters.values() if q.kind in positional]
    for i, p in enumerate(q for q in want.parameters.values() if q.kind in positional):
        if i >= len(got_pos):
            out.append(f"no positional parameter {i} ({p.name})")
            continue
        q = got_pos[i]
        used.add(q.name)
        if p.kind is P.POSITIONAL_OR_KEYWORD and (q.name != p.name or q.kind is P.POSITIONAL_ONLY):
            out.append(f"positional parameter {i} is {q.name!r}, expected {p.name!r}")
        if p.default is not P.empty and q.default is P.empty:
            out.append(f"{q.name!r} needs a default")
    for p in (q for q in want.parameters.values() if q.kind is P.KEYWORD_ONLY):
        q = got.parameters.get(p.name)
        if q is None or q.kind not in (P.KEYWORD_ONLY, P.POSITIONAL_OR_KEYWORD):
            out.append(f"no keyword parameter {p.name!r}")
            continue
        used.add(q.name)
        if p.default is not P.empty and q.default is P.empty:
            out.append(f"{q.name!r} needs a default")
    for q in got.parameters.values():
        if q.name not in used and q.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD) and q.default is P.empty:
            out.append(f"extra parameter {q.name!r} without a default")
    return out


@each_modality
@pytest.mark.parametrize("side", ["package", "data"])
def test_every_protocol_member_is_there_and_callable_as_declared(m, side):
    module, proto = (get(m), ModalityModel) if side == "package" else (data_module(m), ModalityData)
    attrs, methods = protocol_members(proto)
    assert attrs and methods
    missing = [n for n in [*attrs, *methods] if not hasattr(module, n)]
    assert not missing, f"{module.__name__} lacks {missing}"
    for name, want in methods.items():
        f = getattr(module, name)
        assert callable(f), name
        problems = incompatibilities(want, inspect.signature(f))
        assert not problems, f"{module.__name__}.{name}{inspect.signature(f)}: {problems}"


def test_signature_check_catches_mismatches():
    """The checker itself: renamed, missing, reordered and extra required parameters are reported."""

    def want(a, b=1, /, c=2, *, d): ...

    assert not incompatibilities(inspect.signature(want), inspect.signature(lambda x, y=0, c=2, *, d, e=3: 0))
    for bad in (lambda x, c, *, d: 0, lambda x, y=0, k=2, *, d: 0, lambda x, y=0, c=2: 0,
                lambda x, y=0, c=2, *, d, e: 0, lambda x, y, c=2, *, d: 0):  # fmt: skip
        assert incompatibilities(inspect.signature(want), inspect.signature(bad)), inspect.signature(bad)


@each_modality
def test_member_kinds(m):
    mod, data = get(m), data_module(m)
    cfg = tiny(m)
    assert dataclasses.is_dataclass(mod.ModelConfig) and isinstance(cfg, mod.ModelConfig)
    assert mod.ModelConfig.__dataclass_params__.frozen
    assert issubclass(mod.HeadConfig, BaseHeadConfig)
    assert mod.FinetuneMask is None or mod.FinetuneMask.__dataclass_params__.frozen
    # FINETUNE_MASK (read by the loader with getattr), the package's FinetuneMask and collate agree
    takes_mask = "finetune_mask" in inspect.signature(data.collate).parameters
    assert bool(getattr(data, "FINETUNE_MASK", False)) == (mod.FinetuneMask is not None) == takes_mask
    for cls, base in ((data.PrepareConfig, PrepareCommon), (data.ShardConfig, ShardCommon)):
        assert issubclass(cls, base) and cls.__dataclass_params__.frozen
        assert cls() == cls()  # every field has a default: an empty params section is valid
    others = [get(o).HF_MODEL_TYPE for o in MODALITIES if o != m]
    assert isinstance(mod.HF_MODEL_TYPE, str) and mod.HF_MODEL_TYPE not in others


# ------------------------------------------------------------------------------------------------ config


@each_modality
def test_model_config_presets_merge_and_round_trip(m):
    mod = get(m)
    assert mod.model_config({}) == mod.model_config(None) == mod.ModelConfig()
    assert mod.ModelConfig().preset == "small"
    t = tiny(m)
    assert t.preset == "tiny" and t.transformer.dim < mod.ModelConfig().transformer.dim
    deep = mod.model_config({"preset": "tiny", "transformer": {"depth": 3}, "targets": {"top_k": 1}})
    # deep merge: the user's keys win, every other value stays the preset's
    assert deep.transformer == dataclasses.replace(t.transformer, depth=3)
    assert deep.targets == dataclasses.replace(t.targets, top_k=1)
    assert dataclasses.replace(deep, transformer=t.transformer, targets=t.targets) == t
    # checkpoints store to_dict(cfg) and rebuild with model_config
    for cfg in (t, deep, mod.ModelConfig()):
        assert mod.model_config(json.loads(json.dumps(to_dict(cfg))), "meta.json") == cfg


BAD_PARAMS = [
    ({"preset": "huge"}, r"model\.x\.preset"),
    ({"colour": 1}, r"model\.x: unknown key"),
    ({"transformer": {"width": 16}}, r"model\.x\.transformer: unknown key"),
    ({"targets": {"top_k": 3}}, "top_k"),  # above the tiny depth 2
]


@each_modality
def test_model_config_rejects_bad_params_naming_the_key(m):
    for override, words in BAD_PARAMS:
        with pytest.raises(ConfigError, match=words):
            get(m).model_config({"preset": "tiny", **override}, "model.x")


# ------------------------------------------------------------------------------------------------ encoder


@each_modality
def test_encoder_declares_what_the_shared_code_reads(m):
    cfg, enc = tiny(m), eval_run(m).enc
    assert isinstance(enc, Encoder) and enc.modality == m
    assert enc.config == cfg and enc.transformer == cfg.transformer
    assert isinstance(enc.num_prefix_tokens, int) and enc.num_prefix_tokens >= 0
    names = [n for n, _ in enc.named_parameters()]
    for prefixes in (enc.local_modules, enc.shared_with_teacher):
        for p in prefixes:  # each prefix names real parameters (a typo would silently average them)
            assert any(n.startswith(p) for n in names), (p, names)
    assert enc.local_modules, "the local encoder is named (the teacher reuses or averages it)"
    blocks = {int(n.split("blocks.")[1].split(".")[0]) for n in names if ".blocks." in f".{n}"}
    assert blocks == set(range(cfg.transformer.depth))  # d2v.heads.layer_id finds blocks by name


@each_modality
def test_local_features_then_contextualize_shapes(m):
    r = eval_run(m)
    # Encoder.features (check_inputs, local_features, contextualize) is the base class's, never replaced
    assert type(r.enc).features is Encoder.features
    B, P, D = len(r.inputs), r.enc.num_prefix_tokens, tiny(m).transformer.dim
    T = r.x.shape[1]
    h, h_pad = r.out["ffn"].x_BTD, r.out["ffn"].padding_BT
    assert r.x.shape == (B, T, D) and h.shape == (B, P + T, D)
    pre = make_batch(m)  # pretraining batches may be shaped otherwise (speech crops to the shortest clip)
    with torch.no_grad():
        x_pre, _ = r.enc.local_features(pre["inputs"], pre.get("padding_mask"))
    assert pre["mask"].shape == x_pre.shape[:2]  # masks are at the rate of the local features
    if r.pad is None:
        assert r.pad_BT is None and h_pad is None
    else:
        assert r.pad_BT.shape == (B, T) and r.pad_BT.dtype == torch.bool
        assert h_pad.shape == (B, P + T) and torch.equal(h_pad[:, P:], r.pad_BT)


@each_modality
def test_taps_give_one_layer_per_block(m):
    out = eval_run(m).out
    for tap in ("ffn", "block"):
        assert len(out[tap].layers) == tiny(m).transformer.depth
        assert all(a.shape == out[tap].x_BTD.shape for a in out[tap].layers)
    assert torch.equal(out["ffn"].x_BTD, out["block"].x_BTD)  # the tap changes nothing else
    # the FFN output before the last residual is not the block's output
    assert not torch.equal(out["ffn"].layers[-1], out["block"].layers[-1])


@each_modality
def test_padding_never_reaches_the_local_features(m):
    """At its valid tokens a padded row has the local features of the same row alone (fp32: 1e-5); the
    whole encoder keeps it too (``test_an_items_frozen_features_do_not_depend_on_its_batch``)."""
    r = eval_run(m)
    if r.pad is None:
        pytest.skip(f"{m} batches have no padding")
    assert r.pad.shape == r.inputs.shape
    padded = [i for i in range(len(r.inputs)) if r.pad[i].any()]
    assert padded
    with torch.no_grad():
        for i in padded:
            n = int((~r.pad[i]).sum())
            alone, none = r.enc.local_features(r.inputs[i : i + 1, :n], None)
            t = alone.shape[1]
            assert none is None and not r.pad_BT[i, :t].any() and r.pad_BT[i, t:].all()
            torch.testing.assert_close(r.x[i, :t], alone[0], atol=1e-5, rtol=1e-5)


@each_modality
def test_an_items_frozen_features_do_not_depend_on_its_batch(m):
    """``features``, ``embed_pooled`` and the probe's ``pooled_layer_features`` give a padded row the
    features of the row alone (fp32: 1e-5): padding never leaks into valid tokens (speech: not through the
    stacked positional convs either). The probe's last layer is what ``embed`` gives, for both pools."""
    from d2v.metrics import pooled_layer_features

    r = eval_run(m)
    if r.pad is None:
        pytest.skip(f"{m} batches have no padding")
    lengths = (~r.pad).sum(1).tolist()
    alone = torch.cat([r.enc.embed_pooled(r.inputs[i : i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(r.enc.embed_pooled(r.inputs, r.pad), alone, atol=1e-5, rtol=1e-5)
    batch = {
        "inputs": r.inputs,
        "padding_mask": r.pad,
        "labels": torch.zeros(len(r.inputs), dtype=torch.long),
    }
    one_by_one = [
        {"inputs": r.inputs[i : i + 1, :n], "labels": batch["labels"][:1]} for i, n in enumerate(lengths)
    ]
    cpu = torch.device("cpu")
    pools = ("mean", "first")
    batched = pooled_layer_features(r.enc, [batch], cpu, pools)[0]
    single = pooled_layer_features(r.enc, one_by_one, cpu, pools)[0]
    for p in pools:
        torch.testing.assert_close(batched[p], single[p], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[p][-1], r.enc.embed_pooled(r.inputs, r.pad, pool=p), atol=1e-5, rtol=1e-5)
    h, pad = r.enc.features(r.inputs, r.pad)
    keep = (~pad[:, r.enc.num_prefix_tokens :]).float()[..., None]
    pooled = (h[:, r.enc.num_prefix_tokens :] * keep).sum(1) / keep.sum(1)
    torch.testing.assert_close(pooled, alone, atol=1e-5, rtol=1e-5)


@each_modality
def test_check_inputs_rejects_the_wrong_rank_and_dtype(m):
    r = eval_run(m)
    r.enc.check_inputs(r.inputs, r.pad)
    with pytest.raises(ValueError):
        r.enc.check_inputs(r.inputs[None], None)
    other = r.inputs.long() if r.inputs.is_floating_point() else r.inputs.float()
    with pytest.raises(ValueError):
        r.enc.check_inputs(other, r.pad)


# ------------------------------------------------------------------------------------------------ masking


@each_modality
def test_pretrain_masks_come_from_the_generator_only(m):
    """The same generator state gives the same batch, the next draw another mask; masks stay off padding.

    The masked share of the valid tokens ranged over 2,000 generator seeds 0.36-0.73 (audio), 0.61-0.63
    (image), 0.14-0.39 (text), so [0.05, 0.8] fails only for a broken mask (the exact fractions are tested
    per modality)."""
    a, g = make_batch(m), torch.Generator().manual_seed(0)
    b = make_batch(m, generator=g)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the generator advanced (the same masks twice: odds negligible, < 1e-6 for every modality here)
    assert not torch.equal(make_batch(m, generator=g)["mask"], a["mask"])
    r = eval_run(m)
    assert "mask" not in make_batch(m, mode="eval")
    mask = a["mask"]
    with torch.no_grad():  # the pretraining batch's own padding (speech crops it away)
        _, pad_BT = r.enc.local_features(a["inputs"], a.get("padding_mask"))
    valid = torch.ones_like(mask) if pad_BT is None else ~pad_BT
    assert mask.dtype == torch.bool and mask.shape == valid.shape and not (mask & ~valid).any()
    assert 0.05 <= mask.sum().item() / valid.sum().item() <= 0.8


@each_modality
def test_eval_transform_draws_nothing_and_lengths_are_sizes(m):
    data, cfg = data_module(m), tiny(m)
    xs, prep = decoded_samples(m, cfg)
    data.check_model(prep, cfg)
    rng = random.Random(0)
    state = rng.getstate()
    kw = {"max_len": None, "augment": False, "prep": prep, "model_cfg": cfg}
    out = [data.transform(x, mode="eval", rng=rng, **kw) for x in xs]
    assert rng.getstate() == state
    lengths = [data.length(x) for x in out]
    assert all(isinstance(n, int) and n > 0 for n in lengths)
    assert lengths == [data.length(x) for x in xs]  # nothing to crop: the sizes are kept


# ---------------------------------------------------------------------------------------------- pretrain


@each_modality
def test_pretrain_step_loss_metrics_and_gradients(m):
    torch.manual_seed(0)
    model = get(m).build_pretrain_model(tiny(m)).train()
    assert isinstance(model, Data2Vec) and not model.teacher.training
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    assert student.keys() == teacher.keys() and torch.equal(flat(student), flat(teacher))
    # the global RNG is the only source, the student drawn first: build_encoder's weights from that seed
    assert torch.equal(flat(student), flat(eval_run(m).enc.state_dict()))

    loss, metrics = model(make_batch(m))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert set(metrics) >= {"loss", "target_var", "pred_var", "masked_frac"}
    assert all(v.ndim == 0 and not v.requires_grad and torch.isfinite(v) for v in metrics.values())
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    # every student and head tensor learns (the local encoder, the mask embedding, the blocks ...)
    learners = [*model.student.named_parameters(), *model.head.named_parameters()]
    assert not [n for n, p in learners if p.grad is None]
    norms = torch.stack(torch._foreach_norm([p.grad for _, p in learners]))
    assert not [n for (n, _), g in zip(learners, norms.tolist()) if not 0 < g < float("inf")]


@each_modality
def test_ema_step_averages_copies_or_skips_each_teacher_tensor(m):
    """``tau * teacher + (1 - tau) * student`` except: ``shared_with_teacher`` copied, the local encoder
    left alone when the teacher reuses the student's local features (lerp vs the formula: 1e-6)."""
    torch.manual_seed(0)
    model = get(m).build_pretrain_model(tiny(m))
    enc = model.student
    with torch.no_grad():
        torch._foreach_add_(list(enc.parameters()), 1.0)  # the student moved away from the teacher
    before = {k: v.clone() for k, v in model.teacher.named_parameters()}
    student = dict(enc.named_parameters())
    names = list(before)
    copied = [n for n in names if n.startswith(enc.shared_with_teacher)]
    kept = [n for n in names if n not in copied and n.startswith(enc.local_modules)]
    kept = [] if model.targets.ema_local_encoder else kept
    averaged = [n for n in names if n not in copied and n not in kept]
    assert any(".blocks." in f".{n}" for n in averaged)
    tau = 0.9
    model.ema_step(tau)
    after = dict(model.teacher.named_parameters())
    assert torch.equal(flat(after, copied), flat(student, copied))
    assert torch.equal(flat(after, kept), flat(before, kept))
    expected = tau * flat(before, averaged) + (1 - tau) * flat(student, averaged)
    assert torch.allclose(flat(after, averaged), expected, rtol=0, atol=1e-6)
    assert torch.equal(flat(dict(model.teacher.named_buffers())), flat(dict(enc.named_buffers())))


# ------------------------------------------------------------------------------------------ interchange


@each_modality
def test_hf_round_trip_rebuilds_the_same_encoder(m):
    """to_hf -> JSON -> config_from_hf + state_dict_from_hf: a strict load, the same HF export bit for bit,
    and the same features (1e-5: a tensor HF has no slot for, vision's key bias, is dropped, which changes
    the softmax by rounding only)."""
    mod = get(m)
    enc = fresh_encoder(m).eval()
    perturb_(enc, scale=0.05)
    hf_cfg, sd = mod.to_hf(enc)
    hf_cfg = json.loads(json.dumps(hf_cfg))
    assert hf_cfg["model_type"] == mod.HF_MODEL_TYPE
    cfg = mod.config_from_hf(hf_cfg)
    fields = ("dim", "depth", "heads", "ffn_dim", "layer_norm_first", "activation", "norm_eps")
    assert [getattr(cfg.transformer, f) for f in fields] == [getattr(enc.transformer, f) for f in fields]
    back = mod.build_encoder(cfg).eval()
    back.load_state_dict(mod.state_dict_from_hf(sd, cfg), strict=True)
    hf_cfg2, sd2 = mod.to_hf(back)
    assert hf_cfg2 == hf_cfg and sd2.keys() == sd.keys() and torch.equal(flat(sd2, list(sd)), flat(sd))
    r = eval_run(m)  # its last row (padded where the modality pads) is enough for an identity check
    inputs, pad = r.inputs[-1:], None if r.pad is None else r.pad[-1:]
    with torch.no_grad():
        ours, theirs = enc.features(inputs, pad)[0], back.features(inputs, pad)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
