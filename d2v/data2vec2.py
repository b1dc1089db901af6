"""data2vec 2.0: the student encodes only the kept tokens, a light conv decoder fills in the rest, and each
sample is masked M times against one teacher pass (spec §5; [P2]; [FS] ``models/data2vec2.py``).

Shape legend: B original samples, M clones per sample, T tokens, K kept tokens per row, P prefix tokens
(vision's CLS), D width.

One step (spec §5.1), everything else as in data2vec 1.0 (``d2v/data2vec.py``: EMA teacher, top-K targets):
1. ``local_features`` once per original sample; the teacher's targets once per original sample;
2. clone features M times (``repeat_interleave``), one mask per clone (the loader draws them);
3. zero the masked tokens, add positions on the full sequence (speech: the conv positions then never see
   masked content), keep the K unmasked tokens (every row keeps the same K), run the blocks on them;
4. decoder input = student outputs at the kept positions, N(0, 0.01^2) at the masked ones, in the original
   order; the decoder predicts every position; L2 loss at the masked ones against the repeated targets;
5. vision adds the CLS loss: the CLS output regresses the mean target of its image (weight 0.01).
The step does no host sync: the kept indices come from the loader (computed on the CPU with the masks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from d2v.config import ConfigError
from d2v.data2vec import Data2Vec, EMAConfig, masked_std, regression_loss
from d2v.decoder import DecoderConfig
from d2v.modalities.base import Data2VecTargets, Encoder

Algorithm = Literal["data2vec", "data2vec2"]
"""``model.<m>.algorithm``: which recipe pretrains the encoder; fine-tuning and embedding are the same."""


@dataclass(frozen=True)
class Data2Vec2Config:
    """What data2vec 2.0 adds to a modality's model section (``model.<m>.v2``; spec §5.3-5.6)."""

    clones: int = 8
    """M: masks (clones) per sample, one teacher pass for all (vision 16, speech and text 8)."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """The light conv decoder (spec §5.3)."""
    mask_noise_std: float = 0.01
    """Std of the random vectors the decoder sees at masked positions ([FS] ``mask_noise_std``)."""
    cls_loss: float = 0.0
    """Weight of the CLS loss (vision 0.01): the CLS output regresses its image's mean target."""

    def __post_init__(self) -> None:
        if self.clones < 1:
            raise ConfigError(f"v2.clones must be >= 1, got {self.clones}")
        if self.mask_noise_std < 0 or self.cls_loss < 0:
            raise ConfigError(
                f"v2.mask_noise_std and v2.cls_loss must be >= 0, got {self.mask_noise_std}, {self.cls_loss}"
            )


# --------------------------------------------------------------------------------------------- pure math


def keep_indices(mask_BT: Tensor) -> Tensor:
    """Indices [B, K] of the unmasked tokens of each row, in their original order.

    Every row must keep the same number K (the masks are made so); reads the count on the host, so call it
    where the mask lives on the CPU (the loader), not inside the step.
    """
    kept_B = (~mask_BT).sum(1)
    if kept_B.numel() and bool((kept_B != kept_B[0]).any()):
        raise ValueError(f"every row must keep the same number of tokens, got {sorted(set(kept_B.tolist()))}")
    K = int(kept_B[0]) if kept_B.numel() else 0
    order_BT = torch.argsort(mask_BT.to(torch.int8), dim=1, stable=True)  # kept (0) first, in order
    return order_BT[:, :K]


def gather_tokens(x_BTD: Tensor, idx_BK: Tensor) -> Tensor:
    """``x[b, idx[b, k]]``: [B, T, D] (or [B, T]) -> [B, K, D] (or [B, K])."""
    if x_BTD.dim() == 2:
        return torch.gather(x_BTD, 1, idx_BK)
    return torch.gather(x_BTD, 1, idx_BK[..., None].expand(-1, -1, x_BTD.shape[-1]))


def decoder_input(h_BKD: Tensor, idx_BK: Tensor, T: int, noise_std: float) -> Tensor:
    """Encoder outputs back at their positions, N(0, noise_std^2) elsewhere: [B, K, D] -> [B, T, D]
    ([FS] ``decoder_input``: append noise for the masked tokens, un-shuffle with ``ids_restore``)."""
    B, _, D = h_BKD.shape
    noise = torch.randn(B, T, D, device=h_BKD.device, dtype=h_BKD.dtype) * noise_std
    return noise.scatter(1, idx_BK[..., None].expand(-1, -1, D), h_BKD)


def cls_regression(cls_BD: Tensor, target_BD: Tensor) -> Tensor:
    """Summed L2 x 1/sqrt(D) of the CLS outputs against the mean targets (spec §5.6: the criterion sums
    it over the clones of the batch, weighted by ``cls_loss``, next to the mean token loss)."""
    err = (cls_BD.float() - target_BD.float()) ** 2
    return err.sum() / math.sqrt(err.shape[-1])


# ------------------------------------------------------------------------------------------------ model


class Data2Vec2(Data2Vec):
    """Student encoder + conv decoder + EMA teacher of the encoder (the decoder never enters the EMA).

    ``forward(batch) -> (loss, metrics)`` with ``batch``: inputs [B, N] (or [B, 3, H, W]), padding_mask
    [B, N] or absent, mask [B*M, T] bool (True = masked; the M masks of sample b are rows b*M .. b*M+M-1)
    and keep [B*M, K] (:func:`keep_indices` of the mask, made by the loader; computed here when absent).
    """

    def __init__(
        self, encoder: Encoder, decoder: nn.Module, targets: Data2VecTargets, ema: EMAConfig, v2: Data2Vec2Config
    ) -> None:
        super().__init__(encoder, decoder, targets, ema)
        self.v2 = v2

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, raw_pad, mask = batch["inputs"], batch.get("padding_mask"), batch["mask"]
        M, P = self.v2.clones, self.student.num_prefix_tokens
        x, pad = self.student.local_features(inputs, raw_pad)
        B, T, D = x.shape
        if mask.shape != (B * M, T):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(B * M, T)} (B x clones, T)")
        y = self.teacher_targets(inputs, raw_pad, x, pad)  # [B, T, D], once per original sample
        keep = batch.get("keep")
        keep = keep_indices(mask) if keep is None else keep

        x = x.repeat_interleave(M, 0).masked_fill(mask[..., None], 0.0)
        pad = None if pad is None else pad.repeat_interleave(M, 0)
        x = gather_tokens(self.student.add_positions(x, pad), keep)
        out = self.student.encode_tokens(x, None if pad is None else gather_tokens(pad, keep))
        pred = self.head(decoder_input(out.x_BTD[:, P:], keep, T, self.v2.mask_noise_std))

        y = y.repeat_interleave(M, 0)
        loss = regression_loss(pred, y, mask, self.targets)
        metrics = {
            "target_var": masked_std(y, mask),
            "pred_var": masked_std(pred, mask),
            "masked_frac": mask.float().mean(),
        }
        if self.v2.cls_loss > 0 and P > 0:
            cls = cls_regression(out.x_BTD[:, P - 1], y.mean(1))
            metrics["cls_loss"] = cls.detach()
            loss = loss + self.v2.cls_loss * cls
        metrics["loss"] = loss.detach()
        return loss, metrics
