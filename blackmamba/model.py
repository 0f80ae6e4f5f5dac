"""BlackMamba (Anthony et al. 2024, arXiv 2402.01771): Mamba blocks alternating with top-1 MoE blocks.

    x_0 = Embedding(ids)                                   (fp32 residual stream)
    x_l = x_{l-1} + Mixer_l( RMSNorm_l(x_{l-1}) )           Mixer = Mamba or MoE, from config.layer_pattern
    logits = LayerNorm(x_L) @ Embedding^T                   (final LayerNorm with bias, tied head)

Numerics follow the released code (spec section 1.2): the residual stream stays fp32 while each norm sees
it cast to the parameter dtype; A_log, D and the dt bias stay fp32 when the model is cast (see
:func:`cast_model`); router logits and the SSM state are computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .config import BlackMambaConfig
from .kernels import add_rms_norm, moe_decode
from .kernels.norm import add_rms_norm_route
from .layers import MambaCache, MambaMixer, MoE, RMSNorm, RouterStats

# Parameters kept in fp32 whatever the model dtype (name suffixes).
FP32_PARAMS = ("mixer.A_log", "mixer.D", "mixer.dt_proj.bias")


class Block(nn.Module):
    """Pre-norm residual block around one mixer (Mamba or MoE).

    The residual add of the previous block's output is fused with this block's norm: a block takes the fp32
    residual stream and the previous block's output (``delta``, None for the first block) and returns the
    updated stream and its own output, which the next block (or the head) adds.
    """

    def __init__(self, config: BlackMambaConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer: MambaMixer | MoE = MambaMixer(config) if kind == "mamba" else MoE(config)

    def forward(
        self, residual: Tensor, delta: Tensor | None = None, cache: MambaCache | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, RouterStats | None]:
        h, residual = add_rms_norm(residual, delta, self.norm.weight, self.norm.eps)
        if self.kind == "mamba":
            return residual, self.mixer(h, cache, mask), None
        out, stats = self.mixer(h)
        return residual, out, stats

    def step(self, residual: Tensor, delta: Tensor | None, cache: MambaCache | None) -> tuple[Tensor, Tensor]:
        moe = self.kind == "moe"
        if moe and moe_decode.FUSE_ROUTER and self.mixer.decode_kernels_apply(residual, self.norm.weight.dtype):
            # Decode kernels: the norm's launch also routes, then two launches for the experts.
            router = self.mixer.router
            h, residual, expert, gate = add_rms_norm_route(
                residual, delta, self.norm.weight, self.norm.eps, router.weight, router.bias
            )
            return residual, self.mixer.experts_decode(h, expert, gate)
        h, residual = add_rms_norm(residual, delta, self.norm.weight, self.norm.eps)
        return residual, (self.mixer.step(h, cache) if self.kind == "mamba" else self.mixer(h, with_stats=False)[0])


@dataclass
class InferenceCache:
    """Per-block decode state (None for MoE blocks, which are stateless) and the number of tokens seen."""

    layers: list[MambaCache | None]
    seqlen_offset: int = 0
    batch_size: int = field(default=0)


@dataclass
class BlackMambaOutput:
    """``logits`` (B, L, V); ``expert_counts`` (n_moe_blocks, E) tokens per expert in each MoE block;
    ``aux_loss`` the weighted router losses (training, when enabled); ``sinkhorn_iters`` per MoE block."""

    logits: Tensor
    cache: InferenceCache | None = None
    expert_counts: Tensor | None = None
    aux_loss: Tensor | None = None
    sinkhorn_iters: list[int] = field(default_factory=list)


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

    def forward(
        self,
        input_ids: Tensor,
        cache: InferenceCache | None = None,
        mask: Tensor | None = None,
        num_last_tokens: int = 0,
    ) -> BlackMambaOutput:
        """input_ids (B, L) -> logits (B, L, V) (only the last ``num_last_tokens`` positions when > 0).

        With a ``cache`` the sequence continues from its state and leaves its final state there.
        ``mask`` (B, L) marks real tokens of left-padded rows.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        x, delta = self.embedding(input_ids).float(), None
        stats: list[RouterStats] = []
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if checkpointing:
                x, delta, block_stats = torch.utils.checkpoint.checkpoint(
                    block, x, delta, layer_cache, mask, use_reentrant=False
                )
            else:
                x, delta, block_stats = block(x, delta, layer_cache, mask)
            if block_stats is not None:
                stats.append(block_stats)
        if delta is not None:
            x = x + delta
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        if num_last_tokens > 0:
            x = x[:, -num_last_tokens:]
        losses = [s.aux_loss for s in stats if s.aux_loss is not None]
        return BlackMambaOutput(
            logits=self._head(x),
            cache=cache,
            expert_counts=torch.stack([s.counts_E for s in stats]) if stats else None,
            aux_loss=sum(losses) if losses else None,
            sinkhorn_iters=[s.sinkhorn_iters for s in stats],
        )

    def step(self, token_ids: Tensor, cache: InferenceCache) -> Tensor:
        """One token per sequence: token_ids (B,) -> logits (B, V); advances ``cache``."""
        x, delta = self.embedding(token_ids).float(), None
        for i, block in enumerate(self.layers):
            x, delta = block.step(x, delta, cache.layers[i])
        if delta is not None:
            x = x + delta
        cache.seqlen_offset += 1
        return self._head(x)

    def allocate_cache(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> InferenceCache:
        layers = [
            block.mixer.allocate_cache(batch_size, device, dtype) if block.kind == "mamba" else None
            for block in self.layers
        ]
        return InferenceCache(layers=layers, batch_size=batch_size)

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
    """Cast parameters to ``dtype`` except those kept in fp32 (A_log, D, dt bias).

    Parameters that are not 64-byte aligned (slices of a file buffer after loading) are copied to fresh
    memory: BLAS kernels round differently on unaligned data, and a reloaded model must compute exactly
    what the saved one did.
    """
    for name, p in model.named_parameters():
        target = torch.float32 if name.endswith(FP32_PARAMS) else dtype
        if p.dtype != target:
            p.data = p.data.to(target)
        elif p.data_ptr() % 64 or not p.is_contiguous():
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return model
