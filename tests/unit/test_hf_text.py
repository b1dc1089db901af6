"""HF Data2VecText <-> d2v TextEncoder: import, export and their failure modes (tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    Data2VecTextConfig,
    Data2VecTextForSequenceClassification,
    Data2VecTextModel,
    RobertaTokenizer,
    RobertaTokenizerFast,
)

import d2v.hf
import d2v.load
from d2v.modalities import text

# fp32 on CPU; the two sides differ only in summation order (fused qkv matmul, SDPA kernels):
# observed differences are ~1e-6, 1e-4 leaves room for other BLAS builds.
ATOL = 1e-4
DROP = object()


def hf_config(**over) -> Data2VecTextConfig:
    kw = dict(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32 + 2, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
    )  # fmt: skip
    return Data2VecTextConfig(**{**kw, **over})


def perturb_(model: torch.nn.Module) -> None:
    """Random LayerNorm affines, biases and token-type rows, so a swapped or dropped tensor shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias") or "token_type" in name:
                p.add_(torch.randn_like(p) * 0.3)


def padded_ids(vocab: int = 100, pad_id: int = 1):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    pad = torch.arange(12)[None, :] >= torch.tensor([12, 8, 3])[:, None]
    return ids.masked_fill(pad, pad_id), pad


def hf_hidden(model, ids, pad) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(~pad).long()).last_hidden_state


@pytest.mark.parametrize(
    "over", [{}, {"type_vocab_size": 2, "hidden_act": "gelu_new", "layer_norm_eps": 1e-12}]
)
def test_import_matches_transformers(tmp_path, over):
    torch.manual_seed(0)
    hf = Data2VecTextModel(hf_config(**over)).eval()
    perturb_(hf)
    hf.save_pretrained(tmp_path)
    enc = d2v.load.load_encoder(tmp_path)
    assert enc.config.max_positions == 32 and enc.config.vocab_size == 100
    ids, pad = padded_ids()
    with torch.no_grad():
        ours, ours_pad = enc.features(ids, pad)
    assert ours_pad is pad
    torch.testing.assert_close(ours, hf_hidden(hf, ids, pad), rtol=0, atol=ATOL)


def test_import_sequence_classification_backbone(tmp_path):
    torch.manual_seed(0)
    hf = Data2VecTextForSequenceClassification(hf_config(num_labels=3)).eval()
    perturb_(hf)
    hf.save_pretrained(tmp_path)
    ids, pad = padded_ids()
    with torch.no_grad():
        ours, _ = d2v.load.load_encoder(tmp_path).features(ids, pad)
    torch.testing.assert_close(ours, hf_hidden(hf.data2vec_text, ids, pad), rtol=0, atol=ATOL)


def test_export_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    enc = text.build_encoder(text.model_config({"preset": "tiny", "vocab_size": 100, "max_positions": 32}))
    perturb_(enc)
    enc.eval()
    d2v.hf.export_hf(enc, tmp_path)
    hf, info = Data2VecTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, pad = padded_ids()
    with torch.no_grad():
        ours, _ = enc.features(ids, pad)
    torch.testing.assert_close(hf_hidden(hf.eval(), ids, pad), ours, rtol=0, atol=ATOL)
    back = d2v.load.load_encoder(tmp_path)  # d2v -> HF -> d2v is exact (token-type row exported as zeros)
    assert back.config == enc.config
    for k, v in enc.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_config_is_read_from_the_dict():
    d = hf_config(layer_norm_eps=1e-12, hidden_dropout_prob=0.0, max_position_embeddings=514).to_dict()
    cfg = text.config_from_hf(d)
    assert (cfg.transformer.norm_eps, cfg.transformer.dropout, cfg.max_positions) == (1e-12, 0.0, 512)
    assert cfg.transformer.attention_dropout == 0.1 and cfg.pad_id == 1


@pytest.mark.parametrize(
    "change, match",
    [
        ({"position_embedding_type": "relative_key"}, "absolute"),
        ({"hidden_act": "silu"}, "hidden_act"),
        ({"is_decoder": True}, "decoder"),
        ({"vocab_size": DROP}, "vocab_size"),
    ],
)
def test_bad_hf_config_raises(change, match):
    d = {k: v for k, v in (hf_config().to_dict() | change).items() if v is not DROP}
    with pytest.raises(ValueError, match=match):
        text.config_from_hf(d)


def _edit_weights(path, fn) -> None:
    sd = load_file(str(path / "model.safetensors"))
    save_file(fn(sd), str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: {k: v for k, v in sd.items() if "layer.1.output.dense" not in k}, "missing"),
        (lambda sd: sd | {"encoder.layer.2.output.dense.weight": torch.zeros(16, 32)}, "unexpected"),
        (lambda sd: sd | {"embeddings.word_embeddings.weight": torch.zeros(90, 16)}, "shapes"),
    ],
)
def test_bad_weights_raise(tmp_path, edit, match):
    Data2VecTextModel(hf_config()).save_pretrained(tmp_path)
    _edit_weights(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        d2v.load.load_encoder(tmp_path)


def test_wrong_model_type_raises(tmp_path):
    Data2VecTextModel(hf_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "roberta"}))
    with pytest.raises(ValueError, match="model_type"):
        d2v.load.load_encoder(tmp_path)


# ------------------------------------------------------------------- embed with the folder's tokenizer

TEXTS = ["the cat sat on the mat", " a dog ran far away from the cat", "mat"]  # a leading space is kept


def _bpe():
    """A tiny byte-level BPE with RoBERTa's specials at 0..4 (<s> <pad> </s> <unk> <mask>)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    corpus = ["the cat sat on the mat", "a dog ran far away", "the mat of the cat"] * 20
    bpe.train_from_iterator(
        corpus, vocab_size=300, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )  # fmt: skip
    return bpe


def _save_tokenizer(folder, files: str) -> None:
    bpe = _bpe()
    if files == "tokenizer.json":
        bpe.save(str(folder / "bpe.json"))
        RobertaTokenizerFast(tokenizer_file=str(folder / "bpe.json")).save_pretrained(folder)
        (folder / "bpe.json").unlink()
    else:  # RoBERTa's older layout: vocab.json + merges.txt (+ the specials map)
        bpe.save_model(str(folder))
        (folder / "special_tokens_map.json").write_text(
            json.dumps({"pad_token": "<pad>", "cls_token": "<s>"})
        )


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json+merges.txt"])
def test_embed_matches_tokenizer_and_model(tmp_path, files):
    """``load_encoder(folder).embed(texts)`` = the folder's tokenizer (padding=True) -> Data2VecTextModel ->
    mean over the attention mask. Tolerance 1e-4 as above."""
    torch.manual_seed(0)
    hf = Data2VecTextModel(hf_config(vocab_size=300)).eval()
    perturb_(hf)
    hf.save_pretrained(tmp_path)
    _save_tokenizer(tmp_path, files)
    tok = (
        AutoTokenizer.from_pretrained(tmp_path)
        if files == "tokenizer.json"
        else RobertaTokenizer.from_pretrained(tmp_path)
    )
    with torch.no_grad():
        x = tok(TEXTS, padding=True, return_tensors="pt")
        h = hf(**x).last_hidden_state
        keep = x["attention_mask"].float()[..., None]
        ref = ((h * keep).sum(1) / keep.sum(1)).numpy()
    enc = d2v.load.load_encoder(tmp_path)
    assert enc.preprocessing(TEXTS)["inputs"].tolist() == x["input_ids"].tolist()  # the same ids
    ours = enc.embed(TEXTS, batch_size=2)
    diff = np.abs(ours - ref).max()
    print(f"tokenizer ({files}): max |diff| features {diff:.2e}")
    assert diff < ATOL
    (tmp_path / "doc.txt").write_text(TEXTS[1], encoding="utf-8")  # a Path is a file read whole
    np.testing.assert_allclose(enc.embed([Path(tmp_path / "doc.txt")]), ours[1:2], rtol=0, atol=1e-6)


def test_embed_tokenizer_problems_are_named(tmp_path):
    Data2VecTextModel(hf_config(vocab_size=300)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer.json, nor vocab.json \\+ merges.txt; embed needs"):
        d2v.load.load_encoder(tmp_path).embed(TEXTS)
    _save_tokenizer(tmp_path, "tokenizer.json")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"bos_token_id": 3}))
    with pytest.raises(ValueError, match=r"frames a text as \[0, 2\], but config.json has bos_token_id 3"):
        d2v.load.load_encoder(tmp_path).embed(TEXTS)
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"vocab_size": 200}))
    with pytest.raises(ValueError, match="more than the model's vocab_size 200"):
        d2v.load.load_encoder(tmp_path, pretrained=False).embed(TEXTS)  # the weights would not fit either
