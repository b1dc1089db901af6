"""DDP and FSDP2 on CPU (gloo): 2 processes with half the batch each train like 1 process with the whole
batch, and a sharded run SIGKILLed mid-way resumes to the same weights."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from d2v import checkpoint, distributed
from d2v.modalities import get

ROOT = Path(__file__).resolve().parents[2]

# Each process: a tiny image model (no dropout), the same global batches (every row masks exactly 8 of its
# 16 patches, so the mean over a rank's masked tokens averages to the mean over all of them), rank r taking
# rows r::world of each; gradient clipping on so the global norm is exercised. 4 batches per epoch, so a
# run of more than 4 steps crosses an epoch; ``kill_at`` SIGKILLs every rank right after that step.
DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from d2v import distributed
    from d2v.modalities import get
    from d2v.optim import OptimConfig
    from d2v.pretrain import PretrainConfig, pretrain

    run_dir, parallel, steps, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    info = distributed.init()
    mod = get("image")
    cfg = mod.model_config({"preset": "tiny"})
    torch.manual_seed(0)
    model = mod.build_pretrain_model(cfg)

    def make_loader(epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(4):
            x = torch.randn(4, 3, 28, 28, generator=g)
            mask = torch.stack([torch.randperm(16, generator=g) < 8 for _ in range(4)])
            yield {"inputs": x[info.rank :: info.world_size], "mask": mask[info.rank :: info.world_size]}

    def after_step(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    # fp32: the check is that the reduction is exact; bf16 autocast (the default on CPUs with bf16 hardware)
    # rounds a half batch's activations differently from the whole batch's
    c = PretrainConfig(steps=steps, batch_size=4, log_every=1, checkpoint_every=4, keep_checkpoints=1,
                       guard_after=10**9, parallel=parallel, precision="fp32",
                       optim=OptimConfig(lr=2e-3, warmup=0.2, clip_norm=1.0))
    pretrain(model, c, make_loader, run_dir, {"modality": "image"}, info=info, after_step=after_step)
    distributed.cleanup()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    tmp_path: Path, run_dir: Path, world: int, parallel: str = "ddp", steps: int = 5, kill_at: int = -1
) -> set[int]:
    """Run the driver on ``world`` gloo ranks; the set of exit codes (0, or -SIGKILL where ``kill_at`` hit)."""
    script = tmp_path / "ddp_driver.py"
    script.write_text(DRIVER)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}  # fmt: skip
        if world == 1:
            env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        cmd = [sys.executable, str(script), str(run_dir), parallel, str(steps), str(kill_at)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode in (0, -signal.SIGKILL), err.decode()[-3000:]
    return {p.returncode for p in procs}


def test_two_gloo_ranks_with_half_batches_match_one_process(tmp_path):
    assert launch(tmp_path, tmp_path / "single", 1) == {0}
    assert launch(tmp_path, tmp_path / "ddp", 2) == {0}
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "ddp")] == ["step-00000005"]
    a, b = checkpoint.load_weights(tmp_path / "single"), checkpoint.load_weights(tmp_path / "ddp")
    assert a.keys() == b.keys()
    # Tolerance: fp32 gradients summed per half then all-reduced differ from the full-batch sum by a few ulps;
    # over 5 Adam steps (lr 2e-3, update ~lr per element) that stays far below 1e-5, whereas one step of a
    # wrong gradient (e.g. a missing all-reduce) moves weights by ~lr = 2e-3.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    torch.manual_seed(0)
    init = get("image").build_pretrain_model(get("image").model_config({"preset": "tiny"})).state_dict()
    assert max((a[k] - init[k]).abs().max() for k in a) > 1e-3  # training moved far beyond the tolerance
    ha = checkpoint.load_train_state(tmp_path / "single")["history"]
    hb = checkpoint.load_train_state(tmp_path / "ddp")["history"]
    # the logged loss is averaged over ranks: equal masked counts make it the full-batch loss
    assert [r["loss"] for r in hb] == pytest.approx([r["loss"] for r in ha], rel=1e-5)


def test_single_process_helpers_are_no_ops():
    info = distributed.init()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    x = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_mean(x) is x
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, info) is model and distributed.unwrap(model) is model
    sd = distributed.model_state(model)
    assert sd.keys() == model.state_dict().keys()


def test_fsdp2_on_two_gloo_ranks_matches_one_process_and_resumes_after_sigkill(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    assert launch(tmp_path, single, 1, steps=8) == {0}
    # both ranks killed after step 6: the last checkpoint is step 4, gathered from the shards by rank 0
    assert launch(tmp_path, sharded, 2, "fsdp", steps=8, kill_at=6) == {-signal.SIGKILL}
    assert [p.name for p in checkpoint.list_checkpoints(sharded)] == ["step-00000004"]
    # the restart scatters the full weights and optimizer state back into shards and replays the data
    assert launch(tmp_path, sharded, 2, "fsdp", steps=8) == {0}
    a, b = checkpoint.load_weights(single), checkpoint.load_weights(sharded)
    assert a.keys() == b.keys()  # full, unprefixed names: student, head and the (sharded) EMA teacher
    # Tolerance as in the DDP test: 8 Adam steps of reduce-scattered fp32 gradients stay within a few ulps
    # (7.5e-9 measured), while a lost optimizer state or a wrong shard moves weights by ~lr = 2e-3.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    sa, sb = checkpoint.load_train_state(single), checkpoint.load_train_state(sharded)
    # each rank saved its own data position, the one the single process reached
    assert sb["step"] == sa["step"] == 8 and sb["data"] == sa["data"] * 2
    assert [r["loss"] for r in sb["history"]] == pytest.approx([r["loss"] for r in sa["history"]], rel=1e-5)
