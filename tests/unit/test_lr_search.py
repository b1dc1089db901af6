"""Each fine-tuning run chooses its LR on valid (``finetune.<m>.lr_grid``): the choice, its record, resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_resume import write_params

from d2v import checkpoint
from d2v.config import ConfigError, from_dict
from d2v.finetune import LR_SEARCH_FILE, FinetuneConfig, LrSearch


def test_the_best_valid_accuracy_wins_and_ties_go_to_the_recipe_then_the_lower_lr():
    assert LrSearch((1e-4, 4e-4, 1.6e-3), (0.3, 0.5, 0.4), 4e-4, 10).lr == 4e-4
    assert LrSearch((1e-4, 4e-4, 1.6e-3), (0.3, 0.4, 0.5), 4e-4, 10).lr == 1.6e-3
    assert LrSearch((1e-4, 4e-4, 1.6e-3), (0.5, 0.5, 0.5), 4e-4, 10).lr == 4e-4
    assert LrSearch((1e-4, 4e-4, 1.6e-3), (0.5, 0.2, 0.5), 4e-4, 10).lr == 1e-4
    s = LrSearch((1e-4, 4e-4), (0.25, 0.5), 4e-4, 10)
    assert s.metrics() == {"lr": 4e-4, "lr_search/0.0001": 0.25, "lr_search/0.0004": 0.5}


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"lr_grid": [1, -2]}, "distinct multipliers > 0"),
        ({"lr_grid": [1, 1]}, "distinct multipliers > 0"),
        ({"lr_grid": [1, 2], "task": "ctc", "head_init": "random"}, "has no classes"),
        ({"lr_grid_steps": 0}, "lr_grid_steps"),
        ({"lr_grid_valid_budget": 0}, "lr_grid_valid_budget"),
        ({"lr_grid_steps": 600, "steps": 500}, "lr_grid_steps"),
        ({"scratch_lr_scale": 0}, "scratch_lr_scale"),
    ],
)
def test_bad_grids_are_refused_naming_the_key(over, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(FinetuneConfig, over, "finetune.image")


def _weights(run_dir):
    return checkpoint.load_weights(run_dir)


def test_a_run_trains_at_the_lr_its_short_runs_scored_best_on_valid(tmp_path, monkeypatch, capsys):
    from d2v.cli import main

    monkeypatch.chdir(tmp_path)
    optim = {"lr": 1e-3, "warmup": 0.25}
    head = {"head_init": "probe", "head_init_features": "train"}  # a fit that draws dropout: the RNG matters
    grid = {"lr_grid": [0.1, 1.0, 10.0], "lr_grid_steps": 2, "lr_grid_valid_budget": 2, "steps": 3, "optim": optim,
            "scratch_lr_scale": 2.0, **head}  # fmt: skip
    write_params(tmp_path / "params.yaml", finetune=grid)
    assert main(["prepare", "image"]) == 0 and main(["shard", "image"]) == 0
    assert main(["finetune", "image", "--init", "scratch"]) == 0
    out = capsys.readouterr().out
    assert out.count("LR search: lr") == 3 and out.count("LR search 3/3") == 1  # three short runs, scored
    assert out.count("output layer fitted") == 1  # fitted once, by the first short run ...
    assert out.count("output layer as the LR search fitted it") == 3  # ... and handed to the others and the run

    run = tmp_path / "ckpt" / "finetune" / "image" / "b2-s0-scratch"
    metrics = json.loads((tmp_path / "metrics" / "finetune" / "image" / "b2-s0-scratch.json").read_text())
    recipe = optim["lr"] * 2.0  # the scratch arm's grid is centred at scratch_lr_scale x optim.lr
    scores = {k: v for k, v in metrics.items() if k.startswith("finetune/lr_search/")}
    assert len(scores) == 3 and all(0 <= v <= 1 for v in scores.values())
    record = json.loads((run / LR_SEARCH_FILE).read_text())["search"]
    assert record["lrs"] == pytest.approx([0.1 * recipe, recipe, 10 * recipe])
    best = max(record["valid_accuracy"])
    assert record["valid_accuracy"][record["lrs"].index(record["lr"])] == best
    assert metrics["finetune/lr"] == record["lr"]
    meta = checkpoint.read_meta(run)
    assert meta["config"]["optim"]["lr"] == record["lr"] and meta["lr_search"] == record
    assert meta["step"] == 3

    # the search leaves no trace on the run: the same run without a grid, at the chosen LR, is bit-identical
    weights = _weights(run)
    write_params(tmp_path / "params.yaml", finetune={"steps": 3, "optim": {**optim, "lr": record["lr"]}, **head})
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["paths"]["checkpoints"] = "ckpt_plain"
    params["paths"]["metrics"] = "metrics_plain"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["finetune", "image", "--init", "scratch"]) == 0
    other = _weights(tmp_path / "ckpt_plain" / "finetune" / "image" / "b2-s0-scratch")
    assert weights.keys() == other.keys() and all(torch.equal(weights[k], other[k]) for k in weights)

    # run again with the grid: the recorded search is read back, nothing is searched or retrained
    write_params(tmp_path / "params.yaml", finetune=grid)
    capsys.readouterr()
    assert main(["finetune", "image", "--init", "scratch"]) == 0
    assert "LR search" not in capsys.readouterr().out
    again = _weights(run)
    assert all(torch.equal(weights[k], again[k]) for k in weights)



def test_one_search_per_arm_and_budget_at_the_params_seed_serves_every_seed(tmp_path, monkeypatch, capsys):
    """The first run of an arm and budget searches at the params seed, whatever its own seed; the runs of the
    other seeds read that search and train at its choice; and a run whose seed is not the params seed is, bit
    for bit, the run without a grid at the chosen LR."""
    from d2v.cli import main
    from d2v.finetune import LR_SEARCH_DIR

    monkeypatch.chdir(tmp_path)
    optim = {"lr": 1e-3, "warmup": 0.25}
    head = {"head_init": "probe", "head_init_features": "train"}
    grid = {"lr_grid": [0.1, 1.0, 10.0], "lr_grid_steps": 2, "lr_grid_valid_budget": 2, "steps": 3, "optim": optim,
            **head}  # fmt: skip
    write_params(tmp_path / "params.yaml", finetune=grid)
    assert main(["prepare", "image"]) == 0 and main(["shard", "image"]) == 0
    capsys.readouterr()
    assert main(["finetune", "image", "--init", "scratch", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("LR search: lr") == 3 and "output layer fitted" in out  # the search's, then the run's own
    shared = tmp_path / "ckpt" / "finetune" / "image" / LR_SEARCH_DIR / "b2-scratch.json"
    first = json.loads(shared.read_text())
    assert first["fingerprint"]["seed"] == 0  # the params seed, not the run's
    for seed in (0, 2):
        assert main(["finetune", "image", "--init", "scratch", "--seed", str(seed)]) == 0
        assert "LR search" not in capsys.readouterr().out
        run = tmp_path / "ckpt" / "finetune" / "image" / f"b2-s{seed}-scratch"
        assert json.loads((run / LR_SEARCH_FILE).read_text()) == first
    chosen = first["search"]["lr"]
    assert checkpoint.read_meta(tmp_path / "ckpt" / "finetune" / "image" / "b2-s2-scratch")["config"]["optim"]["lr"] == chosen

    weights = _weights(tmp_path / "ckpt" / "finetune" / "image" / "b2-s1-scratch")
    write_params(tmp_path / "params.yaml", finetune={"steps": 3, "optim": {**optim, "lr": chosen}, **head})
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["paths"]["checkpoints"] = "ckpt_plain"
    params["paths"]["metrics"] = "metrics_plain"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["finetune", "image", "--init", "scratch", "--seed", "1"]) == 0
    other = _weights(tmp_path / "ckpt_plain" / "finetune" / "image" / "b2-s1-scratch")
    assert weights.keys() == other.keys() and all(torch.equal(weights[k], other[k]) for k in weights)
