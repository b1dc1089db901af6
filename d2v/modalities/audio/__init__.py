"""Speech: data2vec 1.0 audio encoder, span masking and Hugging Face ``Data2VecAudio`` interchange."""

from d2v.modalities.audio.data import PrepareConfig, ShardConfig, digit_voices, inference_inputs, load_audio
from d2v.modalities.audio.heads import (
    CTC_VOCAB,
    Data2VecAudioForCTC,
    Data2VecAudioForSequenceClassification,
    build_finetune_model,
    decode_ids,
    encode_transcript,
)
from d2v.modalities.audio.hf import HF_MODEL_TYPE, config_from_hf, state_dict_from_hf, to_hf
from d2v.modalities.audio.masking import make_mask
from d2v.modalities.audio.model import (
    PRESETS,
    AudioEncoder,
    ModelConfig,
    build_encoder,
    build_pretrain_model,
    feature_lengths,
    make_head,
    model_config,
    receptive_field,
)

__all__ = [
    "PrepareConfig",
    "ShardConfig",
    "digit_voices",
    "inference_inputs",
    "load_audio",
    "CTC_VOCAB",
    "Data2VecAudioForCTC",
    "Data2VecAudioForSequenceClassification",
    "build_finetune_model",
    "decode_ids",
    "encode_transcript",
    "HF_MODEL_TYPE",
    "PRESETS",
    "AudioEncoder",
    "ModelConfig",
    "build_encoder",
    "build_pretrain_model",
    "config_from_hf",
    "feature_lengths",
    "make_head",
    "make_mask",
    "model_config",
    "receptive_field",
    "state_dict_from_hf",
    "to_hf",
]
