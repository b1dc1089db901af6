"""HF Data2VecVision parity: import (``d2v.hf.load_hf_encoder``) and export (``d2v.hf.export_hf``).

Tolerance: 1e-4 absolute in fp32, eval mode. Both sides run the same math (SDPA vs SDPA, fused vs split
qkv), so differences are float reassociation; 1e-4 leaves margin on O(1) activations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from d2v.hf import export_hf  # noqa: E402
from d2v.load import load_encoder  # noqa: E402
from d2v.modalities.image import build_encoder, config_from_hf, model_config  # noqa: E402

ATOL = 1e-4
BASE = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=28,
    patch_size=7, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
)  # fmt: skip
HF_VARIANTS = {
    # facebook/data2vec-vision-base style: shared table, final LayerNorm (layer_norm_eps 1e-12 of HF)
    "pretrained": (
        "Data2VecVisionModel",
        dict(use_shared_relative_position_bias=True, use_mean_pooling=False),
    ),
    # -base-ft1k style: one table per layer, mean pooling (no final LN in last_hidden_state)
    "finetuned": (
        "Data2VecVisionForImageClassification",
        dict(use_relative_position_bias=True, use_mean_pooling=True, num_labels=3),
    ),
    # BEiT options the released models do not use: learned absolute positions, mask token, no layer-scale
    "absolute": (
        "Data2VecVisionModel",
        dict(use_absolute_position_embeddings=True, use_mask_token=True, layer_scale_init_value=0.0,
             use_mean_pooling=False, hidden_act="gelu_new", layer_norm_eps=1e-6),
    ),
}  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """HF zero-initialises CLS, tables and positions: random values make every weight matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * 0.2
                + (1.0 if "layernorm" in name and "weight" in name else 0.0)
            )


def _save_hf(tmp_path, variant: str):
    cls_name, extra = HF_VARIANTS[variant]
    cfg = transformers.Data2VecVisionConfig(**BASE, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    _randomize(model)
    model.save_pretrained(tmp_path)
    backbone = model if cls_name == "Data2VecVisionModel" else model.data2vec_vision
    return backbone


def _images(size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


# 42 px: relative tables are resized as HF does; learned absolute positions accept image_size only
@pytest.mark.parametrize(
    "variant, size", [(v, s) for v in HF_VARIANTS for s in (28, 42) if v != "absolute" or s == 28]
)
def test_import_matches_hf(tmp_path, variant, size):
    hf = _save_hf(tmp_path, variant)
    enc = load_encoder(tmp_path)
    img = _images(size)
    with torch.no_grad():
        ref = hf(pixel_values=img).last_hidden_state
        ours, pad = enc.features(img)
    assert pad is None and ours.shape == ref.shape == (2, (size // 7) ** 2 + 1, 16)
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)


def test_config_from_hf_reads_values(tmp_path):
    _save_hf(tmp_path, "finetuned")
    d = json.loads((tmp_path / "config.json").read_text())
    cfg = config_from_hf(d)
    t = cfg.transformer
    assert (t.dim, t.depth, t.heads, t.ffn_dim, t.norm_eps, t.layer_scale_init) == (16, 2, 2, 32, 1e-12, 0.1)
    assert (cfg.image_size, cfg.patch_size, cfg.position, cfg.relative_per_layer, cfg.final_norm) == (
        28, 7, "relative", True, False,
    )  # fmt: skip
    assert t.layer_norm_first and cfg.preset == "tiny"


@pytest.mark.parametrize(
    "variant",
    [
        {"position": "relative"},
        {"position": "relative", "relative_per_layer": True, "final_norm": False},
        {"position": "absolute"},
        {"position": "sincos", "transformer": {"layer_scale_init": None}},
    ],
    ids=["shared", "per_layer", "absolute", "sincos"],
)
def test_export_loads_in_transformers(tmp_path, variant):
    cfg = model_config({"preset": "tiny", **variant})
    torch.manual_seed(0)
    enc = build_encoder(cfg).eval()
    _randomize(enc, seed=1)  # nonzero tables, key bias and all
    export_hf(enc, tmp_path)
    hf, info = transformers.Data2VecVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    img = _images(seed=1)
    with torch.no_grad():
        ref = hf.eval()(pixel_values=img).last_hidden_state
        ours = enc.features(img)[0]
        back = load_encoder(tmp_path).features(img)[0]  # round trip through d2v's importer
    torch.testing.assert_close(ref, ours, rtol=0, atol=ATOL)
    torch.testing.assert_close(back, ours, rtol=0, atol=ATOL)


def test_missing_weight_raises(tmp_path):
    _save_hf(tmp_path, "pretrained")
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["encoder.layer.1.attention.attention.value.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="value.weight"):
        load_encoder(tmp_path)


def test_unexpected_weight_raises(tmp_path):
    _save_hf(tmp_path, "pretrained")
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["encoder.layer.0.extra.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected"):
        load_encoder(tmp_path)


def test_wrong_model_type_raises(tmp_path):
    _save_hf(tmp_path, "pretrained")
    d = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="data2vec-vision"):
        config_from_hf({**d, "model_type": "beit"})
    (tmp_path / "config.json").write_text(json.dumps({**d, "model_type": "beit"}))
    with pytest.raises(ValueError, match="model_type"):
        load_encoder(tmp_path)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"use_relative_position_bias": True, "use_shared_relative_position_bias": True}, "exactly one"),
        ({"use_shared_relative_position_bias": False}, "exactly one"),
        ({"image_size": [28, 42]}, "square"),
        ({"hidden_act": "silu"}, "hidden_act"),
    ],
)
def test_unsupported_hf_variants_raise(over, match):
    d = {"model_type": "data2vec-vision", **BASE, "use_shared_relative_position_bias": True, **over}
    with pytest.raises(ValueError, match=match):
        config_from_hf(d)


# ------------------------------------------------------------- embed with the folder's image processor

PROCESSORS = {
    # data2vec-vision-base-ft1k style: bilinear to the model's size, no crop
    "resize": dict(size={"height": 28, "width": 28}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    # bicubic to 32 px, centre crop 28 (an odd margin on one side), per-channel statistics
    "crop": dict(
        size={"height": 33, "width": 32}, resample=3, do_center_crop=True, crop_size={"height": 28, "width": 28},
        image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3],
    ),
}  # fmt: skip


def _pil_images() -> list:
    from PIL import Image

    g = np.random.default_rng(0)
    return [
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((40, 50), (28, 28), (31, 45))
    ]


@pytest.mark.parametrize("name", PROCESSORS)
def test_embed_matches_transformers_processor_and_model(tmp_path, name):
    """``load_encoder(folder).embed(images)`` = BeitImageProcessor -> Data2VecVisionModel -> mean of the
    patch tokens (CLS dropped). Pixels: the same torchvision resize and fused normalisation, so they agree
    to float rounding; features within 1e-4 (fp32, as above)."""
    hf = _save_hf(tmp_path, "pretrained")
    proc = transformers.BeitImageProcessor(**PROCESSORS[name])
    proc.save_pretrained(tmp_path)
    images = _pil_images()
    enc = load_encoder(tmp_path)
    with torch.no_grad():
        pixels = proc(images=images, return_tensors="pt")["pixel_values"]
        ref = hf(pixel_values=pixels).last_hidden_state[:, 1:].mean(1)
    ours = enc.embed(images, batch_size=2)
    pixel_diff = (enc.preprocessing(images)["inputs"] - pixels).abs().max().item()
    diff = np.abs(ours - ref.numpy()).max()
    print(f"image processor {name}: max |diff| pixels {pixel_diff:.2e}, features {diff:.2e}")
    assert pixel_diff < 1e-5 and diff < ATOL
    # the same images as arrays and files give the same features
    arrays = [np.asarray(im) for im in images]
    images[0].save(tmp_path / "a.png")
    np.testing.assert_array_equal(enc.embed([tmp_path / "a.png", *arrays[1:]]), enc.embed(arrays))


def test_embed_without_processor_file_says_what_is_missing(tmp_path):
    _save_hf(tmp_path, "pretrained")
    enc = load_encoder(tmp_path)  # features() need no processor: loading works
    with pytest.raises(ValueError, match="no preprocessor_config.json; embed needs the image processor"):
        enc.embed(_pil_images())
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "CLIPImageProcessor"})
    )
    with pytest.raises(ValueError, match="CLIPImageProcessor"):
        load_encoder(tmp_path).embed(_pil_images())


def test_cli_embed_with_an_hf_folder(tmp_path, capsys):
    from d2v.cli import main

    folder, out = tmp_path / "hf", tmp_path / "f.npy"
    _save_hf(folder, "pretrained")
    png = tmp_path / "a.png"
    _pil_images()[0].save(png)
    assert main(["embed", str(folder), str(png), "--out", str(out)]) == 2
    assert f"d2v embed: error: {folder}: no preprocessor_config.json" in capsys.readouterr().err
    transformers.BeitImageProcessor(**PROCESSORS["crop"]).save_pretrained(folder)
    assert main(["embed", str(folder), str(png), "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), load_encoder(folder).embed([png]))
