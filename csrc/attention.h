// Native CPU attention kernels (see attention.cpp and ring_attn/backends/protocol.py).
#pragma once
#include "common.h"

namespace ra {

// A [b, s, h, d] tensor with element strides for the first three dims (last dim contiguous). Packed [t, h, d]
// tensors are passed as [1, t, h, d] with sb = 0: the batch index is then the sequence number.
struct Ten {
    char* p;
    int dt;
    int64_t sb, ss, sh;
};

// An LSE-layout tensor [b, h, s] (unit stride along s): fp32, or fp64 (`f64`, only the running LSE that
// attention_forward merges into; p then points at doubles).
struct Lse {
    float* p;
    int64_t sb, sh;
    bool f64 = false;
};

struct AttnArgs {
    int64_t nseq;       // batch size (dense) or number of sequences (packed)
    int64_t s_q, s_k;   // dense: sequence lengths; packed: total rows t_q, t_k
    int64_t h_q, h_kv, d;
    const int32_t *starts_q, *lens_q, *starts_k, *lens_k;  // null when dense
    int64_t max_len_q, max_len_k;
    float scale;
    bool causal, bottom_right;
    int64_t offset;       // causal offset when !bottom_right
    int64_t left, right;  // window (-1 = unbounded)
    float softcap;        // 0 = none
    const float* alibi;   // ALiBi slopes [nseq, h_q] (fp32, element strides below); null = none
    int64_t alibi_sb, alibi_sh;
    // Attention dropout (ring_attn._contracts.Dropout): element (query head h, row r, key j) is kept iff word
    // j % 4 of Philox-4x32-10(seed, (h·drop_rows + r + drop_row0)·drop_groups + j / 4) >= drop_threshold, where
    // r is the call's query row (dense: batch·s_q + i; packed: the packed row) and j the key's index in its
    // sequence. Kept probabilities are scaled by drop_scale = 1 / (1 - p).
    bool dropout;
    uint64_t drop_seed;
    int64_t drop_rows, drop_groups, drop_row0;
    uint32_t drop_threshold;
    float drop_scale;
};

void attention_forward(const AttnArgs& a, const Ten& q, const Ten& k, const Ten& v, const Ten& out, const Lse& lse,
                       bool merge, int num_threads);
void attention_delta(const Ten& dout, const Ten& out, const Lse& delta, const Lse* dlse, int64_t b, int64_t s,
                     int64_t h, int64_t d, int num_threads);
void attention_backward(const AttnArgs& a, const Ten& dout, const Ten& q, const Ten& k, const Ten& v, const Lse& lse,
                        const Lse& delta, const Ten& dq, const Ten& dk, const Ten& dv, bool accumulate,
                        int num_threads);

}  // namespace ra
