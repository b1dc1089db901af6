"""Vision fine-tuning head: ``Data2VecVisionForImageClassification`` ([DV] ``run_class_finetuning.py``).

Shape legend: B batch, T tokens (CLS + patches), D width, C classes.

[P1] §4.1 / [DV]: mean of the patch tokens (CLS excluded) -> LayerNorm (``fc_norm``) -> Linear. As in BEiT's
mean-pooling model, the pretrained final LayerNorm is dropped (``norm`` is the identity, ``fc_norm`` is new)
and a shared relative position table is copied into every block (spec §3.2). HF names: ``fc_norm`` is
``data2vec_vision.pooler.layernorm``, ``classifier`` is ``classifier``.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from d2v.config import replace
from d2v.heads import FinetuneModel, HeadConfig, SequenceClassifier, Task, check_task
from d2v.modalities.base import Encoder

from .model import ImageEncoder, trunc_normal_

TASKS = ("classification",)
HEAD_INIT_SCALE = 0.001
"""[DV] ``--init_scale 0.001``: the fresh classifier starts near zero (BEiT fine-tuning)."""


def prepare_for_finetuning(encoder: ImageEncoder) -> ImageEncoder:
    """In place, BEiT's fine-tuning surgery: no final LN (mean pooling has its own), per-block rel-pos tables.

    Idempotent; ``encoder.config`` is updated to match, so ``build_encoder(encoder.config)`` rebuilds the
    same module tree (the fine-tuned checkpoint loads into it).
    """
    cfg = encoder.config
    changes: dict[str, Any] = {}
    if cfg.final_norm:
        encoder.norm = nn.Identity()  # [DV] use_mean_pooling: ``self.norm = nn.Identity()``
        changes["final_norm"] = False
    depth = encoder.transformer.depth
    if cfg.position == "relative" and not cfg.relative_per_layer:
        # [DV] run_class_finetuning.py: ``rel_pos_bias.relative_position_bias_table`` copied to every block
        shared = encoder.rel_pos[0]
        encoder.rel_pos = nn.ModuleList(copy.deepcopy(shared) for _ in range(depth))
        changes["relative_per_layer"] = True
    if changes:
        encoder.config = replace(cfg, **changes)
    return encoder


class Data2VecVisionForImageClassification(SequenceClassifier):
    """Mean-pooled patch tokens -> ``fc_norm`` -> dropout -> ``classifier``."""

    per_block = ("blocks", "rel_pos")  # rel_pos.<i> is block i's table after ``prepare_for_finetuning``

    def __init__(self, encoder: ImageEncoder, num_classes: int, cfg: HeadConfig) -> None:
        smoothing = 0.1 if cfg.label_smoothing is None else cfg.label_smoothing  # [DV] --smoothing 0.1
        super().__init__(prepare_for_finetuning(encoder), num_classes, smoothing)
        t = encoder.transformer
        self.fc_norm = nn.LayerNorm(t.dim, eps=t.norm_eps)
        self.dropout = nn.Dropout(0.0 if cfg.dropout is None else cfg.dropout)
        self.classifier = nn.Linear(t.dim, num_classes)
        trunc_normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.classifier.weight.data.mul_(HEAD_INIT_SCALE)

    def features(self, batch: dict[str, Any], check: bool = False) -> Tensor:
        h_BTD, _ = self.encode(batch, check)
        pooled_BD = h_BTD[:, self.encoder.num_prefix_tokens :].mean(1)  # CLS excluded ([P1] §4.1)
        return self.dropout(self.fc_norm(pooled_BD))

    @property
    def output(self) -> nn.Linear:
        return self.classifier


def build_finetune_model(
    encoder: Encoder, task: Task, num_classes: int | None, cfg: HeadConfig | None = None
) -> FinetuneModel:
    """The image fine-tuning model; ``cfg`` holds the head options (None: the [DV] defaults).

    Modifies ``encoder`` in place (see :func:`prepare_for_finetuning`); ValueError for a task other than
    'classification' or an encoder of another modality.
    """
    check_task("image", task, num_classes, TASKS)
    if not isinstance(encoder, ImageEncoder):
        raise ValueError(f"image heads need an image encoder, got a {encoder.modality} encoder")
    assert num_classes is not None
    return Data2VecVisionForImageClassification(encoder, num_classes, cfg or HeadConfig())
