"""Text specifics on the tiny model: presets, RoBERTa positions, input checks, input-space masking, the
teacher's view. What every modality does is tested in test_modality_contract.py."""

from __future__ import annotations

import pytest
import torch
from transformers.models.data2vec.modeling_data2vec_text import Data2VecTextEmbeddings

from d2v.config import ConfigError
from d2v.modalities import text
from d2v.modalities.text.masking import make_mask, maskable

TINY = text.model_config({"preset": "tiny"})


def padded_batch(cfg: text.ModelConfig, lengths: list[int], T: int, seed: int = 0):
    """<s> w ... w </s> <pad> ...: ids [B, T] int64 and padding [B, T] bool (True = padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(cfg.num_special, cfg.vocab_size, (len(lengths), T), generator=g)
    pad = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]
    ids[:, 0] = cfg.bos_id
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = cfg.eos_id
    return ids.masked_fill(pad, cfg.pad_id), pad


# ------------------------------------------------------------------------------------------------ config


def test_base_preset_is_roberta_base_with_the_text_targets():
    cfg = text.model_config({"preset": "base"})
    t, y = cfg.transformer, cfg.targets
    assert (t.dim, t.depth, t.dropout, cfg.vocab_size, cfg.position_rows) == (768, 12, 0.1, 50265, 514)
    assert (y.top_k, y.loss_beta, y.loss_scale, y.layer_norm, y.tap) == (10, 4.0, 1.0, "layer", "ffn")


def test_mask_defaults_follow_the_strategy():
    cfg = text.model_config({"preset": "tiny", "mask_strategy": "bert"})
    assert (cfg.resolved_mask_prob, cfg.resolved_mask_length) == (0.15, 1)
    assert (TINY.resolved_mask_prob, TINY.resolved_mask_length) == (0.35, 4)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"mask_strategy": "bert", "mask_length": 4}, "mask_length"),
        ({"mask_prob": 1.5}, "mask_prob"),
        ({"transformer": {"layer_norm_first": True}}, "post-LN"),
        ({"mask_id": 1}, "distinct"),
        ({"max_positions": 0}, "max_positions"),
    ],
)
def test_bad_config_raises(override, match):
    with pytest.raises(ConfigError, match=match):
        text.model_config({"preset": "tiny", **override})


# ----------------------------------------------------------------------------------------------- encoder


def test_padding_rows_start_at_zero():
    enc = text.build_encoder(TINY)
    # init_bert_params zeroes the padding rows ([FS] fairseq init)
    assert enc.embeddings.tokens.weight[TINY.pad_id].abs().sum() == 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_position_ids_match_roberta(side):
    ids, pad = padded_batch(TINY, [6, 9, 3], 9)
    if side == "left":
        ids, pad = ids.flip(1), pad.flip(1)
    ours = text.build_encoder(TINY).embeddings.position_ids(ids, pad)
    ref = Data2VecTextEmbeddings.create_position_ids_from_input_ids(ids, TINY.pad_id)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(
    "ids, pad, match",
    [
        (torch.zeros(2, 5), None, "int64"),
        (torch.full((2, 5, 1), 7), None, "int64"),
        (torch.full((2, 5), 256), None, r"\[0, 256\)"),
        (torch.full((2, 5), -1), None, r"\[0, 256\)"),
        (torch.full((2, 65), 7), None, "max_positions"),
        (torch.full((2, 5), 7), torch.zeros(2, 5), "bool"),
        (torch.full((2, 5), 7), torch.zeros(2, 4, dtype=torch.bool), "bool"),
        (torch.full((2, 5), 7), torch.tensor([[False] * 5, [True] * 5]), "all padding"),
        (torch.tensor([[7, 1, 7]]), None, "pad id"),
    ],
)
def test_bad_inputs_raise(ids, pad, match):
    with pytest.raises(ValueError, match=match):
        text.build_encoder(TINY).features(ids, pad)


# ----------------------------------------------------------------------------------------------- masking

BIG = text.model_config({"preset": "tiny", "max_positions": 256})


def test_bert_masking_proportions():
    cfg = text.model_config({"preset": "tiny", "max_positions": 256, "mask_strategy": "bert"})
    ids, pad = padded_batch(cfg, [256] * 32 + [200] * 32, 256)
    student, mask = make_mask(ids, pad, cfg, torch.Generator().manual_seed(0))
    n_valid = maskable(ids, pad, cfg).sum(1)
    selected = torch.floor(0.15 * n_valid + 0.5).sum().item()  # 32 * 38 + 32 * 30 = 2176
    changed = (student != ids) & ~mask
    assert torch.equal(mask, student == cfg.mask_id)
    assert (student[changed] >= cfg.num_special).all()
    # Binomial(2176, 0.8) / 2176 has sd 0.0086; +-0.05 is 5.8 sd (failure odds < 1e-8 for any seed).
    assert abs(mask.sum().item() / selected - 0.8) < 0.05
    # random replacements: Binomial(2176, ~0.1) (sd 0.0064; a draw equal to the original, p 1/251, is
    # invisible); +-0.04 is 6 sd. The remaining ~10 % are selected but kept, which is not observable.
    assert abs(changed.sum().item() / selected - 0.1) < 0.04


def test_span_masking_fraction_and_lengths():
    ids, pad = padded_batch(BIG, [256] * 32 + [150] * 32, 256)
    student, mask = make_mask(ids, pad, BIG, torch.Generator().manual_seed(0))
    ok = maskable(ids, pad, BIG)
    assert torch.equal(student, ids.masked_fill(mask, BIG.mask_id))
    # Coverage 1 - (1 - 0.35 / 4) ** 4 = 0.307 (overlapping spans, as in fairseq); measured mean 0.307,
    # sd 0.0023 over 200 seeds, so [0.26, 0.35] is > 18 sd away (failure odds far below 1e-9).
    frac = mask.sum().item() / ok.sum().item()
    assert 0.26 < frac < 0.35
    # every maximal run is >= 4 long unless cut by a special token, padding or the row end
    runs = 0
    for b in range(ids.shape[0]):
        m, o = mask[b].tolist() + [False], ok[b].tolist() + [False]
        start = None
        for i, v in enumerate(m):
            if v and start is None:
                start = i
            if not v and start is not None:
                assert i - start >= 4 or not o[i], (b, start, i)
                runs += (i - start) == 4
                start = None
    assert runs > 100


@pytest.mark.parametrize("strategy", ["bert", "span"])
def test_padding_and_specials_never_masked(strategy):
    cfg = text.model_config({"preset": "tiny", "mask_strategy": strategy, "mask_prob": 0.9})
    ids, pad = padded_batch(cfg, [64, 40, 12, 3], 64)
    ids[:2, 20] = cfg.eos_id  # a document boundary inside a row
    student, mask = make_mask(ids, pad, cfg, torch.Generator().manual_seed(1))
    never = pad | (ids == cfg.bos_id) | (ids == cfg.eos_id)
    assert not (mask & never).any() and torch.equal(student[never], ids[never])
    assert mask.sum() > 0.3 * (~never).sum()  # expected ~0.6-0.7 of the maskable tokens


def test_make_mask_rejects_bad_ids():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="int64"):
        make_mask(torch.zeros(2, 5), None, TINY, g)
    with pytest.raises(ValueError, match="<mask>"):
        make_mask(torch.full((2, 5), TINY.mask_id), None, TINY, g)


# ------------------------------------------------------------------------------------------ pretraining


def pretrain_batch(cfg: text.ModelConfig):
    ids, pad = padded_batch(cfg, [32, 20, 9], 32)
    student, mask = make_mask(ids, pad, cfg, torch.Generator().manual_seed(0))
    return {"inputs": ids, "padding_mask": pad, "mask": mask, "student_inputs": student}


def test_pretrain_batch_needs_student_inputs():
    model = text.build_pretrain_model(TINY)
    with pytest.raises(ValueError, match="student_inputs"):
        model({k: v for k, v in pretrain_batch(TINY).items() if k != "student_inputs"})


def test_teacher_sees_embeddings_without_dropout():
    cfg = text.model_config({"preset": "tiny", "transformer": {"dropout": 0.5}})
    model = text.build_pretrain_model(cfg)
    ids, pad = padded_batch(cfg, [16, 9], 16)
    targets = []
    for train in (True, False):
        model.train(train)
        targets.append(model.teacher_targets(ids, pad, *model.student.local_features(ids, pad)))
    assert torch.equal(targets[0], targets[1])  # teacher in eval: dropout only on the student's path
    model.train()
    x, p = model.student.local_features(ids, pad)
    assert not torch.equal(model.student.contextualize(x, p).x_BTD, model.student.contextualize(x, p).x_BTD)


def test_teacher_reuses_the_embeddings():
    """[P1] §3.3, [FS] ``skip_keys``: the local encoder (embeddings) is shared, never averaged. How
    ``ema_step`` treats it is tested for every modality in test_modality_contract.py."""
    assert text.TextEncoder.local_modules == ("embeddings",) and not TINY.targets.ema_local_encoder
