"""BlackMamba: Mamba selective-state-space blocks alternating with top-1 mixture-of-experts MLP blocks."""

from .checkpoint import CheckpointError, convert, load_pretrained, save_pretrained, save_released
from .config import BlackMambaConfig, ConfigError
from .generation import SamplingOptions, generate, stream_generate
from .model import BlackMamba, BlackMambaOutput, InferenceCache, cast_model

__all__ = [
    "BlackMamba",
    "BlackMambaConfig",
    "BlackMambaOutput",
    "CheckpointError",
    "ConfigError",
    "InferenceCache",
    "SamplingOptions",
    "cast_model",
    "convert",
    "generate",
    "load_pretrained",
    "save_pretrained",
    "save_released",
    "stream_generate",
]
__version__ = "0.1.0"
