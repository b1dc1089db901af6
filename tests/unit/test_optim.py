"""AdamW parameter groups (no decay on norms/biases/tokens, layer decay) and the LR schedules."""

from __future__ import annotations

import math

import pytest
import torch

from d2v.config import ConfigError, from_dict
from d2v.heads import FinetuneModel
from d2v.modalities import get
from d2v.modalities.image.heads import build_finetune_model
from d2v.optim import OptimConfig, build_optimizer, build_scheduler, lr_scale, param_groups


def tiny_pretrain(modality: str):
    mod = get(modality)
    torch.manual_seed(0)
    return mod.build_pretrain_model(mod.model_config({"preset": "tiny"}))


# ---------------------------------------------------------------------------------------------- schedules


def test_cosine_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(schedule="cosine", warmup=0.1, init_lr_scale=0.01, final_lr_scale=0.05)
    s = [lr_scale(i, 100, cfg) for i in range(101)]
    assert s[0] == pytest.approx(0.01)
    assert s[10] == pytest.approx(1.0)  # peak right after the 10 warm-up steps
    assert all(a < b for a, b in zip(s[:10], s[1:11]))  # strictly rising warm-up
    assert all(a >= b for a, b in zip(s[10:], s[11:]))  # non-increasing afterwards
    assert s[100] == pytest.approx(0.05)
    assert s[55] == pytest.approx(0.05 + 0.95 * 0.5, abs=1e-12)  # halfway down the half cosine


def test_tri_stage_matches_fairseq_phases():
    # [FS] tri_stage: 3 % linear warm-up from 0.01, 90 % hold, exponential decay to 0.05 (fine-tuning yamls)
    cfg = OptimConfig(schedule="tri_stage", warmup=0.03, hold=0.9, init_lr_scale=0.01, final_lr_scale=0.05)
    total = 1000
    assert lr_scale(0, total, cfg) == pytest.approx(0.01)
    assert lr_scale(15, total, cfg) == pytest.approx(0.01 + 0.99 * 15 / 30)
    assert lr_scale(30, total, cfg) == lr_scale(929, total, cfg) == 1.0
    # exponential: the log of the scale falls linearly over the 70 decay steps
    assert math.log(lr_scale(965, total, cfg)) == pytest.approx(math.log(0.05) * 35 / 70)
    assert lr_scale(1000, total, cfg) == pytest.approx(0.05)
    assert lr_scale(5000, total, cfg) == pytest.approx(0.05)  # constant after the end


def test_scheduler_applies_the_scale_to_every_group():
    model = tiny_pretrain("image")
    cfg = OptimConfig(lr=1e-3, warmup=0.5, init_lr_scale=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total=10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4] * len(opt.param_groups))
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3] * len(opt.param_groups))


# ------------------------------------------------------------------------------------------ param groups


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_no_decay_on_biases_norms_tokens_and_embeddings(modality):
    model = tiny_pretrain(modality)
    groups = param_groups(model, OptimConfig(weight_decay=0.05))
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    params = dict(model.named_parameters())
    assert decay and no_decay and not decay & no_decay
    assert not any(n.startswith("teacher.") for n in decay | no_decay)  # the EMA teacher is not optimised
    assert {n for n, p in params.items() if p.requires_grad} == decay | no_decay
    for n in no_decay:  # every excluded tensor is 1-D-like, a bias, a norm, a token or an embedding table
        p = params[n]
        assert sum(s > 1 for s in p.shape) <= 1 or "embed" in n or "rel_pos" in n, n
    for n in decay:  # every decayed tensor is a real matrix / conv kernel and not a norm/bias
        assert sum(s > 1 for s in params[n].shape) >= 2 and not n.endswith("bias"), n
    assert any(n.endswith("qkv.weight") for n in decay)


def test_image_tokens_and_relative_bias_are_not_decayed():
    model = tiny_pretrain("image")
    groups = param_groups(model, OptimConfig(weight_decay=0.05))
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"student.cls_token", "student.mask_emb", "student.rel_pos.0.table"} <= no_decay


def test_layer_decay_scales_blocks_geometrically():
    mod = get("image")
    torch.manual_seed(0)
    enc = mod.build_encoder(mod.model_config({"preset": "tiny"}))
    model: FinetuneModel = build_finetune_model(enc, "classification", 4)
    depth = enc.transformer.depth
    cfg = OptimConfig(lr=1.0, layer_decay=0.5)
    groups = param_groups(model, cfg, model.layer_ids(), depth)
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    assert lr_of["classifier.weight"] == 1.0  # the head keeps the full LR
    assert lr_of["encoder.patch_embed.weight"] == 0.5 ** (depth + 1)
    for i in range(depth):
        assert lr_of[f"encoder.stack.blocks.{i}.attn.qkv.weight"] == 0.5 ** (depth - i)
    with pytest.raises(ValueError, match="layer ids"):
        param_groups(model, cfg)


def test_adamw_gets_the_configured_betas_and_eps():
    opt = build_optimizer(tiny_pretrain("text"), OptimConfig(betas=(0.9, 0.999), eps=1e-8))
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in opt.param_groups)


def test_cpu_adamw_is_fused_and_does_torchs_adamw_math():
    """The fused CPU kernel (faster than torch's default loop, see ``build_optimizer``) updates like that
    loop: after 3 steps the weights agree to 1e-6 (fp32; the kernel orders a few multiplications
    differently)."""
    a, b = tiny_pretrain("text"), tiny_pretrain("text")
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(a, cfg)
    loop = torch.optim.AdamW(param_groups(b, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    assert all(g["fused"] for g in fused.param_groups)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            if pa.requires_grad:
                pa.grad = torch.randn(pa.shape, generator=g)
                pb.grad = pa.grad.clone()
        fused.step()
        loop.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "bad",
    [{"lr": 0}, {"betas": [0.9, 1.0]}, {"schedule": "linear"}, {"clip_norm": 0}, {"layer_decay": 1.5},
     {"schedule": "tri_stage", "warmup": 0.5, "hold": 0.6}, {"final_lr_scale": 0}],
)  # fmt: skip
def test_bad_optim_config_is_rejected(bad):
    with pytest.raises(ConfigError):
        from_dict(OptimConfig, bad, "pretrain.audio.optim")


def test_params_sections_parse_to_the_given_values():
    """A YAML-like section round-trips (fixed-length tuples such as betas included)."""
    from d2v.config import section
    from d2v.finetune import FinetuneConfig
    from d2v.pretrain import PretrainConfig

    params = {
        "pretrain": {"image": {"optim": {"betas": [0.9, 0.999], "eps": 1e-8, "schedule": "cosine"}}},
        "finetune": {"image": {"optim": {"layer_decay": 0.65}}},
    }
    pre = section(params, "pretrain", PretrainConfig, "image")
    assert pre.optim.betas == (0.9, 0.999) and pre.optim.eps == 1e-8
    ft = section(params, "finetune", FinetuneConfig, "image")
    assert ft.optim.layer_decay == 0.65


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"lr": -0.001}, "pretrain.image.optim.lr must be > 0, got -0.001"),
        ({"eps": 0}, "pretrain.image.optim.eps must be > 0, got 0.0"),
        ({"weight_decay": -0.1}, "pretrain.image.optim.weight_decay must be >= 0, got -0.1"),
        ({"hold": 1.5}, "pretrain.image.optim.hold must be a fraction of the steps in [0, 1], got 1.5"),
        ({"final_lr_scale": 0}, "pretrain.image.optim.final_lr_scale must be in (0, 1], got 0.0"),
    ],
)
def test_bad_optim_value_is_named_by_its_full_key_and_value(bad, message):
    from d2v.config import section
    from d2v.pretrain import PretrainConfig

    with pytest.raises(ConfigError) as e:
        section({"pretrain": {"image": {"optim": bad}}}, "pretrain", PretrainConfig, "image")
    assert str(e.value) == message
