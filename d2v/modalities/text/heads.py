"""Text fine-tuning head: ``Data2VecTextForSequenceClassification`` (RoBERTa classification head).

Shape legend: B batch, T tokens, D width, C classes.

[P1] §4.3, [FS] ``data2vec_text.py`` ``register_classification_head``, HF ``Data2VecTextClassificationHead``:
the first token (``<s>``) -> dropout -> Dense(D, D) -> tanh -> dropout -> Linear(D, C) (spec §3.3).
HF names: ``classifier.dense``, ``classifier.out_proj``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from d2v.heads import FinetuneModel, HeadConfig, SequenceClassifier, Task, check_task
from d2v.modalities.base import Encoder
from d2v.transformer import init_bert_params

from .model import TextEncoder

TASKS = ("classification",)
DEFAULT_DROPOUT = 0.1
"""RoBERTa/GLUE fine-tuning dropout 0.1 (HF ``classifier_dropout: None`` -> ``hidden_dropout_prob``)."""


class ClassificationHead(nn.Module):
    """x_BD (first token) -> dropout -> dense -> tanh -> dropout -> out_proj -> [B, C]."""

    def __init__(self, dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(dim, num_classes)

    def features(self, x_BD: Tensor) -> Tensor:
        """x_BD -> the input of ``out_proj`` [B, D]."""
        return self.dropout(self.dense(self.dropout(x_BD)).tanh())

    def forward(self, x_BD: Tensor) -> Tensor:
        return self.out_proj(self.features(x_BD))


class Data2VecTextForSequenceClassification(SequenceClassifier):
    """RoBERTa sentence classification on the ``<s>`` token."""

    def __init__(self, encoder: TextEncoder, num_classes: int, cfg: HeadConfig) -> None:
        super().__init__(encoder, num_classes, cfg.label_smoothing or 0.0)
        p = DEFAULT_DROPOUT if cfg.dropout is None else cfg.dropout
        self.classifier = ClassificationHead(encoder.transformer.dim, num_classes, p)
        self.classifier.apply(init_bert_params)  # [FS]/HF: N(0, 0.02), zero bias

    def features(self, batch: dict[str, Any], check: bool = False) -> Tensor:
        h_BTD, _ = self.encode(batch, check)
        return self.classifier.features(h_BTD[:, 0])  # <s>: the loader starts every sequence with bos

    @property
    def output(self) -> nn.Linear:
        return self.classifier.out_proj


def build_finetune_model(
    encoder: Encoder, task: Task, num_classes: int | None, cfg: HeadConfig | None = None
) -> FinetuneModel:
    """The text fine-tuning model; ``cfg`` holds the head options (None: RoBERTa defaults).

    ValueError for a task other than 'classification' or an encoder of another modality.
    """
    check_task("text", task, num_classes, TASKS)
    if not isinstance(encoder, TextEncoder):
        raise ValueError(f"text heads need a text encoder, got a {encoder.modality} encoder")
    assert num_classes is not None
    return Data2VecTextForSequenceClassification(encoder, num_classes, cfg or HeadConfig())
