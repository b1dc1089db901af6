"""Speech fine-tuning heads: ``Data2VecAudioForSequenceClassification`` and ``Data2VecAudioForCTC``.

Shape legend: B batch, N samples, T frames, D width, P projector width, C classes, V CTC vocabulary, L
concatenated target letters.

Both keep the conv feature encoder frozen for the whole run (fairseq ``feature_grad_mult: 0.0``, reference
§3.1; HF's ``freeze_feature_encoder()``, on by default in its audio-classification example): its
parameters never get ``requires_grad``, so autograd builds no graph through the convs either.
CTC: letters vocabulary with the blank at 0 (HF ``<pad>``), ``|`` between words; ``zero_infinity`` loss
summed over frames and averaged over utterances (fairseq ``ctc`` criterion with ``sentence_avg: true``).
HF names: ``projector`` / ``classifier`` (classification), ``lm_head`` (CTC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import ConfigError
from d2v.heads import (
    FinetuneModel,
    HeadConfig,
    SequenceClassifier,
    Task,
    check_task,
    ctc_greedy_decode,
    mean_pool,
)
from d2v.modalities.base import Encoder
from d2v.transformer import init_bert_params

from .model import AudioEncoder

TASKS = ("classification", "ctc")
CTC_VOCAB: tuple[str, ...] = ("<pad>", "|", *"abcdefghijklmnopqrstuvwxyz", "'")
"""CTC output symbols: blank ``<pad>`` = 0 (as HF), word boundary ``|``, a-z, apostrophe (fairseq ``ltr``)."""
BLANK = 0
_INDEX = {c: i for i, c in enumerate(CTC_VOCAB)}
FROZEN = ("encoder.feature_extractor.",)
"""The conv feature encoder ([FS] ``feature_grad_mult: 0``)."""


@dataclass(frozen=True)
class AudioHeadConfig(HeadConfig):
    """``finetune.audio.head``: the shared head options plus the classification projector's width."""

    proj_dim: int = 256
    """Width of the projector before mean pooling (HF ``classifier_proj_size``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.proj_dim < 1:
            raise ConfigError(f"head.proj_dim: must be >= 1, got {self.proj_dim}")


# --------------------------------------------------------------------------------------------- letters


def encode_transcript(text: str) -> list[int]:
    """``"Three one"`` -> ids of ``t h r e e | o n e``: lower-cased, runs of whitespace -> one ``|``.

    ValueError naming any character outside ``CTC_VOCAB`` (spell digits as words, drop punctuation).
    """
    words = text.lower().split()
    bad = sorted({c for w in words for c in w if c not in _INDEX or c in ("|", "<")})
    if bad:
        raise ValueError(
            f"transcript {text!r} has characters {bad} outside the CTC letters (a-z, apostrophe, spaces)"
        )
    return [_INDEX[c] for c in "|".join(words)]


def decode_ids(ids: list[int]) -> str:
    """CTC-collapsed ids -> text: ``|`` becomes a space, blanks are skipped, spaces are normalised."""
    chars = [CTC_VOCAB[i] for i in ids if i != BLANK]
    return " ".join("".join(chars).replace("|", " ").split())


def ctc_targets(transcripts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Concatenated targets [L] (copied to ``device`` without a sync) and their lengths [B] (kept on the
    host, where the CTC kernels read them), int64."""
    encoded = [encode_transcript(t) for t in transcripts]
    flat = torch.tensor([i for e in encoded for i in e], dtype=torch.long)
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
    return flat.to(device, non_blocking=True), lengths


def ctc_loss(logits_BTV: Tensor, padding_BT: Tensor | None, transcripts: list[str]) -> Tensor:
    """Summed CTC loss / B, fp32, ``zero_infinity`` (a too-short utterance contributes 0, not inf).

    PyTorch's CTC reads the frame lengths on the host, so on an accelerator this costs one small copy
    back (the only host sync of the fine-tuning heads); the target lengths never leave the host.
    """
    B, T, _ = logits_BTV.shape
    log_probs_TBV = logits_BTV.float().log_softmax(-1).transpose(0, 1)
    if padding_BT is None:
        in_lengths_B = torch.full((B,), T, dtype=torch.long, device=logits_BTV.device)
    else:
        in_lengths_B = (~padding_BT).sum(-1)
    targets_L, target_lengths_B = ctc_targets(transcripts, logits_BTV.device)
    loss = F.ctc_loss(
        log_probs_TBV, targets_L, in_lengths_B, target_lengths_B,
        blank=BLANK, reduction="sum", zero_infinity=True,
    )  # fmt: skip
    return loss / B


# --------------------------------------------------------------------------------------------- models


class Data2VecAudioForSequenceClassification(SequenceClassifier):
    """HF ``ForSequenceClassification``: projector Linear(D, P) -> mean over real frames -> Linear(P, C)."""

    always_frozen = FROZEN

    def __init__(self, encoder: AudioEncoder, num_classes: int, cfg: AudioHeadConfig) -> None:
        super().__init__(encoder, num_classes, cfg.label_smoothing or 0.0)
        d = encoder.transformer.dim
        self.dropout = nn.Dropout(0.0 if cfg.dropout is None else cfg.dropout)
        self.projector = nn.Linear(d, cfg.proj_dim)
        self.classifier = nn.Linear(cfg.proj_dim, num_classes)
        self.projector.apply(init_bert_params)  # HF: N(0, initializer_range 0.02), zero bias
        self.classifier.apply(init_bert_params)
        self.freeze_always_frozen()

    def features(self, batch: dict[str, Any], check: bool = False) -> Tensor:
        h_BTD, pad_BT = self.encode(batch, check)
        return mean_pool(self.projector(self.dropout(h_BTD)), pad_BT)

    @property
    def output(self) -> nn.Linear:
        return self.classifier


class Data2VecAudioForCTC(FinetuneModel):
    """Letters CTC: ``final_dropout`` -> ``lm_head`` Linear(D, V) per frame ([FS] ``w2v_encoder.proj``)."""

    always_frozen = FROZEN

    def __init__(self, encoder: AudioEncoder, cfg: HeadConfig) -> None:
        super().__init__(encoder, "ctc", len(CTC_VOCAB))
        self.dropout = nn.Dropout(0.0 if cfg.dropout is None else cfg.dropout)  # fairseq final_dropout 0
        self.lm_head = nn.Linear(encoder.transformer.dim, len(CTC_VOCAB))
        self.lm_head.apply(init_bert_params)
        self.freeze_always_frozen()

    def logits(self, batch: dict[str, Any], check: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-frame scores [B, T, V] and the frame padding [B, T] (None without padding)."""
        h_BTD, pad_BT = self.encode(batch, check)
        return self.lm_head(self.dropout(h_BTD)), pad_BT

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        logits_BTV, pad_BT = self.logits(batch)
        loss = ctc_loss(logits_BTV, pad_BT, batch["transcripts"])
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> list[str]:
        """Greedy (best path) transcripts, one string per utterance."""
        logits_BTV, pad_BT = self.logits(batch, check=True)
        return [decode_ids(ids) for ids in ctc_greedy_decode(logits_BTV, pad_BT, blank=BLANK)]


def build_finetune_model(
    encoder: Encoder, task: Task, num_classes: int | None, cfg: AudioHeadConfig | None = None
) -> FinetuneModel:
    """The audio fine-tuning model for ``task`` ('classification' or 'ctc'); ``cfg``: head options.

    For 'ctc' ``num_classes`` is the letters vocabulary (None, or ``len(CTC_VOCAB)``). ValueError for an
    unknown task, a wrong vocabulary size or an encoder of another modality.
    """
    check_task("audio", task, num_classes, TASKS)
    if not isinstance(encoder, AudioEncoder):
        raise ValueError(f"audio heads need an audio encoder, got a {encoder.modality} encoder")
    cfg = cfg or AudioHeadConfig()
    if task == "ctc":
        if num_classes not in (None, len(CTC_VOCAB)):
            raise ValueError(
                f"audio ctc: the letters vocabulary has {len(CTC_VOCAB)} symbols, "
                f"got num_classes={num_classes}"
            )
        return Data2VecAudioForCTC(encoder, cfg)
    assert num_classes is not None
    return Data2VecAudioForSequenceClassification(encoder, num_classes, cfg)
