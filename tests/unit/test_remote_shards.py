"""Shards read from object storage: ``paths.shards: s3://bucket/prefix`` against a real S3-compatible server.

A moto ``ThreadedMotoServer`` on 127.0.0.1 (``s3_server``, tests/conftest.py) serves the module; each test
gets its own bucket, the AWS variables pointing at the server (``AWS_ENDPOINT_URL_S3``: d2v has no setting
of its own) and fresh per-process filesystem memos. The shards are the shard stage's own (a tiny image project with several
shards per split), built once.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from test_resume import write_params

from d2v import checkpoint
from d2v.cli import main
from d2v.data import LoaderSpec, ShardError, build_loader, read_manifest, remote, shards
from d2v.data.remote import is_url, join, name_of, parent_of, shard_location
from d2v.modalities import get

s3fs = pytest.importorskip("s3fs", reason="pip install -e '.[test]' (s3fs, moto[server])")


@dataclass
class Store:
    fs: s3fs.S3FileSystem
    url: str
    """``s3://<a bucket of this test's own>``."""

    def key(self, url: str) -> str:
        return url.removeprefix("s3://")


@pytest.fixture
def store(s3_server, monkeypatch) -> Store:
    s3_server.apply(monkeypatch)
    monkeypatch.setattr(remote, "_FS", {})  # no filesystem made for another test's server or bucket
    monkeypatch.setattr(shards, "_FETCHED", {})
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = f"d2v-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return Store(fs, f"s3://{bucket}")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny image project: ``shards/image`` with 3 pretrain shards and 3 train shards (20 samples each at
    most)."""
    root = tmp_path_factory.mktemp("remote")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        write_params(root / "params.yaml")
        assert main(["prepare", "image"]) == 0 and main(["shard", "image"]) == 0
    manifest = read_manifest(root / "shards" / "image")
    assert (
        len(manifest["splits"]["pretrain"]["shards"]) == 3 and len(manifest["splits"]["train"]["shards"]) == 3
    )
    return root


def upload(store: Store, folder: Path) -> str:
    """Every file of ``folder`` to ``<store>/shards/image`` with plain puts (not d2v's publish); its URL."""
    url = f"{store.url}/shards/image"
    for p in sorted(folder.iterdir()):
        store.fs.put_file(str(p), store.key(f"{url}/{p.name}"))
    return url


MODEL = get("image").model_config({"preset": "tiny"})


def loader_for(shard_dir, split: str, mode: str, workers: int, budget=None, batch_size: int = 8):
    spec = LoaderSpec(
        batch_size=batch_size, mode=mode, seed=3, num_workers=workers, shuffle_buffer=16, label_budget=budget
    )  # fmt: skip
    return build_loader(shard_dir, split, MODEL, spec)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k  # the same bytes decoded the same way: exact
            else:
                assert x[k] == y[k], k


# ------------------------------------------------------------------------------------------- locations


def test_shard_location_keeps_urls_and_local_paths_as_before(tmp_path):
    assert shard_location("data/shards", "image") == Path("data/shards") / "image"
    assert shard_location("data/shards", "image", base=tmp_path) == tmp_path / "data/shards/image"
    assert shard_location("s3://b/p", "image") == "s3://b/p/image"  # Path() would make it s3:/b/p/image
    assert shard_location("s3://b/p/", "text", base=tmp_path) == "s3://b/p/text"
    assert join("gs://b/p/image", "manifest.json") == "gs://b/p/image/manifest.json"
    assert name_of("s3://b/p/image") == "image" and parent_of("s3://b/p/image") == "s3://b/p"
    assert is_url("s3://b") and not is_url(Path("s3://b")) and not is_url("data/shards")


# ----------------------------------------------------------------------------------------------- loader


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("split, mode, budget", [("pretrain", "pretrain", None), ("train", "finetune", 2)])
def test_loader_over_s3_gives_the_local_batches(project, store, workers, split, mode, budget):
    local = project / "shards" / "image"
    url = upload(store, local)
    want = list(loader_for(local, split, mode, workers, budget))
    got_loader = loader_for(url, split, mode, workers, budget)
    # what the workers get: URL strings and the manifest's sha256, never a filesystem object of this process
    spec = got_loader.stream.spec
    assert all(isinstance(p, str) and p.startswith(f"{url}/{split}-") for p, _ in spec["shards"])
    assert set(spec["sha256"]) >= {p for p, _ in spec["shards"]}
    assert not any(type(v).__module__.startswith(("fsspec", "s3fs")) for v in spec.values())
    assert_same_batches(want, list(got_loader))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_byte_flipped_shard_fails_by_url_and_yields_no_batch(project, store, workers, monkeypatch):
    url = upload(store, project / "shards" / "image")
    bad = f"{url}/train-000001.tar"  # samples train-0000020 .. train-0000039
    data = bytearray(store.fs.cat_file(store.key(bad)))
    data[700] ^= 0x01  # inside the first member's payload: the tar itself still parses
    store.fs.pipe_file(store.key(bad), bytes(data))  # same size: only the sha256 can tell

    reads = []
    real = remote.read_bytes
    monkeypatch.setattr(remote, "read_bytes", lambda u: reads.append(u) or real(u))
    seen: list[str] = []
    with pytest.raises(ShardError) as err:  # eval: no shuffle, shards in order, 5 samples a batch
        for batch in loader_for(url, "train", "eval", workers, batch_size=5):
            seen += batch["keys"]
    assert bad in str(err.value) and "sha256 differs" in str(err.value)
    assert seen and not [k for k in seen if 20 <= int(k.split("-")[1]) < 40]
    if workers == 0:  # read once more before giving up (the workers' reads are in their own processes)
        assert reads.count(bad) == 2


def test_a_shard_garbled_once_in_transit_is_read_again(monkeypatch):
    good = b"shard bytes"
    sha = hashlib.sha256(good).hexdigest()
    replies = iter([b"shard bytez", good])
    monkeypatch.setattr(remote, "read_bytes", lambda url: next(replies))
    assert shards.fetch_verified("s3://b/p/image/pretrain-000000.tar", sha) == good
    monkeypatch.setattr(remote, "read_bytes", lambda url: b"always wrong")
    with pytest.raises(
        ShardError, match=r"s3://b/p/image/pretrain-000000.tar: sha256 differs .* --to s3://b/p"
    ):
        shards.fetch_verified("s3://b/p/image/pretrain-000000.tar", sha)


@pytest.mark.parametrize("damage", ["missing", "wrong size"])
def test_a_missing_or_resized_shard_fails_before_the_first_batch(project, store, damage):
    url = upload(store, project / "shards" / "image")
    bad = f"{url}/pretrain-000002.tar"
    if damage == "missing":
        store.fs.rm_file(store.key(bad))
    else:
        store.fs.pipe_file(store.key(bad), store.fs.cat_file(store.key(bad)) + b"\0" * 512)
    with pytest.raises(ShardError) as err:
        loader_for(url, "pretrain", "pretrain", 0)  # building it lists the folder: no batch is asked for
    msg = str(err.value)
    assert msg.startswith(bad) and f"d2v shard image --to {store.url}/shards" in msg
    assert ("missing" in msg) if damage == "missing" else ("31232 bytes, manifest.json says 30720" in msg)


def test_a_damaged_side_file_and_a_missing_manifest_are_named(project, store):
    url = upload(store, project / "shards" / "image")
    store.fs.pipe_file(store.key(f"{url}/train.labels.txt"), b"9\n" * 50)
    with pytest.raises(ShardError, match=f"{url}/train.labels.txt: sha256 differs"):
        loader_for(url, "pretrain", "pretrain", 0)  # every side file is checked before a loader is made
    with pytest.raises(FileNotFoundError, match=rf"{store.url}/nowhere/image/manifest.json not found.* --to"):
        read_manifest(f"{store.url}/nowhere/image")


def test_preprocessing_files_from_a_url_are_the_checked_bytes(project, store):
    local = project / "shards" / "image"
    url = upload(store, local)
    manifest = {**read_manifest(url), "preprocessing": {"labels": "train.labels.txt", "mode": "L"}}
    assert shards.preprocessing_files(manifest, url) == {
        "train.labels.txt": (local / "train.labels.txt").read_bytes()
    }
    assert shards.preprocessing_files(manifest, local) == {"train.labels.txt": local / "train.labels.txt"}
    assert shards.manifest_sha256(url) == shards.manifest_sha256(local)


# ------------------------------------------------------------------------------------------ the CLI


def set_paths(params_file: Path, **paths: str) -> None:
    params = yaml.safe_load(params_file.read_text())
    params["paths"].update(paths)
    params_file.write_text(yaml.safe_dump(params))


def test_publish_puts_the_files_under_their_plain_names(project, store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project)
    local = project / "shards" / "image"
    timing = project / "timings" / "shard@image.json"
    before = timing.read_text()
    order: list[str] = []
    real = remote.upload
    monkeypatch.setattr(remote, "upload", lambda src, url: order.append(name_of(url)) or real(src, url))

    root = f"{store.url}/v1"
    assert main(["shard", "image", "--to", root]) == 0
    assert f"read it with paths.shards: {root}" in capsys.readouterr().out
    listed = remote.list_sizes(f"{root}/image")
    assert listed == {p.name: p.stat().st_size for p in local.iterdir()}
    for p in local.iterdir():  # byte for byte, under the same names
        assert store.fs.cat_file(store.key(f"{root}/image/{p.name}")) == p.read_bytes()
    assert order[-1] == "manifest.json" and sorted(order) == sorted(listed)
    assert timing.read_text() == before  # an upload is not the shard stage: its wall time is kept

    assert main(["shard", "image", "--to", "elsewhere/shards"]) == 2
    assert "expected a URL" in capsys.readouterr().err
    params = tmp_path / "params.yaml"
    params.write_text((project / "params.yaml").read_text())
    set_paths(params, shards=root)
    assert main(["shard", "image", "--params", str(params)]) == 2
    assert f"publish them with `d2v shard image --to {root}`" in capsys.readouterr().err


def test_pretrain_from_s3_gives_the_weights_of_the_local_folder(project, store, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "params.yaml").write_text((project / "params.yaml").read_text())
    set_paths(
        work / "params.yaml", raw=str(project / "raw"), shards=str(project / "shards"), checkpoints="local"
    )
    assert main(["shard", "image", "--to", f"{store.url}/shards"]) == 0
    assert main(["pretrain", "image"]) == 0  # 4 steps of the tiny preset, 8 images a batch
    set_paths(work / "params.yaml", shards=f"{store.url}/shards", checkpoints="s3")
    assert main(["pretrain", "image"]) == 0

    a, b = (
        checkpoint.load_weights(work / "local/pretrain/image"),
        checkpoint.load_weights(work / "s3/pretrain/image"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same batches, same ops: exact
    meta_a, meta_b = (
        checkpoint.read_meta(work / "local/pretrain/image"),
        checkpoint.read_meta(work / "s3/pretrain/image"),
    )
    assert meta_a["fingerprint"]["data"] == meta_b["fingerprint"]["data"]  # the manifest's sha256 either way
