"""Generation: sampling, the prefill + decode loop over the constant-size recurrent cache, and text streaming."""

from .decoder import Decoder, decoder_for
from .generate import generate, prefill, stream_generate
from .prefill_graphs import PrefillBuckets, PrefillGraphs, clear_prefill_graphs, prefill_graphs_for
from .sampling import (
    MAX_NEW_TOKENS,
    GenerationError,
    SamplingOptions,
    check_max_new_tokens,
    check_prefill_chunk_size,
    check_sampling_options,
    sample_next,
)
from .text import TextStreamer, cut_at_stop, generate_text, stream_text

__all__ = [
    "MAX_NEW_TOKENS",
    "Decoder",
    "GenerationError",
    "PrefillBuckets",
    "PrefillGraphs",
    "SamplingOptions",
    "TextStreamer",
    "check_max_new_tokens",
    "check_prefill_chunk_size",
    "check_sampling_options",
    "clear_prefill_graphs",
    "cut_at_stop",
    "decoder_for",
    "generate",
    "generate_text",
    "prefill",
    "prefill_graphs_for",
    "sample_next",
    "stream_generate",
    "stream_text",
]
