"""Text masking in input space: which ids the student sees replaced, and which positions carry the loss.

Shape legend: B batch, T tokens.

Two strategies (spec §2.3, §11 "NLP masking"):
- 'bert' ([P1] §4.3): round(p * n) of a row's n maskable tokens are selected; each becomes <mask> with
  probability 0.8, a random non-special token with 0.1, and stays unchanged with 0.1 (fairseq
  ``MaskTokensDataset`` draws this per selected position).
- 'span' ([FS] config/text/pretraining/base.yaml: mask_prob 0.35, mask_multiple_length 4, no random / kept
  tokens): int(p * n / L + u) span starts, u ~ U[0, 1) (fairseq's probabilistic rounding), chosen without
  replacement; each span covers L tokens, cut at specials, padding and the row end. Spans overlap, so the
  covered fraction is about 1 - (1 - p / L) ** L (0.31 for p 0.35, L 4), as in fairseq.

Loss positions: only ids replaced by <mask>. fairseq scores ``src_tokens.eq(mask_idx)`` (spec §1.6), and
that code produced the paper's numbers, so with 'bert' the 10 % random and 10 % kept positions are corrupted
(or not) but carry no loss; BERT itself would score all selected positions.

<s>, </s>, <pad> ids and padding positions are never masked. The generator is the only randomness source.
"""

from __future__ import annotations

import torch
from torch import Tensor

from d2v.modalities.text.model import ModelConfig

RANDOM_TOKEN_PROB = 0.1
"""'bert': share of selected tokens replaced by a random non-special id ([P1] §4.3)."""
LEAVE_UNMASKED_PROB = 0.1
"""'bert': share of selected tokens left unchanged ([P1] §4.3)."""


def maskable(ids_BT: Tensor, padding_BT: Tensor | None, cfg: ModelConfig) -> Tensor:
    """[B, T] bool: True where a token may be masked (not padding, not <s> / </s> / <pad>)."""
    ok_BT = ~(ids_BT.eq(cfg.bos_id) | ids_BT.eq(cfg.eos_id) | ids_BT.eq(cfg.pad_id))
    return ok_BT if padding_BT is None else ok_BT & ~padding_BT


def choose(ok_BT: Tensor, k_B: Tensor, generator: torch.Generator) -> Tensor:
    """[B, T] bool with k_B[b] positions of row b chosen uniformly without replacement among ``ok_BT``."""
    scores_BT = torch.rand(ok_BT.shape, generator=generator, device=ok_BT.device).masked_fill(~ok_BT, 2.0)
    rank_BT = scores_BT.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    return rank_BT < k_B.clamp(max=ok_BT.sum(1))[:, None]


def spans_from_starts(starts_BT: Tensor, length: int) -> Tensor:
    """[B, T] bool: every start extended to ``length`` tokens to its right (cut at the row end)."""
    out_BT = starts_BT.clone()
    for i in range(1, min(length, starts_BT.shape[1])):
        out_BT[:, i:] |= starts_BT[:, :-i]
    return out_BT


def random_mask(
    ids_BT: Tensor, padding_BT: Tensor | None, cfg: ModelConfig, clones: int, generator: torch.Generator
) -> Tensor:
    """data2vec 2.0: ``clones`` masks per row, [B * clones, T] bool (rows b*M .. b*M+M-1 for row b).

    ``floor(mask_prob * n)`` of a row's n maskable tokens, uniformly without replacement; every row then
    masks the batch's smallest count (the student keeps the same number of tokens in every row; fairseq
    ``require_same_masks``). Padding and <s> / </s> are never masked.
    """
    ok_BT = maskable(ids_BT, padding_BT, cfg).repeat_interleave(clones, 0)
    k = int(torch.floor(cfg.resolved_mask_prob * ok_BT.sum(1)).min()) if len(ok_BT) else 0
    return choose(ok_BT, torch.full((len(ok_BT),), k), generator)


def make_mask(
    ids_BT: Tensor, padding_BT: Tensor | None, cfg: ModelConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Corrupt ids for the student: ``(student_ids_BT int64, mask_BT bool)``; mask_BT = loss positions.

    data2vec 2.0 drops the masked tokens instead of corrupting them: ``(ids_BT unchanged, mask [B*M, T])``
    (:func:`random_mask`)."""
    if ids_BT.dtype != torch.int64 or ids_BT.dim() != 2:
        raise ValueError(f"make_mask expects int64 ids [B, T]; got {ids_BT.dtype} {tuple(ids_BT.shape)}")
    if bool(ids_BT.eq(cfg.mask_id).any()):
        raise ValueError(f"ids already contain <mask> (id {cfg.mask_id}); the data must be uncorrupted text")
    if cfg.algorithm == "data2vec2":
        return ids_BT, random_mask(ids_BT, padding_BT, cfg, cfg.v2.clones, generator)
    ok_BT = maskable(ids_BT, padding_BT, cfg)
    n_B = ok_BT.sum(1)
    p, shape = cfg.resolved_mask_prob, ids_BT.shape
    if cfg.mask_strategy == "random":
        mask_BT = choose(ok_BT, torch.floor(p * n_B).long(), generator)
        return ids_BT.masked_fill(mask_BT, cfg.mask_id), mask_BT
    if cfg.mask_strategy == "bert":
        selected_BT = choose(ok_BT, torch.floor(p * n_B + 0.5).long(), generator)
        u_BT = torch.rand(shape, generator=generator, device=ids_BT.device)
        mask_BT = selected_BT & (u_BT < 1.0 - RANDOM_TOKEN_PROB - LEAVE_UNMASKED_PROB)
        random_BT = selected_BT & ~mask_BT & (u_BT < 1.0 - LEAVE_UNMASKED_PROB)
        rand_ids_BT = torch.randint(
            cfg.num_special, cfg.vocab_size, shape, generator=generator, device=ids_BT.device
        )
        student_BT = torch.where(random_BT, rand_ids_BT, ids_BT).masked_fill(mask_BT, cfg.mask_id)
        return student_BT, mask_BT
    length = cfg.resolved_mask_length
    u_B = torch.rand(n_B.shape, generator=generator, device=ids_BT.device)
    starts_BT = choose(ok_BT, torch.floor(p * n_B / length + u_B).long(), generator)
    mask_BT = spans_from_starts(starts_BT, length) & ok_BT
    return ids_BT.masked_fill(mask_BT, cfg.mask_id), mask_BT
