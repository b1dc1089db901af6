"""The Transformer block stack shared by every modality.

Shape legend: B batch, T tokens, D width, H heads, F FFN width.

A block returns its output *and* the FFN output before the last residual connection, the target tap
of data2vec (§3.3, footnote 5 of [P1]: "the output of the FFN prior to the last residual connection").
The stack runs on whatever tokens it is given (a subset of the sequence works: data2vec 2.0 feeds only
the visible tokens), with an optional additive attention bias (vision's relative position bias, ALiBi).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import TransformerConfig

Tap = Literal["ffn", "block"]

_ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}


def attention_mask(padding_BT: Tensor | None, bias_HTT: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Combine a key padding mask (True = padding) and an additive bias into one SDPA mask.

    Returns None (so SDPA may pick a fused kernel), a bool mask [B, 1, 1, T] (True = attend), or a float
    mask broadcastable to [B, H, T, T].
    """
    if bias_HTT is None:
        return None if padding_BT is None else ~padding_BT[:, None, None, :]
    bias = bias_HTT.to(dtype)
    if bias.dim() == 3:
        bias = bias[None]
    if padding_BT is not None:  # the dtype's lowest finite value, not -inf (HF's choice): exp() of it is
        # exactly 0 beside any real key, and a float mask never turns a row into NaN, so :func:`attend`
        # can run a plain softmax on it (rows of only padding are refused by the modalities' input checks)
        neg = torch.zeros(padding_BT.shape, dtype=dtype, device=padding_BT.device)
        neg = neg.masked_fill(padding_BT, torch.finfo(dtype).min)
        bias = bias + neg[:, None, None, :]
    return bias


_safe_softmax = getattr(torch, "_safe_softmax", torch.softmax)  # SDPA's math path; softmax before torch 2.5


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout (``F.dropout``) whose keep mask on CPU is :func:`keep_mask` (16 random bits an element).

    ``F.dropout`` draws with ``bernoulli_`` and ``torch.rand`` costs one Mersenne-Twister draw per element,
    both single-threaded on CPU: their draws cost more of the text step than anything but the matmuls
    (benchmarks/RESULTS.md). Other devices, and a compiled graph (its own fused RNG), keep ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    return x * keep_mask(x.shape, p, x.dtype)


def keep_mask(shape: Sequence[int], p: float, dtype: torch.dtype) -> Tensor:
    """[*shape] of ``dtype`` on CPU: 0 with probability q = round(p * 2^16) / 2^16 (within 2^-17 of p), else
    1 / (1 - q), so the expectation is unchanged. One full-range int64 draw of the global generator
    gives four 16-bit lanes; a lane below q (counted from the bottom of its range) drops its element.

    Cheaper than ``torch.rand(shape).ge_(p)`` (4 elements a 64-bit draw against 1 a 32-bit draw). A
    different random stream from ``rand``'s: speech pretraining at 8 clips an update depends on which
    stream, at 16 it clears the bar on pretraining seeds 0-3 (benchmarks/RESULTS.md).
    """
    n, drop = math.prod(shape), min(round(p * 65536), 65535)
    lanes = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n]
    keep = lanes.ge(drop - 32768).view(torch.uint8)  # uint8 -> float is cheaper than bool -> float
    return keep.to(dtype).mul_(65536 / (65536 - drop)).view(shape)


class Dropout(nn.Module):
    """``nn.Dropout`` drawing its mask with :func:`dropout` (no parameters: state dicts are unchanged)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous once. The attention output's gradient arrives
    as a transposed view ([B, T, H, d] read as [B, H, T, d]), and both matmuls of ``p @ v``'s backward
    would copy it (six copies fewer in a text step)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.contiguous()


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float) -> Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` with dropout ``p`` on the attention weights: SDPA's math path
    with :func:`dropout`'s cheaper mask. [B, H, T, d] each -> [B, H, T, d]. A bool mask (True = attend) gets
    SDPA's "safe" softmax: a row whose keys are all masked gets zero weights, not NaN. A float mask is
    finite (:func:`attention_mask`), so a plain softmax, which skips the safe one's three extra passes over
    the [B, H, T, T] scores, is exact.

    ``k`` is made contiguous before its transpose: the matmul then reads it as a transposed operand,
    where copying the strided ``k^T`` itself is a transposing copy and an untransposed matmul, slower
    together (bit-identical scores; benchmarks/RESULTS.md)."""
    s = (q * q.shape[-1] ** -0.5) @ k.contiguous().transpose(-2, -1)
    if mask is None:
        w = s.softmax(-1)
    elif mask.dtype == torch.bool:
        w = _safe_softmax(s.masked_fill(~mask, float("-inf")), -1)
    else:
        w = (s + mask).softmax(-1)
    return _ContiguousGrad.apply(dropout(w, p, True) @ v)


def math_path(q: Tensor) -> bool:
    """Whether attention with gradients runs :func:`attend` on CPU rather than SDPA: SDPA's fused CPU kernel
    has a slow backward for the short sequences of the CPU presets (this path is faster in fp32 and bf16:
    benchmarks/RESULTS.md), and it falls back to its own math path (with the safe softmax) for a bias that
    needs a gradient. Above 1024 tokens the [T, T] weights it keeps would grow too large."""
    return q.shape[-2] <= 1024


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and ``F.scaled_dot_product_attention``.

    Checkpoints with separate q/k/v (HF) are split/fused on import/export. A key bias has no effect on the
    output (it adds a constant to every score of a query row), so BEiT's "no key bias" is an import detail.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x_BTD: Tensor, mask: Tensor | None) -> Tensor:
        B, T, D = x_BTD.shape
        # unbound on the [B, T, 3, H, d] layout's own axis (the same strided views as a permute to
        # [3, B, H, T, d] and unbind(0)): the backward then stacks the three gradients straight into the
        # projection's layout, where unbinding a permute costs a copy more in every block's backward
        qkv = self.qkv(x_BTD).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each [B, H, T, D/H]
        p = self.dropout if self.training else 0.0
        if x_BTD.device.type == "cpu" and torch.is_grad_enabled() and (p > 0.0 or math_path(q)):
            y = attend(q, k, v, mask, p)  # SDPA's fused CPU kernel has no dropout, and a slow backward
        else:  # SDPA: its fused kernel (forward-only on CPU: the teacher, evaluation), or any kernel on CUDA
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, activation: str, activation_dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.act = _ACTIVATIONS[activation]()
        self.drop = Dropout(activation_dropout)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


def drop_path(x_BTD: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability p (BEiT / timm)."""
    if p == 0.0 or not training:
        return x_BTD
    keep = x_BTD.new_empty(x_BTD.shape[0], 1, 1).bernoulli_(1.0 - p).div_(1.0 - p)
    return x_BTD * keep  # the scale folded into the [B, 1, 1] mask: one pass over x (and its gradient)


class Block(nn.Module):
    """One Transformer block, post-LN (wav2vec 2.0, RoBERTa) or pre-LN with layer-scale (BEiT).

    post-LN: ``h = LN1(x + drop(attn(x))); u = ffn(h); x' = LN2(h + drop(u))``
    pre-LN:  ``h = x + dp(g1 * attn(LN1(x))); u = g2 * ffn(LN2(h)); x' = h + dp(u)``
    Returns ``(x', u)``: ``u`` is the FFN output before the last residual (the data2vec target tap).
    """

    def __init__(self, cfg: TransformerConfig, drop_path_p: float = 0.0) -> None:
        super().__init__()
        d = cfg.dim
        self.layer_norm_first = cfg.layer_norm_first
        self.attn = Attention(d, cfg.heads, cfg.attention_dropout)
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = FeedForward(d, cfg.ffn_dim, cfg.activation, cfg.activation_dropout)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.dropout = Dropout(cfg.dropout)
        self.drop_path_p = drop_path_p
        if cfg.layer_scale_init is not None:
            self.gamma1 = nn.Parameter(torch.full((d,), cfg.layer_scale_init))
            self.gamma2 = nn.Parameter(torch.full((d,), cfg.layer_scale_init))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x_BTD: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.layer_norm_first:
            a = self.dropout(self.attn(self.norm1(x_BTD), mask))
            if self.gamma1 is not None:
                a = self.gamma1 * a
            h = x_BTD + drop_path(a, self.drop_path_p, self.training)
            u = self.mlp(self.norm2(h))
            if self.gamma2 is not None:
                u = self.gamma2 * u
            return h + drop_path(self.dropout(u), self.drop_path_p, self.training), u
        h = self.norm1(
            x_BTD + drop_path(self.dropout(self.attn(x_BTD, mask)), self.drop_path_p, self.training)
        )
        u = self.mlp(h)
        return self.norm2(h + drop_path(self.dropout(u), self.drop_path_p, self.training)), u


class StackOutput(NamedTuple):
    x_BTD: Tensor
    """Output of the last block (before any final norm the modality applies)."""
    layers: list[Tensor]
    """Per-block target taps ([B, T, D] each), empty unless ``tap`` was given."""


class TransformerStack(nn.Module):
    """L blocks with LayerDrop; optionally collects each block's FFN output or end-of-block output."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, p) for p in dpr)

    def forward(
        self,
        x_BTD: Tensor,
        padding_BT: Tensor | None = None,
        bias: Tensor | Sequence[Tensor] | None = None,
        tap: Tap | None = None,
        generator: torch.Generator | None = None,
    ) -> StackOutput:
        """Run the blocks. ``bias`` is one [H, T, T] / [B, H, T, T] tensor for all blocks or one per block."""
        per_block = isinstance(bias, (list, tuple))
        shared_mask = None if per_block else attention_mask(padding_BT, bias, x_BTD.dtype)
        layers: list[Tensor] = []
        # LayerDrop (Fan et al. 2019, as in wav2vec 2.0): skip whole blocks in training. The draw is on the
        # host (CPU generator) so it never syncs with the accelerator.
        drops = (
            torch.rand(len(self.blocks), generator=generator) < self.cfg.layerdrop
            if self.training and self.cfg.layerdrop > 0
            else None
        )
        for i, blk in enumerate(self.blocks):
            if drops is not None and bool(drops[i]):
                continue
            mask = attention_mask(padding_BT, bias[i], x_BTD.dtype) if per_block else shared_mask
            x_BTD, u_BTD = blk(x_BTD, mask)
            if tap == "ffn":
                layers.append(u_BTD)
            elif tap == "block":
                layers.append(x_BTD)
        return StackOutput(x_BTD, layers)


DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout")
"""The ``TransformerConfig`` rates :func:`set_dropout` sets on a built stack."""


def set_dropout(stack: TransformerStack, rates: dict[str, float]) -> None:
    """Set the dropout rates of a built stack's blocks (``rates``: :data:`DROPOUT_KEYS` -> p). Dropout has
    no parameters, so one stack can run at a rate per caller (the joint model: each modality's own)."""
    for blk in stack.blocks:
        blk.dropout.p = rates["dropout"]
        blk.attn.dropout = rates["attention_dropout"]
        blk.mlp.drop.p = rates["activation_dropout"]


def init_bert_params(module: nn.Module) -> None:
    """BERT init used by fairseq data2vec (``init_bert_params``): Linear/Embedding N(0, 0.02), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
