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

import torch
from torch import Tensor

from d2v.modalities.audio.model import ModelConfig, feature_lengths


def span_starts(n_frames: int, num_spans: int, span: int, generator: torch.Generator) -> Tensor:
    """``num_spans`` distinct start frames for spans of ``span`` frames in a row of ``n_frames``."""
    n_starts = n_frames - span
    if n_starts <= num_spans:  # [FS]: ``min_len = sz - num_mask - 1``
        n_starts = num_spans + 1
    return torch.randperm(n_starts, generator=generator)[:num_spans]


def make_mask(
    n_samples_B: Tensor,
    cfg: ModelConfig,
    generator: torch.Generator,
    padded_len: int | None = None,
) -> Tensor:
    """Bool mask [B, T] (True = masked) for waveforms of ``n_samples_B`` samples.

    T is the frame count of the longest waveform, or of ``padded_len`` samples when the batch is padded
    further. Only ``generator`` is drawn from, so the same generator state gives the same mask.
    """
    lengths = feature_lengths(n_samples_B.detach().cpu().long(), cfg).clamp_min(0).tolist()
    n_max = int(n_samples_B.max()) if padded_len is None else padded_len
    T = int(feature_lengths(torch.tensor(n_max), cfg).clamp_min(0))
    if max(lengths, default=0) > T:
        raise ValueError(f"padded_len={padded_len} is shorter than the longest waveform ({n_max} samples)")
    rows = []
    for n in lengths:
        u = float(torch.rand((), generator=generator))
        num = max(cfg.min_masks, int(cfg.mask_prob * n / cfg.mask_length + u))
        starts = span_starts(n, num, cfg.mask_length, generator)
        idx = (starts[:, None] + torch.arange(cfg.mask_length)).flatten()
        rows.append(torch.unique(idx[idx < n]))
    if cfg.require_same_masks and rows:
        k = min(len(r) for r in rows)
        rows = [r if len(r) == k else r[torch.randperm(len(r), generator=generator)[:k]] for r in rows]
    mask_BT = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask_BT[i, r] = True
    return mask_BT
