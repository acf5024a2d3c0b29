"""Reading safetensors checkpoints: the key index and the memory-mapping reader."""

from .index import TensorIndex, resolve_checkpoint
from .reader import SafetensorsFile, TensorInfo

__all__ = ["TensorIndex", "resolve_checkpoint", "SafetensorsFile", "TensorInfo"]
