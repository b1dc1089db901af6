"""torchrun process groups, model wrapping (DDP / FSDP2) and the few collectives the loop needs.

``torchrun --nproc-per-node N -m d2v pretrain audio`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
everything here is a single-process no-op. Only rank 0 writes checkpoints, logs and metrics. Several nodes are
one torchrun per node with a c10d rendezvous (docs/recipes.md, "Several nodes"): every rank must then see the
same run folder (:func:`check_shared_folder`).

Parallelism (``parallel`` param):
- 'ddp': gradients all-reduced (averaged) after backward; every rank keeps a full model, optimizer and
  teacher. NCCL on GPU, gloo on CPU.
- 'fsdp': FSDP2 (``torch.distributed.fsdp.fully_shard``), meant for the large preset on GPUs: each Transformer
  block of the student *and* of the teacher is sharded the same way, so the EMA (a foreach lerp over matching
  shards) never gathers; checkpoints gather full state dicts on rank 0 via
  ``torch.distributed.checkpoint.state_dict``. It also runs on CPU over gloo, which is how the unit tests
  check it against one process (tests/unit/test_distributed.py; the bf16/NCCL path is in tests/gpu).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from d2v.transformer import Block

Parallel = Literal["ddp", "fsdp"]
TIMEOUT_S = 1800.0
"""The process group's default timeout (``LoopConfig.dist_timeout_s`` says why 30 minutes)."""
SHARED_TOKEN = ".tmp-shared-"
"""Name prefix of :func:`check_shared_folder`'s token file: ``.tmp-*``, so ``checkpoint.clean_stale`` removes
one a killed run left behind."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(local_rank: int = 0) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init(device: torch.device | None = None, timeout_s: float = TIMEOUT_S) -> DistInfo:
    """Join the torchrun process group if RANK/WORLD_SIZE are set (NCCL on GPU, gloo on CPU).

    ``timeout_s``: how long a collective waits for the other ranks before it fails (``dist_timeout_s``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = device or pick_device(local)
    if world == 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local, device)
    note = restart_store_note(os.environ)
    if note and info.is_main:
        print(note, file=sys.stderr)
    return info


def restart_store_note(env: Mapping[str, str]) -> str | None:
    """A warning when torchrun may restart the workers while they share the agents' store.

    torchrun (2.5 and later) hands its workers the rendezvous store and keeps it across restarts without a
    per-round prefix, so a restarted group can read the dead group's addresses and fail to connect (gloo
    did on torch 2.11 in tests/unit/test_multinode.py's elastic test; pytorch/pytorch#135712 with NCCL).
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in the agents' environment gives every round a store of its own.
    """
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts == 0 or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return (
        f"d2v: torchrun --max-restarts {restarts} with the store shared between agents and workers: a restarted "
        "group can read the old group's addresses from it and fail to connect (pytorch/pytorch#135712). "
        "Export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node before torchrun (docs/recipes.md, "
        '"Several nodes")'
    )


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside a DDP wrapper (FSDP2 modifies the module in place: nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap(model: nn.Module, info: DistInfo, parallel: Parallel = "ddp") -> nn.Module:
    """DDP- or FSDP2-wrap ``model`` for ``info.world_size > 1`` (FSDP2 also applies at world size 1)."""
    if parallel == "fsdp":
        return shard_fsdp(model)
    if info.world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[info.device.index] if info.device.type == "cuda" else None,
        # LayerDrop and the text student (input-space masking) leave parameters unused in some steps.
        find_unused_parameters=True,
        broadcast_buffers=False,  # no batch-norm; buffers (position indices) are constant
    )


def shard_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: shard every Transformer block (student and teacher alike), then the root module."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # a 1-device run outside torchrun: a group of one, in-process store
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # Gradients are reduced in fp32; parameters stay fp32 (autocast does the bf16 compute).
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, Block):
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():  # fully_shard swapped the Parameters for DTensors: re-pair each EMA
        if hasattr(m, "_ema_plan"):  # the model, or each member of a joint one
            m._ema_pairs, m._copy_pairs = m._ema_plan()
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """Full, unwrapped (no ``module.``/``_orig_mod.``) state dict on CPU; gathered if FSDP-sharded."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)
    sd = unwrap(model).state_dict()
    return {k.replace("_orig_mod.", ""): v.detach().cpu() for k, v in sd.items()}


def load_model_state(model: nn.Module, sd: dict[str, Tensor]) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(sd)


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, opt, options=opts)
    return opt.state_dict()


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
        return
    opt.load_state_dict(sd)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean over ranks (the logged metrics: fairseq all-reduces target_var / pred_var, §1.9)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def all_reduce_sum(x: Tensor) -> None:
    """Sum over ranks, in place (partial sums of a sharded tensor's elements)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on the accumulation micro-steps before the last (DDP / FSDP2)."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def gather_objects(obj: object) -> list[object]:
    """``[obj of rank 0, obj of rank 1, ...]`` (just ``[obj]`` without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_shared_folder(run_dir: str | Path, info: DistInfo) -> None:
    """ValueError on every rank unless every rank sees the files rank 0 writes in ``run_dir``.

    Rank 0 alone writes checkpoints and every rank resumes from them, so on several nodes the run folder
    must be one folder on shared storage. A node-local folder (each node's own clone of the project, a
    relative ``paths.checkpoints``) would otherwise go wrong silently: the other nodes would not find the
    checkpoints and start over while rank 0 resumes, ranks at different steps averaging gradients.
    Rank 0 writes a random token file, every rank reads it back; rank 0 removes it. A no-op on one process.
    """
    if info.world_size == 1:
        return
    run_dir = Path(run_dir)
    sent = None
    if info.is_main:
        token = uuid.uuid4().hex
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"{SHARED_TOKEN}{token}").write_text(token)
        sent = (token, socket.gethostname())
    token, host0 = broadcast_object(sent)
    file = run_dir / f"{SHARED_TOKEN}{token}"
    try:
        problem = token_problem(file, token)
        reports = gather_objects((info.rank, socket.gethostname(), str(file.absolute()), problem))
    finally:
        if info.is_main:
            file.unlink(missing_ok=True)
    bad = [r for r in reports if r[3]]
    if bad:
        raise ValueError(not_shared_message(run_dir, host0, bad))


def token_problem(file: Path, token: str) -> str | None:
    """What is wrong with the token file as this rank reads it, or None when it holds ``token``."""
    try:
        seen = file.read_text()
    except OSError as e:
        return f"cannot read it ({e.strerror or type(e).__name__})"
    return None if seen == token else "reads another token in it"


def not_shared_message(run_dir: Path, host0: str, bad: list[tuple[int, str, str, str]]) -> str:
    """The run folder is not shared: which ranks on which hosts failed to read rank 0's token, what to do."""
    rank, host, path, problem = bad[0]
    others = f" (and {len(bad) - 1} more rank(s))" if len(bad) > 1 else ""
    return (
        f"{run_dir}: not on storage shared by all nodes: rank {rank} on host {host} {problem}, the token file "
        f"{path} that rank 0 wrote on host {host0}{others}. Rank 0 writes the checkpoints and every rank "
        "resumes from them: put paths.checkpoints on a filesystem with working flock (NFS, Lustre, ...) "
        "mounted at the same path on every node, e.g. as an absolute path"
    )
