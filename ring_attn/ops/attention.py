"""Blockwise (flash) attention: Triton kernels, host launchers, custom ops and the public functions.

Public (re-exported by ``ring_attn``):

* :func:`flash_attn_func` — dense ``[b, s, h, d]`` attention with autograd.
* :func:`flash_attn_varlen_func` — packed ``[t, h, d]`` sequences described by ``cu_seqlens``.

Lower level, for the ring (documented, stable):

* :func:`attention_block_forward` — ``(out, lse)`` for one (query block, key block) pair, with a causal mode
  and an explicit causal offset, optionally in fp32 so partial results can be merged without rounding.
* :func:`attention_block_backward` — gradients of one block pair from the *final* ``lse`` and
  ``delta = rowsum(dout · out)`` (see :func:`attention_delta`), added into caller-provided fp32 accumulators.
* :class:`VarlenSeqs` — per-sequence ``starts``/``lens`` of q and k along the token dim (``cu_seqlens`` is the
  special case; the ring also uses halves of sequences).

Conventions (DESIGN.md): query head ``h`` reads kv head ``h // (h_q // h_kv)``; K/V are never repeated.
Causal: query ``i`` sees key ``j`` when ``j <= i + offset``, with ``offset = s_k - s_q`` (bottom-right) unless
given. LSE is fp32, natural log; a row that sees no key has ``lse = -inf`` and output 0.

Backends (``ring_attn.backend``): Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``); otherwise the
fp32 torch fallback in ``ring_attn.reference``. Same contracts either way.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch

from ring_attn import backend as _backend
from ring_attn import reference as _ref

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "attention_block_forward",
    "attention_block_backward",
    "attention_delta",
    "VarlenSeqs",
    "SUPPORTED_DTYPES",
    "MAX_HEAD_DIM",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


class VarlenSeqs(NamedTuple):
    """Where each sequence lives along the token dim of packed q and k/v.

    Sequence ``i`` is q rows ``starts_q[i] : starts_q[i] + lens_q[i]`` attending to k/v rows
    ``starts_k[i] : starts_k[i] + lens_k[i]``. All four are int32 tensors of length ``n_seqs`` on the device of
    q; ``max_len_q``/``max_len_k`` are Python ints at least as large as every length (they size the grid).
    ``covers_all_q`` says whether every q row belongs to a sequence; when False, outputs are initialised to
    0 / ``-inf`` so rows outside every sequence are well defined.
    """

    starts_q: torch.Tensor
    lens_q: torch.Tensor
    starts_k: torch.Tensor
    lens_k: torch.Tensor
    max_len_q: int
    max_len_k: int
    covers_all_q: bool = False

    @staticmethod
    def from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int) -> "VarlenSeqs":
        cq, ck = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
        return VarlenSeqs(cq[:-1], cq[1:] - cq[:-1], ck[:-1], ck[1:] - ck[:-1],
                          int(max_seqlen_q), int(max_seqlen_k), True)


# ---------------------------------------------------------------------------------------------------------
# Input checks: every public entry point runs these before any launch.


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_qkv(q, k, v, packed: bool):
    """Validate q/k/v shapes, dtypes and devices. Returns ``(h_q, h_kv, d)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    layout = "[total_tokens, heads, head_dim]" if packed else "[batch, seqlen, heads, head_dim]"
    ndim = 3 if packed else 4
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype is {x.dtype}; expected one of float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"k batch size {k.shape[0]} != q batch size {q.shape[0]} (shapes {layout})")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"k head_dim {k.shape[-1]} != q head_dim {d}")
    if d % HEAD_DIM_MULTIPLE != 0 or not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} is not supported; expected a multiple of {HEAD_DIM_MULTIPLE} "
                         f"in [8, {MAX_HEAD_DIM}]")
    h_q, h_kv = q.shape[-2], k.shape[-2]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"q heads ({h_q}) must be a positive multiple of k/v heads ({h_kv}) for GQA/MQA")
    return h_q, h_kv, d


def _check_scale(softmax_scale, d):
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or \
            not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _check_cu_seqlens_form(name, cu):
    """A cu_seqlens argument is an int32 1-D tensor of length n_seqs + 1 >= 2 (no host read)."""
    _check_tensor(name, cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}.dtype is {cu.dtype}; expected torch.int32")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D of length n_seqs + 1 >= 2, got shape {tuple(cu.shape)}")


def _check_cu_seqlens(name, cu, total, max_seqlen, max_name, device):
    """Validate a cu_seqlens tensor (one host read of a small tensor). Returns nothing; raises ValueError."""
    _check_cu_seqlens_form(name, cu)
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}; expected the device of q ({device})")
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name}[0] is {vals[0]}; expected 0")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if any(n < 0 for n in lens):
        i = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"{name} must be non-decreasing; {name}[{i + 1}] = {vals[i + 1]} < {name}[{i}] = {vals[i]}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] is {vals[-1]}; expected the number of packed tokens {total}")
    if max(lens) > max_seqlen:
        raise ValueError(f"{max_name} is {max_seqlen} but {name} has a sequence of length {max(lens)}")


# ---------------------------------------------------------------------------------------------------------
# Triton kernels


# Defined at module level (Triton resolves helper functions through the module's globals); skipped when
# Triton is not importable, in which case every call takes the reference backend.
if _backend.triton_available():
    import triton
    import triton.language as tl

    interpret = _backend.interpreter_enabled()

    # Forward configs: autotuned on GPU (key: head dim, causal, varlen, precision); one small config under
    # the interpreter, where every config would be run and small blocks exercise the tails.
    # RING_ATTN_AUTOTUNE=0 skips tuning (one config that fits every head dim), e.g. for quick GPU test runs.
    if interpret:
        fwd_configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    elif os.environ.get("RING_ATTN_AUTOTUNE", "1") == "0":
        fwd_configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
    else:
        fwd_configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [
                (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
                (128, 64, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4), (128, 32, 4, 3),
            ]
        ]

    def _prune(configs, named_args, **kwargs):
        # 256-wide heads: 128x128 tiles exceed shared memory on every current GPU
        d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
        kept = [c for c in configs if d <= 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64]
        return kept or configs

    @triton.jit
    def _seq_bounds(b, SQ_START, SQ_LEN, SK_START, SK_LEN, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
        if VARLEN:
            q_start = tl.load(SQ_START + b).to(tl.int64)
            len_q = tl.load(SQ_LEN + b)
            k_start = tl.load(SK_START + b).to(tl.int64)
            len_k = tl.load(SK_LEN + b)
        else:
            q_start = tl.full([], 0, tl.int64)
            k_start = tl.full([], 0, tl.int64)
            len_q = seqlen_q
            len_k = seqlen_k
        return q_start, len_q, k_start, len_k

    @triton.jit
    def _diag_offset(len_q, len_k, causal_offset, BOTTOM_RIGHT: tl.constexpr):
        """Query i sees key j when j <= i + offset (bottom-right: offset = len_k - len_q)."""
        if BOTTOM_RIGHT:
            return len_k - len_q
        else:
            return causal_offset

    @triton.jit
    def _key_blocks(start_m, len_k, offset, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Key ranges for the query rows [start_m, start_m + BLOCK_M): [0, full_end) is in bounds and visible to
        every row (no masking); [full_end, hi) holds the diagonal and the ragged end (masked). Blocks at or past
        hi are above the diagonal and never visited."""
        if CAUSAL:
            hi = tl.minimum(len_k, start_m + BLOCK_M + offset)
            full_end = tl.minimum(len_k, start_m + offset + 1)
        else:
            hi = len_k
            full_end = len_k
        hi = tl.maximum(hi, 0)
        full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
        return full_end, hi

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, K_base, V_base, offs_m, offs_d, lo, hi, len_k, offset, qk_scale,
                   stride_ks, stride_vs,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        # loop-invariant int32 offsets + a scalar int64 base per step: far fewer registers than carrying
        # [BLOCK_N, BLOCK_D] tensors of 64-bit pointers through the loop
        k_offs = offs_n[:, None] * stride_ks + offs_d[None, :]
        v_offs = offs_n[:, None] * stride_vs + offs_d[None, :]
        d_ok = offs_d[None, :] < HEAD_DIM
        k_row = K_base + lo.to(tl.int64) * stride_ks  # scalar pointers to the current block's first row
        v_row = V_base + lo.to(tl.int64) * stride_vs
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k_ptrs = k_row + k_offs
            v_ptrs = v_row + v_offs
            if MASKED:
                kv_mask = (cols[:, None] < len_k) & d_ok
                k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
                v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            elif EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=d_ok, other=0.0)
                v = tl.load(v_ptrs, mask=d_ok, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if MASKED:
                visible = cols[None, :] < len_k
                if CAUSAL:
                    visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
                qk = tl.where(visible, qk * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                # a row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(qk - m_shift[:, None])
                alpha = tl.math.exp2(m_i - m_shift)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.math.exp2(qk * qk_scale - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
            k_row += BLOCK_N * stride_ks
            v_row += BLOCK_N * stride_vs
        return acc, l_i, m_i

    # restore_value: while tuning, every trial of a MERGE launch must start from the same running (O, LSE)
    @triton.autotune(configs=fwd_configs, key=["HEAD_DIM", "CAUSAL", "VARLEN", "DOT_PRECISION"],
                     prune_configs_by={"early_config_prune": _prune}, restore_value=["O", "LSE"])
    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, LSE, SQ_START, SQ_LEN, SK_START, SK_LEN,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_lh,
        seqlen_q, seqlen_k, n_heads_q, group, qk_scale, causal_offset,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
        BOTTOM_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr, MERGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Q [b, s_q, h_q, d] (varlen: b = n_seqs, rows at SQ_START[b]..+SQ_LEN[b] of a packed [t, h_q, d]);
        # K, V [b, s_k, h_kv, d]; O like Q (its own strides); LSE [b, h_q, s_q] with unit stride along s.
        # Grid: (cdiv(max s_q, BLOCK_M), b * h_q). One program owns BLOCK_M query rows of one head.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads_q
        h = pid_bh % n_heads_q
        hk = h // group
        q_start, len_q, k_start, len_k = _seq_bounds(b, SQ_START, SQ_LEN, SK_START, SK_LEN, seqlen_q,
                                                     seqlen_k, VARLEN)
        start_m = pid_m * BLOCK_M
        if start_m >= len_q:
            return
        offset = _diag_offset(len_q, len_k, causal_offset, BOTTOM_RIGHT)
        bq = b.to(tl.int64)
        Q_base = Q + bq * stride_qb + q_start * stride_qs + h.to(tl.int64) * stride_qh
        K_base = K + bq * stride_kb + k_start * stride_ks + hk.to(tl.int64) * stride_kh
        V_base = V + bq * stride_vb + k_start * stride_vs + hk.to(tl.int64) * stride_vh
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m[:, None] < len_q
        d_ok = offs_d[None, :] < HEAD_DIM
        q = tl.load(Q_base + offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :], mask=row_ok & d_ok,
                    other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        full_end, hi = _key_blocks(start_m, len_k, offset, CAUSAL, BLOCK_M, BLOCK_N)
        EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
        zero = tl.full([], 0, tl.int32)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, offs_m, offs_d, zero, full_end, len_k,
                                   offset, qk_scale, stride_ks, stride_vs, False, CAUSAL, EVEN_D, HEAD_DIM,
                                   BLOCK_N, DOT_PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, offs_m, offs_d, full_end, hi, len_k,
                                   offset, qk_scale, stride_ks, stride_vs, True, CAUSAL, EVEN_D, HEAD_DIM,
                                   BLOCK_N, DOT_PRECISION)
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        O_base = O + bq * stride_ob + q_start * stride_os + h.to(tl.int64) * stride_oh
        o_ptrs = O_base + offs_m.to(tl.int64)[:, None] * stride_os + offs_d[None, :]
        L_base = LSE + bq * stride_lb + h.to(tl.int64) * stride_lh + q_start
        if MERGE:
            # fold this block into the running fp32 (out, lse) of earlier blocks (the ring's steps):
            # lse' = log(e^lse_old + e^lse), out' = (e^lse_old·out_old + e^lse·out) / e^lse'
            lse_old = tl.load(L_base + offs_m, mask=offs_m < len_q, other=float("-inf"))
            o_old = tl.load(o_ptrs, mask=row_ok & d_ok, other=0.0)
            m = tl.maximum(lse_old, lse)
            m = tl.where(m == float("-inf"), 0.0, m)
            w_old = tl.exp(lse_old - m)
            w_new = tl.exp(lse - m)
            total = w_old + w_new
            acc = (o_old * w_old[:, None] + acc * w_new[:, None]) / tl.where(total == 0.0, 1.0, total)[:, None]
            lse = tl.where(total == 0.0, float("-inf"), m + tl.log(tl.where(total == 0.0, 1.0, total)))
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok & d_ok)
        tl.store(L_base + offs_m, lse, mask=offs_m < len_q)

    @triton.jit
    def _delta_kernel(DO, O, DELTA, DLSE,
                      stride_dob, stride_dos, stride_doh, stride_ob, stride_os, stride_oh,
                      stride_db, stride_dh, stride_lb, stride_lh, seqlen, n_heads,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr,
                      BLOCK_M: tl.constexpr):
        # delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]  (minus dLSE[b, h, i]: d lse / d S = P, so an
        # upstream lse gradient enters the backward exactly like a shift of delta)
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = (pid_bh % n_heads).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
        rows = offs_m.to(tl.int64)[:, None]
        do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dos + offs_d[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_os + offs_d[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        delta = tl.sum(do * o, 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + b * stride_lb + h * stride_lh + offs_m, mask=offs_m < seqlen, other=0.0)
        tl.store(DELTA + b * stride_db + h * stride_dh + offs_m, delta, mask=offs_m < seqlen)

    @triton.jit
    def _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, offs_n, offs_d, lo, hi, len_q, offset,
                        qk_scale, stride_qs, stride_dos,
                        MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
        d_ok = offs_d[None, :] < HEAD_DIM
        q_offs = tl.arange(0, BLOCK_M)[:, None] * stride_qs + offs_d[None, :]
        do_offs = tl.arange(0, BLOCK_M)[:, None] * stride_dos + offs_d[None, :]
        q_row = Q_base + lo.to(tl.int64) * stride_qs
        do_row = DO_base + lo.to(tl.int64) * stride_dos
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_ptrs = q_row + q_offs
            do_ptrs = do_row + do_offs
            q_row += BLOCK_M * stride_qs
            do_row += BLOCK_M * stride_dos
            if MASKED:
                m_ok = offs_m < len_q
                q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok, other=0.0)
                do = tl.load(do_ptrs, mask=m_ok[:, None] & d_ok, other=0.0)
                lse = tl.load(L_base + offs_m, mask=m_ok, other=float("inf"))
                delta = tl.load(D_base + offs_m, mask=m_ok, other=0.0)
            else:
                q = tl.load(q_ptrs, mask=d_ok, other=0.0)
                do = tl.load(do_ptrs, mask=d_ok, other=0.0)
                lse = tl.load(L_base + offs_m)
                delta = tl.load(D_base + offs_m)
            # rows that saw no key (lse = -inf) have P = 0: use +inf so exp2 gives 0
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
            pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
            if MASKED:
                keep = offs_m[None, :] < len_q
                if CAUSAL:
                    keep = keep & (offs_n[:, None] <= offs_m[None, :] + offset)
                pT = tl.where(keep, pT, 0.0)
            # dV += Pᵀ dO ;  dPᵀ = V dOᵀ ;  dSᵀ = Pᵀ ∘ (dPᵀ − delta) ;  dK += dSᵀ Q   (scale applied once at the end)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, SQ_START, SQ_LEN, SK_START, SK_LEN,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs,
        stride_dvh, stride_lb, stride_lh,
        seqlen_q, seqlen_k, n_heads_kv, group, qk_scale, sm_scale, causal_offset,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
        BOTTOM_RIGHT: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # K/V-stationary: one program owns BLOCK_N keys of one kv head and loops over the q rows of every
        # query head in its GQA group, so dK/dV are summed in registers: no atomics, deterministic.
        # LSE and DELTA are [b, h_q, s_q] with unit stride along s (same strides for both).
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads_kv
        hk = pid_bh % n_heads_kv
        q_start, len_q, k_start, len_k = _seq_bounds(b, SQ_START, SQ_LEN, SK_START, SK_LEN, seqlen_q,
                                                     seqlen_k, VARLEN)
        start_n = pid_n * BLOCK_N
        if start_n >= len_k:
            return
        offset = _diag_offset(len_q, len_k, causal_offset, BOTTOM_RIGHT)
        bq = b.to(tl.int64)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n[:, None] < len_k
        d_ok = offs_d[None, :] < HEAD_DIM
        rows_n = offs_n.to(tl.int64)[:, None]
        k = tl.load(K + bq * stride_kb + (k_start + rows_n) * stride_ks + hk.to(tl.int64) * stride_kh +
                    offs_d[None, :], mask=n_ok & d_ok, other=0.0)
        v = tl.load(V + bq * stride_vb + (k_start + rows_n) * stride_vs + hk.to(tl.int64) * stride_vh +
                    offs_d[None, :], mask=n_ok & d_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # Query rows: [lo, full_lo) see part of this key block (diagonal), [full_lo, full_hi) see all of it
        # in whole in-bounds blocks, [full_hi, len_q) is the ragged end. Rows before lo see none of it.
        if CAUSAL:
            lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
            full_lo = tl.maximum(start_n + BLOCK_N - 1 - offset, 0)
            full_lo = (full_lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        else:
            lo = 0
            full_lo = 0
        lo = tl.minimum(lo, len_q)
        full_hi = len_q // BLOCK_M * BLOCK_M
        mid_lo = tl.minimum(tl.maximum(full_lo, lo), len_q)
        mid_hi = tl.maximum(full_hi, mid_lo)
        for g in range(0, group):
            h = (hk * group + g).to(tl.int64)
            Q_base = Q + bq * stride_qb + q_start * stride_qs + h * stride_qh
            DO_base = DO + bq * stride_dob + q_start * stride_dos + h * stride_doh
            L_base = LSE + bq * stride_lb + h * stride_lh + q_start
            D_base = DELTA + bq * stride_lb + h * stride_lh + q_start
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, offs_n, offs_d, lo, mid_lo,
                                     len_q, offset, qk_scale, stride_qs, stride_dos, True, CAUSAL, HEAD_DIM,
                                     BLOCK_M, DOT_PRECISION)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, offs_n, offs_d, mid_lo,
                                     mid_hi, len_q, offset, qk_scale, stride_qs, stride_dos, False, CAUSAL,
                                     HEAD_DIM, BLOCK_M, DOT_PRECISION)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, offs_n, offs_d, mid_hi,
                                     len_q, len_q, offset, qk_scale, stride_qs, stride_dos, True, CAUSAL,
                                     HEAD_DIM, BLOCK_M, DOT_PRECISION)
        dk = dk * sm_scale
        mask = n_ok & d_ok
        dk_ptrs = DK + bq * stride_dkb + (k_start + rows_n) * stride_dks + hk.to(tl.int64) * stride_dkh + \
            offs_d[None, :]
        dv_ptrs = DV + bq * stride_dvb + (k_start + rows_n) * stride_dvs + hk.to(tl.int64) * stride_dvh + \
            offs_d[None, :]
        if ACCUMULATE:
            dk += tl.load(dk_ptrs, mask=mask, other=0.0)
            dv += tl.load(dv_ptrs, mask=mask, other=0.0)
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, offs_m, offs_d, lo, hi, len_k, offset, qk_scale,
                      stride_ks, stride_vs,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
        d_ok = offs_d[None, :] < HEAD_DIM
        k_offs = tl.arange(0, BLOCK_N)[:, None] * stride_ks + offs_d[None, :]
        v_offs = tl.arange(0, BLOCK_N)[:, None] * stride_vs + offs_d[None, :]
        k_row = K_base + lo.to(tl.int64) * stride_ks
        v_row = V_base + lo.to(tl.int64) * stride_vs
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            if MASKED:
                kv_mask = (cols[:, None] < len_k) & d_ok
            else:
                kv_mask = d_ok
            k = tl.load(k_row + k_offs, mask=kv_mask, other=0.0)
            v = tl.load(v_row + v_offs, mask=kv_mask, other=0.0)
            k_row += BLOCK_N * stride_ks
            v_row += BLOCK_N * stride_vs
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            if MASKED:
                keep = cols[None, :] < len_k
                if CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + offset)
                p = tl.where(keep, p, 0.0)
            # dP = dO Vᵀ ;  dS = P ∘ (dP − delta) ;  dQ += dS K   (scale applied once at the end)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        return dq

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, SQ_START, SQ_LEN, SK_START, SK_LEN,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
        seqlen_q, seqlen_k, n_heads_q, group, qk_scale, sm_scale, causal_offset,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
        BOTTOM_RIGHT: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Q-stationary: one program owns BLOCK_M query rows of one head and loops over the visible keys.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads_q
        h = pid_bh % n_heads_q
        hk = h // group
        q_start, len_q, k_start, len_k = _seq_bounds(b, SQ_START, SQ_LEN, SK_START, SK_LEN, seqlen_q,
                                                     seqlen_k, VARLEN)
        start_m = pid_m * BLOCK_M
        if start_m >= len_q:
            return
        offset = _diag_offset(len_q, len_k, causal_offset, BOTTOM_RIGHT)
        bq = b.to(tl.int64)
        hq = h.to(tl.int64)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < len_q
        mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        rows = offs_m.to(tl.int64)[:, None]
        q = tl.load(Q + bq * stride_qb + (q_start + rows) * stride_qs + hq * stride_qh + offs_d[None, :],
                    mask=mask, other=0.0)
        do = tl.load(DO + bq * stride_dob + (q_start + rows) * stride_dos + hq * stride_doh + offs_d[None, :],
                     mask=mask, other=0.0)
        lse = tl.load(LSE + bq * stride_lb + hq * stride_lh + q_start + offs_m, mask=m_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + bq * stride_lb + hq * stride_lh + q_start + offs_m, mask=m_ok, other=0.0)
        full_end, hi = _key_blocks(start_m, len_k, offset, CAUSAL, BLOCK_M, BLOCK_N)
        K_base = K + bq * stride_kb + k_start * stride_ks + hk.to(tl.int64) * stride_kh
        V_base = V + bq * stride_vb + k_start * stride_vs + hk.to(tl.int64) * stride_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        zero = tl.full([], 0, tl.int32)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, offs_m, offs_d, zero, full_end, len_k, offset,
                           qk_scale, stride_ks, stride_vs, False, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, offs_m, offs_d, full_end, hi, len_k, offset,
                           qk_scale, stride_ks, stride_vs, True, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION)
        dq = dq * sm_scale
        dq_ptrs = DQ + bq * stride_dqb + (q_start + rows) * stride_dqs + hq * stride_dqh + offs_d[None, :]
        if ACCUMULATE:
            dq += tl.load(dq_ptrs, mask=mask, other=0.0)
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)



def _kernels() -> dict:
    return {"fwd": _fwd_kernel, "delta": _delta_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel,
            "triton": triton}


def _bwd_blocks(head_dim: int) -> dict:
    """Block sizes for the backward kernels: one fixed table (no autotuning), so the reduction order, and
    hence every gradient bit, is the same in every process. dK/dV: BLOCK_N keys stay, BLOCK_M query rows
    stream; dQ: BLOCK_M query rows stay, BLOCK_N keys stream."""
    if _backend.interpreter_enabled():
        return dict(dkdv=(16, 16), dq=(16, 16), num_warps=1, num_stages=1)
    # Chosen from scripts/compile_check.py's sm_90 resource report (2026-11-27, triton 3.9, bf16): the
    # fewest spilled bytes per head dim; GPU timings should refine them (see benchmarks/RESULTS.md).
    if head_dim <= 64:
        return dict(dkdv=(32, 64), dq=(128, 32), num_warps=8, num_stages=2)
    if head_dim <= 128:
        return dict(dkdv=(32, 64), dq=(64, 32), num_warps=8, num_stages=2)
    return dict(dkdv=(16, 64), dq=(64, 16), num_warps=8, num_stages=2)


# ---------------------------------------------------------------------------------------------------------
# Launchers. All tensors are viewed 4-D: dense [b, s, h, d]; packed [t, h, d] as [1, t, h, d] with the
# sequences given by VarlenSeqs. LSE/delta: dense [b, h, s]; packed [h, t] as [1, h, t].


def _as4d(x):
    return x if x.dim() == 4 else x.unsqueeze(0)


def _as3d_lse(x):
    return x if x.dim() == 3 else x.unsqueeze(0)


def _strides(x, varlen: bool):
    """Strides of all but the last dim; the batch stride is 0 for packed tensors, whose "batch" index is
    the sequence number and whose rows are addressed through VarlenSeqs starts."""
    return (0 if varlen else x.stride(0),) + tuple(x.stride()[1:-1])


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _seq_args(seqs: VarlenSeqs | None, q):
    if seqs is None:
        dummy = q.new_empty(1, dtype=torch.int32)
        return dummy, dummy, dummy, dummy
    return seqs.starts_q, seqs.lens_q, seqs.starts_k, seqs.lens_k


def _triton_forward(q, k, v, out, lse, softmax_scale, causal, causal_offset, seqs, merge=False):
    q4, k4, v4, o4, l3 = _as4d(q), _as4d(k), _as4d(v), _as4d(out), _as3d_lse(lse)
    b, s_q, h_q, d = q4.shape
    s_k, h_kv = k4.shape[1], k4.shape[2]
    n_batch = b if seqs is None else seqs.starts_q.numel()
    max_q = s_q if seqs is None else seqs.max_len_q
    if n_batch == 0 or max_q == 0 or h_q == 0:
        return
    kern = _kernels()
    grid = lambda meta: (kern["triton"].cdiv(max_q, meta["BLOCK_M"]), n_batch * h_q)  # noqa: E731
    vl = seqs is not None
    kern["fwd"][grid](
        q4, k4, v4, o4, l3, *_seq_args(seqs, q),
        *_strides(q4, vl), *_strides(k4, vl), *_strides(v4, vl), *_strides(o4, vl), *_strides(l3, vl),
        s_q, s_k, h_q, h_q // h_kv, softmax_scale * LOG2E, 0 if causal_offset is None else int(causal_offset),
        HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), CAUSAL=bool(causal), VARLEN=seqs is not None,
        BOTTOM_RIGHT=causal_offset is None, DOT_PRECISION=_dot_precision(q.dtype), MERGE=bool(merge),
    )


def _triton_delta(dout, out, delta, dlse):
    do4, o4, d3 = _as4d(dout), _as4d(out), _as3d_lse(delta)
    b, s, h, d = o4.shape
    if b * s * h == 0:
        return
    l3 = _as3d_lse(dlse) if dlse is not None else d3
    block_m = 16 if _backend.interpreter_enabled() else 64
    kern = _kernels()
    kern["delta"][(kern["triton"].cdiv(s, block_m), b * h)](
        do4, o4, d3, l3, do4.stride(0), do4.stride(1), do4.stride(2), o4.stride(0), o4.stride(1), o4.stride(2),
        d3.stride(0), d3.stride(1), l3.stride(0), l3.stride(1), s, h,
        HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), HAS_DLSE=dlse is not None, BLOCK_M=block_m,
    )


def _triton_backward(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale, causal, causal_offset, seqs,
                     accumulate):
    q4, k4, v4, do4 = _as4d(q), _as4d(k), _as4d(v), _as4d(dout)
    dq4, dk4, dv4 = _as4d(dq), _as4d(dk), _as4d(dv)
    l3, d3 = _as3d_lse(lse), _as3d_lse(delta)
    if l3.stride() != d3.stride():  # the kernels index both with one set of strides
        d3 = d3.contiguous() if l3.is_contiguous() else torch.empty_like(l3).copy_(d3)
    b, s_q, h_q, d = q4.shape
    s_k, h_kv = k4.shape[1], k4.shape[2]
    n_batch = b if seqs is None else seqs.starts_q.numel()
    max_q = s_q if seqs is None else seqs.max_len_q
    max_k = s_k if seqs is None else seqs.max_len_k
    if n_batch == 0 or h_q == 0:
        return
    kern = _kernels()
    cdiv = kern["triton"].cdiv
    blocks = _bwd_blocks(d)
    common = dict(HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), CAUSAL=bool(causal),
                  VARLEN=seqs is not None, BOTTOM_RIGHT=causal_offset is None, ACCUMULATE=bool(accumulate),
                  DOT_PRECISION=_dot_precision(q.dtype), num_warps=blocks["num_warps"],
                  num_stages=blocks["num_stages"])
    offset = 0 if causal_offset is None else int(causal_offset)
    seq = _seq_args(seqs, q)
    vl = seqs is not None
    if max_k > 0:
        block_m, block_n = blocks["dkdv"]
        kern["dkdv"][(cdiv(max_k, block_n), n_batch * h_kv)](
            q4, k4, v4, do4, l3, d3, dk4, dv4, *seq,
            *_strides(q4, vl), *_strides(k4, vl), *_strides(v4, vl), *_strides(do4, vl), *_strides(dk4, vl),
            *_strides(dv4, vl), *_strides(l3, vl),
            s_q, s_k, h_kv, h_q // h_kv, softmax_scale * LOG2E, softmax_scale, offset,
            BLOCK_M=block_m, BLOCK_N=block_n, **common,
        )
    if max_q > 0:
        block_m, block_n = blocks["dq"]
        kern["dq"][(cdiv(max_q, block_m), n_batch * h_q)](
            q4, k4, v4, do4, l3, d3, dq4, *seq,
            *_strides(q4, vl), *_strides(k4, vl), *_strides(v4, vl), *_strides(do4, vl), *_strides(dq4, vl),
            *_strides(l3, vl),
            s_q, s_k, h_q, h_q // h_kv, softmax_scale * LOG2E, softmax_scale, offset,
            BLOCK_M=block_m, BLOCK_N=block_n, **common,
        )


# ---------------------------------------------------------------------------------------------------------
# Reference (CPU fallback) launchers: the same contracts through ring_attn.reference in fp32 math.


def _segments(seqs: VarlenSeqs):
    return list(zip(seqs.starts_q.tolist(), seqs.lens_q.tolist(), seqs.starts_k.tolist(), seqs.lens_k.tolist()))


def _reference_forward(q, k, v, out, lse, softmax_scale, causal, causal_offset, seqs, merge=False):
    def put(o_dst, l_dst, o, l):
        if merge:
            _ref.merge_partial(o_dst, l_dst, o, l)
        else:
            o_dst.copy_(o)
            l_dst.copy_(l)

    if seqs is None:
        o, l = _ref.forward_fp32(q, k, v, softmax_scale, causal, causal_offset)
        put(out, lse, o, l)
        return
    for a_q, n_q, a_k, n_k in _segments(seqs):
        if n_q == 0:
            continue
        o, l = _ref.forward_fp32(q[None, a_q:a_q + n_q], k[None, a_k:a_k + n_k], v[None, a_k:a_k + n_k],
                                 softmax_scale, causal, causal_offset)
        put(out[a_q:a_q + n_q], lse[:, a_q:a_q + n_q], o[0], l[0])


def _reference_delta(dout, out, delta, dlse):
    dense = out.dim() == 4
    val = (dout.float() * out.float()).sum(-1)
    val = val.transpose(1, 2) if dense else val.transpose(0, 1)
    if dlse is not None:
        val = val - dlse
    delta.copy_(val)


def _reference_backward(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale, causal, causal_offset, seqs,
                        accumulate):
    def put(dst, val):
        if accumulate:
            dst += val
        else:
            dst.copy_(val)

    if seqs is None:
        gq, gk, gv = _ref.backward_fp32(dout, q, k, v, lse, delta, softmax_scale, causal, causal_offset)
        put(dq, gq)
        put(dk, gk)
        put(dv, gv)
        return
    segments = _segments(seqs)
    if not accumulate:  # overwrite the rows of every sequence; rows outside all sequences stay untouched
        for a_q, n_q, a_k, n_k in segments:
            dq[a_q:a_q + n_q] = 0
            dk[a_k:a_k + n_k] = 0
            dv[a_k:a_k + n_k] = 0
    for a_q, n_q, a_k, n_k in segments:
        if n_q == 0 or n_k == 0:
            continue
        gq, gk, gv = _ref.backward_fp32(dout[None, a_q:a_q + n_q], q[None, a_q:a_q + n_q],
                                        k[None, a_k:a_k + n_k], v[None, a_k:a_k + n_k],
                                        lse[None, :, a_q:a_q + n_q], delta[None, :, a_q:a_q + n_q],
                                        softmax_scale, causal, causal_offset)
        dq[a_q:a_q + n_q] += gq[0]
        dk[a_k:a_k + n_k] += gk[0]
        dv[a_k:a_k + n_k] += gv[0]


# ---------------------------------------------------------------------------------------------------------
# Low-level entry points (no autograd): used by the custom ops below and by the ring.


_MAX_GRID_Y = 65535  # CUDA's limit on grid dim 1, which carries (batch or sequence) x heads


def _batch_chunks(q, seqs):
    """Split the batch (dense) or the sequence list (packed) so batch x heads fits in one grid dimension.
    Yields ``(slice for dense tensors, VarlenSeqs or None)``; one chunk in all but extreme cases."""
    n = q.shape[0] if seqs is None else seqs.starts_q.numel()
    step = max(1, _MAX_GRID_Y // max(1, q.shape[-2]))
    if n <= step:
        yield slice(None), seqs
        return
    for b0 in range(0, n, step):
        b1 = min(n, b0 + step)
        if seqs is None:
            yield slice(b0, b1), None
        else:
            yield slice(None), seqs._replace(starts_q=seqs.starts_q[b0:b1], lens_q=seqs.lens_q[b0:b1],
                                             starts_k=seqs.starts_k[b0:b1], lens_k=seqs.lens_k[b0:b1])


def _lse_shape(q, packed):
    return (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])


def attention_block_forward(q, k, v, softmax_scale: float, causal: bool, causal_offset: Optional[int] = None,
                            seqs: Optional[VarlenSeqs] = None, out_dtype: Optional[torch.dtype] = None,
                            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """Attention of one (query block, key block) pair; no autograd, no input checks beyond the essentials.

    Args:
        q: ``[b, s_q, h_q, d]`` (or packed ``[t_q, h_q, d]`` with ``seqs``), fp16/bf16/fp32, last dim contiguous.
        k, v: ``[b, s_k, h_kv, d]`` (or packed ``[t_k, h_kv, d]``), same dtype and device.
        softmax_scale: multiplies ``q·k``.
        causal: mask keys ``j > i + offset``.
        causal_offset: ``offset`` above; ``None`` = ``s_k - s_q`` per sequence (bottom-right alignment).
        seqs: packed layout description (:class:`VarlenSeqs`), or None for dense.
        out_dtype: dtype of ``out`` (default: q's). The ring passes ``torch.float32`` so partial outputs are
            merged without rounding to 16 bits.
        out, lse: a running fp32 result of earlier key blocks for the same queries (``out`` shaped like q,
            ``lse`` as returned; views with any strides, unit stride along the sequence for ``lse``). When
            given, this block is merged into them in place, in the kernel's epilogue, by LSE weighting, and
            they are returned; rows outside ``seqs`` are left as they are.

    Returns:
        ``(out, lse)``: out shaped like q (contiguous) in ``out_dtype``; lse fp32 ``[b, h_q, s_q]`` (packed:
        ``[h_q, t_q]``), natural log; rows that see no key: out 0, lse ``-inf``.
    """
    packed = seqs is not None
    merge = out is not None or lse is not None
    if merge:
        if out is None or lse is None:
            raise ValueError("attention_block_forward: pass both out and lse to merge into, or neither")
        if out.dtype != torch.float32 or lse.dtype != torch.float32:
            raise TypeError(f"running out/lse must be float32 to merge into, got {out.dtype} and {lse.dtype}")
        if out.shape != q.shape or lse.shape != _lse_shape(q, packed):
            raise ValueError(f"running out {tuple(out.shape)} / lse {tuple(lse.shape)} do not match q "
                             f"{tuple(q.shape)}; expected {tuple(q.shape)} / {_lse_shape(q, packed)}")
        if out.stride(-1) != 1 or lse.stride(-1) != 1:
            raise ValueError("running out and lse need a contiguous last dim to merge into")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    run = _triton_forward if _backend.select(q.device) == "triton" else _reference_forward
    if merge:
        for sl, part in _batch_chunks(q, seqs):
            run(q[sl], k[sl], v[sl], out[sl], lse[sl], softmax_scale, causal, causal_offset, part, merge=True)
        return out, lse
    out_dtype = q.dtype if out_dtype is None else out_dtype
    fill = packed and not seqs.covers_all_q
    out = (torch.zeros if fill else torch.empty)(q.shape, dtype=out_dtype, device=q.device)
    lse = torch.full(_lse_shape(q, packed), float("-inf"), dtype=torch.float32, device=q.device) if fill else \
        torch.empty(_lse_shape(q, packed), dtype=torch.float32, device=q.device)
    for sl, part in _batch_chunks(q, seqs):
        run(q[sl], k[sl], v[sl], out[sl], lse[sl], softmax_scale, causal, causal_offset, part)
    return out, lse


def attention_delta(dout, out, dlse=None):
    """``delta = rowsum(dout · out) − dlse`` in fp32: ``[b, h, s]`` for dense ``[b, s, h, d]`` inputs,
    ``[h, t]`` for packed ``[t, h, d]``. Compute it once from the *final* output and reuse it for every
    block pair of a ring backward. ``dlse`` (optional, fp32, shaped like the result) is the gradient
    flowing into the LSE output."""
    packed = out.dim() == 3
    delta = torch.empty(_lse_shape(out, packed), dtype=torch.float32, device=out.device)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    run = _triton_delta if _backend.select(out.device) == "triton" else _reference_delta
    if dlse is not None:  # an upstream gradient may be an expanded (stride-0) view; kernels need unit stride
        dlse = dlse.float().contiguous()
    run(dout, out, delta, dlse)
    return delta


def attention_block_backward(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale: float, causal: bool,
                             causal_offset: Optional[int] = None, seqs: Optional[VarlenSeqs] = None,
                             accumulate: bool = True) -> None:
    """Gradients of one block pair, from the *final* ``lse`` and ``delta`` (see :func:`attention_delta`).

    ``dq``/``dk``/``dv`` are caller-provided tensors shaped like q/k/v (any strides with a contiguous last
    dim, e.g. slices of larger accumulators). With ``accumulate=True`` (the ring) they must be fp32 and the
    block's gradients are *added*; with ``accumulate=False`` they are overwritten (any supported dtype; with
    packed ``seqs``, rows outside every sequence are left untouched).
    ``lse`` and ``delta`` are fp32 ``[b, h_q, s_q]`` (packed ``[h_q, t_q]``) with unit stride along the
    sequence. Deterministic: no atomics, fixed block sizes.
    """
    if accumulate:
        for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
            if g.dtype != torch.float32:
                raise TypeError(f"{name} accumulator must be float32 when accumulate=True, got {g.dtype}")
    for name, g, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if g.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(g.shape)}; expected {tuple(ref.shape)}")
        if g.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {g.stride()}")
    q, k, v, dout = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, dout))
    lse, delta = (x if x.stride(-1) == 1 else x.contiguous() for x in (lse, delta))
    run = _triton_backward if _backend.select(q.device) == "triton" else _reference_backward
    for sl, part in _batch_chunks(q, seqs):
        run(dout[sl], q[sl], k[sl], v[sl], lse[sl], delta[sl], dq[sl], dk[sl], dv[sl], softmax_scale, causal,
            causal_offset, part, accumulate)


# ---------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (fake implementations give shapes), differentiable via
# register_autograd. Dense when cu_seqlens_q is None.


def _op_seqs(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q is None:
        return None
    return VarlenSeqs.from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@torch.library.custom_op("ring_attn::flash_attn_forward", mutates_args=())
def _flash_attn_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                           max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                           causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if cu_seqlens_q is not None:  # value checks need a host read; done here, outside any traced graph
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q.device)
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", q.device)
    seqs = _op_seqs(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return attention_block_forward(q, k, v, softmax_scale, causal, None, seqs)


@_flash_attn_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    packed = cu_seqlens_q is not None
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(_lse_shape(q, packed), dtype=torch.float32)


@torch.library.custom_op("ring_attn::flash_attn_backward", mutates_args=())
def _flash_attn_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                            cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                            max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                            causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = _op_seqs(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    delta = attention_delta(dout, out, dlse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    attention_block_backward(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale, causal, None, seqs,
                             accumulate=False)
    return dq, dk, dv


@_flash_attn_backward_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.meta = (max_q, max_k, scale, causal)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale, causal = ctx.meta
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.ring_attn.flash_attn_backward(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q,
                                                         max_k, scale, causal)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("ring_attn::flash_attn_forward", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Public functions


def flash_attn_func(q, k, v, causal: bool = False, softmax_scale: Optional[float] = None,
                    return_lse: bool = False):
    """Exact attention over dense batches, computed blockwise (FlashAttention-2 algorithm) with autograd.

    Args:
        q: ``[batch, seqlen_q, heads_q, head_dim]``; float16, bfloat16 or float32. Any strides with a contiguous
            last dim (e.g. a view of a fused qkv projection) are used without copies.
        k, v: ``[batch, seqlen_k, heads_kv, head_dim]``, same dtype and device; ``heads_q % heads_kv == 0``
            (GQA/MQA: query head ``h`` reads kv head ``h // (heads_q // heads_kv)``; K/V are never repeated).
            ``head_dim`` is a multiple of 8 up to 256.
        causal: mask so query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q`` (bottom-right aligned, as in
            flash-attn >= 2.1). A query that sees no key gets output 0 and ``lse = -inf``.
        softmax_scale: default ``1 / sqrt(head_dim)``.
        return_lse: also return the log-sum-exp.

    Returns:
        ``out`` ``[batch, seqlen_q, heads_q, head_dim]`` in the input dtype; with ``return_lse``, also ``lse``
        float32 ``[batch, heads_q, seqlen_q]``, natural log of the softmax denominator (differentiable).

    Raises:
        TypeError / ValueError naming the argument for wrong types, ranks, dtypes, devices, head counts or
        head dims, before any kernel runs.
    """
    _h_q, _h_kv, d = _check_qkv(q, k, v, packed=False)
    scale = _check_scale(softmax_scale, d)
    out, lse = torch.ops.ring_attn.flash_attn_forward(q, k, v, None, None, q.shape[1], k.shape[1], scale,
                                                      bool(causal))
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           causal: bool = False, softmax_scale: Optional[float] = None, return_lse: bool = False):
    """Exact attention over packed sequences of different lengths, with autograd.

    Args:
        q: ``[total_q, heads_q, head_dim]``: sequence ``i`` is rows ``cu_seqlens_q[i] : cu_seqlens_q[i+1]``.
        k, v: ``[total_k, heads_kv, head_dim]``, split by ``cu_seqlens_k``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[n_seqs + 1]`` on q's device, starting at 0, non-decreasing,
            ending at the token count. Zero-length sequences are allowed.
        max_seqlen_q, max_seqlen_k: the longest sequence in each (an upper bound is fine).
        causal, softmax_scale, return_lse: as in :func:`flash_attn_func`; causal is bottom-right aligned
            per sequence.

    Returns:
        ``out`` ``[total_q, heads_q, head_dim]``; with ``return_lse`` also ``lse`` float32 ``[heads_q, total_q]``.

    Raises:
        as :func:`flash_attn_func`, plus ValueError/TypeError for malformed ``cu_seqlens`` (wrong dtype, not
        starting at 0, decreasing, last entry not the token count, a sequence longer than ``max_seqlen``).
    """
    _h_q, _h_kv, d = _check_qkv(q, k, v, packed=True)
    scale = _check_scale(softmax_scale, d)
    _check_cu_seqlens_form("cu_seqlens_q", cu_seqlens_q)
    _check_cu_seqlens_form("cu_seqlens_k", cu_seqlens_k)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.shape[0]}; both must be n_seqs + 1")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    out, lse = torch.ops.ring_attn.flash_attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, scale, bool(causal))
    return (out, lse) if return_lse else out
