"""The ``prepare`` and ``shard`` stages (``d2v prepare <m>``, ``d2v shard <m>``; same names in dvc.yaml).

``prepare`` materialises a modality's raw data under ``<paths.raw>/<m>/``: the embedded default data
(synthesised or extracted from Debian/PyPI packages) or a copy of the user's files, in one layout per
modality that ``shard`` reads (see the modality's ``data.py``), plus ``prepare.json`` (what was made).
``shard`` turns that folder into ``<paths.shards>/<m>/*.tar`` + ``manifest.json`` (``d2v.data.shards``);
``d2v shard <m> --to URL`` publishes that folder to object storage, where the training stages read it when
``paths.shards`` is that URL.

Both write into a temporary folder and rename it into place at the end.
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from d2v.config import PathsConfig, section, to_dict
from d2v.data.remote import is_url, shard_location
from d2v.data.shards import files_under, publish_shards, staging_dir, write_json, write_shards
from d2v.modalities import MODALITIES


def data_module(modality: str) -> ModuleType:
    """``d2v.modalities.<modality>.data``: the modality's readers, encoders and collate."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {list(MODALITIES)}")
    return importlib.import_module(f"d2v.modalities.{modality}.data")


@dataclass(frozen=True)
class PrepareCommon:
    """Prepare params every modality has (each modality's ``PrepareConfig`` adds its own)."""

    source: str = "default"
    """'default': the embedded data (docs/datasets.md); else a path to the user's folder (or file) of inputs."""

    def source_path(self, what: str) -> Path:
        """The user source as an existing path; ValueError saying what was expected otherwise."""
        path = Path(self.source).expanduser()
        if not path.exists():
            raise ValueError(f"prepare.source: {self.source!r} does not exist (expected 'default' or {what})")
        return path


def copy_source(src: Path, dst: Path, exclude: tuple[Path, ...] = ()) -> int:
    """Copy a user's file or folder tree to ``dst`` (sorted, hidden files skipped); returns files copied.

    Bytes are copied unchanged: decoding, validation and skipping happen in ``shard`` so that every
    skipped input is counted in its manifest.
    """
    src = Path(src)
    excluded = {p.resolve() for p in exclude}
    dst.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        shutil.copyfile(src, dst / src.name)
        return 1
    n = 0
    for path in files_under(src):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.resolve() in excluded:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        n += 1
    return n


def prepare_raw(modality: str, cfg: Any, raw_dir: Path, seed: int) -> dict[str, Any]:
    """Run ``prepare`` for ``modality`` into ``raw_dir`` (atomically); returns ``prepare.json``'s content."""
    data = data_module(modality)
    raw_dir = Path(raw_dir)
    with staging_dir(raw_dir) as tmp:
        summary = data.prepare(cfg, tmp, seed)
        info = {"modality": modality, "seed": seed, "params": to_dict(cfg), **summary}
        write_json(tmp / "prepare.json", info)
    return info


def shard(modality: str, cfg: Any, raw_dir: Path, shard_dir: Path, seed: int) -> dict[str, Any]:
    """Run ``shard`` for ``modality``: ``raw_dir`` -> ``shard_dir`` (atomically); returns the manifest."""
    return write_shards(data_module(modality), raw_dir, shard_dir, cfg, seed, modality)


def _seed(params: dict[str, Any]) -> int:
    seed = params.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    return seed


def cli_prepare(params: dict[str, Any], args: Any) -> int:
    m = args.modality
    cfg = section(params, "prepare", data_module(m).PrepareConfig, m)
    paths = section(params, "paths", PathsConfig)
    info = prepare_raw(m, cfg, Path(paths.raw) / m, _seed(params))
    print(f"prepare {m}: {Path(paths.raw) / m} ({info.get('counts', {})})")
    return 0


def like_init(cfg: Any, params: dict[str, Any], modality: str) -> Any:
    """``cfg`` with ``preprocess_like`` set to ``pretrain.<m>.init`` when that is set and it is not: shards
    for a run that starts from a published model are made as that model expects by default."""
    init = ((params.get("pretrain") or {}).get(modality) or {}).get("init")
    if cfg.preprocess_like is not None or init is None:
        return cfg
    return replace(cfg, preprocess_like=str(init))


def cli_publish(m: str, paths: PathsConfig, to: str) -> int:
    """``d2v shard <m> --to URL``: upload ``<paths.shards>/<m>`` (made by ``d2v shard <m>``) to ``URL/<m>``."""
    if not is_url(to):
        raise ValueError(
            f"--to {to!r}: expected a URL such as s3://bucket/prefix (for a folder, set paths.shards)"
        )
    if is_url(paths.shards):
        raise ValueError(
            f"paths.shards is a URL ({paths.shards}): --to publishes a local shard folder; run it with "
            "paths.shards set to the folder `d2v shard` wrote"
        )
    src, dst = shard_location(paths.shards, m), str(shard_location(to, m))
    names = publish_shards(src, dst)
    print(f"shard {m}: published {src} -> {dst} ({len(names)} files, manifest.json last); "
          f"read it with paths.shards: {to}")  # fmt: skip
    return 0


def cli_shard(params: dict[str, Any], args: Any) -> int:
    m = args.modality
    cfg = like_init(section(params, "shard", data_module(m).ShardConfig, m), params, m)
    paths = section(params, "paths", PathsConfig)
    if getattr(args, "to", None):
        return cli_publish(m, paths, args.to)
    if is_url(paths.shards):
        raise ValueError(
            f"paths.shards is a URL ({paths.shards}): `d2v shard` writes a local folder; set paths.shards to "
            f"a folder to write the shards, then publish them with `d2v shard {m} --to {paths.shards}`"
        )
    shard_dir = shard_location(paths.shards, m)
    manifest = shard(m, cfg, Path(paths.raw) / m, shard_dir, _seed(params))
    counts = {s: e["samples"] for s, e in manifest["splits"].items()}
    print(f"shard {m}: {shard_dir} {counts}; skipped {manifest['skipped_counts'] or 0}")
    return 0
