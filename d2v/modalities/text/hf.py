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
``merges.txt``) for ``embed``, with the ``tokenizers`` library (transformers is not needed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from d2v.config import TransformerConfig, from_dict
from d2v.modalities.base import Data2VecTargets
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


def _token_id(d: dict[str, Any], key: str, default: int) -> int:
    """A special id from config.json; the RoBERTa layout's id when it is absent, null or a list."""
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else default


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
    mask_id = _token_id(d, "mask_token_id", 4)
    return ModelConfig(
        preset=preset,
        transformer=transformer,
        vocab_size=_need(d, "vocab_size"),
        max_positions=_need(d, "max_position_embeddings") - pad - 1,
        pad_id=pad,
        mask_id=mask_id,
        bos_id=_token_id(d, "bos_token_id", 0),
        eos_id=_token_id(d, "eos_token_id", 2),
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

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILES = ("vocab.json", "merges.txt")
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
ROBERTA_SPECIALS = {
    "bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>", "unk_token": "<unk>",
    "pad_token": "<pad>", "mask_token": "<mask>",
}  # fmt: skip
"""``RobertaTokenizer``'s special tokens, for a key the folder's files do not set."""
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
        from d2v.modalities.text.data import to_text

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


def special_tokens(folder: Path) -> dict[str, Any]:
    """Special tokens and tokenizer options of the folder's ``tokenizer_config.json`` and
    ``special_tokens_map.json`` (the latter wins), over RoBERTa's; tokens may be saved as ``{"content": ...}``."""
    out: dict[str, Any] = {**ROBERTA_SPECIALS, "add_prefix_space": False, "trim_offsets": True}
    for name in SPECIAL_TOKEN_FILES:
        f = folder / name
        if f.is_file():
            d = json.loads(f.read_text(encoding="utf-8"))
            out |= {k: d[k] for k in out if d.get(k) is not None}
    return {k: v["content"] if isinstance(v, dict) else v for k, v in out.items()}


def roberta_bpe(vocab: Path, merges: Path, specials: dict[str, Any]):
    """RoBERTa's byte-level BPE from ``vocab.json`` + ``merges.txt``, built as transformers'
    ``RobertaTokenizer`` builds it: BPE without prefixes, byte-level pre-tokenizer and decoder, the specials
    that are in the vocabulary kept whole, and ``<s> ... </s>`` added by a ``RobertaProcessing``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(specials["add_prefix_space"]))
    tok.decoder = decoders.ByteLevel()
    names = dict.fromkeys(v for k, v in specials.items() if k in ROBERTA_SPECIALS)
    missing = [n for n in names if tok.token_to_id(n) is None]
    if missing:
        raise ValueError(f"{vocab}: the special tokens {missing} are not in the vocabulary")
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    cls, sep = specials["cls_token"], specials["sep_token"]
    tok.post_processor = processors.RobertaProcessing(
        (sep, tok.token_to_id(sep)),
        (cls, tok.token_to_id(cls)),
        trim_offsets=bool(specials["trim_offsets"]),
        add_prefix_space=bool(specials["add_prefix_space"]),
    )
    return tok


def read_tokenizer(folder: Path):
    """The folder's tokenizer (``tokenizers.Tokenizer``, no padding or truncation of its own)."""
    from tokenizers import Tokenizer

    if (folder / TOKENIZER_FILE).is_file():
        tok = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    elif all((folder / f).is_file() for f in VOCAB_FILES):
        tok = roberta_bpe(folder / VOCAB_FILES[0], folder / VOCAB_FILES[1], special_tokens(folder))
    else:
        raise ValueError(
            f"{folder}: no {TOKENIZER_FILE}, nor {' + '.join(VOCAB_FILES)}; embed needs the tokenizer of a "
            "Data2VecText model (RoBERTa's byte-level BPE). Save it into the folder, e.g. "
            "transformers.AutoTokenizer.from_pretrained('facebook/data2vec-text-base')"
            f".save_pretrained('{folder}'), or pass preprocessing= to embed"
        )
    tok.no_padding()
    tok.no_truncation()
    return tok


def processor_from_hf(folder: Path, cfg: ModelConfig) -> TokenizerPreprocessing:
    """The ``embed`` preprocessing of an HF Data2VecText folder: its tokenizer, checked against the model
    (``<s>`` / ``</s>`` / ``<pad>`` ids of config.json, vocabulary size); ValueError naming what is wrong."""
    folder = Path(folder)
    tok = read_tokenizer(folder)
    where = folder / TOKENIZER_FILE if (folder / TOKENIZER_FILE).is_file() else folder / VOCAB_FILES[0]
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
