"""d2v: data2vec self-supervised pretraining for speech, images and text."""

__version__ = "0.1.0"


def load_encoder(path, pretrained: bool = True, seed: int = 0, modality: str | None = None):
    """Load a d2v encoder from a Hugging Face data2vec directory or a d2v checkpoint (see ``d2v.load``);
    ``modality`` picks the encoder of a joint checkpoint."""
    from d2v.load import load_encoder as _load

    return _load(path, pretrained=pretrained, seed=seed, modality=modality)


__all__ = ["load_encoder", "__version__"]
