"""Span masking of speech frames (fairseq ``compute_mask_indices``, static lengths, overlaps allowed).

Shape legend: B batch, T frames (of the longest input, or of ``padded_len``).

Per row with ``T_i`` valid frames ([P1] §4.2, [FS] ``fairseq/data/data_utils.py`` as used for data2vec 1.0):
``num_spans = max(min_masks, int(mask_prob * T_i / mask_length + U(0, 1)))`` start frames are drawn without
replacement among the ``T_i - mask_length`` starts whose span fits (if that is not more than ``num_spans``:
among ``num_spans + 1`` starts, spans cut at ``T_i``); each masks ``mask_length`` frames; spans may overlap.
Expected masked fraction: a frame stays visible iff none of the ``mask_length`` starts before it is drawn,
about ``(1 - mask_prob / mask_length) ** mask_length`` -> 1 - 0.935**10 = 48.9 % for 0.65 / 10 (a little less
for short rows, whose edges are hit less). ``require_same_masks`` then trims every row to the batch's
smallest masked count by a random subset, so rows of a batch mask the same number of frames (the batch
minimum: 45 % on average for 8 rows of 10 s). Frames beyond a row's length are never masked. Rows of very
different lengths would all be trimmed to the shortest row's count (8 rows of 2-20 s: 18 % masked), which is
why fairseq pre-training crops each batch to its shortest utterance instead of padding (``RawAudioDataset``
with ``pad: false``).
(Later fairseq, for data2vec 2.0, draws starts among all ``T_i`` frames and cuts spans at the end.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from d2v.config import ConfigError
from d2v.modalities.audio.frames import feature_lengths

if TYPE_CHECKING:  # the type only: the data loader imports this module, never the encoder
    from d2v.modalities.audio.model import ModelConfig


@dataclass(frozen=True)
class FinetuneMask:
    """Masking while fine-tuning, a speech recipe: wav2vec 2.0 fine-tuning, which data2vec keeps ([P1] §4.2,
    spec §3.1; [FS] ``Wav2Vec2AsrConfig`` ``apply_mask: true``). The reference values are those of
    fairseq's ``base_10m`` / ``base_1h`` (few labels): time 0.65 x 10 frames, channels 0.25 x 64 (of 768)."""

    prob: float = 0.65
    """Time masks: ``prob * T / length`` spans per row replaced by ``mask_emb`` ([FS] ``mask_prob``)."""
    length: int = 10
    """Frames per time span ([FS] ``mask_length``)."""
    min_masks: int = 2
    """At least this many time spans per row ([FS] ``apply_mask``: ``min_masks=2``)."""
    channel_prob: float = 0.25
    """Channel masks: ``channel_prob * D / channel_length`` spans of feature channels zeroed over all
    frames ([FS] ``mask_channel_prob``; 0.5 for 10 h and more labels)."""
    channel_length: int = 64
    """Channels per span ([FS] ``mask_channel_length``, for D = 768; scale it with the width)."""

    def __post_init__(self) -> None:
        for name in ("prob", "channel_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"mask.{name}: must be in [0, 1), got {getattr(self, name)}")
        for name in ("length", "channel_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mask.{name}: must be >= 1, got {getattr(self, name)}")
        if self.min_masks < 0:
            raise ConfigError(f"mask.min_masks: must be >= 0, got {self.min_masks}")


def span_starts(
    n_frames: int, num_spans: int, span: int, generator: torch.Generator, anywhere: bool = False
) -> Tensor:
    """``num_spans`` distinct start frames for spans of ``span`` frames in a row of ``n_frames``; with
    ``anywhere`` (data2vec 2.0's fairseq) among all frames, spans then cut at the row end."""
    n_starts = n_frames if anywhere else n_frames - span
    if n_starts <= num_spans:  # [FS]: ``min_len = sz - num_mask - 1``
        n_starts = num_spans + 1
    return torch.randperm(n_starts, generator=generator)[:num_spans]


def span_mask(
    lengths: list[int],
    T: int,
    prob: float,
    span: int,
    min_masks: int,
    same: bool,
    generator: torch.Generator,
    anywhere: bool = False,
) -> Tensor:
    """Bool [B, T] (True = masked): fairseq ``compute_mask_indices`` for rows of ``lengths`` valid positions.

    ``max(min_masks, int(prob * n / span + U(0, 1)))`` spans of ``span`` positions per row of ``n``;
    ``same`` trims every row to the batch's smallest count (``require_same_masks``). Positions are frames
    (time masks) or feature channels (fine-tuning channel masks, every row of length D).
    """
    rows = []
    for n in lengths:
        u = float(torch.rand((), generator=generator))
        num = max(min_masks, int(prob * n / span + u))
        if num == 0 or n == 0:
            rows.append(torch.zeros(0, dtype=torch.long))
            continue
        starts = span_starts(n, num, span, generator, anywhere)
        idx = (starts[:, None] + torch.arange(span)).flatten()
        rows.append(torch.unique(idx[idx < n]))
    if same and rows:
        k = min(len(r) for r in rows)
        rows = [r if len(r) == k else r[torch.randperm(len(r), generator=generator)[:k]] for r in rows]
    mask_BT = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask_BT[i, r] = True
    return mask_BT


def frame_counts(
    n_samples_B: Tensor, cfg: ModelConfig, padded_len: int | None = None
) -> tuple[list[int], int]:
    """Valid frames per row and T (frames of the longest waveform, or of ``padded_len`` samples)."""
    lengths = feature_lengths(n_samples_B.detach().cpu().long(), cfg).clamp_min(0).tolist()
    n_max = int(n_samples_B.max()) if padded_len is None else padded_len
    T = int(feature_lengths(torch.tensor(n_max), cfg).clamp_min(0))
    if max(lengths, default=0) > T:
        raise ValueError(f"padded_len={padded_len} is shorter than the longest waveform ({n_max} samples)")
    return lengths, T


def make_mask(
    n_samples_B: Tensor,
    cfg: ModelConfig,
    generator: torch.Generator,
    padded_len: int | None = None,
) -> Tensor:
    """Pretraining bool mask [B, T] (True = masked) for waveforms of ``n_samples_B`` samples; data2vec 2.0:
    [B * M, T], rows b*M .. b*M+M-1 for clip b (M = ``v2.clones``).

    T is the frame count of the longest waveform, or of ``padded_len`` samples when the batch is padded
    further. Only ``generator`` is drawn from, so the same generator state gives the same mask.
    """
    lengths, T = frame_counts(n_samples_B, cfg, padded_len)
    v2 = cfg.algorithm == "data2vec2"
    if v2:  # ``v2.clones`` masks per clip, every row of the clone batch masking the same count (spec §5.4)
        lengths = [n for n in lengths for _ in range(cfg.v2.clones)]
    return span_mask(
        lengths, T, cfg.mask_prob, cfg.mask_length, cfg.min_masks, cfg.require_same_masks or v2, generator, v2
    )


def finetune_masks(
    n_samples_B: Tensor, cfg: ModelConfig, spec: FinetuneMask, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Fine-tuning masks (wav2vec 2.0 fine-tuning, kept by data2vec: spec §3.1): time [B, T] and
    channel [B, D] bools, True = masked.

    [FS] ``Wav2Vec2AsrConfig`` + ``apply_mask``: time spans replaced by ``mask_emb`` (``min_masks`` 2,
    ``require_same_masks`` as in pretraining), then channel spans of the projected features zeroed over
    every frame (``mask_channel_before: false``; per-row counts, ``min_masks`` 0, made the same per batch).
    """
    lengths, T = frame_counts(n_samples_B, cfg)
    time_BT = span_mask(lengths, T, spec.prob, spec.length, spec.min_masks, cfg.require_same_masks, generator)
    D = cfg.transformer.dim
    channel_BD = span_mask([D] * len(lengths), D, spec.channel_prob, spec.channel_length, 0, True, generator)
    return time_BT, channel_BD
