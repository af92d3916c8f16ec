// Native CPU RoPE kernel (see rope.cpp and ring_attn/backends/protocol.py).
#pragma once
#include "common.h"

namespace ra {

// A 4-D [B, S, H, D] view with element strides (any; 0 for broadcast dims). Tables use sb, ss, sd only.
struct RTen {
    char* p;
    int dt;
    int64_t sb, ss, sh, sd;
};

struct RopeArgs {
    RTen q, k, qo, ko, qy, ky, cos, sin;
    int64_t B, S, HQ, HK, D, rot;
    bool interleaved, backward, copy_pass, use_table, need_dtheta;
    const char* pos;  // angle mode: [B or 1, S] int32/int64
    int pos_dt;
    int64_t pos_sb, pos_ss;
    const char* inv;  // [rot/2] fp32/fp64, contiguous
    int inv_dt;
    double scaling;
    char* dtheta;     // [B*S, rot/2] fp32/fp64, contiguous
    int dtheta_dt;
};

void rope(const RopeArgs& a, int num_threads);

}  // namespace ra
