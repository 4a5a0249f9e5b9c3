"""The SURGELLM application: the model, its lexical features and word lists,
data, training and evaluation. Built on the kernel layers (``ops``, ``nn``),
which never import it."""
from .features import LexicalFeaturizer, lexical_features, task_prefix
from .model import SurgeLLMConfig, SurgeLLMModel

__all__ = ["SurgeLLMConfig", "SurgeLLMModel", "LexicalFeaturizer", "lexical_features",
           "task_prefix"]
