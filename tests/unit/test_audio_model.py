"""Speech specifics on the tiny model: presets, conv lengths, input checks, span masking, the teacher's
shared parts. What every modality does is tested in test_modality_contract.py."""

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


def test_presets_state_the_paper_sizes():
    base = A.model_config({"preset": "base"})
    assert (base.transformer.dim, base.conv_dim, base.targets.top_k) == (768, (512,) * 7, 8)
    assert A.model_config({"preset": "large"}).transformer.depth == 24


@pytest.mark.parametrize(
    "override, words",
    [
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


def test_mask_padding_and_equal_counts():
    n = torch.tensor([160_000, 120_000, 100_000, 160_000])
    m = A.make_mask(n, TINY, torch.Generator().manual_seed(1))
    lengths = A.feature_lengths(n, TINY)
    assert m.shape == (4, int(lengths.max()))
    assert not (m & (torch.arange(m.shape[1])[None] >= lengths[:, None])).any()  # padding never masked
    counts = m.sum(1)
    assert (counts == counts[0]).all() and counts[0] > 0  # require_same_masks
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


def test_teacher_reuses_the_local_encoder_and_copies_pos_conv():
    """[P1] §3.3: the teacher reuses the student's conv features and copies the positional convs each step
    (fairseq ``ema_layers_only``). How ``ema_step`` treats these is tested for every modality in
    test_modality_contract.py."""
    assert A.AudioEncoder.local_modules == ("feature_extractor", "feature_projection")
    assert A.AudioEncoder.shared_with_teacher == ("pos_conv",)
    assert not TINY.targets.ema_local_encoder


def test_pretraining_batches_are_cropped_to_the_shortest_clip_not_padded():
    """[FS] RawAudioDataset ``pad: false``: every row keeps the batch's shortest length, at a random offset,
    so every row masks its full share of frames (padded batches trimmed every row to the shortest's count);
    such a batch has no ``padding_mask`` at all (nothing to mask: the unmasked attention path)."""
    from d2v.modalities.audio.data import collate

    g = torch.Generator().manual_seed(0)
    xs = [torch.arange(n, dtype=torch.float32) for n in (16000, 9000, 24000)]
    b = collate(xs, mode="pretrain", model_cfg=TINY, prep={}, generator=g)
    assert b["inputs"].shape == (3, 9000) and "padding_mask" not in b
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


@pytest.mark.parametrize(
    ("T", "k", "s", "exact"),
    [
        (57, 10, 5, True),
        (50, 3, 2, True),
        (51, 3, 2, True),
        (41, 2, 2, True),
        (24, 2, 3, True),
        (30, 5, 1, False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_time_windows_match_unfold_and_its_gradient(T, k, s, exact, dtype):
    """The conv windows and their own backward against aten's unfold: bit-identical where a frame is in at
    most two windows (every layer of the wav2vec 2.0 stack), to rounding with more overlap; gaps (k < s)
    get zero gradient."""
    from d2v.modalities.audio.model import time_windows

    x = torch.randn(2, T, 4, dtype=dtype, requires_grad=True)
    y, ref = time_windows(x, k, s), x.unfold(1, k, s).flatten(2)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    (got,), (want,) = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, x, g)
    if exact:
        assert torch.equal(got, want)
    else:  # k roundings of a sum of k terms, each at most max |g|
        tol = k * float(g.abs().max()) * torch.finfo(dtype).eps
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=0)
    x64 = torch.randn(2, 20, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: time_windows(v, k, s), (x64,))


@pytest.mark.slow  # about 17 s on epyc-2c (inductor compiles): CI runs it (.ci/run)
def test_time_windows_compile_whole_with_their_backward():
    """``compile: true`` traces the windows' own autograd.Function into one graph (no graph break) with the
    same gradients."""
    from d2v.modalities.audio.model import time_windows

    def loss(x, w):
        return torch.nn.functional.linear(time_windows(x, 3, 2), w).square().sum()

    x, w = torch.randn(2, 41, 8, requires_grad=True), torch.randn(8, 24, requires_grad=True)
    want = torch.autograd.grad(loss(x, w), (x, w))
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, w), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
