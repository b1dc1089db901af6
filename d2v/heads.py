"""Fine-tuning heads: the modality-blind pieces (base class, pooling, loss, CTC decoding, layer ids).

Shape legend: B batch, T tokens (frames / patches / sub-words), D width, C classes, V CTC vocabulary.

Each modality's ``heads.py`` defines its ``For<Task>`` models (named like transformers' data2vec heads) and
``build_finetune_model(encoder, task, num_classes, cfg)``; they all derive from :class:`FinetuneModel`:
``forward(batch) -> (loss, metrics)`` with no host sync, ``predict(batch)`` for evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import ConfigError
from d2v.modalities.base import Encoder

Task = Literal["classification", "ctc"]


@dataclass(frozen=True)
class HeadConfig:
    """Options of the task head (the ``cfg`` of ``build_finetune_model``); None picks the modality default.

    It is small on purpose: the optimiser, schedule and masking during fine-tuning belong to the finetune
    section; this holds only what changes the head's shape or its loss. A modality with more head options
    subclasses it (audio: ``AudioHeadConfig``) and exports the class as ``HeadConfig``.
    """

    dropout: float | None = None
    """Dropout right before the output projection. None: the reference value of the modality (text 0.1,
    RoBERTa head [FS]; audio 0.0, fairseq ``final_dropout``; image 0.0, no head dropout in [DV])."""
    label_smoothing: float | None = None
    """Cross-entropy label smoothing for classification. None: image 0.1 ([DV] ``--smoothing``), else 0."""

    def __post_init__(self) -> None:
        for name in ("dropout", "label_smoothing"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise ConfigError(f"head.{name}: must be in [0, 1), got {v}")


def check_task(modality: str, task: str, num_classes: int | None, supported: tuple[str, ...]) -> None:
    """ValueError for a task the modality has no head for, or a classification without classes."""
    if task not in supported:
        raise ValueError(
            f"{modality}: no fine-tuning head for task {task!r}; supported tasks are {list(supported)}"
        )
    if task == "classification" and (num_classes is None or num_classes < 2):
        raise ValueError(f"{modality}: classification needs num_classes >= 2, got {num_classes}")


# --------------------------------------------------------------------------------------------- pure math


def mean_pool(h_BTD: Tensor, padding_BT: Tensor | None) -> Tensor:
    """Mean over the non-padding tokens: [B, T, D] (+ [B, T] True = padding) -> [B, D].

    A weighted sum, not boolean indexing, so it needs no host sync; an all-padding row gives zeros.
    """
    if padding_BT is None:
        return h_BTD.mean(1)
    keep_BT1 = (~padding_BT).to(h_BTD.dtype)[..., None]
    return (h_BTD * keep_BT1).sum(1) / keep_BT1.sum(1).clamp_min(1.0)


def classification_loss(
    logits_BC: Tensor, labels_B: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy (fp32) and the batch accuracy, both as tensors (no ``.item()``)."""
    if labels_B.device.type == "cpu" and labels_B.numel():  # checking is free here: no device sync
        lo, hi = int(labels_B.min()), int(labels_B.max())
        if lo < 0 or hi >= logits_BC.shape[-1]:
            raise ValueError(
                f"labels must be in [0, {logits_BC.shape[-1]}) for this head, got values in [{lo}, {hi}]; "
                "was the model built with the num_classes of this data's manifest?"
            )
    loss = F.cross_entropy(logits_BC.float(), labels_B, label_smoothing=label_smoothing)
    acc = (logits_BC.detach().argmax(-1) == labels_B).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": acc}


def ctc_greedy_decode(
    logits_BTV: Tensor, padding_BT: Tensor | None = None, blank: int = 0
) -> list[list[int]]:
    """Best path decoding: per frame argmax, merge repeats, then drop blanks -> one id list per row.

    ``[a, a, blank, a, b, b]`` -> ``[a, a, b]`` (a blank separates two real repeats). Frames at padding are
    ignored. Reads the result on the host: for evaluation, not for the training step.
    """
    ids_BT = logits_BTV.argmax(-1)
    if padding_BT is not None:
        ids_BT = ids_BT.masked_fill(padding_BT, blank)  # padding frames act as blanks
    # a frame is kept if it differs from the previous frame and is not blank
    prev_BT = F.pad(ids_BT[:, :-1], (1, 0), value=blank)
    keep_BT = (ids_BT != prev_BT) & (ids_BT != blank)
    ids, keep = ids_BT.cpu().tolist(), keep_BT.cpu().tolist()
    return [[i for i, k in zip(row, krow) if k] for row, krow in zip(ids, keep)]


def layer_id(name: str, depth: int, per_block: tuple[str, ...] = ("blocks",)) -> int:
    """Layer index of a fine-tuning model's parameter, for layer-wise LR decay (BEiT, [DV] 0.65).

    ``name`` is a ``FinetuneModel.named_parameters()`` name. Block ``i`` of the Transformer stack
    (``...blocks.<i>.``, d2v/transformer.py; or ``...<p>.<i>.`` for another per-block module list ``p``
    such as vision's per-layer relative position tables) -> ``i + 1``; any other parameter of ``encoder.``
    (local feature encoder, positions, CLS, embedding norms) -> 0; everything outside the encoder (the
    task head) -> ``depth + 1``. The LR of a parameter is ``lr * decay ** (depth + 1 - layer_id)``
    ([DV] ``run_class_finetuning.py`` ``LayerDecayValueAssigner``: the head keeps the full LR).
    """
    alternatives = "|".join(re.escape(p) for p in per_block)
    m = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)\.", name)
    if m is not None:
        i = int(m.group(1))
        if not 0 <= i < depth:
            raise ValueError(f"parameter {name!r} names block {i}, but the encoder has depth {depth}")
        return i + 1
    return 0 if name.startswith("encoder.") else depth + 1


# ------------------------------------------------------------------------------------------------- model


class FinetuneModel(nn.Module):
    """An encoder plus a task head.

    ``forward(batch) -> (loss, metrics)``: metrics are detached scalars; no host sync (CTC: one, see
    ``d2v.modalities.audio.heads.ctc_loss``).
    ``predict(batch)``: class ids [B] (int64), or one string per row for CTC (eval mode is the caller's).
    ``batch`` holds ``inputs`` [B, N] / [B, C, H, W], ``padding_mask`` [B, N] (True = padding; absent for
    images), the targets (``labels`` [B] int64 or ``transcripts`` list[str]), and optionally ``mask`` [B, T]
    (True = masked, prefix tokens excluded), applied in training like the student's: the wav2vec 2.0
    fine-tuning recipe keeps time masking on (spec §3.1); the loader decides whether to send one.
    """

    task: Task
    per_block: ClassVar[tuple[str, ...]] = ("blocks",)
    """Module lists of the encoder indexed by block (see :func:`layer_id`)."""
    always_frozen: ClassVar[tuple[str, ...]] = ()
    """Parameter-name prefixes that never train (audio: the conv feature encoder, spec §3.1)."""

    def __init__(self, encoder: Encoder, task: Task, num_classes: int | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.task = task
        self.num_classes = num_classes

    def freeze_always_frozen(self) -> None:
        for name, p in self.named_parameters():
            if name.startswith(self.always_frozen):
                p.requires_grad_(False)

    def set_encoder_trainable(self, trainable: bool) -> None:
        """Freeze / unfreeze the encoder (fairseq ``freeze_finetune_updates``); ``always_frozen`` stays so."""
        self.encoder.requires_grad_(trainable)
        self.freeze_always_frozen()

    def layer_ids(self) -> dict[str, int]:
        """:func:`layer_id` of every parameter, for layer-wise LR decay."""
        depth = self.encoder.transformer.depth
        return {n: layer_id(n, depth, self.per_block) for n, _ in self.named_parameters()}

    def encode(self, batch: dict[str, Any], check: bool = False) -> tuple[Tensor, Tensor | None]:
        """The encoder's last layer ``(h_BTD, padding_BT)``, prefix tokens (CLS) included.

        ``check`` runs the encoder's input validation, which reads values on the host: on for ``predict``,
        off in the training step.
        """
        inputs, pad = batch["inputs"], batch.get("padding_mask")
        if check:
            self.encoder.check_inputs(inputs, pad)
        x_BTD, pad_BT = self.encoder.local_features(inputs, pad)
        mask_BT = batch.get("mask")
        if mask_BT is not None and self.training:
            if mask_BT.shape != x_BTD.shape[:2]:
                raise ValueError(f"mask has shape {tuple(mask_BT.shape)}, expected {tuple(x_BTD.shape[:2])}")
            x_BTD = self.encoder.apply_mask(x_BTD, mask_BT)
        channel_BD = batch.get("channel_mask")
        if channel_BD is not None and self.training:  # fine-tuning channel masks (speech), after time
            x_BTD = x_BTD.masked_fill(channel_BD[:, None, :], 0.0)
        out = self.encoder.contextualize(x_BTD, pad_BT)
        return out.x_BTD, out.padding_BT

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Tensor | list[str]:
        raise NotImplementedError


class SequenceClassifier(FinetuneModel):
    """Shared ``forward``/``predict`` of the classification heads: ``output(features(batch))``.

    Subclasses implement ``features`` (everything up to the last linear layer: pooling, the head's norm or
    dense layer, dropout) and ``output`` (that last ``nn.Linear``, under its reference name), so that the
    output layer can be fitted on frozen features before fine-tuning (``finetune.head_init: probe``).
    """

    def __init__(self, encoder: Encoder, num_classes: int, label_smoothing: float) -> None:
        super().__init__(encoder, "classification", num_classes)
        self.label_smoothing = label_smoothing

    def features(self, batch: dict[str, Any], check: bool = False) -> Tensor:
        """[B, F]: the input of the output layer."""
        raise NotImplementedError

    @property
    def output(self) -> nn.Linear:
        """The last layer, features [B, F] -> class scores [B, C]."""
        raise NotImplementedError

    def logits(self, batch: dict[str, Any], check: bool = False) -> Tensor:
        """[B, C] class scores."""
        return self.output(self.features(batch, check))

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return classification_loss(self.logits(batch), batch["labels"], self.label_smoothing)

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Tensor:
        return self.logits(batch, check=True).argmax(-1)
