"""Model types (template + tokenizer facts + context length): `get_model_type(name)`."""
from ochat.config.model_types import MODEL_TYPES, ModelType, Template, get_model_type

__all__ = ["MODEL_TYPES", "ModelType", "Template", "get_model_type"]
