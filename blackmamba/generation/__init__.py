"""Generation: sampling, and the prefill + decode loop over the constant-size recurrent cache."""

from .generate import generate, stream_generate
from .sampling import sample_next

__all__ = ["generate", "sample_next", "stream_generate"]
