"""`d2v show-params`: every key of the resolved params, as a params file that validates and reads back."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from d2v.cli import main
from d2v.config import ConfigError, load_params
from d2v.params_show import apply_overrides, resolved, show

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"


@pytest.mark.parametrize("profile", sorted({"default", *load_params(PARAMS)["profiles"]}))
def test_the_output_validates_and_reads_back_the_same_values(tmp_path, profile, capsys):
    out = tmp_path / "resolved.yaml"
    assert main(["show-params", "--params", str(PARAMS), "--profile", profile, "--out", str(out)]) == 0
    assert main(["check-params", "--params", str(out)]) == 0
    again, applied = resolved(out)
    assert applied == "default"
    assert again == resolved(PARAMS, profile)[0]
    assert yaml.safe_load(out.read_text()) == again  # the file is the values, nothing else
    assert show(out).splitlines()[3:] == show(PARAMS, profile).splitlines()[3:]


def _fields(cls, prefix):
    for f in dataclasses.fields(cls):
        yield f"{prefix}.{f.name}"
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(sub):
            yield from _fields(type(sub), f"{prefix}.{f.name}")


def _has(d, path):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def test_every_dataclass_field_appears():
    from d2v.config import PathsConfig, ReportConfig, TrackingConfig
    from d2v.evaluate import EvaluateConfig
    from d2v.finetune import FinetuneConfig
    from d2v.modalities import MODALITIES, get
    from d2v.pretrain import PretrainConfig
    from d2v.sweep import SweepConfig

    values = yaml.safe_load(show(PARAMS))
    expected = [*_fields(PathsConfig, "paths"), *_fields(TrackingConfig, "tracking")]
    expected += [*_fields(SweepConfig, "sweep"), *_fields(ReportConfig, "report")]
    for m in MODALITIES:
        mod = get(m)
        data = __import__(f"d2v.modalities.{m}.data", fromlist=["x"])
        expected += [*_fields(data.PrepareConfig, f"prepare.{m}"), *_fields(data.ShardConfig, f"shard.{m}")]
        expected += [*_fields(mod.ModelConfig, f"model.{m}"), *_fields(PretrainConfig, f"pretrain.{m}")]
        expected += [*_fields(FinetuneConfig, f"finetune.{m}"), *_fields(EvaluateConfig, f"evaluate.{m}")]
        expected += [*_fields(mod.HeadConfig, f"finetune.{m}.head")]
    expected += [*_fields(get("audio").FinetuneMask, "finetune.audio.mask")]  # params.yaml sets it
    missing = [p for p in expected if not _has(values, p)]
    assert not missing
    # keys params.yaml leaves out, written out with their defaults
    assert values["model"]["audio"]["transformer"]["norm_eps"] == 1e-5
    assert values["pretrain"]["image"]["optim"]["init_lr_scale"] == 0.01
    assert values["finetune"]["audio"]["head"] == {"dropout": None, "label_smoothing": None, "proj_dim": 256}


def test_s_overrides_apply_before_the_profile(capsys):
    values, _ = resolved(
        PARAMS, None, ["pretrain.audio.steps=7", "sweep.seeds=[4, 5]", "model.text.ema.tau0=0.5"]
    )
    assert values["pretrain"]["audio"]["steps"] == 7
    assert values["sweep"]["seeds"] == [4, 5]
    assert values["model"]["text"]["ema"]["tau0"] == 0.5
    # as `dvc exp run -S`: -S writes the file, the profile then replaces the keys it sets
    values, applied = resolved(PARAMS, None, ["profile=smoke", "pretrain.audio.steps=7", "seed=3"])
    assert (applied, values["pretrain"]["audio"]["steps"], values["seed"]) == ("smoke", 4, 3)
    assert "profile 'smoke' sets pretrain.audio.steps" in capsys.readouterr().err


def test_s_does_not_touch_the_file_it_reads():
    raw = {"pretrain": {"audio": {"steps": 1}}}
    out = apply_overrides(raw, ["pretrain.audio.steps=2", "finetune.audio.mask.prob=0.5"])
    assert raw == {"pretrain": {"audio": {"steps": 1}}}
    assert out == {"pretrain": {"audio": {"steps": 2}}, "finetune": {"audio": {"mask": {"prob": 0.5}}}}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("pretrain.audio.stepz=3", "-S pretrain.audio.stepz: unknown key; valid keys under pretrain.audio"),
        ("pretrain.audioo.steps=3", "-S pretrain.audioo.steps: unknown key; valid keys under pretrain are"),
        ("nope=1", "-S nope: unknown key; valid keys at the top level"),
        ("model.audio.transformer.depth=six", "model.audio.transformer.depth: expected an integer"),
        ("seed", "expected KEY=VALUE"),
    ],
)
def test_a_bad_s_key_or_value_is_an_error_naming_the_key(override, fragment, capsys):
    with pytest.raises(ConfigError) as e:
        resolved(PARAMS, None, [override])
    assert fragment in str(e.value)
    assert main(["show-params", "--params", str(PARAMS), "-S", override]) == 2
    assert fragment in capsys.readouterr().err


def test_profile_smoke(capsys):
    assert main(["show-params", "--params", str(PARAMS), "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# d2v show-params: {PARAMS} with profile 'smoke' applied")
    values = yaml.safe_load(out)
    assert values["profile"] == "default" and values["profiles"] == {"default": {}}
    assert values["model"]["audio"]["preset"] == "tiny"
    assert values["model"]["audio"]["transformer"]["dim"] == 16  # the tiny preset, resolved
    assert values["pretrain"]["text"]["steps"] == 4
