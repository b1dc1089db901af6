"""data2vec 1.0 vision: a BEiT-style pre-LN ViT with layer-scale ([DV] ``modeling_cyclical.py``, HF
``Data2VecVisionModel``), its ``model.image`` config and presets.

Shape legend: B batch, C channels, H/W image height/width, h/w patch grid, T = h*w patch tokens,
D width, NH attention heads, R relative-distance table rows ((2h-1)(2w-1)+3).

The CLS token is prepended in ``contextualize`` (after masking, as in [DV] §2.4: masked patch embeddings
are replaced by the mask token, then CLS is added, then positions); every output keeps it at position 0.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import TRANSFORMER_ARCHITECTURE, ConfigError, TransformerConfig, preset_config
from d2v.data2vec import Data2Vec, EMAConfig
from d2v.data2vec2 import Algorithm, Data2Vec2, Data2Vec2Config
from d2v.decoder import ConvDecoder, DecoderConfig
from d2v.modalities.base import Data2VecTargets, Encoder, EncoderOutput, Preset
from d2v.transformer import Dropout, Tap, TransformerStack

Position = Literal["relative", "sincos", "absolute"]


def _vision_targets(top_k: int) -> Data2VecTargets:
    # [DV] README + engine_for_cyclical.py (spec §1.4-1.7, §2.4): end-of-block taps, LN per layer,
    # LN after averaging, Smooth L1 beta 2 averaged over masked tokens x D, EMA of the whole model.
    return Data2VecTargets(
        top_k=top_k, tap="block", layer_norm="layer", final_norm="layer", loss_beta=2.0,
        loss_scale=1.0, loss_reduction="element", ema_local_encoder=True,
    )  # fmt: skip


def _small_transformer() -> TransformerConfig:
    # CPU default (a few M params): 6 x 256, 49 tokens of a 28x28 image. Layer-scale 0.1 is the usual
    # value for shallow stacks (HF / BEiT default); 1e-4 is [DV]'s choice for the 12-block ViT-B.
    return TransformerConfig(
        dim=256, depth=6, heads=4, ffn_dim=1024, layer_norm_first=True, dropout=0.0,
        attention_dropout=0.0, drop_path=0.1, layer_scale_init=0.1, norm_eps=1e-6,
    )  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """The ``model.image`` section. Defaults are the ``small`` preset; ``model_config`` applies others."""

    preset: Preset = "small"
    """Named size: tiny (tests), small (CPU), base / large ([DV] ViT-B/16, ViT-L/16)."""
    algorithm: Algorithm = "data2vec"
    """'data2vec' ([DV]) or 'data2vec2' (spec §5): the latter's recipe (post-LN, sin-cos positions, inverse
    block masks, decoder, 16 clones) is put under the user's keys by ``model_config``."""
    transformer: TransformerConfig = field(default_factory=_small_transformer)
    """Block stack; vision is pre-LN with layer-scale and drop path (spec §2.4, §7.4)."""
    image_size: int = 28
    """Square input side in pixels (224 for ImageNet, 28 for Fashion-MNIST)."""
    patch_size: int = 4
    """Patch side: 16 at 224 px (196 tokens); 4 (49 tokens) or 7 (16 tokens) at 28 px."""
    in_channels: int = 3
    """Input channels (grey images are repeated to 3 by the data code)."""
    position: Position = "relative"
    """'relative': BEiT relative position bias, table (2h-1)(2w-1)+3 x heads ([DV], HF pretrained);
    'sincos': fixed 2-D sin-cos (MAE) added to the tokens; 'absolute': learned, added to the tokens
    (HF ``use_absolute_position_embeddings``)."""
    relative_per_layer: bool = False
    """With 'relative': one table per block (HF fine-tuned checkpoints) instead of one shared table."""
    final_norm: bool = True
    """LayerNorm after the last block ([DV] ``norm``, HF ``layernorm``); false for HF mean-pooling models."""
    embed_norm: bool = False
    """LayerNorm on the tokens before the first block: data2vec 2.0's post-LN context encoder (spec §5.2)."""
    mask_ratio: float = 0.6
    """Target fraction of masked patches ([P1] §4.1: 60 %; [DV] 120/196)."""
    min_block_patches: int | None = None
    """Smallest masking block. None: [DV]'s 16 on the 14x14 grid kept as the same share of the grid,
    round(16 * T / 196), at least 1 (7x7 grid: 4; 4x4 grid: 1)."""
    mask_min_aspect: float = 0.3
    """Block aspect ratio is log-uniform in [min_aspect, 1/min_aspect] (BEiT)."""
    mask_adjust: float = 0.07
    """data2vec 2.0: extra kept-block centres making up for overlaps ([FS] ``mask_prob_adjust``)."""
    mask_block: int = 3
    """data2vec 2.0: side of the kept squares, in patches ([FS] ``mask_length``)."""
    v2: Data2Vec2Config = field(
        default_factory=lambda: Data2Vec2Config(
            clones=16, cls_loss=0.01, decoder=DecoderConfig(layers=6, kernel=3, dim=256, groups=16)
        )
    )
    """data2vec 2.0 only: clones, decoder (6 x 3x3 over the patch grid), CLS loss 0.01 (spec §5.3-5.6)."""
    targets: Data2VecTargets = field(default_factory=lambda: _vision_targets(top_k=3))
    """Target/loss settings; vision defaults of [DV] (top-K of the preset)."""
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(tau0=0.9998, tau_end=0.9998, tau_n=0))
    """Constant tau 0.9998 ([DV] ``--ema_decay 0.9998 --ema_start_at 0``)."""

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_masked(self) -> int:
        """Target number of masked patches per image (BEiT ``num_masking_patches``)."""
        return max(1, round(self.mask_ratio * self.num_patches))

    @property
    def min_block(self) -> int:
        if self.min_block_patches is not None:
            return self.min_block_patches
        return max(1, round(16 * self.num_patches / 196))

    def __post_init__(self) -> None:
        # messages name keys relative to this section; from_dict puts the section's path in front
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size must be a multiple of patch_size ({self.patch_size}), got {self.image_size}"
            )
        if self.targets.top_k > self.transformer.depth:
            raise ConfigError(
                f"targets.top_k exceeds depth: must be <= transformer.depth ({self.transformer.depth}), got "
                f"{self.targets.top_k}"
            )
        if self.relative_per_layer and self.position != "relative":
            raise ConfigError(f"relative_per_layer needs position: relative (got {self.position!r})")
        if self.position == "sincos" and self.transformer.dim % 4:
            raise ConfigError(
                f"position: sincos needs transformer.dim divisible by 4, got {self.transformer.dim}"
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 1 <= self.min_block <= self.num_masked:
            raise ConfigError(
                f"min_block_patches must be in [1, {self.num_masked}] (mask_ratio x {self.num_patches} "
                f"patches), got {self.min_block}"
            )
        if not 0.0 < self.mask_min_aspect <= 1.0:
            raise ConfigError(f"mask_min_aspect must be in (0, 1], got {self.mask_min_aspect}")
        if self.algorithm == "data2vec2":
            if self.position == "relative":
                raise ConfigError(
                    "position: data2vec2 drops the masked patches, so relative positions (which need every "
                    "patch) cannot work; set position: sincos (as [FS] data2vec 2.0) or absolute, got relative"
                )
            keep = int(self.num_patches * (1.0 - self.mask_ratio))
            if not 1 <= keep < self.num_patches or self.mask_block < 1:
                raise ConfigError(
                    f"mask_ratio: data2vec2 needs at least one kept and one masked patch (and mask_block "
                    f">= 1); {self.mask_ratio} keeps {keep} of {self.num_patches} patches"
                )


_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "transformer": {"dim": 16, "depth": 2, "heads": 2, "ffn_dim": 32, "drop_path": 0.0},
        "image_size": 28, "patch_size": 7, "targets": {"top_k": 2},
    },
    "small": {},  # the dataclass defaults
    "base": {  # [DV] README ViT-B: drop path 0.25, layer-scale 1e-4, attention dropout 0.05
        "transformer": {"dim": 768, "depth": 12, "heads": 12, "ffn_dim": 3072, "drop_path": 0.25,
                        "layer_scale_init": 1e-4, "attention_dropout": 0.05},
        "image_size": 224, "patch_size": 16, "targets": {"top_k": 6},
    },
    "large": {  # [DV] README ViT-L: drop path 0.2, layer-scale 1e-5, attention dropout 0.15
        "transformer": {"dim": 1024, "depth": 24, "heads": 16, "ffn_dim": 4096, "drop_path": 0.2,
                        "layer_scale_init": 1e-5, "attention_dropout": 0.15},
        "image_size": 224, "patch_size": 16, "targets": {"top_k": 6},
    },
}  # fmt: skip


# data2vec 2.0 (spec §5.2-5.5, [FS] config/v2/base_images_only_task.yaml): post-LN blocks after a LayerNorm,
# fixed sin-cos positions, no final norm, no dropout; inverse block masks keeping 20 % (3x3 blocks);
# targets: FFN outputs, instance norm per layer, layer norm after averaging, L2 x 1/sqrt(D); the teacher
# EMA's everything (its own patch embedding). Put under the size preset, then the user's keys.
_V2: dict[str, Any] = {
    "transformer": {"layer_norm_first": False, "layer_scale_init": None, "dropout": 0.0,
                    "attention_dropout": 0.0, "drop_path": 0.0},
    "position": "sincos", "final_norm": False, "embed_norm": True, "mask_ratio": 0.8, "mask_adjust": 0.07,
    "mask_block": 3,
    "targets": {"tap": "ffn", "layer_norm": "instance", "final_norm": "layer", "loss_beta": 0.0,
                "loss_scale": None, "loss_reduction": "token", "ema_local_encoder": True},
    "ema": {"tau0": 0.9998, "tau_end": 0.99999, "tau_n": 100_000},
}
_V2_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"targets": {"top_k": 2}, "v2": {"clones": 4, "decoder": {"layers": 2, "dim": 16, "groups": 4}}},
    "small": {"targets": {"top_k": 5}, "v2": {"decoder": {"dim": 256}}},
    # ViT-B: 12 blocks, targets from the top 10 ([FS] has 2 prenet + 10 main blocks, targets from the main)
    "base": {"targets": {"top_k": 10}, "v2": {"decoder": {"dim": 768}}},
    "large": {"targets": {"top_k": 18}, "mask_ratio": 0.75, "mask_adjust": 0.10,
              "v2": {"decoder": {"layers": 3, "kernel": 5, "dim": 1024}},
              "ema": {"tau_n": 150_000}},
}  # fmt: skip


ARCHITECTURE: tuple[str, ...] = (
    *TRANSFORMER_ARCHITECTURE, "transformer.layer_scale_init", "image_size", "patch_size", "in_channels",
    "position", "relative_per_layer", "final_norm", "embed_norm",
)  # fmt: skip
"""The ``model.image`` keys a published model fixes (its weights' shapes and what its forward computes):
``preset: from_init`` takes them from ``pretrain.image.init``, and a value that contradicts it is an error."""


def model_config(d: dict[str, Any] | None, where: str = "model.image") -> ModelConfig:
    """``ModelConfig`` from a params dict: the named preset's values (and, for ``algorithm: data2vec2``,
    that recipe's) under the user's keys (user wins; :func:`d2v.config.preset_config`)."""
    return preset_config(ModelConfig, d, where, _PRESETS, _V2, _V2_PRESETS)


# ------------------------------------------------------------------------------------------ positions


def relative_position_index(h: int, w: int) -> Tensor:
    """BEiT index [T+1, T+1] into the relative table (row 0 / column 0: CLS; last 3 rows: CLS pairs)."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [T, T, 2]
    idx = (rel[..., 0] + h - 1) * (2 * w - 1) + (rel[..., 1] + w - 1)
    n = (2 * h - 1) * (2 * w - 1)
    out = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    out[1:, 1:] = idx
    out[0, :] = n  # CLS -> token
    out[:, 0] = n + 1  # token -> CLS
    out[0, 0] = n + 2  # CLS -> CLS
    return out


def sincos_2d(dim: int, h: int, w: int) -> Tensor:
    """Fixed 2-D sin-cos positions [T+1, D] (MAE ``get_2d_sincos_pos_embed``); CLS row is zero."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def emb(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    pos = torch.cat([emb(xs), emb(ys)], dim=1)  # MAE: first half from the column, second from the row
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), pos]).float()


class RelativePositionBias(nn.Module):
    """BEiT's learned relative position bias: table [R, NH] -> bias [NH, T+1, T+1] (zero init, as BEiT)."""

    def __init__(self, grid: tuple[int, int], heads: int) -> None:
        super().__init__()
        self.grid = grid
        self.table = nn.Parameter(torch.zeros((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, heads))
        self.register_buffer("index", relative_position_index(*grid), persistent=False)  # regenerated

    def forward(self, grid: tuple[int, int]) -> Tensor:
        table, index = self.table, self.index
        if grid != self.grid:
            # Another resolution: bilinear resize of the distance table, as HF Data2VecVision does.
            (h0, w0), (h1, w1) = self.grid, grid
            sub = table[:-3].T.reshape(1, -1, 2 * h0 - 1, 2 * w0 - 1)
            sub = F.interpolate(sub, size=(2 * h1 - 1, 2 * w1 - 1), mode="bilinear", align_corners=False)
            table = torch.cat([sub.flatten(2)[0].T, table[-3:]])
            index = relative_position_index(*grid).to(table.device)
        n = index.shape[0]
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)


# -------------------------------------------------------------------------------------------- encoder


class ImageEncoder(Encoder):
    """Patch embedding (local encoder) + CLS + positions + pre-LN blocks + final LN."""

    modality = "image"
    num_prefix_tokens = 1  # CLS
    static_shapes = True  # every image is resized to image_size
    local_modules = ("patch_embed",)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        t = cfg.transformer
        self.config, self.transformer = cfg, t
        self.patch_embed = nn.Conv2d(
            cfg.in_channels, t.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(t.dim))
        self.mask_emb = nn.Parameter(torch.zeros(t.dim))
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, cfg.num_patches + 1, t.dim)) if cfg.position == "absolute" else None
        )
        n_tables = 0 if cfg.position != "relative" else t.depth if cfg.relative_per_layer else 1
        self.rel_pos = nn.ModuleList(RelativePositionBias(cfg.grid, t.heads) for _ in range(n_tables))
        sincos = sincos_2d(t.dim, *cfg.grid)[None] if cfg.position == "sincos" else None
        self.register_buffer("sincos", sincos, persistent=False)  # fixed: never trained or saved
        self.pos_drop = Dropout(t.dropout)  # [DV] pos_drop / HF embeddings dropout
        self.embed_norm = nn.LayerNorm(t.dim, eps=t.norm_eps) if cfg.embed_norm else nn.Identity()
        self.stack = TransformerStack(t)
        self.norm = nn.LayerNorm(t.dim, eps=t.norm_eps) if cfg.final_norm else nn.Identity()

    def check_inputs(self, inputs: Tensor, padding_mask: Tensor | None) -> None:
        cfg = self.config
        if padding_mask is not None:
            raise ValueError("images have no padding: pass padding_mask=None")
        if inputs.dim() != 4 or inputs.shape[1] != cfg.in_channels:
            raise ValueError(
                f"expected a float image batch [B, {cfg.in_channels}, H, W], got shape {tuple(inputs.shape)}"
            )
        if not inputs.is_floating_point():
            raise ValueError(f"expected float pixels (normalised), got dtype {inputs.dtype}")
        H, W = inputs.shape[-2:]
        p, s = cfg.patch_size, cfg.image_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of patch_size {p}")
        if cfg.position == "absolute" and (s, s) != (H, W):
            raise ValueError(f"learned absolute positions need {s}x{s} images, got {H}x{W}")
        if H != W:
            raise ValueError(f"expected square images ({s}x{s} or another multiple of {p}), got {H}x{W}")

    def local_features(self, inputs: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, None]:
        """Pixels [B, C, H, W] -> patch tokens ``(x_BTD, None)``; CLS and positions come after masking."""
        x = self.patch_embed(inputs.to(self.patch_embed.weight.dtype))
        return x.flatten(2).transpose(1, 2), None

    def _grid(self, T: int) -> tuple[int, int]:
        if self.config.num_patches == T:
            return self.config.grid
        g = math.isqrt(T)
        assert g * g == T, f"{T} patch tokens do not form a square grid"
        return g, g

    def positions(self, grid: tuple[int, int]) -> Tensor | None:
        """Additive positions [1, T+1, D] for 'absolute' / 'sincos' (CLS row first), else None."""
        if self.pos_embed is not None:
            return self.pos_embed
        if self.config.position == "sincos":
            if grid == self.config.grid:
                return self.sincos
            return sincos_2d(self.transformer.dim, *grid)[None].to(self.cls_token.device)
        return None

    def add_positions(self, x_BTD: Tensor, padding_BT: Tensor | None) -> Tensor:
        """Patch tokens + their 'absolute' / 'sincos' positions (CLS gets its row in ``encode_tokens``).

        data2vec 2.0 adds them before dropping the masked patches (spec §5.2); 'relative' positions act in
        the attention instead, so they need every patch (``encode_tokens``)."""
        assert padding_BT is None, "images have no padding"
        pos = self.positions(self._grid(x_BTD.shape[1]))
        return x_BTD if pos is None else x_BTD + pos[:, 1:].to(x_BTD.dtype)

    def encode_tokens(
        self,
        x_BKD: Tensor,
        padding_BK: Tensor | None,
        tap: Tap | None = None,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        """[CLS] + patch tokens -> blocks (relative bias over the full grid) -> final LN; outputs keep CLS."""
        assert padding_BK is None, "images have no padding"
        B, K, D = x_BKD.shape
        cls = self.cls_token.to(x_BKD.dtype).expand(B, 1, D)
        pos = self.positions(self.config.grid)
        if pos is not None:  # the CLS row (zero for sincos)
            cls = cls + pos[:, :1].to(x_BKD.dtype)
        x = self.embed_norm(self.pos_drop(torch.cat([cls, x_BKD], dim=1)))
        bias = None
        if self.rel_pos:  # every patch of a grid (model_config refuses 'relative' for data2vec 2.0)
            biases = [rp(self._grid(K)) for rp in self.rel_pos]  # [NH, K+1, K+1]: one shared or per block
            bias = biases if len(biases) > 1 else biases[0]
        out = self.stack(x, None, bias=bias, tap=tap, generator=generator)
        return EncoderOutput(self.norm(out.x_BTD), None, out.layers)


# ------------------------------------------------------------------------------------- build + init


def trunc_normal_(t: Tensor, std: float = 0.02) -> Tensor:
    # [DV] modeling_cyclical.py truncates at +-1 std (a=-std, b=std), not at +-2 std as timm's default.
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-std, b=std)


def _init_module(m: nn.Module) -> None:
    """[DV] ``_init_weights``: Linear and Conv2d trunc-normal 0.02 with zero bias; LayerNorm 1 / 0."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        trunc_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_encoder(cfg: ModelConfig) -> ImageEncoder:
    """A freshly initialised encoder (uses the global torch RNG: seed it first)."""
    enc = ImageEncoder(cfg)
    enc.apply(_init_module)
    for p in (enc.cls_token, enc.mask_emb, enc.pos_embed):
        if p is not None:
            trunc_normal_(p.data)
    with torch.no_grad():  # [DV] fix_init_weight: residual branch outputs scaled by 1/sqrt(2 * layer_id)
        for i, blk in enumerate(enc.stack.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))
    return enc


def make_head(cfg: ModelConfig) -> nn.Module:
    """Regression head: [DV] ``lm_head(norm(x))``.

    [DV]'s ``norm`` is the encoder's final LayerNorm (HF ``layernorm``), so with ``final_norm`` the
    encoder already applied it and the head's norm is the identity; without it the head owns the LN.
    """
    D = cfg.transformer.dim
    norm = nn.Identity() if cfg.final_norm else nn.LayerNorm(D, eps=cfg.transformer.norm_eps)
    head = nn.Sequential(OrderedDict(norm=norm, proj=nn.Linear(D, D)))
    head.apply(_init_module)
    return head


def make_decoder(cfg: ModelConfig) -> ConvDecoder:
    """data2vec 2.0's 2-D conv decoder over the patch grid (spec §5.3), PyTorch default init ([FS])."""
    return ConvDecoder(cfg.v2.decoder, cfg.transformer.dim, grid=cfg.grid)


def build_pretrain_model(cfg: ModelConfig) -> Data2Vec:
    """data2vec: student + regression head + EMA teacher of the whole encoder ([DV] ModelEmaV2).
    data2vec2: student + 2-D conv decoder + EMA teacher of the whole encoder (spec §5.5)."""
    if cfg.algorithm == "data2vec2":
        return Data2Vec2(build_encoder(cfg), make_decoder(cfg), cfg.targets, cfg.ema, cfg.v2)
    return Data2Vec(build_encoder(cfg), make_head(cfg), cfg.targets, cfg.ema)
