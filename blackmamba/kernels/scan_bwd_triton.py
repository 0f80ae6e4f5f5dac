"""Backward of the Triton selective scan, split over sequence segments; the gradients of
:func:`.scan.selective_scan_ref`, from the forward's saved chunk states (:mod:`.scan_triton`).

Per (batch row, BLOCK_D channels, segment) one program of one warp, its state tile (BLOCK_D, N). Two things
decide the speed, both read off the SASS (ptxas for sm_90, offline):

* one layout for every tensor. A load whose addresses are contiguous gets a vectorised layout of its own, and
  each use then goes through shared memory (a store, a barrier, a load). All addresses are multiplied by
  ``unit``, a runtime 1 that Triton cannot see, so no load is vectorised and every tile keeps the default
  layout: at N = 16, BLOCK_D = 8 one channel and 4 states per thread (8 x 4 threads), so the sums over the
  states (du, ddelta, the output for dz) take 2 shuffle rounds and the sums over the channels (dB, dC) 3, and
  the per-channel math (softplus, the gate) runs once per thread, not once per state;
* loads issued a whole step before their use (software pipelining by hand: the next 4 positions' inputs are
  loaded into loop-carried registers before this step's math). Without it ptxas places each load right
  before its first use and every step waits on a global-memory latency, 4-5 times per 4 positions.

The adjoint lambda_t = dL/dh_t obeys lambda_t = C_t g_t + decay_{t+1} lambda_{t+1} (g = dy * silu(z)); it
needs no state, so the segments run in parallel from two launches:

1. carry pass: every segment from a zero gradient at its end gives mu = decay_s lambda_s at its start (the
   gradient it sends to the state before it) and its sum of dt (its total decay is exp(A sum dt));
2. main pass: a segment starts from the gradient of everything after it, folded over the later segments'
   (mu, sum dt) in the program itself, then walks its chunks backwards. Per chunk it runs forward once from
   the forward's saved chunk start, keeping every 4th state in a small per-program scratch (L2-resident),
   then walks the chunk backwards 4 positions at a time, those positions' states and decays recomputed into
   registers from the kept state. The decay term of ddelta and dA uses decay_t h_{t-1} = h_t - dt_t u_t B_t,
   as mamba_ssm does, so no earlier state is kept.

dt = softplus(delta + delta_bias) and the gate silu(z) are differentiated in the same pass (ddelta,
ddelta_bias, dz), as the forward fuses them. dB and dC are summed over the channels of a program and then
over the programs in torch (fp32 partial sums, deterministic).
"""

from __future__ import annotations

import torch

from .settings import get_settings

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths work without Triton
    triton = None


if triton is not None:
    from .tl_math import softplus

    @triton.jit
    def _load_fwd(u_ptr, delta_ptr, B_ptr, t, seqlen, offs_d, mask_d, offs_n, mask_n, stride_u_l, stride_delta_l,
                  stride_B_l):  # fmt: skip
        """The raw u, delta (1 channel each) and B_t of position t, as stored."""
        m = mask_d & (t < seqlen)
        u = tl.load(u_ptr + t * stride_u_l + offs_d, mask=m, other=0.0)
        raw = tl.load(delta_ptr + t * stride_delta_l + offs_d, mask=m, other=0.0)
        b_t = tl.load(B_ptr + t * stride_B_l + offs_n, mask=mask_n & (t < seqlen), other=0.0)
        return u, raw, b_t

    @triton.jit
    def _load_bc(B_ptr, C_ptr, t, seqlen, offs_n, mask_n, stride_B_l, stride_C_l):
        m = mask_n & (t < seqlen)
        b_t = tl.load(B_ptr + t * stride_B_l + offs_n, mask=m, other=0.0)
        return b_t, tl.load(C_ptr + t * stride_C_l + offs_n, mask=m, other=0.0)

    @triton.jit
    def _load_bwd(u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, z_ptr, t, seqlen, offs_d, mask_d, offs_n, mask_n,
                  stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_dy_l, stride_z_l,
                  HAS_Z: tl.constexpr, WITH_BC: tl.constexpr):  # fmt: skip
        """The raw inputs of position t for the backward: u, delta, B_t, C_t, dy, z (dy again without z; without
        WITH_BC, dy in place of B_t and C_t)."""
        valid = t < seqlen
        m = mask_d & valid
        u = tl.load(u_ptr + t * stride_u_l + offs_d, mask=m, other=0.0)
        raw = tl.load(delta_ptr + t * stride_delta_l + offs_d, mask=m, other=0.0)
        dy = tl.load(dy_ptr + t * stride_dy_l + offs_d, mask=m, other=0.0)
        b_t = dy
        c_t = dy
        if WITH_BC:
            b_t, c_t = _load_bc(B_ptr, C_ptr, t, seqlen, offs_n, mask_n, stride_B_l, stride_C_l)
        zv = tl.load(z_ptr + t * stride_z_l + offs_d, mask=mask_d & valid, other=0.0) if HAS_Z else dy
        return u, raw, b_t, c_t, dy, zv

    @triton.jit
    def _load_window(u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, z_ptr, t0, seqlen, offs_d, mask_d, offs_n, mask_n,
                     stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_dy_l, stride_z_l,
                     HAS_Z: tl.constexpr, WITH_BC: tl.constexpr):  # fmt: skip
        return (
            _load_bwd(u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, z_ptr, t0, seqlen, offs_d, mask_d, offs_n, mask_n,
                      stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_dy_l, stride_z_l, HAS_Z, WITH_BC),
            _load_bwd(u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, z_ptr, t0 + 1, seqlen, offs_d, mask_d, offs_n, mask_n,
                      stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_dy_l, stride_z_l, HAS_Z, WITH_BC),
            _load_bwd(u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, z_ptr, t0 + 2, seqlen, offs_d, mask_d, offs_n, mask_n,
                      stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_dy_l, stride_z_l, HAS_Z, WITH_BC),
            _load_bwd(u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, z_ptr, t0 + 3, seqlen, offs_d, mask_d, offs_n, mask_n,
                      stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_dy_l, stride_z_l, HAS_Z, WITH_BC),
        )  # fmt: skip

    @triton.jit
    def _dt(raw, t, seqlen, mask_d, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """delta + bias in fp32 and dt = softplus of it; dt = 0 (decay 1, no input) past the end."""
        raw = raw.to(tl.float32)
        if HAS_BIAS:
            raw += bias
        dt = softplus(raw) if SOFTPLUS else raw
        return raw, tl.where(mask_d & (t < seqlen), dt, 0.0)

    @triton.jit
    def _gate(dy, zv, HAS_Z: tl.constexpr):
        """g = dy * silu(z) (the gradient of the output before the gate), dy and z in fp32."""
        dy = dy.to(tl.float32)
        if HAS_Z:
            zv = zv.to(tl.float32)
            return dy * zv * tl.sigmoid(zv), dy, zv
        return dy, dy, dy

    @triton.jit
    def _carry_load(
        delta_ptr, C_ptr, z_ptr, dy_ptr, t, start, offs_d, mask_d, offs_n, mask_n,
        stride_delta_l, stride_C_l, stride_z_l, stride_dy_l, HAS_Z: tl.constexpr,
    ):  # fmt: skip
        """The raw delta, C_t, dy, z of position t for the carry pass; zeros before ``start``."""
        ok = mask_d & (t >= start)
        raw = tl.load(delta_ptr + t * stride_delta_l + offs_d, mask=ok, other=0.0)
        c_t = tl.load(C_ptr + t * stride_C_l + offs_n, mask=mask_n & (t >= start), other=0.0)
        dy = tl.load(dy_ptr + t * stride_dy_l + offs_d, mask=ok, other=0.0)
        zv = tl.load(z_ptr + t * stride_z_l + offs_d, mask=ok, other=0.0) if HAS_Z else dy
        return raw, c_t, dy, zv

    @triton.jit
    def _carry_group(
        delta_ptr, C_ptr, z_ptr, dy_ptr, t0, start, offs_d, mask_d, offs_n, mask_n,
        stride_delta_l, stride_C_l, stride_z_l, stride_dy_l, HAS_Z: tl.constexpr,
    ):  # fmt: skip
        """Positions t0, t0 - 1, t0 - 2, t0 - 3."""
        return (
            _carry_load(delta_ptr, C_ptr, z_ptr, dy_ptr, t0, start, offs_d, mask_d, offs_n, mask_n,
                        stride_delta_l, stride_C_l, stride_z_l, stride_dy_l, HAS_Z),
            _carry_load(delta_ptr, C_ptr, z_ptr, dy_ptr, t0 - 1, start, offs_d, mask_d, offs_n, mask_n,
                        stride_delta_l, stride_C_l, stride_z_l, stride_dy_l, HAS_Z),
            _carry_load(delta_ptr, C_ptr, z_ptr, dy_ptr, t0 - 2, start, offs_d, mask_d, offs_n, mask_n,
                        stride_delta_l, stride_C_l, stride_z_l, stride_dy_l, HAS_Z),
            _carry_load(delta_ptr, C_ptr, z_ptr, dy_ptr, t0 - 3, start, offs_d, mask_d, offs_n, mask_n,
                        stride_delta_l, stride_C_l, stride_z_l, stride_dy_l, HAS_Z),
        )  # fmt: skip

    @triton.jit(do_not_specialize=["unit"])
    def _scan_bwd_carry_kernel(
        delta_ptr, A_ptr, C_ptr, z_ptr, delta_bias_ptr, dy_ptr, mu_ptr, dtsum_ptr,
        seqlen, dim, seg_len, unit,
        stride_delta_b, stride_delta_l, stride_C_b, stride_C_l, stride_z_b, stride_z_l, stride_dy_b, stride_dy_l,
        N: tl.constexpr, N_P2: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):  # fmt: skip
        # Program (b, channel block, g) for segment g + 1: m = decay_t (m + C_t g_t) from its end down to its
        # start gives mu; dt is summed on the way.
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(2) + 1
        n_seg = tl.num_programs(2) + 1
        d_idx = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
        n_idx = tl.arange(0, N_P2)[None, :]
        mask_d = d_idx < dim
        mask_n = n_idx < N
        state_mask = mask_d & mask_n
        offs_d = d_idx * unit
        offs_n = n_idx * unit + tl.zeros((BLOCK_D, 1), tl.int32)  # B_t, C_t loaded as (BLOCK_D, N_P2) tiles
        state_offs = (d_idx * N + n_idx) * unit
        A2 = tl.load(A_ptr + state_offs, mask=state_mask, other=0.0) * 1.4426950408889634
        bias = tl.load(delta_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        delta_ptr += b * stride_delta_b
        C_ptr += b * stride_C_b
        z_ptr += b * stride_z_b
        dy_ptr += b * stride_dy_b
        m = tl.zeros((BLOCK_D, N_P2), tl.float32)
        dt_sum = tl.zeros((BLOCK_D, 1), tl.float32)
        start = g * seg_len
        end = tl.minimum(start + seg_len, seqlen)
        # Four positions per step, from the end down; the next step's loads are issued before this step's math
        # (software pipelining). Positions before the start are masked off.
        nxt = _carry_group(delta_ptr, C_ptr, z_ptr, dy_ptr, end - 1, start, offs_d, mask_d, offs_n, mask_n,
                           stride_delta_l, stride_C_l, stride_z_l, stride_dy_l, HAS_Z)  # fmt: skip
        for i in range(0, end - start, 4):
            t0 = end - 1 - i
            cur = nxt
            nxt = _carry_group(delta_ptr, C_ptr, z_ptr, dy_ptr, t0 - 4, start, offs_d, mask_d, offs_n, mask_n,
                               stride_delta_l, stride_C_l, stride_z_l, stride_dy_l, HAS_Z)  # fmt: skip
            for j in tl.static_range(4):
                raw, c_t, dy, zv = cur[j]
                ok = mask_d & (t0 - j >= start)
                raw = raw.to(tl.float32)
                if HAS_BIAS:
                    raw += bias
                dt = tl.where(ok, softplus(raw) if SOFTPLUS else raw, 0.0)
                gj, _, _ = _gate(dy, zv, HAS_Z)
                dt_sum += dt
                m = tl.exp2(dt * A2) * (m + gj * c_t.to(tl.float32))
        seg = b * n_seg + g
        tl.store(mu_ptr + seg * dim * N + state_offs, m, mask=state_mask)
        tl.store(dtsum_ptr + seg * dim + offs_d, dt_sum, mask=mask_d)

    @triton.jit
    def _bwd_position(
        lam, h, x, b_t, c_t, g, dy, zv, u, raw, dt, t, seqlen, A2, d_skip, dA_acc,
        du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, offs_d, mask_d, offs_n, mask_n, first_d, dim, N: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):  # fmt: skip
        """Position t; ``lam`` comes in as the gradient reaching h_t from later positions and leaves as
        dL/dh_t (the caller multiplies it by decay_t)."""
        valid = t < seqlen
        m = mask_d & valid
        lam += g * c_t
        if HAS_Z:
            y_core = tl.sum(h * c_t, 1, keep_dims=True)
            if HAS_D:
                y_core += d_skip * u
            sig = tl.sigmoid(zv)
            dz = dy * y_core * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + t * dim + offs_d, dz.to(dz_ptr.dtype.element_ty), mask=m)
        tl.store(dC_ptr + t * N + offs_n, tl.sum(h * g, 0, keep_dims=True), mask=mask_n & valid & first_d)
        tl.store(dB_ptr + t * N + offs_n, tl.sum(lam * x, 0, keep_dims=True), mask=mask_n & valid & first_d)
        lb = tl.sum(lam * b_t, 1, keep_dims=True)
        ga = lam * (h - x * b_t)  # lambda_t decay_t h_{t-1}: the gradient of log(decay_t)
        ddt = lb * u + tl.sum(ga * A2, 1, keep_dims=True) * 0.6931471805599453
        dA_acc += ga * dt
        du = lb * dt
        if HAS_D:
            du += d_skip * g
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(m, ddt, 0.0)
        tl.store(du_ptr + t * dim + offs_d, du.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(ddelta_ptr + t * dim + offs_d, ddt.to(ddelta_ptr.dtype.element_ty), mask=m)
        return lam, ddt, dA_acc

    @triton.jit(do_not_specialize=["unit"])
    def _scan_bwd_seg_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, ckpt_ptr, dy_ptr, dhT_ptr,
        mu_ptr, dtsum_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, ddelta_bias_ptr, dh0_ptr, scratch_ptr,
        seqlen, dim, batch, seg_chunks, unit,
        stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l, stride_C_b, stride_C_l,
        stride_z_b, stride_z_l, stride_dy_b, stride_dy_l,
        N: tl.constexpr, N_P2: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DHT: tl.constexpr,
        SOFTPLUS: tl.constexpr, PREFETCH_BC: tl.constexpr,
    ):  # fmt: skip
        # PREFETCH_BC: B_t and C_t go with the other inputs a step ahead; the launcher sets it where a thread holds
        # at most 4 states (more, and the prefetched rows spill: ptxas for sm_90, BLOCK_D 16).
        b = tl.program_id(0).to(tl.int64)  # 64-bit: b * seqlen * dim and the state offsets outgrow int32
        pid_d = tl.program_id(1)
        g = tl.program_id(2)
        n_seg = tl.num_programs(2)
        d_idx = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
        n_idx = tl.arange(0, N_P2)[None, :]
        mask_d = d_idx < dim
        mask_n = n_idx < N
        state_mask = mask_d & mask_n
        offs_d = d_idx * unit
        offs_n = n_idx * unit + tl.zeros((BLOCK_D, 1), tl.int32)  # B_t, C_t loaded as (BLOCK_D, N_P2) tiles
        state_offs = (d_idx * N + n_idx) * unit
        first_d = tl.arange(0, BLOCK_D)[:, None] == 0  # the lanes that store the channel sums dB_t, dC_t
        A2 = tl.load(A_ptr + state_offs, mask=state_mask, other=0.0) * 1.4426950408889634
        # The gradient reaching the segment's last state from all later segments.
        if HAS_DHT:
            lam = tl.load(dhT_ptr + b * dim * N + state_offs, mask=state_mask, other=0.0)
        else:
            lam = tl.zeros((BLOCK_D, N_P2), tl.float32)
        for kk in range(n_seg - 1 - g):
            k = n_seg - 1 - kk
            seg = b * n_seg + k
            dts = tl.load(dtsum_ptr + seg * dim + offs_d, mask=mask_d, other=0.0)
            mu = tl.load(mu_ptr + seg * dim * N + state_offs, mask=state_mask, other=0.0)
            lam = mu + tl.exp2(dts * A2) * lam
        bias = tl.load(delta_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        d_skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else 0.0
        dA_acc = tl.zeros((BLOCK_D, N_P2), tl.float32)
        dD_acc = tl.zeros((BLOCK_D, 1), tl.float32)
        dbias_acc = tl.zeros((BLOCK_D, 1), tl.float32)
        u_ptr += b * stride_u_b
        delta_ptr += b * stride_delta_b
        B_ptr += b * stride_B_b
        C_ptr += b * stride_C_b
        z_ptr += b * stride_z_b
        dy_ptr += b * stride_dy_b
        du_ptr += b * seqlen * dim
        ddelta_ptr += b * seqlen * dim
        dz_ptr += b * seqlen * dim
        dB_ptr += (pid_d * batch + b) * seqlen * N
        dC_ptr += (pid_d * batch + b) * seqlen * N
        prog = (b * tl.num_programs(1) + pid_d) * n_seg + g
        scratch_ptr += prog * (CHUNK // 4) * BLOCK_D * N_P2
        local = (n_idx * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]) * unit
        n_chunks = (seqlen + CHUNK - 1) // CHUNK
        first = g * seg_chunks
        for kk in range(tl.minimum(seg_chunks, n_chunks - first)):
            k = first + tl.minimum(seg_chunks, n_chunks - first) - 1 - kk
            # Forward through the chunk from its saved start, keeping the state before every 4th position. The
            # loads of the next 4 positions are issued before this group's math (software pipelining: the
            # compiler would otherwise wait on each load where its value is first used).
            h = tl.load(ckpt_ptr + (b * n_chunks + k) * dim * N + state_offs, mask=state_mask, other=0.0)
            nxt = (
                _load_fwd(u_ptr, delta_ptr, B_ptr, k * CHUNK, seqlen, offs_d, mask_d, offs_n, mask_n, stride_u_l,
                          stride_delta_l, stride_B_l),
                _load_fwd(u_ptr, delta_ptr, B_ptr, k * CHUNK + 1, seqlen, offs_d, mask_d, offs_n, mask_n, stride_u_l,
                          stride_delta_l, stride_B_l),
                _load_fwd(u_ptr, delta_ptr, B_ptr, k * CHUNK + 2, seqlen, offs_d, mask_d, offs_n, mask_n, stride_u_l,
                          stride_delta_l, stride_B_l),
                _load_fwd(u_ptr, delta_ptr, B_ptr, k * CHUNK + 3, seqlen, offs_d, mask_d, offs_n, mask_n, stride_u_l,
                          stride_delta_l, stride_B_l),
            )  # fmt: skip
            for s in range(CHUNK // 4):
                tl.store(scratch_ptr + s * BLOCK_D * N_P2 + local, h)
                t0 = k * CHUNK + s * 4
                cur = nxt
                tn = t0 + 4
                nxt = (
                    _load_fwd(u_ptr, delta_ptr, B_ptr, tn, seqlen, offs_d, mask_d, offs_n, mask_n, stride_u_l,
                              stride_delta_l, stride_B_l),
                    _load_fwd(u_ptr, delta_ptr, B_ptr, tn + 1, seqlen, offs_d, mask_d, offs_n, mask_n, stride_u_l,
                              stride_delta_l, stride_B_l),
                    _load_fwd(u_ptr, delta_ptr, B_ptr, tn + 2, seqlen, offs_d, mask_d, offs_n, mask_n, stride_u_l,
                              stride_delta_l, stride_B_l),
                    _load_fwd(u_ptr, delta_ptr, B_ptr, tn + 3, seqlen, offs_d, mask_d, offs_n, mask_n, stride_u_l,
                              stride_delta_l, stride_B_l),
                )  # fmt: skip
                for j in tl.static_range(4):
                    u, raw, b_t = cur[j]
                    _, dt = _dt(raw, t0 + j, seqlen, mask_d, bias, HAS_BIAS, SOFTPLUS)
                    h = tl.exp2(dt * A2) * h + (dt * u.to(tl.float32)) * b_t.to(tl.float32)
            tl.debug_barrier()
            # Backwards, four positions at a time, their states and decays in registers; the next group's loads
            # (and its kept state) are issued first here too.
            t_last = k * CHUNK + CHUNK - 4
            nxt = _load_window(u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, z_ptr, t_last, seqlen, offs_d, mask_d, offs_n,
                               mask_n, stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_dy_l, stride_z_l,
                               HAS_Z, PREFETCH_BC)  # fmt: skip
            h_next = tl.load(scratch_ptr + (CHUNK // 4 - 1) * BLOCK_D * N_P2 + local)
            for ss in range(CHUNK // 4):
                s = CHUNK // 4 - 1 - ss
                t0 = k * CHUNK + s * 4
                cur = nxt
                h_start = h_next
                s_next = tl.maximum(s - 1, 0)  # the chunk's first group loads itself again (unused)
                nxt = _load_window(u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, z_ptr, k * CHUNK + s_next * 4, seqlen,
                                   offs_d, mask_d, offs_n, mask_n, stride_u_l, stride_delta_l, stride_B_l, stride_C_l,
                                   stride_dy_l, stride_z_l, HAS_Z, PREFETCH_BC)  # fmt: skip
                h_next = tl.load(scratch_ptr + s_next * BLOCK_D * N_P2 + local)
                u0, raw0, b0, c0, dy0, z0 = cur[0]
                u1, raw1, b1, c1, dy1, z1 = cur[1]
                u2, raw2, b2, c2, dy2, z2 = cur[2]
                u3, raw3, b3, c3, dy3, z3 = cur[3]
                if not PREFETCH_BC:  # B_t and C_t (small, L2-resident) loaded here, all four rows together
                    b0, c0 = _load_bc(B_ptr, C_ptr, t0, seqlen, offs_n, mask_n, stride_B_l, stride_C_l)
                    b1, c1 = _load_bc(B_ptr, C_ptr, t0 + 1, seqlen, offs_n, mask_n, stride_B_l, stride_C_l)
                    b2, c2 = _load_bc(B_ptr, C_ptr, t0 + 2, seqlen, offs_n, mask_n, stride_B_l, stride_C_l)
                    b3, c3 = _load_bc(B_ptr, C_ptr, t0 + 3, seqlen, offs_n, mask_n, stride_B_l, stride_C_l)
                raw0, dt0 = _dt(raw0, t0, seqlen, mask_d, bias, HAS_BIAS, SOFTPLUS)
                raw1, dt1 = _dt(raw1, t0 + 1, seqlen, mask_d, bias, HAS_BIAS, SOFTPLUS)
                raw2, dt2 = _dt(raw2, t0 + 2, seqlen, mask_d, bias, HAS_BIAS, SOFTPLUS)
                raw3, dt3 = _dt(raw3, t0 + 3, seqlen, mask_d, bias, HAS_BIAS, SOFTPLUS)
                u0 = u0.to(tl.float32)
                u1 = u1.to(tl.float32)
                u2 = u2.to(tl.float32)
                u3 = u3.to(tl.float32)
                b0 = b0.to(tl.float32)
                b1 = b1.to(tl.float32)
                b2 = b2.to(tl.float32)
                b3 = b3.to(tl.float32)
                c0 = c0.to(tl.float32)
                c1 = c1.to(tl.float32)
                c2 = c2.to(tl.float32)
                c3 = c3.to(tl.float32)
                g0, dy0, z0 = _gate(dy0, z0, HAS_Z)
                g1, dy1, z1 = _gate(dy1, z1, HAS_Z)
                g2, dy2, z2 = _gate(dy2, z2, HAS_Z)
                g3, dy3, z3 = _gate(dy3, z3, HAS_Z)
                x0 = dt0 * u0
                x1 = dt1 * u1
                x2 = dt2 * u2
                x3 = dt3 * u3
                e0 = tl.exp2(dt0 * A2)
                e1 = tl.exp2(dt1 * A2)
                e2 = tl.exp2(dt2 * A2)
                e3 = tl.exp2(dt3 * A2)
                h0 = e0 * h_start + x0 * b0
                h1 = e1 * h0 + x1 * b1
                h2 = e2 * h1 + x2 * b2
                h3 = e3 * h2 + x3 * b3
                lam, ddt3, dA_acc = _bwd_position(
                    lam, h3, x3, b3, c3, g3, dy3, z3, u3, raw3, dt3, t0 + 3, seqlen, A2, d_skip, dA_acc,
                    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, offs_d, mask_d, offs_n, mask_n, first_d, dim, N,
                    HAS_D, HAS_Z, SOFTPLUS,
                )  # fmt: skip
                lam, ddt2, dA_acc = _bwd_position(
                    e3 * lam, h2, x2, b2, c2, g2, dy2, z2, u2, raw2, dt2, t0 + 2, seqlen, A2, d_skip, dA_acc,
                    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, offs_d, mask_d, offs_n, mask_n, first_d, dim, N,
                    HAS_D, HAS_Z, SOFTPLUS,
                )  # fmt: skip
                lam, ddt1, dA_acc = _bwd_position(
                    e2 * lam, h1, x1, b1, c1, g1, dy1, z1, u1, raw1, dt1, t0 + 1, seqlen, A2, d_skip, dA_acc,
                    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, offs_d, mask_d, offs_n, mask_n, first_d, dim, N,
                    HAS_D, HAS_Z, SOFTPLUS,
                )  # fmt: skip
                lam, ddt0, dA_acc = _bwd_position(
                    e1 * lam, h0, x0, b0, c0, g0, dy0, z0, u0, raw0, dt0, t0, seqlen, A2, d_skip, dA_acc,
                    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, offs_d, mask_d, offs_n, mask_n, first_d, dim, N,
                    HAS_D, HAS_Z, SOFTPLUS,
                )  # fmt: skip
                lam = e0 * lam
                dD_acc += g0 * u0 + g1 * u1 + g2 * u2 + g3 * u3
                dbias_acc += ddt0 + ddt1 + ddt2 + ddt3
            tl.debug_barrier()
        seg = b * n_seg + g
        if g == 0:
            tl.store(dh0_ptr + b * dim * N + state_offs, lam, mask=state_mask)
        tl.store(dA_ptr + seg * dim * N + state_offs, dA_acc, mask=state_mask)
        tl.store(dD_ptr + seg * dim + offs_d, dD_acc, mask=mask_d)
        tl.store(ddelta_bias_ptr + seg * dim + offs_d, dbias_acc, mask=mask_d)


def backward_segments(batch: int, length: int, d_in: int, block_d: int, chunk: int) -> int:
    """Chunks per segment of the segmented backward: the sequence splits until about ``scan_min_programs``
    programs run (each split costs one more exp per state and position, in the carry pass), or as
    ``scan_segments`` says."""
    settings = get_settings()
    n_chunks = triton.cdiv(length, chunk)
    if settings.scan_segments != "auto":
        segments = max(1, min(int(settings.scan_segments), n_chunks))
    else:
        programs = batch * triton.cdiv(d_in, block_d)
        segments = 1
        while programs * segments * 2 <= settings.scan_min_programs and n_chunks >= 2 * segments:
            segments *= 2
    return triton.cdiv(n_chunks, segments)


def scan_bwd_segmented(dy, dhT, u, delta, A, B, C, D, z, delta_bias, delta_softplus, ckpt, chunk):
    """Gradients of the scan from the forward's chunk states ``ckpt`` (B, n_chunks, D_in, N) fp32 spaced
    ``chunk`` positions apart: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0), fp32 where the inputs are
    parameters, in the inputs' dtypes for the activations."""
    batch, length, d_in = u.shape
    n = A.shape[1]
    block_d, warps = get_settings().scan_bwd_seg_config
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    n_dblocks = triton.cdiv(d_in, block_d)
    seg_chunks = backward_segments(batch, length, d_in, block_d, chunk)
    segments = triton.cdiv(triton.cdiv(length, chunk), seg_chunks)
    dev, f32 = u.device, torch.float32
    n_p2 = triton.next_power_of_2(n)
    A = A.float().contiguous()
    zz = u if z is None else z
    bias = u if delta_bias is None else delta_bias.float().contiguous()
    flags = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus)
    mu = torch.empty(batch, segments, d_in, n, device=dev, dtype=f32)
    dtsum = torch.empty(batch, segments, d_in, device=dev, dtype=f32)
    if segments > 1:
        _scan_bwd_carry_kernel[(batch, n_dblocks, segments - 1)](
            delta, A, C, zz, bias, dy, mu, dtsum, length, d_in, seg_chunks * chunk, 1,
            delta.stride(0), delta.stride(1), C.stride(0), C.stride(1), zz.stride(0), zz.stride(1),
            dy.stride(0), dy.stride(1),
            N=n, N_P2=n_p2, BLOCK_D=block_d, num_warps=warps, **flags,
        )  # fmt: skip
    du = torch.empty(batch, length, d_in, device=dev, dtype=u.dtype)
    ddelta = torch.empty(batch, length, d_in, device=dev, dtype=delta.dtype)
    dz = torch.empty(batch, length, d_in, device=dev, dtype=z.dtype) if z is not None else du
    dB = torch.empty(n_dblocks, batch, length, n, device=dev, dtype=f32)
    dC = torch.empty(n_dblocks, batch, length, n, device=dev, dtype=f32)
    dA = torch.empty(batch, segments, d_in, n, device=dev, dtype=f32)
    dD = torch.empty(batch, segments, d_in, device=dev, dtype=f32)
    dbias = torch.empty(batch, segments, d_in, device=dev, dtype=f32)
    dh0 = torch.empty(batch, d_in, n, device=dev, dtype=f32)
    scratch = torch.empty(batch * n_dblocks * segments * (chunk // 4) * block_d * n_p2, device=dev, dtype=f32)
    _scan_bwd_seg_kernel[(batch, n_dblocks, segments)](
        u, delta, A, B, C, u if D is None else D.float().contiguous(), zz, bias, ckpt, dy,
        dh0 if dhT is None else dhT.float().contiguous(), mu, dtsum,
        du, ddelta, dz, dB, dC, dA, dD, dbias, dh0, scratch, length, d_in, batch, seg_chunks, 1,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
        C.stride(0), C.stride(1), zz.stride(0), zz.stride(1), dy.stride(0), dy.stride(1),
        N=n, N_P2=n_p2, CHUNK=chunk, BLOCK_D=block_d, HAS_D=D is not None, HAS_DHT=dhT is not None,
        PREFETCH_BC=block_d * n_p2 <= 128 * warps, num_warps=warps, **flags,
    )  # fmt: skip
    dz = None if z is None else dz
    return du, ddelta, dA.sum((0, 1)), dB.sum(0), dC.sum(0), dD.sum((0, 1)), dz, dbias.sum((0, 1)), dh0
