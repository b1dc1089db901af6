"""Parity with transformers' Data2VecAudio: import (Model and ForCTC directories), export, bad directories.

Tiny random HF models (hidden 32, 2 layers, full 7-conv stack at 16 channels), eval mode, fixed seed. HF's
model does not normalise the waveform (its feature extractor does, eps 1e-7), so HF gets
``normalize_waveform(wav, pad, 1e-7)``; the imported d2v encoder normalises itself with that epsilon.
Tolerance 1e-4 in fp32 (the same ops in the same order; the residual is matmul rounding). The valid
frames of a padded d2v batch are compared with HF on each row alone: HF zeroes the padding once, before its
stacked positional convs, so in a padded HF batch it leaks into the valid frames again; d2v zeroes it after
every conv (``PosConv``), which is what the row alone sees.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

import d2v.hf  # noqa: E402
import d2v.load  # noqa: E402
from d2v.modalities.audio import config_from_hf  # noqa: E402
from d2v.modalities.audio.frames import normalize_waveform  # noqa: E402
from d2v.modalities.base import Encoder  # noqa: E402

TOL = {"atol": 1e-4, "rtol": 1e-4}


def _hf_config(pos_kernel: int = 19, **kw) -> transformers.Data2VecAudioConfig:
    return transformers.Data2VecAudioConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embedding_groups=2, conv_pos_kernel_size=pos_kernel,
        num_conv_pos_embeddings=3, layerdrop=0.0, **kw,
    )  # fmt: skip


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [16_000, 11_000]
    wav = torch.randn(2, 16_000, generator=torch.Generator().manual_seed(0))
    pad = torch.arange(16_000)[None] >= torch.tensor(lengths)[:, None]
    return wav.masked_fill(pad, 0.0), pad


def _hf_hidden(model, wav: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """HF's frames of each row alone, cropped to its length, concatenated: [sum T_b, D]."""
    rows = []
    with torch.no_grad():
        for w, p in zip(wav, pad):
            x = w[~p][None]
            rows.append(model(normalize_waveform(x, None, 1e-7)).last_hidden_state[0])
    return torch.cat(rows)


def _ours(encoder: Encoder, wav: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """d2v's valid frames of the padded batch: [sum T_b, D]."""
    with torch.no_grad():
        h, pad_BT = encoder.features(wav, pad)
    assert h.shape[:2] == (2, 49)
    return h[~pad_BT]


@pytest.mark.parametrize("pos_kernel", [19, 4])  # odd, and even (SamePad drops a frame)
def test_import_matches_hf_model(tmp_path, pos_kernel):
    torch.manual_seed(0)
    hf = transformers.Data2VecAudioModel(_hf_config(pos_kernel)).eval()
    hf.save_pretrained(tmp_path)
    enc = d2v.load.load_encoder(tmp_path)
    assert enc.modality == "audio" and not enc.training
    assert enc.config.pos_conv_kernel == pos_kernel and enc.config.pos_conv_layers == 3
    wav, pad = _batch()
    ours, ref = _ours(enc, wav, pad), _hf_hidden(hf, wav, pad)
    assert ours.shape == ref.shape == (49 + 34, 32)
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(enc.mask_emb, hf.masked_spec_embed)


def test_import_ctc_directory(tmp_path):
    torch.manual_seed(1)
    ctc = transformers.Data2VecAudioForCTC(_hf_config(vocab_size=12)).eval()
    ctc.save_pretrained(tmp_path)
    enc = d2v.load.load_encoder(tmp_path)
    wav, pad = _batch()
    torch.testing.assert_close(_ours(enc, wav, pad), _hf_hidden(ctc.data2vec_audio, wav, pad), **TOL)


def test_export_loads_in_transformers(tmp_path):
    torch.manual_seed(2)
    hf = transformers.Data2VecAudioModel(_hf_config()).eval()
    hf.save_pretrained(tmp_path / "src")
    enc = d2v.load.load_encoder(tmp_path / "src")
    with torch.no_grad():  # move away from HF's init so the check is about our weights
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    d2v.hf.export_hf(enc, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "data2vec-audio" and cfg["architectures"] == ["Data2VecAudioModel"]
    back, info = transformers.Data2VecAudioModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    wav, pad = _batch()
    torch.testing.assert_close(_hf_hidden(back.eval(), wav, pad), _ours(enc, wav, pad), **TOL)
    # d2v's own round trip (to_hf -> config_from_hf + state_dict_from_hf) is in test_modality_contract.py


def test_missing_masked_spec_embed_keeps_an_init(tmp_path):
    torch.manual_seed(3)
    hf = transformers.Data2VecAudioModel(_hf_config(mask_time_prob=0.0)).eval()
    hf.save_pretrained(tmp_path)
    enc = d2v.load.load_encoder(tmp_path)
    assert ((enc.mask_emb >= 0) & (enc.mask_emb < 1)).all()  # U(0, 1) as build_encoder
    wav, pad = _batch()
    torch.testing.assert_close(_ours(enc, wav, pad), _hf_hidden(hf, wav, pad), **TOL)


def test_bad_directories_raise(tmp_path, monkeypatch):
    torch.manual_seed(4)
    hf = transformers.Data2VecAudioModel(_hf_config())
    hf.save_pretrained(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no weights"):
        d2v.load.load_encoder(tmp_path / "noweights")

    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text(json.dumps(cfg))
    sd = {k: v for k, v in hf.state_dict().items() if "layers.1.attention.k_proj" not in k}
    save_file(sd, str(tmp_path / "partial" / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        d2v.load.load_encoder(tmp_path / "partial")

    # only the audio modality is consulted, so this does not depend on the other modality packages
    monkeypatch.setattr(d2v.hf, "MODALITIES", ("audio",))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({**cfg, "model_type": "wav2vec2"}))
    with pytest.raises(ValueError, match="model_type"):
        d2v.load.load_encoder(tmp_path / "other")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "data2vec-text"}, "model_type"),
        ({"add_adapter": True}, "add_adapter"),
        ({"feat_extract_activation": "relu"}, "feat_extract_activation"),
        ({"hidden_act": "swish"}, "hidden_act"),
        ({"num_conv_pos_embedding_groups": 5}, "pos_conv_groups"),
        ({"conv_kernel": [10, 3]}, "same non-zero length"),
    ],
)
def test_unsupported_config_raises(change, words):
    d = {**_hf_config().to_dict(), **change}
    with pytest.raises(ValueError, match=words):
        config_from_hf(d)


def test_hub_defaults_give_the_base_architecture():
    """A config.json that omits keys gets transformers' defaults (what ``from_pretrained`` does): Base."""
    # ``do_stable_layer_norm``: a leftover in large-960h's config.json that transformers ignores (§7.1)
    cfg = config_from_hf({"model_type": "data2vec-audio", "do_stable_layer_norm": True})
    t = cfg.transformer
    assert (t.dim, t.depth, t.heads, t.ffn_dim, t.layer_norm_first) == (768, 12, 12, 3072, False)
    assert (cfg.conv_dim, cfg.pos_conv_layers, cfg.pos_conv_kernel) == ((512,) * 7, 5, 19)
    assert cfg.pos_conv_groups == 16
    assert cfg.preset == "base" and cfg.targets.top_k == 8


# ----------------------------------------------------------- embed with the folder's feature extractor


def _feature_extractor(**over) -> transformers.Wav2Vec2FeatureExtractor:
    kw = dict(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True)
    return transformers.Wav2Vec2FeatureExtractor(**{**kw, "return_attention_mask": True, **over})


def _clips() -> list[np.ndarray]:
    """A quiet clip (std 0.01: the extractor's eps 1e-7 vs fairseq's 1e-5 would show) and a loud shorter one."""
    g = np.random.default_rng(0)
    return [(s * g.standard_normal(n)).astype(np.float32) for s, n in ((0.01, 16_000), (0.3, 11_000))]


def test_embed_matches_feature_extractor_and_model(tmp_path):
    """``load_encoder(folder).embed(waveforms)`` = Wav2Vec2FeatureExtractor -> Data2VecAudioModel -> mean
    over the frames, each clip on its own. Tolerance 1e-4 as above. Each clip alone, because in a padded
    batch transformers' positional convs carry the padding into valid frames, so a clip's features would
    depend on the longest clip it was batched with; ``embed`` gives every item its unpadded features."""
    torch.manual_seed(5)
    hf = transformers.Data2VecAudioModel(_hf_config()).eval()
    hf.save_pretrained(tmp_path)
    fe = _feature_extractor()
    fe.save_pretrained(tmp_path)
    clips = _clips()
    with torch.no_grad():
        ref = np.concatenate([
            hf(**fe(c, sampling_rate=16_000, return_tensors="pt")).last_hidden_state.mean(1).numpy()
            for c in clips
        ])  # fmt: skip
    assert len({len(c) for c in clips}) > 1  # embed's batch is padded
    enc = d2v.load.load_encoder(tmp_path)
    ours = enc.embed(clips)
    diff = np.abs(ours - ref).max()
    print(f"feature extractor: max |diff| features {diff:.2e}")
    assert diff < 1e-4
    # a float WAV of the same samples and a (waveform, 16000) pair are the same items
    sf.write(tmp_path / "b.wav", clips[1], 16_000, subtype="FLOAT")
    np.testing.assert_allclose(enc.embed([(clips[0], 16_000), tmp_path / "b.wav"]), ours, rtol=0, atol=1e-6)


def test_embed_without_feature_extractor_says_what_is_missing(tmp_path):
    torch.manual_seed(6)
    transformers.Data2VecAudioModel(_hf_config()).save_pretrained(tmp_path)
    enc = d2v.load.load_encoder(tmp_path)
    with pytest.raises(ValueError, match="no preprocessor_config.json; embed needs the feature extractor"):
        enc.embed(_clips())
    _feature_extractor(do_normalize=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do_normalize is false"):
        d2v.load.load_encoder(tmp_path).embed(_clips())
