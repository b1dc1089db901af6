"""data2vec 1.0 speech encoder (fairseq ``data2vec_audio`` / HF ``Data2VecAudioModel``).

Shape legend: B batch, N samples (16 kHz), C conv channels, T frames (50 Hz for the default stack), D width.

waveform [B, N] --normalise--> conv feature extractor [B, C, T] --LN, Linear--> x_BTD   (``local_features``)
x_BTD (masked for the student) --zero padding, + pos_conv, LN, dropout--> post-LN blocks  (``contextualize``)
([P1] §4.2; spec §2.2, §7.1, §7.4). The conv stack and projection are the local encoder the teacher
shares; the positional convs are copied to the teacher each step ([P1] §3.3, fairseq ``ema_layers_only``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import TRANSFORMER_ARCHITECTURE, ConfigError, TransformerConfig, preset_config
from d2v.data2vec import Data2Vec, EMAConfig
from d2v.data2vec2 import Algorithm, Data2Vec2, Data2Vec2Config
from d2v.decoder import ConvDecoder, DecoderConfig
from d2v.modalities.audio.frames import SAMPLE_RATE, frame_padding, normalize_waveform, receptive_field
from d2v.modalities.base import Data2VecTargets, Encoder, EncoderOutput, Preset
from d2v.transformer import Dropout, Tap, TransformerStack, init_bert_params

BASE_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)  # [P1] §4.2: 7 convs, total stride 320 (20 ms), field 400 (25 ms)
BASE_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)

# Values each preset puts under the user's keys (``model_config``). Every preset states its sizes in full.
PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: seconds on CPU. Full 7-layer stack (so lengths and the 400-sample field are the real ones).
    "tiny": {
        "transformer": {"dim": 16, "depth": 2, "heads": 2, "ffn_dim": 32, "dropout": 0.0,
                        "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0},
        "conv_dim": [16] * 7, "pos_conv_groups": 2, "targets": {"top_k": 2},
    },
    # CPU default (5.4 M parameters). The conv stack is narrowed to 128 channels (same kernels/strides, so
    # still 20 ms frames): at 512 it takes most of a CPU step (benchmarks/RESULTS.md).
    "small": {
        "transformer": {"dim": 256, "depth": 6, "heads": 4, "ffn_dim": 1024, "dropout": 0.1,
                        "attention_dropout": 0.1, "activation_dropout": 0.0, "layerdrop": 0.05},
        "conv_dim": [128] * 7, "pos_conv_groups": 16, "targets": {"top_k": 4},
    },
    # [P1] §4.2 / [FS] base_librispeech.yaml.
    "base": {
        "transformer": {"dim": 768, "depth": 12, "heads": 12, "ffn_dim": 3072, "dropout": 0.1,
                        "attention_dropout": 0.1, "activation_dropout": 0.0, "layerdrop": 0.05},
        "conv_dim": [512] * 7, "pos_conv_groups": 16, "targets": {"top_k": 8},
    },
    # Sizes of facebook/data2vec-audio-large (§7.1); no v1 large yaml exists in [FS], so base's recipe.
    "large": {
        "transformer": {"dim": 1024, "depth": 24, "heads": 16, "ffn_dim": 4096, "dropout": 0.1,
                        "attention_dropout": 0.1, "activation_dropout": 0.0, "layerdrop": 0.05},
        "conv_dim": [512] * 7, "pos_conv_groups": 16, "targets": {"top_k": 8},
    },
}  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """The ``model.audio`` section of params.yaml (defaults = the ``small`` preset)."""

    preset: Preset = "small"
    """Size preset whose values sit under the keys given here (``model_config``); a label once built."""
    algorithm: Algorithm = "data2vec"
    """'data2vec' ([P1]) or 'data2vec2' (spec §5): the latter's recipe (spans of 5 at 0.5, decoder,
    8 clones, the teacher's own positional convs) is put under the user's keys by ``model_config``."""
    transformer: TransformerConfig = field(
        default_factory=lambda: TransformerConfig(dim=256, depth=6, heads=4, ffn_dim=1024, layerdrop=0.05)
    )
    """Block stack (post-LN, wav2vec 2.0 style: §7.4)."""
    conv_dim: tuple[int, ...] = (128,) * 7
    """Output channels of each feature-extractor conv (512 in the papers; narrowed on CPU presets)."""
    conv_kernel: tuple[int, ...] = BASE_CONV_KERNEL
    """Kernel size of each feature-extractor conv."""
    conv_stride: tuple[int, ...] = BASE_CONV_STRIDE
    """Stride of each feature-extractor conv (product 320 = 20 ms frames at 16 kHz)."""
    conv_bias: bool = False
    """Bias in the feature-extractor convs ([FS] ``conv_bias: false``)."""
    pos_conv_layers: int = 5
    """Stacked positional conv blocks ([FS] ``pos_conv_depth: 5``; HF ``num_conv_pos_embeddings``)."""
    pos_conv_kernel: int = 19
    """Kernel of each positional conv (``max(3, conv_pos 95 // 5)``; HF ``conv_pos_kernel_size``)."""
    pos_conv_groups: int = 16
    """Groups of the positional convs (HF ``num_conv_pos_embedding_groups``); must divide D."""
    feat_proj_dropout: float = 0.0
    """Dropout after the feature projection ([FS] ``dropout_input: 0``; HF ``feat_proj_dropout``).

    The teacher reuses these features, so if > 0 it sees them after dropout ([FS] clones them before)."""
    normalize_waveform: bool = True
    """Zero-mean unit-variance per utterance inside ``local_features`` ([FS] ``task.normalize: true``)."""
    normalize_eps: float = 1e-5
    """Epsilon of that normalisation: fairseq's ``F.layer_norm`` 1e-5; transformers' feature extractor uses
    1e-7, which ``config_from_hf`` sets so an HF model sees exactly what its processor would give it."""
    mask_prob: float = 0.65
    """Span-start rate x mask_length: ``mask_prob * T / mask_length`` spans per row (~49 % masked)."""
    mask_length: int = 10
    """Frames per masked span."""
    min_masks: int = 1
    """At least this many spans per row."""
    require_same_masks: bool = True
    """Trim every row to the batch's smallest masked count (fairseq default); crop batches, don't pad."""
    crop_batches: bool = True
    """Pretraining crops every clip of a batch to the batch's shortest, at a random offset ([FS]
    ``RawAudioDataset`` with ``pad: false``): no padding, so every row masks ~49 % of its frames and no
    padding enters the targets' instance norm. False: right-pad (then the rows' masks are trimmed to the
    shortest row's count, and padded frames count in the statistics). fairseq also drops clips under 2 s
    (``min_sample_size``); d2v keeps them (most of the embedded recordings are single words) and batches
    similar lengths instead (``pretrain.audio.length_buckets``)."""
    targets: Data2VecTargets = field(default_factory=lambda: Data2VecTargets(top_k=4))
    """Target/loss settings (speech: top-K FFN taps, instance norm, L2 x 1/sqrt(D): §1.4-1.7)."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """Teacher decay 0.999 -> 0.9999 over 30k updates ([P1] §4.2)."""
    v2: Data2Vec2Config = field(
        default_factory=lambda: Data2Vec2Config(
            clones=8, decoder=DecoderConfig(layers=4, kernel=7, dim=128, groups=16, input_dropout=0.1)
        )
    )
    """data2vec 2.0 only: 8 clones, a 1-D decoder of 4 convs (kernel 7; [FS] base: 384 channels for
    D 768, half the width) (spec §5.3-5.4)."""

    def __post_init__(self) -> None:
        t = self.transformer
        n = len(self.conv_dim)
        if n < 1 or len(self.conv_kernel) != n or len(self.conv_stride) != n:
            raise ConfigError(
                f"conv_dim, conv_kernel and conv_stride need the same non-zero length, got "
                f"{len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}"
            )
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            if min(getattr(self, name)) < 1:
                raise ConfigError(f"{name} entries must be >= 1, got {list(getattr(self, name))}")
        for name in ("pos_conv_layers", "pos_conv_kernel", "mask_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pos_conv_groups < 1 or t.dim % self.pos_conv_groups:
            raise ConfigError(
                f"pos_conv_groups must divide transformer.dim ({t.dim}), got {self.pos_conv_groups}"
            )
        if not 1 <= self.targets.top_k <= t.depth:
            raise ConfigError(
                f"targets.top_k must be in [1, transformer.depth={t.depth}], got {self.targets.top_k}"
            )
        if t.layer_norm_first or t.layer_scale_init is not None:
            raise ConfigError(
                "transformer: the speech encoder is post-LN without layer scale (§7.4); "
                "set layer_norm_first: false and layer_scale_init: null"
            )
        if not 0.0 <= self.mask_prob < 1.0:
            raise ConfigError(f"mask_prob must be in [0, 1), got {self.mask_prob}")
        if self.min_masks < 0:
            raise ConfigError(f"min_masks must be >= 0, got {self.min_masks}")
        if not 0.0 <= self.feat_proj_dropout < 1.0:
            raise ConfigError(f"feat_proj_dropout must be in [0, 1), got {self.feat_proj_dropout}")
        if not self.normalize_eps > 0.0:
            raise ConfigError(f"normalize_eps must be > 0, got {self.normalize_eps}")


# data2vec 2.0 (spec §5.2-5.5, [FS] config/v2/base_audio_only_task.yaml): span masks of 5 frames at 0.5
# (starts anywhere, cut at the end), the teacher runs its own EMA positional convs on the student's conv
# features (``ema_shared: []``), tau 0.999 -> 0.99999 over 75k. Departure: [FS] adds ALiBi attention
# biases on top of the conv positions; d2v keeps the conv positions only (the v1 encoder, unchanged).
_V2: dict[str, Any] = {
    "mask_prob": 0.5,
    "mask_length": 5,
    "targets": {"ema_shared": []},
    "ema": {"tau0": 0.999, "tau_end": 0.99999, "tau_n": 75_000},
}
_V2_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"v2": {"clones": 2, "decoder": {"layers": 2, "dim": 16, "groups": 4}}},
    "small": {},
    "base": {"v2": {"decoder": {"dim": 384}}},
    "large": {"v2": {"clones": 12, "decoder": {"dim": 768}}, "mask_prob": 0.55,
              "targets": {"top_k": 16}, "transformer": {"layerdrop": 0.0}},
}  # fmt: skip


ARCHITECTURE: tuple[str, ...] = (
    *TRANSFORMER_ARCHITECTURE, "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "pos_conv_layers",
    "pos_conv_kernel", "pos_conv_groups", "normalize_waveform", "normalize_eps",
)  # fmt: skip
"""The ``model.audio`` keys a published model fixes (its weights' shapes and what its forward computes):
``preset: from_init`` takes them from ``pretrain.audio.init``, and a value that contradicts it is an error."""


def model_config(d: dict[str, Any] | None, where: str = "model.audio") -> ModelConfig:
    """``ModelConfig`` from a params dict: the named preset's values (and, for ``algorithm: data2vec2``,
    that recipe's) under the user's keys (user wins; :func:`d2v.config.preset_config`)."""
    return preset_config(ModelConfig, d, where, PRESETS, _V2, _V2_PRESETS)


# --------------------------------------------------------------------------------------------------- modules


class _TimeWindows(torch.autograd.Function):
    """:func:`time_windows` with a backward of one strided copy and ``k - s`` strided adds."""

    @staticmethod
    def forward(x_BTC: Tensor, k: int, s: int) -> Tensor:
        return x_BTC.unfold(1, k, s).flatten(2)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x_BTC, ctx.k, ctx.s = inputs
        ctx.T = x_BTC.shape[1]

    @staticmethod
    def backward(ctx, g_BTK: Tensor) -> tuple[Tensor, None, None]:
        k, s, T = ctx.k, ctx.s, ctx.T
        B, Tp, CK = g_BTK.shape
        C = CK // k
        g = g_BTK.reshape(B, Tp, C, k)
        if k < s:  # gaps between windows: frames no window reads get zeros (and s * T' may pass T)
            out = g.new_zeros(B, T, C)
            for j in range(k):
                out[:, j : j + s * (Tp - 1) + 1 : s] = g[..., j]
            return out, None, None
        # each window's first s frames tile [0, s T') exactly once: one copy, no zero fill; the rest
        # overlap the next window's (k - s adds); frames past the last window read nothing
        out = g.new_empty(B, T, C)
        out[:, : s * Tp].view(B, Tp, s, C).copy_(g[..., :s].transpose(2, 3))
        out[:, s * Tp :].zero_()
        for j in range(s, k):
            out[:, j : j + s * (Tp - 1) + 1 : s].add_(g[..., j])
        return out, None, None


def time_windows(x_BTC: Tensor, k: int, s: int) -> Tensor:
    """The conv windows of channels-last frames: [B, T, C] -> [B, T', C * k], T' = (T - k) // s + 1,
    channel-major like a Conv1d weight [C', C, k] flattened: ``x.unfold(1, k, s).flatten(2)``.

    Its own backward: aten's ``unfold_backward`` is a generic scatter, a large share of the small speech
    step; one strided copy of each window's first ``s`` frames and ``k - s`` strided adds are several times
    faster (benchmarks/RESULTS.md). Where a frame is in at most two windows (k <= 2 s: every layer of the
    wav2vec 2.0 stack) the sums are aten's, bit for bit; with more overlap they may differ in rounding (a
    different order of the adds)."""
    return _TimeWindows.apply(x_BTC, k, s)


class ConvLayer(nn.Module):
    """Conv1d (no bias) -> LayerNorm over channels (affine) -> GELU ([FS] ``extractor_mode: layer_norm``).

    Runs channels-last, [B, T, C] -> [B, T', C']: the conv is one matmul over the unfolded windows (the
    conv's own sums, an ``nn.Conv1d`` weight), so the LayerNorm and GELU see contiguous channels. The
    channels-first form (conv, then LN/GELU on a transposed view) spends most of the stack's time in strided
    element-wise kernels and layout copies (benchmarks/RESULTS.md).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.layer_norm = nn.LayerNorm(c_out)  # eps 1e-5 in [FS] and [HF] whatever layer_norm_eps says
        self.act = nn.GELU()

    def forward(self, x_BTC: Tensor) -> Tensor:
        (k,), (s,) = self.conv.kernel_size, self.conv.stride
        cols = time_windows(x_BTC, k, s)  # [B, T', C * k], channel-major like the weight [C', C, k]
        x = F.linear(cols, self.conv.weight.flatten(1), self.conv.bias)
        return self.act(self.layer_norm(x))


class FeatureExtractor(nn.Module):
    """The 7-conv waveform encoder: [B, N] -> [B, C, T] (a transposed view of ``frames``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dims = (1, *cfg.conv_dim)
        self.conv_layers = nn.ModuleList(
            ConvLayer(dims[i], dims[i + 1], k, s, cfg.conv_bias)
            for i, (k, s) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride))
        )

    def frames(self, wav_BN: Tensor) -> Tensor:
        """[B, N] -> [B, T, C], channels last."""
        x = wav_BN[:, :, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x

    def forward(self, wav_BN: Tensor) -> Tensor:
        return self.frames(wav_BN).transpose(1, 2)


class FeatureProjection(nn.Module):
    """LN(C) -> Linear(C, D) -> dropout ([FS] ``layer_norm``, ``post_extract_proj``, ``dropout_input``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.transformer.norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.transformer.dim)
        self.dropout = Dropout(cfg.feat_proj_dropout)

    def forward(self, x_BTC: Tensor) -> Tensor:
        return self.dropout(self.projection(self.layer_norm(x_BTC)))


class PosConvLayer(nn.Module):
    """Grouped Conv1d(k, pad k//2) -> SamePad -> LayerNorm (no affine) -> GELU ([FS] ``make_conv_block``)."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0  # SamePad: an even kernel yields one extra frame
        self.layer_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.act = nn.GELU()

    def forward(self, x_BDT: Tensor) -> Tensor:
        x = self.conv(x_BDT)
        if self.trim:
            x = x[:, :, : -self.trim]
        return self.act(self.layer_norm(x.transpose(1, 2)).transpose(1, 2))


class PosConv(nn.Module):
    """Relative positions by ``pos_conv_layers`` stacked convs (§2.2): [B, T, D] -> [B, T, D].

    With ``padding_BT`` the padded frames are zeroed again after every layer, so each valid frame sees
    exactly what the row alone would see (zeros past its end, as the conv's own padding). Departure from
    [FS] and [HF], which zero the padding once, before the first layer: after one conv + LN + GELU the
    padded frames hold bias and neighbours again, and the later layers carry them up to
    ``(pos_conv_layers - 1) * (kernel // 2)`` frames into the clip (36 frames, 0.7 s, at 5 x 19), so a
    clip's features would depend on the lengths it is batched with. Pretraining crops every batch to one
    length (no padding), so this matters for padded fine-tuning and evaluation batches: they see what
    pretraining saw."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.transformer.dim
        self.layers = nn.ModuleList(
            PosConvLayer(d, cfg.pos_conv_kernel, cfg.pos_conv_groups) for _ in range(cfg.pos_conv_layers)
        )

    def forward(self, x_BTD: Tensor, padding_BT: Tensor | None = None) -> Tensor:
        x = x_BTD.transpose(1, 2)
        keep_B1T = None if padding_BT is None else (~padding_BT).to(x.dtype)[:, None]
        for layer in self.layers:
            x = layer(x)
            if keep_B1T is not None:
                x = x * keep_B1T
        return x.transpose(1, 2)


class AudioEncoder(Encoder):
    """Conv feature encoder, conv positions, post-LN Transformer; ``features`` = HF ``last_hidden_state``."""

    modality = "audio"
    local_modules = ("feature_extractor", "feature_projection")
    shared_with_teacher = ("pos_conv",)  # [P1] §3.3: positional encoder shared ([FS] ``ema_layers_only``)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = cfg.transformer
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.mask_emb = nn.Parameter(torch.empty(cfg.transformer.dim).uniform_())  # [FS] U(0, 1)
        self.pos_conv = PosConv(cfg)
        self.layer_norm = nn.LayerNorm(cfg.transformer.dim, eps=cfg.transformer.norm_eps)
        self.dropout = Dropout(cfg.transformer.dropout)
        self.stack = TransformerStack(cfg.transformer)

    def check_inputs(self, inputs: Tensor, padding_mask: Tensor | None) -> None:
        if inputs.dim() != 2:
            raise ValueError(
                f"audio inputs: expected a float waveform batch [B, N] at {SAMPLE_RATE} Hz, "
                f"got shape {tuple(inputs.shape)}"
            )
        if not inputs.is_floating_point():
            raise ValueError(f"audio inputs: expected a float waveform, got dtype {inputs.dtype}")
        rf = receptive_field(self.config)
        if padding_mask is not None:
            if padding_mask.shape != inputs.shape or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"audio padding_mask: expected bool of shape {tuple(inputs.shape)} (True = padding), "
                    f"got {padding_mask.dtype} of shape {tuple(padding_mask.shape)}"
                )
            shortest = int((~padding_mask).sum(-1).min()) if len(inputs) else rf
        else:
            shortest = inputs.shape[1]
        if shortest < rf:
            raise ValueError(
                f"audio inputs: every waveform needs >= {rf} samples (the conv receptive field, "
                f"{1000 * rf / SAMPLE_RATE:g} ms at {SAMPLE_RATE} Hz), got one of {shortest}"
            )

    def local_features(
        self, inputs: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(x_BTD, padding_BT)`` from a waveform [B, N] and its padding [B, N] (True = pad)."""
        wav = inputs
        if self.config.normalize_waveform:
            wav = normalize_waveform(inputs, padding_mask, self.config.normalize_eps)
        if padding_mask is not None:
            wav = wav.masked_fill(padding_mask, 0.0)
        x_BTC = self.feature_extractor.frames(wav)
        T = x_BTC.shape[1]
        padding_BT = None if padding_mask is None else frame_padding(padding_mask, T, self.config)
        return self.feature_projection(x_BTC), padding_BT

    def add_positions(self, x_BTD: Tensor, padding_BT: Tensor | None) -> Tensor:
        """Zero the padding, add the conv positions (§7.1). data2vec 2.0 zeroes the masked frames first, so
        the positions of the kept frames never see the masked content (spec §5.4)."""
        if padding_BT is not None:
            x_BTD = x_BTD.masked_fill(padding_BT[..., None], 0.0)
        return x_BTD + self.pos_conv(x_BTD, padding_BT)

    def encode_tokens(
        self,
        x_BKD: Tensor,
        padding_BK: Tensor | None,
        tap: Tap | None = None,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        """LayerNorm, dropout, post-LN blocks; no final LN (§7.1, §7.4)."""
        out = self.stack(self.dropout(self.layer_norm(x_BKD)), padding_BK, tap=tap, generator=generator)
        return EncoderOutput(out.x_BTD, padding_BK, out.layers)


# ------------------------------------------------------------------------------------------------- builders


def build_encoder(cfg: ModelConfig) -> AudioEncoder:
    """A freshly initialised encoder (uses the global torch RNG: seed it first).

    Init as fairseq (§2.2): BERT init for Linear layers, Kaiming-normal feature convs, PyTorch default for
    the positional convs, ``mask_emb`` U(0, 1).
    """
    enc = AudioEncoder(cfg)
    enc.apply(init_bert_params)
    for layer in enc.feature_extractor.conv_layers:
        nn.init.kaiming_normal_(layer.conv.weight)
    return enc


def make_head(cfg: ModelConfig) -> nn.Module:
    """The student's regression head: Linear(D, D) ([FS] ``final_proj``; §1.8)."""
    head = nn.Linear(cfg.transformer.dim, cfg.transformer.dim)
    init_bert_params(head)
    return head


def make_decoder(cfg: ModelConfig) -> ConvDecoder:
    """data2vec 2.0's 1-D conv decoder over the frames (spec §5.3), PyTorch default init ([FS])."""
    return ConvDecoder(cfg.v2.decoder, cfg.transformer.dim)


def build_pretrain_model(cfg: ModelConfig) -> Data2Vec:
    """data2vec: student + head + EMA teacher; data2vec2: student + 1-D conv decoder + EMA teacher."""
    if cfg.algorithm == "data2vec2":
        return Data2Vec2(build_encoder(cfg), make_decoder(cfg), cfg.targets, cfg.ema, cfg.v2)
    return Data2Vec(build_encoder(cfg), make_head(cfg), cfg.targets, cfg.ema)
