"""Images: data2vec 1.0 vision, the BEiT-style ViT of [DV] (HF ``Data2VecVision``).

Implements the modality contract (``d2v.modalities.contract``).
"""

from d2v.heads import HeadConfig
from d2v.modalities.image.data import PrepareConfig, ShardConfig, inference_inputs, like_preprocessing
from d2v.modalities.image.heads import (
    TASKS,
    Data2VecVisionForImageClassification,
    build_finetune_model,
    prepare_for_finetuning,
)
from d2v.modalities.image.hf import (
    HF_MODEL_TYPE,
    config_from_hf,
    processor_from_hf,
    state_dict_from_hf,
    to_hf,
)
from d2v.modalities.image.masking import make_mask
from d2v.modalities.image.model import (
    ImageEncoder,
    ModelConfig,
    build_encoder,
    build_pretrain_model,
    make_head,
    model_config,
)

FinetuneMask = None
"""Fine-tuning masks are a speech recipe (wav2vec 2.0 fine-tuning): images have none."""

__all__ = [
    "FinetuneMask",
    "HeadConfig",
    "TASKS",
    "PrepareConfig",
    "ShardConfig",
    "inference_inputs",
    "like_preprocessing",
    "Data2VecVisionForImageClassification",
    "build_finetune_model",
    "prepare_for_finetuning",
    "HF_MODEL_TYPE",
    "ImageEncoder",
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
