"""AdamW with decay/no-decay (and layer-decay) parameter groups, and the two LR schedules of the papers.

Both schedules are pure functions of the step (``lr_scale``) wrapped in a ``LambdaLR``, so a resumed run
recomputes the same LR from the saved step and the scheduler state is only a counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from d2v.config import ConfigError

Schedule = Literal["cosine", "tri_stage"]

# Parameters that are "tokens" rather than weights: BEiT's ``no_weight_decay()`` set (cls_token, pos_embed,
# relative_position_bias_table) plus the learned mask embeddings (spec §5.7: no decay on 1-D params,
# biases, embeddings and tokens).
NO_DECAY_NAMES = ("cls_token", "mask_emb", "mask_token", "pos_embed", "rel_pos", "relative_position")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d, nn.Embedding)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + LR schedule (spec §2.2-2.5, §3, §5.7). params.yaml sets the per-modality values."""

    lr: float = 5e-4
    """Peak learning rate (speech 5e-4, text 2e-4, vision 2e-3 at batch 2048)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas: speech/text (0.9, 0.98), vision (0.9, 0.999)."""
    eps: float = 1e-6
    """Adam epsilon: speech/text 1e-6, vision 1e-8."""
    weight_decay: float = 0.01
    """Decoupled weight decay on matrices only: speech/text 0.01, vision 0.05."""
    schedule: Schedule = "cosine"
    """'tri_stage' (speech: warm-up, hold, exponential decay) or 'cosine' (text config, vision)."""
    warmup: float = 0.03
    """Fraction of the steps with linear warm-up (speech 0.03, text 10k/1M = 0.01, vision 10/800 ep)."""
    hold: float = 0.9
    """tri_stage only: fraction of the steps held at the peak after warm-up; the rest decays (3/90/7 %)."""
    init_lr_scale: float = 0.01
    """LR at step 0 relative to the peak (fairseq tri-stage ``init_lr_scale``; also the cosine start)."""
    final_lr_scale: float = 0.01
    """LR at the last step relative to the peak (tri-stage ``final_lr_scale``; cosine min LR / peak)."""
    clip_norm: float | None = None
    """Clip the global gradient norm to this (text 5 in v1 configs, vision 3); None: no clipping."""
    layer_decay: float = 1.0
    """Layer-wise LR decay for fine-tuning (BEiT/[DV] 0.65 for images): block i gets decay^(L+1-i)."""

    def __post_init__(self) -> None:
        # messages name keys relative to this section; from_dict puts the section's path in front
        for name in ("lr", "eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be in [0, 1), got {list(self.betas)}")
        for name in ("warmup", "hold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(
                    f"{name} must be a fraction of the steps in [0, 1], got {getattr(self, name)}"
                )
        if self.schedule == "tri_stage" and self.warmup + self.hold > 1.0:
            raise ConfigError(
                f"warmup ({self.warmup}) + hold ({self.hold}) must be at most 1 with schedule: tri_stage "
                "(the rest of the steps decays)"
            )
        for name in ("init_lr_scale", "final_lr_scale"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"clip_norm must be > 0 or null, got {self.clip_norm}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")


# ------------------------------------------------------------------------------------------- schedules


def lr_scale(step: int, total: int, cfg: OptimConfig) -> float:
    """LR / peak LR at optimizer step ``step`` (0-based) of ``total``.

    cosine: linear ``init_lr_scale -> 1`` over the warm-up, then half-cosine down to ``final_lr_scale``.
    tri_stage ([FS] ``tri_stage_lr_scheduler.py``): linear warm-up from ``init_lr_scale``, hold at 1, then
    *exponential* decay to ``final_lr_scale`` (the paper's "linear decay" wording; fairseq's code decays
    exponentially), constant after.
    """
    warm = round(cfg.warmup * total)
    if step < warm:
        return cfg.init_lr_scale + (1.0 - cfg.init_lr_scale) * step / warm
    if cfg.schedule == "cosine":
        span = max(total - warm, 1)
        t = min((step - warm) / span, 1.0)
        return cfg.final_lr_scale + (1.0 - cfg.final_lr_scale) * 0.5 * (1.0 + math.cos(math.pi * t))
    hold = round(cfg.hold * total)
    if step < warm + hold:
        return 1.0
    decay = max(total - warm - hold, 1)
    t = min((step - warm - hold) / decay, 1.0)
    return math.exp(math.log(cfg.final_lr_scale) * t)


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying ``lr_scale`` on top of each group's LR (layer-decay scales are kept)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_scale(s, total, cfg))


# ------------------------------------------------------------------------------------- parameter groups


def no_weight_decay(name: str, p: nn.Parameter, module: nn.Module) -> bool:
    """True for biases, norms, embedding tables, tokens and anything effectively 1-D ([1, 1, D] included)."""
    leaf = name.rsplit(".", 1)[-1]
    return (
        sum(s > 1 for s in p.shape) <= 1
        or leaf == "bias"
        or isinstance(module, _NORMS)
        or any(k in name for k in NO_DECAY_NAMES)
    )


def param_groups(
    model: nn.Module, cfg: OptimConfig, layer_ids: dict[str, int] | None = None, depth: int = 0
) -> list[dict]:
    """AdamW groups: (decay | no decay) x (LR scale of the layer). Frozen parameters are left out.

    With ``cfg.layer_decay < 1``, ``layer_ids`` (parameter name -> BEiT layer id: 0 embeddings, i + 1 block
    i, ``depth + 1`` head; ``FinetuneModel.layer_ids()``) scales a parameter's LR by
    ``layer_decay ** (depth + 1 - id)``. Each group carries ``lr_scale``; its ``lr`` is ``cfg.lr * lr_scale``.
    """
    if cfg.layer_decay < 1.0 and layer_ids is None:
        raise ValueError("optim.layer_decay < 1 needs the layer ids of the model's parameters")
    modules = dict(model.named_modules())
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
        wd = 0.0 if no_weight_decay(name, p, owner) else cfg.weight_decay
        scale = cfg.layer_decay ** (depth + 1 - layer_ids[name]) if cfg.layer_decay < 1.0 else 1.0
        g = groups.setdefault((wd, scale), {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    return [dict(g, lr=cfg.lr * g["lr_scale"]) for g in groups.values()]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, layer_ids: dict[str, int] | None = None, depth: int = 0
) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused (one kernel per parameter, no host sync) on CUDA and on CPU.

    On CPU torch's default is a Python loop of ~10 ops per parameter, a noticeable share of a small preset's
    step (benchmarks/RESULTS.md).
    """
    groups = param_groups(model, cfg, layer_ids, depth)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    fused = groups[0]["params"][0].device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
