// Fused RoPE forward/backward on the CPU (semantics: ring_attn/backends/protocol.py, `rope`).
// One task per token (b, s): its cos/sin are computed once (angle mode: float64 angle reduced modulo 2π with a
// three-piece constant, then sin/cos in the compute type) and applied to every q and k head.
#include "rope.h"

#include <omp.h>

namespace ra {
namespace {

template <typename T>
RA_INLINE void load_strided(const char* p, int dt, int64_t n, int64_t stride, T* dst) {
    switch (dt) {
        case F32: { auto s = reinterpret_cast<const float*>(p); for (int64_t i = 0; i < n; ++i) dst[i] = T(s[i * stride]); } break;
        case F64: { auto s = reinterpret_cast<const double*>(p); for (int64_t i = 0; i < n; ++i) dst[i] = T(s[i * stride]); } break;
        case F16: { auto s = reinterpret_cast<const uint16_t*>(p); for (int64_t i = 0; i < n; ++i) dst[i] = T(half_to_float(s[i * stride])); } break;
        case BF16: { auto s = reinterpret_cast<const uint16_t*>(p); for (int64_t i = 0; i < n; ++i) dst[i] = T(bf16_to_float(s[i * stride])); } break;
        default: break;
    }
}

template <typename T>
RA_INLINE void store_strided(char* p, int dt, int64_t n, int64_t stride, const T* src) {
    switch (dt) {
        case F32: { auto d = reinterpret_cast<float*>(p); for (int64_t i = 0; i < n; ++i) d[i * stride] = float(src[i]); } break;
        case F64: { auto d = reinterpret_cast<double*>(p); for (int64_t i = 0; i < n; ++i) d[i * stride] = double(src[i]); } break;
        case F16: { auto d = reinterpret_cast<uint16_t*>(p); for (int64_t i = 0; i < n; ++i) d[i * stride] = float_to_half(float(src[i])); } break;
        case BF16: { auto d = reinterpret_cast<uint16_t*>(p); for (int64_t i = 0; i < n; ++i) d[i * stride] = float_to_bf16(float(src[i])); } break;
        default: break;
    }
}

RA_INLINE const char* at4(const RTen& t, int64_t b, int64_t s, int64_t h) {
    return t.p + (b * t.sb + s * t.ss + h * t.sh) * dtype_size(t.dt);
}

// Pair members of a head row: (offset of x1, offset of x2, stride between consecutive pairs), in elements.
RA_INLINE void pair_layout(bool interleaved, int64_t half, int64_t sd, int64_t& o1, int64_t& o2, int64_t& st) {
    if (interleaved) { o1 = 0; o2 = sd; st = 2 * sd; }
    else { o1 = 0; o2 = half * sd; st = sd; }
}

template <typename T>
RA_MULTIVERSION static void rotate(const T* x1, const T* x2, const T* c1, const T* s1, const T* c2, const T* s2,
                                   T* r1, T* r2, int64_t n) {
    for (int64_t f = 0; f < n; ++f) {
        r1[f] = x1[f] * c1[f] - x2[f] * s1[f];
        r2[f] = x2[f] * c2[f] + x1[f] * s2[f];
    }
}

template <typename T>
void rope_impl(const RopeArgs& a, int num_threads) {
    const int64_t ntok = a.B * a.S, half = a.rot / 2, npass = a.D - a.rot;
    const size_t esz = sizeof(T);
    (void)esz;
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<T> c1(half), s1(half), c2(half), s2(half), x1(half), x2(half), r1(half), r2(half), y1(half),
            y2(half), dth(half), pass(npass > 0 ? npass : 1);
#pragma omp for schedule(static)
        for (int64_t tok = 0; tok < ntok; ++tok) {
            const int64_t bi = tok / a.S, si = tok % a.S;
            if (a.use_table) {
                int64_t o1, o2, st;
                pair_layout(a.interleaved, half, 1, o1, o2, st);
                const char* cb = a.cos.p + (bi * a.cos.sb + si * a.cos.ss) * dtype_size(a.cos.dt);
                const char* sb = a.sin.p + (bi * a.sin.sb + si * a.sin.ss) * dtype_size(a.sin.dt);
                const int64_t cd = a.cos.sd * dtype_size(a.cos.dt), sdd = a.sin.sd * dtype_size(a.sin.dt);
                load_strided(cb + o1 * cd, a.cos.dt, half, st * a.cos.sd, c1.data());
                load_strided(cb + o2 * cd, a.cos.dt, half, st * a.cos.sd, c2.data());
                load_strided(sb + o1 * sdd, a.sin.dt, half, st * a.sin.sd, s1.data());
                load_strided(sb + o2 * sdd, a.sin.dt, half, st * a.sin.sd, s2.data());
            } else {
                const char* pp = a.pos + (bi * a.pos_sb + si * a.pos_ss) * dtype_size(a.pos_dt);
                const double pos = a.pos_dt == I64 ? double(*reinterpret_cast<const int64_t*>(pp))
                                                    : double(*reinterpret_cast<const int32_t*>(pp));
                for (int64_t f = 0; f < half; ++f) {
                    const double inv = a.inv_dt == F64 ? reinterpret_cast<const double*>(a.inv)[f]
                                                       : double(reinterpret_cast<const float*>(a.inv)[f]);
                    const double ang = pos * inv;
                    // 2π = C1 + C2 + C3, each exactly a float32: n·Ci is exact in float64 for n < 2^29
                    const double n = std::floor(ang * 0.15915494309189535 + 0.5);
                    double red = ang - n * 6.2831854820251465;
                    red = red - n * -1.7484555314695172e-07;
                    red = red - n * -6.8604980400235275e-15;
                    const T rt = T(red);
                    c1[f] = T(std::cos(rt) * T(a.scaling));
                    s1[f] = T(std::sin(rt) * T(a.scaling));
                }
                c2 = c1;
                s2 = s1;
            }
            if (a.backward) {  // transpose of [[c1, -s1], [s2, c2]]: (s1, s2) -> (-s2, -s1)
                for (int64_t f = 0; f < half; ++f) {
                    const T t1 = s1[f];
                    s1[f] = -s2[f];
                    s2[f] = -t1;
                }
            }
            if (a.need_dtheta) std::fill(dth.begin(), dth.end(), T(0));
            for (int which = 0; which < 2; ++which) {
                const RTen& x = which == 0 ? a.q : a.k;
                const RTen& o = which == 0 ? a.qo : a.ko;
                const RTen& y = which == 0 ? a.qy : a.ky;
                const int64_t H = which == 0 ? a.HQ : a.HK;
                int64_t xo1, xo2, xst, oo1, oo2, ost, yo1 = 0, yo2 = 0, yst = 0;
                pair_layout(a.interleaved, half, x.sd, xo1, xo2, xst);
                pair_layout(a.interleaved, half, o.sd, oo1, oo2, ost);
                if (a.need_dtheta) pair_layout(a.interleaved, half, y.sd, yo1, yo2, yst);
                const int64_t xs = dtype_size(x.dt), os = dtype_size(o.dt), ys = dtype_size(y.dt);
                for (int64_t h = 0; h < H; ++h) {
                    const char* xb = at4(x, bi, si, h);
                    char* ob = const_cast<char*>(at4(o, bi, si, h));
                    load_strided(xb + xo1 * xs, x.dt, half, xst, x1.data());
                    load_strided(xb + xo2 * xs, x.dt, half, xst, x2.data());
                    if (npass > 0 && a.copy_pass) load_strided(xb + a.rot * x.sd * xs, x.dt, npass, x.sd, pass.data());
                    rotate<T>(x1.data(), x2.data(), c1.data(), s1.data(), c2.data(), s2.data(), r1.data(), r2.data(), half);
                    store_strided(ob + oo1 * os, o.dt, half, ost, r1.data());
                    store_strided(ob + oo2 * os, o.dt, half, ost, r2.data());
                    if (npass > 0 && a.copy_pass) store_strided(ob + a.rot * o.sd * os, o.dt, npass, o.sd, pass.data());
                    if (a.need_dtheta) {
                        const char* yb = at4(y, bi, si, h);
                        load_strided(yb + yo1 * ys, y.dt, half, yst, y1.data());
                        load_strided(yb + yo2 * ys, y.dt, half, yst, y2.data());
                        for (int64_t f = 0; f < half; ++f) dth[f] += x2[f] * y1[f] - x1[f] * y2[f];
                    }
                }
            }
            if (a.need_dtheta) {
                char* dp = a.dtheta + tok * half * dtype_size(a.dtheta_dt);
                store_strided(dp, a.dtheta_dt, half, 1, dth.data());
            }
        }
    }
}

}  // namespace

void rope(const RopeArgs& a, int num_threads) {
    if (a.B * a.S == 0) return;
    if (a.q.dt == F64) rope_impl<double>(a, num_threads);
    else rope_impl<float>(a, num_threads);
}

}  // namespace ra
