"""Where a pretraining run starts: random weights, or a published model (``pretrain.<m>.init``).

``pretrain.<m>.init`` names a Hugging Face data2vec folder (``facebook/data2vec-audio-base`` and its
fine-tuned variants, downloaded once) or a d2v checkpoint. The student starts from its encoder weights and
the EMA teacher as their copy, as a run that resumes a pretraining does (fairseq's ``--restore-file``
with a reset optimizer). Its task head, if any, is left out: pretraining regresses teacher targets.

The architecture is the folder's. ``model.<m>.preset: from_init`` takes it from there (the modality's
``ARCHITECTURE`` keys); the pretraining recipe (algorithm, masking, targets, EMA, dropout) is the preset of
the same size's, with the user's keys on top. A ``model.<m>`` key that contradicts the folder's
architecture is an error naming it, with or without ``from_init``.

The inputs must be preprocessed as the model was trained: the shards' manifest ``preprocessing`` has to
agree with the folder's (``shard.<m>.preprocess_like`` makes them so), else an error naming both.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from d2v import checkpoint, published
from d2v.config import FROM_INIT, ConfigError, from_dict, leaves, to_dict
from d2v.data.stages import data_module
from d2v.hf import hf_encoder_state
from d2v.modalities import get


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def architecture_keys(modality: str) -> tuple[str, ...]:
    """The ``model.<m>`` keys a published model fixes (``d2v/modalities/<m>/model.py`` ``ARCHITECTURE``)."""
    return importlib.import_module(f"d2v.modalities.{modality}.model").ARCHITECTURE


def init_source(init: str | None, modality: str) -> published.Source | None:
    """``pretrain.<m>.init`` checked (``d2v.published.source``), or None when unset."""
    return None if init is None else published.source(init, modality, f"pretrain.{modality}.init")


def folder_model_config(src: published.Source) -> Any:
    """The ``ModelConfig`` of the model in ``src``: an HF folder's config.json (and, for text, the ids of
    its tokenizer: RoBERTa's ``<mask>`` is not in config.json), or a d2v checkpoint's meta.json."""
    mod = get(src.modality)
    where = f"pretrain.{src.modality}.init ({src.path})"
    if src.kind == "d2v":
        return mod.model_config(src.config["model_config"], where)
    try:
        cfg = mod.config_from_hf(src.config)
    except (ValueError, ConfigError) as e:
        raise ValueError(f"{where}: {e}") from None
    complete = getattr(mod, "config_from_folder", None)
    return complete(cfg, src) if complete is not None else cfg


def _contradictions(user: dict[str, Any], folder: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    mine = leaves(user)
    theirs = leaves(folder)
    return [
        f"{k}: {mine[k]!r} (the folder's: {theirs[k]!r})" for k in keys if k in mine and mine[k] != theirs[k]
    ]


def model_config(user: dict[str, Any] | None, modality: str, src: published.Source | None) -> Any:
    """``model.<m>`` as its ``ModelConfig``, for a run that starts from ``src`` (None: random init).

    ``preset: from_init`` needs ``src``: the folder's architecture under the recipe of the preset of its
    size, the user's keys on top. ConfigError naming the keys that contradict the folder's architecture.
    """
    mod = get(modality)
    where, init_key = f"model.{modality}", f"pretrain.{modality}.init"
    user = dict(user or {})
    keys = architecture_keys(modality)
    if user.get("preset") != FROM_INIT:
        cfg = mod.model_config(user, where)
        if src is not None:
            folder = to_dict(folder_model_config(src))
            bad = _contradictions(to_dict(cfg), folder, keys)
            if bad:
                raise ConfigError(
                    f"{where} does not describe the model of {init_key} ({src.path}): " + "; ".join(bad)
                    + f". Set {where}.preset: {FROM_INIT} to take the folder's architecture"
                )  # fmt: skip
        return cfg
    if src is None:
        raise ConfigError(
            f"{where}.preset: {FROM_INIT} takes the architecture from {init_key}, which is not set: set "
            f"{init_key}: <a Hugging Face data2vec folder or d2v checkpoint>, or a preset (tiny|small|base|large)"
        )
    folder_cfg = folder_model_config(src)
    folder = to_dict(folder_cfg)
    bad = _contradictions(user, folder, keys)
    if bad:
        raise ConfigError(
            f"{where} contradicts the architecture of {init_key} ({src.path}): " + "; ".join(bad)
            + f". Remove these keys ({where}.preset: {FROM_INIT} takes them from the folder)"
        )  # fmt: skip
    recipe = to_dict(mod.model_config({**user, "preset": folder_cfg.preset}, where))
    for k in keys:
        _set(recipe, k, leaves(folder)[k])
    depth = folder_cfg.transformer.depth
    if "top_k" not in (user.get("targets") or {}) and recipe["targets"]["top_k"] > depth:
        recipe["targets"]["top_k"] = depth  # a preset's K for a shallower published model: all its layers
    try:
        return from_dict(type(folder_cfg), recipe, where)
    except ConfigError as e:
        raise ConfigError(
            f"{e} (with preset: {FROM_INIT} the architecture is that of {init_key}, {src.path}: choose a "
            f"recipe that fits it, e.g. {where}.algorithm: data2vec for a data2vec 1.0 model)"
        ) from None


def check_preprocessing(src: published.Source, manifest: dict[str, Any], shard_dir: Path) -> None:
    """ValueError naming both when the shards were not preprocessed as the model in ``src`` expects."""
    want = data_module(src.modality).like_preprocessing(src)
    have = manifest.get("preprocessing") or {}
    diff = [k for k in sorted(want) if have.get(k) != want[k]]
    if diff:
        made = (manifest.get("preprocess_like") or {}).get("path") or "their own preprocessing"
        shown = "; ".join(f"{k}: the model's {want[k]!r}, the shards' {have.get(k)!r}" for k in diff[:4])
        raise ValueError(
            f"pretrain.{src.modality}.init {src.path} expects other inputs than the shards in {shard_dir} "
            f"(made with {made}): {shown}. Re-shard with shard.{src.modality}.preprocess_like: {src.path} "
            f"(`d2v shard {src.modality}`)"
        )


def encoder_state(src: published.Source, cfg: Any) -> dict[str, Any]:
    """The encoder weights of ``src`` as a d2v encoder state dict (a task model's backbone only)."""
    if src.kind == "hf":
        return hf_encoder_state(src.path, cfg)
    prefix = src.config.get("encoder_prefix", "student.")
    return {k[len(prefix) :]: v for k, v in checkpoint.load_weights(src.path).items() if k.startswith(prefix)}


def head_note(src: published.Source) -> str | None:
    """A line saying that a fine-tuned folder's task head is left out, or None for a bare encoder."""
    if src.kind == "hf":
        heads = [a for a in src.architectures if not a.endswith("Model")]
        if heads:
            return (
                f"pretrain.{src.modality}.init: {src.path} is a {', '.join(heads)}; its task head is "
                "ignored, pretraining starts from its encoder"
            )
        return None
    if src.config.get("kind") == "finetune":
        return (
            f"pretrain.{src.modality}.init: {src.path} is a fine-tuned checkpoint "
            f"({src.config.get('task')}); its task head is ignored, pretraining starts from its encoder"
        )
    return None


def start_from(model: Any, src: published.Source) -> None:
    """Load ``src``'s encoder into the student of ``model`` (a ``d2v.data2vec.Data2Vec``) and make the
    teacher its copy. ValueError naming the folder when the weights do not fit."""
    sd = encoder_state(src, model.student.config)
    problem = checkpoint.state_mismatch(model.student.state_dict(), sd)
    if problem:
        raise ValueError(
            f"pretrain.{src.modality}.init: the weights in {src.path} do not fit the model its config "
            f"describes: {problem}"
        )
    model.student.load_state_dict(sd)
    model.teacher.load_state_dict(model.student.state_dict())


def stage_model_config(params: dict[str, Any], modality: str, pretrain_dir: Path) -> Any:
    """``model.<m>`` for the stages after pretraining (fine-tuning, evaluation). With ``preset: from_init``
    it is the config the pretrain stage resolved from its init folder, read from the pretrain checkpoint
    (those stages depend on it, not on the folder)."""
    user = (params.get("model") or {}).get(modality)
    if not (isinstance(user, dict) and user.get("preset") == FROM_INIT):
        return get(modality).model_config(user, f"model.{modality}")
    step = checkpoint.resolve(pretrain_dir)  # ValueError: run `d2v pretrain <m>` first
    return get(modality).model_config(checkpoint.read_meta(step)["model_config"], f"{step}/meta.json")


def checked_model_section(params: dict[str, Any], modality: str, with_folders: bool = True) -> dict[str, Any]:
    """``model.<m>`` validated without running anything (``d2v check-params``): resolved from the init
    folder when it is there (``with_folders``); with ``from_init`` and the folder not (yet) there, the
    section as written, its keys checked against the preset of the published models' size (base)."""
    user = (params.get("model") or {}).get(modality)
    init = ((params.get("pretrain") or {}).get(modality) or {}).get("init")
    if with_folders and init is not None and Path(init).exists():
        return to_dict(model_config(user, modality, init_source(init, modality)))
    if isinstance(user, dict) and user.get("preset") == FROM_INIT:
        # a profile (published-base) sets from_init and leaves the folder to -S pretrain.<m>.init=...:
        # the pretrain stage says so if it is still unset then
        get(modality).model_config({**user, "preset": "base"}, f"model.{modality}")
        return dict(user)
    return to_dict(get(modality).model_config(user, f"model.{modality}"))

