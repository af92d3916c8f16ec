"""Triton kernels of blockwise (flash) attention: forward (with the fp32 merge epilogue), delta, backward.

Sliding windows, soft-capping, ALiBi and the interpreter's bf16 fix are constexpr switches (see fwd_kernel); the
host launchers are in ``ring_attn/backends/triton/attention.py``. Conventions: ``docs/design.md`` (layouts,
GQA mapping, causal offset, LSE in natural log, ``lse = -inf`` and output 0 for a row that sees no key).
"""
import triton
import triton.language as tl

from ring_attn.backends import interpreter_enabled
from ring_attn.backends.triton import tiles as _tiles

__all__ = ["fwd_kernel", "fwd_tma_kernel", "delta_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel",
           "FWD_CONFIGS"]

interpret = interpreter_enabled()

# Forward tiles: by default the launcher passes a fixed tile from ``tiles.fwd_tile`` (same tile in every
# process: reproducible bits) to ``fwd_kernel.fn``; these configs are the opt-in autotuning candidates
# (RING_ATTN_AUTOTUNE=1), pruned by a static shared-memory estimate before anything is compiled. One small
# config under the interpreter, where every config would be run and small blocks exercise the tails.
if interpret:
    FWD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
else:
    FWD_CONFIGS = [triton.Config({"BLOCK_M": t["BLOCK_M"], "BLOCK_N": t["BLOCK_N"]}, num_warps=t["num_warps"],
                                 num_stages=t["num_stages"]) for t in _tiles.fwd_candidates(16, "bf16", 90)]


def _prune(configs, named_args, **kwargs):
    # before compiling, drop configs over shared memory or past the spill edge (tiles.fits: static estimates)
    d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 128))
    dtype = "fp32" if kwargs.get("DOT_PRECISION", named_args.get("DOT_PRECISION")) == "ieee" else "bf16"
    arch = _tiles.current_arch()
    kept = [c for c in configs if _tiles.fits(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages),
                                               d, dtype, arch)]
    return kept or configs[-1:]

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
def _tanh(x):
    """fp32 tanh to about 1 ulp: an odd Taylor polynomial for |x| < 0.2 (no cancellation near 0), else
    ``(1 - e^-2|x|) / (1 + e^-2|x|)`` (libdevice's tanh does not run under the interpreter)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    y = a * a
    small = a * (1.0 + y * (-0.3333333333333333 + y * (0.13333333333333333 + y * (-0.05396825396825397 +
                                                                                   y * 0.021869488536155203))))
    t = tl.where(a < 0.2, small, big)
    return tl.where(x < 0, -t, t)

@triton.jit
def _round_bf16(x):
    """float32 -> the nearest bfloat16 value (ties to even), still float32. Only under the interpreter, whose
    float32 -> bfloat16 cast truncates while GPUs round to nearest."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))

@triton.jit
def _log2_scores(qk, qk_scale, softcap_in, softcap_out, SOFTCAP: tl.constexpr):
    """Scores in the log2 domain: ``qk·scale·log2(e)``, or with a soft-cap ``c``:
    ``c·tanh(qk·scale/c)·log2(e)`` (host passes ``softcap_in = scale/c``, ``softcap_out = c·log2(e)``)."""
    if SOFTCAP:
        return _tanh(qk * softcap_in) * softcap_out
    else:
        return qk * qk_scale

@triton.jit
def _dropout_keep(drop_base, rows, first_key, drop_groups, drop_seed, drop_thresh, BLOCK_N: tl.constexpr):
    """Keep-mask ``[rows, BLOCK_N]`` of attention dropout (``ring_attn._contracts.Dropout``) for the query ``rows``
    (indices within the sequence, a vector) and the keys ``first_key + arange(BLOCK_N)`` (``first_key`` a
    multiple of 4). One Philox call (``tl.randint4x``) gives the four words of four adjacent keys: word ``w`` of
    counter ``(drop_base + row) · drop_groups + key // 4`` decides key ``4 · (key // 4) + w``. ``drop_base`` =
    head·rows + the sequence's first row in the call's row space (scalar, or one per row when GQA heads are
    packed); ``drop_groups`` = ceil(keys / 4); ``drop_thresh`` = floor(p · 2^32), compared as uint32."""
    grp = (drop_base + rows)[:, None] * drop_groups + (first_key // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(drop_seed, grp)
    thresh = drop_thresh.to(tl.uint32)
    # [rows, BLOCK_N/4, 2, 2] with word 2a + c at [..., a, c], then row-major: key 4g + w takes word w
    keep = tl.join(tl.join((r0 >= thresh).to(tl.int8), (r2 >= thresh).to(tl.int8)),
                   tl.join((r1 >= thresh).to(tl.int8), (r3 >= thresh).to(tl.int8)))
    return tl.reshape(keep, [rows.shape[0], BLOCK_N]) != 0

@triton.jit
def _alibi_bias(rows, cols, offset, slope2):
    """ALiBi in the log2 domain: ``-slope·log2(e)·|i + offset - j|`` (``slope2 = slope·log2(e)``) for
    broadcastable query rows ``i`` and key columns ``j`` (positions within the sequence)."""
    return -slope2 * tl.abs(rows + offset - cols).to(tl.float32)

@triton.jit
def _alibi_slope2(ALIBI_SLOPES, b, h, stride_ab, stride_ah, ALIBI: tl.constexpr):
    """``slope·log2(e)`` of (batch or packed sequence ``b``, query head ``h``); 0 without ALiBi (unused)."""
    if ALIBI:
        return tl.load(ALIBI_SLOPES + b.to(tl.int64) * stride_ab + h.to(tl.int64) * stride_ah) * \
            1.4426950408889634
    else:
        return 0.0

@triton.jit
def _key_range(start_m, len_k, off_lo, off_hi, LOCAL: tl.constexpr, CAUSAL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges for the query rows [start_m, start_m + BLOCK_M); row i sees keys j < len_k with
    ``j <= i + off_hi`` (if CAUSAL: causal or a right window) and ``j >= i + off_lo`` (if LOCAL: a left
    window). Returns ``(lo, full_lo, full_hi, hi)``: [lo, hi) holds every key any row sees (blocks outside it
    are never visited); [full_lo, full_hi) are whole in-bounds blocks that every row sees entirely (unmasked
    fast loop); [lo, full_lo) and [full_hi, hi) are masked. lo, full_lo, full_hi are multiples of BLOCK_N."""
    if CAUSAL:
        hi = tl.minimum(len_k, start_m + BLOCK_M + off_hi)
        full_hi = tl.minimum(len_k, start_m + off_hi + 1)
    else:
        hi = len_k
        full_hi = len_k
    hi = tl.maximum(hi, 0)
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    if LOCAL:
        hi_blk = (hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        lo = tl.minimum(tl.maximum(start_m + off_lo, 0) // BLOCK_N * BLOCK_N, hi_blk)
        full_lo = (tl.maximum(start_m + BLOCK_M - 1 + off_lo, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi_blk)
        full_hi = tl.maximum(full_hi, full_lo)
    else:
        lo = tl.full([], 0, tl.int32)
        full_lo = lo
    return lo, full_lo, full_hi, hi

@triton.jit
def _query_range(start_n, len_q, off_lo, off_hi, LOCAL: tl.constexpr, CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-row ranges for the keys [start_n, start_n + BLOCK_N) (the transpose of :func:`_key_range`):
    query i sees key j iff ``j - off_hi <= i`` (CAUSAL) and ``i <= j - off_lo`` (LOCAL). Returns
    ``(lo, full_lo, full_hi, hi)``: rows outside [lo, hi) see none of these keys and are never visited;
    [full_lo, full_hi) are whole in-bounds row blocks that see every key (unmasked); the rest is masked."""
    if LOCAL:
        hi = tl.maximum(tl.minimum(len_q, start_n + BLOCK_N - off_lo), 0)
        full_hi = tl.maximum(tl.minimum(len_q, start_n - off_lo + 1), 0) // BLOCK_M * BLOCK_M
        cap = (hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        hi = len_q
        full_hi = len_q // BLOCK_M * BLOCK_M
        cap = len_q
    if CAUSAL:
        lo = tl.minimum(tl.maximum(start_n - off_hi, 0) // BLOCK_M * BLOCK_M, cap)
        full_lo = (tl.maximum(start_n + BLOCK_N - 1 - off_hi, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        full_lo = tl.minimum(tl.maximum(full_lo, lo), cap)
        full_hi = tl.maximum(full_hi, full_lo)
    else:
        lo = tl.full([], 0, tl.int32)
        full_lo = lo
    return lo, full_lo, full_hi, hi

@triton.jit
def _dropout_base(h, b, q_start, seqlen_q, drop_row0, drop_rows, VARLEN: tl.constexpr, DROPOUT: tl.constexpr):
    """``head · rows + first row of the sequence`` in the dropout counter's row space (see
    :func:`_dropout_keep`); ``h`` may be a vector (packed GQA heads). 0 without DROPOUT (nothing computed)."""
    if DROPOUT:
        if VARLEN:
            return h.to(tl.int64) * drop_rows + drop_row0 + q_start
        else:
            return h.to(tl.int64) * drop_rows + drop_row0 + b.to(tl.int64) * seqlen_q
    else:
        return 0

@triton.jit
def _q_program(SQ_START, SQ_LEN, SK_START, SK_LEN, seqlen_q, seqlen_k, n_heads_q, group, CAUSAL: tl.constexpr,
               VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Who a query-stationary program (grid ``(cdiv(max s_q, BLOCK_M), batch * h_q)``) is: its first query
    row ``start_m``, batch (or packed sequence) ``b``, query head ``h``, kv head ``hk`` and the sequence
    bounds. Causal grids run heaviest first: the last query blocks see the most keys, so they are launched
    first instead of making a tail."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_q
    h = pid_bh % n_heads_q
    q_start, len_q, k_start, len_k = _seq_bounds(b, SQ_START, SQ_LEN, SK_START, SK_LEN, seqlen_q,
                                                 seqlen_k, VARLEN)
    return pid_m * BLOCK_M, b, h, h // group, q_start, len_q, k_start, len_k

@triton.jit
def _fwd_finish(acc, l_i, m_i, o_ptrs, L_ptrs, row_ok, o_mask, MERGE: tl.constexpr):
    """Normalise the online softmax (``acc / l``, ``lse = m + log l`` in natural log; a row that saw no key
    gets out 0 and lse -inf) and, with MERGE, fold it into the running fp32 (out, lse) of earlier blocks
    (the ring's steps): lse' = log(e^lse_old + e^lse), out' = (e^lse_old·out_old + e^lse·out) / e^lse'.
    An fp64 LSE buffer (the ring's running LSE) gets ``m + log l`` added in fp64 and merged in fp64, so the
    merge weights do not carry the fp32 rounding of a large LSE (an ulp of 650 is 6e-5); the exponentials
    stay fp32 (their arguments are small). Returns ``(out, lse)``: out fp32, lse in the buffer's dtype."""
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    log_l = tl.math.log2(tl.where(empty, 1.0, l_i))
    if L_ptrs.dtype.element_ty == tl.float64:
        lse = tl.where(empty, float("-inf"), (m_i.to(tl.float64) + log_l.to(tl.float64)) * 0.6931471805599453)
    else:
        lse = tl.where(empty, float("-inf"), (m_i + log_l) * 0.6931471805599453)
    if MERGE:
        lse_old = tl.load(L_ptrs, mask=row_ok, other=float("-inf"))
        o_old = tl.load(o_ptrs, mask=o_mask, other=0.0)
        m = tl.maximum(lse_old, lse)
        m = tl.where(m == float("-inf"), 0.0, m)
        w_old = tl.exp((lse_old - m).to(tl.float32))
        w_new = tl.exp((lse - m).to(tl.float32))
        total = w_old + w_new
        acc = (o_old * w_old[:, None] + acc * w_new[:, None]) / tl.where(total == 0.0, 1.0, total)[:, None]
        lse = tl.where(total == 0.0, float("-inf"), m + tl.log(tl.where(total == 0.0, 1.0, total)).to(m.dtype))
    return acc, lse

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_base, V_base, offs_m, offs_d, lo, hi, len_k, off_lo, off_hi, qk_scale,
               softcap_in, softcap_out, stride_ks, stride_vs, offset, slope2,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, LOCAL: tl.constexpr, SOFTCAP: tl.constexpr,
               UPCAST: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIBI: tl.constexpr,
               drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT: tl.constexpr,
               BT_row, page_size, PAGED: tl.constexpr, PAGE_ALIGN: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    # loop-invariant int32 offsets + a scalar int64 base per step: far fewer registers than carrying
    # [BLOCK_N, BLOCK_D] tensors of 64-bit pointers through the loop
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vs + offs_d[None, :]
    d_ok = offs_d[None, :] < HEAD_DIM
    k_row = K_base + lo.to(tl.int64) * stride_ks  # scalar pointers to the current block's first row
    v_row = V_base + lo.to(tl.int64) * stride_vs
    # paged: the next block's table entries are loaded one block ahead (a table load in front of every K/V load
    # would leave the pipeliner one K/V stage instead of two); masked past the last key. One entry when a block
    # lies inside one page, else one per key.
    if BLOCK_N <= PAGE_ALIGN:
        page_next = tl.load(BT_row + lo // page_size, mask=(lo < len_k) & PAGED, other=0)
    else:
        page_next = tl.load(BT_row + (lo + offs_n) // page_size, mask=((lo + offs_n) < len_k) & PAGED, other=0)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if PAGED:  # key j is row table[j // page_size] * page_size + j % page_size of the flattened pages
            if BLOCK_N <= PAGE_ALIGN:  # BLOCK_N divides page_size: the block lies in one page, a strided tile
                prow0 = page_next.to(tl.int64) * page_size + start_n % page_size
                nxt = start_n + BLOCK_N
                page_next = tl.load(BT_row + nxt // page_size, mask=nxt < len_k, other=0)
                k_ptrs = K_base + prow0 * stride_ks + k_offs
                v_ptrs = V_base + prow0 * stride_vs + v_offs
            else:  # the block spans pages: one table entry per key, rows gathered
                prow = page_next.to(tl.int64) * page_size + cols % page_size
                page_next = tl.load(BT_row + (cols + BLOCK_N) // page_size, mask=(cols + BLOCK_N) < len_k, other=0)
                k_ptrs = K_base + (prow * stride_ks)[:, None] + offs_d[None, :]
                v_ptrs = V_base + (prow * stride_vs)[:, None] + offs_d[None, :]
        else:
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
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            s = _log2_scores(qk, qk_scale, softcap_in, softcap_out, SOFTCAP)
            if ALIBI:
                s += _alibi_bias(offs_m[:, None], cols[None, :], offset, slope2)
            visible = cols[None, :] < len_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + off_hi)
            if LOCAL:
                visible = visible & (cols[None, :] >= offs_m[:, None] + off_lo)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
        elif SOFTCAP or ALIBI:
            s = _log2_scores(qk, qk_scale, softcap_in, softcap_out, SOFTCAP)
            if ALIBI:
                s += _alibi_bias(offs_m[:, None], cols[None, :], offset, slope2)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        else:  # scale folded into one multiply-add per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax before dropout (its LSE is the output's)
        acc = acc * alpha[:, None]
        if DROPOUT:  # zero the dropped probabilities; the kept ones are scaled once, at the end
            p = tl.where(_dropout_keep(drop_base, offs_m, start_n, drop_groups, drop_seed, drop_thresh, BLOCK_N),
                         p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        k_row += BLOCK_N * stride_ks
        v_row += BLOCK_N * stride_vs
    return acc, l_i, m_i

# restore_value: while tuning, every trial of a MERGE launch must start from the same running (O, LSE)
# (opt-in autotuning; the key has MERGE and the length so one call's shape does not pick for every other)
@triton.autotune(configs=FWD_CONFIGS, key=["HEAD_DIM", "CAUSAL", "VARLEN", "DOT_PRECISION", "MERGE",
                                           "ALIBI", "seqlen_q"],
                 prune_configs_by={"early_config_prune": _prune}, restore_value=["O", "LSE"])
@triton.jit
def fwd_kernel(
    Q, K, V, O, LSE, SQ_START, SQ_LEN, SK_START, SK_LEN,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads_q, group, qk_scale, causal_offset, win_left, win_right, softcap_in,
    softcap_out, ALIBI_SLOPES, stride_ab, stride_ah, split_len, stride_o_split, stride_l_split,
    drop_row0, drop_rows, drop_groups, drop_seed, drop_thresh, drop_scale, BLOCK_TABLE, stride_btb, page_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr, MERGE: tl.constexpr,
    LOCAL: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIBI: tl.constexpr = False, SPLIT: tl.constexpr = False,
    PACK_GQA: tl.constexpr = False, DROPOUT: tl.constexpr = False, PAGED: tl.constexpr = False,
    PAGE_ALIGN: tl.constexpr = 1,
):
    # Q [b, s_q, h_q, d] (varlen: b = n_seqs, rows at SQ_START[b]..+SQ_LEN[b] of a packed [t, h_q, d]);
    # K, V [b, s_k, h_kv, d]; O like Q (its own strides); LSE [b, h_q, s_q] with unit stride along s.
    # Grid: (cdiv(max s_q, BLOCK_M), b * h_q). One program owns BLOCK_M query rows of one head.
    # Visibility (backends/protocol.py): CAUSAL masks keys j > i + offset + win_right (the host passes
    # win_right = 0 for causal, and CAUSAL=True for a right window); LOCAL masks j < i + offset - win_left.
    # SOFTCAP: scores c·tanh(s/c). ALIBI: plus -slope·|i + offset - j| (fp32 slopes ALIBI_SLOPES[b, h] with
    # strides stride_ab/stride_ah; stride_ab = 0 for per-head slopes), in the unmasked loops too.
    # UPCAST: dot operands in fp32 (bf16 under the interpreter, whose bf16 tl.dot is wrong); ROUND_BF16:
    # round to nearest when storing bf16 there (its cast truncates).
    # SPLIT (split-KV, for grids too small to fill the GPU, e.g. decoding): grid axis 2 is the split; split s
    # visits only keys [s·split_len, (s+1)·split_len) (split_len a multiple of BLOCK_N) and writes its partial
    # PACK_GQA (decoding with GQA): grid axis 1 is batch x kv head, and the BLOCK_M rows of a program are
    # (token, query head) pairs of that kv head's group, row r = token·group + head-in-group, so a program
    # reads its K/V once for the whole group. The key ranges are computed from the block's first token and
    # BLOCK_M tokens (a superset: every row is masked by its own token).
    # PAGED (a paged KV cache, ring_attn._contracts.KVPages; packed only): K/V are the pages flattened to rows
    # and key j of sequence b is row BLOCK_TABLE[b, j // page_size] * page_size + j % page_size (SK_START is
    # not read). PAGE_ALIGN: a power of two dividing page_size; when BLOCK_N <= PAGE_ALIGN every key block lies
    # in one page (one table entry, a strided tile as without pages), else each block loads its BLOCK_N table
    # entries and gathers rows.
    if PACK_GQA:
        pid_r = tl.program_id(0)
        if CAUSAL:
            pid_r = tl.num_programs(0) - 1 - pid_r
        pid_bh = tl.program_id(1)
        b = pid_bh // (n_heads_q // group)
        hk = pid_bh % (n_heads_q // group)
        q_start, len_q, k_start, len_k = _seq_bounds(b, SQ_START, SQ_LEN, SK_START, SK_LEN, seqlen_q, seqlen_k,
                                                     VARLEN)
        rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_m = rows // group  # each row's token: what the masks and ALiBi see
        h = hk * group + rows % group  # each row's query head
        start_m = pid_r * BLOCK_M // group
    else:
        start_m, b, h, hk, q_start, len_q, k_start, len_k = _q_program(SQ_START, SQ_LEN, SK_START, SK_LEN,
                                                                      seqlen_q, seqlen_k, n_heads_q, group,
                                                                      CAUSAL, VARLEN, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
    if start_m >= len_q:
        return
    offset = _diag_offset(len_q, len_k, causal_offset, BOTTOM_RIGHT)
    off_hi = offset + win_right
    off_lo = offset - win_left
    slope2 = _alibi_slope2(ALIBI_SLOPES, b, h, stride_ab, stride_ah, ALIBI)
    if PACK_GQA:
        if ALIBI:
            slope2 = slope2[:, None]  # one slope per row (its query head)
    # DROPOUT (ring_attn._contracts.Dropout): row r of the call is drop_row0 + (packed: q_start; dense:
    # b·seqlen_q) + i, and each head has drop_rows of them
    # (packed: one per row, a [BLOCK_M] vector like the rows' indices)
    drop_base = _dropout_base(h, b, q_start, seqlen_q, drop_row0, drop_rows, VARLEN, DROPOUT)
    bq = b.to(tl.int64)
    if PAGED:
        K_base = K + hk.to(tl.int64) * stride_kh
        V_base = V + hk.to(tl.int64) * stride_vh
    else:
        K_base = K + bq * stride_kb + k_start * stride_ks + hk.to(tl.int64) * stride_kh
        V_base = V + bq * stride_vb + k_start * stride_vs + hk.to(tl.int64) * stride_vh
    BT_row = BLOCK_TABLE + bq * stride_btb
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m[:, None] < len_q
    d_ok = offs_d[None, :] < HEAD_DIM
    if PACK_GQA:
        q_rows = offs_m.to(tl.int64) * stride_qs + h.to(tl.int64) * stride_qh
        q = tl.load(Q + bq * stride_qb + q_start * stride_qs + q_rows[:, None] + offs_d[None, :],
                    mask=row_ok & d_ok, other=0.0)
    else:
        Q_base = Q + bq * stride_qb + q_start * stride_qs + h.to(tl.int64) * stride_qh
        q = tl.load(Q_base + offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :], mask=row_ok & d_ok,
                    other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, full_lo, full_hi, hi = _key_range(start_m, len_k, off_lo, off_hi, LOCAL, CAUSAL, BLOCK_M, BLOCK_N)
    if SPLIT:  # clamp the ranges to this split's keys (monotone, block-aligned: their order and roles hold)
        split = tl.program_id(2)
        s0 = split * split_len
        s1 = s0 + split_len
        lo = tl.minimum(tl.maximum(lo, s0), s1)
        full_lo = tl.minimum(tl.maximum(full_lo, s0), s1)
        full_hi = tl.minimum(tl.maximum(full_hi, s0), s1)
        hi = tl.minimum(tl.maximum(hi, s0), s1)
        O += split.to(tl.int64) * stride_o_split
        LSE += split.to(tl.int64) * stride_l_split
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    if LOCAL:  # the window's left edge (without a left window, lo = full_lo = 0: nothing to compile)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, offs_m, offs_d, lo, full_lo, len_k, off_lo,
                                   off_hi, qk_scale, softcap_in, softcap_out, stride_ks, stride_vs, offset, slope2,
                                   True, CAUSAL, LOCAL, SOFTCAP, UPCAST, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PRECISION,
                                   ALIBI, drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT,
                                   BT_row, page_size, PAGED, PAGE_ALIGN)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, offs_m, offs_d, full_lo, full_hi, len_k,
                               off_lo, off_hi, qk_scale, softcap_in, softcap_out, stride_ks, stride_vs, offset,
                               slope2, False, CAUSAL, LOCAL, SOFTCAP, UPCAST, EVEN_D, HEAD_DIM, BLOCK_N,
                               DOT_PRECISION, ALIBI, drop_base, drop_groups, drop_seed, drop_thresh, drop_scale,
                               DROPOUT, BT_row, page_size, PAGED, PAGE_ALIGN)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, offs_m, offs_d, full_hi, hi, len_k, off_lo,
                               off_hi, qk_scale, softcap_in, softcap_out, stride_ks, stride_vs, offset, slope2,
                               True, CAUSAL, LOCAL, SOFTCAP, UPCAST, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PRECISION,
                               ALIBI, drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT,
                               BT_row, page_size, PAGED, PAGE_ALIGN)
    if PACK_GQA:
        o_rows = offs_m.to(tl.int64) * stride_os + h.to(tl.int64) * stride_oh
        o_ptrs = O + bq * stride_ob + q_start * stride_os + o_rows[:, None] + offs_d[None, :]
        l_ptrs = LSE + bq * stride_lb + q_start + h.to(tl.int64) * stride_lh + offs_m
    else:
        O_base = O + bq * stride_ob + q_start * stride_os + h.to(tl.int64) * stride_oh
        o_ptrs = O_base + offs_m.to(tl.int64)[:, None] * stride_os + offs_d[None, :]
        l_ptrs = LSE + bq * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    if DROPOUT:
        acc = acc * drop_scale
    acc, lse = _fwd_finish(acc, l_i, m_i, o_ptrs, l_ptrs, offs_m < len_q, row_ok & d_ok, MERGE)
    if ROUND_BF16:
        acc = _round_bf16(acc)
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok & d_ok)
    tl.store(l_ptrs, lse, mask=offs_m < len_q)

@triton.jit
def split_combine_kernel(
    OP, LP, O, LSE, SQ_START, SQ_LEN,
    stride_opb, stride_ops, stride_oph, stride_lpb, stride_lph, stride_o_split, stride_l_split,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, n_heads_q, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # The split-KV epilogue: the fp32 partials (OP [splits, b, s, h, d], LP [splits, b, h, s]; packed: b = 1
    # with sequences at SQ_START) of fwd_kernel's SPLIT launch, combined by LSE into O (its dtype) and LSE:
    # lse = m + log(sum_s e^(lse_s - m)), out = sum_s e^(lse_s - lse)·out_s, splits added in increasing
    # order. Grid: (cdiv(max s_q, BLOCK_M), b * h_q); only rows inside a sequence are read or written (a
    # split that saw no key holds out 0 and lse -inf; a row no split saw gets 0 and -inf).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_q
    h = pid_bh % n_heads_q
    # the query bounds (the key ones are not needed: the q arrays stand in for them)
    q_start, len_q, _, _ = _seq_bounds(b, SQ_START, SQ_LEN, SQ_START, SQ_LEN, seqlen_q, seqlen_q, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if pid_m * BLOCK_M >= len_q:
        return
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < len_q
    o_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    bq = b.to(tl.int64)
    lp = LP + bq * stride_lpb + h.to(tl.int64) * stride_lph + q_start + offs_m
    op = OP + bq * stride_opb + (q_start + offs_m.to(tl.int64))[:, None] * stride_ops + \
        h.to(tl.int64) * stride_oph + offs_d[None, :]
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(lp + s * stride_l_split, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, n_splits):
        w = tl.exp(tl.load(lp + s * stride_l_split, mask=row_ok, other=float("-inf")) - m_safe)
        total += w
        acc += w[:, None] * tl.load(op + s * stride_o_split, mask=o_mask, other=0.0)
    empty = total == 0.0
    acc = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total)))
    if ROUND_BF16:
        acc = _round_bf16(acc)
    o_ptrs = O + bq * stride_ob + (q_start + offs_m.to(tl.int64))[:, None] * stride_os + \
        h.to(tl.int64) * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + bq * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m, lse, mask=row_ok)

@triton.jit
def _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, offs_m, lo, hi, len_k, off_hi, qk_scale,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """The key loop of :func:`fwd_tma_kernel`: K/V tiles come through tensor descriptors (TMA on sm_90;
    rows past ``len_k`` read as zeros and are masked out of the scores when MASKED)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([start_n, 0])
        v = desc_v.load([start_n, 0])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            cols = start_n + offs_n
            visible = cols[None, :] < len_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + off_hi)
            s = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp2 gives 0
            p = tl.math.exp2(s - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i

@triton.jit
def fwd_tma_kernel(
    Q, K, V, O, LSE, SQ_START, SQ_LEN, SK_START, SK_LEN,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads_q, group, qk_scale, causal_offset,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MERGE: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
    O_DESC: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The forward of :func:`fwd_kernel` with Q/K/V (and O when ``O_DESC``) moved by tensor descriptors
    built in the kernel (``tl.make_tensor_descriptor``: TMA on sm_90), the key loop a
    ``tl.range(..., warp_specialize=True)`` when WARP_SPECIALIZE (one loop, every block masked: what Triton
    3.9's Hopper pass accepts; it engages at ``num_warps=4`` only, turning the program into a TMA producer
    warpgroup and two 64-row consumer warpgroups, 12 warps). Same arguments, grid, heaviest-first causal order
    and fp32 MERGE epilogue; no sliding window, soft-cap or ALiBi (the launcher falls back to fwd_kernel).
    A descriptor per (sequence, head): base ``X + b·stride_b + start·stride_s + h·stride_h``, shape
    ``[len, HEAD_DIM]``, row stride ``stride_s``; the launcher guarantees 16-byte aligned bases and strides
    and a contiguous last dim, as TMA requires. Rows past the sequence read as zero and are not written."""
    start_m, b, h, hk, q_start, len_q, k_start, len_k = _q_program(SQ_START, SQ_LEN, SK_START, SK_LEN, seqlen_q,
                                                                  seqlen_k, n_heads_q, group, CAUSAL, VARLEN,
                                                                  BLOCK_M)
    # no early return (Hopper's warp specialisation pass rejects the branch it makes): a block past the
    # sequence (varlen) visits no key, loads zeros and stores nothing (descriptor clipping, masks)
    off_hi = _diag_offset(len_q, len_k, causal_offset, BOTTOM_RIGHT)
    bq = b.to(tl.int64)
    # an empty packed sequence gets a one-row descriptor at row 0 (TMA has no zero-size dims, and its start
    # may be the end of the allocation); nothing is read from it (no key is visited, Q rows are unused)
    # and nothing is written (O and LSE stores are masked by len_q)
    q_row0 = q_start * tl.minimum(len_q, 1)  # (arithmetic, not tl.where: Triton 3.6's interpreter
    k_row0 = k_start * tl.minimum(len_k, 1)  # cannot take the 1-element result as a loop bound or shape)
    Q_base = Q + bq * stride_qb + q_row0 * stride_qs + h.to(tl.int64) * stride_qh
    K_base = K + bq * stride_kb + k_row0 * stride_ks + hk.to(tl.int64) * stride_kh
    V_base = V + bq * stride_vb + k_row0 * stride_vs + hk.to(tl.int64) * stride_vh
    desc_q = tl.make_tensor_descriptor(Q_base, shape=[tl.maximum(len_q, 1), HEAD_DIM], strides=[stride_qs, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    desc_k = tl.make_tensor_descriptor(K_base, shape=[tl.maximum(len_k, 1), HEAD_DIM], strides=[stride_ks, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(V_base, shape=[tl.maximum(len_k, 1), HEAD_DIM], strides=[stride_vs, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = desc_q.load([start_m, 0])
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, full_lo, full_hi, hi = _key_range(start_m, len_k, off_hi, off_hi, False, CAUSAL, BLOCK_M, BLOCK_N)
    hi = hi * tl.maximum(tl.minimum(len_q - start_m, 1), 0)  # a block past the sequence: no key
    full_hi = tl.minimum(full_hi, hi)
    if WARP_SPECIALIZE:
        # Triton's Hopper warp specialisation (3.9) takes one specialised loop with no branch in its body:
        # two loops in a row abort the compiler (an MLIR dominance assertion) and an `if` in the body turns
        # it off silently. So one loop over every visited key block, the mask applied on each.
        acc, l_i, m_i = _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, offs_m, lo, hi, len_k, off_hi,
                                       qk_scale, True, CAUSAL, UPCAST, BLOCK_N, DOT_PRECISION, True)
    else:  # unmasked blocks, then the masked diagonal / ragged tail, as in fwd_kernel
        acc, l_i, m_i = _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, offs_m, lo, full_hi, len_k, off_hi,
                                       qk_scale, False, CAUSAL, UPCAST, BLOCK_N, DOT_PRECISION, False)
        acc, l_i, m_i = _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, offs_m, full_hi, hi, len_k, off_hi,
                                       qk_scale, True, CAUSAL, UPCAST, BLOCK_N, DOT_PRECISION, False)
    O_base = O + bq * stride_ob + q_start * stride_os + h.to(tl.int64) * stride_oh
    L_base = LSE + bq * stride_lb + h.to(tl.int64) * stride_lh + q_start
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < len_q
    o_ptrs = O_base + offs_m.to(tl.int64)[:, None] * stride_os + offs_d[None, :]
    acc, lse = _fwd_finish(acc, l_i, m_i, o_ptrs, L_base + offs_m, offs_m < len_q, row_ok, MERGE)
    if ROUND_BF16:
        acc = _round_bf16(acc)
    if O_DESC:  # 16-bit dense output: one TMA store, rows past len_q clipped by the descriptor
        desc_o = tl.make_tensor_descriptor(O_base, shape=[len_q, HEAD_DIM], strides=[stride_os, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        desc_o.store([start_m, 0], acc.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok)
    tl.store(L_base + offs_m, lse, mask=offs_m < len_q)

@triton.jit
def delta_kernel(DO, O, DELTA, DLSE,
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
def _spin_until(lock, target):
    # Every thread polls the counter with an acquire load until it equals target: one PTX loop, no nested
    # control flow, so Triton still software-pipelines the enclosing loop's loads (a `while` would not).
    # Never a silent hang: after 2^26 polls (tens of seconds; a real wait is one step's skew, microseconds)
    # the kernel traps, and the launch fails with a CUDA error instead of spinning forever.
    return tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        .reg .u32 n;
        mov.u32 n, 0;
        SPIN_${:uid}:
        ld.global.acquire.gpu.b32 $0, [$1];
        setp.eq.s32 p, $0, $2;
        @p bra DONE_${:uid};
        add.u32 n, n, 1;
        setp.ge.u32 p, n, 67108864;
        @p trap;
        bra SPIN_${:uid};
        DONE_${:uid}:
        }""",
        "=r,l,r", [lock, target], dtype=tl.int32, is_pure=False, pack=1)

@triton.jit
def _cta_barrier():
    # bar.sync as an opaque instruction: tl.debug_barrier() stops Triton from pipelining the enclosing loop.
    tl.inline_asm_elementwise("bar.sync 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)

@triton.jit
def _add_dq(dq, dq_ptrs, mask, lock, target, DQ_MODE: tl.constexpr, SPIN_ASM: tl.constexpr):
    """Add a dQ partial into the fp32 DQ: unordered atomics (DQ_MODE 1), or (DQ_MODE 2) only once the counter
    ``lock`` of this (head, query block) equals ``target`` — the number of lower key blocks that add into it —
    then bump it, so the partials are added in increasing key-block order: deterministic."""
    if DQ_MODE == 2:
        if SPIN_ASM:
            _spin_until(lock, target)
        else:  # the interpreter runs programs one after another, so the count must already be exact: a
            # wrong one poisons the counter (negative), which the launcher checks after the launch
            seen = tl.atomic_add(lock, 0, sem="acquire")
            tl.atomic_add(lock, tl.where(seen == target, 0, -(1 << 30)))
    tl.atomic_add(dq_ptrs, dq, mask=mask, sem="relaxed")
    if DQ_MODE == 2:
        if SPIN_ASM:
            _cta_barrier()
        else:
            tl.debug_barrier()
        tl.atomic_add(lock, 1, sem="release")

@triton.jit
def _bwd_dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, L_base, D_base, LOCK_base, start_m, offs_n, offs_d,
                   len_q, off_lo, off_hi, qk_scale, sm_scale, softcap_in, softcap_out, kblock, offset, slope2,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, LOCAL: tl.constexpr, SOFTCAP: tl.constexpr,
                   UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DQ_MODE: tl.constexpr, SPIN_ASM: tl.constexpr,
                   ALIBI: tl.constexpr, drop_base, drop_groups, drop_seed, drop_thresh, drop_scale,
                   DROPOUT: tl.constexpr):
    # One (query block at start_m, key block) pair of the K/V-stationary backward.
    d_ok = offs_d[None, :] < HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if MASKED:
        m_ok = offs_m < len_q
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok, other=0.0)
        do = tl.load(do_ptrs, mask=m_ok[:, None] & d_ok, other=0.0)
        lse = tl.load(L_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(D_base + offs_m, mask=m_ok, other=0.0)
    else:
        m_ok = offs_m >= 0
        q = tl.load(q_ptrs, mask=d_ok, other=0.0)
        do = tl.load(do_ptrs, mask=d_ok, other=0.0)
        lse = tl.load(L_base + offs_m)
        delta = tl.load(D_base + offs_m)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # rows that saw no key (lse = -inf) have P = 0: use +inf so exp2 gives 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    if SOFTCAP:
        tT = _tanh(qkT * softcap_in)
        sT = tT * softcap_out
    else:
        sT = qkT * qk_scale
    if ALIBI:  # [BLOCK_N, BLOCK_M]: key j along dim 0, query i along dim 1
        sT += _alibi_bias(offs_m[None, :], offs_n[:, None], offset, slope2)
    pT = tl.math.exp2(sT - lse2[None, :])
    if MASKED:
        keep = offs_m[None, :] < len_q
        if CAUSAL:
            keep = keep & (offs_n[:, None] <= offs_m[None, :] + off_hi)
        if LOCAL:
            keep = keep & (offs_n[:, None] >= offs_m[None, :] + off_lo)
        pT = tl.where(keep, pT, 0.0)
    # dV += Pᵀ dO ;  dPᵀ = V dOᵀ ;  dSᵀ = Pᵀ ∘ (dPᵀ − delta) [∘ (1 − tanh²)] ;  dK += dSᵀ Q
    # (scale applied once at the end) ;  fused: dQ(partial) = scale · dS K, added into DQ
    if DROPOUT:  # dV += (P ∘ keep / (1-p))ᵀ dO ;  dP = (dO Vᵀ) ∘ keep / (1-p) ;  dS = P ∘ (dP − delta)
        keepT = tl.trans(_dropout_keep(drop_base, offs_m, kblock * BLOCK_N, drop_groups, drop_seed, drop_thresh,
                                       BLOCK_N))
        dv = tl.dot(tl.where(keepT, pT * drop_scale, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.where(keepT, tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) * drop_scale, 0.0)
    else:
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    if DQ_MODE > 0:
        dq = tl.dot(tl.trans(dsT.to(q.dtype)), k, input_precision=DOT_PRECISION) * sm_scale  # [BLOCK_M, BLOCK_D]
        # key blocks that visit this query block: [first(m), last(m)] (see _query_range); the ones
        # below this one add first
        if LOCAL:
            target = kblock - tl.maximum(start_m + off_lo, 0) // BLOCK_N
        else:
            target = kblock
        _add_dq(dq, dq_ptrs, m_ok[:, None] & d_ok, LOCK_base + start_m // BLOCK_M, target, DQ_MODE,
                SPIN_ASM)
    return dk, dv

@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, LOCK_base, offs_n, offs_d, lo, hi,
                    len_q, off_lo, off_hi, qk_scale, sm_scale, softcap_in, softcap_out, stride_qs, stride_dos,
                    stride_dqs, kblock, offset, slope2,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, LOCAL: tl.constexpr, SOFTCAP: tl.constexpr,
                    UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, DQ_MODE: tl.constexpr, SPIN_ASM: tl.constexpr,
                    ALIBI: tl.constexpr, drop_base, drop_groups, drop_seed, drop_thresh, drop_scale,
                    DROPOUT: tl.constexpr):
    # Query blocks [lo, hi) (lo a multiple of BLOCK_M) in increasing order, or in decreasing order with a
    # fused dQ: then every key block reaches a given query block at the same step (all start from the last
    # one), the order in which the ordered dQ adds want them.
    q_offs = tl.arange(0, BLOCK_M)[:, None] * stride_qs + offs_d[None, :]
    do_offs = tl.arange(0, BLOCK_M)[:, None] * stride_dos + offs_d[None, :]
    dq_offs = tl.arange(0, BLOCK_M)[:, None] * stride_dqs + offs_d[None, :]
    if DQ_MODE > 0:
        n_steps = tl.cdiv(hi - lo, BLOCK_M)
        top = lo + (n_steps - 1) * BLOCK_M
        q_row = Q_base + top.to(tl.int64) * stride_qs
        do_row = DO_base + top.to(tl.int64) * stride_dos
        dq_row = DQ_base + top.to(tl.int64) * stride_dqs
        for i in range(0, n_steps):
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, q_row + q_offs, do_row + do_offs, dq_row + dq_offs, L_base, D_base,
                                    LOCK_base, top - i * BLOCK_M, offs_n, offs_d, len_q, off_lo, off_hi, qk_scale,
                                    sm_scale, softcap_in, softcap_out, kblock, offset, slope2, MASKED, CAUSAL, LOCAL,
                                    SOFTCAP, UPCAST, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, DQ_MODE, SPIN_ASM,
                                    ALIBI, drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT)
            q_row -= BLOCK_M * stride_qs
            do_row -= BLOCK_M * stride_dos
            dq_row -= BLOCK_M * stride_dqs
    else:
        q_row = Q_base + lo.to(tl.int64) * stride_qs
        do_row = DO_base + lo.to(tl.int64) * stride_dos
        for start_m in range(lo, hi, BLOCK_M):
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, q_row + q_offs, do_row + do_offs, q_row, L_base, D_base, LOCK_base,
                                    start_m, offs_n, offs_d, len_q, off_lo, off_hi, qk_scale, sm_scale, softcap_in,
                                    softcap_out, kblock, offset, slope2, MASKED, CAUSAL, LOCAL, SOFTCAP, UPCAST,
                                    HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, DQ_MODE, SPIN_ASM, ALIBI,
                                    drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT)
            q_row += BLOCK_M * stride_qs
            do_row += BLOCK_M * stride_dos
    return dk, dv

@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, LOCKS, SQ_START, SQ_LEN, SK_START, SK_LEN,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs,
    stride_dvh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads_kv, group, qk_scale, sm_scale, causal_offset, win_left, win_right,
    softcap_in, softcap_out, n_qblocks, ALIBI_SLOPES, stride_ab, stride_ah,
    drop_row0, drop_rows, drop_groups, drop_seed, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LOCAL: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQ_MODE: tl.constexpr = 0, SPIN_ASM: tl.constexpr = False,
    ALIBI: tl.constexpr = False, DROPOUT: tl.constexpr = False,
):
    # K/V-stationary: one program owns BLOCK_N keys of one kv head and loops over the q rows of every
    # query head in its GQA group, so dK/dV are summed in registers: no atomics, deterministic.
    # LSE and DELTA are [b, h_q, s_q] with unit stride along s (same strides for both).
    # CAUSAL / LOCAL / SOFTCAP / ALIBI / UPCAST / ROUND_BF16 as in fwd_kernel (the slope is per query head,
    # loaded for each head of the group).
    # DQ_MODE 0: dQ is left to bwd_dq_kernel (DQ, LOCKS unused). 1 or 2: the 5-matmul backward, this kernel
    # also adds each (query block, key block) dQ partial into DQ (fp32, zeroed or the ring's running sum):
    # 1 by unordered atomics (LOCKS unused), 2 in increasing key-block order behind LOCKS (int32
    # [batch * h_q, n_qblocks], zeroed). Programs are launched lowest key block first and only ever wait on lower ones (launched
    # before them), so the waits cannot deadlock; SPIN_ASM: wait in PTX (compiled), else the interpreter's
    # sequential check.
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
    off_hi = offset + win_right
    off_lo = offset - win_left
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
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query rows: [lo, hi) see some of this key block (rows outside are never visited); [mid_lo, mid_hi)
    # are whole in-bounds row blocks that see all of it (unmasked); the rest is masked.
    lo, mid_lo, mid_hi, hi = _query_range(start_n, len_q, off_lo, off_hi, LOCAL, CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(0, group):
        h = (hk * group + g).to(tl.int64)
        Q_base = Q + bq * stride_qb + q_start * stride_qs + h * stride_qh
        DO_base = DO + bq * stride_dob + q_start * stride_dos + h * stride_doh
        L_base = LSE + bq * stride_lb + h * stride_lh + q_start
        D_base = DELTA + bq * stride_lb + h * stride_lh + q_start
        DQ_base = DQ + bq * stride_dqb + q_start * stride_dqs + h * stride_dqh
        LOCK_base = LOCKS + (bq * n_heads_kv * group + h) * n_qblocks
        slope2 = _alibi_slope2(ALIBI_SLOPES, b, h, stride_ab, stride_ah, ALIBI)
        drop_base = _dropout_base(h, b, q_start, seqlen_q, drop_row0, drop_rows, VARLEN, DROPOUT)
        # the three row ranges; a fused dQ walks them (and each range) backwards, see _bwd_dkdv_inner
        if DQ_MODE > 0:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, LOCK_base, offs_n, offs_d,
                                     mid_hi, hi, len_q, off_lo, off_hi, qk_scale, sm_scale, softcap_in, softcap_out,
                                     stride_qs, stride_dos, stride_dqs, pid_n, offset, slope2, True, CAUSAL, LOCAL,
                                     SOFTCAP, UPCAST, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, DQ_MODE, SPIN_ASM,
                                     ALIBI, drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT)
        elif CAUSAL:  # the diagonal / right window edge (otherwise lo = mid_lo = 0: nothing to compile)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, LOCK_base, offs_n, offs_d,
                                     lo, mid_lo, len_q, off_lo, off_hi, qk_scale, sm_scale, softcap_in, softcap_out,
                                     stride_qs, stride_dos, stride_dqs, pid_n, offset, slope2, True, CAUSAL, LOCAL,
                                     SOFTCAP, UPCAST, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, DQ_MODE, SPIN_ASM,
                                     ALIBI, drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, LOCK_base, offs_n, offs_d,
                                 mid_lo, mid_hi, len_q, off_lo, off_hi, qk_scale, sm_scale, softcap_in, softcap_out,
                                 stride_qs, stride_dos, stride_dqs, pid_n, offset, slope2, False, CAUSAL, LOCAL,
                                 SOFTCAP, UPCAST, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, DQ_MODE, SPIN_ASM, ALIBI,
                                 drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT)
        if DQ_MODE > 0:
            if CAUSAL:
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, LOCK_base, offs_n,
                                         offs_d, lo, mid_lo, len_q, off_lo, off_hi, qk_scale, sm_scale, softcap_in,
                                         softcap_out, stride_qs, stride_dos, stride_dqs, pid_n, offset, slope2, True,
                                         CAUSAL, LOCAL, SOFTCAP, UPCAST, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION,
                                         DQ_MODE, SPIN_ASM, ALIBI,
                                         drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT)
        else:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, LOCK_base, offs_n, offs_d,
                                     mid_hi, hi, len_q, off_lo, off_hi, qk_scale, sm_scale, softcap_in, softcap_out,
                                     stride_qs, stride_dos, stride_dqs, pid_n, offset, slope2, True, CAUSAL, LOCAL,
                                     SOFTCAP, UPCAST, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, DQ_MODE, SPIN_ASM,
                                     ALIBI, drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT)
    dk = dk * sm_scale
    mask = n_ok & d_ok
    dk_ptrs = DK + bq * stride_dkb + (k_start + rows_n) * stride_dks + hk.to(tl.int64) * stride_dkh + \
        offs_d[None, :]
    dv_ptrs = DV + bq * stride_dvb + (k_start + rows_n) * stride_dvs + hk.to(tl.int64) * stride_dvh + \
        offs_d[None, :]
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=mask, other=0.0)
        dv += tl.load(dv_ptrs, mask=mask, other=0.0)
    if ROUND_BF16:
        dk = _round_bf16(dk)
        dv = _round_bf16(dv)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)

@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, offs_m, offs_d, lo, hi, len_k, off_lo, off_hi,
                  qk_scale, softcap_in, softcap_out, stride_ks, stride_vs, offset, slope2,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, LOCAL: tl.constexpr, SOFTCAP: tl.constexpr,
                  UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, ALIBI: tl.constexpr, drop_base, drop_groups, drop_seed, drop_thresh,
                  drop_scale, DROPOUT: tl.constexpr):
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
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        k_row += BLOCK_N * stride_ks
        v_row += BLOCK_N * stride_vs
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SOFTCAP:
            t = _tanh(qk * softcap_in)
            s = t * softcap_out
        else:
            s = qk * qk_scale
        if ALIBI:
            s += _alibi_bias(offs_m[:, None], cols[None, :], offset, slope2)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            keep = cols[None, :] < len_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + off_hi)
            if LOCAL:
                keep = keep & (cols[None, :] >= offs_m[:, None] + off_lo)
            p = tl.where(keep, p, 0.0)
        # dP = dO Vᵀ ;  dS = P ∘ (dP − delta) [∘ (1 − tanh²)] ;  dQ += dS K   (scale applied once at the end)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:  # dP = (dO Vᵀ) ∘ keep / (1-p)
            keep_d = _dropout_keep(drop_base, offs_m, start_n, drop_groups, drop_seed, drop_thresh, BLOCK_N)
            dp = tl.where(keep_d, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq

@triton.jit
def bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SQ_START, SQ_LEN, SK_START, SK_LEN,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads_q, group, qk_scale, sm_scale, causal_offset, win_left, win_right,
    softcap_in, softcap_out, ALIBI_SLOPES, stride_ab, stride_ah,
    drop_row0, drop_rows, drop_groups, drop_seed, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LOCAL: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIBI: tl.constexpr = False, DROPOUT: tl.constexpr = False,
):
    # Q-stationary: one program owns BLOCK_M query rows of one head and loops over the visible keys.
    # CAUSAL / LOCAL / SOFTCAP / ALIBI / UPCAST / ROUND_BF16 as in fwd_kernel.
    start_m, b, h, hk, q_start, len_q, k_start, len_k = _q_program(SQ_START, SQ_LEN, SK_START, SK_LEN, seqlen_q,
                                                                  seqlen_k, n_heads_q, group, CAUSAL, VARLEN,
                                                                  BLOCK_M)
    if start_m >= len_q:
        return
    offset = _diag_offset(len_q, len_k, causal_offset, BOTTOM_RIGHT)
    off_hi = offset + win_right
    off_lo = offset - win_left
    slope2 = _alibi_slope2(ALIBI_SLOPES, b, h, stride_ab, stride_ah, ALIBI)
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
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bq * stride_lb + hq * stride_lh + q_start + offs_m, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + bq * stride_lb + hq * stride_lh + q_start + offs_m, mask=m_ok, other=0.0)
    drop_base = _dropout_base(h, b, q_start, seqlen_q, drop_row0, drop_rows, VARLEN, DROPOUT)
    lo, full_lo, full_hi, hi = _key_range(start_m, len_k, off_lo, off_hi, LOCAL, CAUSAL, BLOCK_M, BLOCK_N)
    K_base = K + bq * stride_kb + k_start * stride_ks + hk.to(tl.int64) * stride_kh
    V_base = V + bq * stride_vb + k_start * stride_vs + hk.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if LOCAL:  # the window's left edge (as in fwd_kernel)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, offs_m, offs_d, lo, full_lo, len_k, off_lo, off_hi,
                           qk_scale, softcap_in, softcap_out, stride_ks, stride_vs, offset, slope2, True, CAUSAL, LOCAL,
                           SOFTCAP, UPCAST, HEAD_DIM, BLOCK_N, DOT_PRECISION, ALIBI,
                           drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, offs_m, offs_d, full_lo, full_hi, len_k, off_lo, off_hi,
                       qk_scale, softcap_in, softcap_out, stride_ks, stride_vs, offset, slope2, False, CAUSAL, LOCAL,
                       SOFTCAP, UPCAST, HEAD_DIM, BLOCK_N, DOT_PRECISION, ALIBI,
                       drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, offs_m, offs_d, full_hi, hi, len_k, off_lo, off_hi,
                       qk_scale, softcap_in, softcap_out, stride_ks, stride_vs, offset, slope2, True, CAUSAL, LOCAL,
                       SOFTCAP, UPCAST, HEAD_DIM, BLOCK_N, DOT_PRECISION, ALIBI,
                       drop_base, drop_groups, drop_seed, drop_thresh, drop_scale, DROPOUT)
    dq = dq * sm_scale
    dq_ptrs = DQ + bq * stride_dqb + (q_start + rows) * stride_dqs + hq * stride_dqh + offs_d[None, :]
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=mask, other=0.0)
    if ROUND_BF16:
        dq = _round_bf16(dq)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)
