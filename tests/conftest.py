"""Fixtures every test folder shares: tiny random Hugging Face data2vec folders, as a user downloads them.

``published(modality, folder, **config_overrides)`` writes a folder that transformers' ``from_pretrained``
loads: ``config.json`` + ``model.safetensors`` of a random ``Data2Vec{Audio,Vision,Text}Model`` with every
weight random (HF zero-initialises some), and its processor files (``preprocessor_config.json``, the RoBERTa
tokenizer files). Text's tokenizer puts ``<mask>`` last, as RoBERTa's does (id 50264 there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

CORPUS = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran far away from the cat in the park",
    "stocks fell sharply as markets opened on monday",
    "the team won the match after a late goal",
    "rain is expected across the north later this week",
] * 8
"""Text the tiny tokenizer is trained on (its merges cover the test sentences)."""

PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "audio": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embedding_groups=2, conv_pos_kernel_size=19,
        num_conv_pos_embeddings=3, layerdrop=0.0,
    ),
    "image": dict(
        image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, use_shared_relative_position_bias=True, use_mean_pooling=False,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
    ),
    "text": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64 + 2, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
        bos_token_id=0, eos_token_id=2,
    ),
}  # fmt: skip
"""The tiny architectures (Base's layout at toy width): fast on CPU, every code path of the real ones."""


def _randomize(model, seed: int) -> None:
    """HF zero-initialises CLS, tables, positions and biases: random values make every weight matter."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            unit = "norm" in name.lower() and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if unit else 0.0))


def tiny_roberta_tokenizer(folder: Path):
    """A byte-level BPE with RoBERTa's layout (<s> <pad> </s> <unk> first, <mask> last), saved by
    transformers' ``RobertaTokenizerFast`` into ``folder``; returns the tokenizer."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS, vocab_size=400, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        show_progress=False,
    )  # fmt: skip
    bpe.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "bpe.json"))
    tok = RobertaTokenizerFast(tokenizer_file=str(folder / "bpe.json"))
    (folder / "bpe.json").unlink()
    tok.save_pretrained(folder)
    return tok


def write_published(modality: str, folder: str | Path, seed: int = 0, head: str | None = None, **over):
    """A tiny random HF data2vec folder of ``modality`` in ``folder``; returns the transformers model (the
    backbone, eval mode). ``head``: save a ``For<Task>`` model instead (``"ctc"``, ``"classification"``)."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kw = {**PUBLISHED_CONFIGS[modality], **over}
    if modality == "text":
        tok = tiny_roberta_tokenizer(folder)
        kw.setdefault("vocab_size", len(tok))
    cls_name = {"audio": "Data2VecAudio", "image": "Data2VecVision", "text": "Data2VecText"}[modality]
    cfg = getattr(transformers, f"{cls_name}Config")(**kw)
    model_cls = {
        None: f"{cls_name}Model",
        "ctc": f"{cls_name}ForCTC",
        "classification": f"{cls_name}ForSequenceClassification"
        if modality != "image"
        else f"{cls_name}ForImageClassification",
    }[head]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(folder)
    if modality == "audio":
        transformers.Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=16_000,
            padding_value=0.0,
            do_normalize=True,
            return_attention_mask=True,
        ).save_pretrained(folder)
    elif modality == "image":
        size = kw["image_size"]
        transformers.BeitImageProcessor(
            do_resize=True, size={"height": size, "width": size}, resample=2, do_center_crop=False,
            do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        ).save_pretrained(folder)  # fmt: skip
    prefix = {"audio": "data2vec_audio", "image": "data2vec_vision", "text": "data2vec_text"}[modality]
    return (model if head is None else getattr(model, prefix)).eval()


@pytest.fixture
def published():
    """``write_published`` (see the module docstring)."""
    return write_published
