"""Fixtures every test folder shares: tiny random Hugging Face data2vec folders, as a user downloads them.

``published(modality, folder, **config_overrides)`` writes a folder that transformers' ``from_pretrained``
loads: ``config.json`` + ``model.safetensors`` of a random ``Data2Vec{Audio,Vision,Text}Model`` at toy width
and its processor files (``preprocessor_config.json``, the RoBERTa tokenizer files, ``<mask>`` last as in
RoBERTa's). The one definition is ``benchmarks/published.py``'s ``write_published``, which also runs them
through the pipeline.

``s3_server`` is a real S3-compatible server (moto's ``ThreadedMotoServer``) on a free loopback port, one per
test run, with the AWS variables that point s3fs (and so d2v) at it.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "d2v_benchmarks_published", Path(__file__).resolve().parents[1] / "benchmarks" / "published.py"
)
_published = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_published)
write_published = _published.write_published


@pytest.fixture
def published():
    """``write_published`` (see the module docstring)."""
    return write_published



class S3Server:
    """A moto S3 server on loopback: ``endpoint`` (``http://127.0.0.1:<port>``) and ``env``, the AWS variables
    that point s3fs, and so d2v (no S3 setting of its own), at it."""

    UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")
    """Variables that would send s3fs elsewhere: left out of a child's environment, unset by ``apply``."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
        }  # fmt: skip

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process at the server for one test."""
        for k, v in self.env.items():
            monkeypatch.setenv(k, v)
        for k in self.UNSET:
            monkeypatch.delenv(k, raising=False)

    def child_env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` pointed at the server, for a child process."""
        return {**{k: v for k, v in base.items() if k not in self.UNSET}, **self.env}


@pytest.fixture(scope="session")
def s3_server():
    """An ``S3Server`` that lives as long as the test run."""
    moto_server = pytest.importorskip("moto.server", reason="pip install -e '.[test]' (s3fs, moto[server])")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(f"http://{host}:{port}")
    server.stop()
