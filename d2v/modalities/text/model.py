"""data2vec 1.0 text: a post-LN RoBERTa encoder (HF ``Data2VecTextModel``), its config and the pretrain model.

Shape legend: B batch, T tokens (ids), D width, P position rows (max_positions + pad_id + 1).

Text differs from speech and vision in two ways ([P1] §3.2, §4.3; spec §2.3):
- masking happens in *input space*: the data loader replaces ids by ``<mask>`` (``masking.make_mask``) and
  passes them as ``batch["student_inputs"]``; the student embeds those, the teacher the clean ids;
- the local encoder (token + learned position embeddings + embedding LayerNorm) is shared with the
  teacher, never averaged ([P1] §3.3; [FS] ``data2vec_text.py`` ``skip_keys``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from d2v.config import TRANSFORMER_ARCHITECTURE, ConfigError, TransformerConfig, from_dict, preset_config
from d2v.data2vec import Data2Vec, EMAConfig
from d2v.data2vec2 import Algorithm, Data2Vec2, Data2Vec2Config
from d2v.decoder import ConvDecoder, DecoderConfig
from d2v.modalities.base import Data2VecTargets, Encoder, EncoderOutput, Preset
from d2v.transformer import Dropout, Tap, TransformerStack, init_bert_params

# ----------------------------------------------------------------------------------------------- config

# [P1] §3.3-3.4, §4.3; [FS] config/text/pretraining/base.yaml: FFN taps, LN per layer, none after the
# average, smooth L1 beta 4, ``loss_scale: 1`` (no 1/sqrt(D)), sum over D / mean over masked tokens.
_TEXT_TARGETS: dict[str, Any] = {
    "tap": "ffn",
    "layer_norm": "layer",
    "final_norm": "none",
    "loss_beta": 4.0,
    "loss_scale": 1.0,
    "loss_reduction": "token",
    "ema_local_encoder": False,
}
# [P1] §4.3: tau 0.999 -> 0.9999 over 100k updates ([FS] base.yaml uses 300k; §11).
_TEXT_EMA: dict[str, Any] = {"tau0": 0.999, "tau_end": 0.9999, "tau_n": 100_000}

PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: seconds on a CPU; no dropout so outputs are deterministic in train mode too
    "tiny": {
        "transformer": {
            "dim": 16,
            "depth": 2,
            "heads": 2,
            "ffn_dim": 32,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        },
        "vocab_size": 256,
        "max_positions": 64,
        "targets": {"top_k": 2},
    },
    # CPU default: 6.9M parameters (2.1M of them the 8192 x 256 token table), trainable on 2 cores
    "small": {
        "transformer": {"dim": 256, "depth": 6, "heads": 4, "ffn_dim": 1024},
        "vocab_size": 8192,
        "max_positions": 256,
        "targets": {"top_k": 5},
    },
    # [P1] §4 Base / [FS] base.yaml: RoBERTa-base, GPT-2 BPE (50,265 ids), 512 positions, K 10
    "base": {
        "transformer": {"dim": 768, "depth": 12, "heads": 12, "ffn_dim": 3072},
        "vocab_size": 50265,
        "max_positions": 512,
        "targets": {"top_k": 10},
    },
    # [P1] §4 Large sizes; no text Large was released, so K stays at Base's 10 (an assumption)
    "large": {
        "transformer": {"dim": 1024, "depth": 24, "heads": 16, "ffn_dim": 4096},
        "vocab_size": 50265,
        "max_positions": 512,
        "targets": {"top_k": 10},
    },
}
for _p in PRESETS.values():  # every preset: post-LN RoBERTa block, dropout 0.1 ([FS] base.yaml) unless set
    _p["transformer"] = {
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "layer_norm_first": False,
        "norm_eps": 1e-5,
        "activation": "gelu",
        **_p["transformer"],
    }
    _p["targets"] = {**_TEXT_TARGETS, **_p["targets"]}
    _p["ema"] = dict(_TEXT_EMA)

MASK_DEFAULTS: dict[str, tuple[float, int]] = {"bert": (0.15, 1), "span": (0.35, 4), "random": (0.48, 1)}
"""Per-strategy (mask_prob, mask_length) when the config leaves them None."""


@dataclass(frozen=True)
class ModelConfig:
    """The ``model.text`` params section. Field defaults are the ``small`` preset (= ``model_config({})``)."""

    preset: Preset = "small"
    """Size preset whose values ``model_config`` puts under the user's keys (tiny / small / base / large)."""
    algorithm: Algorithm = "data2vec"
    """'data2vec' ([P1]) or 'data2vec2' (spec §5): the latter's recipe (48 % random tokens dropped, not
    replaced; decoder; 8 clones; loss scale 1) is put under the user's keys by ``model_config``."""
    transformer: TransformerConfig = field(
        default_factory=lambda: from_dict(TransformerConfig, PRESETS["small"]["transformer"])
    )
    """Block stack; text is post-LN RoBERTa (``layer_norm_first: false``, spec §7.4)."""
    vocab_size: int = 8192
    """Token ids are in [0, vocab_size) (byte-level BPE of our corpus; RoBERTa/GPT-2: 50,265)."""
    max_positions: int = 256
    """Longest sequence in tokens; the position table has max_positions + pad_id + 1 rows (fairseq / HF)."""
    pad_id: int = 1
    """``<pad>`` id; also the position index of padding (RoBERTa: non-pad positions start at pad_id + 1)."""
    mask_id: int = 4
    """``<mask>`` id written into the student's input."""
    bos_id: int = 0
    """``<s>`` id (never masked)."""
    eos_id: int = 2
    """``</s>`` id (never masked)."""
    num_special: int = 5
    """Ids [0, num_special) (<s>, <pad>, </s>, <unk>, <mask>) are never drawn as random replacements."""
    mask_strategy: Literal["bert", "span", "random"] = "span"
    """'span': [FS] base.yaml (the released config; [P1] Table 4 "+ wav2vec 2.0 masking", GLUE 82.9):
    spans of mask_length, all <mask>. 'bert': [P1] §4.3, 15 % of tokens, 80 % <mask> / 10 % random /
    10 % kept. 'random': exactly floor(mask_prob x maskable) single tokens (data2vec 2.0, spec §5.4).
    See ``masking.py`` for which positions carry the loss."""
    mask_prob: float | None = None
    """None: 0.15 for 'bert' (fraction of tokens), 0.35 for 'span' (span starts x length / tokens)."""
    mask_length: int | None = None
    """None: 1 for 'bert' (single tokens, must stay 1), 4 for 'span' (BPE tokens per span)."""
    targets: Data2VecTargets = field(
        default_factory=lambda: from_dict(Data2VecTargets, PRESETS["small"]["targets"])
    )
    """Targets/loss: FFN taps, LN per layer, smooth L1 beta 4, scale 1; top_k per preset (tiny 2, small 5,
    base/large 10 = [P1] §4.3)."""
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(**_TEXT_EMA))
    """Teacher decay 0.999 -> 0.9999 over 100k updates ([P1] §4.3; [FS] base.yaml: 300k)."""
    v2: Data2Vec2Config = field(
        default_factory=lambda: Data2Vec2Config(
            clones=8,
            decoder=DecoderConfig(
                layers=5, kernel=9, dim=256, groups=1, residual=False, projection="mlp", input_dropout=0.1
            ),
        )
    )
    """data2vec 2.0 only: 8 clones, a 1-D decoder of 5 convs (kernel 9, no groups, no residual) and a
    2-layer projection (spec §5.3)."""

    def __post_init__(self) -> None:
        # messages name keys relative to this section; from_dict puts the section's path in front
        t = self.transformer
        if t.layer_norm_first or t.layer_scale_init is not None:
            raise ConfigError(
                "transformer: text is a post-LN RoBERTa stack; set layer_norm_first: false, "
                "layer_scale_init: null"
            )
        if self.max_positions < 1:
            raise ConfigError(f"max_positions must be >= 1, got {self.max_positions}")
        if not 1 <= self.num_special < self.vocab_size:
            raise ConfigError(
                f"num_special must be in [1, vocab_size = {self.vocab_size}), got {self.num_special}"
            )
        ids = {"pad_id": self.pad_id, "mask_id": self.mask_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        if len(set(ids.values())) != len(ids) or not all(0 <= v < self.vocab_size for v in ids.values()):
            raise ConfigError(
                f"special ids must be distinct and in [0, vocab_size = {self.vocab_size}), got {ids}"
            )
        if max(self.pad_id, self.bos_id, self.eos_id) >= self.num_special:
            raise ConfigError(f"pad/bos/eos ids must be < num_special ({self.num_special}), got {ids}")
        if self.mask_prob is not None and not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"mask_prob must be in (0, 1) or null, got {self.mask_prob}")
        if self.mask_length is not None and self.mask_length < 1:
            raise ConfigError(f"mask_length must be >= 1 or null, got {self.mask_length}")
        if self.mask_strategy in ("bert", "random") and self.mask_length not in (None, 1):
            raise ConfigError(
                f"mask_length must be 1 or null with mask_strategy: {self.mask_strategy} (single tokens; or "
                f"use span), got {self.mask_length}"
            )
        if not 1 <= self.targets.top_k <= t.depth:
            raise ConfigError(
                f"targets.top_k must be in [1, transformer.depth={t.depth}], got {self.targets.top_k}"
            )

    @property
    def resolved_mask_prob(self) -> float:
        return self.mask_prob if self.mask_prob is not None else MASK_DEFAULTS[self.mask_strategy][0]

    @property
    def resolved_mask_length(self) -> int:
        return self.mask_length if self.mask_length is not None else MASK_DEFAULTS[self.mask_strategy][1]

    @property
    def position_rows(self) -> int:
        """P = max_positions + pad_id + 1 (HF ``max_position_embeddings``; fairseq 512 + 2 = 514)."""
        return self.max_positions + self.pad_id + 1


# data2vec 2.0 (spec §5.2-5.5, [FS] config/v2/base_text_only_task.yaml): 48 % random tokens, dropped from
# the student (no <mask> ids); every block averaged, instance norm per layer, L2 with scale 1; the teacher
# is the blocks only, on the student's embeddings (``ema_encoder_only``); tau 0.9999 -> 0.99999 over 100k.
_V2: dict[str, Any] = {
    "mask_strategy": "random", "mask_prob": 0.48, "mask_length": 1, "transformer": {"layerdrop": 0.0},
    "targets": {"layer_norm": "instance", "final_norm": "none", "loss_beta": 0.0, "loss_scale": 1.0},
    "ema": {"tau0": 0.9999, "tau_end": 0.99999, "tau_n": 100_000},
}
_V2_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"targets": {"top_k": 2}, "v2": {"clones": 2, "decoder": {"layers": 2, "dim": 16}}},
    "small": {"targets": {"top_k": 6}},
    "base": {"targets": {"top_k": 12}, "v2": {"decoder": {"dim": 768}}},
    "large": {"targets": {"top_k": 24, "layer_norm": "layer", "final_norm": "instance"}, "mask_prob": 0.5,
              "v2": {"decoder": {"dim": 1024}}},
}  # fmt: skip


ARCHITECTURE: tuple[str, ...] = (
    *TRANSFORMER_ARCHITECTURE, "vocab_size", "max_positions", "pad_id", "mask_id", "bos_id", "eos_id",
    "num_special",
)  # fmt: skip
"""The ``model.text`` keys a published model fixes (its weights' shapes, its tokenizer's ids): ``preset:
from_init`` takes them from ``pretrain.text.init``, and a value that contradicts it is an error."""


def model_config(d: dict[str, Any] | None, where: str = "model.text") -> ModelConfig:
    """``ModelConfig`` from a params dict: the named preset's values (and, for ``algorithm: data2vec2``,
    that recipe's) under the user's keys (user wins; :func:`d2v.config.preset_config`)."""
    return preset_config(ModelConfig, d, where, PRESETS, _V2, _V2_PRESETS)


# ---------------------------------------------------------------------------------------------- encoder


class TextEmbeddings(nn.Module):
    """Token + learned absolute position embeddings + LayerNorm ([FS] ``layernorm_embedding``; HF embeddings).

    No sqrt(D) scaling ([FS] ``no_scale_embedding: true``). HF's ``token_type_embeddings[0]``, added to every
    token, is folded into the position rows on import (exact), and exported as zeros.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.transformer.dim
        self.pad_id = cfg.pad_id
        self.tokens = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_id)
        self.positions = nn.Embedding(cfg.position_rows, d, padding_idx=cfg.pad_id)
        self.norm = nn.LayerNorm(d, eps=cfg.transformer.norm_eps)

    def position_ids(self, ids_BT: Tensor, padding_BT: Tensor | None) -> Tensor:
        """RoBERTa positions (HF ``create_position_ids_from_input_ids``, fairseq ``make_positions``):
        the i-th real token gets pad_id + 1 + i, padding gets pad_id. Computed from the padding mask."""
        if padding_BT is None:
            pos_T = torch.arange(ids_BT.shape[1], device=ids_BT.device) + self.pad_id + 1
            return pos_T.expand_as(ids_BT)
        keep_BT = ~padding_BT
        return torch.cumsum(keep_BT, 1) * keep_BT + self.pad_id

    def forward(self, ids_BT: Tensor, padding_BT: Tensor | None) -> Tensor:
        return self.norm(self.tokens(ids_BT) + self.positions(self.position_ids(ids_BT, padding_BT)))


class TextEncoder(Encoder):
    """post-LN RoBERTa: ``local_features`` = LN(E[ids] + P[pos]); ``contextualize`` = dropout, blocks, no final LN."""

    modality = "text"
    stack_attr = "encoder"
    local_modules = ("embeddings",)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = cfg.transformer
        self.embeddings = TextEmbeddings(cfg)
        # The embedding dropout runs in ``contextualize``, not ``local_features``: the teacher (eval) then sees the
        # shared embeddings without dropout, as fairseq's eval-mode teacher does ([FS] data2vec_text.py).
        self.dropout = Dropout(cfg.transformer.dropout)
        self.encoder = TransformerStack(cfg.transformer)

    def check_inputs(self, inputs: Tensor, padding_mask: Tensor | None) -> None:
        cfg = self.config
        if not isinstance(inputs, Tensor) or inputs.dtype != torch.int64 or inputs.dim() != 2:
            got = (
                f"{inputs.dtype} {tuple(inputs.shape)}"
                if isinstance(inputs, Tensor)
                else type(inputs).__name__
            )
            raise ValueError(f"text inputs must be token ids: an int64 tensor [B, T]; got {got}")
        B, T = inputs.shape
        if B == 0 or T == 0:
            raise ValueError(f"text inputs are empty: shape {(B, T)}")
        if cfg.max_positions < T:
            raise ValueError(
                f"sequence length {T} exceeds max_positions={cfg.max_positions}; truncate the ids"
            )
        lo, hi = int(inputs.min()), int(inputs.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}); got min {lo}, max {hi}")
        real_BT = torch.ones_like(inputs, dtype=torch.bool)
        if padding_mask is not None:
            if padding_mask.dtype != torch.bool or padding_mask.shape != inputs.shape:
                raise ValueError(
                    f"padding_mask must be a bool tensor {tuple(inputs.shape)} (True = padding); got "
                    f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            if bool(padding_mask.all(1).any()):
                raise ValueError("padding_mask has a row that is all padding; drop empty sequences")
            real_BT = ~padding_mask
        if bool((inputs.eq(cfg.pad_id) & real_BT).any()):
            raise ValueError(
                f"pad id {cfg.pad_id} found outside the padding; pass padding_mask = ids == {cfg.pad_id}"
            )

    def local_features(
        self, inputs: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """ids [B, T] int64 (+ padding [B, T], True = padding) -> (x_BTD, padding_BT)."""
        return self.embeddings(inputs, padding_mask), padding_mask

    def apply_mask(self, x_BTD: Tensor, mask_BT: Tensor) -> Tensor:
        # Text masks in input space (<mask> ids, masking.make_mask): the student embeds
        # batch["student_inputs"]; there is no mask embedding to substitute here.
        raise ValueError(
            "text masks ids, not embeddings: the batch needs 'student_inputs' (see masking.make_mask)"
        )

    def encode_tokens(
        self,
        x_BKD: Tensor,
        padding_BK: Tensor | None,
        tap: Tap | None = None,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        """Dropout, post-LN blocks, no final LayerNorm (§7.4); the embeddings already carry positions."""
        out = self.encoder(self.dropout(x_BKD), padding_BK, tap=tap, generator=generator)
        return EncoderOutput(out.x_BTD, padding_BK, out.layers)


# ------------------------------------------------------------------------------------------------ build


def build_encoder(cfg: ModelConfig) -> TextEncoder:
    """Fresh encoder with fairseq's ``init_bert_params`` (N(0, 0.02), zero bias, zero padding rows)."""
    encoder = TextEncoder(cfg)
    encoder.apply(init_bert_params)
    return encoder


def make_head(cfg: ModelConfig) -> nn.Module:
    """[FS] ``regression_head`` with ``head_layers: 2``: Linear(D, 2D) -> GELU -> Linear(2D, D) (§1.8)."""
    d = cfg.transformer.dim
    head = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
    head.apply(init_bert_params)
    return head


def make_decoder(cfg: ModelConfig) -> ConvDecoder:
    """data2vec 2.0's 1-D conv decoder over the tokens (spec §5.3), PyTorch default init ([FS])."""
    return ConvDecoder(cfg.v2.decoder, cfg.transformer.dim)


def build_pretrain_model(cfg: ModelConfig) -> Data2Vec:
    """data2vec: student + regression head + EMA teacher of the blocks (text targets/loss/EMA settings).
    data2vec2: student + 1-D conv decoder + EMA teacher of the blocks on the student's embeddings."""
    if cfg.algorithm == "data2vec2":
        return Data2Vec2(build_encoder(cfg), make_decoder(cfg), cfg.targets, cfg.ema, cfg.v2)
    return Data2Vec(build_encoder(cfg), make_head(cfg), cfg.targets, cfg.ema)
