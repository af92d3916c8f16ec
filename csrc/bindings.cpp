// pybind11 bindings of the native CPU backend. No libtorch: tensors arrive as (data pointer, dtype code,
// element strides) tuples built by ring_attn/backends/native.py, so one build works with any torch release.
// Every entry point releases the GIL while the kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "attention.h"
#include "rope.h"

namespace py = pybind11;
using ra::AttnArgs;
using ra::Lse;
using ra::RTen;
using ra::Ten;

using T5 = std::array<int64_t, 5>;   // (ptr, dtype, stride_b, stride_s, stride_h)
using L3 = std::array<int64_t, 3>;   // (ptr, stride_b, stride_h)
using A6 = std::array<int64_t, 6>;   // shape (nseq, s_q, s_k, h_q, h_kv, d) / seqs (4 ptrs, max_q, max_k)
using R6 = std::array<int64_t, 6>;   // rope tensor (ptr, dtype, sb, ss, sh, sd)
using S3 = std::array<int64_t, 3>;   // ALiBi slopes (ptr or 0, stride_b, stride_h) of an fp32 [nseq, h_q] tensor
using D5 = std::array<int64_t, 5>;   // dropout (enabled, seed, rows, groups, row0); threshold and scale apart

static Ten ten(const T5& t) { return Ten{reinterpret_cast<char*>(t[0]), int(t[1]), t[2], t[3], t[4]}; }
static Lse lse(const L3& t) { return Lse{reinterpret_cast<float*>(t[0]), t[1], t[2]}; }
static RTen rten(const R6& t) { return RTen{reinterpret_cast<char*>(t[0]), int(t[1]), t[2], t[3], t[4], t[5]}; }

static AttnArgs args(const A6& shape, const A6& seqs, bool packed, double scale, bool causal, bool bottom_right,
                     int64_t offset, int64_t left, int64_t right, double softcap, const S3& alibi, const D5& drop,
                     int64_t drop_threshold, double drop_scale) {
    AttnArgs a{};
    a.nseq = shape[0]; a.s_q = shape[1]; a.s_k = shape[2]; a.h_q = shape[3]; a.h_kv = shape[4]; a.d = shape[5];
    if (packed) {
        a.starts_q = reinterpret_cast<const int32_t*>(seqs[0]);
        a.lens_q = reinterpret_cast<const int32_t*>(seqs[1]);
        a.starts_k = reinterpret_cast<const int32_t*>(seqs[2]);
        a.lens_k = reinterpret_cast<const int32_t*>(seqs[3]);
        a.max_len_q = seqs[4]; a.max_len_k = seqs[5];
    }
    a.scale = float(scale); a.causal = causal; a.bottom_right = bottom_right; a.offset = offset;
    a.left = left; a.right = right; a.softcap = float(softcap);
    a.alibi = reinterpret_cast<const float*>(alibi[0]); a.alibi_sb = alibi[1]; a.alibi_sh = alibi[2];
    a.dropout = drop[0] != 0; a.drop_seed = uint64_t(drop[1]); a.drop_rows = drop[2]; a.drop_groups = drop[3];
    a.drop_row0 = drop[4]; a.drop_threshold = uint32_t(drop_threshold); a.drop_scale = float(drop_scale);
    return a;
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "ring_attn native CPU backend (C++17/OpenMP, no libtorch). Called only by ring_attn.backends.native.";
    // 2: attention_forward/backward take the ALiBi slopes (S3) after softcap; 3: and then the dropout (D5,
    // threshold, scale); 4: attention_forward takes lse_f64 (an fp64 running LSE) after merge
    m.attr("ABI_VERSION") = 4;
    m.def("attention_forward",
          [](T5 q, T5 k, T5 v, T5 out, L3 l, A6 shape, A6 seqs, bool packed, double scale, bool causal,
             bool bottom_right, int64_t offset, int64_t left, int64_t right, double softcap, S3 alibi, D5 drop,
             int64_t drop_threshold, double drop_scale, bool merge, bool lse_f64, int threads) {
              Lse running = lse(l);
              running.f64 = lse_f64;
              ra::attention_forward(args(shape, seqs, packed, scale, causal, bottom_right, offset, left, right, softcap,
                                         alibi, drop, drop_threshold, drop_scale),
                                    ten(q), ten(k), ten(v), ten(out), running, merge, threads);
          },
          py::call_guard<py::gil_scoped_release>());
    m.def("attention_delta",
          [](T5 dout, T5 out, L3 delta, L3 dlse, bool has_dlse, int64_t b, int64_t s, int64_t h, int64_t d, int threads) {
              Lse dl = lse(dlse);
              ra::attention_delta(ten(dout), ten(out), lse(delta), has_dlse ? &dl : nullptr, b, s, h, d, threads);
          },
          py::call_guard<py::gil_scoped_release>());
    m.def("attention_backward",
          [](T5 dout, T5 q, T5 k, T5 v, L3 l, L3 delta, T5 dq, T5 dk, T5 dv, A6 shape, A6 seqs, bool packed,
             double scale, bool causal, bool bottom_right, int64_t offset, int64_t left, int64_t right, double softcap,
             S3 alibi, D5 drop, int64_t drop_threshold, double drop_scale, bool accumulate, int threads) {
              ra::attention_backward(args(shape, seqs, packed, scale, causal, bottom_right, offset, left, right, softcap,
                                          alibi, drop, drop_threshold, drop_scale),
                                     ten(dout), ten(q), ten(k), ten(v), lse(l), lse(delta), ten(dq), ten(dk), ten(dv),
                                     accumulate, threads);
          },
          py::call_guard<py::gil_scoped_release>());
    m.def("rope",
          [](R6 q, R6 k, R6 qo, R6 ko, R6 qy, R6 ky, R6 cos, R6 sin, std::array<int64_t, 6> dims,
             bool interleaved, bool backward, bool copy_pass, bool use_table, bool need_dtheta,
             std::array<int64_t, 4> pos, std::array<int64_t, 2> inv, double scaling, std::array<int64_t, 2> dtheta,
             int threads) {
              ra::RopeArgs a{};
              a.q = rten(q); a.k = rten(k); a.qo = rten(qo); a.ko = rten(ko); a.qy = rten(qy); a.ky = rten(ky);
              a.cos = rten(cos); a.sin = rten(sin);
              a.B = dims[0]; a.S = dims[1]; a.HQ = dims[2]; a.HK = dims[3]; a.D = dims[4]; a.rot = dims[5];
              a.interleaved = interleaved; a.backward = backward; a.copy_pass = copy_pass; a.use_table = use_table;
              a.need_dtheta = need_dtheta;
              a.pos = reinterpret_cast<const char*>(pos[0]); a.pos_dt = int(pos[1]); a.pos_sb = pos[2]; a.pos_ss = pos[3];
              a.inv = reinterpret_cast<const char*>(inv[0]); a.inv_dt = int(inv[1]);
              a.scaling = scaling;
              a.dtheta = reinterpret_cast<char*>(dtheta[0]); a.dtheta_dt = int(dtheta[1]);
              ra::rope(a, threads);
          },
          py::call_guard<py::gil_scoped_release>());
}
