"""The modality contract: every name the shared code takes from ``d2v/modalities/<m>/``, written once.

A modality is two plain modules (no registry):

- the package ``d2v.modalities.<m>`` (:class:`ModalityModel`), loaded by ``d2v.modalities.get(m)`` in the
  training, fine-tuning, evaluation, loading and Hugging Face code;
- its ``data.py``, ``d2v.modalities.<m>.data`` (:class:`ModalityData`), loaded by
  ``d2v.data.stages.data_module(m)`` in the prepare and shard stages, the loader and
  ``d2v.preprocessing``. The data stages import only this module, never the model code.

The encoder the package builds subclasses :class:`d2v.modalities.base.Encoder`, whose docstrings state what
each subclass provides (``modality``, ``local_features``, ``contextualize`` ...).
``tests/unit/test_modality_contract.py`` checks every modality against these protocols: each member
present, each function callable as declared here (same parameter names, unless positional-only), and the
behaviour below on the ``tiny`` preset. Nothing imports this module at run time; it is documentation a type checker can read
(a module satisfies a ``Protocol`` whose methods are its functions, ``self`` left out).

Shape legend: B batch, N raw input length (audio samples; images are [B, C, H, W]; text token ids),
T tokens at the encoder's rate (speech frames / image patches / sub-words), P prefix tokens the encoder
prepends (``Encoder.num_prefix_tokens``: vision's CLS), D width.

Exported by every package but not part of the contract, because no shared code uses them: ``TASKS``,
``make_head``, ``make_mask`` (each modality's ``collate`` calls its own, and the three signatures differ),
the encoder class and the ``For<Task>`` classes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from d2v.data.loader import Mode
    from d2v.data.shards import Encoded, Item, Scan, ShardCommon
    from d2v.data.stages import PrepareCommon
    from d2v.data2vec import Data2Vec
    from d2v.heads import FinetuneModel, HeadConfig, Task
    from d2v.modalities.base import Encoder


class ModalityModel(Protocol):
    """The package ``d2v.modalities.<m>``: configs, builders and Hugging Face interchange."""

    ModelConfig: type
    """Frozen dataclass of the ``model.<m>`` params section; its field defaults are the ``small`` preset.

    The shared code never names the class. It holds the instances that :meth:`model_config` returns, passes
    them on (``Encoder.config``, the loader's ``model_cfg``) and stores ``d2v.config.to_dict(cfg)`` in every
    checkpoint's meta.json, which :meth:`model_config` must turn back into an equal config.
    """

    HeadConfig: type[HeadConfig]
    """Fine-tuning head options: ``d2v.heads.HeadConfig`` or a subclass of it (audio adds ``proj_dim``).

    ``d2v.load.head_config`` builds it from ``finetune.<m>.head`` (a dict; unknown keys rejected) and from the
    ``head`` entry of a fine-tuned checkpoint's meta.json.
    """

    FinetuneMask: type | None
    """Frozen dataclass of ``finetune.<m>.mask`` (input masking while fine-tuning, the wav2vec 2.0 recipe
    that data2vec keeps for speech), or None when the modality fine-tunes without masks (images, text).

    Not None exactly when ``data.FINETUNE_MASK`` is true (see :meth:`ModalityData.collate`).
    """

    HF_MODEL_TYPE: str
    """transformers' ``model_type`` of the modality (``"data2vec-audio"``, ``"data2vec-vision"``,
    ``"data2vec-text"``): ``d2v.hf`` picks the modality of an HF folder by it."""

    def model_config(self, d: dict[str, Any] | None, where: str = ...) -> Any:
        """The ``ModelConfig`` of a params section ``d`` (None or {}: the ``small`` preset).

        ``d["preset"]`` (tiny / small / base / large) names the values put under the user's keys; the
        merge is deep, so ``{"preset": "tiny", "transformer": {"depth": 3}}`` keeps every other tiny value.
        ConfigError naming ``where`` plus the key (``model.audio.dim``) for an unknown preset, an unknown key
        or a bad value (e.g. ``targets.top_k`` above ``transformer.depth``).
        """
        ...

    def build_encoder(self, cfg: Any) -> Encoder:
        """A freshly initialised encoder of ``cfg`` (train mode, fp32), the modality's ``Encoder`` subclass
        with ``config`` = ``cfg``. Draws from the global torch RNG: callers seed it first."""
        ...

    def build_pretrain_model(self, cfg: Any) -> Data2Vec:
        """``d2v.data2vec.Data2Vec`` of ``build_encoder(cfg)``, the modality's regression head, ``cfg.targets``
        and ``cfg.ema``; the teacher starts as an exact copy of the student.

        ``model(batch) -> (loss, metrics)`` on a ``collate(..., mode="pretrain")`` batch: ``loss`` a finite
        scalar, ``metrics`` detached scalars ``loss``, ``target_var``, ``pred_var``, ``masked_frac``.
        Draws from the global torch RNG, the student first: from the same RNG state its weights are those of
        ``build_encoder(cfg)``, so one seed gives every rank the same model.
        """
        ...

    def build_finetune_model(
        self, encoder: Encoder, task: Task, num_classes: int | None, cfg: HeadConfig | None = None
    ) -> FinetuneModel:
        """The ``For<Task>`` model (``d2v.heads.FinetuneModel``) around ``encoder`` for ``task``
        ('classification': ``num_classes`` >= 2; speech also 'ctc': None or its letter count).

        ``cfg`` None: the modality's default head. The head is random (seed the global RNG first); the
        encoder may be changed in place (vision: BEiT's fine-tuning surgery, ``prepare_for_finetuning``). ValueError for
        a task the modality has no head for or an encoder of another modality.
        """
        ...

    def config_from_hf(self, d: dict[str, Any]) -> Any:
        """``ModelConfig`` of an HF ``config.json`` dict of this ``model_type``. Sizes are read from ``d``, never
        from d2v's presets: a key it omits takes transformers' default (audio, vision) or is a ValueError
        (text, whose transformers defaults are BERT's). ValueError naming the key for a variant d2v cannot
        represent."""
        ...

    def state_dict_from_hf(self, sd: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
        """The encoder state dict of an HF backbone state dict (``data2vec_<m>.`` prefix already stripped,
        task heads dropped) for ``build_encoder(cfg)``. Missing or unknown HF keys are never silently
        dropped: either a ValueError naming them here (text; vision for a missing key) or passed through so
        that ``load_state_dict`` names them (audio; vision for an unknown key)."""
        ...

    def to_hf(self, encoder: Encoder) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``(config.json dict, state dict)`` that transformers' ``Data2Vec<M>Model.from_pretrained``
        loads. The dict is JSON-ready, its ``model_type`` is :attr:`HF_MODEL_TYPE`, and
        ``config_from_hf`` + ``state_dict_from_hf`` of the pair rebuild an encoder whose ``to_hf`` is the
        same pair bit for bit and whose ``features`` are the same up to float rounding (a tensor HF has no
        slot for is dropped only when it cannot change the output, e.g. vision's key bias)."""
        ...


class ModalityData(Protocol):
    """``d2v.modalities.<m>.data``: raw data -> shards (prepare, shard) and shard samples -> batches (loader).

    The shard-side functions are called by ``d2v.data.shards.write_shards`` (whose docstring describes the
    shard layout); ``encode`` runs in spawned worker processes, so it and ``setup``'s ``ctx`` must pickle.
    Besides these members, a modality whose ``collate`` takes ``finetune_mask`` sets ``FINETUNE_MASK = True``
    (the loader reads it with ``getattr(data, "FINETUNE_MASK", False)``).
    """

    PrepareConfig: type[PrepareCommon]
    """Frozen dataclass of ``prepare.<m>``: ``d2v.data.stages.PrepareCommon`` (``source``) plus the
    modality's own fields."""

    ShardConfig: type[ShardCommon]
    """Frozen dataclass of ``shard.<m>``: ``d2v.data.shards.ShardCommon`` (split fractions, shard size,
    ``strict``, workers ...) plus the modality's own fields."""

    # ------------------------------------------------------------------------------------- prepare, shard

    def prepare(self, cfg: Any, out_dir: Path, seed: int) -> dict[str, Any]:
        """Materialise the raw data into the empty folder ``out_dir`` (the embedded default data or a copy
        of ``cfg.source``) in the layout ``scan`` reads. Returns the JSON-ready summary that goes into
        ``prepare.json``; its ``counts`` entry is printed by ``d2v prepare``."""
        ...

    def scan(self, raw_dir: Path, cfg: Any) -> Scan:
        """List the raw inputs of ``raw_dir`` (metadata only, sorted): ``unlabelled`` items, one ``Task`` per
        labelled task and ``Skip`` s for inputs already known to be bad."""
        ...

    def setup(self, splits: dict[str, list[Item]], cfg: Any, work_dir: Path, seed: int) -> Any:
        """Fit what encoding needs on the split items (text: the tokenizer, on ``pretrain``) and return a
        picklable ``ctx`` (None when there is nothing to fit). Files written to ``work_dir`` end up beside
        the shards."""
        ...

    def encode(self, item: Item, ctx: Any) -> list[Encoded]:
        """Read and convert one input into the payload fields + stats of zero or more samples (text: one
        per chunk); raise ``d2v.data.shards.BadInput`` for an input to skip."""
        ...

    def pack(self, samples: Iterable[Encoded], ctx: Any) -> Iterator[Encoded]:
        """The ``pretrain`` split's encoded samples in writing order, as they are to be written (text joins
        short documents into samples of up to ``max_tokens`` ids; audio and images pass them through).
        Runs in the writing process, after ``encode``; it must not reorder by anything but that order."""
        ...

    def preprocessing(self, ctx: Any, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The manifest's JSON-ready ``preprocessing`` entry (``prep`` below): what the loader and
        inference need to repeat the shard-time preprocessing (sample rate; image size, mean, std;
        tokenizer file), given the summed per-split stats."""
        ...

    # ----------------------------------------------------------------------------------------- loading

    def check_model(self, prep: dict[str, Any], model_cfg: Any) -> None:
        """ValueError saying what to change when shards made with ``prep`` cannot feed a model of
        ``model_cfg`` (sample rate, image size, vocabulary); called before any batch is read."""
        ...

    def decode(self, sample: dict[str, bytes]) -> Tensor:
        """One sample from its tar fields: audio float32 waveform [N]; image uint8 [C, H, W]; text int64
        ids [N] (``<s> ... </s>``). Exceptions are reported with the shard and key."""
        ...

    def transform(
        self,
        x: Tensor,
        *,
        mode: Mode,
        max_len: int | None,
        rng: random.Random,
        augment: bool,
        prep: dict[str, Any],
        model_cfg: Any,
        target: str | None = None,
    ) -> Tensor:
        """Per-sample preprocessing of a decoded sample: crops to ``max_len`` (audio samples, text tokens),
        augmentation when ``augment`` (images), normalisation. Draws only from ``rng``, and nothing in 'eval'
        mode (where the loader never augments). ``target`` is the split's task target ('label' /
        'transcript'; None in pretraining)."""
        ...

    def length(self, x: Tensor) -> int:
        """Size of a transformed sample, the key of length bucketing (samples, pixels, tokens)."""
        ...

    def collate(
        self,
        xs: list[Tensor],
        *,
        mode: Mode,
        model_cfg: Any,
        prep: dict[str, Any],
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        """A batch of transformed samples: ``inputs`` [B, N] or [B, C, H, W] as ``Encoder.features`` takes
        them, and ``padding_mask`` [B, N] bool (True = padding) when the rows can differ in length.

        'pretrain' adds ``mask`` [B, T] bool (True = masked, prefix tokens excluded, never on padding) and,
        for a modality that masks in input space (text), ``student_inputs`` (the corrupted ``inputs``).
        Masks draw only from ``generator``: the same generator state gives the same batch. A modality with
        ``FINETUNE_MASK`` also takes ``finetune_mask`` (its package's ``FinetuneMask``) and adds ``mask`` and
        ``channel_mask`` [B, D] in 'finetune' mode. The loader adds ``labels`` / ``transcripts`` / ``keys``.
        """
        ...

    def inference_inputs(
        self, items: list[Any], /, prep: dict[str, Any], shard_dir: Path | None = None
    ) -> list[Tensor]:
        """Raw items (audio / image file paths, text strings) as ``decode`` would return them, preprocessed
        exactly as at shard time, for ``transform`` (eval) + ``collate`` in ``Encoder.embed``. ``shard_dir``
        is the folder holding the files ``prep`` names (text: the tokenizer), a shard or checkpoint folder."""
        ...
