from dataclasses import dataclass, field
from typing import Literal

import pytest

from d2v.config import ConfigError, TransformerConfig, from_dict, load_params, section, to_dict


@dataclass(frozen=True)
class _Inner:
    a: int = 1
    kind: Literal["x", "y"] = "x"


@dataclass(frozen=True)
class _Outer:
    lr: float = 1e-3
    sizes: tuple[int, ...] = (1, 2)
    inner: _Inner = field(default_factory=_Inner)
    name: str | None = None


def test_from_dict_builds_nested_and_converts():
    cfg = from_dict(_Outer, {"lr": 1, "sizes": [3, 4], "inner": {"kind": "y"}})
    assert cfg == _Outer(lr=1.0, sizes=(3, 4), inner=_Inner(kind="y"))
    assert isinstance(cfg.lr, float)
    assert to_dict(cfg) == {"lr": 1.0, "sizes": [3, 4], "inner": {"a": 1, "kind": "y"}, "name": None}


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"lrr": 1}, "unknown key(s) ['lrr']"),
        ({"inner": {"b": 2}}, "model.inner: unknown key(s) ['b']"),
        ({"inner": {"kind": "z"}}, "model.inner.kind: 'z' is not one of ['x', 'y']"),
        ({"inner": {"a": "3"}}, "model.inner.a: expected an integer"),
        ({"inner": {"a": True}}, "model.inner.a: expected an integer"),
        ({"sizes": 3}, "model.sizes: expected a list"),
        ({"lr": "fast"}, "model.lr: expected a number"),
    ],
)
def test_from_dict_rejects_bad_input_with_the_key_path(data, fragment):
    with pytest.raises(ConfigError) as e:
        from_dict(_Outer, data, "model")
    assert fragment in str(e.value)


def test_transformer_config_validates():
    with pytest.raises(ConfigError, match="dim must be divisible by heads"):
        TransformerConfig(dim=10, heads=3)
    with pytest.raises(ConfigError, match="dropout"):
        from_dict(TransformerConfig, {"dropout": 1.5})


def test_load_params_profiles_and_unknown_sections(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(
        "seed: 1\nprofile: default\nprofiles:\n  smoke:\n    seed: 2\n    pretrain: {image: {steps: 3}}\n"
        "pretrain: {image: {steps: 100, lr: 0.1}}\n"
    )
    assert load_params(p)["seed"] == 1
    smoke = load_params(p, "smoke")
    assert smoke["seed"] == 2 and smoke["pretrain"]["image"] == {"steps": 3, "lr": 0.1}
    assert smoke["profile"] == "smoke"
    with pytest.raises(ConfigError, match="profile 'fast' is not defined"):
        load_params(p, "fast")
    p.write_text("profiles:\n  smoke:\n    sweep: {seeds: [0]}\n")
    with pytest.raises(ConfigError, match="dvc.yaml interpolates"):
        load_params(p, "smoke")
    p.write_text("seeds: 1\n")
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['seeds'\]"):
        load_params(p)


def test_section_reads_one_modality():
    params = {"model": {"image": {"a": 5}}}
    assert section(params, "model", _Inner, "image") == _Inner(a=5)
    assert section(params, "model", _Inner, "text") == _Inner()
    with pytest.raises(ConfigError, match="model.image: unknown key"):
        section({"model": {"image": {"zz": 1}}}, "model", _Inner, "image")


@dataclass(frozen=True)
class _Checked:
    """Validators as they are written: relative to the class, or with a guessed prefix of their own."""

    rate: float = 0.5
    size: int = 1
    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(dim=16, heads=2))

    def __post_init__(self) -> None:
        if not 0 <= self.rate < 1:
            raise ConfigError(f"rate must be in [0, 1), got {self.rate}")
        if self.size == 2:
            raise ConfigError(f"head.size: must not be 2, got {self.size}")  # a guessed prefix
        if self.size == 3:
            raise ConfigError("head: size and rate disagree")  # a section label


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rate": -0.001}, "finetune.audio.head.rate must be in [0, 1), got -0.001"),
        ({"size": 2}, "finetune.audio.head.size: must not be 2, got 2"),
        ({"size": 3}, "finetune.audio.head: size and rate disagree"),
        ({"transformer": {"depth": 0}}, "finetune.audio.head.transformer.depth must be >= 1, got 0"),
        (
            {"transformer": {"dim": 10}},
            "finetune.audio.head.transformer.dim must be divisible by heads (12), got 10",
        ),
    ],
)
def test_validator_errors_name_the_full_key_path_and_value(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(_Checked, data, "finetune.audio.head")
    assert str(e.value) == message


def test_yaml_1_1_exponent_strings_are_read_as_floats(tmp_path):
    from d2v.pretrain import PretrainConfig

    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  image:\n    optim: {lr: 1e-3, eps: 5E-9, weight_decay: .05}\n")
    assert load_params(p)["pretrain"]["image"]["optim"]["lr"] == "1e-3"  # what PyYAML hands over
    optim = section(load_params(p), "pretrain", PretrainConfig, "image").optim
    assert (optim.lr, optim.eps, optim.weight_decay) == (1e-3, 5e-9, 0.05)
    for value, message in [
        ("-1e-3", "pretrain.image.optim.lr must be > 0, got -0.001"),
        ("fast", "pretrain.image.optim.lr: expected a number, got 'fast'"),
        ("1e", "pretrain.image.optim.lr: expected a number, got '1e'"),
    ]:
        p.write_text(f"pretrain:\n  image:\n    optim: {{lr: {value}}}\n")
        with pytest.raises(ConfigError) as e:
            section(load_params(p), "pretrain", PretrainConfig, "image")
        assert str(e.value) == message
    p.write_text("pretrain:\n  image: {steps: 1e3}\n")  # an integer key takes no exponent string
    with pytest.raises(ConfigError, match=r"pretrain\.image\.steps: expected an integer, got '1e3'"):
        section(load_params(p), "pretrain", PretrainConfig, "image")


def test_load_params_keeps_the_file_own_sections_beside_the_profile(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(
        "seed: 1\nprofiles:\n  smoke:\n    pretrain: {image: {steps: 3}}\npretrain: {image: {steps: 100}}\n"
    )
    smoke = load_params(p, "smoke")
    assert smoke["pretrain"]["image"]["steps"] == 3 and smoke.own["pretrain"]["image"]["steps"] == 100
    assert "own" not in smoke and load_params(p).own is None  # an attribute, not a key; no profile: None


@pytest.mark.parametrize("m", ["audio", "image", "text"])
def test_a_partial_nested_override_keeps_the_rest_of_the_modalitys_defaults(m):
    """``model.<m>.v2.decoder.layers`` alone changes that key; the decoder's other keys stay the modality's
    own data2vec 2.0 defaults, not the generic ``DecoderConfig``'s."""
    from d2v.config import to_dict
    from d2v.modalities import get

    model_config = get(m).model_config
    recipe = to_dict(model_config({"algorithm": "data2vec2"}))["v2"]["decoder"]
    changed = to_dict(model_config({"algorithm": "data2vec2", "v2": {"decoder": {"layers": 1}}}))["v2"]["decoder"]
    assert changed == {**recipe, "layers": 1}
