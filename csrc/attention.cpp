// Blockwise attention on the CPU: forward (online softmax, optional fp32 merge), delta, backward.
// Semantics: ring_attn/backends/protocol.py. Math in fp32; storage fp32/fp16/bf16.
//
// Forward: one task per (sequence, kv head, query block of BM rows), covering the kv head's query heads; key blocks of BN keys that hold no
// visible key are never visited. Per key block: S = Q·Kᵀ (GEMM), mask/softcap/online softmax per row, O += P·V.
//
// Backward (FA1-style, 5 GEMMs per block pair, deterministic without atomics): one task per (sequence, kv
// head, key chunk c); chunk c owns key blocks c, c+NC, c+2NC, ... (striped, so causal work is balanced). A
// task accumulates dK/dV of its key blocks over every query head of the kv head in a fixed order and writes
// them once; it adds dQ contributions into its own fp32 scratch slice dQ_c. Afterwards dQ = scale·Σ_c dQ_c in
// order c = 0..NC-1. NC depends only on the shapes, never on the thread count, so results are bitwise
// reproducible for any number of threads.
#include "attention.h"
#include "gemm.h"

#include <algorithm>
#include <memory>
#include <omp.h>

namespace ra {
namespace {

constexpr int64_t BM = 64;  // query rows per block
constexpr int64_t BN = 64;  // keys per block
const float NEG_INF = -std::numeric_limits<float>::infinity();

struct Seq {
    int64_t start_q, len_q, start_k, len_k, off;
};

RA_INLINE Seq seq_of(const AttnArgs& a, int64_t s) {
    Seq r;
    if (a.starts_q) {
        r.start_q = a.starts_q[s]; r.len_q = a.lens_q[s]; r.start_k = a.starts_k[s]; r.len_k = a.lens_k[s];
    } else {
        r.start_q = 0; r.len_q = a.s_q; r.start_k = 0; r.len_k = a.s_k;
    }
    r.off = a.bottom_right ? r.len_k - r.len_q : a.offset;
    return r;
}

// Visibility (protocol.py): key j visible to query i iff (!causal || j <= i+off) && (left < 0 || j >= i+off-left)
// && (right < 0 || j <= i+off+right). Unclamped per-row bounds; "none" is represented by +-2^62.
constexpr int64_t BIG = int64_t(1) << 62;
RA_INLINE int64_t row_lo(const AttnArgs& a, const Seq& s, int64_t i) { return a.left >= 0 ? i + s.off - a.left : -BIG; }
RA_INLINE int64_t row_hi(const AttnArgs& a, const Seq& s, int64_t i) {
    if (a.causal) return i + s.off;
    return a.right >= 0 ? i + s.off + a.right : BIG;
}
// Rows that see key j: [col_lo(j), col_hi(j)].
RA_INLINE int64_t col_lo(const AttnArgs& a, const Seq& s, int64_t j) {
    if (a.causal) return j - s.off;
    return a.right >= 0 ? j - s.off - a.right : -BIG;
}
RA_INLINE int64_t col_hi(const AttnArgs& a, const Seq& s, int64_t j) { return a.left >= 0 ? j - s.off + a.left : BIG; }

RA_INLINE char* addr(const Ten& t, int64_t b, int64_t row, int64_t h) {
    return t.p + (b * t.sb + row * t.ss + h * t.sh) * dtype_size(t.dt);
}
RA_INLINE float* lse_addr(const Lse& t, int64_t b, int64_t h, int64_t row) { return t.p + b * t.sb + h * t.sh + row; }
RA_INLINE double* lse_addr64(const Lse& t, int64_t b, int64_t h, int64_t row) {
    return reinterpret_cast<double*>(t.p) + b * t.sb + h * t.sh + row;
}
// ALiBi slope of (batch or packed sequence b, query head h); 0 without ALiBi (a zero slope adds nothing).
RA_INLINE float alibi_slope(const AttnArgs& a, int64_t b, int64_t h) {
    return a.alibi ? a.alibi[b * a.alibi_sb + h * a.alibi_sh] : 0.f;
}

// Load `n` rows (row0 ..) of head h into a [rows x ld] fp32 buffer, zero-padding columns d..ld and rows n..rows.
RA_INLINE void load_rows(const Ten& t, int64_t b, int64_t row0, int64_t h, int64_t n, int64_t d, float* buf,
                         int64_t ld, int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
        float* dst = buf + r * ld;
        if (r < n) {
            load_row(addr(t, b, row0 + r, h), t.dt, d, dst);
            for (int64_t c = d; c < ld; ++c) dst[c] = 0.f;
        } else {
            for (int64_t c = 0; c < ld; ++c) dst[c] = 0.f;
        }
    }
}

// Transpose a [rows x ld] buffer's first d columns into [d x rows].
RA_INLINE void transpose(const float* src, int64_t rows, int64_t ld, int64_t d, float* dst) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < d; ++c) dst[c * rows + r] = src[r * ld + c];
}

// A value the compiler must materialise, rounded: no FMA contraction across it. The forward and the backward form
// every score with the same roundings through these helpers, so the backward's exp(score - lse) is the forward's
// probability at any magnitude (a contracted s·scale - lse skipped the product's rounding: at scores near 1e4 a
// one-hot row's probability was not 1, and near ±1e30 it overflowed to inf).
template <class T> RA_INLINE T rounded(T x) {
#if defined(__x86_64__)
    if constexpr (sizeof(T) <= 16) {
        __asm__("" : "+x"(x));  // in its register (one float)
    } else {
        __asm__("" : "+m"(x));  // (8 floats: two registers in the SSE2 clone)
    }
#else
    __asm__("" : "+m"(x));
#endif
    return x;
}
RA_INLINE float scaled(float s, float scale) { return rounded(s * scale); }
RA_INLINE v8f scaled(v8f s, float scale) { return rounded(s * scale); }
// softcap: cap·tanh(s·scale / cap); t is tanh(...) (the backward's derivative needs it)
RA_INLINE float softcap_t(float s, float scale, float cap) { return std::tanh(scaled(s, scale) / cap); }
RA_INLINE float softcap_of(float t, float cap) { return rounded(cap * t); }
RA_INLINE float softcap_fn(float s, float scale, float cap) { return softcap_of(softcap_t(s, scale, cap), cap); }
// ALiBi: score - slope·dist, the product rounded first
template <class T> RA_INLINE T minus_bias(T x, float slope, T dist) { return rounded(x - rounded(slope * dist)); }

// Philox-4x32-10 (Triton's tl.randint4x): counter (ctr_lo, ctr_hi, 0, 0), key (seed_lo, seed_hi).
RA_INLINE void philox4x32(uint64_t seed, uint64_t ctr, uint32_t w[4]) {
    uint32_t c0 = uint32_t(ctr), c1 = uint32_t(ctr >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        const uint64_t pb = uint64_t(c2) * 0xCD9E8D57u, pa = uint64_t(c0) * 0xD2511F53u;
        const uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0, n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
        c1 = uint32_t(pb); c3 = uint32_t(pa); c0 = n0; c2 = n2;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    w[0] = c0; w[1] = c1; w[2] = c2; w[3] = c3;
}

// Dropout multipliers of keys j0 .. j0+n-1 for (query head h, call row r): drop_scale where kept, 0 where
// dropped, written to out[c * stride] (one Philox call per group of four keys).
RA_INLINE void dropout_row(const AttnArgs& a, int64_t h, int64_t r, int64_t j0, int64_t n, float* out,
                           int64_t stride) {
    const uint64_t base = (uint64_t(h) * uint64_t(a.drop_rows) + uint64_t(r + a.drop_row0)) * uint64_t(a.drop_groups);
    uint32_t w[4];
    int64_t group = -1;
    for (int64_t c = 0; c < n; ++c) {
        const int64_t j = j0 + c;
        if ((j >> 2) != group) {
            group = j >> 2;
            philox4x32(a.drop_seed, base + uint64_t(group), w);
        }
        out[c * stride] = w[j & 3] >= a.drop_threshold ? a.drop_scale : 0.f;
    }
}

// The call's query row of row i of sequence s (the dropout contract's r, before drop_row0).
RA_INLINE int64_t call_row(const AttnArgs& a, const Seq& sq, int64_t s, int64_t i) {
    return a.starts_q ? sq.start_q + i : s * a.s_q + i;
}

// ALiBi distances |base - c| for the 8 columns c = c0 .. c0+7 (base = i + off - j0 of the row), as floats.
RA_INLINE v8f alibi_dist8(float base, int64_t c0) {
    const v8f x = splat8(base) - (__builtin_convertvector(iota8(), v8f) + float(c0));
    return x < 0.f ? -x : x;
}

// Forward rows: raw scores S[r][0..BN) -> probabilities in place (0 outside the row's visible columns
// [lo[r], hi[r]]), updating the running max m and sum l, and rescaling the output row by exp(m_old - m_new).
// ALiBi (slope != 0): column c of row r gets -slope·|rbase + r - c| (rbase = i0 + off - j0) after the scale and
// softcap, before masking; the choice is made once per row.
RA_MULTIVERSION
static void fwd_rows(float* S, int64_t rows, const int64_t* lo, const int64_t* hi, float scale, float cap,
                     float slope, int64_t rbase, float* m, float* l, float* O, int64_t dp) {
    const v8f ninf = splat8(NEG_INF);
    for (int64_t r = 0; r < rows; ++r) {
        float* srow = S + r * BN;
        const int64_t a = lo[r], z = hi[r];
        if (a > z) {  // no visible key in this block: probabilities 0, state unchanged
            for (int64_t c = 0; c < BN; ++c) srow[c] = 0.f;
            continue;
        }
        if (cap > 0.f)
            for (int64_t c = a; c <= z; ++c) srow[c] = softcap_fn(srow[c], scale, cap);
        const v8i va = v8i{} + int32_t(a), vz = v8i{} + int32_t(z);
        v8f vmax = ninf;
        if (slope == 0.f) {
            for (int64_t c = 0; c < BN; c += 8) {
                const v8i idx = iota8() + int32_t(c);
                v8f x = loadu8(srow + c);
                if (cap <= 0.f) x = scaled(x, scale);
                x = (idx >= va && idx <= vz) ? x : ninf;
                storeu8(srow + c, x);
                vmax = vmax > x ? vmax : x;
            }
        } else {
            const float base = float(rbase + r);
            for (int64_t c = 0; c < BN; c += 8) {
                const v8i idx = iota8() + int32_t(c);
                v8f x = loadu8(srow + c);
                if (cap <= 0.f) x = scaled(x, scale);
                x = minus_bias(x, slope, alibi_dist8(base, c));
                x = (idx >= va && idx <= vz) ? x : ninf;
                storeu8(srow + c, x);
                vmax = vmax > x ? vmax : x;
            }
        }
        float mx = vmax[0];
        for (int e = 1; e < 8; ++e) mx = std::max(mx, vmax[e]);
        const float m_old = m[r];
        const float m_new = std::max(m_old, mx);
        v8f vsum = v8f{};
        for (int64_t c = 0; c < BN; c += 8) {
            const v8f e = exp_v8(loadu8(srow + c) - m_new);  // exp(-inf) = 0 for masked columns
            storeu8(srow + c, e);
            vsum += e;
        }
        float sum = 0.f;
        for (int e = 0; e < 8; ++e) sum += vsum[e];
        const float alpha = m_old == NEG_INF ? 0.f : std::exp(m_old - m_new);
        m[r] = m_new;
        l[r] = l[r] * alpha + sum;
        if (alpha != 1.f) {
            float* orow = O + r * dp;
            for (int64_t c = 0; c < dp; c += 8) storeu8(orow + c, loadu8(orow + c) * alpha);
        }
    }
}

// One query row's epilogue: out = o * inv; lse = m + log l (lr == 0: no visible key, lse -inf, output 0; a
// NaN or inf score carries NaN/inf on: a NaN lr once read as "no key", lse -inf, which a merge then dropped).
// merge: fold the row into the running (out, lse) by LSE weighting. T = double (the ring's running LSE) adds
// m and log l, and merges, without rounding a large LSE to fp32 (an ulp of 650 is 6e-5, which the weights
// would carry); the exponentials stay fp32, their arguments are small.
template <typename T>
void finish_row(T* lp, float mr, float lr, const float* o, float inv, char* op, int dt, int64_t d, float* orow,
                bool merge) {
    const T lse_blk = lr == 0.f ? T(NEG_INF) : T(mr) + T(std::log(lr));
    if (!merge) {
        for (int64_t c = 0; c < d; ++c) orow[c] = o[c] * inv;
        store_row(op, dt, d, orow);
        *lp = lse_blk;
        return;
    }
    if (lse_blk == T(NEG_INF)) return;
    const T lse_acc = *lp;
    float w_acc, w_blk;
    T lse_new;
    if (lse_acc == T(NEG_INF)) {
        w_acc = 0.f; w_blk = 1.f; lse_new = lse_blk;
    } else {
        const T mx = std::max(lse_acc, lse_blk);
        lse_new = mx + T(std::log1p(std::exp(-float(std::fabs(lse_acc - lse_blk)))));
        w_acc = std::exp(float(lse_acc - lse_new));
        w_blk = std::exp(float(lse_blk - lse_new));
    }
    load_row(op, dt, d, orow);
    for (int64_t c = 0; c < d; ++c) orow[c] = orow[c] * w_acc + o[c] * inv * w_blk;
    store_row(op, dt, d, orow);
    *lp = lse_new;
}

}  // namespace

void attention_forward(const AttnArgs& a, const Ten& q, const Ten& k, const Ten& v, const Ten& out, const Lse& lse,
                       bool merge, int num_threads) {
    const int64_t d = a.d, dp = round_up(d, 16), group = a.h_q / a.h_kv;
    const int64_t max_q = a.starts_q ? a.max_len_q : a.s_q;
    const int64_t nqb = (max_q + BM - 1) / BM;
    // One task per (sequence, kv head, query block): the K/V blocks it converts are shared by the `group`
    // query heads of the kv head.
    const int64_t ntasks = a.nseq * a.h_kv * nqb;
    if (ntasks == 0) return;
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<float> Qb(group * BM * dp), Kt(dp * BN), Vb(BN * dp), S(BM * BN), O(group * BM * dp),
            m(group * BM), l(group * BM), orow(dp), keep(BN);
        std::vector<int64_t> lo(BM), hi(BM);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < ntasks; ++task) {
            // heaviest (last) query blocks first: better balance under causal masking
            const int64_t qb = nqb - 1 - task % nqb;
            const int64_t hk = (task / nqb) % a.h_kv, s = task / (nqb * a.h_kv);
            const Seq sq = seq_of(a, s);
            const int64_t i0 = qb * BM;
            if (i0 >= sq.len_q) continue;
            const int64_t mq = std::min(BM, sq.len_q - i0);
            // keys visible to some row of the block
            int64_t klo = std::max<int64_t>(0, row_lo(a, sq, i0));
            int64_t khi = std::min<int64_t>(sq.len_k - 1, row_hi(a, sq, i0 + mq - 1));
            std::fill(m.begin(), m.end(), NEG_INF);
            std::fill(l.begin(), l.end(), 0.f);
            std::fill(O.begin(), O.end(), 0.f);
            if (klo <= khi) {
                for (int64_t g = 0; g < group; ++g)
                    load_rows(q, s, sq.start_q + i0, hk * group + g, mq, d, Qb.data() + g * BM * dp, dp, BM);
                for (int64_t kb = klo / BN; kb <= khi / BN; ++kb) {
                    const int64_t j0 = kb * BN, nb = std::min(BN, sq.len_k - j0);
                    // K block transposed to [d x BN] (zero-padded columns), V block [BN x dp]
                    for (int64_t c = 0; c < nb; ++c) {
                        load_row(addr(k, s, sq.start_k + j0 + c, hk), k.dt, d, orow.data());
                        for (int64_t e = 0; e < d; ++e) Kt[e * BN + c] = orow[e];
                    }
                    for (int64_t c = nb; c < BN; ++c)
                        for (int64_t e = 0; e < d; ++e) Kt[e * BN + c] = 0.f;
                    load_rows(v, s, sq.start_k + j0, hk, nb, d, Vb.data(), dp, nb);
                    for (int64_t r = 0; r < mq; ++r) {
                        lo[r] = std::max<int64_t>(row_lo(a, sq, i0 + r) - j0, 0);
                        hi[r] = std::min<int64_t>(row_hi(a, sq, i0 + r) - j0, nb - 1);
                    }
                    for (int64_t g = 0; g < group; ++g) {
                        float* Og = O.data() + g * BM * dp;
                        gemm(mq, BN, d, Qb.data() + g * BM * dp, dp, Kt.data(), BN, S.data(), BN, false);
                        fwd_rows(S.data(), mq, lo.data(), hi.data(), a.scale, a.softcap,
                                 alibi_slope(a, s, hk * group + g), i0 + sq.off - j0, m.data() + g * BM,
                                 l.data() + g * BM, Og, dp);
                        if (a.dropout) {  // after the row sums (the LSE is the softmax's before dropout)
                            for (int64_t r = 0; r < mq; ++r) {
                                dropout_row(a, hk * group + g, call_row(a, sq, s, i0 + r), j0, nb, keep.data(), 1);
                                float* srow = S.data() + r * BN;
                                // kept: the probability (drop_scale is applied once, in the epilogue)
                                for (int64_t c = 0; c < nb; ++c) srow[c] = keep[c] != 0.f ? srow[c] : 0.f;
                            }
                        }
                        gemm(mq, dp, nb, S.data(), BN, Vb.data(), dp, Og, dp, true);
                    }
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                const int64_t h = hk * group + g;
                for (int64_t r = 0; r < mq; ++r) {
                    const int64_t row = sq.start_q + i0 + r;
                    const float mr = m[g * BM + r], lr = l[g * BM + r];
                    const float inv = lr == 0.f ? 0.f : (a.dropout ? a.drop_scale : 1.f) / lr;
                    const float* o = O.data() + (g * BM + r) * dp;
                    char* op = addr(out, s, row, h);
                    if (lse.f64)
                        finish_row(lse_addr64(lse, s, h, row), mr, lr, o, inv, op, out.dt, d, orow.data(), merge);
                    else
                        finish_row(lse_addr(lse, s, h, row), mr, lr, o, inv, op, out.dt, d, orow.data(), merge);
                }
            }
        }
    }
}

void attention_delta(const Ten& dout, const Ten& out, const Lse& delta, const Lse* dlse, int64_t b, int64_t s,
                     int64_t h, int64_t d, int num_threads) {
    const int64_t n = b * h * s;
    if (n == 0) return;
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<float> x(d), y(d);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n; ++t) {
            const int64_t i = t % s, hh = (t / s) % h, bb = t / (s * h);
            load_row(addr(dout, bb, i, hh), dout.dt, d, x.data());
            load_row(addr(out, bb, i, hh), out.dt, d, y.data());
            float acc = 0.f;
            for (int64_t c = 0; c < d; ++c) acc += x[c] * y[c];
            if (dlse) acc -= *lse_addr(*dlse, bb, hh, i);
            *lse_addr(delta, bb, hh, i) = acc;
        }
    }
}

namespace {

// Backward element-wise step on transposed blocks ([BN x BM]: key rows, query columns), in place:
// St (raw scores) -> Pt = exp(s - lse) (0 outside the key's visible query columns [ra[c], rz[c]]),
// dPt -> dSt = Pt · (dPt - delta) (· (1 - tanh²) with a softcap). ALiBi (slope != 0): s of key column c and
// query row r gets -slope·|cbase - c + r| (cbase = i0 + off - j0) before the exp; dS is otherwise unchanged.
RA_MULTIVERSION
static void bwd_elems(float* St, float* dPt, int64_t nb, const int64_t* ra, const int64_t* rz, const float* lse,
                      const float* delta, float scale, float cap, float slope, int64_t cbase) {
    for (int64_t c = 0; c < nb; ++c) {
        float* srow = St + c * BM;
        float* drow = dPt + c * BM;
        const int64_t a = ra[c], z = rz[c];
        if (a > z) {
            for (int64_t r = 0; r < BM; ++r) { srow[r] = 0.f; drow[r] = 0.f; }
            continue;
        }
        if (cap > 0.f && slope == 0.f) {
            for (int64_t r = 0; r < BM; ++r) {
                const float t = softcap_t(srow[r], scale, cap);
                const float p = (r >= a && r <= z) ? exp_f32(softcap_of(t, cap) - lse[r]) : 0.f;
                srow[r] = p;
                drow[r] = p * (drow[r] - delta[r]) * (1.f - t * t);
            }
        } else if (cap > 0.f) {
            const float nb0 = float(cbase - c);  // |cbase - c + r| = |nb0 + r|
            for (int64_t r = 0; r < BM; ++r) {
                const float t = softcap_t(srow[r], scale, cap);
                const float x = minus_bias(softcap_of(t, cap), slope, std::fabs(nb0 + float(r)));
                const float p = (r >= a && r <= z) ? exp_f32(x - lse[r]) : 0.f;
                srow[r] = p;
                drow[r] = p * (drow[r] - delta[r]) * (1.f - t * t);
            }
        } else if (slope != 0.f) {
            const v8i va = v8i{} + int32_t(a), vz = v8i{} + int32_t(z);
            const float base = -float(cbase - c);  // |cbase - c + r| = |base - r|
            for (int64_t r = 0; r < BM; r += 8) {
                const v8i idx = iota8() + int32_t(r);
                v8f p = exp_v8(minus_bias(scaled(loadu8(srow + r), scale), slope, alibi_dist8(base, r)) -
                               loadu8(lse + r));
                p = (idx >= va && idx <= vz) ? p : v8f{};
                storeu8(srow + r, p);
                storeu8(drow + r, p * (loadu8(drow + r) - loadu8(delta + r)));
            }
        } else {
            const v8i va = v8i{} + int32_t(a), vz = v8i{} + int32_t(z);
            for (int64_t r = 0; r < BM; r += 8) {
                const v8i idx = iota8() + int32_t(r);
                v8f p = exp_v8(scaled(loadu8(srow + r), scale) - loadu8(lse + r));
                p = (idx >= va && idx <= vz) ? p : v8f{};
                storeu8(srow + r, p);
                storeu8(drow + r, p * (loadu8(drow + r) - loadu8(delta + r)));
            }
        }
    }
}

}  // namespace

void attention_backward(const AttnArgs& a, const Ten& dout, const Ten& q, const Ten& k, const Ten& v, const Lse& lse,
                        const Lse& delta, const Ten& dq, const Ten& dk, const Ten& dv, bool accumulate,
                        int num_threads) {
    const int64_t d = a.d, dp = round_up(d, 16), group = a.h_q / a.h_kv;
    const int64_t max_k = a.starts_q ? a.max_len_k : a.s_k;
    const int64_t nkb = (max_k + BN - 1) / BN;
    const int64_t base = a.nseq * a.h_kv;
    if (base == 0) return;
    // rows of the dQ scratch: every q row index the sequences can address
    const int64_t qrows = a.starts_q ? a.s_q : a.nseq * a.s_q;
    const int64_t slice = qrows * a.h_q * dp;  // floats per chunk
    int64_t NC = std::max<int64_t>(1, std::min<int64_t>(nkb, (16 + base - 1) / base));
    while (NC > 1 && NC * slice * 4 > (int64_t(512) << 20)) --NC;
    std::unique_ptr<float[]> dqs_owner(new float[size_t(NC * slice)]);  // zeroed in parallel below
    float* dqs = dqs_owner.get();
    const int64_t ntasks = base * NC;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < NC * slice; ++i) dqs[i] = 0.f;

        // A task walks its key blocks in groups of up to KG blocks whose K/V (fp32) and dK/dV accumulators stay
        // resident; each query block (per query head) is then converted once per group, not once per key block.
        constexpr int64_t KG = 16;
        // dK/dV sums run over every (query head, query block) pair: they go into per-block partial sums that are
        // folded into dKc/dVc every FOLD pairs (blocked summation: fp32 error grows with n/FOLD + FOLD, not n).
        constexpr int FOLD = 16;
        std::vector<float> Kc(KG * BN * dp), Vc(KG * BN * dp), dKc(KG * BN * dp), dVc(KG * BN * dp);
        std::vector<float> dKp(KG * BN * dp), dVp(KG * BN * dp);
        std::vector<int> npairs(KG);
        std::vector<float> Qb(BM * dp), Qt(dp * BM), dOb(BM * dp), dOt(dp * BM);
        std::vector<float> St(BN * BM), dPt(BN * BM), Dt(a.dropout ? BN * BM : 0), lsev(BM), delv(BM), row(dp);
        std::vector<int64_t> ra(BN), rz(BN), kbs(KG);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < ntasks; ++task) {
            const int64_t c = task % NC, hk = (task / NC) % a.h_kv, s = task / (NC * a.h_kv);
            const Seq sq = seq_of(a, s);
            float* dqc = dqs + c * slice;
            const int64_t qrow0 = a.starts_q ? sq.start_q : s * a.s_q;  // scratch row of the sequence's row 0
            for (int64_t kb_first = c; kb_first * BN < sq.len_k; kb_first += KG * NC) {
                int64_t nk = 0;
                for (int64_t kb = kb_first; kb * BN < sq.len_k && nk < KG; kb += NC) kbs[nk++] = kb;
                std::fill(dKc.begin(), dKc.begin() + nk * BN * dp, 0.f);
                std::fill(dVc.begin(), dVc.begin() + nk * BN * dp, 0.f);
                std::fill(dKp.begin(), dKp.begin() + nk * BN * dp, 0.f);
                std::fill(dVp.begin(), dVp.begin() + nk * BN * dp, 0.f);
                std::fill(npairs.begin(), npairs.end(), 0);
                auto fold = [&](int64_t x) {
                    float* kc = dKc.data() + x * BN * dp; float* kp = dKp.data() + x * BN * dp;
                    float* vc = dVc.data() + x * BN * dp; float* vp = dVp.data() + x * BN * dp;
                    for (int64_t e = 0; e < BN * dp; ++e) { kc[e] += kp[e]; kp[e] = 0.f; vc[e] += vp[e]; vp[e] = 0.f; }
                    npairs[x] = 0;
                };
                // query rows that see some key of the group
                int64_t ilo = BIG, ihi = -BIG;
                for (int64_t x = 0; x < nk; ++x) {
                    const int64_t j0 = kbs[x] * BN, nb = std::min(BN, sq.len_k - j0);
                    const int64_t lo_ = std::max<int64_t>(0, col_lo(a, sq, j0));
                    const int64_t hi_ = std::min<int64_t>(sq.len_q - 1, col_hi(a, sq, j0 + nb - 1));
                    if (lo_ <= hi_) { ilo = std::min(ilo, lo_); ihi = std::max(ihi, hi_); }
                    load_rows(k, s, sq.start_k + j0, hk, nb, d, Kc.data() + x * BN * dp, dp, BN);
                    load_rows(v, s, sq.start_k + j0, hk, nb, d, Vc.data() + x * BN * dp, dp, BN);
                }
                for (int64_t h = hk * group; ilo <= ihi && h < (hk + 1) * group; ++h) {
                    for (int64_t qb = ilo / BM; qb <= ihi / BM; ++qb) {
                        const int64_t i0 = qb * BM, mq = std::min(BM, sq.len_q - i0);
                        load_rows(q, s, sq.start_q + i0, h, mq, d, Qb.data(), dp, BM);
                        load_rows(dout, s, sq.start_q + i0, h, mq, d, dOb.data(), dp, BM);
                        transpose(Qb.data(), BM, dp, d, Qt.data());
                        transpose(dOb.data(), BM, dp, d, dOt.data());
                        for (int64_t r = 0; r < BM; ++r) {
                            if (r < mq) {
                                const float L = *lse_addr(lse, s, h, sq.start_q + i0 + r);
                                lsev[r] = L == NEG_INF ? std::numeric_limits<float>::infinity() : L;
                                delv[r] = *lse_addr(delta, s, h, sq.start_q + i0 + r);
                            } else {
                                lsev[r] = std::numeric_limits<float>::infinity();
                                delv[r] = 0.f;
                            }
                        }
                        float* dst = dqc + ((qrow0 + i0) * a.h_q + h) * dp;
                        for (int64_t x = 0; x < nk; ++x) {
                            const int64_t j0 = kbs[x] * BN, nb = std::min(BN, sq.len_k - j0);
                            // skip the pair when no row of this query block sees a key of this block
                            if (std::max<int64_t>(i0, col_lo(a, sq, j0)) >
                                std::min<int64_t>(i0 + mq - 1, col_hi(a, sq, j0 + nb - 1)))
                                continue;
                            const float* Kb = Kc.data() + x * BN * dp;
                            const float* Vb = Vc.data() + x * BN * dp;
                            for (int64_t cc = 0; cc < nb; ++cc) {
                                ra[cc] = std::max<int64_t>(col_lo(a, sq, j0 + cc) - i0, 0);
                                rz[cc] = std::min<int64_t>(col_hi(a, sq, j0 + cc) - i0, mq - 1);
                            }
                            gemm(nb, BM, d, Kb, dp, Qt.data(), BM, St.data(), BM, false);
                            gemm(nb, BM, d, Vb, dp, dOt.data(), BM, dPt.data(), BM, false);
                            if (a.dropout) {  // dP of the dropped output: dO·Vᵀ times keep / (1 - p)
                                for (int64_t r = 0; r < mq; ++r)
                                    dropout_row(a, h, call_row(a, sq, s, i0 + r), j0, nb, Dt.data() + r, BM);
                                for (int64_t e = 0; e < nb * BM; ++e) dPt[e] *= Dt[e];
                            }
                            bwd_elems(St.data(), dPt.data(), nb, ra.data(), rz.data(), lsev.data(), delv.data(),
                                      a.scale, a.softcap, alibi_slope(a, s, h), i0 + sq.off - j0);
                            if (a.dropout)  // dV takes the dropped probabilities
                                for (int64_t e = 0; e < nb * BM; ++e) St[e] *= Dt[e];
                            gemm(nb, dp, mq, St.data(), BM, dOb.data(), dp, dVp.data() + x * BN * dp, dp, true);
                            gemm(nb, dp, mq, dPt.data(), BM, Qb.data(), dp, dKp.data() + x * BN * dp, dp, true);
                            if (++npairs[x] == FOLD) fold(x);
                            // dQ_c[rows, h] += dS · K = dStᵀ · K
                            gemm_tn(mq, dp, nb, dPt.data(), BM, Kb, dp, dst, a.h_q * dp, true);
                        }
                    }
                }
                for (int64_t x = 0; x < nk; ++x) {
                    fold(x);
                    const int64_t j0 = kbs[x] * BN, nb = std::min(BN, sq.len_k - j0);
                    for (int64_t cc = 0; cc < nb; ++cc) {
                        const int64_t krow = sq.start_k + j0 + cc;
                        for (int pass = 0; pass < 2; ++pass) {
                            const Ten& t = pass == 0 ? dk : dv;
                            const float* acc = (pass == 0 ? dKc.data() : dVc.data()) + (x * BN + cc) * dp;
                            const float mul = pass == 0 ? a.scale : 1.f;
                            char* p = addr(t, s, krow, hk);
                            if (accumulate) {
                                load_row(p, t.dt, d, row.data());
                                for (int64_t e = 0; e < d; ++e) row[e] += acc[e] * mul;
                            } else {
                                for (int64_t e = 0; e < d; ++e) row[e] = acc[e] * mul;
                            }
                            store_row(p, t.dt, d, row.data());
                        }
                    }
                }
            }
        }
        // dQ = scale · Σ_c dQ_c (fixed order), for every row of every sequence
        const int64_t max_q = a.starts_q ? a.max_len_q : a.s_q;
        const int64_t nrt = a.nseq * a.h_q * max_q;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nrt; ++t) {
            const int64_t i = t % max_q, h = (t / max_q) % a.h_q, s = t / (max_q * a.h_q);
            const Seq sq = seq_of(a, s);
            if (i >= sq.len_q) continue;
            const int64_t qrow0 = a.starts_q ? sq.start_q : s * a.s_q;
            const float* src = dqs + ((qrow0 + i) * a.h_q + h) * dp;
            for (int64_t e = 0; e < d; ++e) row[e] = src[e];
            for (int64_t cc = 1; cc < NC; ++cc)
                for (int64_t e = 0; e < d; ++e) row[e] += src[cc * slice + e];
            char* p = addr(dq, s, sq.start_q + i, h);
            if (accumulate) {
                std::vector<float>& cur = Qb;  // scratch
                load_row(p, dq.dt, d, cur.data());
                for (int64_t e = 0; e < d; ++e) cur[e] += row[e] * a.scale;
                store_row(p, dq.dt, d, cur.data());
            } else {
                for (int64_t e = 0; e < d; ++e) row[e] *= a.scale;
                store_row(p, dq.dt, d, row.data());
            }
        }
    }
}

}  // namespace ra
