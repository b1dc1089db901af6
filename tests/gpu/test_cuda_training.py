"""CUDA-only checks (skipped without a GPU): FSDP2 on one GPU matches plain training and saves full
weights; bf16 autocast keeps the EMA teacher and the loss in fp32 (spec §5.7)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2v import checkpoint, distributed
from d2v.modalities import get

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_run(run_dir: Path, parallel: str, precision: str = "fp32") -> dict[str, torch.Tensor]:
    from d2v.optim import OptimConfig
    from d2v.train import PretrainConfig, pretrain

    mod = get("image")
    cfg = mod.model_config({"preset": "tiny"})
    torch.manual_seed(0)
    model = mod.build_pretrain_model(cfg)

    def make_loader(epoch):
        g = torch.Generator().manual_seed(epoch)
        return [
            {"inputs": torch.randn(4, 3, 28, 28, generator=g), "mask": mod.make_mask(4, cfg, g)}
            for _ in range(3)
        ]

    c = PretrainConfig(
        steps=4, batch_size=4, log_every=2, checkpoint_every=2, guard_after=10**9, parallel=parallel,
        precision=precision, optim=OptimConfig(lr=1e-3, warmup=0.25, clip_norm=1.0),
    )  # fmt: skip
    info = distributed.DistInfo(device=torch.device("cuda", 0))
    history = pretrain(model, c, make_loader, run_dir, {"modality": "image"}, info=info)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    return checkpoint.load_weights(run_dir)


@pytest.mark.gpu
@needs_cuda
def test_fsdp2_single_gpu_matches_plain_training_and_saves_full_weights(tmp_path):
    plain = _gpu_run(tmp_path / "plain", "ddp")  # world size 1: no wrapper
    sharded = _gpu_run(tmp_path / "fsdp", "fsdp")
    distributed.cleanup()
    assert plain.keys() == sharded.keys()  # full, unprefixed state dict gathered from the shards
    # fp32 on one GPU: FSDP2 only reshapes storage; differences come from kernel choice (TF32 off by default)
    for k in plain:
        torch.testing.assert_close(sharded[k], plain[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.gpu
@needs_cuda
def test_bf16_autocast_keeps_teacher_and_loss_fp32(tmp_path):
    weights = _gpu_run(tmp_path / "bf16", "ddp", precision="bf16")
    assert all(v.dtype == torch.float32 for k, v in weights.items() if k.startswith("teacher."))
