"""``d2v report`` against synthetic metrics files laid out like the stages write them (in ``tmp_path``)."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from d2v import report
from d2v.report import Cell, compare, make_cell, welch_ci
from d2v.report.fmt import budget_phrase
from d2v.report.stats import LOWER_IS_BETTER, MetricGroup, pay_off

SEEDS = (0, 1, 2)
# accuracy per (init, budget, seed); audio b50/scratch/s2 is deliberately absent (a missing run)
AUDIO_ACC = {
    ("pretrained", "5", 0): 0.81,
    ("pretrained", "5", 1): 0.78,
    ("pretrained", "5", 2): 0.84,
    ("scratch", "5", 0): 0.42,
    ("scratch", "5", 1): 0.47,
    ("scratch", "5", 2): 0.40,
    ("pretrained", "50", 0): 0.95,
    ("pretrained", "50", 1): 0.93,
    ("pretrained", "50", 2): 0.96,
    ("scratch", "50", 0): 0.94,
    ("scratch", "50", 1): 0.92,
}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_params(**over) -> dict:
    params = {
        "seed": 0,
        "profile": "smoke",
        "modalities": ["audio", "image", "text"],
        "paths": {"metrics": "metrics", "plots": "plots", "reports": "reports", "shards": "data/shards"},
        "tracking": {"mode": "disabled"},
        "report": {"dpi": 40},
        "sweep": {"budgets": [5, 50], "seeds": list(SEEDS), "inits": ["pretrained", "scratch"]},
        "profiles": {"smoke": {"seed": 0}},
    }
    params.update(over)
    return params


def make_fixture(root: Path) -> None:
    """audio: everything; image: one seed per arm, no curves; text: nothing at all."""
    audio = {f"evaluate/{i}/b{b}/s{s}/accuracy": v for (i, b, s), v in AUDIO_ACC.items()}
    audio |= {f"evaluate/{i}/b{b}/s{s}/macro_f1": v - 0.01 for (i, b, s), v in AUDIO_ACC.items()}
    audio |= {"ctc/pretrained/b5/s0/wer": 0.30, "ctc/scratch/b5/s0/wer": 0.71}
    audio |= {f"probe/pretrained/s{s}/accuracy": v for s, v in enumerate((0.66, 0.64, 0.67))}
    audio |= {f"probe/scratch/s{s}/accuracy": v for s, v in enumerate((0.21, 0.25, 0.22))}
    audio |= {f"probe/{i}/s{s}/layer": 3.0 for i in ("pretrained", "scratch") for s in range(3)}
    audio |= {"evaluate/seconds": 12.5, "some/unknown/key": 3.0, "note": "not a number"}
    _write(root / "metrics/audio.json", json.dumps(audio, indent=2, sort_keys=True))
    image = {"evaluate/pretrained/b5/s0/accuracy": 0.55, "evaluate/scratch/b5/s0/accuracy": 0.31}
    _write(root / "metrics/image.json", json.dumps(image))
    for m, steps in (("audio", 40), ("image", 20)):
        pre = {"pretrain/loss": 0.123, "pretrain/target_var": 0.8, "pretrain/pred_var": 0.005}
        pre |= {"pretrain/steps": steps, "pretrain/samples_per_s": 321.5, "pretrain/seconds": 60.25}
        _write(root / f"metrics/pretrain/{m}.json", json.dumps(pre))
    for run, sec in (("b5-s0-pretrained", 3.5), ("b5-s0-scratch", 4.0)):
        _write(root / f"metrics/finetune/audio/{run}.json", json.dumps({"finetune/seconds": sec}))
    rows = ["step,loss,target_var,pred_var,lr,tau"]
    rows += [
        f"{s},{2.0 / (s + 1):.5f},{0.5 + 0.01 * s:.4f},{0.2:.3f},{1e-4 * s:.6f},{0.999:.4f}"
        for s in range(10)
    ]
    _write(root / "plots/pretrain/audio.csv", "\n".join(rows) + "\n")
    conf = ["actual,predicted"] + [f"{a},{(a + (k == 0)) % 3}" for a in range(3) for k in range(4)]
    _write(root / "plots/evaluate/audio_confusion.csv", "\n".join(conf) + "\n")
    manifest = {
        "modality": "audio",
        "counts": {"pretrain": 120, "train": 30, "test": 12},
        "hours": {"pretrain": 0.25, "train": 0.02},
        "label_map": {"zero": 0, "one": 1, "two": 2},
        "shards": [{"name": "train-000000.tar", "sha256": "ab" * 32, "count": 30}],
        "skipped": [{"path": "x.ogg", "reason": "too short"}, {"path": "y.ogg", "reason": "too short"}],
    }
    _write(root / "data/shards/audio/manifest.json", json.dumps(manifest))
    lock = (
        "schema: '2.0'\nstages:\n  shard@audio:\n    cmd: d2v shard audio\n    outs:\n"
        "    - path: data/shards/audio\n      hash: md5\n      md5: 0123456789abcdef0123456789abcdef.dir\n"
        "  report:\n    cmd: d2v report\n    outs:\n    - path: reports\n      md5: ffff.dir\n"
    )
    _write(root / "dvc.lock", lock)


@pytest.fixture
def fixture_root(tmp_path: Path) -> Path:
    make_fixture(tmp_path)
    return tmp_path


def render(root: Path, params: dict | None = None) -> tuple[str, str, report.ReportFiles]:
    rep = report.build_report(params or make_params(), root)
    files = report.write_report(rep, root)
    return files.markdown.read_text(), files.html.read_text(), files


def table_row(md: str, heading: str, first_cell: str) -> list[str]:
    """Cells of the first table row starting with ``first_cell`` after the paragraph ``**heading**``."""
    section = md.split(f"**{heading}**", 1)[1]
    for line in section.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return [c.strip() for c in line.strip("|").split(" | ")]
    raise AssertionError(f"no row {first_cell!r} under {heading!r}")


def test_results_table_has_mean_std_n_and_difference_from_the_fixture(fixture_root: Path) -> None:
    md, _, _ = render(fixture_root)
    audio = md.split("### audio", 1)[1]
    for budget in ("5", "50"):
        row = table_row(audio, "accuracy", budget_phrase(budget))
        means = {}
        for col, init in ((1, "pretrained"), (2, "scratch")):
            vals = [v for (i, b, _), v in AUDIO_ACC.items() if i == init and b == budget]
            means[init] = statistics.fmean(vals)
            want = f"{100 * means[init]:.1f} ± {100 * statistics.stdev(vals):.1f} (n={len(vals)})"
            assert row[col] == want
        assert row[3] == f"{100 * (means['pretrained'] - means['scratch']):+.1f}"
    # b5: a gap of ~38 points with stds of ~3 is far outside the 95% CI; b50: ~1.5 points within noise
    assert table_row(audio, "accuracy", "5 labels/class")[-1] == "better"
    assert table_row(audio, "accuracy", "50 labels/class")[-1] == "not significant"
    # the missing run is named, not filled in
    assert "`scratch/b50/s2`" in audio
    assert "pretrained beats scratch at 5 labels/class by +" in md
    # lower-is-better metric with one seed per arm: the difference is shown, no verdict claimed
    ctc = table_row(audio, "ctc/wer", "5 transcribed clips")  # a CTC budget counts clips
    assert ctc[1:3] == ["30.0 (n=1)", "71.0 (n=1)"] and ctc[-1] == "one seed"
    # the linear probe over three probe seeds: the difference, its Welch interval and a verdict
    probe = [r for r in audio.splitlines() if r.startswith("| accuracy |")][-1].strip("|").split("|")
    probe = [c.strip() for c in probe]
    assert probe[1].startswith("65.7 ±") and probe[3] == "+43.0" and probe[-1] == "better", probe


def test_html_is_self_contained(fixture_root: Path) -> None:
    _, page, files = render(fixture_root)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.IGNORECASE)
    srcs = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert len(srcs) == len(files.figures) > 0
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(p.is_file() and p.parent == fixture_root / "plots" / "report" for p in files.figures)


def test_rerun_gives_identical_files(fixture_root: Path) -> None:
    md1, page1, files = render(fixture_root)
    pngs = {p: p.read_bytes() for p in files.figures}
    md2, page2, files2 = render(fixture_root)
    assert md1 == md2
    assert page1 == page2
    assert {p: p.read_bytes() for p in files2.figures} == pngs


def test_missing_and_broken_inputs_are_reported_not_invented(fixture_root: Path) -> None:
    (fixture_root / "metrics/image.json").write_text("{not json")
    md, _, _ = render(fixture_root)
    assert "**text**: no evaluation metrics (`metrics/text.json` is missing" in md
    assert "**image**: no evaluation metrics" in md
    assert "| `metrics/text.json` | evaluate metrics | missing |" in md
    assert re.search(r"\| `metrics/image.json` \| evaluate metrics \| unreadable \| JSONDecodeError", md)
    text_section = md.split("### text", 1)[1].split("##", 1)[0]
    assert not re.search(r"\d+\.\d", text_section)  # no numbers for a modality without metrics


def test_empty_project_renders_everything_missing(tmp_path: Path) -> None:
    md, page, files = render(tmp_path)
    assert files.figures == ()
    assert md.count("no evaluation metrics") == 3 and "No pretraining metrics found." in md
    assert "| `dvc.lock` | DVC lock file | missing |" in md
    assert "git commit | unknown" in md
    assert "<img" not in page


def test_sections_describe_data_provenance_and_run_times(fixture_root: Path) -> None:
    md, _, _ = render(fixture_root)
    assert "| skipped | 2: too short (2) |" in md
    assert "| counts | pretrain: 120, train: 30, test: 12 |" in md
    assert "| shard@audio | data/shards/audio | 0123456789abcdef0123456789abcdef.dir |" in md
    assert "ffff.dir" not in md  # the report's own previous lock entry is not provenance of this report
    assert (
        "| audio | 40 | 60.25 | 321.5 | 2 | 7.5 |" in md
    )  # run times: pretrain + sum of fine-tuning seconds
    assert "pred_var 0.005, below fairseq's collapse threshold 0.01" in md
    assert "profiles:" not in md.split("Parameters", 1)[1]  # effective values only
    assert "profile: smoke" in md


def test_stale_report_pngs_are_removed(fixture_root: Path) -> None:
    _, _, files = render(fixture_root)
    assert (fixture_root / "plots/report/confusion_audio.png") in files.figures
    (fixture_root / "plots/evaluate/audio_confusion.csv").unlink()
    render(fixture_root)
    assert not (fixture_root / "plots/report/confusion_audio.png").exists()


@pytest.mark.parametrize(
    ("p", "s", "lower", "verdict"),
    [
        ([0.8, 0.82, 0.81], [0.4, 0.42, 0.41], False, "better"),
        ([0.8, 0.82, 0.81], [0.4, 0.42, 0.41], True, "worse"),  # e.g. WER: higher is worse
        ([0.5, 0.7, 0.6], [0.55, 0.65, 0.6], False, "not significant"),
        ([0.8], [0.4], False, "one seed"),
    ],
)
def test_compare_verdicts(p: list[float], s: list[float], lower: bool, verdict: str) -> None:
    cells = {"pretrained": make_cell(dict(enumerate(p))), "scratch": make_cell(dict(enumerate(s)))}
    assert compare("5", cells, lower).verdict == verdict
    assert compare("5", {"pretrained": cells["pretrained"]}, lower).verdict == "missing"


def _group(budgets: dict[str, tuple[list[float], list[float]]], metric: str = "accuracy") -> MetricGroup:
    rows = tuple(
        compare(b, {"pretrained": make_cell(dict(enumerate(p))), "scratch": make_cell(dict(enumerate(s)))},
                metric in LOWER_IS_BETTER)
        for b, (p, s) in budgets.items()
    )  # fmt: skip
    return MetricGroup("evaluate", metric, ("pretrained", "scratch"), rows)


@pytest.mark.parametrize(
    ("smallest", "probe", "passed"),
    [
        (([0.60, 0.62, 0.61], [0.40, 0.45, 0.50]), ([0.8, 0.81, 0.79], [0.6, 0.61, 0.6]), True),
        # a significant Welch CI is not enough: +7 points against twice the larger std (2 x 5 = 10)
        (([0.57, 0.58, 0.56], [0.45, 0.50, 0.55]), ([0.8, 0.81, 0.79], [0.6, 0.61, 0.6]), False),
        # fine-tuning clears it, the probe's CI includes zero
        (([0.60, 0.62, 0.61], [0.40, 0.45, 0.50]), ([0.8, 0.7, 0.6], [0.7, 0.6, 0.8]), False),
        (([0.60], [0.40]), ([0.8, 0.81, 0.79], [0.6, 0.61, 0.6]), None),  # one seed: no verdict
    ],
)
def test_pay_off_is_the_benchmark_bar(smallest, probe, passed) -> None:
    g = _group({"5": smallest, "1.0": ([0.9, 0.9, 0.9], [0.1, 0.1, 0.1])})
    cells = {i: make_cell(dict(enumerate(v))) for i, v in zip(("pretrained", "scratch"), probe)}
    po = pay_off(g, cells)
    assert po.smallest is not None and po.smallest.budget == "5"  # the smallest budget, not the best one
    assert po.passed is passed


def test_pay_off_of_an_error_rate_counts_a_lower_wer_as_the_gain() -> None:
    g = _group({"10": ([0.20, 0.21, 0.22], [0.60, 0.62, 0.61])}, metric="wer")
    po = pay_off(g, None)
    assert po.smallest.diff == pytest.approx(0.40, abs=1e-9) and po.finetune_ok
    assert po.probe_ok is None and po.passed is None


def test_the_summary_says_per_modality_whether_pretraining_pays_off(fixture_root: Path) -> None:
    md, _, _ = render(fixture_root)
    said = dict(re.findall(r"\*\*(\w+)\*\* — does pretraining pay off\? (yes|\*\*no\*\*|undecided)", md))
    # audio: 3 seeds per arm and a probe of both encoders; image: one seed per arm, no probe
    assert said == {"audio": "yes", "image": "undecided"}


def test_welch_ci_matches_scipy_within_the_floored_df() -> None:
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.81, 0.78, 0.84, 0.80], [0.42, 0.47, 0.40]
    lo, hi = welch_ci(Cell((0, 1, 2, 3), tuple(a)), Cell((0, 1, 2), tuple(b)))
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    # flooring the Welch df can only widen the interval; tabled t values have 3 decimals (<0.1% error)
    assert lo <= ref.low + 1e-9 and hi >= ref.high - 1e-9
    assert (hi - lo) / (ref.high - ref.low) < 1.15


def test_key_parsing_is_tolerant() -> None:
    flat = {
        "evaluate/pretrained/b0.1/s3/accuracy": 0.5,
        "evaluate/scratch/b0.1/s3/accuracy": 0.25,
        "probe/scratch/s1/accuracy": 0.2,
        "evaluate/pretrained/bfoo": 1.0,  # too short: ignored
        "evaluate/pretrained/b5/s0/accuracy": "high",  # not a number: ignored
    }
    groups, probe, unused = report.parse_eval_metrics(flat)
    assert [(g.label, [r.budget for r in g.rows]) for g in groups] == [("accuracy", ["0.1"])]
    assert probe["accuracy"]["scratch"].seeds == (1,)
    assert sorted(unused) == ["evaluate/pretrained/b5/s0/accuracy", "evaluate/pretrained/bfoo"]
    assert report.budget_phrase("0.1") == "10% of the labels" and report.budget_phrase("1") == "1 label/class"
    # CTC budgets count transcribed clips, and the CTC probe's keys are one more group
    assert report.budget_phrase("330", "ctc_probe") == "330 transcribed clips"
    assert report.budget_phrase("1.0", "ctc") == "all transcribed clips"
    groups, _, _ = report.parse_eval_metrics(
        {f"ctc_probe/{i}/b330/s{s}/cer": 0.5 + s / 10 for i in ("pretrained", "scratch") for s in (0, 1)}
    )
    assert [(g.label, g.lower_is_better, g.rows[0].verdict) for g in groups] == [
        ("ctc_probe/cer", True, "not significant")
    ]


def test_bad_report_config_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"report\.dpi"):
        report.build_report(make_params(report={"dpi": 5}), ".")
    with pytest.raises(ValueError, match="unknown key"):
        report.build_report(make_params(report={"dpii": 100}), ".")


@pytest.mark.skipif(
    not Path(sys.executable).with_name("wandb").exists(), reason="needs the wandb CLI next to python"
)
def test_wandb_offline_logs_a_report_run_and_skips_publishing(
    fixture_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from d2v import tracking

    monkeypatch.chdir(fixture_root)
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(fixture_root / "wandb" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    params = make_params(tracking={"mode": "offline", "dir": "wandb"})
    rep = report.build_report(params, ".")
    files = report.write_report(rep, ".")
    try:
        notes = report.log_to_wandb(params, rep, files)
    finally:
        tracking.teardown()
    assert any("skipped, tracking.mode is offline" in n for n in notes), notes
    runs = list((fixture_root / "wandb").rglob("offline-run-*"))
    assert len(runs) == 1
    # read the offline run back (docs/mlops-stack.md: `wandb leet inspect --summary --json RUN_DIR`)
    cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(cli), "leet", "inspect", "--summary", "--json", str(runs[0])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    run = json.loads(out.stdout)
    assert run["name"] == "report" and run["exit_code"] == 0
    summary = run["summary"]
    assert {f"plots/{p.stem}" for p in files.figures} <= set(summary)
    want = statistics.fmean(v for (i, b, _), v in AUDIO_ACC.items() if (i, b) == ("pretrained", "5"))
    assert summary["report/audio/accuracy/b5/pretrained/mean"] == pytest.approx(want, rel=1e-12)
    assert summary["results"]["_type"] == "table-file"


def test_wandb_report_is_built_offline_without_saving(fixture_root: Path) -> None:
    pytest.importorskip("wandb_workspaces")
    rep = report.build_report(make_params(), fixture_root)
    wr_report = report.build_wandb_report(rep, entity="someone", project="d2v")
    assert wr_report.title == "d2v benchmark" and len(wr_report.blocks) == 6


def test_cli_report_writes_the_files_with_tracking_disabled(
    fixture_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(fixture_root)
    assert report.cli_report(make_params(), None) == 0
    out = capsys.readouterr().out
    assert "tracking.mode is disabled" in out
    assert (fixture_root / "reports/benchmark.md").is_file() and (
        fixture_root / "reports/benchmark.html"
    ).is_file()


def test_confusion_labels_take_names_from_the_manifest_label_map() -> None:
    assert report.label_names({"label_map": {"zero": 0, "one": 1}}) == {"0": "zero", "1": "one"}
    assert report.label_names({"classes": ["cat", "dog"]}) == {"0": "cat", "1": "dog"}
    assert report.label_names({"labels": {"0": "cat"}}) == {"0": "cat"}
    assert report.label_names({"label_map": {"a": "b"}}) == {} and report.label_names(None) == {}


def test_the_joint_arm_gets_a_column_the_same_bar_and_its_parameter_counts(fixture_root: Path) -> None:
    audio = json.loads((fixture_root / "metrics/audio.json").read_text())
    joint_acc = (0.60, 0.58, 0.63)
    audio |= {f"evaluate/joint/b5/s{s}/accuracy": v for s, v in zip(SEEDS, joint_acc)}
    audio |= {f"probe/joint/s{s}/accuracy": v for s, v in enumerate((0.50, 0.52, 0.49))}
    (fixture_root / "metrics/audio.json").write_text(json.dumps(audio))
    for m, stack in (("audio", 100), ("image", 100)):
        pre = json.loads((fixture_root / f"metrics/pretrain/{m}.json").read_text())
        pre |= {"pretrain/encoder_params": stack + 20, "pretrain/stack_params": stack}
        (fixture_root / f"metrics/pretrain/{m}.json").write_text(json.dumps(pre))
    joint = {"pretrain/steps": 60, "pretrain/stack_params": 100, "pretrain/updates_audio": 40,
             "pretrain/updates_image": 20, "pretrain/encoder_params_audio": 120, "pretrain/encoder_params_image": 125}
    _write(fixture_root / "metrics/pretrain/joint.json", json.dumps(joint))
    params = make_params(sweep={"budgets": [5, 50], "seeds": list(SEEDS), "inits": ["pretrained", "scratch"],
                                "joint_budgets": [5]})  # fmt: skip
    md, _, _ = render(fixture_root, params)
    said = dict(re.findall(r"\*\*(\w+)\*\* — does the joint model pay off\? (yes|\*\*no\*\*|undecided)", md))
    assert said == {"audio": "yes"}  # the same bar as pretrained; image has no joint runs
    assert "the joint model − the separate one" in md
    # the joint arm is one more column of the fine-tuning table, its mean over the seeds
    assert "| label budget | pretrained | scratch | joint |" in md and "60.3" in md
    assert "| 50 labels/class | 94.7 ± 1.5 (n=3) | 93.0 ± 1.4 (n=2) | — |" in md  # not run there: not "missing"
    section = md.split("## The joint model", 1)[1].split("\n## ", 1)[0]
    assert "200 in the separate models' stacks, 100 in the joint model's one stack (0.50 of them)" in section
    assert "| audio | 120 | 100 | 120 | 40 | 40 |" in section
    # a report without a joint arm says nothing about one
    (fixture_root / "metrics/pretrain/joint.json").unlink()
    assert "## The joint model" not in render(fixture_root)[0]


def test_the_lr_each_run_chose_on_valid_is_stated_per_arm_budget_and_seed(fixture_root: Path) -> None:
    md, _, _ = render(fixture_root)
    assert "learning rates" not in md  # no run searched: nothing to state
    for run, lr in (("b5-s0-pretrained", 2e-5), ("b5-s1-pretrained", 5e-6), ("b5-s0-scratch", 8e-5)):
        grid = {f"finetune/lr_search/{x:.3g}": 0.5 + (x == lr) * 0.1 for x in (5e-6, 2e-5, 8e-5)}
        _write(fixture_root / f"metrics/finetune/audio/{run}.json",
               json.dumps({"finetune/seconds": 1.0, "finetune/lr": lr, **grid}))  # fmt: skip
    md, _, _ = render(fixture_root)
    assert "tried each LR of its grid (5e-06, 2e-05, 8e-05)" in md
    assert "| pretrained | 5 labels/class | s0: 2e-05, s1: 5e-06 |" in md
    assert "| scratch | 5 labels/class | s0: 8e-05 |" in md


def test_a_second_labelled_task_gets_its_own_probe_table_and_sentence(fixture_root: Path) -> None:
    """text with a ``sentiment`` task beside its headline one: a table each, and the pretrained − random
    difference at the chosen layer and at embed's default features in "What this shows"."""
    tasks = {"classification": {"target": "label", "labels": ["a", "b"]},
             "sentiment": {"target": "label", "labels": ["negative", "positive"]}}  # fmt: skip
    _write(fixture_root / "data/shards/text/manifest.json", json.dumps({"modality": "text", "tasks": tasks}))
    text = {"evaluate/pretrained/b5/s0/accuracy": 0.7, "evaluate/scratch/b5/s0/accuracy": 0.4}
    for s, (pre, rnd) in enumerate(((0.80, 0.60), (0.82, 0.61), (0.81, 0.59))):
        for t, shift in (("", 0.0), ("sentiment_", -0.2)):
            text[f"probe/pretrained/s{s}/{t}accuracy"] = pre + shift
            text[f"probe/scratch/s{s}/{t}accuracy"] = rnd + shift
            text[f"probe/pretrained/s{s}/{t}embed_accuracy"] = pre + shift - 0.05
            text[f"probe/scratch/s{s}/{t}embed_accuracy"] = rnd + shift
            text[f"probe/pretrained/s{s}/{t}first_layer1_accuracy"] = 0.5
            text[f"probe/scratch/s{s}/{t}first_layer1_accuracy"] = 0.5
    _write(fixture_root / "metrics/text.json", json.dumps(text))
    md, _, _ = render(fixture_root)
    assert "**linear probe on the sentiment task**" in md
    assert table_row(md, "linear probe on the sentiment task", "accuracy")[1:4] == [
        "61.0 ± 1.0 (n=3)", "40.0 ± 1.0 (n=3)", "+21.0"]  # fmt: skip
    assert table_row(md, "linear probe on the sentiment task", "first_layer1_accuracy")[-1] == "not significant"
    assert "**text** probe on the sentiment task (accuracy, %) at the layer chosen on valid: pretrained 61.0, " \
        "random init 40.0, +21.0 points (95% CI" in md
    assert "at embed's default features (last layer, mean-pooled): pretrained 56.0, random init 40.0, +16.0" in md
