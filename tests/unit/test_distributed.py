"""DDP on CPU (gloo): 2 processes with half the batch each train like 1 process with the whole batch."""

from __future__ import annotations

import os
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
# rows r::world of each; gradient clipping on so the global norm is exercised.
DRIVER = textwrap.dedent(
    """
    import sys
    import torch
    from d2v import distributed
    from d2v.modalities import get
    from d2v.optim import OptimConfig
    from d2v.train import PretrainConfig, pretrain

    run_dir = sys.argv[1]
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

    c = PretrainConfig(steps=5, batch_size=4, log_every=1, checkpoint_every=5, guard_after=10**9,
                       optim=OptimConfig(lr=2e-3, warmup=0.2, clip_norm=1.0))
    pretrain(model, c, make_loader, run_dir, {"modality": "image"}, info=info)
    distributed.cleanup()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, run_dir: Path, world: int) -> None:
    script = tmp_path / "ddp_driver.py"
    script.write_text(DRIVER)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}  # fmt: skip
        if world == 1:
            env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        cmd = [sys.executable, str(script), str(run_dir)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]


def test_two_gloo_ranks_with_half_batches_match_one_process(tmp_path):
    launch(tmp_path, tmp_path / "single", 1)
    launch(tmp_path, tmp_path / "ddp", 2)
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
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fsdp needs CUDA"):
            distributed.wrap(model, info, "fsdp")
