"""data2vec 2.0's light convolutional decoder (spec §5.3; [FS] ``modalities/modules.py`` ``Decoder1d`` /
``Decoder2d``): it sees the student's outputs at the kept positions and noise at the masked ones, in the
original order, and predicts the teacher's targets at every position.

Shape legend: B batch (clones included), T tokens, D encoder width, C decoder width, h/w patch grid.

``layers`` blocks of [conv (kernel k, padding k//2, ``groups``) -> LayerNorm over channels (no affine) ->
GELU], a residual between consecutive blocks whose shapes match (``residual``), then a projection back to
D: one Linear, or Linear(C, 2C) -> GELU -> Linear(2C, D) for text. The input dropout acts first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from d2v import gpu_conv
from d2v.config import ConfigError
from d2v.transformer import Dropout


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder of data2vec 2.0 (spec §5.3); each modality's ``data2vec2`` preset sets the paper's."""

    layers: int = 4
    """Conv blocks (vision base 6, audio 4, text 5)."""
    kernel: int = 7
    """Conv kernel: 1-D (audio 7, text 9) or k x k over the patch grid (vision 3)."""
    dim: int = 384
    """Conv channels C (audio base 384; vision and text: the encoder width)."""
    groups: int = 16
    """Conv groups (16; text 1)."""
    residual: bool = True
    """Residual connection between blocks of equal shape (text: none)."""
    projection: Literal["linear", "mlp"] = "linear"
    """Back to D: 'linear', or 'mlp' Linear(C, 2C) -> GELU -> Linear(2C, D) (text)."""
    input_dropout: float = 0.0
    """Dropout on the decoder input (audio, text 0.1; vision 0)."""

    def __post_init__(self) -> None:
        if self.layers < 1 or self.kernel < 1 or self.dim < 1 or self.groups < 1:
            raise ConfigError(
                f"decoder: layers, kernel, dim and groups must be >= 1, got {self.layers}, {self.kernel}, "
                f"{self.dim}, {self.groups}"
            )
        if self.kernel % 2 == 0:
            raise ConfigError(f"decoder.kernel must be odd (same-length padding k // 2), got {self.kernel}")
        if self.dim % self.groups:
            raise ConfigError(f"decoder.groups={self.groups} must divide decoder.dim={self.dim}")
        if not 0.0 <= self.input_dropout < 1.0:
            raise ConfigError(f"decoder.input_dropout must be in [0, 1), got {self.input_dropout}")


class _ChannelNorm(nn.Module):
    """LayerNorm over the channels of a channels-last [B, ..., C] without affine parameters ([FS]
    ``TransposeLast`` + ``LayerNorm(elementwise_affine=False)``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:])


def conv_channels_last(conv: nn.Conv1d | nn.Conv2d, x_BHWC: Tensor) -> Tensor:
    """``conv`` (stride 1, same padding) of a channels-last [B, h, w, C] (1-D: h = 1) -> [B, h, w, C'].

    The conv runs on the channels-last view (NCHW shape, NHWC memory), which oneDNN keeps channels-last,
    so the norm and GELU after it read contiguous channels: the channels-first form spends more time in
    strided element-wise kernels and layout copies than in the convs (benchmarks/RESULTS.md).
    """
    if isinstance(conv, nn.Conv2d) and conv.groups > 1 and gpu_conv.available(x_BHWC, conv.weight):
        # The image decoder's grouped 3 x 3 convs on CUDA, where cuDNN's own layout transposes cost more than
        # the convs (benchmarks/gpu_conv.py, benchmarks/RESULTS.md). Not the 1-D convs: there cuDNN is faster,
        # and dense ones (text) are cuDNN's strength.
        y = gpu_conv.conv_nhwc(x_BHWC, conv.weight, conv.groups)
        return y if conv.bias is None else y + conv.bias.to(y.dtype)  # as the conv's own bias under autocast
    w = conv.weight if conv.weight.dim() == 4 else conv.weight[:, :, None]
    kh, kw = w.shape[-2:]
    y = F.conv2d(x_BHWC.permute(0, 3, 1, 2), w, conv.bias, padding=(kh // 2, kw // 2), groups=conv.groups)
    return y.permute(0, 2, 3, 1)


class ConvDecoder(nn.Module):
    """``Decoder1d`` ([B, T, D] as a sequence) or, with ``grid``, ``Decoder2d`` (T = h * w patch tokens)."""

    def __init__(self, cfg: DecoderConfig, dim: int, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.cfg, self.grid = cfg, grid
        conv = nn.Conv1d if grid is None else nn.Conv2d
        widths = [dim] + [cfg.dim] * cfg.layers
        self.blocks = nn.ModuleList(
            nn.Sequential(
                conv(widths[i], cfg.dim, cfg.kernel, padding=cfg.kernel // 2, groups=cfg.groups),
                _ChannelNorm(),
                nn.GELU(),
            )
            for i in range(cfg.layers)
        )
        self.residual = [cfg.residual and widths[i] == cfg.dim for i in range(cfg.layers)]
        self.dropout = Dropout(cfg.input_dropout)
        if cfg.projection == "linear":
            self.proj: nn.Module = nn.Linear(cfg.dim, dim)
        else:
            self.proj = nn.Sequential(nn.Linear(cfg.dim, 2 * cfg.dim), nn.GELU(), nn.Linear(2 * cfg.dim, dim))

    def forward(self, x_BTD: Tensor) -> Tensor:
        """[B, T, D] (in the original token order; T = h * w for 2-D) -> predictions [B, T, D]."""
        B, T, D = x_BTD.shape
        if self.grid is not None:
            assert self.grid[0] * self.grid[1] == T, f"{T} tokens do not fill the grid {self.grid}"
        x = self.dropout(x_BTD).reshape(B, *(self.grid or (1, T)), D)  # channels-last [B, h, w, D]
        for (conv, norm, act), res in zip(self.blocks, self.residual):
            y = act(norm(conv_channels_last(conv, x)))
            x = x + y if res else y
        return self.proj(x.reshape(B, T, -1))
