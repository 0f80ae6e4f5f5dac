"""The Mamba mixer (selective SSM block of Gu & Dao 2023), as the released ``MambaLayer`` computes it.

    [x ; z] = W_in u;  x = silu(causal_conv(x) + b_conv);  [dt_low ; B ; C] = W_x x;  dt = W_dt dt_low
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z, dt_bias, softplus);  out = W_out y

Parameter names match the released checkpoint (spec section 3.3). The mixer runs a whole sequence
(``forward``), or one token at a time from a :class:`MambaCache` (``step``): the cache is the conv window
(the last K-1 inputs) and the SSM state, so decoding costs O(1) per token. ``forward`` with a cache starts
from it and leaves the final state in it, which is how prefill (also in pieces) fills the cache.
A ``mask`` of real tokens supports left-padded batches: padded positions feed zeros to the conv and
nothing to the state, so each row computes exactly what it would alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BlackMambaConfig
from ..kernels import causal_conv1d, mamba_decode_step, selective_scan


@dataclass
class MambaCache:
    """Decode state of one Mamba mixer: conv window (B, K-1, D_in) and SSM state (B, D_in, N) in fp32."""

    conv_state: Tensor
    ssm_state: Tensor


class MambaMixer(nn.Module):
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

    def allocate_cache(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None):
        """Zeroed decode state for ``batch_size`` sequences (the conv window in ``dtype``, the SSM state fp32)."""
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        return MambaCache(
            conv_state=torch.zeros(batch_size, self.d_conv - 1, self.d_inner, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dt_low, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt_low, self.dt_proj.weight)  # the bias is added inside the scan, in fp32
        return dt, B, C, -torch.exp(self.A_log.float())

    def forward(self, u: Tensor, cache: MambaCache | None = None, mask: Tensor | None = None) -> Tensor:
        """u: (B, L, D) -> (B, L, D). ``mask`` (B, L) marks real tokens (False = left padding)."""
        x, z = self.in_proj(u).chunk(2, dim=-1)
        keep = None if mask is None else mask[..., None].to(x.dtype)
        if keep is not None:
            x = x * keep
        x, conv_state = causal_conv1d(
            x,
            self.conv1d.weight[:, 0, :],
            self.conv1d.bias,
            "silu",
            initial_state=None if cache is None else cache.conv_state,
            return_final_state=True,
        )
        if keep is not None:
            x = x * keep
        dt, B, C, A = self._ssm_inputs(x)
        y, ssm_state = selective_scan(
            x,
            dt,
            A,
            B,
            C,
            self.D,
            z,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
            initial_state=None if cache is None else cache.ssm_state,
            return_final_state=True,
        )
        if cache is not None:
            cache.conv_state.copy_(conv_state)
            cache.ssm_state.copy_(ssm_state)
        return self.out_proj(y)

    def step(self, u_t: Tensor, cache: MambaCache) -> Tensor:
        """One token: u_t (B, D) -> (B, D); updates ``cache`` in place (fused kernels on the Triton backend)."""
        return mamba_decode_step(
            u_t,
            cache.conv_state,
            cache.ssm_state,
            self.in_proj.weight,
            self.conv1d.weight[:, 0, :],
            self.conv1d.bias,
            self.x_proj.weight,
            self.dt_proj.weight,
            self.dt_proj.bias,
            self.A_log,
            self.D,
            self.out_proj.weight,
        )
