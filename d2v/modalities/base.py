"""The encoder half of the modality contract (the whole contract: ``d2v.modalities.contract``).

Shape legend: B batch, N raw input length (samples / pixels / tokens), T tokens, P prefix tokens
(``num_prefix_tokens``), D width, K top-K layers.

The data2vec recipe is modality-blind (``d2v/data2vec.py``); a modality supplies an :class:`Encoder` subclass
(local feature encoder, how the student sees masked tokens, positions + block stack + norms), its
masking strategy (run by its ``collate`` in the data loader), its regression head (§1.8) and its target and
loss settings as a :class:`Data2VecTargets` in its config (§1.4-1.7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from d2v.config import TransformerConfig
from d2v.transformer import Tap

Preset = Literal["tiny", "small", "base", "large"]


@dataclass(frozen=True)
class Data2VecTargets:
    """How targets and the loss are built (§1.4-1.7); each modality sets its paper defaults."""

    top_k: int = 8
    """Average the top-K blocks of the teacher."""
    tap: Tap = "ffn"
    """'ffn': FFN output before the last residual (speech, text); 'block': end of block (vision v1, [DV])."""
    layer_norm: Literal["instance", "layer", "none"] = "instance"
    """Per-layer, parameter-less normalisation before averaging."""
    final_norm: Literal["instance", "layer", "none"] = "none"
    """Normalisation after averaging (vision: layer)."""
    loss_beta: float = 0.0
    """Smooth-L1 transition; 0 means L2 (fairseq's ``loss_beta: 0``)."""
    loss_scale: float | None = None
    """Multiply the per-token loss by this; None means 1/sqrt(D) (fairseq ``loss_scale: null``)."""
    loss_reduction: Literal["token", "element"] = "token"
    """'token': sum over D, mean over masked tokens (fairseq); 'element': mean over tokens x D ([DV])."""
    ema_local_encoder: bool = False
    """True: the teacher has its own EMA copy of the local encoder ([DV] vision); else it is shared."""
    ema_shared: tuple[str, ...] | None = None
    """Parameter-name prefixes the teacher copies from the student instead of averaging (spec §1.3, §5.5);
    None: the encoder's ``shared_with_teacher`` (data2vec 1.0: speech copies its positional convs)."""


class EncoderOutput(NamedTuple):
    """What :meth:`Encoder.contextualize` returns; every tensor has the P prefix tokens first."""

    x_BTD: Tensor
    """Last layer output [B, P+T, D] (prefix tokens such as CLS included), after the modality's final norm."""
    padding_BT: Tensor | None
    """[B, P+T] bool, True at padding, at the token rate (None when there is none)."""
    layers: list[Tensor]
    """Per-block target taps, [B, P+T, D] each, one per block that ran (``depth`` of them in eval mode;
    fewer in training when LayerDrop skips blocks); empty unless a ``tap`` was asked for."""


class Encoder(nn.Module):
    """Base class of the modality encoders; what the shared code relies on from a subclass.

    A subclass (built by its package's ``build_encoder(cfg)``) sets the class attributes ``modality``,
    ``num_prefix_tokens``, ``local_modules`` and ``shared_with_teacher``, the instance attributes ``config``
    and ``transformer``, and implements ``check_inputs``, ``local_features``, ``add_positions`` and
    ``encode_tokens`` (and ``apply_mask`` when the default, which needs a ``mask_emb`` parameter [D], does
    not fit). The step is ``features = contextualize(local_features(inputs))`` with ``contextualize =
    encode_tokens(add_positions(x))``: ``d2v.data2vec.Data2Vec`` and the fine-tuning heads call the halves
    separately, masking in between; ``d2v.data2vec2.Data2Vec2`` adds positions on the whole sequence, keeps
    the unmasked tokens and runs ``encode_tokens`` on those only. Its Transformer blocks are a
    ``d2v.transformer.TransformerStack`` (parameter names ``...blocks.<i>.``: layer-wise LR decay,
    ``d2v.heads.layer_id``, finds them by name). The teacher is a ``copy.deepcopy`` of the student.

    ``features`` is the user-facing call (and the one compared with transformers' ``last_hidden_state``).
    """

    modality: ClassVar[str]
    """The modality's name in ``d2v.modalities.MODALITIES``: ``d2v.modalities.get(encoder.modality)`` is
    its package (HF export), and checkpoints record it."""
    num_prefix_tokens: ClassVar[int] = 0
    """P, the tokens ``contextualize`` prepends (vision's CLS); masks, targets, the loss and pooling skip them."""
    local_modules: ClassVar[tuple[str, ...]] = ()
    """Parameter-name prefixes of the modules ``local_features`` uses (the local encoder). Unless
    ``config.targets.ema_local_encoder``, the teacher reuses the student's local features, so its copy of
    these is never read and never averaged."""
    shared_with_teacher: ClassVar[tuple[str, ...]] = ()
    """Parameter-name prefixes of ``contextualize`` that the teacher copies instead of averaging (§1.3)."""
    static_shapes: ClassVar[bool] = False
    """True when every batch of a run has the same shapes (images at one size): on CUDA, cuDNN then times
    its conv algorithms once per shape and keeps the fastest (``cudnn.benchmark``; with lengths that vary
    from batch to batch it would time them again and again)."""

    config: Any
    """The modality's ``ModelConfig`` this encoder was built from (``build_encoder(encoder.config)`` rebuilds
    the same module tree): checkpoints store it, the loader and ``embed`` preprocess with it."""
    transformer: TransformerConfig
    """``config.transformer``: ``depth`` bounds ``targets.top_k`` and numbers the layers, ``dim`` is D."""
    preprocessing: Any = None
    """Raw items -> batch, for ``embed``; set by ``d2v.load_encoder`` (``d2v.preprocessing``)."""

    def check_inputs(self, inputs: Tensor, padding_mask: Tensor | None) -> None:
        """Raise ValueError naming the problem and the expected form (shape, dtype, value range, padding)
        for inputs ``features`` cannot take; it may read values on the host (run by ``features`` and
        ``predict``, never in the training step)."""
        raise NotImplementedError

    def local_features(
        self, inputs: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Local feature encoder (conv stack / patches / token embeddings): ``inputs`` as ``collate`` makes
        them ([B, N] or [B, C, H, W]) and their padding [B, N] -> ``(x_BTD, padding_BT)`` at the token rate
        T of the masks, no prefix tokens yet (padding None when ``padding_mask`` is None).

        A padded row gives, at its valid tokens, the features of the same row unpadded (fp32 rounding):
        padding never leaks in here. No checks on the host: the training step calls it directly.
        """
        raise NotImplementedError

    def apply_mask(self, x_BTD: Tensor, mask_BT: Tensor) -> Tensor:
        """The student's view of local features [B, T, D] under ``mask_BT`` [B, T] (True = masked): masked
        tokens replaced by the learned mask embedding (v1). A modality that masks in input space (text:
        ``batch["student_inputs"]``) raises ValueError instead."""
        return torch.where(mask_BT[..., None], self.mask_emb.to(x_BTD.dtype), x_BTD)

    def add_positions(self, x_BTD: Tensor, padding_BT: Tensor | None) -> Tensor:
        """Positions that need the whole sequence, added to local features: [B, T, D] -> [B, T, D].

        Speech: zero the padding, add the convolutional positions; vision: add the fixed or learned patch
        positions; text: nothing (its embeddings carry positions). Token-wise afterwards, so keeping a subset
        of the result keeps each token's position.
        """
        return x_BTD

    def encode_tokens(
        self,
        x_BKD: Tensor,
        padding_BK: Tensor | None,
        tap: Tap | None = None,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        """Prefix tokens + Transformer blocks (+ final norm) on K positioned tokens (all T, or a subset in
        the original order): [B, K, D] -> ``EncoderOutput`` of [B, P + K, D] (P prefix tokens)."""
        raise NotImplementedError

    def contextualize(
        self,
        x_BTD: Tensor,
        padding_BT: Tensor | None,
        tap: Tap | None = None,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        """Positions + Transformer blocks (+ final norm) on local features [B, T, D], every token:
        ``encode_tokens(add_positions(x))``, an :class:`EncoderOutput` over P+T tokens; ``tap`` ('ffn' /
        'block') collects each block's target tap, ``generator`` draws LayerDrop in training.

        Valid tokens never attend to padding, and no positional module carries padding into them (speech's
        stacked positional convs zero it after every layer, unlike fairseq and transformers): a padded row's
        output is the row alone's, up to rounding. Deterministic in eval mode (the teacher's mode).
        """
        return self.encode_tokens(self.add_positions(x_BTD, padding_BT), padding_BT, tap, generator)

    def features(self, inputs: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(hidden_BTD, padding_BT)``: the last layer's output [B, P+T, D] and its padding [B, P+T]
        (None if none), after ``check_inputs``."""
        self.check_inputs(inputs, padding_mask)
        x, pad = self.local_features(inputs, padding_mask)
        out = self.contextualize(x, pad)
        return out.x_BTD, out.padding_BT

    @torch.no_grad()
    def embed_pooled(self, inputs: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Mean-pooled features [B, D] over non-padding tokens (prefix tokens excluded). An encoder's
        padded row gives the row's own features, whatever it is batched with (tested per modality)."""
        h, pad = self.features(inputs, padding_mask)
        h = h[:, self.num_prefix_tokens :]
        if pad is None:
            return h.mean(1)
        keep = (~pad[:, self.num_prefix_tokens :]).to(h.dtype)[..., None]
        return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)

    def embed(
        self,
        items: Sequence[Any],
        *,
        batch_size: int = 32,
        preprocessing: Callable[[Sequence[Any]], dict[str, Any]] | None = None,
        device: str | torch.device | None = None,
    ) -> np.ndarray:
        """Mean-pooled last-layer features (prefix tokens and padding excluded) of raw items: float32
        [N, D], in item order, ``batch_size`` items at a time in eval mode under ``no_grad``.

        What an item may be is the modality's (``d2v/modalities/<m>/data.py``): audio ``to_waveform`` (file
        paths, 1-D float arrays / tensors at 16 kHz, ``(array, rate)`` pairs), images ``to_image`` (file
        paths, PIL images, HxW / HxWxC arrays / tensors: uint8 0..255 or float 0..1), text ``to_text`` (a
        ``str`` is the text, a ``pathlib.Path`` a UTF-8 file).

        ``preprocessing`` turns a list of raw items into a batch ``{"inputs", "padding_mask"?}``; by default
        the one ``d2v.load_encoder`` attached (``d2v.preprocessing``: a d2v checkpoint's own reading of
        files, or an HF folder's processor files).
        """
        prep = preprocessing or self.preprocessing
        if prep is None:
            raise ValueError(
                "this encoder has no item preprocessing: load it with d2v.load_encoder(<d2v checkpoint or HF "
                "folder>), or pass preprocessing=..."
            )
        if isinstance(items, (str, Path)) or not hasattr(items, "__iter__"):
            raise ValueError("embed: pass a list of items (file paths, strings, arrays), not a single item")
        if batch_size < 1:
            raise ValueError(f"embed: batch_size must be >= 1, got {batch_size}")
        items = list(items)
        dev = torch.device(device) if device is not None else next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = []
        try:
            for i in range(0, len(items), batch_size):
                batch = prep(items[i : i + batch_size])
                pad = batch.get("padding_mask")
                pooled = self.embed_pooled(batch["inputs"].to(dev), None if pad is None else pad.to(dev))
                out.append(pooled.float().cpu())
        finally:
            self.train(was_training)
        if not out:
            return np.zeros((0, self.transformer.dim), dtype=np.float32)
        return torch.cat(out).numpy()


def unpadded_rows(inputs: Tensor, padding_mask: Tensor) -> list[Tensor]:
    """A padded batch as its rows, each cropped to its valid length: ``inputs`` [B, N, ...] with
    ``padding_mask`` [B, N] (True at padding, at the end of a row) -> B tensors [1, n_b, ...]."""
    lengths = (~padding_mask).sum(1).tolist()
    return [inputs[b : b + 1, :n] for b, n in enumerate(lengths)]
