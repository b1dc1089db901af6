"""Joint pretraining (``d2v pretrain joint``): one shared stack for every modality.

The interleaving gives each modality exactly its updates; the shared teacher is stepped once per update (not
once per modality: tau cubed); the shared stack is stored once; ``load_encoder(..., modality=m)`` is the joint
model's own encoder for m; a run resumed from a checkpoint mid-interleaving ends bit-identical; two gloo ranks
train like one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from test_distributed import free_port

import d2v
from d2v import checkpoint
from d2v.config import TransformerConfig, from_dict
from d2v.joint import (
    JointConfig,
    build_joint_model,
    interleave,
    member_config,
    own_updates,
    plan,
    stack_conflicts,
)
from d2v.load import joint_encoder_state, joint_member, load_encoder
from d2v.modalities import get

ROOT = Path(__file__).resolve().parents[2]
TINY_STACK = {"dim": 32, "depth": 2, "heads": 2, "ffn_dim": 64, "dropout": 0.0, "attention_dropout": 0.0}
STEPS = {"audio": 4, "image": 3, "text": 5}


# --------------------------------------------------------------------------------------------- pure parts


def test_interleave_gives_each_modality_exactly_its_updates_spread_over_the_run():
    counts = {"audio": 60, "image": 16, "text": 60}
    order = interleave(counts, seed=3)
    assert {m: order.count(m) for m in counts} == counts and len(order) == 136
    assert order == interleave(counts, seed=3) and order != interleave(counts, seed=4)
    # update i of m sits in [i, i + 1) / n of the run: never more than 2 / n of the run between two of them
    for m, n in counts.items():
        at = [s / len(order) for s, x in enumerate(order) if x == m]
        assert max(b - a for a, b in zip([0.0, *at], [*at, 1.0])) < 2.0 / n + 1 / len(order), m
    assert own_updates([("a",), ("b",), ("a",), ("a", "b")]) == [{"a": 1}, {"b": 1}, {"a": 2}, {"a": 3, "b": 2}]


def test_the_plan_of_each_mixing():
    counts = {"audio": 4, "image": 2, "text": 3}
    every_modality = {"modalities": ["audio", "image", "text"]}
    inter = plan(from_dict(JointConfig, every_modality, "joint"), counts, seed=0)
    assert [u for (u,) in inter] == interleave(counts, 0)
    every = plan(from_dict(JointConfig, {"mixing": "all", "modalities": ["image", "text"]}, "joint"), counts, 0)
    assert every == [("image", "text")] * 3  # the largest count of the modalities run
    assert len(plan(from_dict(JointConfig, {**every_modality, "mixing": "all", "steps": 7}, "joint"), counts, 0)) == 7
    with pytest.raises(Exception, match="steps: 7 is for mixing: all"):
        from_dict(JointConfig, {"steps": 7}, "joint")


def test_fsdp_refuses_modality_norms_and_takes_the_rest():
    with pytest.raises(Exception, match="modality_norms: true needs parallel: ddp"):
        from_dict(JointConfig, {"parallel": "fsdp", "modality_norms": True}, "joint")
    assert from_dict(JointConfig, {"parallel": "fsdp", "mixing": "all"}, "joint").parallel == "fsdp"


def test_a_model_transformer_key_that_contradicts_the_joint_stack_is_named():
    joint = TransformerConfig(**TINY_STACK)
    assert stack_conflicts(joint, {"audio": {}, "text": {"dim": 32}}) == []
    found = stack_conflicts(joint, {"image": {"layer_norm_first": True, "dim": 32}, "text": {"heads": 4}})
    assert found == [
        "model.image.transformer.layer_norm_first: True (joint.transformer.layer_norm_first: False)",
        "model.text.transformer.heads: 4 (joint.transformer.heads: 2)",
    ]


def test_each_modality_keeps_its_dropout_rates_in_the_shared_stack():
    """dropout: own: a member's config, and the stack while it runs that modality's update, have the
    modality's rates; its model.<m> dropout is then no conflict. shared: joint.transformer's."""
    rates = {"image": 0.0, "text": 0.2}
    joint = from_dict(JointConfig, {"modalities": list(rates), "transformer": TINY_STACK, "dropout": "own"}, "joint")
    own = {m: get(m).model_config({"preset": "tiny", "transformer": {"dropout": r, "attention_dropout": r}})
           for m, r in rates.items()}  # fmt: skip
    configs = {m: member_config(c, joint) for m, c in own.items()}
    for m, r in rates.items():
        t = configs[m].transformer
        assert (t.dropout, t.attention_dropout, t.dim) == (r, r, TINY_STACK["dim"])
    model = build_joint_model(joint, configs, seed=0).train()
    for m in ["text", "image", "text"]:
        model({**get_batch(m, configs[m]), "modality": m})
        blk = model.stack.blocks[-1]
        assert (blk.dropout.p, blk.attn.dropout) == (rates[m], rates[m]), m
    assert stack_conflicts(joint.transformer, {"text": {"dropout": 0.2}}, own_dropout=True) == []
    assert stack_conflicts(joint.transformer, {"text": {"dropout": 0.2}}) != []
    shared = from_dict(JointConfig, {"modalities": ["text"], "transformer": TINY_STACK, "dropout": "shared"}, "joint")
    assert member_config(own["text"], shared).transformer.dropout == TINY_STACK["dropout"]


def tiny_joint(modalities=("audio", "image", "text"), **cfg) -> tuple:
    joint = from_dict(JointConfig, {"modalities": list(modalities), "transformer": TINY_STACK, **cfg}, "joint")
    configs = {m: member_config(get(m).model_config({"preset": "tiny"}), joint) for m in modalities}
    return build_joint_model(joint, configs, seed=0), configs


def test_the_shared_stack_is_stored_once_and_runs_in_every_member():
    model, _ = tiny_joint()
    sd = model.state_dict()
    stack_keys = {k for k in sd if k.startswith("stack.")}
    assert stack_keys and len(stack_keys) == len(model.stack.state_dict())
    assert len({k for k in sd if k.startswith("teacher_stack.")}) == len(stack_keys)
    for m, member in model.members.items():
        attr = member.student.stack_attr
        assert not any(k.startswith(f"members.{m}.student.{attr}.") for k in sd), m
        assert not any(k.startswith(f"members.{m}.teacher.{attr}.") for k in sd), m
        assert getattr(member.student, attr) is model.stack and getattr(member.teacher, attr) is model.teacher_stack
    # parameters are counted once: one stack, not three
    n_stack = sum(p.numel() for p in model.stack.parameters())
    n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_own = sum(p.numel() for mm in model.members.values() for p in mm.parameters() if p.requires_grad)
    assert n_all == n_stack + n_own


def test_the_shared_teacher_is_stepped_once_per_update_not_once_per_modality():
    model, _ = tiny_joint()
    with torch.no_grad():
        for p in model.stack.parameters():
            p.add_(1.0)  # student and teacher stacks now differ by 1 everywhere
    teacher0 = [p.clone() for p in model.teacher_stack.parameters()]
    student = [p.detach().clone() for p in model.stack.parameters()]
    own = {m: [p.clone() for _, p in mm.teacher.named_parameters()] for m, mm in model.members.items()}
    tau = model.ema_step(1, {"image": 1})["tau"]
    for t0, s, t in zip(teacher0, student, model.teacher_stack.parameters()):
        torch.testing.assert_close(t, t0 + (1 - tau) * (s - t0))  # one lerp; tau^3 would move 3x as far
    # the other modalities' own teacher parts did not move; image's own parts are its own schedule's business
    for m in ("audio", "text"):
        assert all(torch.equal(a, b) for a, b in zip(own[m], model.members[m].teacher.parameters())), m


def test_forward_reports_the_updates_modality_and_zeros_for_the_others():
    model, configs = tiny_joint(modalities=("image", "text"))
    batch = get_batch("image", configs["image"])
    loss, metrics = model({**batch, "modality": "image"})
    assert model.current == "image" and loss.requires_grad
    assert metrics["image/updates"] == 1 and metrics["text/updates"] == 0
    assert metrics["image/loss"] == metrics["loss"] > 0 and metrics["text/loss"] == 0
    loss.backward()
    norms = model.grad_metrics()
    assert norms["image/stack_grad_norm"] > 0 and norms["text/stack_grad_norm"] == 0
    assert all(p.grad is None for p in model.members["text"].parameters())  # text's own parts: no gradient


def get_batch(m: str, cfg, b: int = 4, seed: int = 0) -> dict:
    """A pretraining batch of random inputs with exactly half of every row masked."""
    g = torch.Generator().manual_seed(seed)
    if m == "image":
        n = (cfg.image_size // cfg.patch_size) ** 2
        x = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
        return {"inputs": x, "mask": torch.stack([torch.randperm(n, generator=g) < n // 2 for _ in range(b)])}
    ids = torch.randint(4, cfg.vocab_size - 1, (b, 16), generator=g)
    mask = torch.stack([torch.randperm(16, generator=g) < 8 for _ in range(b)])
    return {"inputs": ids, "mask": mask, "student_inputs": ids.masked_fill(mask, cfg.mask_id)}


# ------------------------------------------------------------------------------ the stage, end to end


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The smoke profile's three modalities (prepared and sharded), pretrained jointly: 12 updates,
    checkpointed every 4 (three checkpoints kept)."""
    from d2v.cli import main

    root = tmp_path_factory.mktemp("joint")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    smoke = params["profiles"]["smoke"]
    smoke.pop("joint", None)  # this file's own joint settings, below
    for m, steps in STEPS.items():
        smoke["pretrain"][m].update(steps=steps)
    params["joint"].update(modalities=list(STEPS), transformer={**params["joint"]["transformer"], **TINY_STACK},
                           checkpoint_every=4,
                           keep_checkpoints=3, log_every=2, precision="fp32")  # fmt: skip
    params["tracking"]["mode"] = "disabled"
    params["profile"] = "smoke"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for m in STEPS:
            assert main(["prepare", m]) == 0 and main(["shard", m]) == 0
        assert main(["pretrain", "joint"]) == 0
    return root


RUN = Path("checkpoints/pretrain/joint")


def test_the_stage_writes_per_modality_metrics_and_each_modality_had_its_updates(project):
    metrics = json.loads((project / "metrics/pretrain/joint.json").read_text())
    assert {m: metrics[f"pretrain/updates_{m}"] for m in STEPS} == STEPS
    assert metrics["pretrain/steps"] == sum(STEPS.values())
    for m in STEPS:
        for k in ("loss", "target_var", "pred_var", "stack_grad_norm"):
            assert metrics[f"pretrain/{m}/{k}"] > 0, (m, k)
    meta = checkpoint.read_meta(project / RUN)
    assert meta["modality"] == "joint" and sorted(meta["model_config"]) == sorted(STEPS)
    assert (checkpoint.resolve(project / RUN) / "text" / "tokenizer.json").is_file()  # text's, in its folder


@pytest.mark.parametrize("m", sorted(STEPS))
def test_load_encoder_of_a_modality_is_the_joint_models_own_encoder(project, m):
    step = checkpoint.resolve(project / RUN)
    meta = checkpoint.read_meta(step)
    weights = checkpoint.load_weights(step)
    joint = from_dict(JointConfig, meta["joint"], "joint")
    configs = {k: get(k).model_config(v, k) for k, v in meta["model_config"].items()}
    model = build_joint_model(joint, configs, seed=1)
    model.load_state_dict(weights)
    model.eval()
    enc = d2v.load_encoder(project / RUN, modality=m)  # the library's entry point, as the README shows it
    assert type(enc) is type(model.members[m].student)
    # the report's parameter count of the modality's encoder: its own parts and the shared stack
    metrics = json.loads((project / "metrics/pretrain/joint.json").read_text())
    assert metrics[f"pretrain/encoder_params_{m}"] == sum(p.numel() for p in enc.parameters())
    assert metrics["pretrain/stack_params"] == sum(p.numel() for p in model.stack.parameters())
    assert enc.state_dict().keys() == joint_encoder_state(weights, m, enc.stack_attr).keys()
    items = {"audio": [torch.randn(8000).numpy()], "image": [torch.rand(28, 28).numpy()], "text": ["a b c"]}[m]
    batch = enc.preprocessing(items)  # the checkpoint's own preprocessing, from the modality's folder
    with torch.no_grad():
        ours, _ = model.members[m].student.features(batch["inputs"], batch.get("padding_mask"))
        theirs, _ = enc.features(batch["inputs"], batch.get("padding_mask"))
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="joint checkpoint of .* say which encoder"):
        load_encoder(project / RUN)


def test_d2v_embed_takes_the_modality_of_a_joint_checkpoint(project, tmp_path, capsys):
    import numpy as np

    from d2v.cli import main

    out = tmp_path / "f.npy"
    assert main(["embed", str(project / RUN), "--modality", "text", "--text", "a b c", "--out", str(out)]) == 0
    want = load_encoder(project / RUN, modality="text").embed(["a b c"])
    assert np.array_equal(np.load(out), want)
    assert main(["embed", str(project / RUN), "--text", "a b c", "--out", str(out)]) == 2
    assert "say which encoder" in capsys.readouterr().err


def test_a_run_resumed_mid_interleaving_ends_bit_identical(project, tmp_path):
    from d2v.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True)
    final = sorted(p.name for p in checkpoint.list_checkpoints(copy / RUN))
    assert final == ["step-00000004", "step-00000008", "step-00000012"]
    shutil.rmtree(copy / RUN / "step-00000012")  # killed after update 8's checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(copy)
        assert main(["pretrain", "joint"]) == 0
    a, b = checkpoint.load_weights(project / RUN), checkpoint.load_weights(copy / RUN)
    assert a.keys() == b.keys() and {k for k in a if not torch.equal(a[k], b[k])} == set()
    sa, sb = checkpoint.load_train_state(project / RUN), checkpoint.load_train_state(copy / RUN)
    assert sa["history"] == sb["history"] and sa["data"] == sb["data"]
    assert sb["data"][0]["batches"] == sum(STEPS.values())  # the position in the order was saved and restored


def test_a_contradicting_model_transformer_key_stops_the_stage_naming_it(project, tmp_path, capsys):
    from d2v.cli import main

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["text"]["transformer"] = {"dim": 64}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert main(["pretrain", "joint", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "model.text.transformer.dim: 64 (joint.transformer.dim: 32)" in err


# ------------------------------------------------------------------------------------ two gloo ranks

# Each process: a tiny joint model of image and text without dropout, 6 updates interleaved, the same
# global batches (every row masks exactly half its tokens), rank r taking rows r::world.
DRIVER = textwrap.dedent(
    """
    import sys
    import torch
    from d2v import distributed, runner
    from d2v.config import from_dict
    from d2v.joint import JointConfig, build_joint_model, joint_job, member_config, plan
    from d2v.modalities import get
    from d2v.optim import OptimConfig
    from d2v.pretrain import PretrainConfig
    from test_joint import TINY_STACK, get_batch

    run_dir, loss_norm, mixing, parallel = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    info = distributed.init()
    joint = from_dict(JointConfig, {"modalities": ["image", "text"], "transformer": TINY_STACK,
                                    "loss_norm": loss_norm, "mixing": mixing, "parallel": parallel, "log_every": 1,
                                    "checkpoint_every": 3, "precision": "fp32",
                                    "optim": {"lr": 2e-3, "clip_norm": 2.0}}, "joint")
    configs = {m: member_config(get(m).model_config({"preset": "tiny"}), joint) for m in joint.modalities}
    model = build_joint_model(joint, configs, seed=0)
    stage = {m: PretrainConfig(steps=3, batch_size=4, guard_after=10**9, precision="fp32",
                               optim=OptimConfig(lr=2e-3, warmup=0.2, clip_norm=1.0 if m == "image" else None))
             for m in joint.modalities}

    def loader(m):
        def make(epoch):
            for i in range(4):
                b = get_batch(m, configs[m], seed=100 * epoch + i)
                yield {k: v[info.rank :: info.world_size] for k, v in b.items()}
        return make

    updates = plan(joint, {m: 3 for m in joint.modalities}, seed=0)
    job = joint_job(model, joint, stage, {m: loader(m) for m in joint.modalities}, updates, run_dir,
                    {"modality": "joint"})
    runner.fit(job, seed=0, info=info)
    distributed.cleanup()
    """
)


def launch(tmp_path: Path, run_dir: Path, world: int, loss_norm: str, mixing: str, parallel: str = "ddp") -> None:
    script = tmp_path / "joint_driver.py"
    script.write_text(DRIVER)
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "unit")]),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world)}  # fmt: skip
        if world == 1:
            env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        cmd = [sys.executable, str(script), str(run_dir), loss_norm, mixing, parallel]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]


@pytest.mark.parametrize(
    ("loss_norm", "mixing", "parallel"),
    [
        ("none", "interleave", "ddp"),
        ("running", "all", "ddp"),
        ("none", "interleave", "fsdp"),
        pytest.param("none", "all", "fsdp", marks=pytest.mark.slow),  # the cosines over shards; CI's slow step
    ],
)
def test_two_gloo_ranks_train_the_joint_model_like_one_process(tmp_path, loss_norm, mixing, parallel):
    launch(tmp_path, tmp_path / "single", 1, loss_norm, mixing)
    launch(tmp_path, tmp_path / "ddp", 2, loss_norm, mixing, parallel)  # interleave: the other modality's
    # parameters are unused in an update, which must not hang DDP or desynchronise FSDP2's reductions
    a, b = checkpoint.load_weights(tmp_path / "single"), checkpoint.load_weights(tmp_path / "ddp")
    assert a.keys() == b.keys()
    # as tests/unit/test_distributed.py: a few ulps per all-reduce, far below one wrong step (~lr = 2e-3)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    ha = checkpoint.load_train_state(tmp_path / "single")["history"]
    hb = checkpoint.load_train_state(tmp_path / "ddp")["history"]
    assert [r["loss"] for r in hb] == pytest.approx([r["loss"] for r in ha], rel=1e-5)
    init, _ = tiny_joint(modalities=("image", "text"))
    init = init.state_dict()
    assert max((a[k] - init[k]).abs().max() for k in a if k.startswith("stack.")) > 1e-3  # training moved it
    if mixing == "all":  # the gradient cosines were logged, and agree between the two
        assert [r["cos/image-text"] for r in hb] == pytest.approx([r["cos/image-text"] for r in ha], abs=1e-4)
        assert all(-1 <= r["cos/image-text"] <= 1 for r in ha)


# ------------------------------------------------------------------------------------------ the benchmark


@pytest.mark.slow  # about a minute: four pretraining runs, nine probes, eighteen fine-tuning runs
def test_the_benchmark_pretrains_every_arm_and_prints_paired_differences(project, tmp_path, capsys):
    """``benchmarks/joint.py`` on the smoke project, one pretraining seed: each modality alone and jointly,
    then the probe of joint, separate and scratch."""
    import runpy

    out = tmp_path / "joint.jsonl"
    old = sys.argv
    sys.argv = ["joint.py", str(project), "--seeds", "1", "--finetune-seeds", "0", "1", "--budget", "2",
                "--json", str(out)]  # fmt: skip
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / "benchmarks" / "joint.py"), run_name="__main__")
    finally:
        sys.argv = old
    assert exit_.value.code == 0
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    (row,) = result["rows"]
    assert row["seed"] == 1 and sorted(row["probe"]) == sorted(STEPS)
    for m, arms in row["probe"].items():
        assert all(0.0 <= arms[a]["accuracy"] <= 1.0 for a in ("joint", "separate", "scratch")), m
        n = arms["stack_params"]
        assert n["separate"] == n["scratch"] > 0 and n["joint"] > 0
    for m, arms in row["finetune"].items():
        assert all(len(arms[a]["per_seed"]) == 2 for a in ("joint", "separate", "scratch")), m
    printed = capsys.readouterr().out
    for m in STEPS:
        assert f"{m}: linear probe accuracy" in printed
        assert f"{m}: fine-tuning at 2 labels per class accuracy" in printed
    assert "95% CI over probe seeds" in printed and "95% CI over fine-tuning seeds" in printed


def test_modality_norms_give_each_modality_its_own_layernorms_in_the_shared_blocks():
    model, configs = tiny_joint(modalities=("image", "text"), modality_norms=True)
    with torch.no_grad():  # make the two modalities' norms differ from each other and from the shared ones
        for i, m in enumerate(("image", "text")):
            for p in model.norms[m].values():
                p.add_(0.1 * (i + 1))
    loss, _ = model({**get_batch("image", configs["image"]), "modality": "image"})
    loss.backward()
    assert all(p.grad is not None for p in model.norms["image"].values())
    assert all(p.grad is None for p in model.norms["text"].values())
    shared_norms = [p for n, p in model.stack.named_parameters() if "norm" in n]
    assert shared_norms and all(p.grad is None for p in shared_norms)  # replaced, so unused
    # the image encoder load_encoder would build: its norms are image's, and it computes what the joint did
    enc = get("image").build_encoder(configs["image"])
    enc.load_state_dict(joint_encoder_state(model.state_dict(), "image", enc.stack_attr))
    enc.eval(), model.eval()
    x = get_batch("image", configs["image"])["inputs"]
    stack = dict(model.stack.named_parameters())
    with torch.no_grad():
        shared = model.members["image"].student.features(x)[0]
        kept = {n: stack[n].clone() for n in (k.replace("__", ".") for k in model.norms["image"])}
        for n, p in model.norms["image"].items():  # image's norms into the shared blocks, by hand
            stack[n.replace("__", ".")].copy_(p)
        want = model.members["image"].student.features(x)[0]
        for n, p in kept.items():
            stack[n].copy_(p)
        got = enc.features(x)[0]
    assert torch.equal(got, want) and not torch.equal(shared, want)
    # the teacher's norms follow the student's on the modality's own updates only
    before = {m: [p.clone() for p in model.teacher_norms[m].values()] for m in ("image", "text")}
    model.ema_step(1, {"image": 1})
    assert not all(torch.equal(a, b) for a, b in zip(before["image"], model.teacher_norms["image"].values()))
    assert all(torch.equal(a, b) for a, b in zip(before["text"], model.teacher_norms["text"].values()))


def test_the_joint_arm_fine_tunes_is_evaluated_and_can_be_switched_off(project, tmp_path, capsys):
    from d2v.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["evaluate"]["image"]["probe_inits"] = ["joint"]  # the project has no separate image pretraining
    params["sweep"]["joint_budgets"] = [5]
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = Path("checkpoints/finetune/image/b5-s0-joint")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(copy)
        assert main(["finetune", "image", "--init", "joint", "--seed", "0"]) == 0  # budget: joint_budgets[0]
        # the joint model's architecture and weights, not model.image's
        assert checkpoint.read_meta(run)["model_config"] == checkpoint.read_meta(RUN)["model_config"]["image"]
        assert main(["evaluate", "image", "--init", "joint", "--seed", "0"]) == 0
        metrics = json.loads(Path("metrics/image.json").read_text())
        assert "evaluate/joint/b5/s0/accuracy" in metrics and "probe/joint/s0/accuracy" in metrics
        # a joint run without the modality is an error that says what to do
        with pytest.raises(ValueError, match="not a joint pretraining of image .* add image to joint.modalities"):
            joint_member(_only(RUN, ["audio", "text"]), "image")
        # switched off: every joint stage still writes its outputs (DVC needs them), and nothing reads them
        params["joint"]["modalities"] = []
        Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert main(["pretrain", "joint"]) == 0
        assert sorted(p.name for p in RUN.iterdir()) == ["OFF.txt"]
        assert json.loads(Path("metrics/pretrain/joint.json").read_text()) == {}
        assert main(["finetune", "image", "--init", "joint", "--seed", "0"]) == 0
        assert sorted(p.name for p in run.iterdir()) == ["OFF.txt"]
        assert main(["evaluate", "image", "--init", "joint", "--seed", "0"]) == 0
        said = capsys.readouterr().out
        assert "the joint arm is off" in said
        assert json.loads(Path("metrics/image.json").read_text()) == {}
        # on again (DVC persists the folders): the notes go, and the arm is fine-tuned and scored again
        params["joint"]["modalities"] = list(STEPS)
        Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert main(["pretrain", "joint"]) == 0 and main(["finetune", "image", "--init", "joint", "--seed", "0"]) == 0
        assert not checkpoint.is_off(RUN) and not checkpoint.is_off(run)
        assert main(["evaluate", "image", "--init", "joint", "--seed", "0"]) == 0
        assert "evaluate/joint/b5/s0/accuracy" in json.loads(Path("metrics/image.json").read_text())


def _only(run_dir: Path, keep: list[str]) -> Path:
    """A copy of the joint run whose meta.json lists only ``keep``."""
    other = run_dir.parent / "joint-partial"
    shutil.copytree(run_dir, other)
    step = checkpoint.resolve(other)
    meta = json.loads((step / "meta.json").read_text())
    meta["model_config"] = {m: meta["model_config"][m] for m in keep}
    (step / "meta.json").write_text(json.dumps(meta))
    return other


def test_export_hf_writes_a_joint_models_encoder_where_transformers_has_its_architecture(project, tmp_path):
    transformers = pytest.importorskip("transformers")
    from d2v.cli import main

    out = tmp_path / "text-hf"
    assert main(["export-hf", str(project / RUN), str(out), "--modality", "text"]) == 0
    hf = transformers.Data2VecTextModel.from_pretrained(out).eval()
    enc = load_encoder(project / RUN, modality="text")
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with torch.no_grad():
        ours, _ = enc.features(ids, torch.zeros_like(ids, dtype=torch.bool))
        theirs = hf(input_ids=ids).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-4)
    # the joint stack is post-LN; transformers' vision class is pre-LN: said, and nothing written
    assert main(["export-hf", str(project / RUN), str(tmp_path / "image-hf"), "--modality", "image"]) == 2
    assert not (tmp_path / "image-hf").exists()
