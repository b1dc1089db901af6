"""The project's own params.yaml is valid in every profile, and a bad key fails before any work."""

from pathlib import Path

import pytest
import yaml

from d2v.cli import main
from d2v.config import ConfigError, load_params
from d2v.params_check import check_all

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "profile", ["default", *sorted(load_params(ROOT / "params.yaml").get("profiles") or {})]
)
def test_repo_params_are_valid(profile):
    assert check_all(load_params(ROOT / "params.yaml", profile)) == 0


PAPER_PROFILES = {"paper-base-v1": "data2vec", "paper-base-v2": "data2vec2", "paper-base-joint": "data2vec2"}
"""The papers' Base recipes (params.yaml comments give their sources and costs)."""


def test_the_paper_profiles_are_among_the_checked_ones():
    assert set(PAPER_PROFILES) <= set(load_params(ROOT / "params.yaml")["profiles"])


@pytest.mark.parametrize("profile", sorted(PAPER_PROFILES))
def test_a_paper_profile_is_the_base_recipe_of_its_algorithm_on_the_users_data(profile):
    from d2v.config import section
    from d2v.modalities import MODALITIES, get
    from d2v.pretrain import PretrainConfig

    params = load_params(ROOT / "params.yaml", profile)
    for m in MODALITIES:
        cfg = get(m).model_config(params["model"][m])
        assert (cfg.preset, cfg.algorithm) == ("base", PAPER_PROFILES[profile])
        pre = section(params, "pretrain", PretrainConfig, m)
        assert pre.batch_size % (8 * pre.grad_accum) == 0  # grad_accum is set for one node of 8 GPUs
        # the user's folder is a top-level key, so `-S prepare.<m>.source=...` is not hidden by the profile
        assert "source" not in params.own["profiles"][profile].get("prepare", {}).get(m, {})
    assert (
        params["shard"]["image"]["image_size"]
        == get("image").model_config(params["model"]["image"]).image_size
    )
    assert params["shard"]["text"]["vocab_size"] == 50265  # RoBERTa's BPE size, the base preset's table
    from d2v.joint import joint_section, member_config

    joint = joint_section(params)
    if profile != "paper-base-joint":  # the separate models only: no second, small-width pretraining
        assert joint.modalities == ()
        return
    # the joint run: every modality at Base width, each per-GPU micro-batch a whole number on 8 GPUs
    assert joint.modalities == MODALITIES and (joint.transformer.dim, joint.transformer.depth) == (768, 12)
    for m in MODALITIES:
        base = get(m).model_config(params["model"][m])
        assert member_config(base, joint).transformer.dim == base.transformer.dim
        assert section(params, "pretrain", PretrainConfig, m).batch_size % (8 * joint.grad_accum) == 0
    v2 = load_params(ROOT / "params.yaml", "paper-base-v2")
    same = {k: v for k, v in params.items() if k not in ("joint", "profile")}
    assert same == {k: v for k, v in v2.items() if k not in ("joint", "profile")}  # v2, and a joint run


@pytest.mark.parametrize(
    "path, value, fragment",
    [
        (("pretrain", "image", "stepz"), 3, "pretrain.image: unknown key(s) ['stepz']"),
        (
            ("model", "text", "transformer", "depth"),
            "six",
            "model.text.transformer.depth: expected an integer",
        ),
        (("sweep", "inits"), ["random"], "sweep.inits[0]: 'random' is not one of"),
        (("finetune", "video"), {}, "finetune: unknown modality key(s) ['video']"),
    ],
)
def test_bad_key_is_named_by_check_params(tmp_path, capsys, path, value, fragment):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = params
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as e:
        check_all(load_params(bad))
    assert fragment in str(e.value)
    assert main(["check-params", "--params", str(bad)]) == 2
    assert fragment in capsys.readouterr().err


def test_a_bad_value_hidden_by_the_profile_is_still_an_error(tmp_path, capsys):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert "steps" in params["profiles"]["smoke"]["pretrain"]["audio"]  # smoke replaces the bad value
    params["pretrain"]["audio"]["steps"] = -5
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as e:
        check_all(load_params(bad, "smoke"))
    assert str(e.value).startswith(
        "pretrain.audio.steps must be >= 0, got -5 (in the file's own sections: profile 'smoke' overrides"
    )
    assert main(["check-params", "--params", str(bad), "--profile", "smoke"]) == 2
    assert "pretrain.audio.steps must be >= 0, got -5" in capsys.readouterr().err


def test_check_all_can_be_quiet(capsys):
    params = load_params(ROOT / "params.yaml", "smoke")
    assert check_all(params, quiet=True) == 0 and capsys.readouterr().out == ""
    assert check_all(params) == 0 and capsys.readouterr().out == "params OK (profile smoke)\n"


def test_every_stage_validates_the_whole_file(tmp_path, monkeypatch, capsys):
    """A typo in another modality's section fails a stage before any work (not only `check-params`)."""
    import yaml

    from d2v.cli import main

    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    params["pretrain"]["imgae"] = {"steps": 3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["prepare", "text"]) == 2
    err = capsys.readouterr().err
    assert "pretrain: unknown modality key(s) ['imgae']" in err
    assert not (tmp_path / "data").exists()  # nothing was prepared
