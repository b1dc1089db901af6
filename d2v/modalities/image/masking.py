"""BEiT block-wise masking ([DV] / BEiT ``MaskingGenerator``; spec §2.4).

Per image: repeatedly draw a rectangle of area ~ U[min_block, remaining] patches (BEiT caps a block at the
remaining count) and aspect ratio log-uniform in [a, 1/a]; the rectangle must be strictly smaller than
the grid in both directions and must add between 1 and ``remaining`` new patches, else it is redrawn
(10 tries). Stop when the target count ``round(mask_ratio * T)`` is reached or 10 tries in a row fail.

Realised fraction: never above the target (a block never adds more than the remaining count), sometimes
below it when the last patches cannot be placed. Measured over 20,000 masks (seed 0): 14x14 (ViT-B,
target 118 = 60.2 %): 69 % exactly 118, mean 117.5, min 104 (53.1 %); 7x7 (``small``, target 29 = 59.2 %):
95 % exactly 29, min 24 (49.0 %); 4x4 (``tiny``, target 10): 99.5 % exactly 10, but one mask in 20,000
stayed empty (10 failed tries for the first block: blocks must be strictly smaller than the grid).
Rounding h and w, and the last blocks (capped by the remaining count), give ~9 % of masked regions below
``min_block`` (i.i.d. masking: 55-82 %).
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

from d2v.modalities.image.model import ModelConfig


def _block_mask(
    h: int, w: int, target: int, min_block: int, min_aspect: float, rng: random.Random
) -> list[bool]:
    """One h x w mask (row-major) following BEiT's ``MaskingGenerator.__call__`` / ``_mask``."""
    mask = [[False] * w for _ in range(h)]
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    count = 0
    while count < target:
        remaining = target - count  # BEiT: min(remaining, max_num_patches); [DV] max = all patches
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_block, remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                new = sum(not mask[i][j] for i in range(top, top + bh) for j in range(left, left + bw))
                if 0 < new <= remaining:
                    for i in range(top, top + bh):
                        for j in range(left, left + bw):
                            mask[i][j] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return [v for row in mask for v in row]


def inverse_block_mask(
    n: int, grid: tuple[int, int], mask_ratio: float, adjust: float, block: int, generator: torch.Generator
) -> Tensor:
    """data2vec 2.0's inverse block masks [n, h*w] (True = masked), every row with exactly
    ``h*w - int(h*w * (1 - mask_ratio))`` masked patches ([FS] ``compute_block_mask_2d``, ``inverse_mask``;
    spec §5.4).

    Choose what to *keep*: ``int(T * (1 - mask_ratio + adjust) / block**2)`` random centres, each keeps the
    ``block x block`` square around it (clamped at the borders; ``adjust`` makes up for overlaps); then
    uniformly random single patches are dropped from or added to the kept set until it holds exactly the
    target count; the mask is the rest. Only ``generator`` is drawn from.
    """
    h, w = grid
    T = h * w
    keep_target = int(T * (1.0 - mask_ratio))
    n_centres = int(T * ((1.0 - mask_ratio + adjust) / block**2))
    kept = torch.zeros(n, h, w, dtype=torch.bool)
    if n_centres > 0:
        centres = torch.randint(0, T, (n, n_centres), generator=generator)
        rows = torch.arange(n)[:, None, None].expand(-1, n_centres, block * block)
        off = torch.arange(block) - block // 2
        di, dj = torch.meshgrid(off, off, indexing="ij")
        ci = (centres // w)[..., None] + di.flatten()
        cj = (centres % w)[..., None] + dj.flatten()
        kept[rows, ci.clamp(0, h - 1), cj.clamp(0, w - 1)] = True
    return ~exactly_k(kept.view(n, T), keep_target, generator)


def exactly_k(kept_NT: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Each row of ``kept_NT`` (bool [N, T]) with exactly ``k`` True ([FS] ``require_same_masks``, which
    drops uniformly random True entries or adds uniformly random others): a uniform subset of its True
    entries when it has more, all of them and a uniform subset of the rest when fewer -> bool [N, T].

    One top-k of (kept + U[0, 1)) draws every row at once: a per-row multinomial loop is a large share of a
    GPU data worker's time per image (benchmarks/RESULTS.md).
    """
    score_NT = kept_NT.float() + torch.rand(kept_NT.shape, generator=generator)
    out_NT = torch.zeros_like(kept_NT)
    return out_NT.scatter_(1, score_NT.topk(k, dim=1, sorted=False).indices, True)


def make_mask(batch_size: int, cfg: ModelConfig, generator: torch.Generator) -> Tensor:
    """Pretraining masks ``mask_BT`` (bool, True = masked, T = grid h*w, row-major) for one batch.

    data2vec: BEiT block-wise masks, one per image. data2vec 2.0: inverse block masks, ``v2.clones`` per
    image (rows b*M .. b*M+M-1 belong to image b). All randomness comes from ``generator``, so the same
    generator state gives the same masks.
    """
    if cfg.algorithm == "data2vec2":
        n = batch_size * cfg.v2.clones
        return inverse_block_mask(n, cfg.grid, cfg.mask_ratio, cfg.mask_adjust, cfg.mask_block, generator)
    h, w = cfg.grid
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = random.Random(seed)
    rows = [
        _block_mask(h, w, cfg.num_masked, cfg.min_block, cfg.mask_min_aspect, rng) for _ in range(batch_size)
    ]
    return torch.tensor(rows, dtype=torch.bool).view(batch_size, h * w)
