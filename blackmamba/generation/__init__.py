"""Generation: sampling, and the prefill + decode loop over the constant-size recurrent cache."""

from .decoder import Decoder, SamplingOptions, decoder_for
from .generate import generate, prefill, stream_generate
from .sampling import sample_next

__all__ = ["Decoder", "SamplingOptions", "decoder_for", "generate", "prefill", "sample_next", "stream_generate"]
