"""Layer-range transformer engine on ggml: one pipeline stage of a GGUF model."""

from __future__ import annotations

from node.engines.stage.config import SUPPORTED_ARCHITECTURES, ModelArgs
from node.engines.stage.engine import MAX_CHUNK, StageEngine, StageMemory

__all__ = ["MAX_CHUNK", "SUPPORTED_ARCHITECTURES", "ModelArgs", "StageEngine", "StageMemory"]
