"""The alternative d2v is measured against: data2vec 1.0 built the way community re-implementations do it
(e.g. arxyzan/data2vec-pytorch), on transformers' models.

- student: ``transformers.Data2Vec{Audio,Vision,Text}Model`` with the configuration of d2v's encoder
  (``d2v.modalities.<m>.hf.to_hf``: same sizes, dropouts, LayerDrop, drop path, positions);
- teacher: a ``copy.deepcopy`` of the student in eval mode, run under ``no_grad`` on the unmasked input
  (its whole model, feature encoder included), ``output_hidden_states=True``;
- targets: the mean of the top-K hidden states, each instance-normalised over time (audio) or
  layer-normalised (image, text; image also after the mean, as d2v), in fp32;
- student input masked the transformers way: ``mask_time_indices`` (audio), ``bool_masked_pos`` (vision),
  ``<mask>`` ids (text); a ``Linear(D, D)`` regression head on the masked positions (``x[mask]``);
- loss: d2v's loss kind per modality (L2 or smooth L1, same beta and reduction) on those positions;
- ``torch.optim.AdamW`` with its defaults for the device (one group), the same gradient clipping, and a
  parameter-by-parameter EMA (``mul_``/``add_``) after every step. Always fp32, as such code runs on CPU.

Shape legend: B batch, T tokens, D width, M masked tokens.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from d2v.data2vec import ema_decay
from d2v.modalities import get
from d2v.optim import OptimConfig

_CLASSES = {"audio": "Data2VecAudio", "image": "Data2VecVision", "text": "Data2VecText"}


def hf_model(modality: str, encoder: nn.Module) -> nn.Module:
    """A fresh transformers model with the configuration (and initial weights) of a d2v encoder."""
    cfg_dict, sd = get(modality).to_hf(encoder)
    name = _CLASSES[modality]
    config_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}Model")
    config = config_cls(**{k: v for k, v in cfg_dict.items() if k not in ("model_type", "architectures")})
    model = model_cls(config) if modality == "audio" else model_cls(config, add_pooling_layer=False)
    model.load_state_dict(sd, strict=False)
    return model


class CommunityData2Vec(nn.Module):
    """Student + deepcopy EMA teacher + Linear head; ``forward(batch) -> loss`` on d2v's batch format."""

    def __init__(self, modality: str, encoder: nn.Module, cfg: Any) -> None:
        super().__init__()
        self.modality, self.cfg, self.targets = modality, cfg, cfg.targets
        self.student = hf_model(modality, encoder)
        dim = cfg.transformer.dim
        self.head = nn.Linear(dim, dim)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> CommunityData2Vec:
        super().train(mode)
        self.teacher.eval()
        return self

    def _run(self, model: nn.Module, batch: dict[str, Tensor], masked: bool, hidden: bool):
        m = self.modality
        if m == "audio":
            kw = {"mask_time_indices": batch["mask"]} if masked else {}
            if batch.get("padding_mask") is not None:
                kw["attention_mask"] = (~batch["padding_mask"]).long()
            return model(batch["inputs"], output_hidden_states=hidden, **kw)
        if m == "image":
            kw = {"bool_masked_pos": batch["mask"]} if masked else {}
            return model(pixel_values=batch["inputs"], output_hidden_states=hidden, **kw)
        ids = batch["student_inputs"] if masked else batch["inputs"]
        pad = batch.get("padding_mask")
        att = None if pad is None else (~pad).long()
        return model(input_ids=ids, attention_mask=att, output_hidden_states=hidden)

    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, Tensor]) -> Tensor:
        t = self.targets
        layers = self._run(self.teacher, batch, masked=False, hidden=True).hidden_states[-t.top_k :]
        layers = [h[:, 1:] if self.modality == "image" else h for h in layers]  # drop CLS
        if self.modality == "audio":
            y = [F.instance_norm(h.float().transpose(1, 2)).transpose(1, 2) for h in layers]
        else:
            y = [F.layer_norm(h.float(), h.shape[-1:]) for h in layers]
        y = sum(y) / len(y)
        if t.final_norm == "layer":
            y = F.layer_norm(y, y.shape[-1:])
        return y

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["mask"]
        x = self._run(self.student, batch, masked=True, hidden=False).last_hidden_state
        if self.modality == "image":
            x = x[:, 1:]
        y = self.teacher_targets(batch)
        pred, target = self.head(x[mask]).float(), y[mask]
        t = self.targets
        if t.loss_beta == 0:
            err = F.mse_loss(pred, target, reduction="none")
        else:
            err = F.smooth_l1_loss(pred, target, reduction="none", beta=t.loss_beta)
        if t.loss_reduction == "element":
            return err.mean()
        scale = t.loss_scale if t.loss_scale is not None else 1.0 / math.sqrt(err.shape[-1])
        return err.sum(-1).mean() * scale

    @torch.no_grad()
    def ema_step(self, tau: float) -> None:
        for pt, ps in zip(self.teacher.parameters(), self.student.parameters()):
            pt.mul_(tau).add_(ps, alpha=1.0 - tau)


class CommunityStep:
    """One optimizer update of the alternative: forward, backward, clip, AdamW, EMA."""

    def __init__(self, modality: str, encoder: nn.Module, cfg: Any, optim: OptimConfig) -> None:
        self.model = CommunityData2Vec(modality, encoder, cfg).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
        )
        self.clip = optim.clip_norm
        self.updates = 0

    def __call__(self, batch: dict[str, Tensor]) -> None:
        loss = self.model(batch)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.updates += 1
        self.model.ema_step(ema_decay(self.updates, self.model.cfg.ema))
