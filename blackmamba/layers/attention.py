"""Causal self-attention with rotary positions: the sequence mixer of the paper's transformer baselines.

    [q ; k ; v] = W_qkv x   (H heads of Dh);   q, k = rotary(q, pos), rotary(k, pos)
    y = softmax(q k^T / sqrt(Dh), causal) v;    out = W_out y

BlackMamba (arXiv 2402.01771, section 5) compares against transformer and transformer-MoE baselines; this is
their mixer, behind the same interface as the Mamba mixer (:mod:`.mixer`), so that a baseline is nothing but
a layer pattern. The attention is ``torch.nn.functional.scaled_dot_product_attention`` (flash or
memory-efficient kernels where they apply); :func:`attention_ref` is the plain softmax it must equal.

Decode state (:class:`KVCache`): keys and values of C = ``config.max_seq_len`` positions per slot, and the
number of positions each slot holds. A step writes one position and attends over the filled ones. Run
eagerly it reads only up to the longest sequence of the step, so a token costs O(its position); inside a
CUDA graph (which cannot hold a length read back to the host) it attends over the whole static cache under a
mask, as gpt-fast does, and costs O(C). Rotary positions count real tokens only, so a left-padded row
computes what it would alone. A sequence longer than C is refused (:class:`KVCacheFullError`) wherever the
host can see it; a captured graph cannot check, and keeps rewriting the last position instead of writing
outside the cache.

Departures from common transformers: no biases, no dropout; rotary turns channel i with channel i + Dh/2
(GPT-NeoX's half rotation) over the whole head. Numerics: rotary angles and :func:`attention_ref` are fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BlackMambaConfig
from ..errors import BlackMambaError
from .mixer import Mixer


class KVCacheFullError(BlackMambaError, ValueError):
    """A sequence needs more positions than the KV cache holds (``max_seq_len`` of the model's config)."""


@dataclass
class KVCache:
    """Decode state of one attention mixer for S slots: keys and values (S, H, C, Dh) in the cache dtype, and
    ``length`` (S,) int64, the positions each slot holds."""

    k: Tensor
    v: Tensor
    length: Tensor


def rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary position embedding: channel pair (i, i + Dh/2) of x (..., Dh) turned by the angle
    ``position * theta**(-2i/Dh)``. ``positions`` broadcasts against ``x.shape[:-1]``. fp32 inside, x's dtype out."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions.to(torch.float32)[..., None] * inv_freq
    cos, sin = angle.cos(), angle.sin()
    a, b = x.float().split(half, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Plain softmax attention in fp32. q (B, H, L, Dh), k and v (B, H, S, Dh); ``allowed`` (B or 1, H or 1,
    L, S) says which keys each query sees (None: causal, query i sees keys 0..i). Returns (B, H, L, Dh) in
    q's dtype. Every query must see at least one key."""
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is None:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None) -> Tensor:
    """:func:`attention_ref`'s arguments and result, through ``scaled_dot_product_attention``."""
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed)


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class AttentionMixer(Mixer):
    def __init__(self, config: BlackMambaConfig) -> None:
        super().__init__()
        d, h, dh = config.d_model, config.n_heads, config.head_dim
        self.n_heads, self.head_dim = h, dh
        self.capacity = config.max_seq_len
        self.rope_theta = config.rope_theta
        self.qkv = nn.Linear(d, 3 * h * dh, bias=False)
        self.out_proj = nn.Linear(h * dh, d, bias=False)
        self.reset_parameters(config)

    @torch.no_grad()
    def reset_parameters(self, config: BlackMambaConfig) -> None:
        std = config.initializer_range
        nn.init.normal_(self.qkv.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=std / math.sqrt(2 * config.n_layers))

    def allocate_cache(
        self, n_slots: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """Empty KV caches of ``n_slots`` sequences of up to ``max_seq_len`` positions (in ``dtype``, the
        model's by default)."""
        device = device or self.qkv.weight.device
        dtype = dtype or self.qkv.weight.dtype
        shape = (n_slots, self.n_heads, self.capacity, self.head_dim)
        return KVCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            length=torch.zeros(n_slots, device=device, dtype=torch.long),
        )

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., D) -> q, k, v (..., H, Dh)."""
        qkv = self.qkv(x).unflatten(-1, (3, self.n_heads, self.head_dim))
        return qkv.unbind(-3)

    def _longest(self, end: Tensor) -> int | None:
        """The longest sequence after this call (None inside a CUDA graph capture); refuses one that does not
        fit the cache."""
        if _capturing(end):
            return None
        longest = int(end.max())
        if longest > self.capacity:
            raise KVCacheFullError(
                f"a sequence reaches {longest} positions, but the attention KV cache holds {self.capacity} "
                "(max_seq_len in the model's config; raise it, or generate fewer tokens)"
            )
        return longest

    def forward(
        self, x: Tensor, cache: KVCache | None = None, mask: Tensor | None = None, slots: Tensor | None = None
    ) -> tuple[Tensor, None]:
        """x (B, L, D) -> ((B, L, D), None). ``mask`` (B, L) marks real tokens (False: left padding); with a
        ``cache`` the sequences continue from the positions it holds and their keys and values are added."""
        batch, length, _ = x.shape
        q, k, v = self._heads(x)  # (B, L, H, Dh)
        offsets = torch.arange(length, device=x.device) if mask is None else (mask.long().cumsum(1) - 1).clamp_min(0)
        if cache is None:
            positions = offsets.expand(batch, length)
            keys, values = rotary(k, positions[..., None], self.rope_theta).transpose(1, 2), v.transpose(1, 2)
            allowed = None
            if mask is not None:
                causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
                allowed = causal & mask[:, None, :]
        else:
            positions, keys, values = self._extend(cache, slots, k, v, offsets.expand(batch, length), mask)
            allowed = torch.arange(keys.shape[2], device=x.device) <= positions[..., None]  # (B, L, C)
        if allowed is not None and mask is not None:
            allowed = allowed | ~mask[:, :, None]  # padded queries see every key: finite outputs, never read
        q = rotary(q, positions[..., None], self.rope_theta).transpose(1, 2)
        y = attend(q, keys, values, None if allowed is None else allowed[:, None])
        return self.out_proj(y.transpose(1, 2).flatten(2)), None

    def _extend(
        self, cache: KVCache, slots: Tensor | None, k: Tensor, v: Tensor, offsets: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Write the keys and values of a chunk's real tokens after each slot's filled positions; returns the
        chunk's positions (B, L) and the slots' keys and values (B, H, C', Dh) for C' >= the longest."""
        batch = k.shape[0]
        rows = torch.arange(batch, device=k.device) if slots is None else slots
        start = cache.length.index_select(0, rows)
        positions = start[:, None] + offsets
        end = start + (offsets.shape[1] if mask is None else mask.sum(1))
        longest = self._longest(end)
        k = rotary(k, positions[..., None], self.rope_theta)
        row_ids = rows[:, None].expand_as(positions)
        if mask is None:
            cache.k[row_ids, :, positions] = k.to(cache.k.dtype)
            cache.v[row_ids, :, positions] = v.to(cache.v.dtype)
        else:
            cache.k[row_ids[mask], :, positions[mask]] = k[mask].to(cache.k.dtype)
            cache.v[row_ids[mask], :, positions[mask]] = v[mask].to(cache.v.dtype)
        cache.length[rows] = end
        return positions, *self._read(cache, slots, batch, longest)

    @staticmethod
    def _read(cache: KVCache, slots: Tensor | None, batch: int, longest: int | None) -> tuple[Tensor, Tensor]:
        """Keys and values of the rows' slots, the first ``longest`` positions (all of them when None)."""
        width = slice(None) if longest is None else slice(0, longest)
        if slots is None:
            return cache.k[:batch, :, width], cache.v[:batch, :, width]
        return cache.k.index_select(0, slots)[:, :, width], cache.v.index_select(0, slots)[:, :, width]

    def step(self, x_t: Tensor, cache: KVCache, slots: Tensor | None = None) -> Tensor:
        """One token per row: x_t (B, D) -> (B, D); appends its key and value to the row's slot (``slots``,
        rows 0..B-1 without) and attends over the slot's positions."""
        batch = x_t.shape[0]
        q, k, v = self._heads(x_t)  # (B, H, Dh)
        rows = torch.arange(batch, device=x_t.device) if slots is None else slots
        position = cache.length.index_select(0, rows)
        longest = self._longest(position + 1)
        position = position.clamp(max=self.capacity - 1)  # a captured graph must never write outside the cache
        q = rotary(q, position[:, None], self.rope_theta)
        k = rotary(k, position[:, None], self.rope_theta)
        cache.k[rows, :, position] = k.to(cache.k.dtype)
        cache.v[rows, :, position] = v.to(cache.v.dtype)
        cache.length[rows] = position + 1
        keys, values = self._read(cache, slots, batch, longest)
        allowed = torch.arange(keys.shape[2], device=x_t.device) <= position[:, None]  # (B, C')
        y = attend(q[:, :, None], keys, values, allowed[:, None, None])  # (B, H, 1, Dh)
        return self.out_proj(y.flatten(1))
