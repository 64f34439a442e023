from vlmjax.models.config import LLMConfig, VisionConfig, VLMConfig, with_dtypes
from vlmjax.models.llm import LLM
from vlmjax.models.projector import Projector
from vlmjax.models.vit import VisionTower
from vlmjax.models.vlm import VLM, check_image_tokens

__all__ = ["LLMConfig", "VisionConfig", "VLMConfig", "with_dtypes", "LLM", "Projector", "VisionTower", "VLM", "check_image_tokens"]
