"""Images: raw data (Fashion-MNIST or the user's folder), PNG shard samples, decode, augment and collate.

Raw layout written by ``prepare`` under ``<paths.raw>/image/`` (and read by ``shard``):
- ``fashion-mnist/{train,test}-{images,labels}.npy`` + ``classes.json``: the embedded default, from the IDX
  files of Debian ``dataset-fashion-mnist`` (uint8 [N, 28, 28] / [N]); test = the t10k set.
- ``files/``: a copy of the user's folder. Images in sub-folders are labelled with the sub-folder name
  (ImageFolder layout, classes in sorted order); images at the top level are unlabelled. A folder with both
  ``train/`` and ``val/`` (ImageNet's ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``) keeps that split:
  ``train/<class>/`` is the labelled pool (``valid`` carved from it), ``val/<class>/`` the test split; other
  images are unlabelled, except loose ones in ``val/`` (no class: skipped, never pretrained on).

Shards (``d2v/data/shards.py``): field ``png`` (grey 'L' or 'RGB', resized to ``image_size``: shorter side
bicubic, then centre crop) and ``cls`` in labelled splits. Splits: ``pretrain`` (labels dropped), ``train``,
``valid``, ``test``. With ``shard.image.preprocess_like`` (a published model's folder) the PNGs are resized as
its BEiT image processor resizes (``preprocessor_config.json``: straight to height x width or shorter side,
its filter, its centre crop) and the manifest takes its mean/std instead of the data's
(:func:`like_preprocessing`).

Batches: ``inputs`` float [B, 3, H, W] normalised with the manifest's per-channel mean/std (grey repeated to
3 channels); pretrain adds ``mask`` [B, h*w] (BEiT block masking, CLS excluded).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from d2v import published
from d2v.config import ConfigError
from d2v.data.shards import (
    BadInput,
    Encoded,
    Item,
    PretrainFrom,
    Scan,
    ShardCommon,
    Skip,
    Task,
    files_under,
    item_file,
    rng_for,
    unpacked,
)
from d2v.data.stages import PrepareCommon, copy_source

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
"""Zalando's label order (ids 0-9)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CROP_SCALE = (0.35, 1.0)
"""Area range of the pretraining random-resized crop. [DV] uses (0.08, 1) at 224 px; a 28 px image keeps
too little of the object below ~1/3 of its area."""

__all__ = ["PrepareConfig", "ShardConfig", "inference_inputs", "like_preprocessing", "to_image"]

STRING_ITEMS = False
"""A ``str`` item given to ``embed`` is a file path (only text reads strings as content)."""


@dataclass(frozen=True)
class PrepareConfig(PrepareCommon):
    """The ``prepare.image`` section."""

    max_train: int | None = None
    """Default data: Fashion-MNIST train images kept (class-balanced seeded subset); None: all 60,000."""
    max_test: int | None = None
    """Default data: t10k test images kept (class-balanced seeded subset); None: all 10,000."""


@dataclass(frozen=True)
class ShardConfig(ShardCommon):
    """The ``shard.image`` section."""

    image_size: int = 28
    """Stored side length in pixels (must equal ``model.image.image_size``)."""
    pretrain_from: PretrainFrom = "unlabelled+labelled"
    """Fashion-MNIST pretrains on its train images with labels dropped (train + valid, never test)."""
    samples_per_shard: int = 5000
    """Samples per shard (a 28 px PNG is ~0.4 KB, so shards stay small)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 1:
            raise ConfigError(f"image_size must be >= 1, got {self.image_size}")


# ------------------------------------------------------------------------------------------------ prepare


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (gzip or raw): big-endian magic (0, 0, dtype 0x08 = uint8, ndim), dims, then data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX uint8 file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _balanced_subset(labels: np.ndarray, n: int | None, seed: int, name: str) -> np.ndarray:
    """Indices of a class-balanced seeded subset of size n (all, in order, when n is None or too big)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = rng_for(seed, "prepare.image", name)
    per_class = []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c).tolist()
        rng.shuffle(idx)
        per_class.append(idx)
    order = [q[i] for i in range(max(map(len, per_class))) for q in per_class if i < len(q)]
    return np.sort(np.array(order[:n], dtype=np.int64))


def _prepare_fashion_mnist(cfg: PrepareConfig, out_dir: Path, seed: int) -> dict[str, Any]:
    files = {
        "train-images": "train-images-idx3-ubyte.gz", "train-labels": "train-labels-idx1-ubyte.gz",
        "test-images": "t10k-images-idx3-ubyte.gz", "test-labels": "t10k-labels-idx1-ubyte.gz",
    }  # fmt: skip
    missing = [f for f in files.values() if not (FASHION_MNIST_DIR / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({', '.join(missing)} missing in {FASHION_MNIST_DIR}): install it with "
            "`sudo apt-get install dataset-fashion-mnist`, or set prepare.image.source to a folder of images"
        )
    dst = out_dir / "fashion-mnist"
    dst.mkdir(parents=True)
    counts = {}
    for split, cap in (("train", cfg.max_train), ("test", cfg.max_test)):
        images = read_idx(FASHION_MNIST_DIR / files[f"{split}-images"])
        labels = read_idx(FASHION_MNIST_DIR / files[f"{split}-labels"])
        keep = _balanced_subset(labels, cap, seed, split)
        np.save(dst / f"{split}-images.npy", np.ascontiguousarray(images[keep]))
        np.save(dst / f"{split}-labels.npy", np.ascontiguousarray(labels[keep]))
        counts[split] = len(keep)
    (dst / "classes.json").write_text(json.dumps(FASHION_MNIST_CLASSES) + "\n")
    return {"source": "default", "data": "Fashion-MNIST (Debian dataset-fashion-mnist)", "counts": counts}


def prepare(cfg: PrepareConfig, out_dir: Path, seed: int) -> dict[str, Any]:
    """Materialise the raw images in ``out_dir`` (see the module docstring for the layout)."""
    if cfg.source == "default":
        return _prepare_fashion_mnist(cfg, out_dir, seed)
    src = cfg.source_path("a folder of images (one sub-folder per class when labelled)")
    n = copy_source(src, out_dir / "files")
    return {"source": str(cfg.source), "counts": {"files": n}}


# -------------------------------------------------------------------------------------------------- shard


def scan(raw_dir: Path, cfg: ShardConfig) -> Scan:
    """Items of the raw folder: Fashion-MNIST arrays and/or a user folder."""
    out = Scan()
    fm = raw_dir / "fashion-mnist"
    if fm.is_dir():
        classes = json.loads((fm / "classes.json").read_text())
        pools = {}
        for split in ("train", "test"):
            labels = np.load(fm / f"{split}-labels.npy")
            images = str((fm / f"{split}-images.npy").resolve())
            pools[split] = [
                Item(f"fashion-mnist/{split}#{i}", ("array", images, i), label=classes[int(y)])
                for i, y in enumerate(labels)
            ]
        out.tasks["classification"] = Task(
            pools["train"], "label", test_items=pools["test"], labels=list(classes)
        )
    files = raw_dir / "files"
    if files.is_dir():
        labelled, held_out = [], []
        # ImageNet-style train/ + val/: keep the source's split (val/ is the test set) rather than re-split
        split_dirs = (files / "train").is_dir() and (files / "val").is_dir()
        for path in files_under(files):
            rel = path.relative_to(raw_dir).as_posix()
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                out.skipped.append(
                    Skip(
                        rel,
                        "unsupported_format",
                        f"unsupported file type {path.suffix!r} (expected one of {' '.join(IMAGE_SUFFIXES)})",
                    )  # fmt: skip
                )
                continue
            parts = path.relative_to(files).parts
            ref = ("file", str(path.resolve()))
            if not split_dirs:
                if len(parts) == 1:
                    out.unlabelled.append(Item(rel, ref))
                else:
                    labelled.append(Item(rel, ref, label=parts[0]))
            elif parts[0] in ("train", "val") and len(parts) > 2:
                (labelled if parts[0] == "train" else held_out).append(Item(rel, ref, label=parts[1]))
            elif parts[0] == "val":
                out.skipped.append(
                    Skip(rel, "no_label", "an image directly in val/ has no class (move it to val/<class>/)")
                )
            else:
                out.unlabelled.append(Item(rel, ref))
        if labelled:
            if "classification" in out.tasks:
                raise ValueError(f"{raw_dir}: both Fashion-MNIST and a labelled user folder; keep one")
            out.tasks["classification"] = Task(labelled, "label", test_items=held_out or None)
        elif held_out:
            raise ValueError(
                f"{files}: val/ has class folders but train/ has none; put the labelled training images in "
                "train/<class>/"
            )
    if not fm.is_dir() and not files.is_dir():
        raise FileNotFoundError(f"{raw_dir}: no 'fashion-mnist/' or 'files/'; run `d2v prepare image`")
    return out


LIKE_KEY = "shard.image.preprocess_like"


@dataclass(frozen=True)
class Context:
    image_size: int
    like: dict[str, Any] | None = None
    """The ``preprocessing`` entry that ``shard.image.preprocess_like`` dictates (:func:`like_preprocessing`);
    None: d2v's own resize and the data's mean/std."""


def setup(splits: dict[str, list[Item]], cfg: ShardConfig, work_dir: Path, seed: int) -> Context:
    """Nothing to fit for images; with ``preprocess_like``, the folder's preprocessing, whose output size
    must be ``image_size`` (ValueError naming both)."""
    if cfg.preprocess_like is None:
        return Context(cfg.image_size)
    like = like_preprocessing(published.source(cfg.preprocess_like, "image", LIKE_KEY))
    if like["image_size"] != cfg.image_size:
        raise ValueError(
            f"{LIKE_KEY}: {cfg.preprocess_like} preprocesses images to {like['image_size']} px but "
            f"shard.image.image_size is {cfg.image_size}: set shard.image.image_size: {like['image_size']} "
            f"(and model.image.image_size: {like['image_size']}), or leave {LIKE_KEY} unset"
        )
    return Context(cfg.image_size, like)


_ARRAYS: dict[str, np.ndarray] = {}


def load_image(ref: tuple) -> Image.Image:
    """The image behind an item ref, ``("array", npy path, index)`` or ``("file", path)``, at 8 bits per
    channel (16-bit files are scaled by ``to_8bit``)."""
    kind, path, *index = ref
    if kind == "array":
        if path not in _ARRAYS:  # memory-mapped once per process
            _ARRAYS[path] = np.load(path, mmap_mode="r")
        return Image.fromarray(np.asarray(_ARRAYS[path][index[0]]), mode="L")
    try:
        with Image.open(path) as im:
            im.load()
            im = im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadInput("decode_error", f"image failed to decode ({type(e).__name__}: {e})") from None
    return to_8bit(im)


def to_8bit(im: Image.Image) -> Image.Image:
    """Grey 'L' from 16-bit grey (``I;16``, ``I;16B`` ...) or integer ``I`` pixels in 0..65535; other modes
    unchanged.

    ``convert("L")`` clips such pixels at 255 (a 16-bit gradient comes out 96 % white). The high byte is kept
    instead, as libpng's ``strip_16`` does and as PIL itself reads 16-bit RGB(A) PNGs (as 8-bit 'RGB(A)'),
    so grey and colour 16-bit files are scaled alike."""
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    x = np.asarray(im).astype(np.int64)
    if x.size and (x.min() < 0 or x.max() > 65535):  # a 32-bit 'I' image: no safe scale to guess
        raise BadInput(
            "unsupported_format",
            f"32-bit integer pixels in [{x.min()}, {x.max()}], beyond 16 bits; save the image with 8 or 16 "
            "bits per channel",
        )
    return Image.fromarray((x >> 8).astype(np.uint8))


GREY_MODES = ("L", "1", "I;16", "I", "F")


def grey_or_rgb(im: Image.Image) -> Image.Image:
    """Grey modes as 'L', anything else as 'RGB' (alpha dropped, palettes expanded)."""
    return im.convert("L") if im.mode in GREY_MODES else im.convert("RGB")


def resize_image(im: Image.Image, size: int) -> Image.Image:
    """Grey stays 'L', anything else becomes 'RGB'; shorter side to ``size`` (bicubic), centre crop."""
    im = grey_or_rgb(im)
    w, h = im.size
    if (w, h) == (size, size):
        return im
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def resize_like(im: Image.Image, prep: dict[str, Any]) -> Image.Image:
    """``im`` as the shards of manifest entry ``prep`` store it ('L' or 'RGB', ``image_size`` square): the
    image processor's resize and crop when ``prep`` has ``resize_to`` (shards made like an HF folder), else
    d2v's own (``resize_image``: old manifests and shards without ``preprocess_like``)."""
    if "resize_to" not in prep:
        return resize_image(im, prep["image_size"])
    a = np.array(grey_or_rgb(im))  # grey: one channel, resized as each of the RGB copies the processor makes
    x_CHW = torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1)
    x_CHW = processor_resize(
        x_CHW, size_from_json(prep["resize_to"]), prep["resample"], size_from_json(prep["center_crop"])
    )
    out = x_CHW.permute(1, 2, 0).numpy()
    return Image.fromarray(out[..., 0] if out.shape[-1] == 1 else np.ascontiguousarray(out))


def encode_image(im: Image.Image, size: int, like: dict[str, Any] | None = None) -> Encoded:
    """One PNG sample of ``im``: resized to ``size`` by d2v's rule, or as the ``preprocessing`` entry
    ``like`` says (``resize_like``)."""
    im = resize_like(im, like if like is not None else {"image_size": size})
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    x = np.asarray(im, dtype=np.float64) / 255.0
    x = np.repeat(x[..., None], 3, axis=-1) if x.ndim == 2 else x
    stats = {
        "images": 1,
        "pixels": float(x.shape[0] * x.shape[1]),
        "sum": x.sum(axis=(0, 1)).tolist(),
        "sumsq": (x * x).sum(axis=(0, 1)).tolist(),
    }
    return Encoded({"png": buf.getvalue()}, stats)


def encode(item: Item, ctx: Context) -> list[Encoded]:
    return [encode_image(load_image(item.ref), ctx.image_size, ctx.like)]


pack = unpacked  # an image is one sample


def preprocessing(ctx: Context, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Size and per-channel mean/std (of the pretrain split, else train) for the loader and ``embed``; with
    ``preprocess_like``, exactly what the folder dictates (``like_preprocessing``: no data statistics)."""
    if ctx.like is not None:
        return dict(ctx.like)
    name = "pretrain" if stats.get("pretrain", {}).get("images") else "train"
    s = stats.get(name, {})
    n = s.get("pixels", 0.0)
    if n:
        mean = [v / n for v in s["sum"]]
        std = [math.sqrt(max(q / n - m * m, 1e-12)) for q, m in zip(s["sumsq"], mean)]
    else:
        mean, std = [0.5] * 3, [0.5] * 3
    return {
        "image_size": ctx.image_size,
        "channels": 3,
        "mean": [round(v, 6) for v in mean],
        "std": [round(v, 6) for v in std],
        "stats_from": name,
        "resize": "shorter side to image_size (bicubic), centre crop; grey repeated to 3 channels",
    }


# ------------------------------------------------------------------------ a published model's preprocessing

PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_TYPES = ("BeitImageProcessor", "BeitImageProcessorFast", "BeitFeatureExtractor")
"""What transformers saves for Data2VecVision (``BeitFeatureExtractor``: before transformers 4.26; its PIL
backend saves itself as ``BeitImageProcessor`` too, and transformers 5 loads that as the torchvision one)."""
PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 3, "do_center_crop": False,
    "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}  # fmt: skip
"""transformers 5's ``BeitImageProcessor`` class defaults: what it uses for a key the file omits."""
INTERPOLATION = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
"""PIL resample codes -> the torchvision modes transformers maps them to (``pil_torch_interpolation_mapping``)."""
CHANNELS = 3
"""Batches are RGB (grey repeated), so a model whose preprocessing shards take has 3 input channels."""
SAVE_HINT = (
    "transformers.AutoImageProcessor.from_pretrained('<the model, e.g. facebook/data2vec-vision-base>')"
    ".save_pretrained('{folder}')"
)


@dataclass(frozen=True)
class ProcessorSpec:
    """What transformers' BEiT image processor does to an image (its ``preprocessor_config.json``, as
    transformers 5's ``BeitImageProcessor`` with its torchvision backend reads it)."""

    size: tuple[int, int] | int | None
    """(height, width), or an int: the shorter side (aspect kept); None: no resize."""
    resample: str
    """torchvision interpolation mode (antialiased, as transformers calls it)."""
    crop: tuple[int, int] | None
    """Centre crop (height, width), transformers' rounding and zero padding; None: no crop."""
    rescale: float | None
    """Pixel scale (1/255); None: none."""
    mean: tuple[float, ...] | None
    """Per-channel mean and std after rescaling; None: no normalisation."""
    std: tuple[float, ...] | None


def _hw(v: Any, key: str, where: Path) -> tuple[int, int] | int:
    """A processor size: {"height", "width"} or an int (square) -> (h, w); {"shortest_edge"} -> int."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, dict) and set(v) >= {"height", "width"}:
        return (int(v["height"]), int(v["width"]))
    if isinstance(v, dict) and set(v) == {"shortest_edge"} and key == "size":
        return int(v["shortest_edge"])
    raise ValueError(
        f"{where}: {key} {v!r} is not supported; expected an int, {{'height', 'width'}} or (size only) "
        "{'shortest_edge'}"
    )


def _per_channel(x: float | Sequence[float], channels: int) -> tuple[float, ...]:
    """A processor's image_mean / image_std: one value for every channel, or one per channel."""
    return (float(x),) * channels if isinstance(x, (int, float)) else tuple(float(c) for c in x)


def read_image_processor(f: Path, channels: int = CHANNELS) -> ProcessorSpec:
    """The settings of a Data2VecVision ``preprocessor_config.json`` ``f`` (``BeitImageProcessor``) for a
    model of ``channels`` input channels; ValueError naming the file, the setting and what d2v supports."""
    d = published.read_settings(f, "processor")
    kind = d.get("image_processor_type", d.get("feature_extractor_type"))
    if kind is not None and kind not in PROCESSOR_TYPES:
        raise ValueError(
            f"{f}: a {kind}; d2v reads the image processors of Data2VecVision, {PROCESSOR_TYPES}"
        )
    v = {**PROCESSOR_DEFAULTS, **{k: x for k, x in d.items() if x is not None}}
    resample = v["resample"]
    if v["do_resize"] and resample not in INTERPOLATION:
        raise ValueError(
            f"{f}: resample {resample!r} is not supported; expected one of {sorted(INTERPOLATION)} "
            "(PIL nearest, bilinear, bicubic)"
        )
    mean, std = _per_channel(v["image_mean"], channels), _per_channel(v["image_std"], channels)
    if v["do_normalize"] and (len(mean) != channels or len(std) != channels):
        raise ValueError(f"{f}: image_mean and image_std need {channels} values (the model's channels)")
    if v["do_normalize"] and min(std) <= 0.0:
        raise ValueError(f"{f}: image_std {list(std)} must be > 0")
    return ProcessorSpec(
        size=_hw(v["size"], "size", f) if v["do_resize"] else None,
        resample=INTERPOLATION.get(resample, "bicubic"),
        crop=_hw(v["crop_size"], "crop_size", f) if v["do_center_crop"] else None,  # (h, w): never an int
        rescale=float(v["rescale_factor"]) if v["do_rescale"] else None,
        mean=mean if v["do_normalize"] else None,
        std=std if v["do_normalize"] else None,
    )


def resize_shape(hw: Sequence[int], size: tuple[int, int] | int) -> tuple[int, int]:
    """Output (height, width): ``size`` itself, or an int for the shorter side with the longer one scaled
    and truncated (transformers ``get_resize_output_image_size(default_to_square=False)``)."""
    if isinstance(size, tuple):
        return size
    h, w = int(hw[0]), int(hw[1])
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(x_CHW: Tensor, hw: tuple[int, int], mode: str) -> Tensor:
    """uint8 [C, H, W] -> uint8 [C, h, w]: torchvision's antialiased resize, the call transformers makes."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    return tvF.resize(x_CHW, list(hw), interpolation=InterpolationMode(mode), antialias=True)


def center_crop(x_CHW: Tensor, h: int, w: int) -> Tensor:
    """The centre h x w (top/left = int((H - h) / 2), as transformers); zero-padded first if smaller."""
    H, W = x_CHW.shape[-2:]
    if h > H or w > W:
        dh, dw = max(h - H, 0), max(w - W, 0)
        x_CHW = F.pad(x_CHW, (dw // 2, (dw + 1) // 2, dh // 2, (dh + 1) // 2))
        H, W = x_CHW.shape[-2:]
    top, left = int((H - h) / 2.0), int((W - w) / 2.0)
    return x_CHW[..., top : top + h, left : left + w]


def processor_resize(
    x_CHW: Tensor, size: tuple[int, int] | int | None, resample: str, crop: tuple[int, int] | None
) -> Tensor:
    """uint8 [C, H, W] -> uint8 [C, h, w]: the processor's resize (to (h, w), or the shorter side to an
    int), then its centre crop; the uint8 pixels its rescale and normalisation then read."""
    if size is not None:
        x_CHW = resize(x_CHW, resize_shape(x_CHW.shape[-2:], size), resample)
    if crop is not None:
        x_CHW = center_crop(x_CHW, *crop)
    return x_CHW


def size_to_json(v: tuple[int, int] | int | None) -> dict[str, int] | None:
    """A processor size as the manifest keeps it (transformers' own spelling)."""
    if v is None:
        return None
    return {"height": v[0], "width": v[1]} if isinstance(v, tuple) else {"shortest_edge": v}


def size_from_json(v: dict[str, int] | None) -> tuple[int, int] | int | None:
    """Inverse of ``size_to_json``."""
    if v is None:
        return None
    return (int(v["height"]), int(v["width"])) if "height" in v else int(v["shortest_edge"])


def processor_preprocessing(spec: ProcessorSpec, f: Path) -> dict[str, Any]:
    """The manifest ``preprocessing`` entry of shards made with processor ``spec`` (read from ``f``): its
    square output size, resize and crop, and its rescale + mean/std folded into the loader's
    ``(x / 255 - mean) / std``; ValueError naming ``f`` when the images it makes differ in shape or are not
    square (shards and the ViT take one square size)."""
    out = spec.crop if spec.crop is not None else spec.size
    if not isinstance(out, tuple):
        how = "do_resize false" if spec.size is None else f"size {{'shortest_edge': {spec.size}}}"
        raise ValueError(
            f"{f}: {how} without do_center_crop gives each image its own shape, but shards hold "
            "image_size x image_size images: set do_center_crop: true with a square crop_size"
        )
    if out[0] != out[1]:
        raise ValueError(
            f"{f}: makes {out[0]} x {out[1]} (height x width) images; d2v image shards and models are square: "
            f"make {'crop_size' if spec.crop is not None else 'size'} square"
        )
    # (x * rescale - m) / s == (x / 255 - m / k) / (s / k) with k = 255 * rescale (1 for the usual 1/255)
    k = 255.0 * spec.rescale if spec.rescale is not None else 255.0
    k = 1.0 if math.isclose(k, 1.0, rel_tol=1e-9) else k
    mean = spec.mean if spec.mean is not None else (0.0,) * CHANNELS
    std = spec.std if spec.std is not None else (1.0,) * CHANNELS
    steps = []
    if isinstance(spec.size, tuple):
        steps.append(f"straight to {spec.size[0]}x{spec.size[1]} ({spec.resample}, antialiased)")
    elif spec.size is not None:
        steps.append(f"shorter side to {spec.size} ({spec.resample}, antialiased)")
    if spec.crop is not None:
        steps.append(f"centre crop {spec.crop[0]}x{spec.crop[1]}")
    return {
        "image_size": out[0],
        "channels": CHANNELS,
        "mean": [m / k for m in mean],
        "std": [s / k for s in std],
        "resize": ", ".join(steps) + "; grey repeated to 3 channels (transformers' BeitImageProcessor)",
        "resize_to": size_to_json(spec.size),
        "resample": spec.resample if spec.size is not None else None,
        "center_crop": size_to_json(spec.crop),
    }


def _side(v: Any, key: str, where: Path) -> int:
    """A config.json size (an int or a square [h, w]) as an int; ValueError naming the file otherwise."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: {key} {v!r} is not supported; d2v takes square images (an int)")
    return v


def _check_patch_grid(size: Any, patch: Any, out: int, where: str, key: str) -> None:
    """ValueError unless the model's ``image_size`` is ``out`` and a whole number of ``patch`` px patches."""
    if size is None or patch is None or (size == out and size % patch == 0):
        return
    todo = (
        "use a model whose image_size is a multiple of its patch_size"
        if size % patch
        else f"use a folder whose config.json image_size is its processor's output size ({out})"
    )
    raise ValueError(
        f"{key}: {where}: an image model whose patch grid does not fit the shards' image size: a "
        f"{size / patch:g} x {size / patch:g} grid of {patch} px patches (image_size {size}) for {out} px images; "
        f"{todo}"
    )


def _recorded_preprocessing(src: published.Source, key: str) -> dict[str, Any]:
    """The image ``preprocessing`` entry a d2v checkpoint's meta.json records, checked; ValueError naming
    the file when it lacks one the loader can use."""
    prep, meta = src.config.get("preprocessing"), src.path / "meta.json"
    ok = (
        isinstance(prep, dict)
        and isinstance(prep.get("image_size"), int)
        and all(isinstance(prep.get(k), list) and len(prep[k]) == CHANNELS for k in ("mean", "std"))
    )
    if ok and "resize_to" in prep:
        try:  # the recipe ``resize_like`` reads back
            for k in ("resize_to", "center_crop"):
                size_from_json(prep.get(k))
            ok = prep["resize_to"] is None or prep.get("resample") in INTERPOLATION.values()
        except (KeyError, TypeError, ValueError):
            ok = False
    if not ok:
        raise ValueError(
            f"{key}: {meta} records no usable image preprocessing (image_size, mean, std of its shards); "
            "use a checkpoint written by `d2v pretrain image` or `d2v finetune image`, or a Hugging Face "
            "data2vec-vision folder"
        )
    return json.loads(json.dumps(prep))  # a JSON copy: equal to what a manifest reads back


def like_preprocessing(src: published.Source, key: str = LIKE_KEY) -> dict[str, Any]:
    """The manifest ``preprocessing`` entry of shards made like the model folder ``src``
    (``shard.image.preprocess_like``): what ``preprocessing`` writes for them, from the folder alone.

    A Hugging Face folder: its ``preprocessor_config.json`` (``processor_preprocessing``: output size,
    resize, crop, mean/std); its config.json must have that image size and a whole patch grid. A d2v
    checkpoint: the entry of the shards it was trained on, as meta.json records it. ValueError naming
    ``key``, the file and what to do.
    """
    if src.kind == "d2v":
        prep = _recorded_preprocessing(src, key)
        model = src.config.get("model_config") or {}
        where = f"{src.path / 'meta.json'} model_config"
        _check_patch_grid(model.get("image_size"), model.get("patch_size"), prep["image_size"], where, key)
        return prep
    f, cfg_file = src.path / PROCESSOR_FILE, src.path / "config.json"
    if not f.is_file():
        raise ValueError(
            f"{key}: {src.path} has no {PROCESSOR_FILE}, which says how the model's images were resized and "
            f"normalised; save it into the folder: {SAVE_HINT.format(folder=src.path)}"
        )
    try:
        prep = processor_preprocessing(read_image_processor(f, CHANNELS), f)
        channels = src.config.get("num_channels", CHANNELS)
        if channels != CHANNELS:
            raise ValueError(f"{cfg_file}: num_channels {channels!r}; d2v image batches are RGB (3 channels)")
        size = _side(src.config.get("image_size", 224), "image_size", cfg_file)  # transformers' defaults
        patch = _side(src.config.get("patch_size", 16), "patch_size", cfg_file)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    _check_patch_grid(size, patch, prep["image_size"], str(cfg_file), key)
    return prep


# --------------------------------------------------------------------------------------------------- load


def check_model(prep: dict[str, Any], model_cfg: Any) -> None:
    size = getattr(model_cfg, "image_size", prep["image_size"])
    if size != prep["image_size"]:
        raise ValueError(
            f"the shards hold {prep['image_size']} px images but model.image.image_size is {size}: set "
            f"shard.image.image_size: {size} and re-run `d2v shard image` (or change the model)"
        )


def decode(sample: dict[str, bytes]) -> Tensor:
    """uint8 [C, H, W] (C = 1 or 3) from the ``png`` field, in PIL's channels-last memory (no copy): the
    crop's uint8 resize runs fastest on it, and ``collate`` stacks any layout."""
    with Image.open(io.BytesIO(sample["png"])) as im:
        x = np.array(im.convert("L") if im.mode == "L" else im.convert("RGB"))
    return torch.from_numpy(x[..., None] if x.ndim == 2 else x).permute(2, 0, 1)


def random_resized_crop(x_CHW: Tensor, rng: random.Random, scale: tuple[float, float] = CROP_SCALE) -> Tensor:
    """BEiT/torchvision-style random-resized crop back to the same size (aspect ratio in [3/4, 4/3]):
    uint8 [C, H, W] -> uint8 [C, H, W]."""
    C, H, W = x_CHW.shape
    box = (0, 0, H, W)
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= W and 0 < h <= H:
            top, left = rng.randint(0, H - h), rng.randint(0, W - w)
            box = (top, left, h, w)
            break
    top, left, h, w = box
    crop = x_CHW[None, :, top : top + h, left : left + w]
    # uint8 in, uint8 out (rounded, as torchvision's crop of a PIL or uint8 image): torch's uint8 antialiased
    # bilinear kernel on channels-last input is much faster than the float one, which the GPU's data workers
    # need (benchmarks/RESULTS.md)
    return F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False, antialias=True)[0]


def transform(
    x: Tensor,
    *,
    mode: str,
    max_len: int | None,
    rng: random.Random,
    augment: bool,
    prep: dict[str, Any],
    model_cfg: Any,
    target: str | None = None,
) -> Tensor:
    """uint8 [C, H, W]; with ``augment``: random-resized crop and horizontal flip (p 0.5), the same view
    for student and teacher ([P1] §4.1, [DV] ``datasets.py``). ``collate`` converts and normalises."""
    if augment:
        x = random_resized_crop(x, rng)
        if rng.random() < 0.5:
            x = x.flip(-1)
    return x


def length(x: Tensor) -> int:
    return int(x.shape[-1] * x.shape[-2])


def collate(
    xs: list[Tensor], *, mode: str, model_cfg: Any, prep: dict[str, Any], generator: torch.Generator
) -> dict[str, Tensor]:
    """uint8 [C, H, W] images -> ``inputs`` [B, 3, H, W] float32, ``(x / 255 - mean) / std``; pretrain:
    ``mask`` [B, h*w] from the modality's ``make_mask``."""
    x = torch.stack([v.expand(3, -1, -1) if v.shape[0] == 1 else v for v in xs]).float()
    shift = torch.tensor([255.0 * m for m in prep["mean"]]).view(1, 3, 1, 1)
    scale = torch.tensor([1.0 / (255.0 * s) for s in prep["std"]]).view(1, 3, 1, 1)
    # in place, two passes over the batch (the workers' largest cost after decoding at 224 px)
    batch = {"inputs": x.sub_(shift).mul_(scale)}
    if mode == "pretrain":  # training only: the data stages never load the masking code (nor the model)
        from d2v.data2vec2 import keep_indices
        from d2v.modalities.image.masking import make_mask

        batch["mask"] = make_mask(len(xs), model_cfg, generator)
        if model_cfg.algorithm == "data2vec2":  # the kept patches' indices, read here on the CPU
            batch["keep"] = keep_indices(batch["mask"])
    return batch


def to_pixels(a: np.ndarray) -> np.ndarray:
    """uint8 HxW or HxWxC (C = 3, 4) pixels of an image array: integers in 0..255 as they are, floats in
    [0, 1] times 255, rounded (what a PNG of them holds); ValueError naming the problem otherwise."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or a.size == 0:
        hint = " (channels first? pass x.permute(1, 2, 0))" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise ValueError(
            f"an image array must be HxW or HxWxC with C = 1, 3 or 4 (channels last), got shape "
            f"{tuple(a.shape)}{hint}"
        )
    if a.dtype != np.bool_ and np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"an integer image must hold 0..255, got [{a.min()}, {a.max()}]")
        return np.ascontiguousarray(a, dtype=np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise ValueError(
                f"a float image must hold values in [0, 1] (pass uint8 for 0..255), got "
                f"[{a.min()}, {a.max()}]"
            )
        return np.ascontiguousarray(np.round(a.astype(np.float64) * 255.0), dtype=np.uint8)
    raise ValueError(f"an image array must be uint8 (0..255) or float (0..1), got dtype {a.dtype}")


def to_image(item: Any) -> Image.Image:
    """One ``embed`` item as a PIL image.

    Accepted: a file path (``str`` or ``Path``: any format PIL reads); a PIL image; an HxW (grey) or HxWxC
    (C = 1, 3, 4: grey, RGB, RGBA; channels last) numpy array or torch tensor holding uint8 0..255 (or
    any integer type in that range) or floats in [0, 1]. A file, its PIL image and its pixel array give the
    same image.
    """
    if isinstance(item, (str, Path)):
        path = item_file(item, "image file")
        try:
            return load_image(("file", str(path)))
        except BadInput as e:
            raise ValueError(f"{path}: {e.reason}") from None
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        return Image.fromarray(to_pixels(item))
    raise ValueError(
        f"an image item is a file path, a PIL image, or an HxW / HxWxC array or tensor; got "
        f"{type(item).__name__}"
    )


def inference_inputs(items: list[Any], prep: dict[str, Any], shard_dir: Path | None = None) -> list[Tensor]:
    """uint8 [C, H, W] images for ``embed`` (items as ``to_image`` reads them), preprocessed exactly as at
    shard time (``resize_like``: the manifest's resize + centre crop), then the PNG round trip (feed them
    to ``collate``)."""
    out = []
    for item in items:
        buf = io.BytesIO()
        resize_like(to_image(item), prep).save(buf, format="PNG")
        out.append(decode({"png": buf.getvalue()}))
    return out
