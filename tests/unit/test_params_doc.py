"""docs/params.md is what `d2v params-doc` renders from the config dataclasses, and every field has a docstring."""

from dataclasses import dataclass
from pathlib import Path

from d2v import params_doc
from d2v.cli import main
from d2v.config import load_params
from d2v.params_check import resolve

ROOT = Path(__file__).resolve().parents[2]


def test_docs_params_md_is_up_to_date():
    assert (ROOT / params_doc.DOC_PATH).read_text() == params_doc.render(), (
        f"docs/params.md is out of date: run `{params_doc.REGENERATE}` from the project root"
    )


def test_every_config_field_has_a_docstring():
    assert params_doc.missing_docstrings() == [], (
        "config fields without a docstring (write one under the field: what it is and why its default)"
    )


@dataclass(frozen=True)
class _Half:
    documented: int = 1
    """Has one."""
    bare: int = 2


@dataclass(frozen=True)
class _Child(_Half):
    extra: str = "x"
    """Inherited fields keep their parent's docstring."""


def test_field_docstrings_are_read_from_the_source_inherited_ones_too():
    assert params_doc.field_docs(_Child) == {
        "documented": "Has one.",
        "bare": None,
        "extra": "Inherited fields keep their parent's docstring.",
    }


def _leaves(d, prefix=""):
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "profiles":
            yield from _leaves(v, f"{path}.")
        else:
            yield path


def test_the_doc_lists_every_key_a_run_resolves_and_no_other():
    resolved = set(_leaves(resolve(load_params(ROOT / "params.yaml"))))
    documented = {e.path for e in params_doc.entries() if e.default is not params_doc.MAPPING}
    assert resolved == documented  # the mappings a run resolves field by field (head, mask) included
    text = params_doc.render()
    for path in ("model.audio.transformer.dim", "pretrain.image.optim.lr", "finetune.audio.head.proj_dim"):
        assert f"**`{path}`**" in text


def test_model_entries_name_what_the_presets_and_data2vec2_change():
    by_path = {e.path: e for e in params_doc.entries()}
    dim = by_path["model.audio.transformer.dim"]
    assert (dim.default, dim.variants) == (256, "presets: tiny `16`, base `768`, large `1024`")
    assert "data2vec2: `sincos`" in by_path["model.image.position"].variants


def test_check_fails_on_a_stale_file_and_names_the_command(tmp_path, capsys):
    stale = tmp_path / "params.md"
    stale.write_text("# old\n")
    assert main(["params-doc", "--check", "--out", str(stale)]) == 1
    assert params_doc.REGENERATE in capsys.readouterr().err
    assert main(["params-doc", "--out", str(stale)]) == 0
    assert main(["params-doc", "--check", "--out", str(stale)]) == 0
    assert stale.read_text() == params_doc.render()
