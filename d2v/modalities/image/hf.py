"""Hugging Face ``Data2VecVisionModel`` <-> d2v ``ImageEncoder`` (spec §7.3).

File I/O and dispatch live in ``d2v/hf.py``; the ``data2vec_vision.`` prefix of ``For<Task>`` models is
already stripped there. Key map (HF -> d2v):

  embeddings.cls_token [1,1,D] / mask_token [1,1,D]       -> cls_token [D] / mask_emb [D]
  embeddings.patch_embeddings.projection.*                -> patch_embed.*
  embeddings.position_embeddings [1,T+1,D]                -> pos_embed
  encoder.relative_position_bias.relative_position_bias_table            -> rel_pos.0.table (shared)
  encoder.layer.{i}.attention.attention.relative_position_bias.*_table   -> rel_pos.{i}.table (per layer)
  encoder.layer.{i}.attention.attention.{query,key,value}.*  -> stack.blocks.{i}.attn.qkv.* (key bias 0)
  encoder.layer.{i}.attention.output.dense.*              -> stack.blocks.{i}.attn.proj.*
  encoder.layer.{i}.layernorm_{before,after}.*            -> stack.blocks.{i}.norm{1,2}.*
  encoder.layer.{i}.intermediate.dense.* / output.dense.* -> stack.blocks.{i}.mlp.fc1.* / fc2.*
  encoder.layer.{i}.lambda_{1,2}                          -> stack.blocks.{i}.gamma{1,2}
  layernorm.*                                             -> norm.*  (absent with use_mean_pooling)
``relative_position_index`` buffers are regenerated and ``pooler.*`` (the classifier's mean-pool LN) is
dropped: d2v features are HF's ``last_hidden_state``.

``processor_from_hf`` reads the folder's ``preprocessor_config.json`` (a BEiT image processor) for ``embed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from d2v.modalities.image.data import (
    PROCESSOR_FILE,
    ProcessorSpec,
    processor_resize,
    read_image_processor,
    to_image,
)
from d2v.modalities.image.model import ImageEncoder, ModelConfig, model_config, sincos_2d

HF_MODEL_TYPE = "data2vec-vision"

# transformers' Data2VecVisionConfig defaults: what transformers itself reads for a key a config.json omits.
_HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16, "num_channels": 3,
    "use_absolute_position_embeddings": False, "use_relative_position_bias": False,
    "use_shared_relative_position_bias": False, "layer_scale_init_value": 0.1, "drop_path_rate": 0.1,
    "use_mean_pooling": True,
}  # fmt: skip
_ACTIVATIONS = ("gelu", "gelu_new", "relu")


def _square(v: Any, key: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"config.json {key}={v}: only square sizes are supported")
        v = v[0]
    return int(v)


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """``ModelConfig`` from a Data2VecVision ``config.json`` dict (architecture values read from it)."""
    if d.get("model_type") != HF_MODEL_TYPE:
        raise ValueError(f"config.json model_type {d.get('model_type')!r} is not {HF_MODEL_TYPE!r}")
    v = {**_HF_DEFAULTS, **d}
    absolute, per_layer, shared = (
        bool(v["use_absolute_position_embeddings"]),
        bool(v["use_relative_position_bias"]),
        bool(v["use_shared_relative_position_bias"]),
    )
    if absolute + per_layer + shared != 1:
        raise ValueError(
            "config.json: d2v supports exactly one of use_absolute_position_embeddings, "
            "use_relative_position_bias, use_shared_relative_position_bias; got "
            f"{absolute}, {per_layer}, {shared}"
        )
    if v["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(f"config.json hidden_act {v['hidden_act']!r} is not one of {list(_ACTIVATIONS)}")
    dim, depth = int(v["hidden_size"]), int(v["num_hidden_layers"])
    sizes = {p: model_config({"preset": p}).transformer for p in ("tiny", "small", "base", "large")}
    preset = next((p for p, t in sizes.items() if (t.dim, t.depth) == (dim, depth)), "base")
    scale = float(v["layer_scale_init_value"])
    values = {
        "preset": preset,
        "transformer": {
            "dim": dim, "depth": depth, "heads": int(v["num_attention_heads"]),
            "ffn_dim": int(v["intermediate_size"]), "layer_norm_first": True,
            "dropout": v["hidden_dropout_prob"], "attention_dropout": v["attention_probs_dropout_prob"],
            "activation_dropout": 0.0, "layerdrop": 0.0, "drop_path": v["drop_path_rate"],
            "layer_scale_init": scale if scale > 0 else None,  # HF: lambdas only if the value is > 0
            "norm_eps": v["layer_norm_eps"], "activation": v["hidden_act"],
        },
        "image_size": _square(v["image_size"], "image_size"),
        "patch_size": _square(v["patch_size"], "patch_size"),
        "in_channels": int(v["num_channels"]),
        "position": "absolute" if absolute else "relative",
        "relative_per_layer": per_layer,
        "final_norm": not v["use_mean_pooling"],  # mean pooling: last_hidden_state has no final LN
        "targets": {"top_k": min(model_config({"preset": preset}).targets.top_k, depth)},
    }  # fmt: skip
    return model_config(values, where="config.json")


def _block_map(i: int) -> dict[str, str]:
    """HF name -> d2v name for block ``i`` (everything except q/k/v and the per-layer table)."""
    h, o = f"encoder.layer.{i}.", f"stack.blocks.{i}."
    return {
        h + "attention.output.dense.weight": o + "attn.proj.weight",
        h + "attention.output.dense.bias": o + "attn.proj.bias",
        h + "layernorm_before.weight": o + "norm1.weight",
        h + "layernorm_before.bias": o + "norm1.bias",
        h + "layernorm_after.weight": o + "norm2.weight",
        h + "layernorm_after.bias": o + "norm2.bias",
        h + "intermediate.dense.weight": o + "mlp.fc1.weight",
        h + "intermediate.dense.bias": o + "mlp.fc1.bias",
        h + "output.dense.weight": o + "mlp.fc2.weight",
        h + "output.dense.bias": o + "mlp.fc2.bias",
    }


def _names(cfg: ModelConfig) -> dict[str, str]:
    """Every one-to-one HF -> d2v name of an encoder of ``cfg``."""
    names = {
        "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    }
    if cfg.position == "absolute":
        names["embeddings.position_embeddings"] = "pos_embed"
    if cfg.position == "relative" and not cfg.relative_per_layer:
        names["encoder.relative_position_bias.relative_position_bias_table"] = "rel_pos.0.table"
    if cfg.final_norm:
        names |= {"layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    for i in range(cfg.transformer.depth):
        names |= _block_map(i)
        att = f"encoder.layer.{i}.attention.attention."
        if cfg.relative_per_layer:
            names[att + "relative_position_bias.relative_position_bias_table"] = f"rel_pos.{i}.table"
        if cfg.transformer.layer_scale_init is not None:
            for k in (1, 2):
                names[f"encoder.layer.{i}.lambda_{k}"] = f"stack.blocks.{i}.gamma{k}"
    return names


def state_dict_from_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """d2v encoder state dict from a (prefix-stripped) Data2VecVision state dict.

    Unknown HF keys are passed through unchanged so that ``load_state_dict`` reports them as unexpected.
    """
    src = {k: v for k, v in sd.items() if "relative_position_index" not in k and not k.startswith("pooler.")}

    def take(k: str) -> Tensor:
        if k not in src:
            raise ValueError(f"HF weights lack {k!r}, needed by a data2vec-vision model of this config.json")
        return src.pop(k)

    out = {ours: take(hf) for hf, ours in _names(cfg).items()}
    out["cls_token"] = take("embeddings.cls_token").reshape(-1)
    # use_mask_token is false in the released configs: start from HF's own init (zeros) then.
    mask = src.pop("embeddings.mask_token", None)
    out["mask_emb"] = mask.reshape(-1) if mask is not None else torch.zeros_like(out["cls_token"])
    for i in range(cfg.transformer.depth):
        att = f"encoder.layer.{i}.attention.attention."
        q_w, k_w, v_w = (take(att + n + ".weight") for n in ("query", "key", "value"))
        q_b, v_b = take(att + "query.bias"), take(att + "value.bias")
        # BEiT has no key bias; a key bias adds a per-query constant to the scores, so zero is exact.
        out[f"stack.blocks.{i}.attn.qkv.weight"] = torch.cat([q_w, k_w, v_w])
        out[f"stack.blocks.{i}.attn.qkv.bias"] = torch.cat([q_b, torch.zeros_like(q_b), v_b])
    return out | src


def to_hf(encoder: ImageEncoder) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json dict, state dict)`` that ``transformers.Data2VecVisionModel.from_pretrained`` loads.

    'sincos' positions are written as HF absolute position embeddings holding the fixed table (exact at
    ``image_size``). Our key bias is dropped (no effect on outputs); training-only options without an HF
    counterpart (activation_dropout, layerdrop) are not exported.
    """
    cfg, t = encoder.config, encoder.transformer
    if not t.layer_norm_first:
        raise ValueError("Data2VecVision is pre-LN: export needs transformer.layer_norm_first: true")
    if t.layer_scale_init == 0.0:
        raise ValueError(
            "transformer.layer_scale_init 0 has no HF equivalent; use null to disable layer-scale"
        )
    per_layer = cfg.position == "relative" and cfg.relative_per_layer
    hf_cfg = {
        "model_type": HF_MODEL_TYPE, "architectures": ["Data2VecVisionModel"],
        "hidden_size": t.dim, "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
        "intermediate_size": t.ffn_dim, "hidden_act": t.activation, "hidden_dropout_prob": t.dropout,
        "attention_probs_dropout_prob": t.attention_dropout, "drop_path_rate": t.drop_path,
        "layer_norm_eps": t.norm_eps, "layer_scale_init_value": t.layer_scale_init or 0.0,
        "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_channels,
        "use_mask_token": True, "use_absolute_position_embeddings": cfg.position != "relative",
        "use_relative_position_bias": per_layer,
        "use_shared_relative_position_bias": cfg.position == "relative" and not per_layer,
        "use_mean_pooling": not cfg.final_norm, "initializer_range": 0.02,
    }  # fmt: skip
    ours = {k: v.detach() for k, v in encoder.state_dict().items()}
    sd = {hf: ours[name] for hf, name in _names(cfg).items()}
    sd["embeddings.cls_token"] = ours["cls_token"].reshape(1, 1, -1)
    sd["embeddings.mask_token"] = ours["mask_emb"].reshape(1, 1, -1)
    if cfg.position == "sincos":
        sd["embeddings.position_embeddings"] = sincos_2d(t.dim, *cfg.grid)[None]
    D = t.dim
    for i in range(t.depth):
        att = f"encoder.layer.{i}.attention.attention."
        w, b = ours[f"stack.blocks.{i}.attn.qkv.weight"], ours[f"stack.blocks.{i}.attn.qkv.bias"]
        sd |= {
            att + "query.weight": w[:D],
            att + "key.weight": w[D : 2 * D],
            att + "value.weight": w[2 * D :],
        }
        sd |= {att + "query.bias": b[:D], att + "value.bias": b[2 * D :]}
    return hf_cfg, {k: v.clone() for k, v in sd.items()}  # own storage: safetensors rejects shared views


# ------------------------------------------------------------------------------------- image processor
# The file is parsed, and images resized, by ``d2v/modalities/image/data.py`` (``read_image_processor``,
# ``processor_resize``): the shard stage makes ``preprocess_like`` shards with the same code, without the model.


@dataclass(frozen=True)
class ImageProcessor:
    """transformers' BEiT image processor as ``embed`` preprocessing: resize, centre crop, rescale and
    normalise the uint8 pixels as transformers 5's ``BeitImageProcessor`` (its torchvision backend) does.

    Images are converted to the model's channels first (grey repeated to RGB, alpha dropped).
    """

    spec: ProcessorSpec
    """The processor's settings (``data.read_image_processor``)."""
    channels: int

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        xs = [self.pixels(to_image(item)) for item in items]
        shapes = sorted({tuple(x.shape) for x in xs})
        if len(shapes) > 1:
            raise ValueError(
                f"the image processor gives images of different sizes {shapes} (shortest-edge resize without "
                "a centre crop): embed them one at a time (batch_size=1)"
            )
        return {"inputs": torch.stack(xs)}

    def pixels(self, im: Image.Image) -> Tensor:
        """float32 [C, H, W] model input of one PIL image."""
        a = np.array(im.convert("RGB" if self.channels == 3 else "L"))
        x = torch.from_numpy(a).permute(2, 0, 1) if a.ndim == 3 else torch.from_numpy(a)[None]
        p = self.spec
        x = processor_resize(x, p.size, p.resample, p.crop)
        return rescale_and_normalize(x, p.rescale, p.mean, p.std)


def rescale_and_normalize(
    x_CHW: Tensor, rescale: float | None, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Tensor:
    """float32 pixels: ``x * rescale`` then ``(x - mean) / std``, fused as transformers fuses them (mean and
    std divided by the scale, then one normalisation of the raw values) so the rounding is the same."""
    if mean is None or std is None:
        return x_CHW * rescale if rescale is not None else x_CHW.float()
    m, s = torch.tensor(mean), torch.tensor(std)
    if rescale is not None:
        m, s = m * (1.0 / rescale), s * (1.0 / rescale)
    return (x_CHW.float() - m.view(-1, 1, 1)) / s.view(-1, 1, 1)


def processor_from_hf(folder: Path, cfg: ModelConfig) -> ImageProcessor:
    """The ``embed`` preprocessing of an HF Data2VecVision folder: its ``preprocessor_config.json``
    (``BeitImageProcessor``); ValueError naming the file and what to do when it is missing or unsupported."""
    f = Path(folder) / PROCESSOR_FILE
    if not f.is_file():
        raise ValueError(
            f"{folder}: no {PROCESSOR_FILE}; embed needs the image processor of a Data2VecVision model "
            "(BeitImageProcessor: resize, rescale, normalise). Save it into the folder, e.g. "
            "transformers.BeitImageProcessor.from_pretrained('facebook/data2vec-vision-base')"
            f".save_pretrained('{folder}'), or pass preprocessing= to embed"
        )
    return ImageProcessor(read_image_processor(f, cfg.in_channels), cfg.in_channels)
