"""Speech: data2vec 1.0 audio encoder, span masking and Hugging Face ``Data2VecAudio`` interchange.

Implements the modality contract (``d2v.modalities.contract``).
"""

from d2v.modalities.audio.data import (
    PrepareConfig,
    ShardConfig,
    digit_voices,
    inference_inputs,
    like_preprocessing,
    load_audio,
)
from d2v.modalities.audio.frames import SAMPLE_RATE, feature_lengths, normalize_waveform, receptive_field
from d2v.modalities.audio.heads import (
    CTC_VOCAB,
    TASKS,
    Data2VecAudioForCTC,
    Data2VecAudioForSequenceClassification,
    build_finetune_model,
    decode_ids,
    encode_transcript,
)
from d2v.modalities.audio.heads import AudioHeadConfig as HeadConfig
from d2v.modalities.audio.hf import (
    HF_MODEL_TYPE,
    config_from_hf,
    processor_from_hf,
    state_dict_from_hf,
    to_hf,
)
from d2v.modalities.audio.masking import FinetuneMask, make_mask
from d2v.modalities.audio.model import (
    PRESETS,
    AudioEncoder,
    ModelConfig,
    build_encoder,
    build_pretrain_model,
    make_head,
    model_config,
)

__all__ = [
    "PrepareConfig",
    "ShardConfig",
    "digit_voices",
    "inference_inputs",
    "like_preprocessing",
    "load_audio",
    "SAMPLE_RATE",
    "feature_lengths",
    "normalize_waveform",
    "receptive_field",
    "CTC_VOCAB",
    "TASKS",
    "Data2VecAudioForCTC",
    "Data2VecAudioForSequenceClassification",
    "HeadConfig",
    "build_finetune_model",
    "decode_ids",
    "encode_transcript",
    "HF_MODEL_TYPE",
    "FinetuneMask",
    "PRESETS",
    "AudioEncoder",
    "ModelConfig",
    "build_encoder",
    "build_pretrain_model",
    "config_from_hf",
    "processor_from_hf",
    "make_head",
    "make_mask",
    "model_config",
    "state_dict_from_hf",
    "to_hf",
]
