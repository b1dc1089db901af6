"""Image and audio shards made with a published model's preprocessing (``shard.<m>.preprocess_like``).

The folder is a tiny Hugging Face data2vec folder (``published`` in tests/conftest.py: 28 px images resized
straight to 28 x 28 bilinear, mean/std 0.5; 16 kHz audio with ``do_normalize``) or a d2v checkpoint step
whose meta.json records its shards' ``preprocessing``. The manifest must hold exactly
``like_preprocessing(folder)``; batches must be what transformers' processor makes of the same input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from d2v.data import LoaderSpec, build_loader, prepare_raw, read_manifest, shard
from d2v.data.shards import Item
from d2v.modalities import audio, image
from d2v.modalities.audio import data as A
from d2v.modalities.image import data as D
from d2v.published import source

transformers = pytest.importorskip("transformers")

TINY_IMAGE = image.model_config({"preset": "tiny"})  # 28 px, 7 px patches, like the published folder
EVAL = LoaderSpec(batch_size=16, mode="eval", seed=0)
LABELLED = ("train", "valid", "test")


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def no_shards_left(out: Path) -> bool:
    """Neither the shard folder nor its staging folder exists after a failed run."""
    return not out.exists() and not (out.parent / f".{out.name}.tmp").exists()


def write_step(
    root: Path, modality: str, preprocessing: dict | None, model_config: dict | None = None
) -> Path:
    """A d2v checkpoint run folder whose one step records ``preprocessing`` (``d2v/checkpoint.py`` layout:
    ``step-NNNNNNNN/meta.json``; weights are not read to take a preprocessing)."""
    step = root / "step-00000010"
    step.mkdir(parents=True)
    meta = {"modality": modality, "kind": "pretrain", "step": 10, "model_config": model_config or {}}
    if preprocessing is not None:
        meta["preprocessing"] = preprocessing
    (step / "meta.json").write_text(json.dumps(meta))
    return root


# ------------------------------------------------------------------------------------------------- images


def image_folder(root: Path) -> dict[Path, Image.Image]:
    """Two classes of 5 images: RGB 40 x 50 (so the resize matters) and grey 29 x 33 (height x width)."""
    g = np.random.default_rng(0)
    out = {}
    for c in ("cats", "dogs"):
        for i in range(5):
            path = root / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            if i % 2:
                im = Image.fromarray(g.integers(0, 256, (40, 50, 3), dtype=np.uint8))
            else:
                im = Image.fromarray(g.integers(0, 256, (29, 33), dtype=np.uint8), mode="L")
            im.save(path)
            out[path] = im
    return out


@pytest.fixture
def raw_images(tmp_path) -> tuple[Path, dict[Path, Image.Image]]:
    images = image_folder(tmp_path / "src")
    raw = tmp_path / "raw" / "image"
    prepare_raw("image", D.PrepareConfig(source=str(tmp_path / "src")), raw, seed=0)
    return raw, images


def shard_images(raw: Path, out: Path, like: Path | None, **kw) -> dict:
    like_ = str(like) if like is not None else None
    cfg = D.ShardConfig(samples_per_shard=4, valid=0.2, test=0.2, preprocess_like=like_, **kw)
    return shard("image", cfg, raw, out, seed=0)


PROCESSORS = {
    "straight": None,  # the fixture's: straight to 28 x 28, bilinear, mean/std 0.5
    # shorter side to 32 bicubic, centre crop 28 (odd margins), ImageNet statistics
    "shorter_side_crop": dict(
        do_resize=True, size={"shortest_edge": 32}, resample=3, do_center_crop=True,
        crop_size={"height": 28, "width": 28}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", PROCESSORS)
def test_image_shards_follow_the_processor(tmp_path, published, raw_images, name):
    """Manifest = ``like_preprocessing(folder)``; eval batches = BeitImageProcessor's pixel values.

    Tolerance: half an 8-bit level after normalisation, 0.5 / 255 / std. The shards store the resized image
    as an 8-bit PNG, so that is the most a processor that resized in float could differ by; transformers'
    torchvision backend rounds its resize to uint8 too, so here they agree to float rounding (~1e-7).
    """
    raw, images = raw_images
    hf = tmp_path / "hf"
    published("image", hf)
    if PROCESSORS[name] is not None:
        transformers.BeitImageProcessor(**PROCESSORS[name]).save_pretrained(hf)
    m = shard_images(raw, tmp_path / "a", hf)
    prep = m["preprocessing"]
    assert prep == D.like_preprocessing(source(hf, "image", "shard.image.preprocess_like"))
    assert read_manifest(tmp_path / "a")["preprocessing"] == prep  # as written to disk
    assert prep["image_size"] == 28 and "stats_from" not in prep  # no data statistics
    proc = transformers.BeitImageProcessor.from_pretrained(hf)
    assert prep["mean"] == pytest.approx(list(proc.image_mean)) and prep["std"] == pytest.approx(
        list(proc.image_std)
    )

    # d2v repeats grey to 3 channels, as convert("RGB") does for the processor
    ref = proc(images=[im.convert("RGB") for im in images.values()], return_tensors="pt")["pixel_values"]
    rows = [
        x for s in LABELLED for b in build_loader(tmp_path / "a", s, TINY_IMAGE, EVAL) for x in b["inputs"]
    ]
    assert len(rows) == len(images)
    tol = 0.5 / 255 / min(proc.image_std)
    # each stored image is one of the inputs: its nearest processor output is within the tolerance
    nearest = [float((ref - x).abs().amax(dim=(1, 2, 3)).min()) for x in rows]
    assert max(nearest) < tol, (max(nearest), tol)

    # embed with a checkpoint of these shards reads an item as the shards stored it
    path, im = next(iter(images.items()))
    ctx = D.setup({}, D.ShardConfig(preprocess_like=str(hf)), tmp_path, 0)
    stored = D.decode(D.encode(Item("x", ("file", str(path))), ctx)[0].fields)
    (again,) = D.inference_inputs([path], prep)
    assert stored.shape[-2:] == (28, 28) and torch.equal(stored, again)

    # made twice: byte-identical shards and manifest
    shard_images(raw, tmp_path / "b", hf)
    assert folder_files(tmp_path / "a") == folder_files(tmp_path / "b")


def test_image_shards_like_a_d2v_checkpoint_take_its_recorded_preprocessing(tmp_path, published, raw_images):
    raw, _ = raw_images
    hf = tmp_path / "hf"
    published("image", hf)
    made = shard_images(raw, tmp_path / "hf_shards", hf)["preprocessing"]
    grid = {"image_size": 28, "patch_size": 7}
    # a checkpoint trained on shards made like the HF folder: the same preprocessing, the same shards
    ckpt = write_step(tmp_path / "ckpt", "image", made, grid)
    m = shard_images(raw, tmp_path / "like_ckpt", ckpt)
    assert m["preprocessing"] == made == D.like_preprocessing(source(ckpt, "image", "k"))
    tars = sorted((tmp_path / "like_ckpt").glob("*.tar"))
    assert tars and all(t.read_bytes() == (tmp_path / "hf_shards" / t.name).read_bytes() for t in tars)

    # a checkpoint of d2v's own shards (an entry without the new keys): d2v's resize, the checkpoint's mean/std
    own = shard_images(raw, tmp_path / "own", None)["preprocessing"]
    old = {**own, "mean": [0.25, 0.5, 0.75], "std": [0.2, 0.3, 0.4]}
    ckpt2 = write_step(tmp_path / "ckpt2", "image", old, grid)
    m = shard_images(raw, tmp_path / "like_ckpt2", ckpt2)
    assert m["preprocessing"] == old == D.like_preprocessing(source(ckpt2, "image", "k"))
    tars = sorted((tmp_path / "own").glob("*.tar"))
    assert all(t.read_bytes() == (tmp_path / "like_ckpt2" / t.name).read_bytes() for t in tars)


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


IMAGE_BAD = {
    "missing": (lambda hf: (hf / "preprocessor_config.json").unlink(), "AutoImageProcessor.from_pretrained"),
    "unreadable": (lambda hf: (hf / "preprocessor_config.json").write_text("{not json"), "cannot be read as JSON"),
    "lanczos": (lambda hf: _edit_json(hf / "preprocessor_config.json", resample=1), "resample 1 is not supported"),
    "shortest_edge_no_crop": (
        lambda hf: _edit_json(hf / "preprocessor_config.json", size={"shortest_edge": 28}),
        "without do_center_crop gives each image its own shape",
    ),
    "not_beit": (
        lambda hf: _edit_json(hf / "preprocessor_config.json", image_processor_type="CLIPImageProcessor"),
        "CLIPImageProcessor",
    ),
    "grid_other_size": (
        lambda hf: _edit_json(hf / "config.json", image_size=35),
        r"patch grid does not fit the shards' image size: a 5 x 5 grid of 7 px patches \(image_size 35\) for 28",
    ),
    "grid_not_whole": (
        lambda hf: _edit_json(hf / "config.json", patch_size=8),
        r"patch grid does not fit the shards' image size: a 3.5 x 3.5 grid of 8 px patches",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", IMAGE_BAD)
def test_bad_image_folders_are_explained_and_leave_no_shards(tmp_path, published, raw_images, case):
    raw, _ = raw_images
    hf = tmp_path / "hf"
    published("image", hf)
    edit, message = IMAGE_BAD[case]
    edit(hf)
    out = tmp_path / "shards" / "image"
    with pytest.raises(ValueError, match=message) as e:
        shard_images(raw, out, hf)
    assert str(e.value).startswith("shard.image.preprocess_like: ") and str(hf) in str(e.value)
    assert no_shards_left(out)


def test_image_size_must_be_the_processors(tmp_path, published, raw_images):
    raw, _ = raw_images
    hf = tmp_path / "hf"
    published("image", hf)
    out = tmp_path / "shards" / "image"
    with pytest.raises(
        ValueError, match="to 28 px but shard.image.image_size is 32: set shard.image.image_size: 28"
    ):
        shard_images(raw, out, hf, image_size=32)
    assert no_shards_left(out)
    ckpt = write_step(tmp_path / "ckpt", "image", None)
    with pytest.raises(ValueError, match="records no usable image preprocessing"):
        shard_images(raw, out, ckpt)
    assert no_shards_left(out)


# -------------------------------------------------------------------------------------------------- audio


@pytest.fixture
def raw_audio(tmp_path) -> Path:
    """4 speakers x 2 labelled tones (8, 16 and 22.05 kHz) and 2 unlabelled ones, with a metadata TSV."""
    src = tmp_path / "src"
    rows = ["path\tlabel\ttranscript\tspeaker"]
    for s in range(4):
        sr = (8000, 16000, 22050)[s % 3]
        for d in range(2):
            rel = f"spk{s}/{d}.wav"
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            t = np.arange(int((0.5 + 0.1 * d) * sr)) / sr
            sf.write(src / rel, 0.3 * np.sin(2 * np.pi * (200 + 50 * s + 10 * d) * t) + 0.05, sr)
            rows.append(f"{rel}\t{d}\t\tspk{s}")
    for i in range(2):
        (src / "free").mkdir(exist_ok=True)
        sf.write(src / "free" / f"{i}.flac", 0.2 * np.sin(np.arange(16000) / (10 + i)), 16000)
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    raw = tmp_path / "raw" / "audio"
    prepare_raw("audio", A.PrepareConfig(source=str(src), metadata=str(tsv)), raw, seed=0)
    return raw


def shard_audio(raw: Path, out: Path, like: Path) -> dict:
    cfg = A.ShardConfig(samples_per_shard=4, valid=0.25, test=0.25, workers=1, preprocess_like=str(like))
    return shard("audio", cfg, raw, out, seed=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_audio_shards_follow_do_normalize(tmp_path, published, raw_audio, normalize):
    hf = tmp_path / "hf"
    published("audio", hf)
    _edit_json(hf / "preprocessor_config.json", do_normalize=normalize)
    m = shard_audio(raw_audio, tmp_path / "a", hf)
    prep = m["preprocessing"]
    assert prep == A.like_preprocessing(source(hf, "audio", "shard.audio.preprocess_like"))
    assert prep["normalize"] is normalize and prep["sample_rate"] == 16_000

    cfg = audio.model_config({"preset": "tiny", "normalize_waveform": normalize})
    for split in LABELLED:
        for b in build_loader(tmp_path / "a", split, cfg, EVAL):
            pad = b.get("padding_mask", torch.zeros_like(b["inputs"], dtype=torch.bool))
            for x, p in zip(b["inputs"], pad):
                x = x[~p].double()
                if normalize:  # zero mean, unit variance per utterance
                    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(unbiased=False)) - 1) < 1e-3
                else:  # the stored tone: 0.3 sin + 0.05, as written (16-bit)
                    assert abs(float(x.mean()) - 0.05) < 0.01 and float(x.abs().max()) < 0.4
    # the model must normalise as the shards say: a clear error before any batch
    other = audio.model_config({"preset": "tiny", "normalize_waveform": not normalize})
    with pytest.raises(ValueError, match=f"set model.audio.normalize_waveform: {str(normalize).lower()}"):
        build_loader(tmp_path / "a", "train", other, EVAL)
    if normalize:
        shard_audio(raw_audio, tmp_path / "b", hf)
        assert folder_files(tmp_path / "a") == folder_files(tmp_path / "b")


def test_the_manifests_normalize_decides_and_old_manifests_follow_the_model():
    x = torch.linspace(-0.5, 1.0, 800)
    kw = dict(mode="eval", max_len=None, rng=None, augment=False)
    on = audio.model_config({"preset": "tiny"})
    off = audio.model_config({"preset": "tiny", "normalize_waveform": False})
    old = {"sample_rate": 16_000}

    def normalised(y: torch.Tensor) -> bool:
        return abs(float(y.mean())) < 1e-5 and abs(float(y.std(unbiased=False)) - 1) < 1e-3

    assert normalised(A.transform(x, prep={**old, "normalize": True}, model_cfg=None, **kw))
    assert torch.equal(A.transform(x, prep={**old, "normalize": False}, model_cfg=on, **kw), x)
    assert torch.equal(A.transform(x, prep=old, model_cfg=off, **kw), x)
    assert normalised(A.transform(x, prep=old, model_cfg=on, **kw))
    A.check_model(old, off)  # old manifests: no refusal
    A.check_model(old, on)


def test_audio_shards_like_a_d2v_checkpoint_take_its_recorded_preprocessing(tmp_path, raw_audio):
    recorded = {**A.own_preprocessing(), "normalize": False}
    ckpt = write_step(tmp_path / "ckpt", "audio", recorded)
    m = shard_audio(raw_audio, tmp_path / "a", ckpt)
    assert m["preprocessing"] == recorded == A.like_preprocessing(source(ckpt, "audio", "k"))
    out = tmp_path / "shards" / "audio"
    bad = write_step(tmp_path / "ckpt8k", "audio", {**recorded, "sample_rate": 8000})
    with pytest.raises(ValueError, match="says 8000 Hz, but data2vec's audio encoder runs at 16000 Hz"):
        shard_audio(raw_audio, out, bad)
    assert no_shards_left(out)


AUDIO_BAD = {
    "missing": (lambda hf: (hf / "preprocessor_config.json").unlink(), "AutoFeatureExtractor.from_pretrained"),
    "unreadable": (lambda hf: (hf / "preprocessor_config.json").write_bytes(b"\xff\xfe"), "cannot be read as JSON"),
    "rate": (lambda hf: _edit_json(hf / "preprocessor_config.json", sampling_rate=8000), "8000 Hz.*16000 Hz"),
    "not_wav2vec2": (
        lambda hf: _edit_json(hf / "preprocessor_config.json", feature_extractor_type="WhisperFeatureExtractor"),
        "WhisperFeatureExtractor",
    ),
    "feature_size": (lambda hf: _edit_json(hf / "preprocessor_config.json", feature_size=80), "feature_size 80"),
}  # fmt: skip


@pytest.mark.parametrize("case", AUDIO_BAD)
def test_bad_audio_folders_are_explained_and_leave_no_shards(tmp_path, published, raw_audio, case):
    hf = tmp_path / "hf"
    published("audio", hf)
    edit, message = AUDIO_BAD[case]
    edit(hf)
    out = tmp_path / "shards" / "audio"
    with pytest.raises(ValueError, match=message) as e:
        shard_audio(raw_audio, out, hf)
    assert str(e.value).startswith("shard.audio.preprocess_like: ") and str(hf) in str(e.value)
    assert no_shards_left(out)
