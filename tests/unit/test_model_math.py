"""The modality-blind data2vec math: EMA schedule, targets, loss, collapse monitor (hand computations);
the dropout and attention-with-dropout of the block stack."""

import math

import pytest
import torch
import torch.nn.functional as F

from d2v.data2vec import EMAConfig, build_targets, ema_decay, masked_std, normalize, regression_loss
from d2v.modalities.base import Data2VecTargets
from d2v.transformer import Attention, attend, attention_mask, dropout, keep_mask


def test_ema_schedule_end_points_and_linearity():
    cfg = EMAConfig(tau0=0.999, tau_end=0.9999, tau_n=1000)
    assert ema_decay(0, cfg) == pytest.approx(0.999)
    assert ema_decay(500, cfg) == pytest.approx((0.999 + 0.9999) / 2)
    assert ema_decay(1000, cfg) == 0.9999
    assert ema_decay(10**6, cfg) == 0.9999
    assert ema_decay(0, EMAConfig(tau0=0.9998, tau_end=0.9998, tau_n=10)) == 0.9998  # constant (vision)


def test_instance_and_layer_norm_axes():
    x = torch.randn(2, 7, 5) * 3 + 1
    inst = normalize(x, "instance")  # per sample and channel, over time
    assert torch.allclose(inst.mean(1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(inst.var(1, unbiased=False), torch.ones(2, 5), atol=1e-3)
    lay = normalize(x, "layer")  # per token, over channels
    assert torch.allclose(lay.mean(-1), torch.zeros(2, 7), atol=1e-5)
    assert torch.equal(normalize(x, "none"), x)


@pytest.mark.parametrize(
    "layer_norm, final_norm", [("instance", "none"), ("layer", "none"), ("layer", "layer")]
)
def test_targets_equal_hand_computed_normalised_top_k_mean(layer_norm, final_norm):
    torch.manual_seed(0)
    layers = [torch.randn(2, 6, 4) * (i + 1) for i in range(5)]
    cfg = Data2VecTargets(top_k=3, layer_norm=layer_norm, final_norm=final_norm)
    hand = []
    for a in layers[2:]:
        if layer_norm == "instance":
            mu, var = a.mean(1, keepdim=True), a.var(1, unbiased=False, keepdim=True)
        else:
            mu, var = a.mean(-1, keepdim=True), a.var(-1, unbiased=False, keepdim=True)
        hand.append((a - mu) / torch.sqrt(var + 1e-5))
    y = sum(hand) / 3
    if final_norm == "layer":
        y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(build_targets(layers, cfg), y, atol=1e-5)


def test_regression_loss_token_and_element_reductions():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    p, t = pred[mask], target[mask]  # [M, D], M = 4
    l2 = regression_loss(pred, target, mask, Data2VecTargets(loss_beta=0.0))
    assert l2 == pytest.approx(((p - t) ** 2).sum(-1).mean().item() / math.sqrt(8), rel=1e-5)
    sl1 = regression_loss(pred, target, mask, Data2VecTargets(loss_beta=4.0, loss_scale=1.0))
    assert sl1 == pytest.approx(
        F.smooth_l1_loss(p, t, beta=4.0, reduction="none").sum(-1).mean().item(), rel=1e-5
    )
    el = regression_loss(pred, target, mask, Data2VecTargets(loss_beta=2.0, loss_reduction="element"))
    assert el == pytest.approx(F.smooth_l1_loss(p, t, beta=2.0).item(), rel=1e-5)


def test_loss_ignores_unmasked_positions():
    pred, target = torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)
    target[0, 1] = 100.0  # a huge error at an unmasked position must not count
    mask = torch.tensor([[True, False, True]])
    assert regression_loss(pred, target, mask, Data2VecTargets()) == 0


def test_masked_std_matches_fairseq_compute_var():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    mask = torch.rand(3, 5) > 0.4
    sel = x[mask]
    assert masked_std(x, mask) == pytest.approx(torch.sqrt(sel.var(0) + 1e-6).mean().item(), rel=1e-5)


def test_cpu_dropout_keeps_a_fraction_1_minus_p_scaled_by_1_over_1_minus_p():
    """d2v's dropout (16-bit lanes on CPU): of 1M draws 0.9 are kept, +- 0.003 (10 sigma: failure odds below
    1e-20), in each of the four lanes of a 64-bit draw alike, each scaled by 1 / (1 - q) with q = p rounded to
    2^-16; the gradient is the same mask; eval and p = 0 are the identity."""
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y.detach() != 0
    for lane in range(4):
        assert abs(kept.flatten()[lane::4].float().mean().item() - 0.9) < 0.006
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    q = round(0.1 * 65536) / 65536
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - q)))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x


@pytest.mark.parametrize("p", [0.05, 0.5, 0.999999])
def test_keep_mask_is_seeded_and_takes_any_shape(p):
    """The same seed gives the same mask; sizes that are not a multiple of four, bf16, and p whose lanes
    would all drop (capped at 65535 / 65536: something is kept) work; the mean of the mask is 1 +- 5 %."""
    torch.manual_seed(3)
    a = keep_mask((7, 13, 3), p, torch.float32)
    torch.manual_seed(3)
    b = keep_mask((7, 13, 3), p, torch.bfloat16)
    assert a.shape == b.shape == (7, 13, 3) and b.dtype == torch.bfloat16
    assert torch.equal(a != 0, b != 0)
    torch.manual_seed(4)
    assert not torch.equal(
        keep_mask((7, 13, 3), 0.5, torch.float32), keep_mask((7, 13, 3), 0.5, torch.float32)
    )
    if p < 0.9:
        big = keep_mask((400_000,), p, torch.float32)
        assert abs(big.mean().item() - 1.0) < 0.05
    else:
        assert keep_mask((64, 65536), p, torch.float32).count_nonzero() > 0  # ~64 kept


def test_dropout_compiles_whole_through_f_dropout():
    """Inside a compiled graph :func:`dropout` is ``F.dropout`` (the 16-bit lanes' full-range ``random_`` and
    bool-as-bytes view break the graph or inductor): ``fullgraph=True`` compiles, and 0.9 +- 0.003 is kept."""
    f = torch.compile(lambda x: dropout(x, 0.1, True), backend="aot_eager", fullgraph=True)
    y = f(torch.ones(1000, 1000))
    assert abs((y != 0).float().mean().item() - 0.9) < 0.003
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))


def test_a_bias_with_padding_is_a_finite_mask_that_attends_like_sdpa():
    """``attention_mask`` of a bias and padding is finite (the plain softmax of ``attend`` never makes NaN)
    and gives, through ``attend``, SDPA's output with the padding as a bool mask plus the bias."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    bias = torch.randn(3, 5, 5, generator=g)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])  # True = padding
    mask = attention_mask(pad, bias, torch.float32)
    assert mask.shape == (2, 3, 5, 5) and bool(mask.isfinite().all())
    expect = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.masked_fill(pad[:, None, None, :], float("-inf"))
    )
    torch.testing.assert_close(attend(q, k, v, mask, 0.0), expect, rtol=1e-5, atol=1e-5)
    assert attention_mask(None, None, torch.float32) is None


def test_attention_with_dropout_is_sdpa_math_with_a_dropout_mask():
    """Without dropout ``attend`` equals SDPA (fp32 summation order: 1e-5); with it, the softmax weights of
    SDPA's math, masked and rescaled by :func:`dropout`'s mask, times the values."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    pad = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]  # True = attend
    for mask in (None, pad, torch.randn(3, 5, 5, generator=g)):
        torch.testing.assert_close(
            attend(q, k, v, mask, 0.0),
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            rtol=1e-5,
            atol=1e-5,
        )
    pad[1] = False  # a row with every key masked: zero weights, as SDPA, not NaN
    torch.testing.assert_close(
        attend(q, k, v, pad, 0.0), F.scaled_dot_product_attention(q, k, v, attn_mask=pad)
    )
    assert not attend(q, k, v, pad, 0.0)[1].any()
    torch.manual_seed(1)
    out = attend(q, k, v, pad, 0.5)
    torch.manual_seed(1)
    w = F.scaled_dot_product_attention(q, k, torch.eye(5).expand(2, 3, 5, 5), attn_mask=pad)  # the weights
    torch.testing.assert_close(out, (w * keep_mask(w.shape, 0.5, w.dtype)) @ v, rtol=1e-5, atol=1e-5)


def test_attention_gradients_on_the_cpu_math_path_match_sdpa():
    """``Attention`` with gradients on CPU runs :func:`attend` on its own layout (q, k, v unbound on the
    projection's axis, k made contiguous, the output's gradient made contiguous once); its output and every
    gradient equal those of SDPA on the textbook permuted layout, with no mask, a padding mask and a bias."""
    torch.manual_seed(0)
    attn = Attention(16, 4, 0.0)
    x = torch.randn(2, 6, 16)
    pad = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]  # True = attend
    for mask in (None, pad, torch.randn(4, 6, 6)):
        grads = []
        for path in ("math", "sdpa"):
            attn.zero_grad()
            xi = x.clone().requires_grad_(True)
            if path == "math":
                y = attn(xi, mask)
            else:
                q, k, v = attn.qkv(xi).view(2, 6, 3, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                y = attn.proj(o.transpose(1, 2).reshape(2, 6, 16))
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            grads.append([y.detach(), xi.grad, *(p.grad.clone() for p in attn.parameters())])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
