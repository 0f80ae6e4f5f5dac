"""BlackMamba (Anthony et al. 2024, arXiv 2402.01771): Mamba blocks alternating with top-1 MoE blocks.

    x_0 = Embedding(ids)                                   (fp32 residual stream)
    x_l = x_{l-1} + Mixer_l( RMSNorm_l(x_{l-1}) )           Mixer = Mamba or MoE, from config.layer_pattern
    logits = LayerNorm(x_L) @ Embedding^T                   (final LayerNorm with bias, tied head)

The paper's baselines are the same model with other block kinds in the pattern: causal attention in place of
Mamba, a dense MLP in place of the MoE (:mod:`blackmamba.experiments.baselines`).

Numerics follow the released code (spec section 1.2): the residual stream stays fp32 while each norm sees
it cast to the parameter dtype; A_log, D and the dt bias stay fp32 when the model is cast (see
:func:`cast_model`); router logits and the SSM state are computed in fp32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .config import BlackMambaConfig
from .kernels import add_rms_norm, linear_cross_entropy
from .layers import MLP, AttentionMixer, MambaMixer, Mixer, MoE, RMSNorm, RouterStats

# Parameters kept in fp32 whatever the model dtype (name suffixes).
FP32_PARAMS = ("mixer.A_log", "mixer.D", "mixer.dt_proj.bias")
# The sublayer of each layer kind (config.layer_pattern).
MIXERS: dict[str, type[Mixer]] = {"mamba": MambaMixer, "moe": MoE, "attention": AttentionMixer, "mlp": MLP}


class Block(nn.Module):
    """Pre-norm residual block around one mixer (Mamba, MoE, attention or MLP); it only delegates to it.

    The residual add of the previous block's output is fused with this block's norm: a block takes the fp32
    residual stream and the previous block's output (``delta``, None for the first block) and returns the
    updated stream and its own output, which the next block (or the head) adds.
    """

    def __init__(self, config: BlackMambaConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = MIXERS[kind](config)

    def forward(
        self,
        residual: Tensor,
        delta: Tensor | None = None,
        cache: Any | None = None,
        mask: Tensor | None = None,
        slots: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, RouterStats | None]:
        h, residual = add_rms_norm(residual, delta, self.norm.weight, self.norm.eps)
        out, stats = self.mixer(h, cache, mask, slots)
        return residual, out, stats

    def step(
        self, residual: Tensor, delta: Tensor | None, cache: Any | None, slots: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.mixer.norm_step(self.norm, residual, delta, cache, slots)


SlotIds = int | Sequence[int] | Tensor


@dataclass
class InferenceCache:
    """The decode state of a pool of ``n_slots`` sequences: per block, its mixer's state (None for the
    stateless MoE and MLP; a KV cache for attention), with the slot as the first dim of every tensor. A
    decode step runs over any set of slots (:meth:`BlackMamba.step` with ``slots``), exactly as if each ran
    alone; a forward with ``slots`` prefills them. The pool also tracks which slots are taken
    (:meth:`acquire`, :meth:`release`).
    """

    layers: list[Any | None]
    _free: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._free = list(range(self.n_slots))

    @property
    def n_slots(self) -> int:
        return next((t.shape[0] for t in self.tensors()), 0)

    def tensors(self) -> Iterator[Tensor]:
        """Every state tensor of the pool, block by block."""
        for state in self.layers:
            if state is not None:
                yield from (getattr(state, f.name) for f in dataclasses.fields(state))

    def _ids(self, slots: SlotIds) -> Tensor:
        device = next(self.tensors()).device
        return torch.as_tensor(slots, dtype=torch.long, device=device).reshape(-1)

    def acquire(self) -> int:
        """A free slot (the lowest), now taken. Its state is whatever was last written there."""
        if not self._free:
            raise RuntimeError(f"all {self.n_slots} slots of the inference cache are taken")
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        """Give ``slot`` back: its state is zeroed and it is free again."""
        if not 0 <= slot < self.n_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not a taken slot of this cache ({self.n_slots} slots)")
        self.reset(slot)
        self._free.append(slot)
        self._free.sort()

    def reset(self, slots: SlotIds | None = None) -> None:
        """Zero the state of ``slots`` (all slots by default)."""
        for t in self.tensors():
            if slots is None:
                t.zero_()
            else:
                t.index_fill_(0, self._ids(slots), 0)

    def write(self, slots: SlotIds, source: InferenceCache, rows: SlotIds | None = None) -> None:
        """Copy the state of ``source``'s slots ``rows`` (all of them by default) into ``slots``: how a
        sequence prefilled in a cache of its own joins the pool."""
        ids = self._ids(slots)
        for dst, src in zip(self.tensors(), source.tensors(), strict=True):
            src = src if rows is None else src.index_select(0, self._ids(rows).to(src.device))
            dst.index_copy_(0, ids, src.to(dst.dtype))

    def snapshot(self, slot: int) -> InferenceCache:
        """A copy of one slot's state, as a cache of one slot (:meth:`restore` writes it back)."""
        layers = [
            None if s is None else dataclasses.replace(
                s, **{f.name: getattr(s, f.name)[slot : slot + 1].clone() for f in dataclasses.fields(s)}
            )
            for s in self.layers
        ]  # fmt: skip
        return InferenceCache(layers)

    def restore(self, slot: int, snapshot: InferenceCache) -> None:
        """Put a :meth:`snapshot` back into ``slot`` (any slot), bit for bit."""
        self.write(slot, snapshot)


@dataclass
class BlackMambaOutput:
    """``logits`` (B, L, V) (None when the forward was given targets); ``expert_counts`` (n_moe_blocks, E)
    tokens per expert in each MoE block; ``aux_loss`` the weighted router losses (training, when enabled);
    ``sinkhorn_iters`` per MoE block; ``loss`` the mean cross-entropy against the forward's targets."""

    logits: Tensor | None
    cache: InferenceCache | None = None
    expert_counts: Tensor | None = None
    aux_loss: Tensor | None = None
    sinkhorn_iters: list[int | Tensor] = field(default_factory=list)
    loss: Tensor | None = None


class BlackMamba(nn.Module):
    def __init__(self, config: BlackMambaConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, kind) for kind in config.layer_pattern)
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        nn.init.normal_(self.embedding.weight, std=config.initializer_range)
        # Recompute each block's activations in the backward pass instead of storing them (training only).
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def _head(self, x: Tensor) -> Tensor:
        h = self.final_norm(x.to(self.final_norm.weight.dtype))
        return F.linear(h, self.embedding.weight)

    def _loss(self, x: Tensor, targets: Tensor) -> Tensor:
        """The head's mean cross-entropy against ``targets`` without the (B, L, V) logits."""
        h = self.final_norm(x.to(self.final_norm.weight.dtype))
        return linear_cross_entropy(h.flatten(0, 1), self.embedding.weight, targets.flatten())

    def forward(
        self,
        input_ids: Tensor,
        cache: InferenceCache | None = None,
        mask: Tensor | None = None,
        num_last_tokens: int = 0,
        slots: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> BlackMambaOutput:
        """input_ids (B, L) -> logits (B, L, V) (only the last ``num_last_tokens`` positions when > 0).
        With ``targets`` (B, L) -> the mean cross-entropy of those logits against them, as ``loss``, computed
        in chunks of tokens without the logits (:func:`blackmamba.kernels.linear_cross_entropy`).

        With a ``cache`` the sequences continue from their state and leave their final state there: in
        ``slots`` (B,) of the pool, or in rows 0..B-1 (a cache of B slots) without them. ``mask`` (B, L)
        marks real tokens of left-padded rows.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if targets is not None and (targets.shape != input_ids.shape or num_last_tokens):
            raise ValueError(f"targets must have input_ids' shape {tuple(input_ids.shape)}, without num_last_tokens")
        x, delta = self.embedding(input_ids).float(), None
        stats: list[RouterStats] = []
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if checkpointing:
                x, delta, block_stats = torch.utils.checkpoint.checkpoint(
                    block, x, delta, layer_cache, mask, slots, use_reentrant=False
                )
            else:
                x, delta, block_stats = block(x, delta, layer_cache, mask, slots)
            if block_stats is not None:
                stats.append(block_stats)
        if delta is not None:
            x = x + delta
        if num_last_tokens > 0:
            x = x[:, -num_last_tokens:]
        losses = [s.aux_loss for s in stats if s.aux_loss is not None]
        return BlackMambaOutput(
            logits=self._head(x) if targets is None else None,
            cache=cache,
            expert_counts=torch.stack([s.counts_E for s in stats]) if stats else None,
            aux_loss=sum(losses) if losses else None,
            sinkhorn_iters=[s.sinkhorn_iters for s in stats],
            loss=None if targets is None else self._loss(x, targets),
        )

    def step(self, token_ids: Tensor, cache: InferenceCache, slots: Tensor | None = None) -> Tensor:
        """One token per sequence: token_ids (B,) -> logits (B, V); advances the state of ``slots`` (B,) of the
        pool (rows 0..B-1 without them), each exactly as if it ran alone."""
        x, delta = self.embedding(token_ids).float(), None
        for i, block in enumerate(self.layers):
            x, delta = block.step(x, delta, cache.layers[i], slots)
        if delta is not None:
            x = x + delta
        return self._head(x)

    def allocate_cache(
        self, n_slots: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> InferenceCache:
        """A pool of ``n_slots`` zeroed decode states (conv windows in ``dtype``, the model's by default)."""
        return InferenceCache([block.mixer.allocate_cache(n_slots, device, dtype) for block in self.layers])

    def num_parameters(self, active: bool = False, embedding: bool = True) -> int:
        """Parameter count; ``active`` counts one expert per MoE block (the per-token forward)."""
        total = 0
        for name, p in self.named_parameters():
            n = p.numel()
            if active and (name.endswith("mixer.w1") or name.endswith("mixer.w2")):
                n //= p.shape[0]
            if not embedding and name == "embedding.weight":
                continue
            total += n
        return total


def cast_model(model: BlackMamba, dtype: torch.dtype) -> BlackMamba:
    """Cast parameters to ``dtype`` except those kept in fp32 (A_log, D, dt bias) and 8-bit (fp8) weights,
    which keep their dtype and scales (:mod:`blackmamba.layers.quant`).

    Parameters that are not 64-byte aligned (slices of a file buffer after loading) are copied to fresh
    memory: BLAS kernels round differently on unaligned data, and a reloaded model must compute exactly
    what the saved one did.
    """
    for name, p in model.named_parameters():
        target = torch.float32 if name.endswith(FP32_PARAMS) else p.dtype if p.dtype.itemsize == 1 else dtype
        if p.dtype != target:
            p.data = p.data.to(target)
        elif p.data_ptr() % 64 or not p.is_contiguous():
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return model
