"""The label-budget sweep's vocabulary: budgets, seeds, inits, run names, stage names and metric keys.

One fine-tuning run is ``(init, budget, seed)``. Everything that names it is derived here and only here:
- its folder / metrics file / W&B name ``b<budget>-s<seed>-<init>`` (:attr:`Run.name`);
- its DVC stage ``finetune@<m>-<budget>-<seed>-<init>`` (:data:`FINETUNE_STAGE`, dvc.yaml's ``matrix``), or
  ``finetune-joint@<m>-<budget>-<seed>`` for the joint arm (:data:`FINETUNE_JOINT_STAGE`);
- its evaluate metrics ``<task prefix>/<init>/b<budget>/s<seed>/<metric>`` (:meth:`Run.key`, parsed back by
  :data:`EVAL_KEY`) and the linear probe's ``probe/<init>/<metric>`` (:func:`probe_key`, :data:`PROBE_KEY`).
Used by the finetune, evaluate and report stages, the CLI and the Prefect flows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from d2v.config import ConfigError

Init = Literal["pretrained", "scratch", "published", "joint"]
"""'pretrained': start from the pretrain stage's encoder; 'scratch': the same architecture, random init;
'published': the model ``pretrain.<m>.init`` names, as it is (before the pretrain stage's continued
pretraining); 'joint': the modality's encoder of the joint model (``d2v pretrain joint``: its own local
encoder around the Transformer every modality shares)."""
PRETRAINED, SCRATCH, PUBLISHED, JOINT = get_args(Init)
INITS: tuple[Init, ...] = (PRETRAINED, SCRATCH, PUBLISHED, JOINT)
DEFAULT_INITS: tuple[Init, ...] = (PRETRAINED, SCRATCH)
"""What the sweep compares unless told otherwise (``published`` needs ``pretrain.<m>.init``)."""
Budget = int | float
"""Labels per class (an int >= 1) or a fraction of each class's training labels (a float in (0, 1])."""

FINETUNE_STAGE = "finetune@{modality}-{budget}-{seed}-{init}"
"""dvc.yaml's name of one fine-tuning run (a ``matrix`` over modality x budget x seed x init)."""
FINETUNE_JOINT_STAGE = "finetune-joint@{modality}-{budget}-{seed}"
"""dvc.yaml's name of one fine-tuning run of the joint arm (a ``matrix`` over modality x
``sweep.joint_budgets`` x seed): it reads the joint checkpoint, which the ``finetune`` matrix's deps cannot
name for one init only."""
PRETRAIN_JOINT_STAGE = "pretrain-joint"
"""dvc.yaml's name of ``d2v pretrain joint``."""

TASK_PREFIX = {"classification": "evaluate", "ctc": "ctc", "ctc_probe": "ctc_probe"}
"""Metric-key prefix per task: ``evaluate/<init>/b<budget>/s<seed>/accuracy``, ``ctc/.../wer``; the CTC probe
of frozen features (``ctc_probe/<init>/b<clips>/s<probe seed>/wer``) has the same shape."""

EVAL_KEY = re.compile(
    r"^(?P<task>[A-Za-z0-9_]+)/(?P<init>[A-Za-z0-9_-]+)/b(?P<budget>[^/]+)/s(?P<seed>\d+)/(?P<metric>[^/]+)$"
)
"""``evaluate/pretrained/b5/s0/accuracy``, ``ctc/scratch/b10/s1/wer`` (:meth:`Run.key`)."""
RUN_NAME = re.compile(r"^b(?P<budget>[^-/]+)-s(?P<seed>\d+)-(?P<init>[A-Za-z0-9_]+)$")
"""``b5-s0-scratch`` (:attr:`Run.name`), parsed back: a fine-tuning run's folder / metrics file name."""
PROBE_KEY = re.compile(r"^probe/(?P<init>[A-Za-z0-9_-]+)/(?:s(?P<seed>\d+)/)?(?P<metric>[^/]+)$")
"""``probe/pretrained/accuracy`` (optionally ``probe/<init>/s<seed>/<metric>``; :func:`probe_key`)."""


def check_budget(b: Budget, where: str) -> None:
    """ConfigError naming ``where`` unless ``b`` is an int >= 1 or a float in (0, 1]."""
    if isinstance(b, bool) or (isinstance(b, int) and b < 1) or (isinstance(b, float) and not 0.0 < b <= 1.0):
        raise ConfigError(
            f"{where}: {b!r} is not a label budget (an int >= 1 per class, or a fraction in (0, 1])"
        )


def parse_budget(text: str | None, default: Budget) -> Budget:
    """``--budget``: '10' -> 10 labels per class, '0.1' -> 10 % of each class, None -> ``default``."""
    if text is None:
        return default
    try:
        b: Budget = int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ValueError(
            f"--budget {text!r}: expected labels per class (e.g. 10) or a fraction (e.g. 0.1)"
        ) from None
    check_budget(b, "--budget")
    return b


@dataclass(frozen=True)
class SweepConfig:
    """The ``sweep`` section: the ``finetune@<m>-<budget>-<seed>-<init>`` matrix of dvc.yaml.

    One list for every modality (labels per class compare across them); ``evaluate@<m>`` scores exactly
    these runs, so a run removed from the sweep is never read even if its folder is still there.
    """

    budgets: tuple[Budget, ...] = (5, 50)
    """Label budgets: an int is labels per class, a float in (0, 1] a fraction of the train split."""
    seeds: tuple[int, ...] = (0,)
    """Fine-tuning seeds (head init, data order, dropout)."""
    inits: tuple[Init, ...] = DEFAULT_INITS
    """Which encoders to fine-tune: the pretrained one, the from-scratch baseline, and (when pretraining
    starts from ``pretrain.<m>.init``) the published model as it is."""
    joint_budgets: tuple[Budget, ...] = ()
    """The joint arm (``init: joint``, dvc.yaml's ``finetune-joint`` matrix) at these budgets, with the same
    seeds; empty: no joint fine-tuning."""

    def __post_init__(self) -> None:
        if not self.budgets or not self.seeds or not self.inits:
            raise ConfigError("sweep: budgets, seeds and inits need at least one entry each")
        for b in (*self.budgets, *self.joint_budgets):
            check_budget(b, "sweep.budgets / sweep.joint_budgets")
        if JOINT in self.inits:
            raise ConfigError(
                "sweep.inits: the joint arm is not an init of the finetune matrix (its runs read the joint "
                "checkpoint): list its budgets in sweep.joint_budgets instead"
            )

    def budgets_of(self, init: str) -> tuple[Budget, ...]:
        """The budgets arm ``init`` runs at: ``joint_budgets`` for the joint arm (``budgets`` when it has
        none: ``d2v finetune --init joint`` alone), ``budgets`` for the others."""
        return (self.joint_budgets or self.budgets) if init == JOINT else self.budgets


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the sweep."""

    init: Init
    budget: Budget
    seed: int

    @property
    def name(self) -> str:
        """``b10-s0-pretrained``, ``b0.1-s2-scratch``: the folder / metrics / W&B name of the run."""
        return f"b{self.budget}-s{self.seed}-{self.init}"

    def stage(self, modality: str) -> str:
        """The run's DVC stage name."""
        return finetune_stage(modality, self.budget, self.seed, self.init)

    def key(self, task: str, metric: str) -> str:
        """The evaluate metric key of this run (parsed back by :data:`EVAL_KEY`)."""
        return f"{TASK_PREFIX[task]}/{self.init}/b{self.budget}/s{self.seed}/{metric}"


def finetune_stage(modality: str, budget: Budget | str, seed: int | str, init: str) -> str:
    """``finetune@<m>-<budget>-<seed>-<init>``, or ``finetune-joint@<m>-<budget>-<seed>`` for the joint arm."""
    if init == JOINT:
        return FINETUNE_JOINT_STAGE.format(modality=modality, budget=budget, seed=seed)
    return FINETUNE_STAGE.format(modality=modality, budget=budget, seed=seed, init=init)


def pretrain_stage(target: str) -> str:
    """``pretrain@<m>`` for a modality, ``pretrain-joint`` for ``joint``."""
    return PRETRAIN_JOINT_STAGE if target == JOINT else f"pretrain@{target}"


def probe_key(init: Init, metric: str) -> str:
    """``probe/<init>/<metric>`` or, per probe seed, ``probe/<init>/s<seed>/<metric>``: the linear probe of
    frozen features (parsed back by :data:`PROBE_KEY`)."""
    return f"probe/{init}/{metric}"


def probe_tasks(manifest: dict[str, Any] | None) -> list[str]:
    """The shards' labelled tasks, each of which evaluate probes: 'classification' first (the headline
    ``probe/<init>/<metric>`` keys), then the others in sorted order, whose metrics are named
    ``<task>_<metric>`` (``probe/<init>/s0/sentiment_accuracy``)."""
    tasks = (manifest or {}).get("tasks") or {}
    labelled = sorted(t for t, e in tasks.items() if isinstance(e, dict) and e.get("target") == "label")
    return sorted(labelled, key=lambda t: t != "classification")


def planned_runs(
    sweep: SweepConfig, budget: str | None = None, seed: int | None = None, init: Init | None = None
) -> list[Run]:
    """Every run the sweep lists (budgets x seeds x inits, then the joint arm: joint_budgets x seeds),
    narrowed by ``--budget`` / ``--seed`` / ``--init`` when given."""
    seeds = [int(seed)] if seed is not None else list(sweep.seeds)
    inits = [init] if init is not None else [*sweep.inits, *([JOINT] if sweep.joint_budgets else [])]
    bad = [i for i in inits if i not in INITS]
    if bad:
        raise ConfigError(f"sweep.inits / --init: {bad} not in {list(INITS)}")
    runs = []
    for i in inits:
        listed = sweep.budgets_of(i)
        budgets = [parse_budget(budget, listed[0])] if budget is not None else list(listed)
        runs += [Run(i, b, s) for b in budgets for s in seeds]
    return runs
