"""Models: open_clip models by name or config, vlp's tiny configs, preprocessing metadata."""

from vlp.models.factory import (
    PretrainedError,
    create_model,
    model_config,
    preprocess_config,
    resolve_model_name,
)
from vlp.models.tokenizers import SentencePieceTokenizer

__all__ = [
    "PretrainedError",
    "SentencePieceTokenizer",
    "create_model",
    "model_config",
    "preprocess_config",
    "resolve_model_name",
]
