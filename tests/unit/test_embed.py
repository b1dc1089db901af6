"""``d2v embed``: mean-pooled features of raw items with the pipeline's preprocessing."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from d2v import checkpoint
from d2v.config import to_dict
from d2v.data.shards import sha256_file
from d2v.embed import cli_embed, cli_items
from d2v.load import load_checkpoint_encoder
from d2v.modalities import get
from d2v.preprocessing import ItemPreprocessing, attach_preprocessing


def tiny(modality: str, **over):
    torch.manual_seed(0)
    mod = get(modality)
    cfg = mod.model_config({"preset": "tiny", **over})
    return mod.build_encoder(cfg), cfg


def test_embed_batches_in_order_and_restores_mode():
    enc, _ = tiny("text")
    enc.train()
    seqs = [[0, 7, 8, 9, 2], [0, 10, 2], [0, 11, 12, 2], [0, 13, 14, 15, 16, 2], [0, 17, 2]]

    def stand_in(items):  # ids -> padded batch, like the text collate
        T = max(len(s) for s in items)
        ids = torch.full((len(items), T), 1)
        for i, s in enumerate(items):
            ids[i, : len(s)] = torch.tensor(s)
        return {"inputs": ids, "padding_mask": ids == 1}

    feats = enc.embed(seqs, preprocessing=stand_in, batch_size=2)
    assert feats.shape == (5, 16) and feats.dtype == np.float32
    assert enc.training  # put back as it was
    enc.eval()
    alone = np.concatenate([enc.embed_pooled(**_ids(stand_in([s]))).numpy() for s in seqs])
    # padding must not change a row's features: fp32 attention over masked keys, expect ~1e-7 differences
    np.testing.assert_allclose(feats, alone, atol=1e-5)
    assert enc.embed([], preprocessing=stand_in).shape == (0, 16)
    with pytest.raises(ValueError, match="list of items"):
        enc.embed("one string", preprocessing=stand_in)


def _ids(batch):
    return {"inputs": batch["inputs"], "padding_mask": batch["padding_mask"]}


def _png(path, value):
    Image.fromarray(np.full((28, 28), value, dtype=np.uint8), mode="L").save(path)
    return path


IMAGE_PREP = {"image_size": 28, "channels": 3, "mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2]}


def test_image_items_preprocessed_like_the_pipeline(tmp_path):
    enc, cfg = tiny("image")
    paths = [_png(tmp_path / "a.png", 30), _png(tmp_path / "b.png", 200)]
    feats = enc.embed(paths, preprocessing=ItemPreprocessing("image", IMAGE_PREP, cfg, tmp_path))
    # by hand: grey / 255, repeated to 3 channels, (x - mean) / std
    x = torch.tensor([30.0, 200.0]).view(2, 1, 1, 1).expand(2, 3, 28, 28) / 255.0
    want = enc.eval().embed_pooled((x - 0.3) / 0.2).numpy()
    np.testing.assert_allclose(feats, want, atol=1e-5)  # same ops; tolerance for summation order


def test_text_items_use_the_tokenizer_that_travels_with_the_checkpoint(tmp_path):
    from d2v.modalities.text import data

    tok = data.train_tokenizer(["the cat sat on the mat"] * 20 + ["a dog ran"] * 20, 300, 2)
    tok.save(str(tmp_path / "tokenizer.json"))
    prep = {"tokenizer": "tokenizer.json", "tokenizer_sha256": sha256_file(tmp_path / "tokenizer.json")}
    enc, cfg = tiny("text", vocab_size=300)
    feats = enc.embed(["the cat sat", "a dog"], preprocessing=ItemPreprocessing("text", prep, cfg, tmp_path))
    ids = torch.tensor(tok.encode("the cat sat").ids)[None]
    assert ids[0, 0] == 0 and ids[0, -1] == 2  # <s> ... </s>, as in the shards
    np.testing.assert_allclose(feats[0], enc.eval().embed_pooled(ids)[0].numpy(), atol=1e-5)
    (tmp_path / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text() + " ")
    with pytest.raises(ValueError, match="sha256"):
        enc.embed(["x"], preprocessing=ItemPreprocessing("text", prep, cfg, tmp_path))


def test_cli_embed_and_load_encoder_embed(tmp_path):
    enc, cfg = tiny("image")
    meta = {
        "modality": "image",
        "kind": "pretrain",
        "model_config": to_dict(cfg),
        "encoder_prefix": "student.",
    }
    sd = {f"student.{k}": v for k, v in enc.state_dict().items()}
    run = tmp_path / "ckpt"
    checkpoint.save(run, 3, sd, {**meta, "preprocessing": IMAGE_PREP})
    paths = [str(_png(tmp_path / f"{i}.png", 40 * i)) for i in range(3)]
    out = tmp_path / "f.npy"
    assert cli_embed(SimpleNamespace(checkpoint=str(run), inputs=paths, out=str(out))) == 0
    feats = np.load(out)
    assert feats.shape == (3, 16)
    loaded = attach_preprocessing(load_checkpoint_encoder(run), run)
    np.testing.assert_array_equal(loaded.embed(paths), feats)
    with pytest.raises(ValueError, match=".npy"):
        cli_embed(SimpleNamespace(checkpoint=str(run), inputs=paths, out=str(tmp_path / "f.txt")))


def test_checkpoint_without_preprocessing_is_named(tmp_path):
    enc, cfg = tiny("image")
    meta = {
        "modality": "image",
        "kind": "pretrain",
        "model_config": to_dict(cfg),
        "encoder_prefix": "student.",
    }
    run = tmp_path / "old"
    checkpoint.save(run, 1, {f"student.{k}": v for k, v in enc.state_dict().items()}, meta)
    with pytest.raises(ValueError, match="records no preprocessing"):
        cli_embed(SimpleNamespace(checkpoint=str(run), inputs=["x.png"], out=str(tmp_path / "f.npy")))
    bare = load_checkpoint_encoder(run)
    with pytest.raises(ValueError, match="no item preprocessing"):
        attach_preprocessing(bare, run).embed(["x.png"])


def test_cli_items_files_become_paths(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("hello")
    assert cli_items([str(f), "just a sentence"]) == [f, "just a sentence"]


def test_audio_files_any_rate_and_channels(tmp_path):
    import soundfile as sf

    enc, cfg = tiny("audio")
    g = np.random.default_rng(0)
    sf.write(tmp_path / "stereo.wav", 0.1 * g.standard_normal((11025, 2)), 22050)  # 0.5 s, resampled
    sf.write(tmp_path / "mono.flac", 0.1 * g.standard_normal(4000), 16000)
    prep = {"sample_rate": 16000, "channels": 1}
    items = [tmp_path / "stereo.wav", tmp_path / "mono.flac"]
    feats = enc.embed(items, preprocessing=ItemPreprocessing("audio", prep, cfg, tmp_path), batch_size=1)
    assert feats.shape == (2, 16) and np.isfinite(feats).all()
    both = enc.embed(items, preprocessing=ItemPreprocessing("audio", prep, cfg, tmp_path), batch_size=2)
    # the padded batch gives the mono clip the same features only up to the conv positional encoder's
    # view of the zero padding (wav2vec 2.0 / HF behave alike); the first (longest) clip has no padding
    np.testing.assert_allclose(both[0], feats[0], atol=1e-5)
