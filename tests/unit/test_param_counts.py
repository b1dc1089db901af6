"""The Base presets build the papers' models: parameter counts of the encoder, per modality and algorithm.

Counted: every parameter of ``build_encoder(model_config({"preset": "base", "algorithm": a}))``, the student
encoder that fine-tuning and ``embed`` use: the local encoder (speech: the 7-conv stack and its projection;
images: the patch embedding; text: the 50,265-token and 514-position tables with their LayerNorm), the
positions (speech: 5 positional convs; images: the relative-bias table (1.0) or nothing (2.0: fixed sin-cos);
text: learned), the 12 blocks and their norms, the CLS token and the learned mask embedding. Not counted: the
EMA teacher (a copy), the regression head (1.0), the conv decoder (2.0) and fine-tuning heads.

Two checks each. Against the size the papers compare with (``PAPER``), within ``TOLERANCE`` = 2 %: the
published totals are rounded (86M) or belong to the sibling model the paper compares with (wav2vec 2.0 Base,
RoBERTa-base), whose modules differ slightly (the comments say by how much). And exactly against
``EXPECTED``: the count of the reference implementation with the same modules (transformers 5.x
``Data2Vec*Model`` / ``Wav2Vec2Model`` built from their base configs, counted once, adjusted by the modules
each side lacks, as written next to each), so any change to a Base encoder's architecture shows up here.
Built on the ``meta`` device (shapes only, no memory, no init arithmetic): well under a second each.
"""

from __future__ import annotations

import pytest
import torch

from d2v.modalities import get

TOLERANCE = 0.02
"""Relative distance allowed to the papers' rounded or sibling-model sizes (the largest gap is speech, 1.3 %)."""

PAPER = {
    # wav2vec 2.0 Base, the model [P1] Table 2 compares with (transformers Wav2Vec2Model: 94,371,712). Its
    # positional encoding is one weight-normed conv (kernel 128, 16 groups: 4,719,488 parameters) where data2vec
    # has 5 convs of kernel 19 (3,505,920), and one GroupNorm where data2vec has a LayerNorm per conv (+6,144):
    # 94,371,712 - 1,213,568 + 6,144 = 93,164,288.
    "audio": 94_371_712,
    "image": 86_000_000,  # ViT-B/16 as the ViT/BEiT/MAE papers quote it ("86M")
    "text": 124_645_632,  # RoBERTa-base with its pooler (transformers RobertaModel, "125M")
}

EXPECTED = {
    # = transformers Data2VecAudioModel(Data2VecAudioConfig()) (facebook/data2vec-audio-base), mask
    # embedding included. data2vec 2.0 has the same encoder here (d2v leaves out fairseq's ALiBi scales).
    ("audio", "data2vec"): 93_164_288,
    ("audio", "data2vec2"): 93_164_288,
    # = transformers Data2VecVisionModel of facebook/data2vec-vision-base (shared relative bias, final LN):
    # 85,665,360, + 12 x 768 key biases (d2v's fused qkv has one; BEiT has q and v biases only) + the 768
    # mask token (HF builds the model without it).
    ("image", "data2vec"): 85_675_344,
    # 1.0 minus layer-scale (12 x 2 x 768), the relative table (732 x 12) and the final LN (1,536), plus the
    # LayerNorm before the blocks (1,536): fairseq's ViT-B (patch embedding, CLS, that LN, 2 prenet + 10
    # post-LN blocks = 85,647,360) + the 768 mask embedding d2v keeps in every encoder (unused by 2.0).
    ("image", "data2vec2"): 85_648_128,
    # = transformers Data2VecTextModel (vocab 50,265, 514 positions, 1 token type): 124,645,632, less the
    # pooler (590,592; its task models build the encoder without it, add_pooling_layer=False) and the
    # token-type row (768; d2v folds it into the position table on import).
    ("text", "data2vec"): 124_054_272,
    ("text", "data2vec2"): 124_054_272,
}


def encoder_params(modality: str, algorithm: str) -> int:
    mod = get(modality)
    cfg = mod.model_config({"preset": "base", "algorithm": algorithm})
    with torch.device("meta"):
        return sum(p.numel() for p in mod.build_encoder(cfg).parameters())


@pytest.mark.parametrize("modality, algorithm", sorted(EXPECTED))
def test_base_preset_has_the_papers_parameter_count(modality, algorithm):
    n = encoder_params(modality, algorithm)
    assert n == EXPECTED[modality, algorithm]
    assert abs(n - PAPER[modality]) <= TOLERANCE * PAPER[modality], (n, PAPER[modality])
