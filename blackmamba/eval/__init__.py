"""Evaluation: lm-evaluation-harness adapter (offline task data), perplexity / bits per byte, expert load.

Importing :mod:`blackmamba.eval.lm_eval_adapter` registers the ``blackmamba`` model with lm-eval; it needs
the optional ``lm-eval`` package, so nothing here imports it eagerly.
"""

from .perplexity import PerplexityResult, document_logprob, encode_pair, run_model_perplexity

__all__ = ["PerplexityResult", "document_logprob", "encode_pair", "run_model_perplexity"]
