"""The peer every model benchmark measures against: Hugging Face transformers' ``JambaForCausalLM``.

It gets our shapes. One Jamba layer is a Mamba mixer plus an MoE FFN, so the peer has as many layers as
we have Mamba blocks, each with our expert count and top-1 routing, no attention layer, tied embeddings.
Differences that remain: Jamba's extra RMSNorms on dt, B and C, and SiLU experts where ours use GELU.
On CPU it runs its pure-PyTorch path (no mamba_ssm / causal_conv1d kernels).

Its greedy decoding is a plain loop over ``forward`` with its own cache: transformers' ``generate`` cannot
run a Jamba without an attention layer (it asks the cache for a sequence length only attention layers
hold), and a bare loop has less overhead than ``generate``, so this only favours the peer.

transformers is imported only when a peer is built (``pip install -e .[bench]``); nothing is downloaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from blackmamba import BlackMambaConfig

PEER_NAME = "transformers JambaForCausalLM"
# Masks given as a dict skip transformers' mask construction, which needs an attention layer.
NO_MASKS = {"full_attention": None, "linear_attention": None}


def _offline() -> None:
    """Keep transformers off the network and quiet (set before it is first imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def jamba_config(cfg: BlackMambaConfig) -> Any:
    """A transformers JambaConfig with our shapes and no attention layer."""
    _offline()
    from transformers import JambaConfig

    n_mamba = cfg.layer_pattern.count("mamba")
    if cfg.layer_pattern.count("moe") != n_mamba:
        raise ValueError("a Jamba layer pairs one Mamba mixer with one MoE: the counts must match")
    heads = max(1, cfg.d_model // 128)  # unused: there is no attention layer
    return JambaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=n_mamba,
        # Layer i is attention iff i % period == offset; with offset n and period n + 1 none is.
        attn_layer_period=n_mamba + 1,
        attn_layer_offset=n_mamba,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        expert_layer_period=1,
        expert_layer_offset=0,
        num_experts=cfg.n_experts,
        num_experts_per_tok=1,
        mamba_d_state=cfg.d_state,
        mamba_d_conv=cfg.d_conv,
        mamba_expand=cfg.expand,
        mamba_dt_rank=math.ceil(cfg.d_model / 16),
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True,
        use_cache=False,
    )


def build_jamba(
    cfg: BlackMambaConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    train: bool = False,
    seed: int = 0,
) -> Any:
    """The peer with random weights (seeded), built on ``device``, checked to have no attention layer and a
    head tied to its embedding."""
    from transformers import JambaForCausalLM

    jcfg = jamba_config(cfg)
    if "attention" in jcfg.layers_block_type:
        raise RuntimeError(f"the peer config has attention layers: {jcfg.layers_block_type}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = JambaForCausalLM(jcfg)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the peer's head is not tied to its embedding")
    if dtype is not None:
        model = model.to(dtype)
    return model.train(train)


def jamba_prefill(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the last position of ``ids`` (B, L), one forward without a cache: (B, 1, V)."""
    batch, length = ids.shape
    pos = torch.arange(length, device=ids.device)[None].expand(batch, -1)
    return model(ids, use_cache=False, attention_mask=NO_MASKS, position_ids=pos, logits_to_keep=1).logits


def jamba_greedy(model: Any, ids: torch.Tensor, new_tokens: int) -> Iterator[torch.Tensor]:
    """Greedy decoding of ``ids`` (B, L) with the peer's own cache: yields ``new_tokens`` (B, 1) tokens, the
    first from the prefill, then one per decode step (a forward of one token)."""
    from transformers import DynamicCache

    batch, length = ids.shape
    cache = DynamicCache(config=model.config)  # updated in place by every forward
    pos = torch.arange(length, device=ids.device)[None].expand(batch, -1)
    out = model(ids, cache=cache, use_cache=True, attention_mask=NO_MASKS, position_ids=pos, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    yield token
    for step in range(new_tokens - 1):
        pos = torch.full((batch, 1), length + step, device=ids.device)
        out = model(token, cache=cache, use_cache=True, attention_mask=NO_MASKS, position_ids=pos)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        yield token
