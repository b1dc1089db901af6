"""Evaluation metrics (pure functions, each unit-tested against hand computations) and the linear probe.

Shape legend: N / M examples, C classes, D feature width.

Classification: accuracy, macro-F1, confusion matrix. Speech CTC: word and character error rates of
greedy transcripts. The linear probe: logistic regression on frozen features (``pooled_layer_features``); the
CTC probe: a linear CTC head on frozen frame features (``frame_features``, ``ctc_probe``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from d2v.heads import ctc_greedy_decode
from d2v.modalities.base import Encoder

# ------------------------------------------------------------------------------------- classification


def accuracy(pred_N: Tensor, target_N: Tensor) -> float:
    """Fraction of ``pred_N == target_N`` (int class ids [N] each)."""
    if pred_N.shape != target_N.shape or pred_N.numel() == 0:
        raise ValueError(
            f"accuracy needs two non-empty [N] tensors, got {tuple(pred_N.shape)}, {tuple(target_N.shape)}"
        )
    return (pred_N == target_N).float().mean().item()


def confusion_matrix(pred_N: Tensor, target_N: Tensor, num_classes: int) -> Tensor:
    """Counts [C, C] (int64): row = actual class, column = predicted class."""
    if pred_N.shape != target_N.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred_N.shape)} vs {tuple(target_N.shape)}")
    for name, t in (("pred", pred_N), ("target", target_N)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} has class ids outside [0, {num_classes})")
    flat = target_N.long().cpu() * num_classes + pred_N.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def macro_f1(pred_N: Tensor, target_N: Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN).

    Over the classes that occur in the targets or the predictions (scikit-learn's ``f1_score(average=
    "macro")`` with its default labels): a class absent from both says nothing about the model.
    """
    cm = confusion_matrix(pred_N, target_N, num_classes).double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    if not bool(present.any()):
        raise ValueError("macro_f1 of an empty set")
    f1 = 2 * tp / (support + predicted).clamp_min(1)
    return f1[present].mean().item()


# ------------------------------------------------------------------------------------------ sequences


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions; unit costs) between two sequences."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def _error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence], unit: str) -> float:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError(f"the references contain no {unit}s: the error rate is undefined")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / total


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate over a corpus: total word edits / total reference words (whitespace-split)."""
    return _error_rate([r.split() for r in refs], [h.split() for h in hyps], "word")


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate: total character edits / total reference characters (single spaces count)."""
    return _error_rate([" ".join(r.split()) for r in refs], [" ".join(h.split()) for h in hyps], "character")


def task_metrics(task: str, preds: list, targets: list, num_classes: int | None) -> dict[str, float]:
    """accuracy + macro_f1 (classification) or wer + cer (CTC)."""
    if task == "ctc":
        return {"wer": wer(targets, preds), "cer": cer(targets, preds)}
    assert num_classes is not None
    p, t = torch.tensor(preds), torch.tensor(targets)
    return {"accuracy": accuracy(p, t), "macro_f1": macro_f1(p, t, num_classes)}


# ------------------------------------------------------------------------------------------- probing


def fit_logistic(
    train_x_ND: Tensor,
    train_y_N: Tensor,
    num_classes: int,
    *,
    l2: float = 1e-4,
    max_iter: int = 200,
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on frozen features: ``(W [D, C], b [C])`` (float64) such that
    ``x @ W + b`` are the class scores of raw features ``x``.

    Features are standardised with the training mean/std; the weights start at zero and full-batch L-BFGS
    minimises ``CE + l2/2 * |W|^2`` in that standardised space (a strictly convex problem: no RNG is
    involved, so the result depends only on the data; same inputs -> same weights on CPU). The returned
    weights fold the standardisation in.
    """
    if train_x_ND.dim() != 2:
        raise ValueError(f"fit_logistic needs [N, D] features, got {tuple(train_x_ND.shape)}")
    if train_y_N.shape != train_x_ND.shape[:1]:
        raise ValueError(f"{train_x_ND.shape[0]} training features but {train_y_N.shape[0]} labels")
    x = train_x_ND.detach().double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    y = train_y_N.long()
    D = x.shape[1]
    W = torch.zeros(D, num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W_raw = W.detach() / std[:, None]
    return W_raw, b.detach() - mean @ W_raw


def linear_probe(
    train_x_ND: Tensor,
    train_y_N: Tensor,
    test_x_MD: Tensor,
    num_classes: int,
    *,
    l2: float = 1e-4,
    max_iter: int = 200,
) -> Tensor:
    """:func:`fit_logistic` on the training features; returns the test predictions [M] (int64)."""
    if train_x_ND.dim() != 2 or test_x_MD.dim() != 2 or train_x_ND.shape[1] != test_x_MD.shape[1]:
        raise ValueError(
            "linear_probe needs [N, D] and [M, D] features, "
            f"got {tuple(train_x_ND.shape)}, {tuple(test_x_MD.shape)}"
        )
    W, b = fit_logistic(train_x_ND, train_y_N, num_classes, l2=l2, max_iter=max_iter)
    return (test_x_MD.double() @ W + b).argmax(-1)


def _tapped(
    encoder: Encoder, loader: Any, device: torch.device, keep_prefix: bool = False
) -> Iterator[tuple[Tensor, Tensor | None, dict]]:
    """Per forward pass: every block's output and the final output (after the modality's final norm),
    prefix tokens dropped (``keep_prefix``: kept, first), ``[L + 1, B, T, D]``, the padding of the tokens
    after the prefix ``[B, T - P]`` (or None) and the loader's batch."""
    encoder.to(device).eval()
    P = 0 if keep_prefix else encoder.num_prefix_tokens
    for batch in loader:
        inputs, pad = batch["inputs"].to(device), batch.get("padding_mask")
        pad = None if pad is None else pad.to(device)
        encoder.check_inputs(inputs, pad)
        x, pad_BT = encoder.local_features(inputs, pad)
        out = encoder.contextualize(x, pad_BT, tap="block")
        yield torch.stack([h[:, P:] for h in [*out.layers, out.x_BTD]]), pad_BT, batch


@torch.no_grad()
def pooled_layer_features(
    encoder: Encoder, loader: Any, device: torch.device, pools: Sequence[str]
) -> tuple[dict[str, Tensor], Tensor]:
    """Per pool, every block's output and the final output pooled as ``embed`` pools them: 'mean' over the
    non-padding tokens, prefix tokens excluded; 'first' the first token (vision's CLS where there is one).
    ``{pool: [L + 1, N, D]}`` (fp32, CPU) and the labels [N]."""
    xs: dict[str, list[Tensor]] = {p: [] for p in pools}
    ys, last = [], None
    P = encoder.num_prefix_tokens
    for h_LBTD, pad_BT, batch in _tapped(encoder, loader, device, keep_prefix=True):
        for p in pools:
            if p == "first":  # token 0: the first prefix token, else the item's first (padding is at the end)
                xs[p].append(h_LBTD[:, :, 0].float().cpu())
            elif pad_BT is None:
                xs[p].append(h_LBTD[:, :, P:].mean(2).float().cpu())
            else:
                keep = (~pad_BT).float()[None, ..., None]
                xs[p].append(((h_LBTD[:, :, P:] * keep).sum(2) / keep.sum(2).clamp_min(1.0)).float().cpu())
        if batch is not last:  # a batch split into rows yields once per row
            ys.append(batch["labels"])
            last = batch
    if not ys:
        raise ValueError("the split yielded no samples")
    return {p: torch.cat(v, dim=1) for p, v in xs.items()}, torch.cat(ys)


@torch.no_grad()
def frame_features(encoder: Encoder, loader: Any, device: torch.device) -> tuple[list[Tensor], list[str]]:
    """Every block's output and the final output at each valid frame, one ``[L + 1, T_i, D]`` (fp32, CPU)
    per item, and the items' transcripts (the CTC probe's inputs)."""
    xs, texts, last = [], [], None
    for h_LBTD, pad_BT, batch in _tapped(encoder, loader, device):
        for b in range(h_LBTD.shape[1]):
            h = h_LBTD[:, b] if pad_BT is None else h_LBTD[:, b, ~pad_BT[b]]
            xs.append(h.float().cpu())
        if batch is not last:
            texts += batch["transcripts"]
            last = batch
    if not xs:
        raise ValueError("the split yielded no samples")
    return xs, texts


class CTCProbe(torch.nn.Module):
    """A linear CTC head on frozen features: a learned softmax-weighted sum of the layers, each
    layer-normalised (SUPERB's protocol for frozen upstreams, Yang et al. 2021; no layer to choose), then one
    linear map to the letters and the blank (id 0)."""

    def __init__(self, num_layers: int, dim: int, vocab: int) -> None:
        super().__init__()
        self.layer_logits = torch.nn.Parameter(torch.zeros(num_layers))
        self.out = torch.nn.Linear(dim, vocab + 1)

    def forward(self, h_LBTD: Tensor) -> Tensor:
        """Layer-normalised features [L, B, T, D] (:func:`ctc_probe` normalises them once) -> log-probabilities
        [B, T, V + 1]."""
        w = self.layer_logits.softmax(0)
        return self.out(torch.einsum("l,lbtd->btd", w, h_LBTD)).log_softmax(-1)


def _pad_LBTD(xs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Items [L, T_i, D] -> zero-padded [L, B, T, D] and the lengths [B]."""
    lengths = torch.tensor([x.shape[1] for x in xs])
    out = xs[0].new_zeros(xs[0].shape[0], len(xs), int(lengths.max()), xs[0].shape[2])
    for b, x in enumerate(xs):
        out[:, b, : x.shape[1]] = x
    return out, lengths


def ctc_probe(
    train_x: Sequence[Tensor],
    train_text: Sequence[str],
    test_x: Sequence[Tensor],
    alphabet: str,
    *,
    steps: int,
    seed: int,
    lr: float = 1e-2,
    batch_size: int = 16,
    progress: Callable[[range], Iterable[int]] = iter,
) -> list[str]:
    """Fit :class:`CTCProbe` on ``train_x`` (items [L, T_i, D]) and their transcripts (letters of
    ``alphabet``) with AdamW for ``steps`` minibatches drawn with ``seed``; returns the greedy transcripts
    of ``test_x``. CTC on frozen features learns slowly at first (blank-only outputs), hence many cheap
    steps on cached features instead of fine-tuning the encoder. ``progress`` wraps the range of steps (a
    progress bar: a minute of steps on a slow CPU)."""
    ids = {c: i + 1 for i, c in enumerate(alphabet)}
    bad = sorted({c for t in train_text for c in t} - set(ids))
    if bad:
        raise ValueError(f"ctc_probe: transcript letters {bad} are not in the alphabet {alphabet!r}")
    targets = [torch.tensor([ids[c] for c in t], dtype=torch.long) for t in train_text]
    train_x = [F.layer_norm(x, x.shape[-1:]) for x in train_x]  # no parameters: once, not every step
    test_x = [F.layer_norm(x, x.shape[-1:]) for x in test_x]
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the head's init from ``seed``; the caller's RNG untouched
        torch.manual_seed(seed)
        head = CTCProbe(train_x[0].shape[0], train_x[0].shape[2], len(alphabet))
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    # fp32 whatever autocast the caller's features were computed under: a small head, many steps
    with torch.enable_grad(), torch.autocast("cpu", enabled=False):
        for _ in progress(range(steps)):
            idx = torch.randint(len(train_x), (min(batch_size, len(train_x)),), generator=g).tolist()
            x, lengths = _pad_LBTD([train_x[i] for i in idx])
            tgt = [targets[i] for i in idx]
            loss = F.ctc_loss(
                head(x).transpose(0, 1), torch.cat(tgt), lengths, torch.tensor([len(t) for t in tgt]),
                zero_infinity=True,  # a transcript longer than its frames: no gradient, not inf
            )  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    hyps = []
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for x in test_x:
            (row,) = ctc_greedy_decode(head(x[:, None]))
            hyps.append("".join(alphabet[i - 1] for i in row))
    return hyps
