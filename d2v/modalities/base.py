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
    stack_attr: ClassVar[str] = "stack"
    """The attribute holding the encoder's ``TransformerStack`` (text: ``encoder``, the name Hugging Face
    gives it): joint pretraining (``d2v.joint``) puts one shared stack there in every modality."""
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
    def embed_pooled(
        self,
        inputs: Tensor,
        padding_mask: Tensor | None = None,
        *,
        layer: int | None = None,
        pool: Pool = "mean",
    ) -> Tensor:
        """Pooled features [B, D] of model inputs (as ``features`` takes them): ``pool`` over the tokens of
        ``layer``'s output, both as in :meth:`embed`; by default the mean of the last layer over non-padding
        tokens, prefix tokens excluded. An encoder's padded row gives the row's own features, whatever it is
        batched with (tested per modality). ``layer`` needs eval mode (LayerDrop would skip blocks)."""
        block = embed_options(layer, pool, self.transformer.depth)
        h_BTD, pad_BT = layer_output(self, inputs, padding_mask, block)
        return pool_tokens(h_BTD, pad_BT, self.num_prefix_tokens, pool)

    def embed(
        self,
        items: Sequence[Any],
        *,
        batch_size: int = 32,
        preprocessing: Callable[[Sequence[Any]], dict[str, Any]] | None = None,
        device: str | torch.device | None = None,
        layer: int | None = None,
        pool: Pool = "mean",
    ) -> np.ndarray:
        """Pooled features of raw items: float32 [N, D], in item order, ``batch_size`` items at a time in
        eval mode under ``no_grad``. By default, for every modality, the mean of the last layer's output over
        the non-padding tokens (prefix tokens such as vision's CLS excluded).

        ``layer`` picks whose output is pooled, numbered as transformers' ``hidden_states`` (L = depth):

        - ``None`` (default): the last layer exactly as ``features`` returns it, after the modality's final
          norm (vision's final LayerNorm when configured; audio and text are post-LN and have none).
        - ``1..L``: block i's end-of-block output; ``L`` is the last block's raw output, before any final
          norm, so it equals the default only where the modality has no final norm.
        - ``0``: the input to the first block (local features + positions, and whatever the modality does
          before its blocks: audio's LayerNorm, vision's CLS token and optional embedding norm).
        - negative: from the end, Python-style over those L + 1 outputs (``-1`` = block L, ``-(L+1)`` = 0).

        ``pool``: ``"mean"`` (default) over the non-padding tokens, prefix tokens excluded; ``"first"`` the
        first token: vision's CLS where the encoder has a prefix token, else the first token of the item
        (text's ``<s>``, speech's first frame; padding is at the end of a row, so it is always real).
        Anything else is a ValueError naming the allowed values and range.

        What an item may be is the modality's (``d2v/modalities/<m>/data.py``): audio ``to_waveform`` (file
        paths, 1-D float arrays / tensors at 16 kHz, ``(array, rate)`` pairs), images ``to_image`` (file
        paths, PIL images, HxW / HxWxC arrays / tensors: uint8 0..255 or float 0..1), text ``to_text`` (a
        ``str`` is the text, a ``pathlib.Path`` a UTF-8 file).

        ``preprocessing`` turns a list of raw items into a batch ``{"inputs", "padding_mask"?}``; by default
        the one ``d2v.load_encoder`` attached (``d2v.preprocessing``: a d2v checkpoint's own reading of
        files, or an HF folder's processor files).
        """
        embed_options(layer, pool, self.transformer.depth)  # before reading any item: a typo fails fast
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
                pad = None if pad is None else pad.to(dev)
                pooled = self.embed_pooled(batch["inputs"].to(dev), pad, layer=layer, pool=pool)
                out.append(pooled.float().cpu())
        finally:
            self.train(was_training)
        if not out:
            return np.zeros((0, self.transformer.dim), dtype=np.float32)
        return torch.cat(out).numpy()


Pool = Literal["mean", "first"]
POOLS: tuple[Pool, ...] = ("mean", "first")
"""``embed``'s poolings; ``d2v embed --pool`` offers the same (spelled out in ``d2v/cli.py``, which does
not import torch to build its parser)."""


def embed_options(layer: int | None, pool: str, depth: int) -> int | None:
    """Check ``embed``'s ``layer`` and ``pool`` for an encoder of ``depth`` blocks; returns the layer as
    0..depth (0 = the first block's input), or None for the default last layer. ValueError otherwise."""
    if pool not in POOLS:
        raise ValueError(f"embed: pool must be one of {', '.join(map(repr, POOLS))}; got {pool!r}")
    if layer is None:
        return None
    is_int = isinstance(layer, (int, np.integer)) and not isinstance(layer, bool)  # layer=True: a mistake
    if not is_int or not -depth - 1 <= layer <= depth:
        raise ValueError(
            f"embed: layer must be None (the last layer, after the final norm) or an int in "
            f"{-depth - 1}..{depth} (0 = the input to the first block, i = block i's output, negative = from "
            f"the end); this encoder's depth is {depth}; got {layer!r}"
        )
    return int(layer) % (depth + 1)


def layer_output(
    encoder: Encoder, inputs: Tensor, padding_mask: Tensor | None, block: int | None
) -> tuple[Tensor, Tensor | None]:
    """``(hidden_BTD, padding_BT)`` [B, P+T, D] / [B, P+T] at ``block`` (``embed_options``' answer): None
    is ``features``; 0 the input of the encoder's ``TransformerStack`` (its first block); i block i's
    end-of-block output (``contextualize(..., tap="block").layers[i - 1]``)."""
    if block is None:  # the default path is features' own, so the default embedding never changes
        return encoder.features(inputs, padding_mask)
    encoder.check_inputs(inputs, padding_mask)
    x, pad = encoder.local_features(inputs, padding_mask)
    if block == 0:
        # No tap gives a stack's input, and what each modality does before its blocks differs (audio's
        # LayerNorm, vision's CLS and embedding norm): read it where the stack receives it.
        seen: list[Tensor] = []
        stack: nn.Module = getattr(encoder, encoder.stack_attr)
        hook = stack.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["x_BTD"]), with_kwargs=True
        )
        try:
            out = encoder.contextualize(x, pad)
        finally:
            hook.remove()
        return seen[0], out.padding_BT
    out = encoder.contextualize(x, pad, tap="block")
    if len(out.layers) != encoder.transformer.depth:  # else layers[i - 1] would be another block
        raise ValueError(
            f"embed: layer={block} needs every block to run, but LayerDrop skipped some (training mode): "
            "call .eval() first"
        )
    return out.layers[block - 1], out.padding_BT


def pool_tokens(hidden_BTD: Tensor, padding_BT: Tensor | None, num_prefix: int, pool: Pool) -> Tensor:
    """[B, P+T, D] with its padding [B, P+T] (None: none) -> [B, D]. 'first': token 0 (the first prefix
    token when P > 0, else the item's first token; padding is at the end of a row, so it is never padding);
    'mean': over the non-padding tokens after the P prefix tokens."""
    if pool == "first":
        return hidden_BTD[:, 0]
    h = hidden_BTD[:, num_prefix:]
    if padding_BT is None:
        return h.mean(1)
    keep = (~padding_BT[:, num_prefix:]).to(h.dtype)[..., None]
    return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def unpadded_rows(inputs: Tensor, padding_mask: Tensor) -> list[Tensor]:
    """A padded batch as its rows, each cropped to its valid length: ``inputs`` [B, N, ...] with
    ``padding_mask`` [B, N] (True at padding, at the end of a row) -> B tensors [1, n_b, ...]."""
    lengths = (~padding_mask).sum(1).tolist()
    return [inputs[b : b + 1, :n] for b, n in enumerate(lengths)]
