"""The SURGELLM application: the model (a ``transformers`` model, registered
with ``AutoConfig``, ``AutoModel`` and ``AutoModelForSequenceClassification``
when this package is imported), its processor, lexical features and word
lists, and the training and evaluation commands. Built on the kernel layers
(``ops``, ``nn``), which never import it."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_surgellm import SurgeLLMConfig
from .features import LexicalFeaturizer, lexical_features, task_prefix
from .modeling_surgellm import (
    SurgeLLMForSequenceClassification,
    SurgeLLMModel,
    SurgeLLMPreTrainedModel,
)
from .processing_surgellm import SurgeLLMProcessor

AutoConfig.register(SurgeLLMConfig.model_type, SurgeLLMConfig, exist_ok=True)
AutoModel.register(SurgeLLMConfig, SurgeLLMModel, exist_ok=True)
AutoModelForSequenceClassification.register(
    SurgeLLMConfig, SurgeLLMForSequenceClassification, exist_ok=True
)

__all__ = [
    "SurgeLLMConfig",
    "SurgeLLMModel",
    "SurgeLLMForSequenceClassification",
    "SurgeLLMPreTrainedModel",
    "SurgeLLMProcessor",
    "LexicalFeaturizer",
    "lexical_features",
    "task_prefix",
]
