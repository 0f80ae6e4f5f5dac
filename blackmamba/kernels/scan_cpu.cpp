// The selective scan on the CPU, compiled once on first use by blackmamba/kernels/scan_cpu.py (which holds the
// reference-facing documentation). Plain C++ with a C ABI and no PyTorch headers, so it builds in about a
// second with any g++ or clang++ and is called through ctypes.
//
// Work is split over (batch, block of W channels); one block runs the whole sequence with its W x N states in
// a small local array. The innermost loops run over the W channels of a block, so they vectorise (W = 32 is
// two AVX-512 or four AVX2 registers; in CPU time at 1x2048x2304 it beat 16 by 1.6x, 64 was no better) and no
// horizontal sum is needed for y. exp and log are polynomial, written
// out here so the compiler can vectorise them (libm's are scalar calls); both are within a few ulp.
//
// Numerics as the reference: dt, the state and every sum in fp32; inputs fp32 or bf16; y fp32 or bf16 (rounded
// to nearest even), the final state fp32.

#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int W = 32;

struct Bf16 {
    uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(Bf16 x) {
    uint32_t b = uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) {
    return x;
}
template <>
inline Bf16 from_float<Bf16>(float x) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    if (x != x) return Bf16{uint16_t(0x7FC0 | (b >> 16 & 0x8000))};
    b += 0x7FFF + ((b >> 16) & 1);
    return Bf16{uint16_t(b >> 16)};
}

inline float bits_to_float(int32_t i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int32_t float_to_bits(float f) {
    int32_t i;
    std::memcpy(&i, &f, 4);
    return i;
}

// exp(x) = 2^k exp(r), k = round(x / ln 2), |r| <= ln(2)/2; Taylor to degree 7 (truncation < 1e-8 relative).
// The input is clamped to [-87.3, 88.3], where 2^k stays a normal float.
inline float exp_poly(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    float k = (x * 1.44269504088896341f + shifter) - shifter;
    float r = x - k * 0.693145751953125f;
    r = r - k * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * bits_to_float((int32_t(k) + 127) << 23);
}

// log(x) for a positive normal x: x = 2^e m, m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(s), s = (m-1)/(m+1).
inline float log_poly(float x) {
    int32_t bits = float_to_bits(x);
    int32_t e = ((bits >> 23) & 0xFF) - 127;
    float m = bits_to_float((bits & 0x7FFFFF) | 0x3F800000);
    bool big = m > 1.41421356f;
    m = big ? m * 0.5f : m;
    float fe = float(big ? e + 1 : e);
    float s = (m - 1.0f) / (m + 1.0f);
    float s2 = s * s;
    float p = 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return fe * 0.693147180559945f + 2.0f * s * p;
}

// softplus as torch computes it: x above 20 passes through, else log1p(exp(x)); log1p(e) = log(1+e) * e / ((1+e) - 1)
// keeps the digits of a tiny e.
inline float softplus(float x) {
    float e = exp_poly(x > 20.0f ? 20.0f : x);
    float v = 1.0f + e;
    float grown = v - 1.0f;
    float ratio = e / (grown == 0.0f ? 1.0f : grown);  // both sides computed: the compiler can vectorise a select
    float l = grown == 0.0f ? e : log_poly(v) * ratio;
    return x > 20.0f ? x : l;
}

inline float silu(float x) { return x / (1.0f + exp_poly(-x)); }

}  // namespace

extern "C" {

// One call's arguments. Strides in elements; the channel dimension of u, delta, z and the state dimension of B, C
// have stride 1; A is (D_in, N), D and delta_bias (D_in,), initial and final state (B, D_in, N), y (B, L, D_in),
// all contiguous. Optional pointers are null when absent.
struct ScanArgs {
    int64_t batch, length, d_inner, d_state;
    int64_t u_sb, u_sl, delta_sb, delta_sl, z_sb, z_sl, B_sb, B_sl, C_sb, C_sl;
    int32_t in_bf16, out_bf16, delta_softplus, threads;
    const void *u, *delta, *z, *B, *C;
    const float *A, *D, *delta_bias, *initial_state;
    void* y;
    float* final_state;
};

// The backward's extra arguments: the incoming gradients (gy fp32 (B, L, D_in), g_final (B, D_in, N) or null) and
// the outputs, fp32 and contiguous. du, ddelta, dz (null without z) and dh0 are written; dA (P, D_in, N), dD and
// ddelta_bias (P, D_in), dB and dC (P, B, L, N) are sums over channels or batch, so each of the P threads adds
// into its own zeroed slice and the caller sums the P slices.
struct ScanGrads {
    int64_t partials;
    const float *gy, *g_final;
    float *du, *ddelta, *dz, *dA, *dD, *ddelta_bias, *dB, *dC, *dh0;
};

}  // extern "C"

namespace {

template <typename In, typename Out>
void scan_block(const ScanArgs& a, int64_t b, int64_t c0, float* h, float* aT) {
    const int64_t N = a.d_state, Din = a.d_inner;
    const int wn = int(Din - c0 < W ? Din - c0 : W);
    const In* u = static_cast<const In*>(a.u) + b * a.u_sb + c0;
    const In* delta = static_cast<const In*>(a.delta) + b * a.delta_sb + c0;
    const In* z = a.z ? static_cast<const In*>(a.z) + b * a.z_sb + c0 : nullptr;
    const In* Bp = static_cast<const In*>(a.B) + b * a.B_sb;
    const In* Cp = static_cast<const In*>(a.C) + b * a.C_sb;
    Out* y = static_cast<Out*>(a.y) + (b * a.length) * Din + c0;

    float bias[W], Dv[W];
    for (int w = 0; w < W; ++w) {
        bias[w] = (w < wn && a.delta_bias) ? a.delta_bias[c0 + w] : 0.0f;
        Dv[w] = (w < wn && a.D) ? a.D[c0 + w] : 0.0f;
    }
    // States and A transposed to [n][w]; lanes past the last channel hold zeros and get dt = 0, so stay zero.
    for (int64_t n = 0; n < N; ++n)
        for (int w = 0; w < W; ++w) {
            const int64_t c = c0 + w;
            aT[n * W + w] = w < wn ? a.A[c * N + n] : 0.0f;
            h[n * W + w] = (w < wn && a.initial_state) ? a.initial_state[(b * Din + c) * N + n] : 0.0f;
        }

    // Loads (a short loop over the valid lanes) apart from the arithmetic (a loop over all W lanes that vectorises).
    float uu[W] = {}, draw[W] = {}, zz[W] = {}, live[W], dt[W], du[W], acc[W], res[W];
    for (int w = 0; w < W; ++w) live[w] = w < wn ? 1.0f : 0.0f;
    for (int64_t t = 0; t < a.length; ++t) {
        for (int w = 0; w < wn; ++w) {
            uu[w] = to_float(u[t * a.u_sl + w]);
            draw[w] = to_float(delta[t * a.delta_sl + w]);
        }
        if (z)
            for (int w = 0; w < wn; ++w) zz[w] = to_float(z[t * a.z_sl + w]);
        if (a.delta_softplus)
            for (int w = 0; w < W; ++w) dt[w] = softplus(draw[w] + bias[w]) * live[w];
        else
            for (int w = 0; w < W; ++w) dt[w] = (draw[w] + bias[w]) * live[w];
        for (int w = 0; w < W; ++w) {
            du[w] = dt[w] * uu[w];
            acc[w] = 0.0f;
        }
        const In* Bt = Bp + t * a.B_sl;
        const In* Ct = Cp + t * a.C_sl;
        for (int64_t n = 0; n < N; ++n) {
            const float bn = to_float(Bt[n]), cn = to_float(Ct[n]);
            float* hn = h + n * W;
            const float* an = aT + n * W;
            for (int w = 0; w < W; ++w) {
                float hv = exp_poly(dt[w] * an[w]) * hn[w] + du[w] * bn;
                hn[w] = hv;
                acc[w] += hv * cn;
            }
        }
        for (int w = 0; w < W; ++w) {
            float out = acc[w] + Dv[w] * uu[w];
            res[w] = z ? out * silu(zz[w]) : out;
        }
        Out* yt = y + t * Din;
        for (int w = 0; w < wn; ++w) yt[w] = from_float<Out>(res[w]);
    }
    if (a.final_state)
        for (int64_t n = 0; n < N; ++n)
            for (int w = 0; w < wn; ++w) a.final_state[(b * Din + c0 + w) * N + n] = h[n * W + w];
}

template <typename In, typename Out>
void scan(const ScanArgs& a) {
    const int64_t blocks = (a.d_inner + W - 1) / W;
    const int64_t tasks = a.batch * blocks;
#pragma omp parallel num_threads(a.threads > 0 ? a.threads : 1)
    {
        std::vector<float> h(a.d_state * W), aT(a.d_state * W);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < tasks; ++i) scan_block<In, Out>(a, i / blocks, (i % blocks) * W, h.data(), aT.data());
    }
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

// sum_w x[w] y[w]; the pragma lets the compiler reorder the sum into vector lanes.
inline float dot_w(const float* x, const float* y) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int w = 0; w < W; ++w) s += x[w] * y[w];
    return s;
}

// The adjoint of one (batch, channel block): the forward again, keeping every state (L x N x W floats), then
// backwards over time with lam = dLoss/dh_t:
//   g = gy * silu(z) (the gradient of the scan's own output s_t = sum_n h_t C_t), lam_t += g C_t,
//   dC_t += sum_w g h_t, dB_t += sum_w lam_t dt u, d(dt) += sum_n lam_t h_{t-1} a_t A + (sum_n lam_t B_t) u,
//   dA += lam_t h_{t-1} a_t dt, du = (sum_n lam_t B_t) dt + g D, lam_{t-1} = a_t lam_t; dh0 = lam_{-1}.
template <typename In>
void scan_block_bwd(const ScanArgs& a, const ScanGrads& g, int64_t b, int64_t c0, int tid, std::vector<float>& buf) {
    const int64_t N = a.d_state, Din = a.d_inner, L = a.length;
    const int wn = int(Din - c0 < W ? Din - c0 : W);
    const In* u = static_cast<const In*>(a.u) + b * a.u_sb + c0;
    const In* delta = static_cast<const In*>(a.delta) + b * a.delta_sb + c0;
    const In* z = a.z ? static_cast<const In*>(a.z) + b * a.z_sb + c0 : nullptr;
    const In* Bp = static_cast<const In*>(a.B) + b * a.B_sb;
    const In* Cp = static_cast<const In*>(a.C) + b * a.C_sb;
    const int64_t row = (b * L) * Din + c0;  // offset of (b, 0, c0) in the (B, L, D_in) gradients
    float* dB = g.dB + ((tid * a.batch + b) * L) * N;
    float* dC = g.dC + ((tid * a.batch + b) * L) * N;

    // buf: states (L+1) x N x W (slot 0 the initial state), dt and dsoftplus L x W, A^T, lam, dA^T N x W.
    buf.resize(((L + 1) * N + 2 * L + 3 * N) * W);
    float* H = buf.data();
    float* dts = H + (L + 1) * N * W;
    float* dsp = dts + L * W;
    float* aT = dsp + L * W;
    float* lam = aT + N * W;
    float* dAT = lam + N * W;

    float bias[W], Dv[W], live[W];
    for (int w = 0; w < W; ++w) {
        bias[w] = (w < wn && a.delta_bias) ? a.delta_bias[c0 + w] : 0.0f;
        Dv[w] = (w < wn && a.D) ? a.D[c0 + w] : 0.0f;
        live[w] = w < wn ? 1.0f : 0.0f;
    }
    for (int64_t n = 0; n < N; ++n)
        for (int w = 0; w < W; ++w) {
            const int64_t c = c0 + w;
            aT[n * W + w] = w < wn ? a.A[c * N + n] : 0.0f;
            H[n * W + w] = (w < wn && a.initial_state) ? a.initial_state[(b * Din + c) * N + n] : 0.0f;
            lam[n * W + w] = (w < wn && g.g_final) ? g.g_final[(b * Din + c) * N + n] : 0.0f;
            dAT[n * W + w] = 0.0f;
        }

    float uu[W] = {}, draw[W] = {}, zz[W] = {}, gy[W] = {}, du[W];
    for (int64_t t = 0; t < L; ++t) {
        for (int w = 0; w < wn; ++w) {
            uu[w] = to_float(u[t * a.u_sl + w]);
            draw[w] = to_float(delta[t * a.delta_sl + w]);
        }
        float* dt = dts + t * W;
        float* sp = dsp + t * W;
        if (a.delta_softplus)
            for (int w = 0; w < W; ++w) {
                float x = draw[w] + bias[w];
                dt[w] = softplus(x) * live[w];
                sp[w] = x > 20.0f ? 1.0f : sigmoid(x);
            }
        else
            for (int w = 0; w < W; ++w) {
                dt[w] = (draw[w] + bias[w]) * live[w];
                sp[w] = 1.0f;
            }
        for (int w = 0; w < W; ++w) du[w] = dt[w] * uu[w];
        const In* Bt = Bp + t * a.B_sl;
        const float* hp = H + t * N * W;
        float* hn = H + (t + 1) * N * W;
        for (int64_t n = 0; n < N; ++n) {
            const float bn = to_float(Bt[n]);
            for (int w = 0; w < W; ++w)
                hn[n * W + w] = exp_poly(dt[w] * aT[n * W + w]) * hp[n * W + w] + du[w] * bn;
        }
    }

    float gs[W], gdt[W], gdu[W], dD[W] = {}, dbias[W] = {};
    for (int64_t t = L - 1; t >= 0; --t) {
        for (int w = 0; w < wn; ++w) {
            uu[w] = to_float(u[t * a.u_sl + w]);
            gy[w] = g.gy[row + t * Din + w];
        }
        if (z)
            for (int w = 0; w < wn; ++w) zz[w] = to_float(z[t * a.z_sl + w]);
        const In* Bt = Bp + t * a.B_sl;
        const In* Ct = Cp + t * a.C_sl;
        const float* hp = H + t * N * W;
        const float* ht = H + (t + 1) * N * W;
        const float* dt = dts + t * W;
        if (z) {
            float s[W] = {};
            for (int64_t n = 0; n < N; ++n) {
                const float cn = to_float(Ct[n]);
                for (int w = 0; w < W; ++w) s[w] += ht[n * W + w] * cn;
            }
            float gz[W];
            for (int w = 0; w < W; ++w) {
                float sg = sigmoid(zz[w]);
                float out = s[w] + Dv[w] * uu[w];
                gs[w] = gy[w] * zz[w] * sg;
                gz[w] = gy[w] * out * sg * (1.0f + zz[w] * (1.0f - sg));
            }
            for (int w = 0; w < wn; ++w) g.dz[row + t * Din + w] = gz[w];
        } else {
            for (int w = 0; w < W; ++w) gs[w] = gy[w];
        }
        for (int w = 0; w < W; ++w) {
            dD[w] += gs[w] * uu[w];
            du[w] = dt[w] * uu[w];
            gdt[w] = 0.0f;
            gdu[w] = 0.0f;
        }
        for (int64_t n = 0; n < N; ++n) {
            const float bn = to_float(Bt[n]), cn = to_float(Ct[n]);
            float* ln = lam + n * W;
            const float* an = aT + n * W;
            float* dan = dAT + n * W;
            for (int w = 0; w < W; ++w) ln[w] += gs[w] * cn;
            dC[t * N + n] += dot_w(gs, ht + n * W);
            dB[t * N + n] += dot_w(ln, du);
            for (int w = 0; w < W; ++w) {
                float decay = exp_poly(dt[w] * an[w]);
                float ga = ln[w] * hp[n * W + w] * decay;
                gdt[w] += ga * an[w];
                dan[w] += ga * dt[w];
                gdu[w] += ln[w] * bn;
                ln[w] *= decay;
            }
        }
        float gdelta[W], gu[W];
        for (int w = 0; w < W; ++w) {
            gdelta[w] = (gdt[w] + gdu[w] * uu[w]) * dsp[t * W + w];
            gu[w] = gdu[w] * dt[w] + gs[w] * Dv[w];
            dbias[w] += gdelta[w];
        }
        for (int w = 0; w < wn; ++w) {
            g.ddelta[row + t * Din + w] = gdelta[w];
            g.du[row + t * Din + w] = gu[w];
        }
    }
    for (int w = 0; w < wn; ++w) {
        g.dD[tid * Din + c0 + w] += dD[w];
        g.ddelta_bias[tid * Din + c0 + w] += dbias[w];
    }
    for (int64_t n = 0; n < N; ++n)
        for (int w = 0; w < wn; ++w) {
            const int64_t c = c0 + w;
            g.dA[(tid * Din + c) * N + n] += dAT[n * W + w];
            g.dh0[(b * Din + c) * N + n] = lam[n * W + w];
        }
}

template <typename In>
void scan_bwd(const ScanArgs& a, const ScanGrads& g) {
    const int64_t blocks = (a.d_inner + W - 1) / W;
    const int64_t tasks = a.batch * blocks;
    const int threads = int(a.threads < 1 ? 1 : (a.threads > g.partials ? g.partials : a.threads));
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        std::vector<float> buf;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < tasks; ++i) scan_block_bwd<In>(a, g, i / blocks, (i % blocks) * W, tid, buf);
    }
}

}  // namespace

extern "C" {

int bm_scan_abi_version() { return 1; }

int bm_scan_fwd(const ScanArgs* a) {
    if (a->in_bf16 && a->out_bf16)
        scan<Bf16, Bf16>(*a);
    else if (!a->in_bf16 && a->out_bf16)
        scan<float, Bf16>(*a);
    else if (!a->in_bf16 && !a->out_bf16)
        scan<float, float>(*a);
    else
        return 1;
    return 0;
}

int bm_scan_bwd(const ScanArgs* a, const ScanGrads* g) {
    if (a->in_bf16)
        scan_bwd<Bf16>(*a, *g);
    else
        scan_bwd<float>(*a, *g);
    return 0;
}

}  // extern "C"
