"""Models: open_clip models by name or config, vlp's tiny configs, preprocessing metadata,
Hugging Face text towers (aliases, a tiny random BERT, partial freezing).

Importing this package registers a correct ``max_pooler`` for open_clip's Hugging Face text
towers (:mod:`vlp.models.hf_pooling`).
"""

from vlp.models import hf_pooling  # noqa: F401  (registers open_clip's "max_pooler")
from vlp.models.factory import (
    PretrainedError,
    create_model,
    model_config,
    preprocess_config,
    resolve_model_name,
)
from vlp.models.freeze import freeze_text_layers
from vlp.models.hf_towers import HF_TOWERS, HFTowerError, minilm_path, tiny_bert_path
from vlp.models.tiny_bert import write_tiny_bert
from vlp.models.tokenizers import SentencePieceTokenizer

__all__ = [
    "HF_TOWERS",
    "HFTowerError",
    "PretrainedError",
    "SentencePieceTokenizer",
    "create_model",
    "freeze_text_layers",
    "minilm_path",
    "model_config",
    "preprocess_config",
    "resolve_model_name",
    "tiny_bert_path",
    "write_tiny_bert",
]
