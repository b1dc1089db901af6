"""Key and config maps between ``Data2VecAudioModel`` (transformers) and ``AudioEncoder`` (spec §7.1).

File I/O and dispatch live in ``d2v/hf.py``; the ``data2vec_audio.`` prefix of ``For<Task>`` models is
stripped there. HF keeps q/k/v separate; we fuse them into one ``qkv`` projection (rows q, k, v).

``processor_from_hf`` reads the folder's ``preprocessor_config.json`` (a ``Wav2Vec2FeatureExtractor``) for
``embed``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from d2v.config import ConfigError, TransformerConfig, replace
from d2v.modalities.audio.data import PROCESSOR_FILE, collate, read_feature_extractor, to_waveform
from d2v.modalities.audio.model import PRESETS, AudioEncoder, ModelConfig

HF_MODEL_TYPE = "data2vec-audio"

# transformers' ``Data2VecAudioConfig`` defaults (§7.1): what ``from_pretrained`` uses for a key that a
# config.json omits, so we read the same value it would.
HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "hidden_dropout": 0.1, "activation_dropout": 0.1, "attention_dropout": 0.1,
    "feat_proj_dropout": 0.0, "layerdrop": 0.1, "layer_norm_eps": 1e-5, "feat_extract_activation": "gelu",
    "conv_dim": [512] * 7, "conv_stride": [5, 2, 2, 2, 2, 2, 2], "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_bias": False, "num_conv_pos_embedding_groups": 16, "conv_pos_kernel_size": 19,
    "num_conv_pos_embeddings": 5, "add_adapter": False,
}  # fmt: skip

# our name (in a block) -> HF name (in ``encoder.layers.{n}.``), except the fused qkv
_BLOCK_KEYS = {
    "attn.proj": "attention.out_proj",
    "norm1": "layer_norm",
    "mlp.fc1": "feed_forward.intermediate_dense",
    "mlp.fc2": "feed_forward.output_dense",
    "norm2": "final_layer_norm",
}
_ACTIVATIONS = ("gelu", "gelu_new", "relu")
FEATURE_EXTRACTOR_EPS = 1e-7
"""``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm``'s epsilon (a constant there)."""


def _get(d: dict[str, Any], key: str) -> Any:
    return d[key] if key in d else HF_DEFAULTS[key]


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """``ModelConfig`` of a ``Data2VecAudioConfig`` dict (config.json); ValueError for variants we lack.

    Architecture values come from ``d``; pre-training-only settings (masking, targets, EMA) are not stored
    by transformers and keep the d2v defaults (HF's ``mask_time_*`` is fine-tuning SpecAugment). The
    waveform normalisation that transformers leaves to the feature extractor is the encoder's own, with the
    extractor's epsilon. ``preset`` is the preset of the same Transformer size, else "base" (a label only).
    """
    if d.get("model_type") != HF_MODEL_TYPE:
        raise ValueError(f"config.json: model_type {d.get('model_type')!r} is not {HF_MODEL_TYPE!r}")
    if _get(d, "add_adapter"):
        raise ValueError("config.json: add_adapter=true (conv adapter after the encoder) is not supported")
    if _get(d, "feat_extract_activation") != "gelu":
        raise ValueError(
            f"config.json: feat_extract_activation {d['feat_extract_activation']!r} is not supported "
            "(data2vec uses 'gelu')"
        )
    if d.get("feat_extract_norm", "layer") != "layer":
        raise ValueError("config.json: feat_extract_norm must be 'layer' (a LayerNorm after every conv)")
    act = _get(d, "hidden_act")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act {act!r} is not supported; expected one of {_ACTIVATIONS}")
    base = ModelConfig()
    try:
        # ``do_stable_layer_norm`` is ignored as transformers does: Data2VecAudio is always post-LN (§7.1).
        transformer = TransformerConfig(
            dim=_get(d, "hidden_size"),
            depth=_get(d, "num_hidden_layers"),
            heads=_get(d, "num_attention_heads"),
            ffn_dim=_get(d, "intermediate_size"),
            layer_norm_first=False,
            dropout=float(_get(d, "hidden_dropout")),
            attention_dropout=float(_get(d, "attention_dropout")),
            activation_dropout=float(_get(d, "activation_dropout")),
            layerdrop=float(_get(d, "layerdrop")),
            norm_eps=float(_get(d, "layer_norm_eps")),
            activation=act,
        )
        size = {k: getattr(transformer, k) for k in ("dim", "depth", "heads", "ffn_dim")}
        preset = next(
            (p for p, v in PRESETS.items() if all(v["transformer"][k] == x for k, x in size.items())), "base"
        )
        return replace(
            base,
            preset=preset,
            transformer=transformer,
            conv_dim=list(_get(d, "conv_dim")),
            conv_kernel=list(_get(d, "conv_kernel")),
            conv_stride=list(_get(d, "conv_stride")),
            conv_bias=bool(_get(d, "conv_bias")),
            pos_conv_layers=_get(d, "num_conv_pos_embeddings"),
            pos_conv_kernel=_get(d, "conv_pos_kernel_size"),
            pos_conv_groups=_get(d, "num_conv_pos_embedding_groups"),
            feat_proj_dropout=float(_get(d, "feat_proj_dropout")),
            # the model normalises as transformers' Wav2Vec2FeatureExtractor does (it is not in config.json)
            normalize_waveform=True,
            normalize_eps=FEATURE_EXTRACTOR_EPS,
            targets={**vars(base.targets), "top_k": min(8, transformer.depth)},  # [P1] K=8 of 12
        )
    except ConfigError as e:
        raise ValueError(f"config.json: unsupported Data2VecAudio variant: {e}") from None


def state_dict_from_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Backbone state dict (no ``data2vec_audio.`` prefix) -> ``AudioEncoder`` state dict.

    Keys we do not know pass through unchanged, so loading reports them. ``masked_spec_embed`` exists only
    if the HF config had ``mask_time_prob > 0``; without it ``mask_emb`` gets a fresh U(0, 1) draw (fixed
    generator), the same init as ``build_encoder``.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        if k == "masked_spec_embed":
            out["mask_emb"] = v
        elif k.startswith(("feature_extractor.", "feature_projection.")):
            out[k] = v
        elif k.startswith("encoder.pos_conv_embed."):
            out["pos_conv." + k[len("encoder.pos_conv_embed.") :]] = v
        elif k.startswith("encoder.layer_norm."):
            out[k[len("encoder.") :]] = v
        elif m and m[2] in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
            qkv.setdefault((m[1], m[3]), {})[m[2][-6]] = v
        elif m and m[2] in _BLOCK_KEYS.values():
            ours = next(o for o, h in _BLOCK_KEYS.items() if h == m[2])
            out[f"stack.blocks.{m[1]}.{ours}.{m[3]}"] = v
        else:
            out[k] = v
    for (n, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"stack.blocks.{n}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:  # incomplete: pass the pieces through so the loader names them
            out.update({f"encoder.layers.{n}.attention.{p}_proj.{kind}": t for p, t in parts.items()})
    if "mask_emb" not in out:
        out["mask_emb"] = torch.rand(cfg.transformer.dim, generator=torch.Generator().manual_seed(0))
    return out


def state_dict_to_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Inverse of ``state_dict_from_hf``: ``AudioEncoder`` state dict -> ``Data2VecAudioModel`` keys."""
    D = cfg.transformer.dim
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"stack\.blocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if k == "mask_emb":
            out["masked_spec_embed"] = v
        elif k.startswith(("feature_extractor.", "feature_projection.")):
            out[k] = v
        elif k.startswith("pos_conv."):
            out["encoder.pos_conv_embed." + k[len("pos_conv.") :]] = v
        elif k.startswith("layer_norm."):
            out["encoder." + k] = v
        elif m and m[2] == "attn.qkv":
            for i, p in enumerate("qkv"):
                out[f"encoder.layers.{m[1]}.attention.{p}_proj.{m[3]}"] = v[i * D : (i + 1) * D]
        elif m and m[2] in _BLOCK_KEYS:
            out[f"encoder.layers.{m[1]}.{_BLOCK_KEYS[m[2]]}.{m[3]}"] = v
        else:
            raise AssertionError(f"no HF name for {k}")
    return out


def to_hf(encoder: AudioEncoder) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json dict, state dict)`` that ``transformers.Data2VecAudioModel.from_pretrained`` loads."""
    cfg: ModelConfig = encoder.config
    t = cfg.transformer
    hf_cfg = {
        "model_type": HF_MODEL_TYPE,
        "architectures": ["Data2VecAudioModel"],
        "hidden_size": t.dim,
        "num_hidden_layers": t.depth,
        "num_attention_heads": t.heads,
        "intermediate_size": t.ffn_dim,
        "hidden_act": t.activation,
        "hidden_dropout": t.dropout,
        "attention_dropout": t.attention_dropout,
        "activation_dropout": t.activation_dropout,
        "feat_proj_dropout": cfg.feat_proj_dropout,
        "layerdrop": t.layerdrop,
        "layer_norm_eps": t.norm_eps,
        "feat_extract_activation": "gelu",
        "conv_dim": list(cfg.conv_dim),
        "conv_kernel": list(cfg.conv_kernel),
        "conv_stride": list(cfg.conv_stride),
        "conv_bias": cfg.conv_bias,
        "num_conv_pos_embeddings": cfg.pos_conv_layers,
        "conv_pos_kernel_size": cfg.pos_conv_kernel,
        "num_conv_pos_embedding_groups": cfg.pos_conv_groups,
        # > 0 so transformers creates ``masked_spec_embed`` (our mask_emb); 0.05: its fine-tuning default
        "mask_time_prob": 0.05,
        "mask_time_length": cfg.mask_length,
        "add_adapter": False,
    }
    sd = {k: v.detach().float() for k, v in encoder.state_dict().items()}
    return hf_cfg, state_dict_to_hf(sd, cfg)


# ---------------------------------------------------------------------------------- feature extractor
# The file is parsed by ``d2v/modalities/audio/data.py`` (``read_feature_extractor``), which the shard stage
# also reads for ``preprocess_like`` shards.


@dataclass(frozen=True)
class FeatureExtractor:
    """transformers' ``Wav2Vec2FeatureExtractor`` as ``embed`` preprocessing: items as float32 waveforms at
    its sampling rate, right-padded, with a padding mask.

    Its per-utterance normalisation (zero mean, unit variance over the valid samples, eps 1e-7) is the
    encoder's own (``normalize_waveform`` / ``normalize_eps``, set by ``config_from_hf``), so it is not
    repeated here. Padding is always masked: with ``return_attention_mask: false`` transformers would feed
    a batch's padding to the model as signal, so each row equals transformers on that item alone.
    """

    sample_rate: int

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        xs = [to_waveform(item, self.sample_rate) for item in items]
        return collate(xs, mode="eval", model_cfg=None, prep={}, generator=torch.Generator())


def processor_from_hf(folder: Path, cfg: ModelConfig) -> FeatureExtractor:
    """The ``embed`` preprocessing of an HF Data2VecAudio folder: its ``preprocessor_config.json``
    (``Wav2Vec2FeatureExtractor``); ValueError naming the file and what to do when it is missing or asks for
    something this encoder does not do."""
    f = Path(folder) / PROCESSOR_FILE
    if not f.is_file():
        raise ValueError(
            f"{folder}: no {PROCESSOR_FILE}; embed needs the feature extractor of a Data2VecAudio model "
            "(Wav2Vec2FeatureExtractor: sampling rate, normalisation). Save it into the folder, e.g. "
            "transformers.Wav2Vec2FeatureExtractor.from_pretrained('facebook/data2vec-audio-base-960h')"
            f".save_pretrained('{folder}'), or pass preprocessing= to embed"
        )
    spec = read_feature_extractor(f)
    # transformers' default is true, and every data2vec-audio checkpoint normalises
    if not spec.normalize:
        raise ValueError(
            f"{f}: do_normalize is false, but the d2v audio encoder normalises every utterance itself "
            "(data2vec's recipe): set do_normalize to true, or pass preprocessing= to embed"
        )
    return FeatureExtractor(spec.sample_rate)
