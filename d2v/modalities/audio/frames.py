"""The speech signal's units: sample rate, waveform normalisation, and samples -> frames of the conv stack.

Shape legend: B batch, N samples (16 kHz), T frames.

The one module both the audio data code (shards, crops, masks) and the encoder import, so neither imports
the other: the data stages never load the model, and the model never loads the shard code.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

SAMPLE_RATE = 16_000
"""Every clip is resampled to 16 kHz at shard time: the rate the conv feature encoder is built for ([P1]
§4.2: 20 ms frames = stride 320)."""


class ConvStack(Protocol):
    """What the frame arithmetic reads of ``model.audio`` (``ModelConfig`` has both)."""

    conv_kernel: tuple[int, ...]
    conv_stride: tuple[int, ...]


def feature_lengths(n_samples: Tensor, cfg: ConvStack) -> Tensor:
    """Frames produced from ``n_samples`` samples: ``T = floor((N - k) / s) + 1`` per conv ([FS], [HF])."""
    n = n_samples.long()
    for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
        n = torch.div(n - k, s, rounding_mode="floor") + 1
    return n


def receptive_field(cfg: ConvStack) -> int:
    """Samples seen by one frame = the shortest input giving one frame (400 for the paper's stack)."""
    field_, jump = 1, 1
    for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
        field_ += (k - 1) * jump
        jump *= s
    return field_


def frame_padding(padding_BN: Tensor, n_frames: int, cfg: ConvStack) -> Tensor:
    """Sample-rate padding (True = pad, right-padded rows) -> frame-rate padding [B, T] ([FS], [HF])."""
    lengths_B = feature_lengths((~padding_BN).sum(-1), cfg)
    return torch.arange(n_frames, device=padding_BN.device)[None, :] >= lengths_B[:, None]


def normalize_waveform(wav_BN: Tensor, padding_BN: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Per-utterance zero mean / unit variance over the valid samples; padding set to 0.

    fairseq ``F.layer_norm(wav, wav.shape)`` before padding (eps 1e-5); HF's feature extractor uses 1e-7.
    """
    x = wav_BN.float()
    if padding_BN is None:
        return F.layer_norm(x, x.shape[-1:], eps=eps).to(wav_BN.dtype)
    w = (~padding_BN).to(x.dtype)
    n = w.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(-1, keepdim=True) / n
    var = (((x - mean) * w) ** 2).sum(-1, keepdim=True) / n
    return ((x - mean) * torch.rsqrt(var + eps) * w).to(wav_BN.dtype)
