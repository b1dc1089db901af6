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


def run_script(name: str, *argv: str) -> None:
    """``python benchmarks/<name> <argv>`` in this process; it must exit 0."""
    old = sys.argv
    sys.argv = [name, *argv]
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / "benchmarks" / name), run_name="__main__")
    finally:
        sys.argv = old
    assert exit_.value.code == 0


def run_step(tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "step.json"
    run_script(
        "step.py", "--preset", "tiny", "--modalities", "image", "--algorithms", "data2vec", "--dtypes", "fp32",
        "--rounds", "2", "--warmup", "1", "--no-memory", "--no-loader", "--no-alternative", "--json", str(out),
        *extra,
    )  # fmt: skip
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


def load_step_ab() -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return runpy.run_path(str(ROOT / "benchmarks/step_ab.py"))
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_step_ab_alternates_the_arms_and_switches_back_to_the_current_one() -> None:
    """Each round: every arm switched in, its settling steps, one timed step; afterwards (an error too) the
    last arm, the current code's, is in place."""
    from types import SimpleNamespace

    ab = load_step_ab()
    module = SimpleNamespace(impl="current")
    change = ab["Change"](
        {"old": ab["patch"](module, "impl", "old"), "current": ab["patch"](module, "impl", "current")},
        ("text",), settle=1,
    )  # fmt: skip
    seen: list[str] = []
    med = ab["alternate"](change, lambda: seen.append(module.impl), 3)
    assert seen == ["old", "old", "current", "current"] * 3 and module.impl == "current"
    assert list(med) == ["old", "current"] and all(s >= 0 and n >= 0 for s, n in med.values())

    def failing() -> None:
        raise RuntimeError(module.impl)

    with pytest.raises(RuntimeError, match="old"):
        ab["alternate"](change, failing, 1)
    assert module.impl == "current"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_step_ab_hostmem_times_both_malloc_settings(capsys) -> None:
    """One row per modality x dtype, with milliseconds and page faults for both settings."""
    ab = load_step_ab()
    argv = ["hostmem", "--preset", "tiny", "--modalities", "image", "--dtypes", "fp32", "--rounds", "1"]
    assert ab["main"](argv) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| image")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "image fp32" and float(cells[1]) > 0 and float(cells[3]) > 0
    assert int(cells[2].replace(",", "")) >= 0 and int(cells[4].replace(",", "")) >= 0
    assert cells[5].endswith("x")


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


def test_layer_diagnostics_probes_and_position_share_at_every_depth(tmp_path: Path, capsys) -> None:
    """On tiny image shards (the test split: 10 items, more than the 8 the position share needs) and a tiny
    pretraining checkpoint: per init, one row per depth (local features, positions added, each block), a
    probe accuracy in [0, 1], a position share in [0, 1] and dropout's noise where there is dropout; fewer test
    items per class than asked for are all used."""
    import numpy as np
    from PIL import Image

    from d2v import checkpoint
    from d2v.config import to_dict
    from d2v.data.stages import data_module, shard
    from d2v.modalities import get

    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["dark", "grey", "light"]):
        (raw / "files" / name).mkdir(parents=True)
        for i in range(20):
            arr = np.clip(rng.normal(60 + 70 * c, 20, (28, 28)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, mode="L").save(raw / "files" / name / f"{i}.png")
    shards = tmp_path / "shards"
    manifest = shard("image", data_module("image").ShardConfig(samples_per_shard=8), raw, shards, 0)
    cfg = get("image").model_config({"preset": "tiny", "transformer": {"dropout": 0.3}})
    torch.manual_seed(0)
    sd = {f"student.{k}": v for k, v in get("image").build_encoder(cfg).state_dict().items()}
    meta = {"modality": "image", "kind": "pretrain", "model_config": to_dict(cfg), "encoder_prefix": "student.",
            "preprocessing": manifest["preprocessing"]}  # fmt: skip
    checkpoint.save(tmp_path / "ck", 1, sd, meta)
    out = tmp_path / "layers.json"
    ld = runpy.run_path(str(ROOT / "benchmarks/layer_diagnostics.py"))
    argv = [str(tmp_path / "ck"), "--shards", str(shards), "--budget", "3", "--frames", "4", "--json", str(out)]  # fmt: skip
    assert ld["main"](argv) == 0
    results = json.loads(out.read_text())
    assert sorted(k.split(":")[-1] for k in results) == ["pretrained", "scratch"]
    for rows in results.values():
        assert [r["depth"] for r in rows] == list(range(cfg.transformer.depth + 2))
        assert all(0 <= r["probe"] <= 1 and 0 <= r["pos"] <= 1 for r in rows)
        # dropout acts in the blocks only: the patches and positions (depths 0, 1) do not move
        assert [r["noise"] == 0 for r in rows] == [True, True] + [False] * cfg.transformer.depth
    printed = capsys.readouterr().out
    assert printed.count("  probe ") == printed.count("  pos   ") == printed.count("  noise ") == 2


@pytest.mark.slow  # about 40 s on epyc-2c: CI runs it (.ci/run)
def test_published_harness_runs_a_published_image_model_through_the_stages(tmp_path: Path) -> None:
    out = tmp_path / "published.json"
    run_script("published.py", "--modalities", "image", "--steps", "2", "--arms", "--workdir", str(tmp_path / "w"),
               "--json", str(out))  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert row["parity_max_abs_diff"] < 1e-4 and row["pretrain_s_per_update"] > 0
    assert row["pretrain"]["peak_mib"] > 100 and row["pretrain_loss"] > 0
    assert all(0.0 <= row[f"accuracy_{a}"] <= 1.0 for a in ("published", "pretrained", "scratch"))


def tiny_text_params(src: Path) -> dict:
    """params.yaml of a tiny text project on the JSONL folder ``src``: 2 pretraining updates, no tracking."""
    return {
        "seed": 0,
        "paths": {"raw": "raw", "shards": "shards", "checkpoints": "ckpt", "metrics": "metrics", "plots": "plots"},
        "tracking": {"mode": "disabled"},
        "prepare": {"text": {"source": str(src)}},
        "shard": {"text": {"vocab_size": 300, "min_frequency": 1, "max_tokens": 24, "samples_per_shard": 16}},
        "model": {"text": {"preset": "tiny", "vocab_size": 300, "max_positions": 32}},
        "pretrain": {"text": {"steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 2,
                              "guard_after": 1000}},
        "evaluate": {"text": {"batch_size": 8}},
    }  # fmt: skip


def test_probe_study_reshards_pretrains_and_probes_every_task_per_layer_and_pool(tmp_path: Path, capsys, monkeypatch) -> None:
    """A tiny text project with two labelled tasks: with a shard change it reshards in its own temporary
    project, pretrains, and prints per task and pool every layer's probe for pretrained and random init,
    and the difference at embed's default features; the project itself is left as it was."""
    import yaml

    from d2v import load_encoder
    from d2v.cli import main as d2v_main

    rng = torch.Generator().manual_seed(0)
    filler = ["the", "a", "cat", "sat", "on", "mat", "while", "dogs", "ran", "past", "hills", "rain"]

    def line(word: str) -> str:
        words = [filler[int(i)] for i in torch.randint(len(filler), (8,), generator=rng)]
        return " ".join([*words[:4], word, *words[4:]])

    records = [{"text": line(t), "label": t} for t in ("sport", "tech") for _ in range(12)]
    records += [{"text": line(m), "label": m, "task": "mood"} for m in ("good", "bad") for _ in range(12)]
    records += [{"text": " ".join(filler) + f" {i}"} for i in range(20)]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    params = tiny_text_params(tmp_path / "src")
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)
    assert d2v_main(["prepare", "text"]) == 0 and d2v_main(["shard", "text"]) == 0
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    out = tmp_path / "study.jsonl"
    run_script("probe_study.py", str(project), "text", "--set", "shard.text.vocab_size=290", "--budget", "3", "0.5",
               "--json", str(out), "--keep", str(tmp_path / "kept"))  # fmt: skip
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before
    kept = load_encoder(tmp_path / "kept" / "seed0")  # the study's pretrained encoder, kept for heldout.py
    assert kept.modality == "text" and kept.embed(["the cat sat"]).shape == (1, kept.transformer.dim)
    row, half = [json.loads(x) for x in out.read_text().splitlines()]  # one line per budget
    assert row["changes"] == {"shard.text.vocab_size": 290} and (row["budget"], half["budget"]) == (3, 0.5)
    depth = 2 + 1  # tiny: 2 blocks and the final output
    for init in ("pretrained", "scratch"):
        for t in ("", "mood_"):
            for p in ("", "first_"):
                assert all(0 <= row["metrics"][f"probe/{init}/s{s}/{t}{p}layer{i}_accuracy"] <= 1
                           for s in (0, 1, 2) for i in range(1, depth + 1))  # fmt: skip
    printed = capsys.readouterr().out
    assert "| classification | mean |" in printed and "| mood | first |" in printed
    assert printed.count("embed's default") == 4 and "probe budget 0.5" in printed


def test_word_classes_probes_every_layer_of_a_text_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    """A tiny text checkpoint and a small analogy file: words in two classes are kept, a word in both dropped,
    and every layer's cross-validated accuracy is printed and written for both inits."""
    import yaml

    from d2v.cli import main as d2v_main

    (tmp_path / "src").mkdir()
    corpus = [{"text": f"the city of paris and the country of france {i} rome italy"} for i in range(24)]
    (tmp_path / "src" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    params = tiny_text_params(tmp_path / "src")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert all(d2v_main([c, "text"]) == 0 for c in ("prepare", "shard", "pretrain"))
    cities = ["Athens", "Rome", "Paris", "Oslo", "Cairo", "Lima", "Kabul", "Hanoi", "Dublin", "Madrid"]
    countries = ["Greece", "Italy", "France", "Norway", "Egypt", "Peru", "Afghanistan", "Vietnam", "Ireland", "Spain"]
    lines = [": capital-world", *(f"{a} {b} {c} {d}" for a, b, c, d in zip(cities, countries, cities[1:], countries[1:]))]
    lines += [": currency", "Athens euro Spain euro"]  # Athens is a city above and a country here: dropped
    (tmp_path / "q.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "words.json"
    run_script("word_classes.py", str(tmp_path / "ckpt" / "pretrain" / "text"), "--words", str(tmp_path / "q.txt"),
               "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert result["words"] == {"city": 9, "country": 10, "currency": 1}
    depth = 2  # tiny: layers 0..2
    for init in ("pretrained", "random init"):
        assert len(result["accuracy"][init]) == depth + 1
        assert all(0 <= a <= 100 for a in result["accuracy"][init])
    assert "| pretrained / random init |" in capsys.readouterr().out


def test_finetune_arm_runs_the_stage_per_seed_and_scores_test(tmp_path: Path, capsys, monkeypatch) -> None:
    """A tiny text project: each seed's run goes through `d2v finetune` (its LR search included) into the
    project's checkpoints, and is scored on the test split; the LR it reports is one of the grid's."""
    import yaml

    from d2v.cli import main as d2v_main

    words = {"sport": ["goal", "match", "team"], "tech": ["chip", "code", "data"]}
    records = [{"text": f"the {w} and the {w} again {i}", "label": t} for t, ws in words.items() for w in ws
               for i in range(6)]  # fmt: skip
    records += [{"text": f"plain filler text number {i}"} for i in range(12)]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    params = tiny_text_params(tmp_path / "src")
    params["finetune"] = {"text": {"steps": 4, "batch_size": 4, "log_every": 1, "lr_grid": [0.25, 1.0, 4.0],
                                   "lr_grid_steps": 2, "lr_grid_valid_budget": 2, "head_init_items": 8,
                                   "optim": {"lr": 1.0e-3}}}  # fmt: skip
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)
    assert d2v_main(["prepare", "text"]) == 0 and d2v_main(["shard", "text"]) == 0
    assert d2v_main(["pretrain", "text"]) == 0
    out = tmp_path / "arm.jsonl"
    run_script("finetune_arm.py", str(project), "text", "--init", "pretrained", "--budget", "2", "--seeds", "0", "1",
               "--json", str(out))  # fmt: skip
    row = json.loads(out.read_text())
    assert row["seeds"] == [0, 1] and all(0 <= a <= 1 for a in row["accuracy"])
    assert all(any(abs(lr - 1.0e-3 * k) < 1e-12 for k in (0.25, 1.0, 4.0)) for lr in row["lr"])
    for seed in (0, 1):
        assert (project / "ckpt" / "finetune" / "text" / f"b2-s{seed}-pretrained").is_dir()
    assert "text pretrained budget 2 seed 1: test accuracy" in capsys.readouterr().out
    params["finetune"]["text"]["lr_grid"] = []  # no search: the run trains at optim.lr, and says so
    (project / "no_search.yaml").write_text(yaml.safe_dump(params))
    run_script("finetune_arm.py", str(project), "text", "--init", "pretrained", "--budget", "3", "--seeds", "0",
               "--params", "no_search.yaml", "--json", str(out))  # fmt: skip
    assert json.loads(out.read_text().splitlines()[1])["lr"] == [1.0e-3]


def test_heldout_probes_a_checkpoint_against_random_init_on_each_set(tmp_path: Path, capsys, monkeypatch) -> None:
    """A tiny text checkpoint on a folder of fortune files (10 categories, 6 each; one too short to keep):
    every item is predicted once per encoder, the difference comes with an interval that contains it, every
    layer is measured with --layers; without the files the set is skipped with a line saying how to get them."""
    import yaml

    from d2v.cli import main as d2v_main

    (tmp_path / "src").mkdir()
    corpus = [{"text": f"the law of love and the food of work {i} science"} for i in range(24)]
    (tmp_path / "src" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_text_params(tmp_path / "src")))
    monkeypatch.chdir(tmp_path)
    assert all(d2v_main([c, "text"]) == 0 for c in ("prepare", "shard", "pretrain"))
    heldout = runpy.run_path(str(ROOT / "benchmarks/heldout.py"))
    folder = tmp_path / "fortunes"
    folder.mkdir()
    for c in heldout["FORTUNE_CLASSES"]:
        items = [f"a {c} joke number {i}\nwith a second line" for i in range(6)] + ["too short"]
        (folder / c).write_text("\n%\n".join(items) + "\n%\n")
    out = tmp_path / "heldout.json"
    ckpt = str(tmp_path / "ckpt" / "pretrain" / "text")
    assert heldout["main"]([ckpt, "--fortunes", str(folder), "--layers", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["sets"]["fortunes"]
    assert (result["items"], result["classes"]) == (60, 10)
    assert sorted(k for k in result if k.startswith("layer")) == ["layer0", "layer1", "layer2"]  # tiny: 2 blocks
    for key in ("embed", "layer0", "layer2"):
        row = result[key]
        assert all(0 <= row[i] <= 100 for i in ("pretrained", "random init"))
        assert row["diff"] == pytest.approx(row["pretrained"] - row["random init"])
        assert row["ci"][0] <= row["diff"] <= row["ci"][1]
    assert "| fortunes | 60 | 10 | embed's default |" in capsys.readouterr().out
    assert heldout["main"]([ckpt, "--fortunes", str(tmp_path / "none")]) == 0
    assert "fortunes: skipped: the fortune files" in capsys.readouterr().out


@pytest.mark.slow  # about 5 minutes on 2 cores (the smoke pipeline once): CI runs it (.ci/run)
def test_dvc_overhead_times_the_smoke_pipeline_and_splits_off_dvcs_own_time(tmp_path: Path, capsys) -> None:
    """The smoke pipeline's stages all record their wall time, DVC's own time is the rest of the repro's, and
    the figures printed are the ones written."""
    import yaml

    out = tmp_path / "dvc.json"
    run_script("dvc_overhead.py", "--rounds", "1", "--keep", str(tmp_path / "w"), "--json", str(out))
    r = json.loads(out.read_text())
    lock = yaml.safe_load((tmp_path / "w" / "project" / "dvc.lock").read_text())["stages"]
    assert len(set(lock) - {"report"}) <= r["stages"] <= len(lock)  # every stage timed (the report too, once run)
    assert 0 < r["stage_processes_s"] < r["repro_s"] and r["dvc_own_s"] == pytest.approx(
        r["repro_s"] - r["stage_processes_s"], abs=0.11)
    assert r["status_s"] > 0 and r["noop_repro_s"] > 0 and r["yaml_parser"] == "C (ruamel.yaml.clib)"
    assert f"| {r['stages']} | {r['repro_s']:.1f} s |" in capsys.readouterr().out
