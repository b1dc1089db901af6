"""Models from files: encoders and fine-tuned task models from d2v checkpoints or Hugging Face folders.

``load_encoder(path)`` is the library's entry point (``d2v.load_encoder``): a d2v checkpoint (a step
directory, or a run directory -> its latest step) or an HF data2vec directory (``d2v.hf``). Either comes
with its item preprocessing (``d2v.preprocessing``): a d2v checkpoint reads raw items exactly as its shards
were made, an HF folder as its processor files say. ``d2v.checkpoint`` reads the files; this module builds
the modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2v import checkpoint, initialize, published
from d2v.config import from_dict
from d2v.heads import FinetuneModel, HeadConfig
from d2v.hf import is_hf_dir, load_hf_encoder
from d2v.modalities import JOINT, get
from d2v.modalities.base import Encoder
from d2v.preprocessing import attach_preprocessing
from d2v.sweep import PRETRAINED, PUBLISHED


def head_config(modality: str, d: dict[str, Any] | HeadConfig | None, where: str) -> HeadConfig:
    """The modality's head options (its ``HeadConfig`` class, e.g. audio's with ``proj_dim``) from a dict."""
    cls = get(modality).HeadConfig
    return d if isinstance(d, cls) else from_dict(cls, d if isinstance(d, dict) else {}, where)


def build_finetune_model(
    modality: str, encoder: Encoder, task: str, num_classes: int | None, head: HeadConfig | None = None
) -> FinetuneModel:
    """The modality's ``For<Task>`` model around ``encoder`` (seed the torch RNG first: heads are random);
    ``head`` None: the modality's default head options."""
    return get(modality).build_finetune_model(encoder, task, num_classes, head)


def joint_encoder_state(weights: dict[str, Tensor], modality: str, stack_attr: str) -> dict[str, Tensor]:
    """An ordinary ``modality`` encoder's state dict from a joint checkpoint's weights: the member's student
    (``members.<m>.student.*``) and the shared stack (``stack.*`` -> ``<stack_attr>.*``), with m's own
    LayerNorm parameters (``norms.<m>.*``) where it has them: the layout of ``d2v.joint.JointData2Vec``'s
    state dict."""
    prefix = f"members.{modality}.student."
    sd = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    sd.update({f"{stack_attr}.{k[len('stack.') :]}": v for k, v in weights.items() if k.startswith("stack.")})
    norms = f"norms.{modality}."  # modality_norms: its own LayerNorm parameters in the shared blocks
    sd.update({
        f"{stack_attr}.{k[len(norms) :].replace('__', '.')}": v for k, v in weights.items() if k.startswith(norms)
    })  # fmt: skip
    return sd


def load_checkpoint_encoder(
    path: str | Path, pretrained: bool = True, seed: int = 0, modality: str | None = None
) -> Encoder:
    """The encoder of a d2v checkpoint (step dir, or run dir -> latest), rebuilt from its meta.json.

    ``pretrained=False``: the same architecture, freshly initialised from ``seed``. A joint checkpoint
    (``d2v pretrain joint``) holds one encoder per modality: ``modality`` picks it (its local encoder and the
    shared stack), an ordinary encoder of that modality.
    """
    step_dir = checkpoint.resolve(path)
    meta = checkpoint.read_meta(step_dir)
    where = f"{step_dir}/{checkpoint.META}"
    joint = meta.get("modality") == JOINT
    if joint:
        have = sorted(meta["model_config"])
        if modality not in have:
            raise ValueError(
                f"{step_dir} is a joint checkpoint of {have}: say which encoder to load "
                f"(load_encoder(path, modality=...), --modality), not {modality!r}"
            )
        model_dict = meta["model_config"][modality]
    else:
        if modality is not None and meta.get("modality") != modality:
            raise ValueError(f"{step_dir} is a {meta.get('modality')!r} checkpoint, not {modality!r}")
        modality, model_dict = meta.get("modality"), meta["model_config"]
    try:
        mod = get(modality)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    cfg = mod.model_config(model_dict, f"{where}:model_config")
    torch.manual_seed(seed)
    encoder = mod.build_encoder(cfg)
    if pretrained:
        weights = checkpoint.load_weights(step_dir)
        if joint:
            prefix = f"members.{modality}.student. + stack."
            sd = joint_encoder_state(weights, modality, encoder.stack_attr)
        else:
            prefix = meta.get("encoder_prefix", "student.")
            sd = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        problem = checkpoint.state_mismatch(encoder.state_dict(), sd)
        if problem:
            raise ValueError(
                f"{step_dir}: weights under {prefix!r} do not fit a {modality} encoder of its meta.json "
                f"config: {problem}"
            )
        encoder.load_state_dict(sd)
    return encoder.eval()


def load_finetune_model(path: str | Path, modality: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The fine-tuned task model of a ``kind: finetune`` checkpoint (eval mode) and its meta.json.

    ValueError naming the checkpoint when it is missing, not from ``d2v finetune``, of another modality than
    ``modality`` (when given), or its weights do not fit the recorded config.
    """
    step_dir = checkpoint.resolve(path)
    meta = checkpoint.read_meta(step_dir)
    if meta.get("kind") != "finetune":
        raise ValueError(
            f"{step_dir} is a {meta.get('kind')!r} checkpoint; expected a fine-tuned one (from `d2v finetune`)"
        )
    if modality is not None and meta.get("modality") != modality:
        raise ValueError(f"{step_dir} is a {meta.get('modality')!r} checkpoint, not {modality!r}")
    encoder = load_checkpoint_encoder(step_dir, pretrained=False)
    head = head_config(meta["modality"], meta.get("head"), f"{step_dir}/{checkpoint.META}:head")
    model = build_finetune_model(meta["modality"], encoder, meta["task"], meta.get("num_classes"), head)
    try:
        model.load_state_dict(checkpoint.load_weights(step_dir))
    except RuntimeError as e:
        raise ValueError(f"{step_dir}: weights do not fit the model its meta.json describes: {e}") from None
    return model.eval(), meta


def load_encoder(
    path: str | Path, pretrained: bool = True, seed: int = 0, modality: str | None = None
) -> Encoder:
    """A d2v encoder from an HF data2vec directory or a d2v checkpoint, with its ``embed`` preprocessing.

    ``pretrained=False`` builds the same architecture freshly initialised with ``seed``: the from-scratch
    baseline that benchmarks compare against. ``modality``: which encoder of a joint checkpoint (needed
    there; elsewhere a check that the model is of that modality).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or model directory")
    if is_hf_dir(path):
        encoder = load_hf_encoder(path, pretrained, seed)
        if modality is not None and encoder.modality != modality:
            raise ValueError(f"{path} is a {encoder.modality!r} model, not {modality!r}")
    else:
        encoder = load_checkpoint_encoder(path, pretrained=pretrained, seed=seed, modality=modality)
    return attach_preprocessing(encoder, path)


def published_encoder(pretrain_step: Path) -> Any:
    """The encoder of the model the pretrain run in ``pretrain_step`` started from, as it is (the sweep's
    ``published`` arm): its folder is read again and checked against the run's record of it. ValueError
    saying what to do when the run did not start from one, or the folder changed since."""
    meta = checkpoint.read_meta(pretrain_step)
    rec = meta.get("init")
    m = meta.get("modality")
    if not rec:
        raise ValueError(
            f"{pretrain_step}: this {m} pretraining started from random init, so there is no published model "
            f"to fine-tune; set pretrain.{m}.init (and rerun `d2v pretrain {m}`) or drop 'published' from "
            "sweep.inits"
        )
    src = published.source(rec["path"], m, f"pretrain.{m}.init")
    if src.record()["sha256"] != rec["sha256"]:
        raise ValueError(
            f"{src.path} changed since {pretrain_step} started from it; rerun `d2v pretrain {m}` (dvc repro "
            "does when the folder is under published/)"
        )
    mod = get(m)
    encoder = mod.build_encoder(mod.model_config(meta["model_config"], f"{pretrain_step}/meta.json"))
    encoder.load_state_dict(initialize.encoder_state(src, encoder.config))
    return encoder.eval()


def arm_dir(checkpoints: str | Path, modality: str, init: str) -> Path:
    """The pretrain run folder sweep arm ``init`` of ``modality`` starts from: ``<checkpoints>/pretrain/joint``
    for the joint arm, ``<checkpoints>/pretrain/<m>`` for the others (scratch: its architecture)."""
    return Path(checkpoints) / "pretrain" / (JOINT if init == JOINT else modality)


def joint_member(path: str | Path, modality: str) -> tuple[Path, dict[str, Any]]:
    """``(step dir, the model_config of modality's encoder)`` of the joint pretraining checkpoint at
    ``path``. ValueError saying what to do when there is none, or it has no ``modality`` encoder."""
    if checkpoint.is_off(path):
        raise ValueError(f"{path}: the joint arm is off (joint.modalities: [])")
    if checkpoint.latest(path) is None:
        raise ValueError(
            f"{path}: no joint pretraining checkpoint; run `d2v pretrain joint` first (dvc repro pretrain-joint), "
            "or leave the joint arm out (sweep.joint_budgets: [], evaluate.<m>.probe_inits without joint)"
        )
    step = checkpoint.resolve(path)
    meta = checkpoint.read_meta(step)
    have = sorted(meta.get("model_config") or {}) if meta.get("modality") == JOINT else []
    if meta.get("kind") != "pretrain" or modality not in have:
        raise ValueError(
            f"{step} is not a joint pretraining of {modality} (joint.modalities: {have}); add {modality} to "
            f"joint.modalities and rerun `d2v pretrain joint`, or leave the joint arm out for {modality}"
        )
    return step, meta["model_config"][modality]


def arm_encoder(init: str, pretrain_step: Path, seed: int, modality: str | None = None) -> Any:
    """The encoder of sweep arm ``init`` (pretrained | scratch | published | joint) around the pretrain
    checkpoint ``pretrain_step`` (:func:`arm_dir`); ``scratch`` is its architecture initialised from
    ``seed``; ``joint`` is ``modality``'s encoder of the joint checkpoint."""
    if init == PUBLISHED:
        return published_encoder(pretrain_step)
    if init == JOINT:
        return load_checkpoint_encoder(pretrain_step, modality=modality)
    return load_checkpoint_encoder(pretrain_step, pretrained=init == PRETRAINED, seed=seed)
