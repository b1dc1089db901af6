"""Fine-tuning heads: shapes, gradients, frozen conv encoder, CTC letters and decoding, layer ids."""

import pytest
import torch
import torch.nn.functional as F

from d2v.heads import (
    FinetuneModel,
    HeadConfig,
    classification_loss,
    ctc_greedy_decode,
    layer_id,
    mean_pool,
)
from d2v.modalities import get


def tiny_encoder(modality: str):
    torch.manual_seed(0)
    mod = get(modality)
    return mod.build_encoder(mod.model_config({"preset": "tiny"}))


def heads(modality: str):
    return __import__(f"d2v.modalities.{modality}.heads", fromlist=["build_finetune_model"])


def tiny_batch(modality: str, B: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    if modality == "audio":
        pad = torch.zeros(B, 3200, dtype=torch.bool)
        pad[1:2, 2400:] = True
        return {"inputs": torch.randn(B, 3200, generator=g), "padding_mask": pad}
    if modality == "image":
        return {"inputs": torch.randn(B, 3, 28, 28, generator=g)}
    ids = torch.randint(5, 256, (B, 9), generator=g)
    ids[:, 0] = 0  # <s>
    pad = torch.zeros(B, 9, dtype=torch.bool)
    pad[1:2, 6:] = True
    return {"inputs": ids.masked_fill(pad, 1), "padding_mask": pad}


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_classification_forward_backward_predict(modality):
    model = heads(modality).build_finetune_model(
        tiny_encoder(modality), "classification", 4, get(modality).HeadConfig()
    )
    assert isinstance(model, FinetuneModel) and model.encoder.modality == modality
    batch = {**tiny_batch(modality), "labels": torch.tensor([0, 3, 1])}
    loss, metrics = model(batch)
    assert loss.dim() == 0 and set(metrics) == {"loss", "accuracy"}
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    # a fresh head is near chance: loss ~ ln 4 (the head's outputs are small at init)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.5)
    loss.backward()
    head_params = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    assert head_params and all(p.grad is not None for p in head_params)
    model.eval()
    pred = model.predict(batch)
    assert pred.shape == (3,) and pred.dtype == torch.int64 and pred.min() >= 0 and pred.max() < 4


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_encoder_blocks_receive_gradients(modality):
    model = heads(modality).build_finetune_model(tiny_encoder(modality), "classification", 2)
    batch = {**tiny_batch(modality), "labels": torch.tensor([0, 1, 1])}
    model(batch)[0].backward()
    grads = [p.grad for n, p in model.named_parameters() if ".blocks.0." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("modality, bad", [("image", "ctc"), ("text", "ctc"), ("audio", "regression")])
def test_unsupported_task_raises(modality, bad):
    with pytest.raises(ValueError, match="supported tasks"):
        heads(modality).build_finetune_model(tiny_encoder(modality), bad, 3)


def test_other_modality_encoder_and_missing_classes_raise():
    with pytest.raises(ValueError, match="image encoder"):
        heads("image").build_finetune_model(tiny_encoder("text"), "classification", 3)
    with pytest.raises(ValueError, match="num_classes"):
        heads("text").build_finetune_model(tiny_encoder("text"), "classification", None)
    with pytest.raises(ValueError, match="letters vocabulary"):
        heads("audio").build_finetune_model(tiny_encoder("audio"), "ctc", 10)


def test_labels_out_of_range_name_the_problem():
    model = heads("text").build_finetune_model(tiny_encoder("text"), "classification", 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        model({**tiny_batch("text"), "labels": torch.tensor([0, 1, 5])})


def test_ctc_forward_backward_keeps_feature_encoder_frozen():
    model = heads("audio").build_finetune_model(tiny_encoder("audio"), "ctc", None)
    before = {n: p.clone() for n, p in model.encoder.feature_extractor.named_parameters()}
    batch = {
        "inputs": torch.randn(2, 8000, generator=torch.Generator().manual_seed(0)),
        "padding_mask": torch.zeros(2, 8000, dtype=torch.bool),
        "transcripts": ["one two", "nine"],
    }
    batch["padding_mask"][1, 6000:] = True
    loss, metrics = model(batch)
    assert torch.isfinite(loss) and set(metrics) == {"loss"}
    loss.backward()
    frozen = list(model.encoder.feature_extractor.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    proj = model.encoder.feature_projection.projection.weight
    assert proj.grad is not None and proj.grad.abs().sum() > 0  # the projection after the convs trains
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.encoder.feature_extractor.named_parameters())
    # unfreezing the encoder (after fairseq's freeze_finetune_updates) leaves the convs frozen
    model.set_encoder_trainable(False)
    assert not model.encoder.stack.blocks[0].norm1.weight.requires_grad
    model.set_encoder_trainable(True)
    assert model.encoder.stack.blocks[0].norm1.weight.requires_grad
    assert not any(p.requires_grad for p in model.encoder.feature_extractor.parameters())
    model.eval()
    hyps = model.predict(batch)
    assert isinstance(hyps, list) and len(hyps) == 2 and all(isinstance(h, str) for h in hyps)


def test_ctc_loss_is_per_utterance_sum_with_zero_infinity():
    ah = heads("audio")
    torch.manual_seed(0)
    logits = torch.randn(2, 12, len(ah.CTC_VOCAB))
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 9:] = True
    got = ah.ctc_loss(logits, pad, ["ab", "c"])
    lp = logits.log_softmax(-1).transpose(0, 1)
    want = F.ctc_loss(
        lp, torch.tensor([2, 3, 4]), torch.tensor([12, 9]), torch.tensor([2, 1]), reduction="sum"
    )
    assert got.item() == pytest.approx(want.item() / 2, rel=1e-5)
    # a transcript longer than the utterance is impossible: zero_infinity makes it 0 instead of inf
    assert ah.ctc_loss(logits[:1, :2], None, ["abcdef"]).item() == 0.0


def test_letters_round_trip_and_bad_characters():
    ah = heads("audio")
    assert ah.CTC_VOCAB[0] == "<pad>" and ah.CTC_VOCAB[1] == "|" and len(ah.CTC_VOCAB) == 29
    ids = ah.encode_transcript("  Don't   stop ")
    assert "".join(ah.CTC_VOCAB[i] for i in ids) == "don't|stop"
    assert ah.decode_ids(ids) == "don't stop"
    with pytest.raises(ValueError, match=r"\['7'\]"):
        ah.encode_transcript("route 7")


def test_greedy_decode_collapses_repeats_and_blanks():
    # frames: a a _ a b b _ _ c (blank = 0, a=1, b=2, c=3) -> a a b c; second row padded after 3 frames
    seq = [[1, 1, 0, 1, 2, 2, 0, 0, 3], [2, 2, 3, 3, 3, 1, 1, 1, 1]]
    logits = F.one_hot(torch.tensor(seq), 4).float()
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 3:] = True
    assert ctc_greedy_decode(logits, pad, blank=0) == [[1, 1, 2, 3], [2, 3]]
    assert ctc_greedy_decode(logits[:1, :0]) == [[]]


def test_mean_pool_ignores_padding():
    h = torch.arange(12.0).view(2, 3, 2)
    pad = torch.tensor([[False, False, True], [True, True, True]])
    assert torch.equal(mean_pool(h, pad), torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    assert torch.equal(mean_pool(h, None), h.mean(1))


def test_audio_classification_pools_only_real_frames():
    model = heads("audio").build_finetune_model(tiny_encoder("audio"), "classification", 2).eval()
    batch = tiny_batch("audio", B=2)  # row 1 is padded after 2400 of 3200 samples
    h, pad = model.encode(batch)
    assert pad is not None and pad[1].any() and not pad[0].any()
    n = int((~pad[1]).sum())
    x = model.projector(h)
    want = model.classifier(torch.stack([x[0].mean(0), x[1, :n].mean(0)]))
    assert torch.allclose(model.logits(batch), want, atol=1e-6)  # same fp32 ops up to summation order
    assert not torch.allclose(model.classifier(x[1].mean(0)), want[1], atol=1e-6)  # padding would change it


def test_classification_loss_label_smoothing_and_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    loss, m = classification_loss(logits, labels, 0.1)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item())
    assert m["accuracy"].item() == pytest.approx(2 / 3)


def test_image_finetuning_surgery_is_beit_and_rebuildable():
    ih = heads("image")
    enc = tiny_encoder("image")
    shared = enc.rel_pos[0].table.detach().clone()
    model = ih.build_finetune_model(enc, "classification", 3)
    assert isinstance(model.encoder.norm, torch.nn.Identity) and not model.encoder.config.final_norm
    assert len(model.encoder.rel_pos) == 2 and all(
        torch.equal(r.table, shared) for r in model.encoder.rel_pos
    )
    assert model.label_smoothing == 0.1
    # the fine-tuned state dict loads into a model rebuilt from the updated encoder config
    mod = get("image")
    again = ih.build_finetune_model(mod.build_encoder(model.encoder.config), "classification", 3)
    again.load_state_dict(model.state_dict())
    ids = model.layer_ids()
    assert ids["encoder.rel_pos.1.table"] == 2 and ids["encoder.stack.blocks.1.norm1.weight"] == 2
    assert ids["encoder.patch_embed.weight"] == 0 and ids["encoder.cls_token"] == 0
    assert ids["classifier.weight"] == 3 and ids["fc_norm.weight"] == 3


def test_layer_id_rule():
    assert layer_id("encoder.embeddings.tokens.weight", 12) == 0
    assert layer_id("encoder.encoder.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("encoder.stack.blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("classifier.out_proj.weight", 12) == 13
    assert layer_id("encoder.rel_pos.3.table", 12) == 0
    assert layer_id("encoder.rel_pos.3.table", 12, ("blocks", "rel_pos")) == 4
    with pytest.raises(ValueError, match="depth 2"):
        layer_id("encoder.stack.blocks.5.norm1.weight", 2)


def test_head_config_validation():
    with pytest.raises(ValueError, match="head.dropout"):
        HeadConfig(dropout=1.5)
    with pytest.raises(ValueError, match="proj_dim"):
        get("audio").HeadConfig(proj_dim=0)


def test_finetune_masks_act_in_training_only():
    """``mask`` (-> mask_emb) and ``channel_mask`` (-> zeros) change the training forward, never eval."""
    model = heads("audio").build_finetune_model(
        tiny_encoder("audio"), "classification", 4, get("audio").HeadConfig()
    )
    batch = tiny_batch("audio")
    model.eval()
    plain = model.logits(batch)
    h, _ = model.encode(batch)
    T, D = h.shape[1], h.shape[2]
    masked = {
        **batch,
        "mask": torch.ones(3, T, dtype=torch.bool),
        "channel_mask": torch.ones(3, D, dtype=torch.bool),
    }
    assert torch.equal(model.logits(masked), plain)
    model.train()
    torch.manual_seed(0)
    ref = model.logits(batch)
    torch.manual_seed(0)
    only_channels = model.logits({**batch, "channel_mask": torch.ones(3, D, dtype=torch.bool)})
    assert not torch.allclose(ref, only_channels)
    # every channel zeroed and every frame masked: the inputs no longer matter
    x2 = {**masked, "inputs": torch.randn_like(batch["inputs"])}
    torch.manual_seed(0)
    a = model.logits(masked)
    torch.manual_seed(0)
    assert torch.allclose(a, model.logits(x2), atol=1e-6)


def test_finetune_mask_config_validation():
    from d2v.config import ConfigError, from_dict
    from d2v.modalities.audio import FinetuneMask

    assert from_dict(FinetuneMask, {"prob": 0.5}).prob == 0.5
    for bad in ({"prob": 1.0}, {"channel_length": 0}, {"min_masks": -1}, {"typo": 1}):
        with pytest.raises(ConfigError):
            from_dict(FinetuneMask, bad)
