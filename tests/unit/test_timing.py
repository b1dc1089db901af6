"""Stage wall times: the dvc.yaml names, whole files, what the report reads back."""

from __future__ import annotations

import json
import time
from pathlib import Path

from d2v import timing
from d2v.cli import main


def test_stage_names_match_dvc_yaml():
    assert timing.stage_name("pretrain", "image") == "pretrain@image"
    assert timing.stage_name("finetune", "audio", "5", 0, "scratch") == "finetune@audio-5-0-scratch"
    assert timing.stage_name("finetune", "text", "1.0", 2, "pretrained") == "finetune@text-1.0-2-pretrained"
    assert timing.stage_name("evaluate", "text", None, None, None) == "evaluate@text"
    assert timing.stage_name("report") == "report"


def test_record_and_read_back_skip_what_is_unreadable(tmp_path: Path):
    timing.record("pretrain@image", 12.345, tmp_path)
    timing.record("finetune@image-5-0-scratch", 3.0, tmp_path)
    timing.record("finetune@image-5-1-scratch", 4.0, tmp_path)
    (tmp_path / "timings/broken.json").write_text("{not json")
    assert sorted(p.name for p in (tmp_path / "timings").iterdir()) == [
        "broken.json", "finetune@image-5-0-scratch.json", "finetune@image-5-1-scratch.json", "pretrain@image.json"
    ]  # no temporary file left behind
    times = timing.read_all(tmp_path)
    assert times == {"pretrain@image": 12.3, "finetune@image-5-0-scratch": 3.0, "finetune@image-5-1-scratch": 4.0}
    assert timing.by_kind(times) == [("pretrain", 1, 12.3), ("finetune", 2, 7.0)]


def test_process_seconds_counts_from_the_process_start():
    s = timing.process_seconds()
    time.sleep(0.2)
    assert 0 < s < timing.process_seconds() - 0.15  # a clock that moves, not a constant


def test_a_failed_stage_records_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\nmodalities: [audio]\npaths: {shards: nowhere}\n")
    assert main(["evaluate", "audio"]) == 2
    assert not (tmp_path / "timings").exists()
    assert json.loads(json.dumps(timing.read_all(tmp_path))) == {}
