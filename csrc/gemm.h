// Small register-blocked fp32 GEMM used by the attention kernels.
#pragma once
#include "common.h"

namespace ra {

// ---------------------------------------------------------------------------------------------------------
// GEMM: C[M x N] (+)= A[M x K] · B[K x N], fp32, row-major with leading dimensions; N % 16 == 0.
// Register blocking: 6 rows x 16 columns (two 8-wide vectors) of C held in registers across the K loop.


// TA: A is stored transposed ([K x M], element (r, k) at A[k * lda + r]).
template <int R, bool TA = false>
RA_INLINE void gemm_tile(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                         int64_t ldc, bool accumulate) {
    v8f c0[R], c1[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        if (accumulate) { c0[r] = loadu8(C + r * ldc); c1[r] = loadu8(C + r * ldc + 8); }
        else { c0[r] = v8f{}; c1[r] = v8f{}; }
    }
    for (int64_t k = 0; k < K; ++k) {
        v8f b0 = loadu8(B + k * ldb), b1 = loadu8(B + k * ldb + 8);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            float a = TA ? A[k * lda + r] : A[r * lda + k];
            c0[r] += a * b0;
            c1[r] += a * b1;
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) { storeu8(C + r * ldc, c0[r]); storeu8(C + r * ldc + 8, c1[r]); }
}

template <int R, bool TA = false>
RA_INLINE void gemm_rows16(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                           int64_t ldc, bool accumulate) {
    int64_t i = 0;
    for (; i + R <= M; i += R) gemm_tile<R, TA>(K, A + (TA ? i : i * lda), lda, B, ldb, C + i * ldc, ldc, accumulate);
    switch (M - i) {
        case 7: gemm_tile<7, TA>(K, A + (TA ? i : i * lda), lda, B, ldb, C + i * ldc, ldc, accumulate); break;
        case 6: gemm_tile<6, TA>(K, A + (TA ? i : i * lda), lda, B, ldb, C + i * ldc, ldc, accumulate); break;
        case 5: gemm_tile<5, TA>(K, A + (TA ? i : i * lda), lda, B, ldb, C + i * ldc, ldc, accumulate); break;
        case 4: gemm_tile<4, TA>(K, A + (TA ? i : i * lda), lda, B, ldb, C + i * ldc, ldc, accumulate); break;
        case 3: gemm_tile<3, TA>(K, A + (TA ? i : i * lda), lda, B, ldb, C + i * ldc, ldc, accumulate); break;
        case 2: gemm_tile<2, TA>(K, A + (TA ? i : i * lda), lda, B, ldb, C + i * ldc, ldc, accumulate); break;
        case 1: gemm_tile<1, TA>(K, A + (TA ? i : i * lda), lda, B, ldb, C + i * ldc, ldc, accumulate); break;
        default: break;
    }
}

// Portable path: 6 x 16 tiles (fits the 16 vector registers of AVX2; the baseline clone runs SSE2 halves).
template <bool TA>
RA_MULTIVERSION
static void gemm_portable(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
    for (int64_t j = 0; j < N; j += 16) gemm_rows16<6, TA>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(RA_NO_MULTIVERSION)
// AVX-512 path: 8 x 32 tiles of 16-wide vectors (16 accumulators of the 32 zmm registers).
typedef float v16f __attribute__((vector_size(64), aligned(4)));

RA_INLINE v16f loadu16(const float* p) { v16f v; std::memcpy(&v, p, 64); return v; }
RA_INLINE void storeu16(float* p, v16f v) { std::memcpy(p, &v, 64); }

template <int R, bool TA = false>
RA_INLINE void gemm_tile32(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                           int64_t ldc, bool accumulate) {
    v16f c0[R], c1[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        if (accumulate) { c0[r] = loadu16(C + r * ldc); c1[r] = loadu16(C + r * ldc + 16); }
        else { c0[r] = v16f{}; c1[r] = v16f{}; }
    }
    for (int64_t k = 0; k < K; ++k) {
        const v16f b0 = loadu16(B + k * ldb), b1 = loadu16(B + k * ldb + 16);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const float a = TA ? A[k * lda + r] : A[r * lda + k];
            c0[r] += a * b0;
            c1[r] += a * b1;
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) { storeu16(C + r * ldc, c0[r]); storeu16(C + r * ldc + 16, c1[r]); }
}

template <bool TA>
__attribute__((target("arch=x86-64-v4")))
static void gemm_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                        int64_t ldb, float* C, int64_t ldc, bool accumulate) {
    int64_t j = 0;
    for (; j + 32 <= N; j += 32) {
        int64_t i = 0;
        for (; i + 8 <= M; i += 8) gemm_tile32<8, TA>(K, A + (TA ? i : i * lda), lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
        switch (M - i) {
            case 7: gemm_tile32<7, TA>(K, A + (TA ? i : i * lda), lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            case 6: gemm_tile32<6, TA>(K, A + (TA ? i : i * lda), lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            case 5: gemm_tile32<5, TA>(K, A + (TA ? i : i * lda), lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            case 4: gemm_tile32<4, TA>(K, A + (TA ? i : i * lda), lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            case 3: gemm_tile32<3, TA>(K, A + (TA ? i : i * lda), lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            case 2: gemm_tile32<2, TA>(K, A + (TA ? i : i * lda), lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            case 1: gemm_tile32<1, TA>(K, A + (TA ? i : i * lda), lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            default: break;
        }
    }
    if (j < N) gemm_rows16<8, TA>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);  // N % 32 == 16
}

static const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif

// GEMM entry points: the AVX-512 kernel where the CPU has it, else the portable (multi-versioned) one.
// Both sum over k in the same order for every element, so results do not depend on the thread count.
// gemm: C (+)= A·B with A [M x K]; gemm_tn: C (+)= Aᵀ·B with A stored [K x M].
template <bool TA>
static void gemm_any(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                     float* C, int64_t ldc, bool accumulate) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(RA_NO_MULTIVERSION)
    if (kHasAvx512) return gemm_avx512<TA>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
#endif
    gemm_portable<TA>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

static inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                        float* C, int64_t ldc, bool accumulate) {
    gemm_any<false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

static inline void gemm_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
    gemm_any<true>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace ra
