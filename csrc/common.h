// Shared pieces of the native CPU backend: dtype codes and conversions (bit operations, no libtorch),
// a vectorisable exp, and a small register-blocked fp32 GEMM.
//
// Portability: everything is plain C++17. On x86-64 with GCC/Clang the hot functions are compiled three times
// (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, baseline SSE2) with `target_clones`, and the loader picks the
// best one for the running CPU, so the extension is built without any -march flag and runs anywhere.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace ra {

// dtype codes shared with ring_attn/backends/native.py
enum DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3, I32 = 4, I64 = 5 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(RA_NO_MULTIVERSION)
#define RA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RA_MULTIVERSION
#endif
#define RA_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------------------
// fp16 / bf16 <-> fp32 by bit operations (round to nearest even; NaN/Inf/subnormals handled)

#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define RA_HAS_BIT_CAST 1
#endif
#endif
#ifdef RA_HAS_BIT_CAST  // a plain register move: keeps the loops that use it vectorisable
RA_INLINE float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
RA_INLINE uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }
#else
RA_INLINE float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
RA_INLINE uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
#endif

RA_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

RA_INLINE uint16_t float_to_bf16(float f) {
    uint32_t u = float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

RA_INLINE float half_to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
    if (exp == 0) {
        // zero or subnormal: man * 2^-24, exact in fp32
        float v = float(man) * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

RA_INLINE uint16_t float_to_half(float f) {
    uint32_t u = float_to_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);      // nan
    if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);     // rounds to >= 65520: inf
    if (a < 0x38800000u) {                                     // below 2^-14: subnormal half (or zero)
        // value * 2^24 rounded to nearest even integer = the half's mantissa bits
        float v = bits_to_float(a) * 16777216.0f;              // exact (power-of-two scale)
        float r = std::nearbyint(v);                           // default rounding mode: ties to even
        return uint16_t(sign | uint32_t(r));
    }
    uint32_t e = a + 0xc8000000u;  // rebias exponent (127 -> 15): subtract 112 << 23
    e += 0xfffu + ((e >> 13) & 1u);
    return uint16_t(sign | (e >> 13));
}

// Load n contiguous elements of dtype `dt` at `src` as fp32.
RA_INLINE void load_row(const void* src, int dt, int64_t n, float* dst) {
    switch (dt) {
        case F32: std::memcpy(dst, src, size_t(n) * 4); break;
        case F16: { auto s = static_cast<const uint16_t*>(src); for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]); } break;
        case BF16: { auto s = static_cast<const uint16_t*>(src); for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]); } break;
        case F64: { auto s = static_cast<const double*>(src); for (int64_t i = 0; i < n; ++i) dst[i] = float(s[i]); } break;
        default: break;
    }
}

RA_INLINE void store_row(void* dstv, int dt, int64_t n, const float* src) {
    switch (dt) {
        case F32: std::memcpy(dstv, src, size_t(n) * 4); break;
        case F16: { auto d = static_cast<uint16_t*>(dstv); for (int64_t i = 0; i < n; ++i) d[i] = float_to_half(src[i]); } break;
        case BF16: { auto d = static_cast<uint16_t*>(dstv); for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]); } break;
        case F64: { auto d = static_cast<double*>(dstv); for (int64_t i = 0; i < n; ++i) d[i] = double(src[i]); } break;
        default: break;
    }
}

RA_INLINE int64_t dtype_size(int dt) { return dt == F32 || dt == I32 ? 4 : (dt == F64 || dt == I64 ? 8 : 2); }

// ---------------------------------------------------------------------------------------------------------
// exp(x) for fp32, branch-free so loops over it vectorise: Cody-Waite reduction by ln2, degree-6 polynomial
// (max rel. error ~2 ulp on [-87, 88]); exp(-inf) = 0, results below 2^-126 flush to 0.

RA_INLINE float exp_f32(float x) {
    const float hi = 88.0f, lo = -87.3365478515625f;
    float xc = x < lo ? lo : (x > hi ? hi : x);
    float n = std::floor(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = int32_t(n) + 127;
    float scale = bits_to_float(uint32_t(e) << 23);
    float res = p * scale;
    return x < lo ? 0.0f : res;
}

// The same exp on 8 lanes with GCC/Clang vector extensions: vectorised by construction in every clone
// (the baseline clone runs it as two SSE halves).
typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));

RA_INLINE v8f loadu8(const float* p) { v8f v; std::memcpy(&v, p, 32); return v; }
RA_INLINE void storeu8(float* p, v8f v) { std::memcpy(p, &v, 32); }
RA_INLINE v8f splat8(float x) { return v8f{} + x; }

RA_INLINE v8f exp_v8(v8f x) {
    const v8f lo = splat8(-87.3365478515625f), hi = splat8(88.0f);
    v8f xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    const v8f t = xc * 1.44269504088896341f + 0.5f;
    v8i ni = __builtin_convertvector(t, v8i);         // truncation toward zero
    ni += (__builtin_convertvector(ni, v8f) > t);      // -> floor (mask is -1 where trunc rounded up)
    const v8f n = __builtin_convertvector(ni, v8f);
    v8f r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v8f p = splat8(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8f scale = (v8f)((ni + 127) << 23);
    const v8f res = p * scale;
    return x < lo ? v8f{} : res;
}

RA_INLINE v8i iota8() { return v8i{0, 1, 2, 3, 4, 5, 6, 7}; }

RA_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace ra
