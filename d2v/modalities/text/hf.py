"""Hugging Face ``Data2VecText*`` checkpoints <-> ``TextEncoder`` (spec §7.2; transformers 5.x).

Key map (HF ``encoder.layer.{n}.`` -> ours ``encoder.blocks.{n}.``):
  embeddings.word_embeddings                       -> embeddings.tokens
  embeddings.position_embeddings (+ token type 0)  -> embeddings.positions
  embeddings.LayerNorm                             -> embeddings.norm
  attention.self.{query,key,value}                 -> attn.qkv (fused, rows q | k | v)
  attention.output.dense / .LayerNorm              -> attn.proj / norm1
  intermediate.dense / output.dense / .LayerNorm   -> mlp.fc1 / mlp.fc2 / norm2
HF adds ``token_type_embeddings[token_type_ids = 0]`` to every token: on import that row is added to every
position row (exact, the sum feeds the embedding LayerNorm either way); on export the token-type row is zeros.
The pooler (Dense + tanh on <s>) is not part of data2vec: it is ignored on import.

``processor_from_hf`` reads the folder's tokenizer (``tokenizer.json``, or RoBERTa's ``vocab.json`` +
``merges.txt``) for ``embed``, with the ``tokenizers`` library (transformers is not needed). The readers
themselves (``read_tokenizer``, ``special_tokens``) live in ``data.py``, which imports no model code: the
shard stage reads the same files for ``shard.text.preprocess_like``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from d2v.config import TransformerConfig, from_dict
from d2v.modalities.base import Data2VecTargets
from d2v.modalities.text.data import config_token_id, read_tokenizer, special_tokens, to_text, tokenizer_file
from d2v.modalities.text.model import PRESETS, ModelConfig, TextEncoder

HF_MODEL_TYPE = "data2vec-text"

_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu"}
_BLOCK_MAP = {  # HF name inside encoder.layer.{n} -> ours inside encoder.blocks.{n}
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}
_IGNORED = ("pooler.", "embeddings.position_ids", "embeddings.token_type_ids")
"""HF keys without a d2v counterpart: the pooler and the position/token-type id buffers of old checkpoints."""


def _need(d: dict[str, Any], key: str) -> Any:
    if key not in d:
        raise ValueError(f"config.json of a {HF_MODEL_TYPE} model lacks {key!r}; it must list every size")
    return d[key]


def _preset_label(t: TransformerConfig) -> str:
    """The preset with these sizes, else 'base': a label only, every value is read from config.json."""
    for name, p in PRESETS.items():
        if (t.dim, t.depth, t.heads) == tuple(p["transformer"][k] for k in ("dim", "depth", "heads")):
            return name
    return "base"


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` dict; sizes and ids come from it, never from class defaults
    (``Data2VecTextConfig`` defaults are BERT's, not the checkpoints', spec §7.2)."""
    if d.get("position_embedding_type", "absolute") != "absolute":  # transformers 5 implements only absolute
        raise ValueError(
            f"position_embedding_type {d['position_embedding_type']!r} is not supported; expected 'absolute'"
        )
    if d.get("is_decoder") or d.get("add_cross_attention"):
        raise ValueError("a decoder / cross-attention data2vec-text config is not a data2vec encoder")
    act = _need(d, "hidden_act")
    if act not in _ACT_FROM_HF:
        raise ValueError(f"hidden_act {act!r} is not supported; expected one of {list(_ACT_FROM_HF)}")
    pad = _need(d, "pad_token_id")
    if _need(d, "type_vocab_size") < 1:
        raise ValueError("type_vocab_size must be >= 1 (row 0 is added to every token)")
    transformer = TransformerConfig(
        dim=_need(d, "hidden_size"),
        depth=_need(d, "num_hidden_layers"),
        heads=_need(d, "num_attention_heads"),
        ffn_dim=_need(d, "intermediate_size"),
        layer_norm_first=False,
        dropout=float(_need(d, "hidden_dropout_prob")),
        attention_dropout=float(_need(d, "attention_probs_dropout_prob")),
        activation_dropout=0.0,
        norm_eps=float(_need(d, "layer_norm_eps")),
        activation=_ACT_FROM_HF[act],
    )
    preset = _preset_label(transformer)
    k = PRESETS[preset]["targets"]["top_k"]
    mask_id = config_token_id(d, "mask_token_id", 4)
    return ModelConfig(
        preset=preset,
        transformer=transformer,
        vocab_size=_need(d, "vocab_size"),
        max_positions=_need(d, "max_position_embeddings") - pad - 1,
        pad_id=pad,
        mask_id=mask_id,
        bos_id=config_token_id(d, "bos_token_id", 0),
        eos_id=config_token_id(d, "eos_token_id", 2),
        # RoBERTa's dictionary puts <mask> last (50264): then only <s> <pad> </s> <unk> are special
        num_special=5 if mask_id == 4 else 4,
        targets=from_dict(
            Data2VecTargets, {**PRESETS[preset]["targets"], "top_k": min(k, transformer.depth)}
        ),
    )


def _expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in TextEncoder(cfg).state_dict().items()}


def state_dict_from_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF backbone state dict (``data2vec_text.`` prefix already stripped) -> ``TextEncoder`` state dict."""
    sd, missing = dict(sd), []

    def take(key: str) -> Tensor:
        if key not in sd:
            missing.append(key)
            return torch.empty(0)
        return sd.pop(key)

    out = {"embeddings.tokens.weight": take("embeddings.word_embeddings.weight")}
    pos = take("embeddings.position_embeddings.weight")
    token_type = take("embeddings.token_type_embeddings.weight")
    out["embeddings.norm.weight"] = take("embeddings.LayerNorm.weight")
    out["embeddings.norm.bias"] = take("embeddings.LayerNorm.bias")
    for n in range(cfg.transformer.depth):
        hf, ours = f"encoder.layer.{n}.", f"encoder.blocks.{n}."
        for w in ("weight", "bias"):
            out[f"{ours}attn.qkv.{w}"] = [
                take(f"{hf}attention.self.{x}.{w}") for x in ("query", "key", "value")
            ]
            for a, b in _BLOCK_MAP.items():
                out[f"{ours}{b}.{w}"] = take(f"{hf}{a}.{w}")
    if missing:
        raise ValueError(
            f"{HF_MODEL_TYPE} weights are missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
        )
    extra = sorted(k for k in sd if not k.startswith(_IGNORED))
    if extra:
        raise ValueError(f"unexpected {HF_MODEL_TYPE} weights {extra[:8]} for depth {cfg.transformer.depth}")
    out["embeddings.positions.weight"] = pos + token_type[0]
    out = {k: torch.cat(v) if isinstance(v, list) else v for k, v in out.items()}
    bad = {k: (tuple(out[k].shape), tuple(s)) for k, s in _expected_shapes(cfg).items() if out[k].shape != s}
    if bad:
        raise ValueError(f"weight shapes (got, expected) do not match config.json: {bad}")
    return out


def to_hf(encoder: TextEncoder) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json dict, state dict)`` that ``transformers.Data2VecTextModel.from_pretrained`` loads.

    The pooler (absent from data2vec) is written with HF's own init, N(0, 0.02) weights and zero bias, from a
    fixed seed: loading then reports no missing keys and the export is reproducible. Training-only
    settings HF has no field for (LayerDrop, drop path, activation dropout) are not exported.
    """
    cfg, t = encoder.config, encoder.transformer
    sd = {k: v.detach() for k, v in encoder.state_dict().items()}
    dtype = sd["embeddings.tokens.weight"].dtype
    config = {
        "model_type": HF_MODEL_TYPE,
        "architectures": ["Data2VecTextModel"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": t.dim,
        "num_hidden_layers": t.depth,
        "num_attention_heads": t.heads,
        "intermediate_size": t.ffn_dim,
        "hidden_act": _ACT_TO_HF[t.activation],
        "hidden_dropout_prob": t.dropout,
        "attention_probs_dropout_prob": t.attention_dropout,
        "max_position_embeddings": cfg.position_rows,
        "type_vocab_size": 1,
        "initializer_range": 0.02,
        "layer_norm_eps": t.norm_eps,
        "pad_token_id": cfg.pad_id,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "mask_token_id": cfg.mask_id,
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
        "classifier_dropout": None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    out = {
        "embeddings.word_embeddings.weight": sd["embeddings.tokens.weight"],
        "embeddings.position_embeddings.weight": sd["embeddings.positions.weight"],
        "embeddings.token_type_embeddings.weight": torch.zeros(1, t.dim, dtype=dtype),
        "embeddings.LayerNorm.weight": sd["embeddings.norm.weight"],
        "embeddings.LayerNorm.bias": sd["embeddings.norm.bias"],
    }
    for n in range(t.depth):
        hf, ours = f"encoder.layer.{n}.", f"encoder.blocks.{n}."
        for w in ("weight", "bias"):
            q, k, v = sd[f"{ours}attn.qkv.{w}"].chunk(3)
            out |= {
                f"{hf}attention.self.query.{w}": q,
                f"{hf}attention.self.key.{w}": k,
                f"{hf}attention.self.value.{w}": v,
            }
            out |= {f"{hf}{a}.{w}": sd[f"{ours}{b}.{w}"] for a, b in _BLOCK_MAP.items()}
    g = torch.Generator().manual_seed(0)
    out["pooler.dense.weight"] = (torch.randn(t.dim, t.dim, generator=g) * 0.02).to(dtype)
    out["pooler.dense.bias"] = torch.zeros(t.dim, dtype=dtype)
    return config, out


# ------------------------------------------------------------------------------------------- tokenizer

_TOKENIZERS: dict[str, Any] = {}


@dataclass(frozen=True)
class TokenizerPreprocessing:
    """An HF folder's tokenizer as ``embed`` preprocessing: ``<s> ... </s>`` ids, as transformers'
    ``tokenizer(texts, padding=True)`` gives them (text as is, no stripping), right-padded with the model's
    pad id. Longer texts keep their first ``max_positions - 1`` ids and ``</s>`` (``truncation=True``)."""

    tokenizer_json: str
    """The ``tokenizers`` JSON (a string, so the preprocessing pickles)."""
    pad_id: int
    max_positions: int

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        texts = [to_text(item) for item in items]
        tok = _tokenizer(self.tokenizer_json)
        ids = [truncate(tok.encode(t).ids, self.max_positions) for t in texts]
        T = max(len(x) for x in ids)
        batch = torch.full((len(ids), T), self.pad_id, dtype=torch.int64)
        for i, x in enumerate(ids):
            batch[i, : len(x)] = torch.tensor(x, dtype=torch.int64)
        lengths = torch.tensor([len(x) for x in ids])
        return {"inputs": batch, "padding_mask": torch.arange(T)[None, :] >= lengths[:, None]}


def truncate(ids: list[int], limit: int) -> list[int]:
    """The first ``limit - 1`` ids and the last (``</s>``): what transformers' ``truncation=True`` keeps."""
    return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]


def _tokenizer(content: str):
    key = hashlib.sha256(content.encode("utf-8")).hexdigest()
    if key not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS[key] = Tokenizer.from_str(content)
    return _TOKENIZERS[key]


def processor_from_hf(folder: Path, cfg: ModelConfig) -> TokenizerPreprocessing:
    """The ``embed`` preprocessing of an HF Data2VecText folder: its tokenizer, checked against the model
    (``<s>`` / ``</s>`` / ``<pad>`` ids of config.json, vocabulary size); ValueError naming what is wrong."""
    folder = Path(folder)
    tok = read_tokenizer(folder)
    where = tokenizer_file(folder)
    framed = tok.encode("").ids
    if framed != [cfg.bos_id, cfg.eos_id]:
        raise ValueError(
            f"{where}: the tokenizer frames a text as {framed}, but config.json has bos_token_id "
            f"{cfg.bos_id} and eos_token_id {cfg.eos_id}: the tokenizer is not this model's"
        )
    pad = special_tokens(folder)["pad_token"]
    if tok.token_to_id(pad) != cfg.pad_id:
        raise ValueError(
            f"{where}: pad token {pad!r} has id {tok.token_to_id(pad)}, but config.json has pad_token_id "
            f"{cfg.pad_id}: the tokenizer is not this model's"
        )
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(
            f"{where}: {tok.get_vocab_size()} tokens, more than the model's vocab_size {cfg.vocab_size}"
        )
    return TokenizerPreprocessing(tok.to_str(), cfg.pad_id, cfg.max_positions)


def config_from_folder(cfg: ModelConfig, src: Any) -> ModelConfig:
    """``config_from_hf``'s config with the special ids of the folder's tokenizer (a ``d2v.published.Source``):
    config.json has no ``<mask>`` id and RoBERTa's is its last (50264), which pretraining masks with.
    A folder without a tokenizer keeps config.json's ids (its shards cannot be made: ``preprocess_like``
    says so)."""
    from dataclasses import replace

    from d2v.modalities.text.data import like_tokenizer

    try:
        _, ids = like_tokenizer(src)
    except ValueError:
        return cfg
    mask = ids.get("mask", cfg.mask_id)
    # ids below num_special are never masked nor drawn as random tokens: <s> <pad> </s> <unk>, and <mask>
    # with them only when it sits among them (d2v's own tokenizer: 4)
    return replace(cfg, mask_id=mask, num_special=5 if mask == 4 else 4)
