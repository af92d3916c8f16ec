// Small register-blocked fp32 GEMM used by the attention kernels.
#pragma once
#include "common.h"

namespace ra {

// ---------------------------------------------------------------------------------------------------------
// GEMM: C[M x N] (+)= A[M x K] · B[K x N], fp32, row-major with leading dimensions; N % 16 == 0.
// Register blocking: 6 rows x 16 columns (two 8-wide vectors) of C held in registers across the K loop.


template <int R>
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
            float a = A[r * lda + k];
            c0[r] += a * b0;
            c1[r] += a * b1;
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) { storeu8(C + r * ldc, c0[r]); storeu8(C + r * ldc + 8, c1[r]); }
}

RA_MULTIVERSION
static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc, bool accumulate) {
    for (int64_t j = 0; j < N; j += 16) {
        int64_t i = 0;
        for (; i + 6 <= M; i += 6) gemm_tile<6>(K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
        switch (M - i) {
            case 5: gemm_tile<5>(K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            case 4: gemm_tile<4>(K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            case 3: gemm_tile<3>(K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            case 2: gemm_tile<2>(K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            case 1: gemm_tile<1>(K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate); break;
            default: break;
        }
    }
}

}  // namespace ra
