"""Text modality: post-LN RoBERTa encoder (data2vec 1.0 text, HF ``Data2VecText``), masking, HF I/O.

Implements the modality contract (``d2v.modalities.contract``).
"""

from d2v.heads import HeadConfig
from d2v.modalities.text.data import (
    SPECIALS,
    PrepareConfig,
    ShardConfig,
    inference_inputs,
    like_preprocessing,
    like_tokenizer,
    load_tokenizer,
    special_ids,
)
from d2v.modalities.text.heads import TASKS, Data2VecTextForSequenceClassification, build_finetune_model
from d2v.modalities.text.hf import (
    HF_MODEL_TYPE,
    config_from_folder,
    config_from_hf,
    processor_from_hf,
    state_dict_from_hf,
    to_hf,
)
from d2v.modalities.text.masking import make_mask
from d2v.modalities.text.model import (
    PRESETS,
    ModelConfig,
    TextEncoder,
    build_encoder,
    build_pretrain_model,
    make_head,
    model_config,
)

FinetuneMask = None
"""Fine-tuning masks are a speech recipe (wav2vec 2.0 fine-tuning): text has none."""

__all__ = [
    "FinetuneMask",
    "HeadConfig",
    "TASKS",
    "SPECIALS",
    "PrepareConfig",
    "ShardConfig",
    "inference_inputs",
    "like_preprocessing",
    "like_tokenizer",
    "load_tokenizer",
    "special_ids",
    "Data2VecTextForSequenceClassification",
    "build_finetune_model",
    "HF_MODEL_TYPE",
    "PRESETS",
    "ModelConfig",
    "TextEncoder",
    "build_encoder",
    "build_pretrain_model",
    "config_from_folder",
    "config_from_hf",
    "processor_from_hf",
    "make_head",
    "make_mask",
    "model_config",
    "state_dict_from_hf",
    "to_hf",
]
