"""The selective scan and its decode step as Triton kernels; same arguments and results as the references
in :mod:`.scan` (:func:`.scan.selective_scan_ref`, :func:`.scan.selective_state_update`).

The scan: one program (one warp by default) owns (batch row b, BLOCK_D channels); at BLOCK_D = 32 each lane
owns one channel and all its N states and walks the sequence, four positions per loop step. The tiles are
(BLOCK_D, N_P2) with every address multiplied by a runtime 1 (``unit``), so no load gets a vectorised layout
of its own and no value goes through shared memory; B_t and C_t, the same for every channel, come as scalar
loads at constant offsets (two bf16 values per 32-bit load where aligned). A step computes its four
positions' softplus, dt * u and gate together (independent of the state, so their chains overlap), issues
the next four positions' loads, then advances the states. With few programs the forward also splits the
sequence into segments: a pass from zero states gives each segment's end state and sum of dt, a carry over
the segments gives their true start states, and the real pass runs from those. The forward keeps the state at
every CHUNK-th position (B, n_chunks, D_in, N fp32) for the backward (:mod:`.scan_bwd_triton`), which splits
the sequence into segments, recomputes each chunk forward from its kept state and runs the adjoint recurrence
lambda_t = C_t g_t + decay_{t+1} lambda_{t+1} backwards. Tile shapes and the segment split come from
:mod:`.settings` (``scan_*``).

The decode step (:func:`ssm_update_triton`) advances the state (S, D_in, N) by one token in place, one
program per (ROWS rows, channel block), which keeps A, D, the dt bias and W_dt's block across its rows. It
can fold the dt_proj GEMV (dt = W_dt dt_low) in, so that needs no launch of its own (``ssm_fused_dt_max_rows``;
with more rows dt_proj runs as one GEMM first). It is memory bound: the floor is one read and one write of
the state. Row b may step
any state row (``state_indices``), so a decode step can run over any set of slots of a state pool.

Kernel arguments follow one convention in every kernel file: ``<tensor>_ptr``, ``stride_<tensor>_<dim>``
(dims named as in the shapes: b, l, d, n, ...), runtime sizes in lower case, compile-time flags and
tile sizes in upper case.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .scan import _check_inputs, selective_scan_ref
from .scan_bwd_triton import scan_bwd_segmented
from .settings import get_settings
from .tl_math import check_state_indices, count_key, decode_launch_config, expect_shape, pdl_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths work without Triton
    triton = None

_BLOCK_R = 64  # dt_proj rank per step of the fused dt GEMV, where the rank exceeds _ONE_TILE_R
_ONE_TILE_R = 128  # ranks up to this take W_dt's block in one tile


if triton is not None:
    from .tl_math import pdl_wait, softplus

    @triton.jit
    def _lane_row(ptr, t, stride_l, n_idx, row, N: tl.constexpr, PACK: tl.constexpr):
        """Row t of B or C (N values, the same for every channel) in every lane, as fp32 in the (BLOCK_D, N_P2)
        tile ``row`` (zeros): scalar loads from one base at constant offsets, no mask (the caller clamps t to a
        valid position). With PACK = 2 (bf16 rows, 4-byte aligned) two values per 32-bit load, widened by a
        shift and a mask. Where each thread holds all N_P2 columns (BLOCK_D >= 32 per warp) the selects fold away;
        smaller blocks (tests) pay one select per column."""
        if PACK == 2:
            words = (ptr + t * stride_l).to(tl.pointer_type(tl.uint32))
            for k in tl.static_range(N // 2):
                v = tl.load(words + k)
                row = tl.where(n_idx == 2 * k, (v << 16).to(tl.float32, bitcast=True), row)
                row = tl.where(n_idx == 2 * k + 1, (v & 0xFFFF0000).to(tl.float32, bitcast=True), row)
        else:
            for k in tl.static_range(N):
                row = tl.where(n_idx == k, tl.load(ptr + t * stride_l + k).to(tl.float32), row)
        return row

    @triton.jit
    def _lane_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, t, end, offs_d, mask_d, n_idx, row,
                    stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, N: tl.constexpr,
                    PACK: tl.constexpr, HAS_Z: tl.constexpr, STORE_Y: tl.constexpr):  # fmt: skip
        """Position t's raw u, delta, z (BLOCK_D, 1) and B_t, C_t (BLOCK_D, N_P2), zeros from ``end`` on.
        Without STORE_Y (the carry pass) C_t and z are not loaded."""
        m = mask_d & (t < end)
        raw = tl.load(delta_ptr + t * stride_delta_l + offs_d, mask=m, other=0.0)
        u = tl.load(u_ptr + t * stride_u_l + offs_d, mask=m, other=0.0)
        t_row = tl.minimum(t, end - 1)  # past the end: a valid row, multiplied by u = 0 and dt = 0
        b_t = _lane_row(B_ptr, t_row, stride_B_l, n_idx, row, N, PACK)
        c_t = b_t
        zv = raw
        if STORE_Y:
            c_t = _lane_row(C_ptr, t_row, stride_C_l, n_idx, row, N, PACK)
            if HAS_Z:
                zv = tl.load(z_ptr + t * stride_z_l + offs_d, mask=m, other=0.0)
        return u, raw, b_t, c_t, zv

    @triton.jit
    def _lane_group(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, t0, end, offs_d, mask_d, n_idx, row,
                    stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, N: tl.constexpr,
                    PACK: tl.constexpr, HAS_Z: tl.constexpr, STORE_Y: tl.constexpr):  # fmt: skip
        """Positions t0 .. t0 + 3."""
        return (
            _lane_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, t0, end, offs_d, mask_d, n_idx, row,
                        stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, N, PACK, HAS_Z, STORE_Y),
            _lane_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, t0 + 1, end, offs_d, mask_d, n_idx, row,
                        stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, N, PACK, HAS_Z, STORE_Y),
            _lane_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, t0 + 2, end, offs_d, mask_d, n_idx, row,
                        stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, N, PACK, HAS_Z, STORE_Y),
            _lane_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, t0 + 3, end, offs_d, mask_d, n_idx, row,
                        stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, N, PACK, HAS_Z, STORE_Y),
        )  # fmt: skip

    @triton.jit
    def _lane_prep_one(u, raw, zv, t, end, mask_d, bias, d_skip, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                       HAS_D: tl.constexpr, HAS_Z: tl.constexpr):  # fmt: skip
        """What position t needs besides the state: dt, dt * u, the skip term D * u and the gate silu(z)."""
        raw = raw.to(tl.float32)
        if HAS_BIAS:
            raw += bias
        dt = tl.where(mask_d & (t < end), softplus(raw) if SOFTPLUS else raw, 0.0)
        u = u.to(tl.float32)
        skip = d_skip * u if HAS_D else 0.0
        gate = 1.0
        if HAS_Z:
            zf = zv.to(tl.float32)
            gate = zf * tl.sigmoid(zf)
        return dt, dt * u, skip, gate

    @triton.jit
    def _lane_prep(group, t0, end, mask_d, bias, d_skip, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr):  # fmt: skip
        u0, raw0, _, _, z0 = group[0]
        u1, raw1, _, _, z1 = group[1]
        u2, raw2, _, _, z2 = group[2]
        u3, raw3, _, _, z3 = group[3]
        return (
            _lane_prep_one(u0, raw0, z0, t0, end, mask_d, bias, d_skip, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z),
            _lane_prep_one(u1, raw1, z1, t0 + 1, end, mask_d, bias, d_skip, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z),
            _lane_prep_one(u2, raw2, z2, t0 + 2, end, mask_d, bias, d_skip, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z),
            _lane_prep_one(u3, raw3, z3, t0 + 3, end, mask_d, bias, d_skip, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z),
        )

    @triton.jit(do_not_specialize=["unit"])
    def _scan_fwd_lane_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, h0_ptr,
        y_ptr, hT_ptr, ckpt_ptr, dtsum_ptr,
        seqlen, dim, seg_len, unit,
        stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l, stride_C_b, stride_C_l,
        stride_z_b, stride_z_l,
        N: tl.constexpr, N_P2: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, PACK: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
        SOFTPLUS: tl.constexpr, SAVE_CKPT: tl.constexpr, STORE_Y: tl.constexpr,
    ):  # fmt: skip
        # Program (b, channel block, g) runs positions [g * seg_len, (g + 1) * seg_len) from the start state
        # h0[b, g] (zero without HAS_H0) and leaves its end state in hT[b, g]. Without STORE_Y it only sums dt
        # per channel (the segment's total decay is exp(A * sum dt)) for the carry across segments.
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(2)
        n_seg = tl.num_programs(2)
        d_idx = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
        n_idx = tl.arange(0, N_P2)[None, :]
        mask_d = d_idx < dim
        mask_n = n_idx < N
        state_mask = mask_d & mask_n
        offs_d = d_idx * unit
        row = tl.zeros((BLOCK_D, N_P2), tl.float32)
        state_offs = (d_idx * N + n_idx) * unit
        A2 = tl.load(A_ptr + state_offs, mask=state_mask, other=0.0) * 1.4426950408889634
        seg_state = (b * n_seg + g) * dim * N + state_offs
        if HAS_H0:
            h = tl.load(h0_ptr + seg_state, mask=state_mask, other=0.0)
        else:
            h = tl.zeros((BLOCK_D, N_P2), tl.float32)
        dt_sum = tl.zeros((BLOCK_D, 1), tl.float32)
        bias = tl.load(delta_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        d_skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else 0.0
        u_ptr += b * stride_u_b
        delta_ptr += b * stride_delta_b
        B_ptr += b * stride_B_b
        C_ptr += b * stride_C_b
        z_ptr += b * stride_z_b
        y_ptr += b * seqlen * dim
        n_chunks = (seqlen + CHUNK - 1) // CHUNK
        start = g * seg_len
        end = tl.minimum(start + seg_len, seqlen)
        nxt = _lane_group(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, start, end, offs_d, mask_d, n_idx, row,
                          stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, N, PACK, HAS_Z,
                          STORE_Y)  # fmt: skip
        for t0 in range(start, end, 4):
            if SAVE_CKPT:
                if t0 % CHUNK == 0:
                    tl.store(ckpt_ptr + (b * n_chunks + t0 // CHUNK) * dim * N + state_offs, h, mask=state_mask)
            cur = nxt
            # The group's per-channel math first, all four positions together (independent of the state: their
            # chains overlap), then the next group's loads, then the states.
            prep = _lane_prep(cur, t0, end, mask_d, bias, d_skip, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z)
            nxt = _lane_group(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, t0 + 4, end, offs_d, mask_d, n_idx, row,
                              stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, N, PACK,
                              HAS_Z, STORE_Y)  # fmt: skip
            for j in tl.static_range(4):
                _, _, b_t, c_t, _ = cur[j]
                dt, x, skip, gate = prep[j]
                t = t0 + j
                h = tl.exp2(dt * A2) * h + x * b_t
                if STORE_Y:
                    y = (tl.sum(h * c_t, 1, keep_dims=True) + skip) * gate
                    tl.store(y_ptr + t * dim + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d & (t < end))
                else:
                    dt_sum += dt
        tl.store(hT_ptr + seg_state, h, mask=state_mask)
        if not STORE_Y:
            tl.store(dtsum_ptr + (b * n_seg + g) * dim + offs_d, dt_sum, mask=mask_d)

    @triton.jit
    def _ssm_update_kernel(
        state_ptr, u_ptr, delta_ptr, dt_weight_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, y_ptr,
        state_indices_ptr,
        batch, dim, dstate, rank,
        stride_state_b, stride_state_d, stride_state_n, stride_u_b, stride_u_d, stride_delta_b, stride_delta_k,
        stride_dt_weight_d, stride_dt_weight_r, stride_A_d, stride_A_n, stride_B_b, stride_B_n, stride_C_b, stride_C_n,
        stride_z_b, stride_z_d, stride_y_b, stride_y_d,
        FUSED_DT: tl.constexpr, A_FROM_LOG: tl.constexpr, HAS_DT_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_STATE_INDICES: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ONE_TILE: tl.constexpr,
        ROWS: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # One program: (ROWS rows from program_id(0) * ROWS, BLOCK_D channels) x all N states. What does not
        # depend on the row (A or -exp(A_log), D, the dt bias, and W_dt when the rank fits one BLOCK_R tile) is
        # loaded once per program. stride_delta_k runs over D_in, or over R when FUSED_DT. Row b steps state row
        # state_indices[b] (b itself without HAS_STATE_INDICES).
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        mask_d = d < dim
        mask_n = n < dstate
        mask = mask_d[:, None] & mask_n[None, :]
        # Parameters only before the wait: under PDL the previous kernel may still be writing the activations.
        A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :] * stride_A_n, mask=mask, other=0.0).to(tl.float32)
        if A_FROM_LOG:  # A = -exp(A_log), which would otherwise take two launches per step
            A = -tl.exp(A)
        if HAS_DT_BIAS:
            dt_bias = tl.load(delta_bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_D:
            d_skip = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        if ONE_TILE:  # FUSED_DT with BLOCK_R >= rank: W_dt's block is read before the wait, once for every row
            r = tl.arange(0, BLOCK_R)
            mask_r = r < rank
            w_block = tl.load(
                dt_weight_ptr + d[:, None] * stride_dt_weight_d + r[None, :] * stride_dt_weight_r,
                mask=mask_d[:, None] & mask_r[None, :],
                other=0.0,
            ).to(tl.float32)
        pdl_wait(PDL)
        for i in tl.static_range(ROWS):
            b = tl.program_id(0).to(tl.int64) * ROWS + i
            if b < batch:
                if HAS_STATE_INDICES:
                    slot = tl.load(state_indices_ptr + b).to(tl.int64)
                else:
                    slot = b
                h_ptrs = state_ptr + slot * stride_state_b + d[:, None] * stride_state_d + n[None, :] * stride_state_n
                h = tl.load(h_ptrs, mask=mask, other=0.0)
                x = tl.load(u_ptr + b * stride_u_b + d * stride_u_d, mask=mask_d, other=0.0).to(tl.float32)
                if ONE_TILE:
                    low = tl.load(delta_ptr + b * stride_delta_b + r * stride_delta_k, mask=mask_r, other=0.0)
                    dt = tl.sum(w_block * low.to(tl.float32)[None, :], axis=1)
                elif FUSED_DT:  # dt = W_dt dt_low: the dt_proj GEMV for this block of channels, BLOCK_R at a time
                    dt = tl.zeros([BLOCK_D], dtype=tl.float32)
                    for r0 in range(0, rank, BLOCK_R):
                        rr = r0 + tl.arange(0, BLOCK_R)
                        mask_rr = rr < rank
                        low = tl.load(delta_ptr + b * stride_delta_b + rr * stride_delta_k, mask=mask_rr, other=0.0)
                        w_tile = tl.load(
                            dt_weight_ptr + d[:, None] * stride_dt_weight_d + rr[None, :] * stride_dt_weight_r,
                            mask=mask_d[:, None] & mask_rr[None, :],
                            other=0.0,
                        ).to(tl.float32)
                        dt += tl.sum(w_tile * low.to(tl.float32)[None, :], axis=1)
                else:
                    dt = tl.load(delta_ptr + b * stride_delta_b + d * stride_delta_k, mask=mask_d, other=0.0)
                    dt = dt.to(tl.float32)
                if HAS_DT_BIAS:
                    dt += dt_bias
                if SOFTPLUS:
                    dt = softplus(dt)
                B = tl.load(B_ptr + b * stride_B_b + n * stride_B_n, mask=mask_n, other=0.0).to(tl.float32)
                C = tl.load(C_ptr + b * stride_C_b + n * stride_C_n, mask=mask_n, other=0.0).to(tl.float32)
                h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * B[None, :]
                tl.store(h_ptrs, h, mask=mask)

                y = tl.sum(h * C[None, :], axis=1)
                if HAS_D:
                    y += x * d_skip
                if HAS_Z:
                    z = tl.load(z_ptr + b * stride_z_b + d * stride_z_d, mask=mask_d, other=0.0).to(tl.float32)
                    y *= z * tl.sigmoid(z)
                tl.store(y_ptr + b * stride_y_b + d * stride_y_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def _update_config(batch: int, dim: int, block_n: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps) of a decode step over ``batch`` rows: the ``ssm_update_tiles`` entry of the
    smallest row count >= batch (else the largest). Without entries: :func:`.tl_math.decode_launch_config`'s
    channel block, one row per program on the GPU and two under the interpreter (so that the CPU tests run
    the row loop)."""
    table = get_settings().ssm_update_tiles
    if not table:
        block, warps = decode_launch_config(batch, dim, block_n)
        return block, 1 if on_gpu else 2, warps
    cfg = table[count_key(table, batch)]
    return min(cfg["BLOCK_D"], triton.next_power_of_2(dim)), cfg["ROWS"], cfg["num_warps"]


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _segments(batch: int, length: int, d_in: int, block_d: int) -> int:
    """Sequence segments for the forward. A split costs a first pass over the sequence (every state, no
    output), which pays only where it more than doubles the programs in flight: below
    ``scan_fwd_min_programs`` programs the sequence splits until twice that many run (or segments would be
    shorter than 8 chunks); from there on it does not split."""
    settings = get_settings()
    chunk = settings.scan_chunk
    if settings.scan_segments != "auto":
        return max(1, min(int(settings.scan_segments), triton.cdiv(length, chunk)))
    programs = batch * triton.cdiv(d_in, block_d)
    segments = 1
    if programs >= settings.scan_fwd_min_programs:
        return 1
    while programs * segments < 2 * settings.scan_fwd_min_programs and length // (segments * 2) >= 8 * chunk:
        segments *= 2
    return segments


def _scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, save_ckpt):
    batch, length, d_in = u.shape
    n = A.shape[1]
    settings = get_settings()
    chunk, block_d = settings.scan_chunk, settings.scan_fwd_config[0]
    u, delta, B, C = (_rows_contiguous(t) for t in (u, delta, B, C))
    z = None if z is None else _rows_contiguous(z)
    A = A.float().contiguous()
    dev, f32 = u.device, torch.float32
    y = torch.empty(batch, length, d_in, device=dev, dtype=u.dtype)
    n_chunks = triton.cdiv(length, chunk)
    segments = _segments(batch, length, d_in, block_d)
    seg_len = triton.cdiv(n_chunks, segments) * chunk  # whole chunks, so the kept states line up
    segments = triton.cdiv(length, seg_len)
    hT = torch.empty(batch, segments, d_in, n, device=dev, dtype=f32)
    ckpt = torch.empty(batch, n_chunks, d_in, n, device=dev, dtype=f32) if save_ckpt else hT
    starts = None if h0 is None else h0.float().contiguous()[:, None]
    zz = u if z is None else z
    dtsum = hT
    if segments > 1:
        # Pass 1: every segment from a zero state gives its end state and sum of dt; then the true start of
        # each segment follows sequentially over the (few) segments.
        dtsum = torch.empty(batch, segments, d_in, 1, device=dev, dtype=f32)
        ends = torch.empty_like(hT)
        _launch_fwd(u, delta, A, B, C, D, zz, z, delta_bias, None, y, ends, ckpt, dtsum, seg_len, segments,
                    delta_softplus, False, False, settings)  # fmt: skip
        state = torch.zeros(batch, d_in, n, device=dev, dtype=f32) if h0 is None else h0.float()
        starts = torch.empty_like(hT)
        for g in range(segments):
            starts[:, g] = state
            state = torch.exp(dtsum[:, g] * A) * state + ends[:, g]
    _launch_fwd(u, delta, A, B, C, D, zz, z, delta_bias, starts, y, hT, ckpt, dtsum, seg_len, segments,
                delta_softplus, save_ckpt, True, settings)  # fmt: skip
    return y, hT[:, -1], (ckpt if save_ckpt else None)


def _row_pack(B: Tensor, C: Tensor, n: int) -> int:
    """Values per load of the lane kernel's B and C rows: 2 where both are bf16 rows of even length that
    start at 4-byte boundaries, else 1."""
    aligned = all(
        t.dtype == torch.bfloat16 and t.data_ptr() % 4 == 0 and t.stride(0) % 2 == 0 and t.stride(1) % 2 == 0
        for t in (B, C)
    )
    return 2 if aligned and n % 2 == 0 else 1


def _launch_fwd(u, delta, A, B, C, D, zz, z, delta_bias, starts, y, hT, ckpt, dtsum, seg_len, segments,
                softplus, save_ckpt, store_y, settings):  # fmt: skip
    batch, length, d_in = u.shape
    n = A.shape[1]
    block_d, warps = settings.scan_fwd_config
    _scan_fwd_lane_kernel[(batch, triton.cdiv(d_in, block_d), segments)](
        u, delta, A, B, C, u if D is None else D.float().contiguous(), zz,
        u if delta_bias is None else delta_bias.float().contiguous(), hT if starts is None else starts,
        y, hT, ckpt, dtsum, length, d_in, seg_len, 1,
        stride_u_b=u.stride(0), stride_u_l=u.stride(1), stride_delta_b=delta.stride(0),
        stride_delta_l=delta.stride(1), stride_B_b=B.stride(0), stride_B_l=B.stride(1), stride_C_b=C.stride(0),
        stride_C_l=C.stride(1), stride_z_b=zz.stride(0), stride_z_l=zz.stride(1),
        N=n, N_P2=triton.next_power_of_2(n), CHUNK=settings.scan_chunk, BLOCK_D=block_d,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=starts is not None,
        PACK=_row_pack(B, C, n), SOFTPLUS=softplus, SAVE_CKPT=save_ckpt, STORE_Y=store_y, num_warps=warps,
    )  # fmt: skip


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus):
        u, delta, B, C = (_rows_contiguous(t) for t in (u, delta, B, C))
        y, hT, ckpt = _scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, save_ckpt=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.chunk = get_settings().scan_chunk  # the saved states' spacing, whatever the settings at backward time
        ctx.softplus = delta_softplus
        ctx.has_h0 = h0 is not None
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = scan_bwd_segmented(
            dy, dhT, u, delta, A, B, C, D, z, delta_bias, ctx.softplus, ckpt, ctx.chunk
        )
        return (
            du,
            ddelta,
            dA.to(A.dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            None if D is None else dD.to(D.dtype),
            dz,
            None if delta_bias is None else dbias.to(delta_bias.dtype),
            dh0 if ctx.has_h0 else None,
            None,
        )


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The fused Triton scan (forward and backward); same arguments and results as :func:`selective_scan_ref`."""
    if triton is None:
        raise RuntimeError("selective_scan_triton needs the triton package")
    _check_inputs(u, delta, A, B, C, initial_state)
    if u.shape[1] == 0:
        return selective_scan_ref(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state
        )
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, hT = _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    else:
        y, hT, _ = _scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, False)
    return (y, hT) if return_final_state else y


def ssm_update_triton(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    dt_weight: Tensor | None = None,
    a_from_log: bool = False,
    state_indices: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """One SSM decode step in one launch; same semantics as :func:`.scan.selective_state_update`, updating
    ``state`` in place.

    state: (S, D_in, N) fp32; u, z: (B, D_in); delta: (B, D_in), or (B, R) with ``dt_weight`` (D_in, R), in
    which case dt = delta @ dt_weight^T is computed inside the kernel, in fp32; A: (D_in, N); B, C: (B, N);
    D, delta_bias: (D_in,); state_indices: (B,) (row b steps state row state_indices[b]; S = B without).
    Inputs may be strided views. Returns y (B, D_in) in u's dtype (or ``out``). With ``a_from_log`` the
    ``A`` argument holds the parameter A_log and the kernel uses -exp(A_log).
    """
    op = "ssm_update_triton"
    if state.ndim != 3 or state.dtype != torch.float32:
        raise ValueError(f"{op}: state must be (S, D_in, N) float32, got {tuple(state.shape)} {state.dtype}")
    if u.ndim != 2:
        raise ValueError(f"{op}: u must be (B, D_in), got {tuple(u.shape)}")
    batch, dim = u.shape
    dstate = state.shape[2]
    expect_shape(op, "state", state, (batch if state_indices is None else state.shape[0], dim, dstate))
    check_state_indices(op, state_indices, batch, u.device)
    expect_shape(op, "A", A, (dim, dstate))
    expect_shape(op, "B", B, (batch, dstate))
    expect_shape(op, "C", C, (batch, dstate))
    rank = 0
    if dt_weight is not None:
        if dt_weight.ndim != 2 or dt_weight.shape[0] != dim:
            raise ValueError(f"{op}: dt_weight must be (D_in={dim}, R), got {tuple(dt_weight.shape)}")
        rank = dt_weight.shape[1]
    expect_shape(op, "delta", delta, (batch, rank) if dt_weight is not None else (batch, dim))
    if z is not None:
        expect_shape(op, "z", z, (batch, dim))
    if D is not None:
        expect_shape(op, "D", D, (dim,))
        D = D.contiguous()
    if delta_bias is not None:
        expect_shape(op, "delta_bias", delta_bias, (dim,))
        delta_bias = delta_bias.contiguous()
    out = torch.empty(batch, dim, dtype=u.dtype, device=u.device) if out is None else out
    expect_shape(op, "out", out, (batch, dim))
    if batch == 0 or dim == 0:
        return out
    block_n = triton.next_power_of_2(dstate)
    block, rows, warps = _update_config(batch, dim, block_n, u.is_cuda)
    if dt_weight is not None and batch > get_settings().ssm_fused_dt_max_rows:
        # Many rows: dt_proj as one GEMM (cuBLAS) beats a GEMV per row inside the kernel.
        delta, dt_weight, rank = torch.nn.functional.linear(delta, dt_weight), None, 0
    w = u if dt_weight is None else dt_weight
    # W_dt's (BLOCK_D, rank) block in one tile where the rank allows (released models: 92 and 72), else a loop.
    block_r = triton.next_power_of_2(max(rank, 1))
    one_tile = dt_weight is not None and block_r <= _ONE_TILE_R
    block_r = block_r if one_tile else min(_BLOCK_R, block_r)
    pdl = pdl_launch(u, batch)
    _ssm_update_kernel[(triton.cdiv(batch, rows), triton.cdiv(dim, block))](
        state, u, delta, w, A, B, C, u if D is None else D, u if z is None else z,
        u if delta_bias is None else delta_bias, out, u if state_indices is None else state_indices,
        batch, dim, dstate, rank,
        *state.stride(), *u.stride(), *delta.stride(), *(w.stride() if dt_weight is not None else (0, 0)),
        *A.stride(), *B.stride(), *C.stride(), *(z.stride() if z is not None else (0, 0)), *out.stride(),
        FUSED_DT=dt_weight is not None, A_FROM_LOG=a_from_log, HAS_DT_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_STATE_INDICES=state_indices is not None,
        BLOCK_D=block, BLOCK_N=block_n, BLOCK_R=block_r, ONE_TILE=one_tile, ROWS=rows,
        PDL=pdl, num_warps=warps, launch_pdl=pdl,
    )  # fmt: skip
    return out
