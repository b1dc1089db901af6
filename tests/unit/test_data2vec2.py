"""data2vec 2.0 (``algorithm: data2vec2``) on tiny configs: kept tokens only, decoder order, one teacher pass
for all clones, inverse block masks, hand-computed targets and loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from d2v.data2vec2 import Data2Vec2, decoder_input, gather_tokens, keep_indices
from d2v.decoder import ConvDecoder, DecoderConfig
from d2v.modalities import MODALITIES, get

B = 3


def tiny(modality: str, **over):
    mod = get(modality)
    cfg = mod.model_config({"preset": "tiny", "algorithm": "data2vec2", **over})
    torch.manual_seed(0)
    return mod, cfg, mod.build_pretrain_model(cfg)


def batch(modality: str, mod, cfg, g: torch.Generator) -> dict:
    """A pretraining batch as the loader makes it (masks and kept indices on the CPU)."""
    if modality == "audio":
        n = torch.tensor([4000, 3200, 2400])
        wav = torch.randn(B, 4000, generator=g)
        pad = torch.arange(4000)[None] >= n[:, None]
        out = {"inputs": wav.masked_fill(pad, 0.0), "padding_mask": pad, "mask": mod.make_mask(n, cfg, g)}
    elif modality == "image":
        out = {"inputs": torch.randn(B, 3, 28, 28, generator=g), "mask": mod.make_mask(B, cfg, g)}
    else:
        ids = torch.randint(cfg.num_special, cfg.vocab_size, (B, 20), generator=g)
        ids[:, 0], ids[:, -1] = cfg.bos_id, cfg.eos_id
        pad = torch.zeros(B, 20, dtype=torch.bool)
        pad[2, 15:] = True
        ids = ids.masked_fill(pad, cfg.pad_id)
        student, mask = mod.make_mask(ids, pad, cfg, g)
        assert torch.equal(student, ids)  # 2.0 drops masked tokens: the ids are never corrupted
        out = {"inputs": ids, "padding_mask": pad, "mask": mask}
    out["keep"] = keep_indices(out["mask"])
    return out


@pytest.mark.parametrize("modality", MODALITIES)
def test_the_student_encodes_only_the_kept_tokens(modality):
    mod, cfg, model = tiny(modality)
    assert isinstance(model, Data2Vec2)
    b = batch(modality, mod, cfg, torch.Generator().manual_seed(0))
    seen: dict[str, list[tuple[int, ...]]] = {"student": [], "teacher": []}
    for who in seen:
        block = getattr(model, who).stack if modality != "text" else getattr(model, who).encoder
        block.blocks[0].register_forward_pre_hook(lambda m, args, who=who: seen[who].append(args[0].shape))
    loss, metrics = model(b)
    M, P = cfg.v2.clones, model.student.num_prefix_tokens
    K = b["keep"].shape[1]
    T = b["mask"].shape[1]
    assert seen["student"] == [(B * M, P + K, cfg.transformer.dim)]  # only kept tokens, all clones
    assert seen["teacher"] == [(B, P + T, cfg.transformer.dim)]  # one pass per original sample, all tokens
    assert K < T and torch.isfinite(loss) and metrics["loss"] == loss.detach()
    loss.backward()
    assert all(p.grad is not None for p in model.head.proj.parameters())  # the decoder trains
    assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("modality", MODALITIES)
def test_clones_get_different_masks_and_rows_keep_the_same_count(modality):
    mod, cfg, _ = tiny(modality)
    b = batch(modality, mod, cfg, torch.Generator().manual_seed(1))
    M = cfg.v2.clones
    mask = b["mask"].view(B, M, -1)
    assert M >= 2 and not torch.equal(mask[:, 0], mask[:, 1])
    kept = (~b["mask"]).sum(1)
    assert (kept == kept[0]).all()
    again = batch(modality, mod, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(again["mask"], b["mask"])  # the same seed gives the same masks
    pad = b.get("padding_mask")
    if pad is not None:  # padding is never masked (audio: frames beyond the clip; text: pad positions)
        frames = pad if modality == "text" else None
        if frames is not None:
            assert not (b["mask"] & frames.repeat_interleave(M, 0)).any()


def test_inverse_block_masks_keep_exactly_the_configured_count():
    from d2v.modalities.image.masking import inverse_block_mask

    for grid, ratio in (((14, 14), 0.8), ((7, 7), 0.8), ((4, 4), 0.75), ((14, 14), 0.75)):
        T = grid[0] * grid[1]
        m = inverse_block_mask(64, grid, ratio, 0.07, 3, torch.Generator().manual_seed(0))
        assert m.shape == (64, T)
        assert ((~m).sum(1) == int(T * (1 - ratio))).all()  # ViT-B: 39 of 196 kept (spec §5.4)
        same = inverse_block_mask(64, grid, ratio, 0.07, 3, torch.Generator().manual_seed(0))
        assert torch.equal(m, same)
    # blocks, not salt and pepper: kept patches have kept neighbours far more often than chance
    m = inverse_block_mask(256, (14, 14), 0.8, 0.07, 3, torch.Generator().manual_seed(2))
    kept = (~m).view(-1, 14, 14).float()
    right = (kept[:, :, :-1] * kept[:, :, 1:]).sum() / kept[:, :, :-1].sum()
    assert right > 0.4  # i.i.d. keeping would give ~0.2


def test_exactly_k_trims_or_fills_each_row_uniformly():
    from d2v.modalities.image.masking import exactly_k

    g = torch.Generator().manual_seed(0)
    kept = torch.zeros(4000, 10, dtype=torch.bool)
    kept[:2000, :6] = True  # too many: keep 4 of these 6
    kept[2000:, :2] = True  # too few: keep both, add 2 of the other 8
    out = exactly_k(kept, 4, g)
    assert (out.sum(1) == 4).all()
    assert not (out[:2000] & ~kept[:2000]).any() and (out[2000:] >= kept[2000:]).all()
    # uniform: each of the 6 is kept with p 4/6, each of the 8 others added with p 2/8 (+-4 sigma)
    assert torch.allclose(out[:2000, :6].float().mean(0), torch.full((6,), 4 / 6), atol=0.045)
    assert torch.allclose(out[2000:, 2:].float().mean(0), torch.full((8,), 2 / 8), atol=0.04)


def test_decoder_input_restores_the_original_order():
    T, D = 10, 4
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1, 1, 0], [1, 1, 0, 0, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    keep = keep_indices(mask)
    assert keep.tolist() == [[0, 3, 4, 6, 9], [2, 3, 5, 6, 9]]
    x = torch.arange(2 * T * D, dtype=torch.float32).view(2, T, D)
    h = gather_tokens(x, keep)
    full = decoder_input(h, keep, T, noise_std=0.0)
    assert torch.equal(full[~mask], x[~mask]) and torch.equal(full[mask], torch.zeros_like(x[mask]))
    noisy = decoder_input(h, keep, T, noise_std=0.01)
    assert torch.equal(noisy[~mask], x[~mask]) and 0 < noisy[mask].std() < 0.05
    with pytest.raises(ValueError, match="same number"):
        keep_indices(torch.tensor([[True, False], [False, False]]))


def test_the_decoder_is_translation_equivariant_over_the_sequence():
    """A conv decoder predicts each position from its neighbourhood: shifting the input shifts the output."""
    torch.manual_seed(0)
    dec = ConvDecoder(DecoderConfig(layers=2, kernel=3, dim=8, groups=2), 8).eval()
    x = torch.zeros(1, 12, 8)
    x[0, 3] = torch.randn(8)
    y, y_shift = dec(x), dec(torch.roll(x, 4, 1))
    torch.testing.assert_close(y_shift[0, 7], y[0, 3])


def test_image_targets_and_loss_equal_a_hand_computation():
    mod, cfg, model = tiny("image")
    model.eval()  # no dropout: the hand computation below has none
    b = batch("image", mod, cfg, torch.Generator().manual_seed(3))
    M, D = cfg.v2.clones, cfg.transformer.dim
    torch.manual_seed(7)
    loss, metrics = model(b)

    # targets: the teacher's top-K FFN outputs (CLS dropped), instance norm each, mean, then layer norm
    with torch.no_grad():
        x, _ = model.teacher.local_features(b["inputs"])
        layers = model.teacher.contextualize(x, None, tap="ffn").layers[-cfg.targets.top_k :]
        normed = [F.instance_norm(a[:, 1:].transpose(1, 2)).transpose(1, 2) for a in layers]
        y = sum(normed) / len(normed)
        y = F.layer_norm(y, (D,)).repeat_interleave(M, 0)
    # student: zero masked patches, positions, keep, blocks; decoder on kept outputs + noise
    torch.manual_seed(7)
    s = model.student
    xs, _ = s.local_features(b["inputs"])
    xs = s.add_positions(xs.repeat_interleave(M, 0).masked_fill(b["mask"][..., None], 0.0), None)
    out = s.encode_tokens(gather_tokens(xs, b["keep"]), None)
    pred = model.head(decoder_input(out.x_BTD[:, 1:], b["keep"], b["mask"].shape[1], 0.01))
    m = b["mask"]
    reg = ((pred - y) ** 2).sum(-1)[m].mean() / math.sqrt(D)
    cls = ((out.x_BTD[:, 0] - y.mean(1)) ** 2).sum() / math.sqrt(D)
    torch.testing.assert_close(loss, reg + 0.01 * cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["cls_loss"], cls.detach(), rtol=1e-5, atol=1e-5)


def test_the_ema_scope_follows_the_recipe():
    """Vision 2.0 EMA's everything; speech's teacher averages its own positional convs (1.0 copies them);
    text's teacher is the blocks on the student's embeddings (spec §5.5)."""
    _, _, audio2 = tiny("audio")
    _, _, audio1 = tiny("audio", algorithm="data2vec")
    name = lambda pairs, model: {n for n, t in model.teacher.named_parameters() for p, _ in pairs if p is t}  # noqa: E731
    assert any(n.startswith("pos_conv") for n in name(audio2._ema_pairs, audio2))
    assert not any(n.startswith("pos_conv") for n in name(audio1._ema_pairs, audio1))
    _, _, image2 = tiny("image")
    assert any(n.startswith("patch_embed") for n in name(image2._ema_pairs, image2))
    _, _, text2 = tiny("text")
    assert not any(n.startswith("embeddings") for n in name(text2._ema_pairs, text2))


def test_a_checkpoint_under_the_other_algorithm_is_a_clear_error(tmp_path):
    from d2v import checkpoint
    from d2v.config import to_dict

    mod, cfg, model = tiny("image")
    checkpoint.save(tmp_path, 1, model.state_dict(), {"modality": "image", "kind": "pretrain",
                                                       "model_config": to_dict(cfg)})  # fmt: skip
    v1 = mod.model_config({"preset": "tiny"})
    with pytest.raises(ValueError, match="pretrained by data2vec2, but model.image.algorithm is data2vec"):
        checkpoint.check_compatible(tmp_path, "image", v1, "pretrain")
    checkpoint.check_compatible(tmp_path, "image", cfg, "pretrain")  # the same params: fine


@pytest.mark.parametrize("modality", MODALITIES)
def test_finetuning_and_embedding_see_every_token(tmp_path, modality):
    """A data2vec2 checkpoint loads as a plain encoder: inference runs the full sequence."""
    from d2v import checkpoint
    from d2v.config import to_dict
    from d2v.load import build_finetune_model, load_checkpoint_encoder

    mod, cfg, model = tiny(modality)
    meta = {
        "modality": modality,
        "kind": "pretrain",
        "model_config": to_dict(cfg),
        "encoder_prefix": "student.",
    }
    checkpoint.save(tmp_path, 1, model.state_dict(), meta)
    enc = load_checkpoint_encoder(tmp_path)
    sd = model.student.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in enc.state_dict().items())
    b = batch(modality, mod, cfg, torch.Generator().manual_seed(4))
    h, _ = enc.features(b["inputs"], b.get("padding_mask"))
    assert h.shape[1] == b["mask"].shape[1] + enc.num_prefix_tokens
    ft = build_finetune_model(modality, enc, "classification", 3)
    loss, _ = ft(
        {**{k: v for k, v in b.items() if k in ("inputs", "padding_mask")}, "labels": torch.tensor([0, 1, 2])}
    )
    assert torch.isfinite(loss)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_on_small_real_shards_the_loss_falls_and_the_targets_keep_their_variance(
    tmp_path, monkeypatch, modality
):
    """``d2v pretrain`` with ``algorithm: data2vec2`` end to end on real (tiny) shards: the loader's masks
    and kept indices, the CLI, checkpoints. The collapse guard (target_var >= 0.1) stays on throughout."""
    import json

    import yaml

    from d2v import checkpoint
    from d2v.cli import main

    monkeypatch.chdir(tmp_path)
    params = {
        "seed": 0,
        "paths": {"raw": "raw", "shards": "shards", "checkpoints": "ckpt", "metrics": "metrics", "plots": "plots"},
        "tracking": {"mode": "disabled"},
        "prepare": {"image": {"max_train": 200, "max_test": 20},
                    "text": {"wiki_articles": 2, "lee_documents": 20, "bbc_articles": 20,
                             "sentiment_snippets": 0}},
        "shard": {"image": {"samples_per_shard": 100}, "text": {"vocab_size": 600, "max_tokens": 64}},
        "model": {
            "image": {"preset": "tiny", "algorithm": "data2vec2"},
            "text": {"preset": "tiny", "algorithm": "data2vec2", "vocab_size": 600, "max_positions": 64},
        },
        "pretrain": {m: {"steps": 40, "batch_size": 8, "log_every": 5, "checkpoint_every": 40, "guard_after": 5,
                         "optim": {"lr": 2e-3, "warmup": 0.1}} for m in ("image", "text")},
    }  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["prepare", modality]) == 0 and main(["shard", modality]) == 0
    assert main(["pretrain", modality]) == 0  # the guard would stop it (exit 2) on collapsed targets
    curve = (tmp_path / "plots" / "pretrain" / f"{modality}.csv").read_text().splitlines()
    rows = [dict(zip(curve[0].split(","), map(float, r.split(",")))) for r in curve[1:]]
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < losses[0], losses
    assert min(r["target_var"] for r in rows) > 0.1
    meta = checkpoint.read_meta(tmp_path / "ckpt" / "pretrain" / modality)
    assert meta["model_config"]["algorithm"] == "data2vec2"
    metrics = json.loads((tmp_path / "metrics" / "pretrain" / f"{modality}.json").read_text())
    assert metrics["pretrain/steps"] == 40
