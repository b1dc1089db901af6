"""data2vec 1.0: student, EMA teacher, contextualised targets and the regression loss.

Shape legend: B batch, T tokens, D width, K averaged layers, M masked tokens.

One step (§1.1 of the reference, [P1] §3):
1. ``local_features`` of the input (local encoder, shared between student and teacher unless the modality EMA's it);
2. student: masked tokens replaced by the mask embedding, full stack, last output -> regression head;
3. teacher (EMA copy, eval, no grad): unmasked input, top-K block taps, normalised per layer, averaged;
4. loss at masked positions only; 5. optimizer step (in the loop), then ``ema_step``.

Everything here is modality-blind: what differs lives in ``d2v/modalities/``.
The step does no host sync: masks are weights, not indices, and metrics are returned as tensors.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import ConfigError
from d2v.modalities.base import Data2VecTargets, Encoder

Norm = Literal["instance", "layer", "none"]


@dataclass(frozen=True)
class EMAConfig:
    """Teacher decay schedule (§1.2): tau rises linearly from tau0 to tau_end over tau_n updates."""

    tau0: float = 0.999
    """Teacher decay at the first update ([P1] §3.3): a lower one follows the student faster."""
    tau_end: float = 0.9999
    """Decay reached after ``tau_n`` updates and kept to the end ([P1] §3.3)."""
    tau_n: int = 30_000
    """Updates of the linear rise from tau0 to tau_end; 0: tau_end throughout. The defaults are speech's
    0.999 -> 0.9999 over 30k ([P1] §4.2); each modality's ``ModelConfig`` sets its own."""

    def __post_init__(self) -> None:
        for name in ("tau0", "tau_end"):  # messages relative to the section (from_dict adds its path)
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.tau_n < 0:
            raise ConfigError(f"tau_n must be >= 0, got {self.tau_n}")


# --------------------------------------------------------------------------------------------- pure math


def ema_decay(step: int, cfg: EMAConfig) -> float:
    """tau at update ``step`` (fairseq ``get_annealed_rate``): linear tau0 -> tau_end, then constant."""
    if cfg.tau0 == cfg.tau_end or step >= cfg.tau_n:
        return cfg.tau_end
    return cfg.tau_end - (cfg.tau_end - cfg.tau0) * (1.0 - step / cfg.tau_n)


def normalize(x_BTD: Tensor, kind: Norm) -> Tensor:
    """Parameter-less target normalisation (§1.5), in fp32.

    'instance': per sample and channel over time (speech; padded frames included, as in fairseq);
    'layer': per token over channels (text, vision).
    """
    x = x_BTD.float()
    if kind == "instance":
        return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:])
    return x


def build_targets(layers_K: list[Tensor], cfg: Data2VecTargets) -> Tensor:
    """``y = N_final(mean_k N_layer(a_k))`` over the top-K taps: [B, T, D] each -> [B, T, D] fp32."""
    top = layers_K[-cfg.top_k :]
    y = sum(normalize(a, cfg.layer_norm) for a in top) / len(top)
    return normalize(y, cfg.final_norm)


def regression_loss(pred_BTD: Tensor, target_BTD: Tensor, mask_BT: Tensor, cfg: Data2VecTargets) -> Tensor:
    """Smooth L1 (beta > 0) or L2 (beta == 0) at masked positions (§1.7).

    'token': per-token sum over D, times ``loss_scale`` (None: 1/sqrt(D)), mean over masked tokens;
    'element': mean over masked tokens x D ([DV] ``smooth_l1_loss`` with mean reduction).
    The mask is used as a weight, not an index, so the step needs no host sync.
    """
    pred, target = pred_BTD.float(), target_BTD.float()
    if cfg.loss_beta == 0:
        err = F.mse_loss(pred, target, reduction="none")
    else:
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=cfg.loss_beta)
    w = mask_BT.to(err.dtype)
    n = w.sum().clamp_min(1.0)
    per_token = err.sum(-1)
    if cfg.loss_reduction == "element":
        return (per_token * w).sum() / (n * err.shape[-1])
    scale = cfg.loss_scale if cfg.loss_scale is not None else 1.0 / math.sqrt(err.shape[-1])
    return (per_token * w).sum() / n * scale


def masked_std(x_BTD: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean over channels of the std over masked tokens (fairseq ``compute_var``): collapse monitor."""
    x = x_BTD.detach().float()
    w = mask_BT.to(x.dtype)[..., None]
    n = w.sum().clamp_min(2.0)
    mean = (x * w).sum((0, 1)) / n
    var = (((x - mean) ** 2) * w).sum((0, 1)) / (n - 1)
    return torch.sqrt(var + 1e-6).mean()


# ------------------------------------------------------------------------------------------------ model


class Data2Vec(nn.Module):
    """Student encoder + regression head + EMA teacher (a frozen, fp32 copy of the encoder).

    ``forward(batch) -> (loss, metrics)`` with ``batch``:
      inputs [B, N] (or [B, 3, H, W]), padding_mask [B, N] bool or absent, mask [B, T] bool (True = masked,
      at the token rate, prefix tokens excluded), and optionally student_inputs (the student's corrupted
      view when the modality masks in input space, e.g. text's <mask> ids).
    """

    def __init__(self, encoder: Encoder, head: nn.Module, targets: Data2VecTargets, ema: EMAConfig) -> None:
        super().__init__()
        if targets.top_k > encoder.transformer.depth:
            raise ConfigError(
                f"targets.top_k={targets.top_k} exceeds the encoder depth {encoder.transformer.depth}"
            )
        self.student = encoder
        self.head = head
        self.targets = targets
        self.ema = ema
        # The teacher starts as a copy of the student (fairseq makes it at the first update: the same).
        self.teacher = copy.deepcopy(encoder).float()
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self._ema_pairs, self._copy_pairs = self._ema_plan()

    def train(self, mode: bool = True) -> Data2Vec:
        super().train(mode)
        self.teacher.eval()  # teacher mode: no dropout, no LayerDrop (§1.1)
        return self

    def _ema_plan(self) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
        """Which teacher tensors are averaged and which are copied from the student (§1.3)."""
        local = tuple(self.student.local_modules)
        shared = self.targets.ema_shared
        shared = tuple(self.student.shared_with_teacher if shared is None else shared)
        s_params = dict(self.student.named_parameters())
        ema_pairs, copy_pairs = [], []
        for name, t in self.teacher.named_parameters():
            s = s_params[name]
            if name.startswith(local) and not self.targets.ema_local_encoder:
                continue  # the teacher reuses the student's local features: its copy is never read
            if name.startswith(shared) or not s.requires_grad:
                copy_pairs.append((t, s))  # fairseq ``skip_keys`` / frozen params are copied
            else:
                ema_pairs.append((t, s))
        s_bufs = dict(self.student.named_buffers())
        copy_pairs += [(t, s_bufs[n]) for n, t in self.teacher.named_buffers() if n in s_bufs]
        return ema_pairs, copy_pairs

    @torch.no_grad()
    def ema_step(self, tau: float) -> None:
        """``teacher <- tau * teacher + (1 - tau) * student`` in fp32; shared parts copied (§1.2-1.3)."""
        if self._copy_pairs:
            torch._foreach_copy_([t for t, _ in self._copy_pairs], [s for _, s in self._copy_pairs])
        if tau >= 1.0 or not self._ema_pairs:
            return  # tau == 1: frozen teacher (fairseq skips the step)
        teacher = [t for t, _ in self._ema_pairs]
        student = [s.detach().float() for _, s in self._ema_pairs]
        torch._foreach_lerp_(teacher, student, 1.0 - tau)

    @torch.no_grad()
    def teacher_targets(
        self, inputs: Tensor, raw_pad: Tensor | None, x_BTD: Tensor, padding_BT: Tensor | None
    ) -> Tensor:
        """Normalised top-K average of the teacher's taps on the unmasked input: [B, T, D] fp32.

        ``x_BTD`` are the student's local features of the same input, reused when the local encoder is
        shared (speech, text: [P1] §3.3); a modality that EMA's it (vision, [DV]) embeds again.
        """
        if self.targets.ema_local_encoder:
            x_BTD, padding_BT = self.teacher.local_features(inputs, raw_pad)
        out = self.teacher.contextualize(x_BTD.detach(), padding_BT, tap=self.targets.tap)
        p = self.student.num_prefix_tokens
        return build_targets([a[:, p:] for a in out.layers], self.targets)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, raw_pad, mask = batch["inputs"], batch.get("padding_mask"), batch["mask"]
        x, pad = self.student.local_features(inputs, raw_pad)
        if "student_inputs" in batch:
            xs, _ = self.student.local_features(batch["student_inputs"], raw_pad)
        else:
            xs = self.student.apply_mask(x, mask)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(x.shape[:2])} (B, T)")
        y = self.teacher_targets(inputs, raw_pad, x, pad)
        out = self.student.contextualize(xs, pad)
        pred = self.head(out.x_BTD[:, self.student.num_prefix_tokens :])
        loss = regression_loss(pred, y, mask, self.targets)
        metrics = {
            "loss": loss.detach(),
            "target_var": masked_std(y, mask),
            "pred_var": masked_std(pred, mask),
            "masked_frac": mask.float().mean(),
        }
        return loss, metrics
