"""CUDA-only checks (skipped without a GPU): FSDP2 on one GPU matches plain training and saves full
weights; bf16 autocast keeps the EMA teacher and the loss in fp32 (spec §5.7); the image decoder's Triton
convs (d2v/gpu_conv.py) agree with cuDNN in bf16."""

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
    from d2v.pretrain import PretrainConfig, pretrain

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


@needs_cuda
def test_triton_convs_match_cudnn_in_bf16():
    import torch.nn.functional as F

    from d2v import gpu_conv

    torch.manual_seed(0)
    x = torch.randn(64, 14, 14, 768, device="cuda", requires_grad=True)
    w = (torch.randn(768, 48, 3, 3, device="cuda") / 20).requires_grad_()
    with torch.autocast("cuda", torch.bfloat16):
        y = gpu_conv.conv_nhwc(x, w, 16)
        ref = F.conv2d(x.permute(0, 3, 1, 2), w, padding=1, groups=16).permute(0, 2, 3, 1)
    assert y.dtype == ref.dtype == torch.bfloat16
    g = torch.randn_like(y)
    got, want = (y, *torch.autograd.grad(y, (x, w), g)), (ref, *torch.autograd.grad(ref, (x, w), g))
    for a, b in zip(got, want):  # both bf16 products with fp32 sums: ~5e-3 of the largest value apart at most
        assert float((a.float() - b.float()).abs().max() / b.float().abs().max()) < 2e-2
