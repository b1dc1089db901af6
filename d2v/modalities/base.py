"""What every modality provides: the contract between ``d2v/modalities/<m>/`` and the shared code.

Shape legend: B batch, N raw input length (samples / pixels / tokens), T tokens, D width, K top-K layers.

The data2vec recipe is modality-blind (``d2v/model.py``); a modality supplies
- an :class:`Encoder`: ``local_features`` (local feature encoder: conv stack / patches / token embeddings),
  ``apply_mask`` (how the student sees masked tokens), ``contextualize`` (positions + block stack + norms);
- ``make_mask``: its masking strategy (span / block / token), a pure function run in the data loader;
- ``normalize_layer`` / ``normalize_target``: its target normalisation (§1.5);
- ``make_head``: the regression head (§1.8); and its loss settings in its config (§1.7).
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
    x_BTD: Tensor
    """Last layer output, per token (prefix tokens such as CLS included), after the modality's final norm."""
    padding_BT: Tensor | None
    """True at padding, at the token rate (None when there is none)."""
    layers: list[Tensor]
    """Per-block target taps, [B, T, D] each (prefix tokens included); empty unless asked for."""


class Encoder(nn.Module):
    """Base class of the three modality encoders.

    Subclasses set ``modality`` and implement ``local_features``, ``add_positions``, ``encode_tokens`` and
    ``check_inputs``. ``contextualize`` = ``encode_tokens(add_positions(x))``; the split lets data2vec 2.0
    (and anything else that runs the encoder on a subset of tokens) add positions on the whole sequence,
    keep some tokens, and run the blocks on those only. ``features`` is the user-facing call (and the one
    compared with transformers' ``last_hidden_state``).
    """

    modality: ClassVar[str]
    num_prefix_tokens: ClassVar[int] = 0
    """Tokens prepended by ``contextualize`` (vision's CLS); dropped before targets and the loss."""
    local_modules: ClassVar[tuple[str, ...]] = ()
    """Parameter-name prefixes used by ``local_features`` (the local encoder)."""
    shared_with_teacher: ClassVar[tuple[str, ...]] = ()
    """Parameter-name prefixes of ``contextualize`` that the teacher copies instead of averaging (§1.3)."""

    config: Any
    transformer: TransformerConfig
    preprocessing: Any = None
    """Raw items -> batch, for ``embed``; set by ``d2v.load_encoder`` (``d2v.preprocessing``)."""

    def check_inputs(self, inputs: Tensor, padding_mask: Tensor | None) -> None:
        """Raise ValueError naming the problem and the expected form."""
        raise NotImplementedError

    def local_features(
        self, inputs: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Local feature encoder: raw input -> ``(x_BTD, padding_BT)`` (no positions for audio/vision)."""
        raise NotImplementedError

    def apply_mask(self, x_BTD: Tensor, mask_BT: Tensor) -> Tensor:
        """The student's view: masked tokens replaced by the learned mask embedding (v1)."""
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
        """Positions + Transformer blocks (+ final norm) on embedded tokens: every token."""
        return self.encode_tokens(self.add_positions(x_BTD, padding_BT), padding_BT, tap, generator)

    def features(self, inputs: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(hidden_BTD, padding_BT)``: the last layer's per-token output and its padding (None if none)."""
        self.check_inputs(inputs, padding_mask)
        x, pad = self.local_features(inputs, padding_mask)
        out = self.contextualize(x, pad)
        return out.x_BTD, out.padding_BT

    @torch.no_grad()
    def embed_pooled(self, inputs: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Mean-pooled features [B, D] over non-padding tokens (prefix tokens excluded)."""
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
