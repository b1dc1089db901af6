"""Image data: user folders with bad files, Fashion-MNIST, reproducible shards, batches."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2v.data import LoaderSpec, build_loader, prepare_raw, read_manifest, shard, verify_shards
from d2v.modalities import image
from d2v.modalities.image.data import FASHION_MNIST_DIR, PrepareConfig, ShardConfig

TINY = image.model_config({"preset": "tiny"})  # 28 px, 7 px patches: 4 x 4 grid


def png(path: Path, seed: int, size: tuple[int, int] = (28, 28), mode: str = "L") -> None:
    rng = np.random.default_rng(seed)
    shape = size[::-1] if mode == "L" else (*size[::-1], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def user_folder(root: Path, per_class: int = 6) -> Path:
    """Two classes (one with RGB, non-square images), two unlabelled images and three bad files."""
    for i in range(per_class):
        png(root / "cats" / f"{i}.png", i)
        png(root / "dogs" / f"{i}.jpg.png", 100 + i, size=(40, 30), mode="RGB")
    png(root / "free0.png", 200)
    png(root / "free1.png", 201)
    (root / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="PNG")
    (root / "dogs" / "truncated.png").write_bytes(buf.getvalue()[:30])
    (root / "notes.txt").write_text("not an image")
    return root


def run(tmp: Path, src: Path, **shard_kw) -> tuple[Path, dict]:
    raw, out = tmp / "raw" / "image", tmp / "shards" / "image"
    prepare_raw("image", PrepareConfig(source=str(src)), raw, seed=0)
    cfg = ShardConfig(samples_per_shard=4, valid=0.2, test=0.2, **shard_kw)
    return out, shard("image", cfg, raw, out, seed=0)


def test_user_folder_is_sharded_with_bad_files_skipped_and_counted(tmp_path):
    out, m = run(tmp_path, user_folder(tmp_path / "src"))
    assert m["tasks"]["classification"]["labels"] == ["cats", "dogs"]
    n = {s: e["samples"] for s, e in m["splits"].items()}
    # bad files are split like the others (decoding happens while writing), then skipped
    assert n["train"] + n["valid"] + n["test"] == 12 and min(n["valid"], n["test"]) >= 1
    assert n["pretrain"] == 2 + n["train"] + n["valid"]  # unlabelled + labelled train/valid (not test)
    assert m["skipped_counts"] == {"decode_error": 2, "unsupported_format": 1}
    assert {s["input"] for s in m["skipped"]} == {
        "files/cats/broken.png", "files/dogs/truncated.png", "files/notes.txt",
    }  # fmt: skip
    assert m["preprocessing"]["image_size"] == 28 and len(m["preprocessing"]["mean"]) == 3
    verify_shards(out)


def test_strict_turns_a_skip_into_an_error_naming_the_file(tmp_path):
    src = user_folder(tmp_path / "src")
    (src / "notes.txt").unlink()
    (src / "dogs" / "truncated.png").unlink()
    with pytest.raises(ValueError, match=r"files/cats/broken\.png.*strict"):
        run(tmp_path, src, strict=True)
    assert not (tmp_path / "shards" / "image").exists()  # nothing half-written


def test_same_inputs_and_params_give_byte_identical_shards(tmp_path):
    src = user_folder(tmp_path / "src")
    a, _ = run(tmp_path / "a", src)
    b, _ = run(tmp_path / "b", src)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and any(f.endswith(".tar") for f in files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8), mode="RGB").save(path, "JPEG")


def imagenet_tree(root: Path) -> Path:
    """ImageNet's layout: ``train/<wnid>/*.JPEG`` (5 per class) and ``val/<wnid>/*.JPEG`` (2 per class), plus
    a loose val image (no class), an unlabelled ``test/`` image and the synset list."""
    for c, wnid in enumerate(("n01440764", "n01443537")):
        for i in range(5):
            jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", 10 * c + i)
        for i in range(2):
            jpeg(root / "val" / wnid / f"ILSVRC2012_val_{c}{i}.JPEG", 100 + 10 * c + i)
    jpeg(root / "val" / "ILSVRC2012_val_99.JPEG", 199)
    jpeg(root / "test" / "ILSVRC2012_test_1.JPEG", 200)
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    return root


def test_an_imagenet_tree_keeps_val_as_the_test_split(tmp_path):
    out, m = run(tmp_path, imagenet_tree(tmp_path / "imagenet"))
    assert m["tasks"]["classification"]["labels"] == ["n01440764", "n01443537"]  # wnids, not train / val
    n = {s: e["samples"] for s, e in m["splits"].items()}
    assert n["test"] == 4 and n["train"] + n["valid"] == 10 and n["valid"] == 2  # valid: 0.2 of train/
    assert m["splits"]["test"]["label_counts"] == {"n01440764": 2, "n01443537": 2}
    assert n["pretrain"] == 1 + 10  # test/ (unlabelled) + train/ without labels; never val/
    assert m["skipped_counts"] == {"no_label": 1, "unsupported_format": 1}
    assert {s["input"] for s in m["skipped"]} == {
        "files/val/ILSVRC2012_val_99.JPEG",
        "files/LOC_synset_mapping.txt",
    }
    verify_shards(out)


def test_a_failure_mid_stage_keeps_the_previous_shards(tmp_path, monkeypatch):
    src = user_folder(tmp_path / "src")
    out, before = run(tmp_path, src)
    from d2v.modalities.image import data

    calls = {"n": 0}
    real = data.encode

    def flaky(item, ctx):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return real(item, ctx)

    monkeypatch.setattr(data, "encode", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        shard("image", ShardConfig(samples_per_shard=4, valid=0.2, test=0.2), tmp_path / "raw/image", out, 0)
    assert read_manifest(out) == before
    verify_shards(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["image"]


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs Debian dataset-fashion-mnist")
def test_fashion_mnist_default(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "shards"
    info = prepare_raw("image", PrepareConfig(max_train=200, max_test=50), raw, seed=0)
    assert info["counts"] == {"train": 200, "test": 50}
    m = shard("image", ShardConfig(samples_per_shard=100, valid=0.1), raw, out, seed=0)
    assert m["tasks"]["classification"]["labels"][0] == "T-shirt/top"  # Zalando's id order, not sorted
    counts = {s: e["samples"] for s, e in m["splits"].items()}
    assert counts == {"pretrain": 200, "train": 180, "valid": 20, "test": 50}
    assert set(m["splits"]["test"]["label_counts"].values()) == {5}  # class-balanced cap
    # pixel statistics of Fashion-MNIST (mean ~0.286, std ~0.353 on all 60k): loose bounds for 200 images
    assert 0.25 < m["preprocessing"]["mean"][0] < 0.33 and 0.32 < m["preprocessing"]["std"][0] < 0.39


@pytest.fixture
def shards(tmp_path) -> Path:
    out, _ = run(tmp_path, user_folder(tmp_path / "src"))
    return out


def test_pretrain_batches(shards):
    spec = LoaderSpec(batch_size=4, mode="pretrain", seed=0)
    batch = next(iter(build_loader(shards, "pretrain", TINY, spec)))
    assert batch["inputs"].shape == (4, 3, 28, 28) and batch["inputs"].dtype == torch.float32
    assert batch["mask"].shape == (4, 16) and batch["mask"].dtype == torch.bool
    assert "padding_mask" not in batch and "labels" not in batch


def test_eval_batches_are_normalised_with_the_manifest_stats(shards):
    m = read_manifest(shards)
    batches = list(build_loader(shards, "train", TINY, LoaderSpec(batch_size=100, mode="eval", seed=0)))
    x = torch.cat([b["inputs"] for b in batches])
    prep = m["preprocessing"]
    raw = x * torch.tensor(prep["std"]).view(1, 3, 1, 1) + torch.tensor(prep["mean"]).view(1, 3, 1, 1)
    # raw pixels lie in [0, 1] up to float rounding (1e-5); grey images come back as 3 equal channels
    assert float(raw.min()) > -1e-5 and float(raw.max()) < 1 + 1e-5
    grey = (raw[:, 0] - raw[:, 1]).abs().amax(dim=(1, 2)) < 1e-5
    assert 0 < int(grey.sum()) < len(x)
    assert batches[0]["labels"].dtype == torch.int64


def test_model_image_size_must_match_the_shards(shards):
    with pytest.raises(ValueError, match="image_size"):
        build_loader(
            shards, "train", image.model_config({"preset": "tiny", "image_size": 14}),
            LoaderSpec(batch_size=2, mode="eval", seed=0),
        )  # fmt: skip


def test_inference_preprocessing_matches_the_shards(tmp_path):
    from d2v.data.shards import Item
    from d2v.modalities.image import data as D

    png(tmp_path / "wide.png", 0, size=(40, 30), mode="RGB")
    prep = {"image_size": 28}
    stored = D.decode(D.encode(Item("x", ("file", str(tmp_path / "wide.png"))), D.Context(28))[0].fields)
    (again,) = D.inference_inputs([str(tmp_path / "wide.png")], prep)
    assert stored.shape == (3, 28, 28) and torch.equal(stored, again)


def png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3]) written by hand: PIL cannot write 16-bit colour."""
    h, w = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else 2

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = pixels.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


@pytest.mark.parametrize("colour", [False, True])
def test_16_bit_png_gradient_is_scaled_not_clipped(tmp_path, colour):
    from d2v.modalities.image import data as D

    ramp = np.linspace(0, 65535, 28).round().astype(np.uint16)  # 28 levels over the full 16-bit range
    pixels = np.tile(ramp, (28, 1))
    if colour:
        pixels = np.stack([pixels, pixels, pixels], axis=-1)
    png16(tmp_path / "ramp.png", pixels)
    (x,) = D.inference_inputs([str(tmp_path / "ramp.png")], {"image_size": 28})  # what shard stores, too
    row = x[0, 0].tolist()
    assert x.shape[0] == (3 if colour else 1)
    assert row == sorted(row) and len(set(row)) == 28  # monotonic, every level distinct (none saturate)
    assert row[0] == 0 and row[-1] == 255
    assert row == (ramp >> 8).tolist()  # the high byte, as PIL reads 16-bit colour


def test_16_bit_grey_modes_keep_the_high_byte():
    from d2v.data.shards import BadInput
    from d2v.modalities.image.data import to_8bit

    ramp = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16)
    for im in (
        Image.frombuffer("I;16B", (5, 1), ramp.astype(">u2").tobytes(), "raw", "I;16B", 0, 1),
        Image.fromarray(ramp.astype(np.int32)),  # mode 'I'
    ):
        out = to_8bit(im)
        assert out.mode == "L" and np.asarray(out).tolist() == [[0, 0, 1, 156, 255]]
    with pytest.raises(BadInput, match="beyond 16 bits"):
        to_8bit(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))


def test_augmented_crops_stay_uint8_and_collate_normalises_like_the_formula():
    """The crop runs on uint8 pixels (rounded, as torchvision's crops of PIL images) and ``collate`` turns
    them into ``(x / 255 - mean) / std``; a flat image stays flat through any crop."""
    import random

    from d2v.modalities.image.data import collate, decode, transform

    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    x = decode({"png": buf.getvalue()})
    assert (
        x.shape == (3, 24, 32)
        and x.dtype == torch.uint8
        and torch.equal(x, torch.from_numpy(rgb).permute(2, 0, 1))
    )
    prep = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    kw = {"mode": "pretrain", "max_len": None, "augment": True, "prep": prep, "model_cfg": TINY}
    a, b = (transform(x, rng=random.Random(7), **kw) for _ in range(2))
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)  # seeded: the same view
    flat = torch.full((1, 24, 32), 200, dtype=torch.uint8)
    assert (transform(flat, rng=random.Random(3), **kw) == 200).all()
    out = collate([a, flat], mode="eval", model_cfg=TINY, prep=prep, generator=torch.Generator())["inputs"]
    want = (
        torch.stack([a.float(), flat.expand(3, -1, -1).float()]) / 255
        - torch.tensor(prep["mean"]).view(1, 3, 1, 1)
    ) / torch.tensor(prep["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
