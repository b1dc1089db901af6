"""The benchmark harnesses run from the README and print figures that could be wrong (smallest sizes)."""

from __future__ import annotations

import json
import platform
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_step(tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "step.json"
    argv = [
        "step.py", "--preset", "tiny", "--modalities", "image", "--algorithms", "data2vec", "--dtypes", "fp32",
        "--rounds", "2", "--warmup", "1", "--no-memory", "--no-loader", "--no-alternative", "--json", str(out),
        *extra,
    ]  # fmt: skip
    old = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / "benchmarks/step.py"), run_name="__main__")
    finally:
        sys.argv = old
    assert exit_.value.code == 0
    return json.loads(out.read_text())["rows"]


def test_step_harness_measures_the_step_against_the_peak(tmp_path: Path) -> None:
    (row,) = run_step(tmp_path)
    assert (row["modality"], row["impl"], row["dtype"]) == ("image", "d2v", "fp32")
    assert row["samples_per_s"] > 0 and row["gflop_per_sample"] > 0
    assert 0 < row["peak_fraction"] < 1.5  # a counted-FLOP rate far above the measured peak is a bug
    assert row["samples_per_s"] == pytest.approx(row["batch"] / row["step_s"])


@pytest.mark.slow
def test_step_harness_times_the_compiled_model_with_the_same_flops(tmp_path: Path) -> None:
    rows = {r["impl"]: r for r in run_step(tmp_path, "--compile", "--warmup", "2")}
    assert set(rows) == {"d2v", "d2v-compiled"}
    assert rows["d2v-compiled"]["gflop_per_sample"] == rows["d2v"]["gflop_per_sample"]


@pytest.mark.parametrize("change", ["dropout-mask", "time-windows", "attention-layout"])
def test_step_ab_times_both_arms_and_restores_the_current_one(change: str, capsys) -> None:
    """One row per modality x dtype with both arms' milliseconds; afterwards the module holds d2v's arm."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        ab = runpy.run_path(str(ROOT / "benchmarks/step_ab.py"))
        module, attr, arms = ab["CHANGES"][change]
        current = getattr(module, attr)
        assert list(arms.values())[-1] is current
        argv = [change, "--preset", "tiny", "--modalities", "audio", "--dtypes", "fp32", "--rounds", "1"]
        assert ab["main"](argv) == 0
        assert getattr(module, attr) is current
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| audio")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "audio fp32" and float(cells[1]) > 0 and float(cells[2]) > 0


@pytest.mark.parametrize("modality", ["image", "text"])
def test_attention_layout_arms_give_the_same_step_to_the_bit(modality: str) -> None:
    """``step_ab.py attention-layout`` compares two layouts of one computation: the loss and every gradient
    of a data2vec step (image: a relative-position bias; text: attention dropout) are bit-identical, in fp32
    and under bf16 autocast."""
    from d2v import transformer
    from d2v.config import load_params
    from d2v.modalities import get

    current = transformer.Attention.forward
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        ab = runpy.run_path(str(ROOT / "benchmarks/step_ab.py"))
        step = sys.modules["step"]
        model_cfg, pcfg = step.configs(load_params(ROOT / "params.yaml"), modality, "tiny", "data2vec")
        (batch,) = step.make_batches(modality, model_cfg, pcfg, 1)
        for amp in (False, True):
            runs = []
            for forward in (ab["permuted_attention"], current):
                transformer.Attention.forward = forward
                torch.manual_seed(0)
                model = get(modality).build_pretrain_model(model_cfg).train()
                torch.manual_seed(1)
                with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                    loss, _ = model(batch)
                loss.backward()
                runs.append([loss.detach(), *(p.grad for p in model.parameters() if p.grad is not None)])
            transformer.Attention.forward = current
            assert len(runs[0]) == len(runs[1]) > 10
            assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        transformer.Attention.forward = current
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_hostmem_ab_times_both_malloc_settings(capsys) -> None:
    """One row per modality x dtype, with milliseconds and page faults for both settings."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        ab = runpy.run_path(str(ROOT / "benchmarks/hostmem_ab.py"))
        assert (
            ab["main"](["--preset", "tiny", "--modalities", "image", "--dtypes", "fp32", "--rounds", "1"])
            == 0
        )
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| image")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["image", "fp32"] and float(cells[2]) > 0 and float(cells[4]) > 0


def test_counted_flops_of_a_grouped_conv_backward_are_twice_its_forward() -> None:
    """torch 2.11 counts a grouped conv's weight gradient ``groups`` times; ``benchmarks/flops.py`` does not
    (the backward of any conv: grad input and grad weight, each as many multiply-adds as the forward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from flops import flop_counter
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for groups in (1, 16):
        conv = torch.nn.Conv1d(64, 64, 5, padding=2, groups=groups)
        x = torch.randn(2, 64, 30, requires_grad=True)
        with flop_counter() as fc:
            conv(x)
        fwd = fc.get_total_flops()
        with flop_counter() as fc:
            conv(x).sum().backward()
        assert fc.get_total_flops() == 3 * fwd
        with FlopCounterMode(display=False) as torchs:
            conv(x).sum().backward()
        assert torchs.get_total_flops() >= fc.get_total_flops()  # equal once torch's formula is fixed


def test_counted_flops_of_sdpas_fused_cpu_kernel_match_the_math_paths() -> None:
    """torch 2.11 counts 0 for SDPA's fused CPU kernel (the teacher's attention on CPU); ``benchmarks/flops.py``
    counts its forward as the two ``bmm``s of the math path (:func:`d2v.transformer.attend`) it replaces."""
    import torch
    import torch.nn.functional as F

    from d2v.transformer import attend

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from flops import flop_counter
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    q, k, v = (torch.randn(2, 4, 50, 16) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 50)
    with torch.no_grad():
        with flop_counter() as fused:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with flop_counter() as math:
            attend(q, k, v, mask, 0.0)
    assert fused.get_flop_counts()["Global"]  # the fused kernel ran, and was counted
    assert fused.get_total_flops() == math.get_total_flops() == 4 * 2 * 4 * 50 * 50 * 16


def run_gpu_image(argv: list[str]) -> int:
    """The script's exit status (0 when it returns)."""
    old = sys.argv
    sys.argv = ["gpu_image.py", *argv]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        runpy.run_path(str(ROOT / "benchmarks/gpu_image.py"), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = old
        sys.path.remove(str(ROOT / "benchmarks"))


def test_gpu_image_runs_each_variant_on_full_batches(tmp_path: Path) -> None:
    """On a CPU (its smoke test): one run per variant; the rate divides the batch the loader really gave, and
    shards that would end in short batches are refused before any work."""
    out = tmp_path / "gpu.json"
    argv = ["--algorithms", "data2vec2", "--preset", "tiny", "--batch", "4", "--images", "12", "--steps", "1",
            "--workers", "2", "--variants", "d2v", "sdpa-flash", "--json", str(out)]  # fmt: skip
    assert run_gpu_image(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"data2vec2-b4-triton", "data2vec2-b4-triton-sdpa-flash"}
    for r in runs.values():
        assert r["batch_images"] == 4 and r["images_per_s"] == pytest.approx(4 / r["step_s"])
        assert r["tflop_per_step"] > 0
    assert run_gpu_image(argv[:5] + ["5"] + argv[6:]) == 2  # 12 images are not whole batches of 5


def test_gpu_profile_sorts_kernels_by_kind_and_skips_ranges() -> None:
    """Attention kernels are not counted as matmuls (cuDNN's names hold ``sm90``), CPU ops and the GPU spans
    of ``record_function`` ranges are not kernels."""
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        prof = runpy.run_path(str(ROOT / "benchmarks/gpu_profile.py"))
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(key, us, dev=cuda):
        return SimpleNamespace(key=key, self_device_time_total=us, device_type=dev)

    events = [
        ev("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_bias_TNN", 4000),
        ev("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", 2000),
        ev("_conv_kernel", 1000),
        ev("triton_poi_fused_gelu_view_15", 1000),
        ev("triton_poi_fused_gelu_view_15", 1000, cpu),  # inductor's launch, a CPU event
        ev("phase:step", 9000),  # a range's span on the GPU
        ev("aten::mm", 4000, cpu),
    ]
    table = {line.split("  ")[0].removeprefix("kernels ").strip(): line for line in
             prof["kernel_kinds"](events, steps=2).splitlines()}  # fmt: skip
    assert set(table) == {"matmul", "attention", "d2v conv (Triton)", "inductor fused (Triton)"}
    assert "2.0 ms/step" in table["matmul"] and "1.0 ms/step" in table["attention"]
    assert "0.5 ms/step" in table["inductor fused (Triton)"]


def test_cpu_breakdown_sums_the_steps_ops_by_kind(capsys) -> None:
    """The op times split into matmuls and the rest; each matmul call of the step gets its rate in the step
    and replayed alone (hot, and after a pass over a buffer), with its FLOPs counted as 2 M K N (times the batch for bmm)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        bd = runpy.run_path(str(ROOT / "benchmarks/cpu_breakdown.py"))
        assert bd["main"](["--modalities", "text", "--preset", "tiny", "--steps", "1", "--top", "3"]) == 0
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    f32 = torch.float32
    assert bd["matmul_flops"]((((8,), (1,), f32), ((4, 3), (3, 1), f32), ((3, 8), (1, 3), f32))) == 192
    assert bd["matmul_flops"]((((2, 4, 3), (12, 3, 1), f32), ((2, 3, 5), (15, 5, 1), f32))) == 240
    out = capsys.readouterr().out
    kinds = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith("  ") and
             "% of op time" in line}  # fmt: skip
    assert kinds["matmul"] > 0 and kinds["other"] > 0
    rates = [line for line in out.splitlines() if "% of peak in the step" in line]
    assert rates and any(r.split(":")[0].strip() == "addmm" for r in rates)
    for r in rates:
        in_step, alone = r.split("|")
        assert float(in_step.split()[-1]) > 0
        assert all(float(x) > 0 for x in alone.split("(")[0].split(","))
    (total,) = [line for line in out.splitlines() if line.strip().startswith("all ") and "calls:" in line]
    assert int(total.split()[1]) >= len(rates)
    assert "that do not grow with the batch" in out
