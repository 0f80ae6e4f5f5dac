"""The Mamba mixer (selective SSM block of Gu & Dao 2023), as the released ``MambaLayer`` computes it.

    [x ; z] = W_in u;  x = silu(causal_conv(x) + b_conv);  [dt_low ; B ; C] = W_x x;  dt = W_dt dt_low
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z, dt_bias, softplus);  out = W_out y

Parameter names match the released checkpoint (spec section 3.3). The mixer runs a whole sequence
(``forward``), or one token at a time from a :class:`MambaCache` (``step``): the cache is the conv window
(the last K-1 inputs) and the SSM state, so decoding costs O(1) per token. ``forward`` with a cache starts
from it and leaves the final state in it, which is how prefill (also in pieces) fills the cache.
A ``mask`` of real tokens supports left-padded batches: padded positions feed zeros to the conv and
nothing to the state, so each row computes exactly what it would alone. The cache holds a pool of
slots; ``slots`` picks the slot of each row (see :mod:`.mixer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BlackMambaConfig
from ..kernels import causal_conv1d, conv_update, linear, linear_conv, selective_scan, ssm_update
from .mixer import Mixer


@dataclass
class MambaCache:
    """Decode state of one Mamba mixer for S slots: conv window (S, K-1, D_in) and SSM state (S, D_in, N) fp32."""

    conv_state: Tensor
    ssm_state: Tensor


class MambaMixer(Mixer):
    def __init__(self, config: BlackMambaConfig) -> None:
        super().__init__()
        d, d_in, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank, config.d_conv
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d_in, n, r, k
        self.in_proj = nn.Linear(d, 2 * d_in, bias=False)
        self.conv1d = nn.Conv1d(d_in, d_in, kernel_size=k, groups=d_in, padding=k - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(d_in, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d_in, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_in, n))
        self.D = nn.Parameter(torch.empty(d_in))
        self.out_proj = nn.Linear(d_in, d, bias=False)
        self.reset_parameters(config)

    @torch.no_grad()
    def reset_parameters(self, config: BlackMambaConfig) -> None:
        std = config.initializer_range
        nn.init.normal_(self.in_proj.weight, std=std)
        nn.init.normal_(self.x_proj.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=std / math.sqrt(2 * config.n_layers))
        self.conv1d.reset_parameters()
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        # dt_bias = softplus^{-1}(dt) with dt log-uniform in [dt_min, dt_max] (Mamba's S6 initialisation).
        log_dt = torch.empty(self.d_inner).uniform_(math.log(config.dt_min), math.log(config.dt_max))
        dt = log_dt.exp().clamp(min=config.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)

    def allocate_cache(
        self, n_slots: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MambaCache:
        """Zeroed decode state of ``n_slots`` sequences (the conv window in ``dtype``, the SSM state fp32)."""
        device = device or self.conv1d.weight.device
        dtype = dtype or self.conv1d.weight.dtype  # the projections' weights may be fp8 (layers/quant.py)
        return MambaCache(
            conv_state=torch.zeros(n_slots, self.d_conv - 1, self.d_inner, device=device, dtype=dtype),
            ssm_state=torch.zeros(n_slots, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dt_low, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt_low, self.dt_proj.weight)  # the bias is added inside the scan, in fp32
        return dt, B, C, -torch.exp(self.A_log.float())

    def forward(
        self, u: Tensor, cache: MambaCache | None = None, mask: Tensor | None = None, slots: Tensor | None = None
    ) -> tuple[Tensor, None]:
        """u: (B, L, D) -> ((B, L, D), None). ``mask`` (B, L) marks real tokens (False = left padding)."""
        conv_state = ssm_state = None
        if cache is not None:
            conv_state, ssm_state = cache.conv_state, cache.ssm_state
            if slots is not None:
                conv_state, ssm_state = conv_state.index_select(0, slots), ssm_state.index_select(0, slots)
        x, z = self.in_proj(u).chunk(2, dim=-1)
        keep = None if mask is None else mask[..., None].to(x.dtype)
        if keep is not None:
            x = x * keep
        x, conv_final = causal_conv1d(
            x, self.conv1d.weight[:, 0, :], self.conv1d.bias, "silu", initial_state=conv_state, return_final_state=True
        )
        if keep is not None:
            x = x * keep
        dt, B, C, A = self._ssm_inputs(x)
        y, ssm_final = selective_scan(
            x, dt, A, B, C, self.D, z, delta_bias=self.dt_proj.bias, delta_softplus=True,
            initial_state=ssm_state, return_final_state=True,
        )  # fmt: skip
        if cache is not None:
            if slots is None:
                cache.conv_state.copy_(conv_final)
                cache.ssm_state.copy_(ssm_final)
            else:
                cache.conv_state.index_copy_(0, slots, conv_final.to(cache.conv_state.dtype))
                cache.ssm_state.index_copy_(0, slots, ssm_final)
        return self.out_proj(y), None

    def step(self, u_t: Tensor, cache: MambaCache, slots: Tensor | None = None) -> Tensor:
        """One token: u_t (B, D) -> (B, D); advances the state of ``slots`` (rows 0..B-1 without) in place. On
        the Triton backend the SSM step is one kernel, with the dt_proj GEMV and A = -exp(A_log) inside it;
        the projections may run on the few-row GEMV (:func:`_project`), in_proj's with the conv step in its
        epilogue (:func:`blackmamba.kernels.linear_conv`)."""
        conv_weight = self.conv1d.weight[:, 0, :]
        weights = _gemv_weights(self.in_proj)
        if weights is not None:
            x, z = linear_conv(u_t, weights[0], cache.conv_state, conv_weight, self.conv1d.bias, weights[1], "silu",
                               slots)  # fmt: skip
        else:
            x, z = self.in_proj(u_t).chunk(2, dim=-1)
            x = conv_update(x, cache.conv_state, conv_weight, self.conv1d.bias, "silu", slots)
        dt_low, B, C = _project(self.x_proj, x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = ssm_update(
            cache.ssm_state, x, dt_low, self.A_log, B, C, self.D, z, self.dt_proj.bias, True,
            dt_weight=self.dt_proj.weight, a_from_log=True, state_indices=slots,
        )  # fmt: skip
        return _project(self.out_proj, y)


def _gemv_weights(proj: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(weight, fp8 scale or None) of a projection the few-row GEMV can run: a bias-free ``nn.Linear``, or a
    module that offers ``gemv_weights()`` (the fp8 projections of :mod:`.quant`); None for any other."""
    if type(proj) is nn.Linear and proj.bias is None:
        return proj.weight, None
    offer = getattr(proj, "gemv_weights", None)
    return offer() if callable(offer) else None


def _project(proj: nn.Module, x: Tensor) -> Tensor:
    """A projection of the decode step: a bias-free ``nn.Linear`` runs :func:`blackmamba.kernels.linear`
    (the few-row GEMV where the kernel settings enable it, ``gemv_dense``; else ``F.linear``); other modules,
    such as the fp8 projections of :mod:`.quant`, take ``linear`` with their scales where they offer their
    weights (:func:`_gemv_weights`), else run their own forward."""
    weights = _gemv_weights(proj)
    return proj(x) if weights is None else linear(x, *weights)
