"""The sweep vocabulary: budgets, run names, stage names and metric keys, and the runs a sweep plans."""

from __future__ import annotations

import pytest

from d2v.config import ConfigError, from_dict
from d2v.sweep import (
    EVAL_KEY,
    FINETUNE_STAGE,
    PROBE_KEY,
    Run,
    SweepConfig,
    parse_budget,
    planned_runs,
    probe_key,
)


@pytest.mark.parametrize(("text", "expected"), [("10", 10), ("0.25", 0.25), ("1.0", 1.0), (None, 5)])
def test_budget_parsing(text, expected):
    assert parse_budget(text, 5) == expected and type(parse_budget(text, 5)) is type(expected)


@pytest.mark.parametrize("bad", ["0", "1.5", "ten", "-3"])
def test_bad_budget_is_rejected(bad):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(bad, 10)


def test_a_run_names_its_folder_stage_and_metric_keys_which_parse_back():
    run = Run("scratch", 0.1, 2)
    assert run.name == "b0.1-s2-scratch" and Run("pretrained", 10, 0).name == "b10-s0-pretrained"
    assert run.stage("audio") == "finetune@audio-0.1-2-scratch"
    assert run.stage("audio") == FINETUNE_STAGE.format(modality="audio", budget=0.1, seed=2, init="scratch")
    m = EVAL_KEY.match(run.key("ctc", "wer"))
    assert m is not None and m.groupdict() == {
        "task": "ctc", "init": "scratch", "budget": "0.1", "seed": "2", "metric": "wer"
    }  # fmt: skip
    assert run.key("classification", "accuracy") == "evaluate/scratch/b0.1/s2/accuracy"
    p = PROBE_KEY.match(probe_key("pretrained", "macro_f1"))
    assert p is not None and (p["init"], p["metric"]) == ("pretrained", "macro_f1")


def test_planned_runs_from_sweep_and_cli_filters():
    sweep = from_dict(SweepConfig, {"budgets": [5, 0.5], "seeds": [0, 1], "inits": ["pretrained", "scratch"]})
    assert len(planned_runs(sweep)) == 8
    runs = planned_runs(sweep, budget="0.5", seed=1, init="scratch")
    assert runs == [Run("scratch", 0.5, 1)]
    assert [r.init for r in planned_runs(sweep, init="pretrained")] == ["pretrained"] * 4
    with pytest.raises(ValueError, match="--init"):
        planned_runs(sweep, init="random")
    default = planned_runs(from_dict(SweepConfig, {"budgets": [3], "seeds": [2]}))
    assert default == [Run("pretrained", 3, 2), Run("scratch", 3, 2)]
    with pytest.raises(ConfigError, match="sweep.budgets"):
        from_dict(SweepConfig, {"budgets": [0]})


def test_the_joint_arm_runs_at_its_own_budgets_under_its_own_stage_name():
    sweep = from_dict(SweepConfig, {"budgets": [5, 1.0], "seeds": [0, 1], "joint_budgets": [5]})
    runs = planned_runs(sweep)
    assert [r for r in runs if r.init == "joint"] == [Run("joint", 5, 0), Run("joint", 5, 1)]
    assert len(runs) == 2 * 2 * 2 + 2
    assert planned_runs(sweep, init="joint", seed=1) == [Run("joint", 5, 1)]
    assert Run("joint", 5, 1).stage("text") == "finetune-joint@text-5-1"
    assert Run("joint", 5, 1).name == "b5-s1-joint"  # its folder and metric keys follow the others'
    assert not any(r.init == "joint" for r in planned_runs(from_dict(SweepConfig, {"seeds": [0]})))
    with pytest.raises(ConfigError, match="sweep.joint_budgets"):
        from_dict(SweepConfig, {"inits": ["pretrained", "joint"]})
    with pytest.raises(ConfigError, match="joint_budgets"):
        from_dict(SweepConfig, {"joint_budgets": [0]})


def test_a_run_name_parses_back_to_its_budget_seed_and_init():
    from d2v.sweep import RUN_NAME

    for run in (Run("scratch", 5, 0), Run("pretrained", 0.1, 2), Run("joint", 1.0, 11)):
        m = RUN_NAME.match(run.name)
        assert (m["init"], m["budget"], int(m["seed"])) == (run.init, str(run.budget), run.seed)
    assert RUN_NAME.match("b5-s0") is None and RUN_NAME.match("notes") is None


def test_probe_tasks_put_the_headline_task_first():
    from d2v.sweep import probe_tasks

    tasks = {"sentiment": {"target": "label"}, "ctc": {"target": "transcript"}, "classification": {"target": "label"},
             "mood": {"target": "label"}}  # fmt: skip
    assert probe_tasks({"tasks": tasks}) == ["classification", "mood", "sentiment"]
    assert probe_tasks({"tasks": {"ctc": {"target": "transcript"}}}) == [] and probe_tasks(None) == []
