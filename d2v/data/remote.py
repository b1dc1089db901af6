"""Where shards live: a local folder or an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``az://...``).

A location is a ``Path`` (a folder, handled exactly as before URLs were accepted) or a ``str`` URL. A URL is
never made a ``Path``: ``Path("s3://b/p")`` collapses the ``//`` into ``s3:/b/p``, so :func:`join` and
:func:`shard_location` keep URLs as strings.

Bytes are read through one filesystem object per process and scheme (:func:`filesystem`), made on first
use in the process that reads: s3fs is not fork-safe (its event loop and connection pool belong to the
process that made them), so DataLoader workers carry URL strings and open their own. The store and its
credentials come from the usual variables (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``
...); d2v has no setting of its own. S3 needs s3fs: ``pip install 'd2v[s3]'``.

This module only moves bytes; what they must be (sha256, sizes, sample counts) is checked by
:mod:`d2v.data.shards`.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Any

import fsspec

Location = Path | str
"""A local shard folder (``Path``) or a URL (``str``)."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
"""``scheme://`` at the start of a string."""


def is_url(loc: Location) -> bool:
    """True for a URL string (``s3://b/p``); False for a ``Path`` and for a plain folder name."""
    return isinstance(loc, str) and bool(_URL.match(loc))


def location(loc: str | Path) -> Location:
    """``loc`` as the data code takes it: a URL stays a ``str``, anything else becomes a ``Path``."""
    return loc if is_url(loc) else Path(loc)


def join(loc: Location, name: str) -> Location:
    """``<loc>/<name>``: ``Path / name`` for a folder (as before); one ``/`` between them for a URL."""
    if is_url(loc):
        return f"{str(loc).rstrip('/')}/{name}"
    return Path(loc) / name


def shard_location(root: str | Path, modality: str, base: Path | None = None) -> Location:
    """The shard location of ``modality``: ``<paths.shards>/<m>``.

    A folder gives ``Path(root) / modality`` (relative to ``base`` when given: a project folder); a URL gives
    ``root/modality`` with its ``//`` intact.
    """
    root = location(root)
    if base is not None and not is_url(root):
        root = Path(base) / root
    return join(root, modality)


def name_of(loc: Location) -> str:
    """The last component: a shard's file name (``pretrain-000000.tar``) or the modality of a shard folder."""
    return posixpath.basename(str(loc).rstrip("/")) if is_url(loc) else Path(loc).name


def parent_of(loc: Location) -> Location:
    """``loc`` without its last component (a shard folder's root: what ``paths.shards`` says)."""
    return str(loc).rstrip("/").rsplit("/", 1)[0] if is_url(loc) else Path(loc).parent


_FS: dict[tuple[int, str], Any] = {}
"""(process id, scheme) -> the filesystem object that process made. The pid in the key is what makes a
forked worker open its own instead of using the parent's."""


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem of this process, path inside it)`` for ``url``.

    ``skip_instance_cache``: fsspec's own instance cache is per process too, but a fresh object per process
    here does not depend on that. ValueError naming the URL and the package to install when the scheme's
    fsspec implementation is missing (s3fs for ``s3://``).
    """
    scheme = url.split("://", 1)[0]
    key = (os.getpid(), scheme)
    fs = _FS.get(key)
    if fs is None:
        try:
            fs = fsspec.filesystem(scheme, skip_instance_cache=True)
        except (ImportError, ValueError) as e:
            extra = " (for S3: pip install 'd2v[s3]')" if scheme == "s3" else ""
            raise ValueError(f"{url}: cannot open {scheme}:// URLs: {e}{extra}") from None
        _FS[key] = fs
    return fs, fs._strip_protocol(url)


def read_bytes(url: str) -> bytes:
    """The whole object at ``url`` (FileNotFoundError when there is none)."""
    fs, path = filesystem(url)
    return fs.cat_file(path)


def list_sizes(url: str) -> dict[str, int]:
    """``{name: bytes}`` of the objects directly under ``url`` ({} when there are none): one listing.

    The filesystem's listing cache is dropped first, so each call sees the store as it is now.
    """
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e["size"]) for e in entries if e["type"] == "file"}


def upload(local: Path, url: str) -> None:
    """Copy the local file ``local`` to the object ``url`` (replacing it)."""
    fs, path = filesystem(url)
    fs.put_file(str(local), path)
