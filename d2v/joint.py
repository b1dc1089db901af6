"""Joint pretraining: ONE Transformer stack (and one EMA teacher of it) for speech, images and text.

data2vec's authors hoped for "a unified masking strategy and mixed data sets of different modalities" ([P1],
conclusion); fairseq's data2vec 2.0 code has the structure (``Data2VecMultiModel``: one block stack, a
``modality_encoders`` dict) but trains one modality per released config. Here each modality keeps everything
but the blocks: its local encoder, positions, mask embedding, the norms before and after the stack, its
regression head or data2vec 2.0 decoder, its masking, targets, loss and teacher schedule, and the algorithm
its ``model.<m>`` says. The ``joint:`` section holds what is shared: the stack, its optimizer and teacher
schedule, the mixing of the modalities' updates and a seed.

Mixing (``interleave``): one modality per update, in a seeded order that gives each modality exactly the
updates, batch size and samples of its separate run (``pretrain.<m>.steps`` / ``batch_size``), spread evenly
over the run; total compute is the sum of the separate runs' by construction. Two modalities never share a
tensor. The position in the order and in each modality's stream is part of the data position, so a resume
is bit-exact.

The shared teacher is stepped once per update, with the joint schedule (stepping it once per modality
would average it three times: tau cubed). A modality's own teacher parts are stepped on its own updates
only, with its own schedule at its own update count. AdamW has one group (pair) for the stack, with
``joint.optim``, and each modality's parameters keep ``pretrain.<m>.optim``'s LR, betas, eps and weight
decay; each update is clipped with its modality's ``clip_norm``.

Shape legend as in ``d2v/data2vec.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from d2v import checkpoint, distributed, loop, runner
from d2v.config import ConfigError, PathsConfig, TransformerConfig, from_dict, section, to_dict
from d2v.data2vec import Data2Vec, EMAConfig, ema_decay
from d2v.modalities import JOINT, MODALITIES, get
from d2v.modalities.base import Encoder
from d2v.optim import OptimConfig, lr_scale, param_groups
from d2v.precision import Precision
from d2v.transformer import DROPOUT_KEYS, TransformerStack, init_bert_params, set_dropout

Mixing = Literal["interleave", "all"]
LossNorm = Literal["none", "running"]
METRICS = ("loss", "target_var", "pred_var", "stack_grad_norm")
"""What is logged per modality (``<m>/<name>``): means over the modality's own updates since the last log."""


def _joint_transformer() -> TransformerConfig:
    # the small presets' width and depth (every modality's CPU default: 6 x 256), post-LN: see params.yaml
    return TransformerConfig(dim=256, depth=6, heads=4, ffn_dim=1024)


@dataclass(frozen=True)
class JointConfig:
    """The ``joint`` section: what the modalities share in ``d2v pretrain joint``."""

    modalities: tuple[str, ...] = ()
    """The modalities pretrained together (each with its ``model.<m>``, ``pretrain.<m>`` and shards). ()
    (the default) switches the joint arm off: ``d2v pretrain joint`` then writes a run folder holding only a
    note (the ``pretrain-joint`` stage of dvc.yaml still has its outputs), and nothing reads it."""
    transformer: TransformerConfig = field(default_factory=_joint_transformer)
    """The one block stack every modality runs (it replaces ``model.<m>.transformer``)."""
    mixing: Mixing = "interleave"
    """'interleave': one modality per update, each with exactly its separate run's updates
    (``pretrain.<m>.steps``), in a seeded order spread evenly over the run. 'all': every update takes one
    batch of every modality (each of its ``pretrain.<m>.batch_size``), their losses averaged, clipped with
    ``optim.clip_norm``; it also logs the cosine between the modalities' gradients on the shared stack."""
    steps: int | None = None
    """'all' only: the updates of the run (None: the largest ``pretrain.<m>.steps``). Every modality then
    sees ``steps`` batches, more than its separate run where its own ``steps`` is smaller."""
    loss_norm: LossNorm = "none"
    """'none': each modality's data2vec loss as its separate run has it (targets normalised per layer to unit
    scale, L2 summed over D x 1/sqrt(D) with the shared D: the same form for all). 'running': each loss
    divided by a running mean of its own value (``loss_norm_decay``), so that every modality's updates move
    the shared stack by comparable amounts whatever its loss level."""
    loss_norm_decay: float = 0.99
    """Decay of the running mean of 'running' (per update of the modality)."""
    dropout: Literal["shared", "own"] = "own"
    """'shared': ``joint.transformer``'s dropout rates for every modality. 'own': the shared stack runs each
    modality's update at that modality's rates (``model.<m>.transformer``'s dropout, attention and activation
    dropout, as its separate run has them: 0 for data2vec 2.0 images, 0.1 for speech and text), and its encoder
    keeps them for fine-tuning. With 'shared' at 0.1 the joint image encoder's features move under dropout as far
    as images lie apart, and it fine-tunes below scratch; with 'own' it does not (RESULTS.md, log entries "the
    joint encoders' dropout" and "the joint teacher's schedule")."""
    modality_norms: bool = False
    """True: every modality has its own LayerNorm gains and biases inside the shared blocks (a few thousand
    parameters per modality; the attention and FFN weights stay shared), and its teacher their EMA."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and LR schedule of the shared stack (the modalities' own parameters follow ``pretrain.<m>.optim``;
    every schedule runs over the joint run's updates)."""
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(tau0=0.9978, tau_end=0.99978, tau_n=1360))
    """Decay schedule of the shared teacher stack, per joint update. Every modality's update moves it, so a
    modality that makes a share s of the updates sees it move 1/s times per update of its own: 1 - tau =
    (1 - its separate run's tau) x s gives that modality its separate teacher's lag. The default is the demo's:
    speech's 0.995 -> 0.9995 at its 600 of 1,360 updates."""
    seed: int | None = None
    """Seed of the joint run (initial weights, the interleaving, masks, dropout); None: the top-level seed."""
    grad_accum: int = 1
    """Micro-batches per update (each modality's per-rank batch is ``pretrain.<m>.batch_size`` / (ranks x
    grad_accum))."""
    precision: Precision = "bf16"
    """As ``pretrain.<m>.precision``, for every modality of the joint run."""
    parallel: distributed.Parallel = "ddp"
    """Under torchrun, as ``pretrain.<m>.parallel``: 'ddp', or 'fsdp' (FSDP2: every block of the shared stack
    and its teacher sharded, the modalities' own parts in the root's unit). Every rank runs the same modality
    in an update, so the parameters another modality owns are left out of that update's reductions alike on
    every rank."""
    dist_timeout_s: float = distributed.TIMEOUT_S
    """As ``pretrain.<m>.dist_timeout_s``."""
    log_every: int = 10
    """Read the metrics (one host sync), log them and run the guards every this many updates."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many updates (and at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest k checkpoints."""

    def __post_init__(self) -> None:
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"modalities must name each modality once, got {list(self.modalities)}")
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        if unknown:
            raise ConfigError(f"modalities: unknown {unknown}; expected some of {list(MODALITIES)}")
        if not 0.0 < self.loss_norm_decay < 1.0:
            raise ConfigError(f"loss_norm_decay must be in (0, 1), got {self.loss_norm_decay}")
        for name in ("grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if self.parallel == "fsdp" and self.modality_norms:
            # each update swaps m's norms into the stack by a functional call, which FSDP2's sharded
            # parameters do not take
            raise ConfigError("modality_norms: true needs parallel: ddp (FSDP2 shards the norms it would swap)")
        if self.steps is not None and (self.mixing != "all" or self.steps < 1):
            raise ConfigError(
                f"steps: {self.steps} is for mixing: all (at least 1); mixing: interleave makes each "
                "modality's pretrain.<m>.steps"
            )


# --------------------------------------------------------------------------------------------- pure parts


def interleave(counts: dict[str, int], seed: int) -> list[str]:
    """The modality of every update: ``counts[m]`` updates of each ``m``, ``sum(counts)`` in all.

    Update i of modality m (0-based) is placed at ``(i + u) / counts[m]`` with u ~ U[0, 1) drawn from
    ``seed``, and all are sorted: each modality is spread evenly over the run (its LR schedule and teacher
    schedule then see it at the same fraction of the run as its separate run would), in a seeded order.
    """
    g = torch.Generator().manual_seed(seed)
    keys: list[tuple[float, str]] = []
    for m in sorted(counts):
        n = counts[m]
        u = torch.rand(n, generator=g, dtype=torch.float64).tolist()
        keys += [((i + u[i]) / n, m) for i in range(n)]
    return [m for _, m in sorted(keys)]


def plan(cfg: JointConfig, counts: dict[str, int], seed: int) -> list[tuple[str, ...]]:
    """The modalities of every update: one each in the ``interleave`` order, or all of them (``all``: for
    ``cfg.steps`` updates, None: the largest count)."""
    counts = {m: counts[m] for m in cfg.modalities}
    if cfg.mixing == "all":
        return [tuple(cfg.modalities)] * (cfg.steps or max(counts.values()))
    return [(m,) for m in interleave(counts, seed)]


def own_updates(updates: list[tuple[str, ...]]) -> list[dict[str, int]]:
    """For every update, each of its modalities' update count once it is done (1 for a first update)."""
    seen: dict[str, int] = {}
    out = []
    for ms in updates:
        for m in ms:
            seen[m] = seen.get(m, 0) + 1
        out.append({m: seen[m] for m in ms})
    return out


def stack_conflicts(
    joint: TransformerConfig, own: dict[str, dict[str, Any]], own_dropout: bool = False
) -> list[str]:
    """The ``model.<m>.transformer.<key>`` values a user set that differ from the joint stack's:
    ``own[m]`` is the user's ``model.<m>.transformer`` section as written (preset defaults are not a choice
    and are replaced silently). ``own_dropout``: the dropout rates are each modality's (``dropout: own``),
    never a conflict."""
    shared = to_dict(joint)
    skip = set(DROPOUT_KEYS) if own_dropout else set()
    return [
        f"model.{m}.transformer.{k}: {v!r} (joint.transformer.{k}: {shared[k]!r})"
        for m, section_ in own.items()
        for k, v in sorted((section_ or {}).items())
        if k in shared and k not in skip and v != shared[k] and not (isinstance(v, list) and tuple(v) == shared[k])
    ]


def share_stack(encoder: Encoder, stack: TransformerStack) -> None:
    """Make ``encoder`` run ``stack`` without owning it: its own stack is dropped, and the shared one is a
    plain attribute, so ``encoder.state_dict()`` and ``parameters()`` leave it to the module that registers
    it (``JointData2Vec``: stored once)."""
    attr = encoder.stack_attr
    del encoder._modules[attr]
    encoder.__dict__[attr] = stack


# ----------------------------------------------------------------------------------------------- model


class JointData2Vec(nn.Module):
    """One shared stack (student and EMA teacher) and one ``Data2Vec`` / ``Data2Vec2`` member per modality,
    whose encoders run the shared stack.

    ``forward(batch)``: ``batch["modality"]`` picks the member; the rest is that modality's batch. Returns
    the (normalised) loss and, for every modality m, ``m/loss``, ``m/target_var``, ``m/pred_var`` (this
    batch's values for its modality, 0 for the others) and ``m/updates`` (1 or 0), so that the loop's means
    divided by ``m/updates`` are means over m's own batches (``summarize``).
    """

    def __init__(self, members: dict[str, Data2Vec], stack: TransformerStack, cfg: JointConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stack = stack
        self.teacher_stack = copy.deepcopy(stack).float().requires_grad_(False)
        self.members = nn.ModuleDict()
        for m, member in members.items():
            share_stack(member.student, self.stack)
            share_stack(member.teacher, self.teacher_stack)
            member._ema_pairs, member._copy_pairs = member._ema_plan()  # its own parts only
            self.members[m] = member
        for m in members:  # running means of 'running' loss normalisation (0: no update yet)
            self.register_buffer(f"loss_mean_{m}", torch.zeros(()), persistent=True)
        if cfg.modality_norms:  # each modality's copy of the blocks' LayerNorm parameters, student and teacher
            self.norms = nn.ModuleDict({m: _norm_copies(stack, grad=True) for m in members})
            self.teacher_norms = nn.ModuleDict({m: _norm_copies(self.teacher_stack, grad=False) for m in members})
        self.current: str | None = None
        """The modality of the batch in progress (set by ``forward``)."""
        self.dropout_rates = {
            m: {k: getattr(member.student.config.transformer, k) for k in DROPOUT_KEYS} for m, member in members.items()
        }
        """Each modality's dropout rates (its member config's), which the shared stack runs its updates at."""
        # mixing 'all': each modality's gradient on the stack, as the difference the modality's backward made
        self._seen: Tensor | None = None
        self._grads: dict[str, Tensor] = {}
        self.teacher_stack.eval()

    def train(self, mode: bool = True) -> JointData2Vec:
        super().train(mode)
        self.teacher_stack.eval()  # not under a member's teacher: set here (no dropout, no LayerDrop)
        return self

    def _normalised(self, m: str, loss: Tensor) -> Tensor:
        """``loss`` / the running mean of m's loss (updated first, from the loss averaged over ranks so that
        every rank scales alike); unchanged with ``loss_norm: none``."""
        if self.cfg.loss_norm == "none" or not self.training:
            return loss
        mean = getattr(self, f"loss_mean_{m}")
        value = distributed.all_reduce_mean(loss.detach().float().reshape(1))[0]
        d = self.cfg.loss_norm_decay
        with torch.no_grad():
            mean.copy_(torch.where(mean > 0, d * mean + (1 - d) * value, value))
        return loss / mean.clamp_min(1e-8)

    def forward(self, batch: dict[str, Any], own_norms: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        m = batch["modality"]
        if self.cfg.modality_norms and not own_norms:
            # the same forward with m's LayerNorm parameters in place of the shared ones, student and teacher
            swap = {f"stack.{n.replace(SEP, '.')}": p for n, p in self.norms[m].items()}
            swap.update({f"teacher_stack.{n.replace(SEP, '.')}": p for n, p in self.teacher_norms[m].items()})
            return torch.func.functional_call(self, swap, (batch,), {"own_norms": True})
        self.current = m
        set_dropout(self.stack, self.dropout_rates[m])
        loss, metrics = self.members[m]({k: v for k, v in batch.items() if k != "modality"})
        out = {"loss": loss.detach()}
        zero = loss.new_zeros((), dtype=torch.float32)
        for k in self.members:
            out[f"{k}/updates"] = zero + float(k == m)
            for name in METRICS[:-1]:
                out[f"{k}/{name}"] = metrics[name].detach().float() if k == m else zero
        return self._normalised(m, loss), out

    def _stack_grad(self) -> Tensor:
        """The stack's gradient as one flat fp32 vector [P] (zeros where a parameter has none); under FSDP2
        this rank's shard of it."""
        return torch.cat([
            _local(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in self.stack.parameters()
        ])  # fmt: skip

    def after_backward(self) -> None:
        """Mixing 'all': file the gradient this batch's backward added to the stack under its modality."""
        now = self._stack_grad()
        added = now if self._seen is None else now - self._seen
        m = self.current
        self._grads[m] = self._grads[m] + added if m in self._grads else added
        self._seen = now

    def grad_metrics(self) -> dict[str, Tensor]:
        """Per modality, the gradient norm on the shared stack (0 for a modality without a batch in this
        update); with mixing 'all' also ``cos/<a>-<b>``, the cosine between two modalities' gradients on it."""
        if self.cfg.mixing != "all":  # one modality: the norm of the accumulated gradients, no flat copy
            grads = [p.grad for p in self.stack.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros(())
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
            return {f"{k}/stack_grad_norm": norm * float(k == self.current) for k in self.members}
        grads, self._grads, self._seen = self._grads, {}, None
        names = sorted(grads)
        # norms and cosines from the dot products, which are sums over the elements: under FSDP2 each rank
        # holds a shard of every gradient, and the ranks' partial sums add up to the full ones
        dots = torch.stack([torch.stack([grads[a] @ grads[b] for b in names]) for a in names])
        if hasattr(next(self.stack.parameters()), "to_local"):  # DTensors: the stack is FSDP2-sharded
            distributed.all_reduce_sum(dots)
        norms = dots.diagonal().clamp_min(0).sqrt()
        out = {f"{k}/stack_grad_norm": norms[i] for i, k in enumerate(names)}
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):
                out[f"cos/{a}-{names[j]}"] = dots[i, j] / (norms[i] * norms[j]).clamp_min(1e-8)
        return out

    @torch.no_grad()
    def ema_step(self, step: int, own: dict[str, int]) -> dict[str, float]:
        """After update ``step`` (1-based count): the shared teacher stack once, at the joint schedule; then the
        own teacher parts of each modality of the update, ``own[m]`` being its update count."""
        tau = ema_decay(step, self.cfg.ema)
        if tau < 1.0:
            teacher = list(self.teacher_stack.parameters())
            student = [p.detach().float() for p in self.stack.parameters()]
            torch._foreach_lerp_(teacher, student, 1.0 - tau)
        out = {"tau": tau}
        for m, n in own.items():
            member = self.members[m]
            out[f"{m}/tau"] = ema_decay(n, member.ema)
            member.ema_step(out[f"{m}/tau"])
            if self.cfg.modality_norms and tau < 1.0:  # m's norms: the shared schedule, on m's updates
                teacher = list(self.teacher_norms[m].values())
                torch._foreach_lerp_(teacher, [p.detach().float() for p in self.norms[m].values()], 1.0 - tau)
        return out


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters and gradients); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


SEP = "__"
"""Stands for "." in the parameter names of ``JointData2Vec.norms`` (a ParameterDict key has no dot)."""


def _norm_copies(stack: nn.Module, grad: bool) -> nn.ParameterDict:
    """Copies of ``stack``'s LayerNorm parameters, keyed by their names with ``SEP`` for the dots."""
    norms = {n for n, mod in stack.named_modules() if isinstance(mod, nn.LayerNorm)}
    return nn.ParameterDict({
        name.replace(".", SEP): nn.Parameter(p.detach().clone(), requires_grad=grad)
        for name, p in stack.named_parameters()
        if name.rsplit(".", 1)[0] in norms
    })  # fmt: skip


def summarize(
    modalities: Iterable[str], per_update: bool = False
) -> Callable[[dict[str, float], list[dict]], dict[str, float | None]]:
    """(the loop's window means, the history so far) -> per-modality means over each modality's own batches
    (``m/updates`` is the share of the window's batches that were m's). A modality without a batch in the
    window keeps its values of the last history row (None before its first); read from the history, they
    survive a resume. ``per_update``: every update had every modality (mixing 'all'), so the gradient norms
    are already means per update."""
    keys = [f"{m}/{k}" for m in modalities for k in METRICS]

    def apply(means: dict[str, float], history: list[dict]) -> dict[str, float | None]:
        last = history[-1] if history else {}
        out = {k: v for k, v in means.items() if not k.endswith("/updates") and k not in keys}
        for m in modalities:
            share = means.get(f"{m}/updates", 0.0)
            for k in METRICS:
                key = f"{m}/{k}"
                if key not in means or share <= 0:
                    out[key] = last.get(key)
                else:
                    out[key] = means[key] if per_update and k == "stack_grad_norm" else means[key] / share
        return out

    return apply


# ------------------------------------------------------------------------------------------ the stream


class JointStream:
    """Batches of the modalities of every update of ``updates`` (``plan``): ``grad_accum`` batches of each,
    from that modality's ``EpochStream``, each tagged ``modality``. ``position()`` is the batches taken so far
    and every stream's position, so a resume continues the plan and each modality's data where they were."""

    def __init__(
        self,
        loaders: dict[str, Callable[[int], Iterable[dict[str, Any]]]],
        updates: list[tuple[str, ...]],
        grad_accum: int,
        position: dict[str, Any] | None = None,
    ) -> None:
        position = position or {}
        saved = position.get("streams", {})
        self.updates, self.grad_accum = updates, grad_accum
        self.per_update = len(updates[0]) * grad_accum
        self.consumed = int(position.get("batches", 0))
        self.streams = {m: loop.EpochStream(make, **saved.get(m, {})) for m, make in loaders.items()}

    def position(self) -> dict[str, Any]:
        return {"batches": self.consumed, "streams": {m: s.position() for m, s in self.streams.items()}}

    def __iter__(self) -> JointStream:
        return self

    def __next__(self) -> dict[str, Any]:
        update, k = divmod(self.consumed, self.per_update)
        if update >= len(self.updates):
            raise ValueError(f"the joint plan has {len(self.updates)} updates; asked for update {update + 1}")
        m = self.updates[update][k // self.grad_accum]
        batch = next(self.streams[m])
        self.consumed += 1
        return {**batch, "modality": m}


# ------------------------------------------------------------------------------------------- optimizer


def build_optim(
    model: JointData2Vec, shared: OptimConfig, own: dict[str, OptimConfig], total: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with the stack's decay/no-decay groups (``shared``) and each modality's (``own[m]``: its LR,
    betas, eps and weight decay), and one LR schedule per group over the ``total`` joint updates.

    A group whose modality did not run in an update has no gradients, so AdamW leaves it (and its moments)
    alone: a modality's parameters move on its own updates only.
    """
    groups: list[dict] = []
    lambdas: list[Callable[[int], float]] = []
    parts: list[tuple[nn.Module, OptimConfig]] = [(model.stack, shared)]
    parts += [(model.members[m], own[m]) for m in model.members]
    if model.cfg.modality_norms:
        parts += [(model.norms[m], own[m]) for m in model.members]
    for module, cfg in parts:
        for g in param_groups(module, cfg):
            groups.append({**g, "betas": cfg.betas, "eps": cfg.eps})
            lambdas.append(lambda s, cfg=cfg: lr_scale(s, total, cfg))
    fused = groups[0]["params"][0].device.type in ("cuda", "cpu")
    opt = torch.optim.AdamW(groups, lr=shared.lr, fused=fused or None)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


# ---------------------------------------------------------------------------------------- build, load


def build_joint_model(
    cfg: JointConfig, model_cfgs: dict[str, Any], seed: int
) -> JointData2Vec:
    """Every modality's pretraining model with the joint stack's config, then one shared stack
    (``init_bert_params``, as speech and text initialise theirs) in place of theirs."""
    torch.manual_seed(seed)
    members = {m: get(m).build_pretrain_model(model_cfgs[m]) for m in cfg.modalities}
    stack = TransformerStack(cfg.transformer)
    stack.apply(init_bert_params)
    return JointData2Vec(members, stack, cfg)


def member_config(model_cfg: Any, cfg: JointConfig) -> Any:
    """A modality's ``ModelConfig`` with the joint stack's ``transformer``, at the modality's own dropout
    rates with ``dropout: own``."""
    if cfg.dropout == "shared":
        return replace(model_cfg, transformer=cfg.transformer)
    own = {k: getattr(model_cfg.transformer, k) for k in DROPOUT_KEYS}
    return replace(model_cfg, transformer=replace(cfg.transformer, **own))


@dataclass(frozen=True)
class JointRunConfig(loop.LoopConfig):
    """The loop settings of a joint run, derived from ``joint`` and ``pretrain.<m>`` (not a params section):
    ``steps`` is the sum of the modalities' updates; ``optim`` the shared stack's."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """The shared stack's optimizer settings."""


def joint_job(
    model: JointData2Vec,
    cfg: JointConfig,
    stage_cfgs: dict[str, Any],
    loaders: dict[str, Callable[[int], Iterable[dict[str, Any]]]],
    updates: list[tuple[str, ...]],
    run_dir: Path,
    meta: dict[str, Any],
    files: dict[str, Path | bytes] | None = None,
) -> runner.Job:
    """The runner's job of a joint run: the modalities of every update (``plan``) over their ``loaders``
    (this rank's), each modality's ``stage_cfgs[m]`` (``PretrainConfig``: optimizer, clipping, collapse
    guards), the shared stack's ``cfg``."""
    from d2v.pretrain import CURVE_FIELDS, collapse_check

    total = len(updates)
    own = own_updates(updates)
    per_update = len(updates[0]) * cfg.grad_accum
    run_cfg = JointRunConfig(
        steps=total, batch_size=per_update, grad_accum=per_update, precision=cfg.precision, parallel=cfg.parallel,
        dist_timeout_s=cfg.dist_timeout_s, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints, optim=cfg.optim,
    )  # fmt: skip

    def after_step(done: int) -> dict[str, float]:
        return model.ema_step(done, own[done - 1])

    def check(step: int, metrics: dict[str, Any]) -> str | None:
        for m, c in stage_cfgs.items():
            values = {k: metrics.get(f"{m}/{k}") for k in ("target_var", "pred_var")}
            done = max((o[m] for o in own[:step] if m in o), default=0)
            problem = None if None in values.values() else collapse_check(done, values, c)
            if problem:
                return f"{m}: {problem}"
        return None

    everything = cfg.mixing == "all"
    clip = {m: c.optim.clip_norm for m, c in stage_cfgs.items()}
    names = sorted(cfg.modalities)
    cosines = [f"cos/{a}-{b}" for i, a in enumerate(names) for b in names[i + 1 :]] if everything else []
    curve = (*CURVE_FIELDS, *(f"{m}/{k}" for m in cfg.modalities for k in METRICS), *cosines)
    own_optim = {m: c.optim for m, c in stage_cfgs.items()}
    return runner.Job(
        "pretrain", model, run_cfg, loaders[cfg.modalities[0]], Path(run_dir), meta, curve, files=files,
        after_step=after_step, check=check,
        build_optim=lambda mod: build_optim(mod, cfg.optim, own_optim, total),
        clip_norm=(lambda: cfg.optim.clip_norm) if everything else (lambda: clip[model.current]),
        grad_metrics=model.grad_metrics, summarize=summarize(cfg.modalities, per_update=everything),
        after_backward=model.after_backward if everything else None,
        make_stream=lambda position: JointStream(loaders, updates, cfg.grad_accum, position),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- CLI


OFF_NOTE = "joint pretraining is off (joint.modalities: []): no joint arm in fine-tuning or evaluation\n"


def joint_section(params: dict[str, Any]) -> JointConfig:
    return from_dict(JointConfig, params.get("joint") or {}, "joint")


def cli_pretrain_joint(params: dict[str, Any], args: Any) -> int:
    """``d2v pretrain joint``: every modality's config, shards and loader are checked before any model."""
    from d2v.data.loader import read_manifest
    from d2v.data.remote import shard_location
    from d2v.data.shards import manifest_sha256, preprocessing_files
    from d2v.initialize import model_config
    from d2v.pretrain import PretrainConfig, pretrain_loader

    cfg = joint_section(params)
    seed = int(params.get("seed", 0)) if cfg.seed is None else cfg.seed
    paths = section(params, "paths", PathsConfig)
    if not cfg.modalities:
        checkpoint.write_off(Path(paths.checkpoints) / "pretrain" / JOINT, OFF_NOTE,
                             Path(paths.metrics) / "pretrain" / f"{JOINT}.json",
                             Path(paths.plots) / "pretrain" / f"{JOINT}.csv")  # fmt: skip
        return 0
    models = params.get("model") or {}
    own_stack = {m: ((models.get(m) or {}).get("transformer") or {}) for m in cfg.modalities}
    conflicts = stack_conflicts(cfg.transformer, own_stack, cfg.dropout == "own")
    if conflicts:
        raise ConfigError(
            "joint pretraining runs one stack, joint.transformer, and model.<m>.transformer contradicts it: "
            + "; ".join(conflicts) + ". Remove those keys or set joint.transformer"
        )
    stage_cfgs = {m: section(params, "pretrain", PretrainConfig, m) for m in cfg.modalities}
    for m, c in stage_cfgs.items():
        if c.init is not None:
            raise ConfigError(
                f"pretrain.{m}.init is set ({c.init}); joint pretraining starts every modality from random "
                f"init (a published model's stack is one modality's): set pretrain.{m}.init: null"
            )
    model_cfgs = {m: member_config(model_config(models.get(m), m, None), cfg) for m in cfg.modalities}
    info = distributed.init(timeout_s=cfg.dist_timeout_s)
    loaders, manifests, shard_dirs = {}, {}, {}
    for m in cfg.modalities:
        shard_dirs[m] = shard_location(paths.shards, m)
        manifests[m] = read_manifest(shard_dirs[m])
        loaders[m] = pretrain_loader(stage_cfgs[m], shard_dirs[m], model_cfgs[m], seed, info, cfg.grad_accum,
                                     f"pretrain.{m}")  # fmt: skip
    counts = {m: stage_cfgs[m].steps for m in cfg.modalities}
    updates = plan(cfg, counts, seed)
    batches = {m: sum(1 for u in updates if m in u) for m in cfg.modalities}
    model = build_joint_model(cfg, model_cfgs, seed)

    meta = {
        "modality": JOINT, "kind": "pretrain", "model_config": {m: to_dict(c) for m, c in model_cfgs.items()},
        "joint": to_dict(cfg), "config": {m: to_dict(c) for m, c in stage_cfgs.items()}, "seed": seed,
        "preprocessing": {m: manifests[m].get("preprocessing") for m in cfg.modalities}, "init": None,
        "updates": batches,
    }  # fmt: skip
    fingerprint = {
        "joint": to_dict(cfg), "model_config": meta["model_config"], "seed": seed,
        "config": {m: runner.resume_relevant(c) for m, c in stage_cfgs.items()},
        "data": {m: manifest_sha256(shard_dirs[m]) for m in cfg.modalities},
    }  # fmt: skip
    files = {f"{m}/{k}": v for m in cfg.modalities
             for k, v in preprocessing_files(manifests[m], shard_dirs[m]).items()}  # fmt: skip
    run_dir = Path(paths.checkpoints) / "pretrain" / JOINT
    job = joint_job(model, cfg, stage_cfgs, loaders, updates, run_dir, meta, files=files)
    # the stack is counted once; each modality's encoder (what fine-tuning loads) is its own parameters and
    # the stack (a member does not own it: share_stack)
    stack_params = sum(p.numel() for p in model.stack.parameters())
    info_of_run: dict[str, int] = {"stack_params": stack_params}
    for m in cfg.modalities:
        info_of_run[f"updates_{m}"] = batches[m]
        own = sum(p.numel() for p in model.members[m].student.parameters())
        info_of_run[f"encoder_params_{m}"] = own + stack_params
    outputs = runner.Outputs(
        Path(paths.metrics) / "pretrain" / f"{JOINT}.json", Path(paths.plots) / "pretrain" / f"{JOINT}.csv",
        batch_size=round(sum(stage_cfgs[m].batch_size * batches[m] for m in batches) / len(updates)),
        info=info_of_run,
    )  # fmt: skip
    runner.run_stage(
        job, params=params, modality=JOINT, fingerprint=fingerprint, outputs=outputs, seed=seed, info=info,
        run_config={"joint": to_dict(cfg), "model": meta["model_config"], "pretrain": meta["config"]},
    )  # fmt: skip
    return 0
