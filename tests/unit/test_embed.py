"""``d2v embed``: mean-pooled features of raw items with the pipeline's preprocessing."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from d2v import checkpoint
from d2v.config import to_dict
from d2v.data.shards import sha256_file
from d2v.embed import cli_embed, cli_items
from d2v.load import load_checkpoint_encoder, load_encoder
from d2v.modalities import get
from d2v.modalities.base import POOLS, layer_output, unpadded_rows
from d2v.preprocessing import ItemPreprocessing, attach_preprocessing
from d2v.transformer import attention_mask


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
    # the same for other layers and poolings: the layer picked, never the batch, decides a row's features
    for opts in ({"layer": 1}, {"layer": 0}, {"pool": "first"}, {"layer": -1, "pool": "first"}):
        feats = enc.embed(seqs, preprocessing=stand_in, batch_size=2, **opts)
        alone = np.concatenate([enc.embed_pooled(**_ids(stand_in([s])), **opts).numpy() for s in seqs])
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
    assert cli_embed(SimpleNamespace(checkpoint=str(run), inputs=paths, text=[], out=str(out))) == 0
    feats = np.load(out)
    assert feats.shape == (3, 16)
    loaded = attach_preprocessing(load_checkpoint_encoder(run), run)
    np.testing.assert_array_equal(loaded.embed(paths), feats)
    with pytest.raises(ValueError, match=".npy"):
        cli_embed(SimpleNamespace(checkpoint=str(run), inputs=paths, text=[], out=str(tmp_path / "f.txt")))


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
    png = str(_png(tmp_path / "x.png", 9))
    with pytest.raises(ValueError, match="records no preprocessing"):
        cli_embed(SimpleNamespace(checkpoint=str(run), inputs=[png], text=[], out=str(tmp_path / "f.npy")))
    bare = load_checkpoint_encoder(run)
    with pytest.raises(ValueError, match="no item preprocessing: .* records no preprocessing"):
        attach_preprocessing(bare, run).embed([png])


def test_cli_items_files_become_paths_and_strings_need_a_flag(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("hello")
    assert cli_items([str(f)], ["just a sentence"]) == [f, "just a sentence"]
    with pytest.raises(FileNotFoundError, match="just a sentence: no such file"):
        cli_items([str(f), "just a sentence"])
    assert cli_items(["-"], ["x"], stdin=io.StringIO("one\n\ntwo\n")) == ["one", "", "two", "x"]


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
    # batched, the shorter clip is padded: its features are still its own (padding never reaches valid
    # frames, not through the positional convs either)
    np.testing.assert_allclose(both, feats, atol=1e-5)


# ------------------------------------------------------------------------------------------------ item forms


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_image_item_forms_give_the_same_features(tmp_path):
    enc, cfg = tiny("image")
    prep = ItemPreprocessing("image", IMAGE_PREP, cfg, tmp_path)
    rgb, grey = _rgb(30, 40), _rgb(30, 40, seed=1)[..., 0]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    forms = [
        tmp_path / "rgb.png", str(tmp_path / "rgb.png"), Image.fromarray(rgb), rgb, rgb / 255.0,
        torch.from_numpy(rgb), torch.from_numpy(rgb).float() / 255, rgb.astype(np.int64),
    ]  # fmt: skip
    feats = enc.embed(forms, preprocessing=prep)
    # every form becomes the same uint8 pixels before the shard-time resize: identical features
    np.testing.assert_array_equal(feats, np.repeat(feats[:1], len(forms), axis=0))
    grey_forms = [tmp_path / "grey.png", Image.open(tmp_path / "grey.png"), grey, grey[..., None], grey / 255]
    g = enc.embed(grey_forms, preprocessing=prep)
    np.testing.assert_array_equal(g, np.repeat(g[:1], len(grey_forms), axis=0))
    assert not np.allclose(g[0], feats[0])
    with pytest.raises(ValueError, match="list of items"):
        enc.embed(Image.fromarray(rgb), preprocessing=prep)  # one image, not a list of them


@pytest.mark.parametrize(
    "item, match",
    [
        (np.zeros((3, 8, 8), np.uint8), r"channels first\? pass x.permute"),
        (np.full((8, 8), 1.5), r"\[0, 1\]"),
        (np.full((8, 8), 300), "0..255"),
        (np.zeros(8, np.uint8), "HxW or HxWxC"),
        ({"not": "an image"}, "got dict"),
    ],
)
def test_bad_image_items_are_named(tmp_path, item, match):
    enc, cfg = tiny("image")
    with pytest.raises(ValueError, match=match):
        enc.embed([item], preprocessing=ItemPreprocessing("image", IMAGE_PREP, cfg, tmp_path))


def _tones(rate: int, seconds: float = 0.5) -> np.ndarray:
    """Three tones under 2 kHz: the same sound sampled at 8 or 16 kHz."""
    t = np.arange(int(rate * seconds)) / rate
    return (0.1 * sum(np.sin(2 * np.pi * f * t + f) for f in (220.0, 570.0, 1330.0))).astype(np.float32)


def test_audio_item_forms_give_the_same_features(tmp_path):
    import soundfile as sf

    enc, cfg = tiny("audio")
    prep = ItemPreprocessing("audio", {"sample_rate": 16000, "channels": 1}, cfg, tmp_path)
    sf.write(tmp_path / "a.wav", _tones(16000), 16000, subtype="PCM_16")
    wav, _ = sf.read(tmp_path / "a.wav", dtype="float32")  # the file's samples, as the user would hold them
    forms = [tmp_path / "a.wav", str(tmp_path / "a.wav"), wav, torch.from_numpy(wav), (wav, 16000)]
    feats = enc.embed(forms, preprocessing=prep, batch_size=1)
    np.testing.assert_array_equal(feats, np.repeat(feats[:1], len(forms), axis=0))
    # the same tones sampled at 8 kHz, resampled to 16 kHz: close, not equal (the resampler's filter and
    # the clip edges); measured max |diff| 5.4e-4 on features up to ~2, so 5e-3 leaves a 10x margin
    at8k = enc.embed([(_tones(8000), 8000)], preprocessing=prep)[0]
    at16k = enc.embed([_tones(16000)], preprocessing=prep)[0]
    np.testing.assert_allclose(at8k, at16k, atol=5e-3)


@pytest.mark.parametrize(
    "item, match",
    [
        (np.zeros((16000, 2), np.float32), r"downmix \[N, C\]"),
        (np.zeros(16000, np.int16), "/ 32768"),
        ((np.zeros(16000, np.float32), 0), "positive integer rate"),
        (np.full(16000, np.nan, np.float32), "NaN"),
        ("missing.wav", "missing.wav: no such audio file"),
    ],
)
def test_bad_audio_items_are_named(tmp_path, item, match):
    enc, cfg = tiny("audio")
    prep = ItemPreprocessing("audio", {"sample_rate": 16000, "channels": 1}, cfg, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        enc.embed([item], preprocessing=prep)


def test_text_path_is_a_file_and_str_is_text(tmp_path):
    from d2v.modalities.text import data

    tok = data.train_tokenizer(["the cat sat on the mat"] * 20 + ["a dog ran"] * 20, 300, 2)
    tok.save(str(tmp_path / "tokenizer.json"))
    prep = {"tokenizer": "tokenizer.json", "tokenizer_sha256": sha256_file(tmp_path / "tokenizer.json")}
    enc, cfg = tiny("text", vocab_size=300)
    doc = tmp_path / "doc.txt"
    doc.write_text("the cat sat on the mat\n", encoding="utf-8")
    items = [doc, "the cat sat on the mat", str(doc)]
    feats = enc.embed(items, preprocessing=ItemPreprocessing("text", prep, cfg, tmp_path))
    np.testing.assert_allclose(feats[0], feats[1], atol=1e-6)  # the file, stripped as the shards were
    assert not np.allclose(feats[2], feats[1])  # a str is text, even when it names a file
    for bad, err, match in [
        (tmp_path / "nope.txt", FileNotFoundError, "nope.txt: no such text file"),
        (tmp_path, ValueError, "not a text file"),
        (b"bytes", ValueError, "got bytes"),
    ]:
        with pytest.raises(err, match=match):
            enc.embed([bad], preprocessing=ItemPreprocessing("text", prep, cfg, tmp_path))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        enc.embed([tmp_path / "latin1.txt"], preprocessing=ItemPreprocessing("text", prep, cfg, tmp_path))


# ------------------------------------------------------------------------------------------ the command line


def _checkpoint(tmp_path, modality: str, prep: dict, files: dict | None = None, **over):
    enc, cfg = tiny(modality, **over)
    meta = {"modality": modality, "kind": "pretrain", "model_config": to_dict(cfg), "preprocessing": prep}
    sd = {f"student.{k}": v for k, v in enc.state_dict().items()}
    return checkpoint.save(
        tmp_path / f"ckpt-{modality}", 1, sd, {**meta, "encoder_prefix": "student."}, files=files
    )


def _text_checkpoint(tmp_path):
    from d2v.modalities.text import data

    tok = data.train_tokenizer(["the cat sat on the mat"] * 20 + ["a dog ran"] * 20, 300, 2)
    tok.save(str(tmp_path / "tokenizer.json"))
    prep = {"tokenizer": "tokenizer.json", "tokenizer_sha256": sha256_file(tmp_path / "tokenizer.json")}
    return _checkpoint(
        tmp_path, "text", prep, {"tokenizer.json": tmp_path / "tokenizer.json"}, vocab_size=300
    )


def _main(capsys, *argv) -> tuple[int, str]:
    from d2v.cli import main

    rc = main(["embed", *map(str, argv)])
    return rc, capsys.readouterr().err


def test_cli_text_files_strings_and_stdin(tmp_path, capsys, monkeypatch):
    ckpt = _text_checkpoint(tmp_path)
    doc = tmp_path / "doc.txt"
    doc.write_text("the cat sat\n", encoding="utf-8")  # an existing .txt file is read, not its path embedded
    out = tmp_path / "f.npy"
    assert _main(capsys, ckpt, doc, "--text", "the cat sat", "--text", "a dog", "--out", out) == (0, "")
    feats = np.load(out)
    assert feats.shape == (3, 16)
    np.testing.assert_allclose(feats[0], feats[1], atol=1e-6)  # the file = its content as --text
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\na dog\n"))
    assert _main(capsys, ckpt, "-", "--out", out) == (0, "")
    np.testing.assert_allclose(np.load(out), feats[1:], atol=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/nope.txt"], "{tmp}/nope.txt: no such file"),
        (["{tmp}"], "{tmp}: not a file (a directory)"),
        (["some words"], "some words: no such file"),  # a literal string needs --text
        (["-", "{tmp}/doc.txt"], "'-' (texts from stdin, one per line) must be the only input"),
        ([], "nothing to embed"),
    ],
)
def test_cli_text_inputs_that_are_not_files_exit_2(tmp_path, capsys, argv, message):
    ckpt = _text_checkpoint(tmp_path)
    (tmp_path / "doc.txt").write_text("x", encoding="utf-8")
    argv = [a.format(tmp=tmp_path) for a in argv]
    rc, err = _main(capsys, ckpt, *argv, "--out", tmp_path / "f.npy")
    assert rc == 2 and f"d2v embed: error: {message.format(tmp=tmp_path)}" in err
    assert not (tmp_path / "f.npy").exists()


@pytest.mark.parametrize("modality", ["audio", "image"])
def test_cli_missing_audio_image_paths_and_strings_exit_2(tmp_path, capsys, modality):
    prep = IMAGE_PREP if modality == "image" else {"sample_rate": 16000, "channels": 1}
    ckpt = _checkpoint(tmp_path, modality, prep)
    rc, err = _main(capsys, ckpt, tmp_path / "missing.x", "--out", tmp_path / "f.npy")
    assert rc == 2 and f"error: {tmp_path}/missing.x: no such file" in err
    rc, err = _main(capsys, ckpt, "--text", "hello", "--out", tmp_path / "f.npy")
    assert rc == 2 and f"only text models embed; {ckpt} is a {modality!r} model" in err
    (tmp_path / "doc.txt").write_text("not an image or a sound", encoding="utf-8")
    rc, err = _main(capsys, ckpt, tmp_path / "doc.txt", "--out", tmp_path / "f.npy")
    assert rc == 2 and f"error: {tmp_path}/doc.txt: " in err  # the reader's reason, naming the file


# ------------------------------------------------------------------------------------ which layer, which pool

MODALITIES = ["audio", "image", "text"]


def _padded(modality: str):
    """Model inputs with rows of three lengths (padding at the end), or images (no padding)."""
    g = torch.Generator().manual_seed(0)
    if modality == "text":
        ids = torch.randint(5, 200, (3, 9), generator=g)
        ids[:, 0] = 0  # <s>
        pad = torch.arange(9)[None] >= torch.tensor([9, 6, 3])[:, None]
        return ids.masked_fill(pad, 1), pad
    if modality == "audio":
        wave = torch.randn(3, 4000, generator=g)
        pad = torch.arange(4000)[None] >= torch.tensor([4000, 3000, 2000])[:, None]
        return wave.masked_fill(pad, 0.0), pad
    return torch.randn(3, 3, 28, 28, generator=g), None


def _previous_embed_pooled(enc, inputs, padding_mask):
    """``embed_pooled`` before it took ``layer`` and ``pool``, verbatim: the default must stay this."""
    h, pad = enc.features(inputs, padding_mask)
    h = h[:, enc.num_prefix_tokens :]
    if pad is None:
        return h.mean(1)
    keep = (~pad[:, enc.num_prefix_tokens :]).to(h.dtype)[..., None]
    return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def _mean(h_BTD, pad_BT, P):
    """Mean over the valid tokens after the P prefix tokens, by hand: [B, P+T, D] -> [B, D]."""
    h = h_BTD[:, P:]
    keep = torch.ones(h.shape[:2]) if pad_BT is None else (~pad_BT[:, P:]).float()
    return (h * keep[..., None]).sum(1) / keep.sum(1)[:, None]


def _blocks(enc, inputs, padding_mask):
    """Every block's end-of-block output [B, P+T, D] (contextualize's 'block' tap) and the token padding."""
    with torch.no_grad():
        x, pad = enc.local_features(inputs, padding_mask)
        out = enc.contextualize(x, pad, tap="block")
    return out.layers, out.padding_BT


@pytest.mark.parametrize("modality", MODALITIES)
def test_default_pooling_is_the_previous_output(modality):
    enc, _ = tiny(modality)
    enc.eval()
    x, pad = _padded(modality)
    with torch.no_grad():
        want = _previous_embed_pooled(enc, x, pad)
    assert torch.equal(enc.embed_pooled(x, pad), want)  # bit for bit
    assert torch.equal(enc.embed_pooled(x, pad, layer=None, pool="mean"), want)


@pytest.mark.parametrize("modality", MODALITIES)
def test_layer_i_is_block_i_and_negative_layers_count_from_the_end(modality):
    enc, _ = tiny(modality)
    enc.eval()
    x, pad = _padded(modality)
    layers, pad_BT = _blocks(enc, x, pad)
    L, P = enc.transformer.depth, enc.num_prefix_tokens
    assert len(layers) == L == 2
    for i in range(1, L + 1):
        want = _mean(layers[i - 1], pad_BT, P)
        torch.testing.assert_close(enc.embed_pooled(x, pad, layer=i), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(enc.embed_pooled(x, pad, layer=i - L - 1), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(enc.embed_pooled(x, pad, layer=i, pool="first"), layers[i - 1][:, 0])
    assert torch.equal(enc.embed_pooled(x, pad, layer=np.int64(1)), enc.embed_pooled(x, pad, layer=1))
    assert not torch.equal(enc.embed_pooled(x, pad, layer=1), enc.embed_pooled(x, pad, layer=2))


@pytest.mark.parametrize("modality", MODALITIES)
def test_last_block_is_its_raw_output_and_none_is_after_the_final_norm(modality):
    enc, _ = tiny(modality)
    enc.eval()
    x, pad = _padded(modality)
    default, last = enc.embed_pooled(x, pad), enc.embed_pooled(x, pad, layer=-1)
    assert torch.equal(last, enc.embed_pooled(x, pad, layer=enc.transformer.depth))
    if modality == "image":  # a final LayerNorm after the blocks: -1 is before it, None after it
        assert isinstance(enc.norm, torch.nn.LayerNorm)
        layers, _ = _blocks(enc, x, pad)
        with torch.no_grad():
            torch.testing.assert_close(default, _mean(enc.norm(layers[-1]), None, 1), rtol=0, atol=1e-6)
        assert (default - last).abs().max() > 0.1
        no_norm, _ = tiny("image", final_norm=False)
        no_norm.eval()
        assert torch.equal(no_norm.embed_pooled(x, layer=-1), no_norm.embed_pooled(x))
    else:  # post-LN, no final norm: the last block's output is the last layer
        assert torch.equal(last, default)


@pytest.mark.parametrize(
    "modality, over",
    [("audio", {}), ("text", {}), ("image", {"position": "absolute", "embed_norm": True})],
)  # image: absolute positions, so its blocks run by hand without the relative bias
def test_layer_0_is_the_input_to_the_first_block(modality, over):
    enc, _ = tiny(modality, **over)
    enc.eval()
    x, pad = _padded(modality)
    L, P = enc.transformer.depth, enc.num_prefix_tokens
    layers, _ = _blocks(enc, x, pad)
    with torch.no_grad():
        h0, pad_BT = layer_output(enc, x, pad, 0)
        h = h0
        for blk, want in zip(getattr(enc, enc.stack_attr).blocks, layers, strict=True):
            h, _ = blk(h, attention_mask(pad_BT, None, h.dtype))  # the blocks by hand from layer 0
            torch.testing.assert_close(h, want, rtol=0, atol=1e-6)
    want = _mean(h0, pad_BT, P)
    torch.testing.assert_close(enc.embed_pooled(x, pad, layer=0), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(enc.embed_pooled(x, pad, layer=-L - 1), want, rtol=0, atol=1e-6)
    first = enc.embed_pooled(x, pad, layer=0, pool="first")
    assert torch.equal(first, h0[:, 0])
    if modality == "text":  # its embeddings carry the positions; only dropout (off in eval) comes between
        assert torch.equal(h0, enc.local_features(x, pad)[0])
    if modality == "image":  # CLS + its position, the same for every image before any block
        assert torch.equal(first, first[:1].expand_as(first))


@pytest.mark.parametrize("modality", MODALITIES)
def test_first_is_the_cls_for_images_and_token_0_otherwise(modality):
    enc, _ = tiny(modality)
    enc.eval()
    x, pad = _padded(modality)
    with torch.no_grad():
        h, _ = enc.features(x, pad)
    first = enc.embed_pooled(x, pad, pool="first")
    assert torch.equal(first, h[:, 0])
    if modality == "image":  # the prefix token, not the first patch
        assert enc.num_prefix_tokens == 1 and not torch.allclose(first, h[:, 1])
    else:  # no prefix: text's <s>, speech's first frame
        assert enc.num_prefix_tokens == 0
    assert not torch.allclose(first, enc.embed_pooled(x, pad))


@pytest.mark.parametrize("modality", ["audio", "text"])
@pytest.mark.parametrize("layer, pool", [(0, "mean"), (1, "mean"), (-1, "first"), (None, "first"), (0, "first")])
def test_a_padded_row_keeps_its_features_at_any_layer_and_pool(modality, layer, pool):
    enc, _ = tiny(modality)
    enc.eval()
    x, pad = _padded(modality)
    batched = enc.embed_pooled(x, pad, layer=layer, pool=pool)
    alone = torch.cat([enc.embed_pooled(row, layer=layer, pool=pool) for row in unpadded_rows(x, pad)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"pool": "max"}, r"pool must be one of 'mean', 'first'; got 'max'"),
        ({"pool": "cls"}, r"pool must be one of 'mean', 'first'; got 'cls'"),
        ({"layer": 3}, r"an int in -3\.\.2 .* depth is 2; got 3$"),
        ({"layer": -4}, r"an int in -3\.\.2 .* depth is 2; got -4$"),
        ({"layer": True}, r"depth is 2; got True$"),
        ({"layer": 1.0}, r"depth is 2; got 1.0$"),
        ({"layer": "1"}, r"depth is 2; got '1'$"),
    ],
)
def test_bad_layer_or_pool_is_named(options, match):
    enc, _ = tiny("text")
    enc.eval()
    with pytest.raises(ValueError, match=match):
        enc.embed_pooled(torch.tensor([[0, 5, 2]]), **options)

    def untouched(items):
        raise AssertionError("embed read the items before checking its options")

    with pytest.raises(ValueError, match=match):
        enc.embed(["x"], preprocessing=untouched, **options)


def test_a_layer_with_blocks_skipped_by_layerdrop_is_refused():
    enc, _ = tiny("text", transformer={"layerdrop": 0.999})
    enc.train()  # LayerDrop skips blocks: layers[i - 1] would be some other block
    with pytest.raises(ValueError, match=r"layer=1 needs every block .* call \.eval\(\) first"):
        enc.embed_pooled(torch.tensor([[0, 5, 2]]), layer=1)
    enc.eval()
    assert enc.embed_pooled(torch.tensor([[0, 5, 2]]), layer=1).shape == (1, 16)


def test_cli_layer_and_pool(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, "image", IMAGE_PREP)
    paths = [_png(tmp_path / f"{i}.png", 60 * i + 10) for i in range(3)]
    out = tmp_path / "f.npy"
    encoder = load_encoder(ckpt)
    for flags, options in [
        (["--layer", "-1", "--pool", "first"], {"layer": -1, "pool": "first"}),
        (["--layer", "0"], {"layer": 0}),
        (["--pool", "mean"], {}),
    ]:
        assert _main(capsys, ckpt, *paths, *flags, "--out", out) == (0, "")
        np.testing.assert_array_equal(np.load(out), encoder.embed(paths, **options))
    assert not np.allclose(encoder.embed(paths, layer=-1, pool="first"), encoder.embed(paths), atol=1e-3)
    rc, err = _main(capsys, ckpt, *paths, "--layer", "5", "--out", tmp_path / "g.npy")
    assert rc == 2 and "an int in -3..2" in err and "depth is 2; got 5" in err
    assert not (tmp_path / "g.npy").exists()
    with pytest.raises(SystemExit):
        _main(capsys, ckpt, *paths, "--pool", "max", "--out", out)
    assert "invalid choice: 'max'" in capsys.readouterr().err


def test_cli_pool_choices_are_embeds():
    from d2v.cli import build_parser

    args = build_parser().parse_args(["embed", "ckpt", "a.png", "--out", "f.npy"])
    assert (args.layer, args.pool) == (None, "mean")  # embed's defaults
    for pool in POOLS:
        assert build_parser().parse_args(["embed", "ckpt", "--pool", pool, "--out", "f.npy"]).pool == pool
    assert build_parser().parse_args(["embed", "ckpt", "--layer", "-2", "--out", "f.npy"]).layer == -2
