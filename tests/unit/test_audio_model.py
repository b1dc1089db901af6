"""Audio encoder, config presets, span masking and the data2vec step on the tiny speech model."""

from __future__ import annotations

import pytest
import torch

from d2v.config import ConfigError, replace
from d2v.modalities import audio as A
from d2v.modalities.audio.frames import normalize_waveform

TINY = A.model_config({"preset": "tiny"})


def _wave(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded noise waveforms [B, N] and their padding mask (True = pad)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    wav = torch.randn(len(lengths), n, generator=g) * 0.1
    pad = torch.arange(n)[None] >= torch.tensor(lengths)[:, None]
    return wav.masked_fill(pad, 0.0), pad


@pytest.fixture(scope="module")
def encoder() -> A.AudioEncoder:
    torch.manual_seed(0)
    return A.build_encoder(TINY).eval()


# ------------------------------------------------------------------------------------------------ config


def test_default_config_is_the_small_preset():
    assert A.model_config({}) == A.ModelConfig()
    assert A.model_config(None).preset == "small"


def test_preset_values_sit_under_user_keys():
    cfg = A.model_config({"preset": "tiny", "transformer": {"depth": 3}, "mask_prob": 0.5})
    assert (cfg.transformer.dim, cfg.transformer.depth, cfg.mask_prob) == (16, 3, 0.5)
    base = A.model_config({"preset": "base"})
    assert (base.transformer.dim, base.conv_dim, base.targets.top_k) == (768, (512,) * 7, 8)
    assert A.model_config({"preset": "large"}).transformer.depth == 24


@pytest.mark.parametrize(
    "override, words",
    [
        ({"preset": "huge"}, "preset"),
        ({"dim": 16}, "unknown key"),
        ({"targets": {"top_k": 3}}, "top_k"),
        ({"pos_conv_groups": 3}, "pos_conv_groups"),
        ({"conv_kernel": [10, 3]}, "same non-zero length"),
        ({"transformer": {"layer_norm_first": True}}, "post-LN"),
        ({"mask_prob": 1.0}, "mask_prob"),
    ],
)
def test_bad_config_names_the_key(override, words):
    with pytest.raises(ConfigError, match=words):
        A.model_config({"preset": "tiny", **override})


def test_feature_lengths_match_the_conv_stack(encoder):
    n = torch.tensor([400, 16_000, 320_000])
    assert A.feature_lengths(n, TINY).tolist() == [1, 49, 999]  # §2.2: 1 s -> 49 frames, 20 s -> 999
    assert A.receptive_field(TINY) == 400
    with torch.no_grad():
        for k in (400, 719, 720, 5000):
            got = encoder.feature_extractor(torch.zeros(1, k)).shape[-1]
            assert got == int(A.feature_lengths(torch.tensor(k), TINY))


# ------------------------------------------------------------------------------------------------ encoder


def test_shapes_and_padding(encoder):
    wav, pad = _wave([16_000, 9_000])
    with torch.no_grad():
        h, pad_bt = encoder.features(wav, pad)
        h_nopad, none = encoder.features(wav[:1])
    assert h.shape == (2, 49, 16) and pad_bt.shape == (2, 49) and none is None
    assert (~pad_bt).sum(1).tolist() == [49, 27]
    assert h_nopad.shape == (1, 49, 16)


def test_embed_of_a_padded_row_equals_the_unpadded_row(encoder):
    """Normalisation uses valid samples only and valid frames never see padding (fp32 rounding: 1e-5)."""
    wav, pad = _wave([16_000, 9_000])
    with torch.no_grad():
        x, _ = encoder.local_features(wav, pad)
        x_short, _ = encoder.local_features(wav[1:, :9_000])
    torch.testing.assert_close(x[1, :27], x_short[0], atol=1e-5, rtol=1e-5)


def test_normalize_waveform_per_utterance():
    wav, pad = _wave([8_000, 5_000])
    y = normalize_waveform(wav * 7 + 3 * ~pad, pad)
    assert torch.all(y[pad] == 0)
    for i, n in enumerate([8_000, 5_000]):
        assert abs(float(y[i, :n].mean())) < 1e-5 and abs(float(y[i, :n].std(unbiased=False)) - 1) < 1e-3


@pytest.mark.parametrize(
    "inputs, padding, words",
    [
        (torch.zeros(800), None, "shape"),
        (torch.zeros(1, 1, 800), None, "shape"),
        (torch.zeros(1, 800, dtype=torch.long), None, "dtype"),
        (torch.zeros(2, 399), None, ">= 400 samples"),
        (torch.zeros(2, 800), torch.zeros(2, 799, dtype=torch.bool), "padding_mask"),
        (torch.zeros(2, 800), torch.zeros(2, 800), "padding_mask"),
        (torch.zeros(2, 800), torch.arange(800) >= torch.tensor([[800], [300]]), "got one of 300"),
    ],
)
def test_bad_inputs_raise(encoder, inputs, padding, words):
    with pytest.raises(ValueError, match=words):
        encoder.features(inputs, padding)


# ------------------------------------------------------------------------------------------------ masking


def test_mask_fraction_without_trimming():
    """Rows of 20 s (999 frames): 48.9 % expected (§2.2). Per-row std ~2.0 % (simulated over 2,000 rows),
    so the mean of 32 rows has std ~0.35 %; the +-2 % band is > 5 sigma (odds < 1e-7 over seeds)."""
    cfg = A.model_config({"preset": "tiny", "require_same_masks": False})
    m = A.make_mask(torch.full((32,), 320_000), cfg, torch.Generator().manual_seed(0))
    assert m.shape == (32, 999)
    assert 0.469 <= m.float().mean().item() <= 0.509


def test_mask_padding_seed_and_equal_counts():
    n = torch.tensor([160_000, 120_000, 100_000, 160_000])
    m = A.make_mask(n, TINY, torch.Generator().manual_seed(1))
    lengths = A.feature_lengths(n, TINY)
    assert m.shape == (4, int(lengths.max()))
    assert not (m & (torch.arange(m.shape[1])[None] >= lengths[:, None])).any()  # padding never masked
    counts = m.sum(1)
    assert (counts == counts[0]).all() and counts[0] > 0  # require_same_masks
    assert torch.equal(m, A.make_mask(n, TINY, torch.Generator().manual_seed(1)))
    assert not torch.equal(m, A.make_mask(n, TINY, torch.Generator().manual_seed(2)))
    wide = A.make_mask(n, TINY, torch.Generator().manual_seed(1), padded_len=200_000)
    assert wide.shape[1] == int(A.feature_lengths(torch.tensor(200_000), TINY))
    assert not wide[:, m.shape[1] :].any()


def test_min_masks_on_a_short_row():
    """One frame-span-worth of frames: int(0.65 * 12 / 10 + U) may be 0, min_masks makes it 1."""
    cfg = A.model_config({"preset": "tiny", "require_same_masks": False})
    for seed in range(20):
        m = A.make_mask(torch.tensor([4_000]), cfg, torch.Generator().manual_seed(seed))  # 12 frames
        assert 10 <= int(m.sum()) <= 12


def test_finetune_masks_time_spans_and_channel_spans():
    """wav2vec 2.0 fine-tuning masks: time spans of ``length`` (>= min_masks per row, padding never
    masked, same count per row) and channel spans over [B, D], seeded by the generator only."""
    from d2v.modalities.audio import FinetuneMask
    from d2v.modalities.audio.masking import finetune_masks

    spec = FinetuneMask(prob=0.65, length=10, channel_prob=0.25, channel_length=4)  # D = 16
    n = torch.tensor([32_000, 24_000, 16_000, 32_000])
    t1, c1 = finetune_masks(n, TINY, spec, torch.Generator().manual_seed(0))
    lengths = A.feature_lengths(n, TINY)
    D = TINY.transformer.dim
    assert t1.shape == (4, int(lengths.max())) and c1.shape == (4, D)
    assert not (t1 & (torch.arange(t1.shape[1])[None] >= lengths[:, None])).any()
    counts = t1.sum(1)
    assert (counts == counts[0]).all() and counts[0] >= 10  # require_same_masks; >= 1 whole span
    assert (c1.sum(1) == c1.sum(1)[0]).all() and 4 <= int(c1.sum(1)[0]) <= 8  # 1 or 2 spans of 4
    t2, c2 = finetune_masks(n, TINY, spec, torch.Generator().manual_seed(0))
    assert torch.equal(t1, t2) and torch.equal(c1, c2)
    off = FinetuneMask(prob=0.65, length=10, channel_prob=0.0)
    assert not finetune_masks(n, TINY, off, torch.Generator().manual_seed(0))[1].any()


def test_finetune_mask_min_masks_on_a_short_row():
    """A 12-frame row: int(0.65 * 12 / 10 + U) is 0 or 1 spans, min_masks=2 asks for 2 (overlaps allowed)."""
    from d2v.modalities.audio import FinetuneMask
    from d2v.modalities.audio.masking import finetune_masks

    spec = FinetuneMask(prob=0.65, length=10, min_masks=2, channel_prob=0.0)
    for seed in range(10):
        t, _ = finetune_masks(torch.tensor([4_000]), TINY, spec, torch.Generator().manual_seed(seed))
        assert int(t.sum()) >= 10


# ---------------------------------------------------------------------------------------- data2vec step


def _batch(cfg: A.ModelConfig, lengths: list[int]) -> dict[str, torch.Tensor]:
    wav, pad = _wave(lengths, seed=3)
    mask = A.make_mask(torch.tensor(lengths), cfg, torch.Generator().manual_seed(0))
    return {"inputs": wav, "padding_mask": pad, "mask": mask}


def test_pretrain_step_grads_teacher_and_ema():
    torch.manual_seed(0)
    model = A.build_pretrain_model(TINY).train()
    batch = _batch(TINY, [16_000, 12_000])
    teacher0 = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    loss, metrics = model(batch)
    assert torch.isfinite(loss) and metrics["masked_frac"] > 0
    loss.backward()
    for name, p in [*model.student.named_parameters(), *model.head.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    torch.optim.SGD([*model.student.parameters(), *model.head.parameters()], lr=0.1).step()
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher0[k]), k  # backward + optimizer step leave the teacher alone

    tau = 0.9
    student = dict(model.student.named_parameters())
    model.ema_step(tau)
    for name, t in model.teacher.named_parameters():
        s, t0 = student[name].detach(), teacher0[name]
        if name.startswith("pos_conv"):
            assert torch.equal(t, s), name  # shared ([P1] §3.3): copied, not averaged
        elif name.startswith(("feature_extractor", "feature_projection")):
            assert torch.equal(t, t0), name  # the teacher reuses the student's local features
        else:  # lerp vs tau*t + (1-tau)*s: fp32 rounding only
            torch.testing.assert_close(t, tau * t0 + (1 - tau) * s, atol=1e-6, rtol=1e-6, msg=name)
            assert not torch.equal(t, t0) or torch.equal(s, t0), name


def test_pretraining_batches_are_cropped_to_the_shortest_clip_not_padded():
    """[FS] RawAudioDataset ``pad: false``: every row keeps the batch's shortest length, at a random offset,
    so every row masks its full share of frames (padded batches trimmed every row to the shortest's count)."""
    from d2v.modalities.audio.data import collate

    g = torch.Generator().manual_seed(0)
    xs = [torch.arange(n, dtype=torch.float32) for n in (16000, 9000, 24000)]
    b = collate(xs, mode="pretrain", model_cfg=TINY, prep={}, generator=g)
    assert b["inputs"].shape == (3, 9000) and not b["padding_mask"].any()
    starts = b["inputs"][:, 0].tolist()
    assert all(torch.equal(b["inputs"][i], xs[i][int(s) : int(s) + 9000]) for i, s in enumerate(starts))
    T = int(A.feature_lengths(torch.tensor(9000), TINY))
    assert b["mask"].shape == (3, T) and b["mask"].sum(1).float().mean() / T > 0.35  # ~49 % masked
    again = collate(xs, mode="pretrain", model_cfg=TINY, prep={}, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["inputs"], b["inputs"])  # the offsets come from the generator
    padded = collate(xs, mode="pretrain", model_cfg=replace(TINY, crop_batches=False), prep={}, generator=g)
    assert padded["inputs"].shape == (3, 24000) and padded["padding_mask"].any()
    fine = collate(xs, mode="finetune", model_cfg=TINY, prep={}, generator=g)
    assert fine["inputs"].shape == (3, 24000)  # fine-tuning keeps whole clips (labels belong to them)
