"""The native CPU backend (ring_attn._C through ring_attn.backends.native) against the float64 oracle.

The protocol functions of ``ring_attn.backends.native`` are called directly (the semantics of
ring_attn/backends/protocol.py), with the accuracy rule of tests/accuracy.py: dense and packed, GQA, causal with
an explicit offset or bottom-right, sliding windows, softcap, ALiBi slopes (flash-attn's ``alibi_slopes``), merge,
accumulate/overwrite, strided views, fp32/fp16/bf16, bitwise determinism; RoPE forward/backward/dtheta/table mode. The native kernels use 64-row /
64-key blocks, so lengths up to ~200 cross several blocks, ragged ends and the causal diagonal.
"""
import collections
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from accuracy import BACKWARD, FORWARD, assert_within_rule
from ring_attn import reference, rope_scaling

native = pytest.importorskip("ring_attn.backends.native", reason="ring_attn._C is not built (no C++ compiler?)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [8, 17, 33, 64, 80, 128]
# the protocol's packed-layout description (ring_attn's VarlenSeqs has these fields)
Seqs = collections.namedtuple("Seqs", "starts_q lens_q starts_k lens_k max_len_q max_len_k")


def _rand(shape, dtype, g):
    return torch.randn(shape, generator=g).to(dtype)


def _native_fwd_bwd(q, k, v, dout, dlse, *, scale, causal, offset, window, softcap, seqs=None,
                    accumulate=True, grads_init=None, alibi=None):
    """Forward + delta + backward through the native protocol functions. Returns out, lse, dq, dk, dv.
    ``alibi``: None or fp32 ``[n_batch, h_q]`` slopes, as the protocol passes them."""
    packed = q.dim() == 3
    lse_shape = (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])
    out = torch.full_like(q, 7.0)
    lse = torch.full(lse_shape, 7.0)
    native.attention_forward(q, k, v, out, lse, softmax_scale=scale, causal=causal, causal_offset=offset,
                             seqs=seqs, merge=False, window=window, softcap=softcap, alibi=alibi)
    delta = torch.empty(lse_shape)
    native.attention_delta(dout, out, delta, dlse)
    if grads_init is not None:
        dq, dk, dv = (x.clone() for x in grads_init)
    elif accumulate:
        dq, dk, dv = (torch.zeros(x.shape) for x in (q, k, v))
    else:
        dq, dk, dv = (torch.full_like(x, 7.0) for x in (q, k, v))
    native.attention_backward(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale=scale, causal=causal,
                              causal_offset=offset, seqs=seqs, accumulate=accumulate, window=window,
                              softcap=softcap, alibi=alibi)
    return out, lse, dq, dk, dv


def _oracle(q, k, v, dout, dlse, cdt, *, scale, causal, offset, window, softcap, seqs=None, alibi=None):
    """``(out, lse, dq, dk, dv)`` of the plain-torch reference computed in ``cdt`` with autograd."""
    qr, kr, vr = (x.detach().to(cdt).requires_grad_() for x in (q, k, v))
    sl = None if alibi is None else alibi.to(cdt)
    if seqs is None:
        o, l = reference.attention(qr, kr, vr, scale, causal, offset, cdt, window=window, softcap=softcap,
                                   alibi_slopes=sl)
    else:
        o, l = reference.attention_varlen(qr, kr, vr, seqs.starts_q, seqs.lens_q, seqs.starts_k, seqs.lens_k,
                                          scale, causal, offset, cdt, window=window, softcap=softcap,
                                          alibi_slopes=sl)
    loss = (o.double() * dout.double()).sum()
    if dlse is not None:
        loss = loss + (l.double().masked_fill(torch.isinf(l), 0) * dlse.double()).sum()
    if loss.requires_grad:
        loss.backward()
    grads = tuple(torch.zeros_like(x) if x.grad is None else x.grad for x in (qr, kr, vr))  # no key: no grad
    return (o, l) + grads


def _check(q, k, v, *, causal=False, offset=None, window=(-1, -1), softcap=0.0, seqs=None, use_dlse=False,
           scale=None, seed=1, rows=None, alibi=None):
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    g = torch.Generator().manual_seed(seed)
    dout = _rand(q.shape, dtype, g)
    packed = q.dim() == 3
    lse_shape = (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])
    dlse = torch.randn(lse_shape, generator=g) if use_dlse else None
    kw = dict(scale=scale, causal=causal, offset=offset, window=window, softcap=softcap, seqs=seqs, alibi=alibi)
    out, lse, dq, dk, dv = _native_fwd_bwd(q, k, v, dout, dlse, **kw)
    oracle = _oracle(q, k, v, dout, dlse, torch.float64, **kw)
    base = _oracle(q, k, v, dout, dlse, dtype, **kw)
    sel = (lambda x, dim: x) if rows is None else (lambda x, dim: x.index_select(dim, rows))
    assert torch.equal(torch.isinf(sel(lse, -1)), torch.isinf(sel(oracle[1], -1))), "rows seeing no key differ"
    assert not torch.isnan(lse).any()
    assert_within_rule("out", sel(out, 0 if packed else 1), sel(oracle[0], 0 if packed else 1).to(dtype),
                       sel(base[0], 0 if packed else 1), dtype, FORWARD)
    finite = ~torch.isinf(oracle[1])
    assert_within_rule("lse", lse[finite], oracle[1][finite], base[1].float()[finite], dtype, FORWARD)
    for name, got, o_g, b_g in zip(("dq", "dk", "dv"), (dq, dk, dv), oracle[2:], base[2:]):
        assert_within_rule(name, got, o_g, b_g, dtype, BACKWARD)
    return out, lse


def _alibi_slopes(kind, n_batch, h_q, seed):
    """None, or fp32 ``[n_batch, h_q]`` slopes as the protocol passes them: ``"head"`` is per-head slopes
    expanded over the batch (batch stride 0), ``"batch"`` one row per batch entry / packed sequence."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed + 11)
    if kind == "head":
        return (torch.rand(h_q, generator=g) * 0.3 + 0.05).expand(n_batch, h_q)
    return torch.rand(n_batch, h_q, generator=g) * 0.3 + 0.05


# ---------------------------------------------------------------------------------------------------------
# dense


@st.composite
def mask_case(draw):
    causal = draw(st.booleans())
    offset = draw(st.one_of(st.none(), st.integers(-40, 40)))
    window = draw(st.sampled_from([(-1, -1), (-1, -1), (0, 0), (5, -1), (-1, 3), (40, 0), (70, 70), (16, 9)]))
    softcap = draw(st.sampled_from([0.0, 0.0, 5.0, 30.0]))
    return dict(causal=causal, offset=offset, window=window, softcap=softcap)


@given(
    b=st.integers(1, 2),
    s_q=st.one_of(st.integers(1, 9), st.integers(60, 200)),
    s_k=st.one_of(st.integers(1, 9), st.integers(60, 200)),
    h_kv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3, 4]),
    d=st.sampled_from(HEAD_DIMS),
    mask=mask_case(),
    dtype=st.sampled_from(DTYPES),
    use_dlse=st.booleans(),
    alibi=st.sampled_from([None, "head", "batch"]),
    seed=st.integers(0, 2**16),
)
def test_dense_matches_oracle(b, s_q, s_k, h_kv, group, d, mask, dtype, use_dlse, alibi, seed):
    g = torch.Generator().manual_seed(seed)
    h_q = h_kv * group
    q, k, v = (_rand((b, s, h, d), dtype, g) for s, h in ((s_q, h_q), (s_k, h_kv), (s_k, h_kv)))
    _check(q, k, v, use_dlse=use_dlse, seed=seed, alibi=_alibi_slopes(alibi, b, h_q, seed), **mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_qkv_views_and_strided_lse(dtype):
    """q/k/v as views of one projection (strided heads), lse/delta slices of a wider buffer, dq/dk/dv views."""
    g = torch.Generator().manual_seed(3)
    b, s, h_q, h_kv, d = 2, 131, 4, 2, 64
    qkv = _rand((b, s, h_q + 2 * h_kv, d), dtype, g)
    q, k, v = qkv.split([h_q, h_kv, h_kv], dim=2)
    assert not q.is_contiguous()
    _check(q, k, v, causal=True)
    # results into strided views: out in a wider buffer, lse as a slice
    out_buf = torch.zeros(b, s, h_q, d + 16, dtype=dtype)
    lse_buf = torch.zeros(b, h_q, s + 5)
    out, lse = out_buf[..., :d], lse_buf[..., :s]
    native.attention_forward(q, k, v, out, lse, softmax_scale=0.125, causal=True, causal_offset=None, seqs=None,
                             merge=False, window=(-1, -1), softcap=0.0)
    want_o, want_l = reference.forward_fp32(q, k, v, 0.125, True, None)
    torch.testing.assert_close(out.float(), want_o.to(dtype).float(), rtol=0, atol=2e-2 if dtype != torch.float32 else 1e-5)
    torch.testing.assert_close(lse, want_l, rtol=0, atol=1e-4)
    assert (out_buf[..., d:] == 0).all() and (lse_buf[..., s:] == 0).all()


def test_rows_that_see_no_key_get_zero_and_neg_inf():
    g = torch.Generator().manual_seed(0)
    q, k, v = (_rand((1, n, 2, 16), torch.float32, g) for n in (70, 63, 63))
    out, lse = _check(q, k, v, causal=True)  # bottom-right: the first 7 rows see nothing
    assert torch.isinf(lse[..., :7]).all() and (lse[..., :7] < 0).all()
    assert (out[:, :7] == 0).all()
    _check(q, k, v, causal=True, offset=-100)  # nothing visible anywhere
    _check(q, k, v, causal=False, window=(3, 2), offset=80)  # window beyond the keys for most rows


def test_custom_scale_and_head_dim_256():
    g = torch.Generator().manual_seed(1)
    q, k, v = (_rand((1, n, 2, 256), torch.float32, g) for n in (23, 131, 131))
    _check(q, k, v, causal=True, scale=0.3, softcap=20.0)


# ---------------------------------------------------------------------------------------------------------
# varlen


@given(
    lens=st.lists(st.tuples(st.integers(0, 150), st.integers(0, 150)), min_size=1, max_size=4),
    gaps=st.booleans(),
    group=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([8, 64, 80]),
    mask=mask_case(),
    dtype=st.sampled_from(DTYPES),
    alibi=st.sampled_from([None, "head", "batch"]),
    seed=st.integers(0, 2**16),
)
def test_varlen_matches_oracle(lens, gaps, group, d, mask, dtype, alibi, seed):
    g = torch.Generator().manual_seed(seed)
    # sequences one after another (gaps: 3 unused rows before each), zero lengths included
    starts_q, starts_k, rq, rk = [], [], 0, 0
    for lq, lk in lens:
        rq += 3 * gaps
        rk += 3 * gaps
        starts_q.append(rq)
        starts_k.append(rk)
        rq += lq
        rk += lk
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    seqs = Seqs(i32(starts_q), i32([a for a, _ in lens]), i32(starts_k), i32([c for _, c in lens]),
                max(a for a, _ in lens), max(c for _, c in lens))
    h_kv = 2
    q, k, v = (_rand((t, h, d), dtype, g) for t, h in ((rq, h_kv * group), (rk, h_kv), (rk, h_kv)))
    rows = torch.cat([torch.arange(a, a + n) for a, (n, _) in zip(starts_q, lens)]).long()
    if rows.numel() == 0 or k.shape[0] == 0:
        return
    dout = _rand(q.shape, dtype, torch.Generator().manual_seed(seed))
    alibi = _alibi_slopes(alibi, len(lens), h_kv * group, seed)
    out, lse, dq, dk, dv = _native_fwd_bwd(q, k, v, dout, None, scale=0.2, causal=mask["causal"],
                                           offset=mask["offset"], window=mask["window"], softcap=mask["softcap"],
                                           seqs=seqs, accumulate=False, alibi=alibi)
    # rows outside every sequence are left untouched (forward: 7.0 sentinel; overwrite backward: 7.0)
    outside = torch.ones(q.shape[0], dtype=torch.bool)
    outside[rows] = False
    assert (out[outside] == 7).all() and (lse[:, outside] == 7).all() and (dq[outside] == 7).all()
    _check(q, k, v, seqs=seqs, seed=seed, scale=0.2, rows=rows, alibi=alibi, **mask)


# ---------------------------------------------------------------------------------------------------------
# merge, accumulate, overwrite, determinism


@pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (False, (50, 20), 0.0),
                                                   (True, (30, 0), 10.0)])
def test_merge_of_key_blocks_equals_whole(causal, window, softcap):
    """Forward over keys [0, s1) then merge=True over [s1, s_k) (offsets shifted) == the whole at once."""
    g = torch.Generator().manual_seed(5)
    b, s_q, s_k, h_q, h_kv, d = 2, 150, 190, 4, 2, 64
    q, k, v = (_rand((b, s, h, d), torch.float32, g) for s, h in ((s_q, h_q), (s_k, h_kv), (s_k, h_kv)))
    off = s_k - s_q
    scale = 0.125
    out = torch.empty(b, s_q, h_q, d)
    lse = torch.empty(b, h_q, s_q)
    for j0, j1 in ((0, 70), (70, 131), (131, s_k)):
        native.attention_forward(q, k[:, j0:j1], v[:, j0:j1], out, lse, softmax_scale=scale, causal=causal,
                                 causal_offset=off - j0, seqs=None, merge=j0 > 0, window=window, softcap=softcap)
    want_o, want_l = reference.attention(q, k, v, scale, causal, off, torch.float64, window=window, softcap=softcap)
    base_o, base_l = reference.attention(q, k, v, scale, causal, off, torch.float32, window=window, softcap=softcap)
    assert_within_rule("merged out", out, want_o, base_o, torch.float32, FORWARD)
    fin = ~torch.isinf(want_l)
    assert torch.equal(fin, ~torch.isinf(lse))
    assert_within_rule("merged lse", lse[fin], want_l[fin], base_l[fin], torch.float32, FORWARD)


def test_accumulate_adds_and_overwrite_replaces():
    g = torch.Generator().manual_seed(6)
    q, k, v = (_rand((1, n, h, 32), torch.float32, g) for n, h in ((90, 4), (77, 1), (77, 1)))
    dout = _rand(q.shape, torch.float32, g)
    kw = dict(scale=0.2, causal=True, offset=None, window=(-1, -1), softcap=0.0)
    *_, dq0, dk0, dv0 = _native_fwd_bwd(q, k, v, dout, None, **kw)
    init = tuple(torch.randn(x.shape, generator=g) for x in (q, k, v))
    *_, dq1, dk1, dv1 = _native_fwd_bwd(q, k, v, dout, None, grads_init=init, **kw)
    for got, base, start in zip((dq1, dk1, dv1), (dq0, dk0, dv0), init):
        torch.testing.assert_close(got, start + base, rtol=1e-6, atol=1e-6)
    for dtype in (torch.float16, torch.bfloat16):  # overwrite into low-precision storage
        ql, kl, vl, dl = (x.to(dtype) for x in (q, k, v, dout))
        *_, dq2, dk2, dv2 = _native_fwd_bwd(ql, kl, vl, dl, None, accumulate=False, **kw)
        assert dq2.dtype == dtype
        *_, dq3, dk3, dv3 = _native_fwd_bwd(ql, kl, vl, dl, None, **kw)
        for a, c in zip((dq2, dk2, dv2), (dq3, dk3, dv3)):
            assert torch.equal(a, c.to(dtype))


def test_backward_is_bitwise_deterministic_across_thread_counts():
    g = torch.Generator().manual_seed(7)
    q, k, v = (_rand((2, n, h, 64), torch.float32, g) for n, h in ((300, 8), (300, 2), (300, 2)))
    dout = _rand(q.shape, torch.float32, g)
    kw = dict(scale=0.125, causal=True, offset=None, window=(-1, -1), softcap=0.0)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 2):
            torch.set_num_threads(n)
            results.append(_native_fwd_bwd(q, k, v, dout, None, **kw))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------
# ALiBi (flash-attn's alibi_slopes): -slope·|i + off - j| added after the scale and softcap, before masking

# (b, s_q, s_k, h_q, h_kv, d, causal, offset, window, softcap, dtype, slopes)
ALIBI_DENSE = [
    (2, 150, 150, 4, 2, 64, True, None, (-1, -1), 0.0, torch.float32, "batch"),    # causal, GQA 2
    (1, 190, 77, 4, 4, 32, False, None, (-1, -1), 0.0, torch.float32, "head"),     # s_q > s_k, non-causal
    (1, 200, 70, 2, 1, 64, True, None, (-1, -1), 0.0, torch.bfloat16, "batch"),    # s_q > s_k causal: empty rows
    (2, 90, 200, 6, 2, 80, True, None, (-1, -1), 0.0, torch.float16, "head"),      # s_q < s_k, GQA 3
    (2, 130, 130, 4, 2, 33, False, None, (40, 17), 0.0, torch.float16, "batch"),   # both-sided window
    (1, 160, 160, 2, 1, 64, True, None, (64, 0), 30.0, torch.bfloat16, "head"),    # window + softcap (Gemma 2)
    (2, 100, 140, 4, 4, 17, False, None, (-1, -1), 5.0, torch.float32, "batch"),   # softcap, non-causal
    (1, 120, 180, 4, 2, 64, True, 25, (-1, -1), 0.0, torch.float32, "batch"),      # explicit causal offset
    (1, 140, 100, 2, 2, 8, False, -30, (70, 5), 4.0, torch.float32, "head"),       # negative offset + window + cap
]


@pytest.mark.parametrize("b,s_q,s_k,h_q,h_kv,d,causal,offset,window,softcap,dtype,slopes", ALIBI_DENSE)
def test_alibi_dense_matches_oracle(b, s_q, s_k, h_q, h_kv, d, causal, offset, window, softcap, dtype, slopes):
    g = torch.Generator().manual_seed(s_q + s_k + d)
    q, k, v = (_rand((b, s, h, d), dtype, g) for s, h in ((s_q, h_q), (s_k, h_kv), (s_k, h_kv)))
    alibi = _alibi_slopes(slopes, b, h_q, seed=d)
    opts = dict(causal=causal, offset=offset, window=window, softcap=softcap)
    out, _ = _check(q, k, v, alibi=alibi, use_dlse=True, seed=3, **opts)
    # the case is one where ALiBi matters (the result is far from attention without the bias)
    no_bias, _ = reference.attention(q, k, v, 1.0 / math.sqrt(d), causal, offset, torch.float64, window=window,
                                     softcap=softcap)
    assert (out.double() - no_bias).abs().max() > 5e-2, "ALiBi changes nothing here: the case tests nothing"


@pytest.mark.parametrize("dtype,causal,window,softcap,slopes", [
    (torch.float32, True, (-1, -1), 0.0, "batch"),
    (torch.float16, False, (30, 10), 0.0, "head"),
    (torch.bfloat16, True, (50, 0), 8.0, "batch"),
    (torch.float32, False, (-1, -1), 3.0, "batch"),
])
def test_alibi_varlen_matches_oracle(dtype, causal, window, softcap, slopes):
    """Packed sequences (gaps between them, a zero-length one, s_q != s_k both ways): sequence ``n`` uses slope
    row ``n`` and its own bottom-right offset."""
    g = torch.Generator().manual_seed(17)
    lens = [(130, 70), (0, 20), (65, 140), (1, 1), (100, 100)]
    starts_q, starts_k, rq, rk = [], [], 0, 0
    for lq, lk in lens:
        rq, rk = rq + 2, rk + 3
        starts_q.append(rq)
        starts_k.append(rk)
        rq, rk = rq + lq, rk + lk
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    seqs = Seqs(i32(starts_q), i32([a for a, _ in lens]), i32(starts_k), i32([c for _, c in lens]),
                max(a for a, _ in lens), max(c for _, c in lens))
    q, k, v = (_rand((t, h, 64), dtype, g) for t, h in ((rq, 4), (rk, 2), (rk, 2)))
    rows = torch.cat([torch.arange(a, a + n) for a, (n, _) in zip(starts_q, lens)]).long()
    _check(q, k, v, seqs=seqs, seed=5, scale=0.2, rows=rows, alibi=_alibi_slopes(slopes, len(lens), 4, 7),
           causal=causal, window=window, softcap=softcap)


def test_alibi_strided_slopes_and_merge():
    """Slopes with any strides (a transposed view, batch stride 0) give bitwise the results of a contiguous
    copy; the forward over key pieces with explicit offsets, merged, equals the whole (the bias uses each
    piece's offset); zero slopes equal no ALiBi bitwise."""
    g = torch.Generator().manual_seed(9)
    b, s_q, s_k, h_q, h_kv, d = 2, 150, 190, 4, 2, 64
    q, k, v = (_rand((b, s, h, d), torch.float32, g) for s, h in ((s_q, h_q), (s_k, h_kv), (s_k, h_kv)))
    dout = _rand(q.shape, torch.float32, g)
    kw = dict(scale=0.125, causal=True, offset=None, window=(60, -1), softcap=0.0)
    strided = (torch.rand(h_q, b, generator=g) * 0.3 + 0.05).T
    assert not strided.is_contiguous()
    for sl in (strided, _alibi_slopes("head", b, h_q, 3)):
        got = _native_fwd_bwd(q, k, v, dout, None, alibi=sl, **kw)
        want = _native_fwd_bwd(q, k, v, dout, None, alibi=sl.contiguous(), **kw)
        for x, y in zip(got, want):
            assert torch.equal(x, y)
    zero = _native_fwd_bwd(q, k, v, dout, None, alibi=torch.zeros(b, h_q), **kw)
    for x, y in zip(zero, _native_fwd_bwd(q, k, v, dout, None, **kw)):
        assert torch.equal(x, y)
    # merge of key pieces with explicit offsets
    alibi, off = strided, s_k - s_q
    out, lse = torch.empty(b, s_q, h_q, d), torch.empty(b, h_q, s_q)
    for j0, j1 in ((0, 70), (70, 131), (131, s_k)):
        native.attention_forward(q, k[:, j0:j1], v[:, j0:j1], out, lse, softmax_scale=0.125, causal=True,
                                 causal_offset=off - j0, seqs=None, merge=j0 > 0, window=(60, -1), alibi=alibi)
    want_o, want_l = reference.attention(q, k, v, 0.125, True, off, torch.float64, window=(60, -1),
                                         alibi_slopes=alibi.double())
    base_o, base_l = reference.attention(q, k, v, 0.125, True, off, torch.float32, window=(60, -1),
                                         alibi_slopes=alibi)
    assert_within_rule("merged out", out, want_o, base_o, torch.float32, FORWARD)
    fin = ~torch.isinf(want_l)
    assert torch.equal(fin, ~torch.isinf(lse))
    assert_within_rule("merged lse", lse[fin], want_l[fin], base_l[fin], torch.float32, FORWARD)


@pytest.mark.parametrize("packed", [False, True])
def test_alibi_is_bitwise_deterministic_across_thread_counts(packed):
    """Forward and backward with ALiBi (GQA, window, softcap) give bitwise-identical results for 1, 2, 3 threads."""
    g = torch.Generator().manual_seed(8)
    kw = dict(scale=0.125, causal=True, offset=None, window=(100, 0), softcap=20.0)
    if packed:
        lens = [(170, 200), (90, 60), (0, 5), (140, 140)]
        starts_q = torch.tensor([0, 170, 260, 260], dtype=torch.int32)
        starts_k = torch.tensor([0, 200, 260, 265], dtype=torch.int32)
        kw["seqs"] = Seqs(starts_q, torch.tensor([a for a, _ in lens], dtype=torch.int32), starts_k,
                          torch.tensor([c for _, c in lens], dtype=torch.int32), 170, 200)
        q, k, v = (_rand((t, h, 64), torch.float32, g) for t, h in ((400, 8), (405, 2), (405, 2)))
        alibi = _alibi_slopes("batch", len(lens), 8, 1)
    else:
        q, k, v = (_rand((2, n, h, 64), torch.float32, g) for n, h in ((300, 8), (300, 2), (300, 2)))
        alibi = _alibi_slopes("head", 2, 8, 1)
    dout = _rand(q.shape, torch.float32, g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 2):
            torch.set_num_threads(n)
            results.append(_native_fwd_bwd(q, k, v, dout, None, alibi=alibi, **kw))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------
# reference: the window/softcap additions of the fp32 fallback agree with the autograd oracle


@pytest.mark.parametrize("window,softcap", [((7, 3), 0.0), ((-1, -1), 4.0), ((20, -1), 15.0)])
def test_reference_fp32_fallback_window_softcap(window, softcap):
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn((1, n, h, 16), generator=g) for n, h in ((40, 2), (50, 1), (50, 1)))
    dout = torch.randn(q.shape, generator=g)
    o, l, gq, gk, gv = _oracle(q, k, v, dout, None, torch.float64, scale=0.4, causal=True, offset=None,
                               window=window, softcap=softcap)
    fo, fl = reference.forward_fp32(q, k, v, 0.4, True, None, window, softcap)
    delta = (dout * fo).sum(-1).transpose(1, 2)
    fq, fk, fv = reference.backward_fp32(dout, q, k, v, fl, delta, 0.4, True, None, window, softcap)
    for got, want in ((fo, o), (fq, gq), (fk, gk), (fv, gv)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------
# RoPE


def _rope_case(seed, dtype, packed, interleaved, rotary_dim, d, hq, hk, strided, scaling=1.0):
    g = torch.Generator().manual_seed(seed)
    b, s = (1, 37) if packed else (2, 19)

    def make(h):
        if strided:
            base = torch.randn((b, h, s, d + 3), generator=g).to(dtype)
            return base[..., :d].transpose(1, 2)
        return torch.randn((b, s, h, d), generator=g).to(dtype)

    q, k = make(hq), make(hk)
    positions = torch.randint(0, 2**24, (b, s), generator=g)
    inv_freq, _ = rope_scaling.rope_parameters("default", rotary_dim, 5e5)
    return q, k, positions, inv_freq


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim,d", [(64, 64), (32, 80), (8, 9)])
@pytest.mark.parametrize("strided", [False, True])
def test_rope_forward_backward_dtheta(dtype, interleaved, rotary_dim, d, strided):
    q, k, pos, inv_freq = _rope_case(0, dtype, False, interleaved, rotary_dim, d, 4, 2, strided)
    scaling = 1.25
    qo, ko = torch.full_like(q, 9.0), torch.full_like(k, 9.0)
    native.rope(q, k, qo, ko, rotary_dim=rotary_dim, interleaved=interleaved, backward=False, copy_pass=True,
                pos2=pos, inv_freq=inv_freq, scaling=scaling, cos3=None, sin3=None, qy4=None, ky4=None, dtheta=None)
    qr, kr, invr = (x.detach().double().requires_grad_() for x in (q, k, inv_freq))
    want_q, want_k = reference.rope(qr, kr, pos, invr, scaling, interleaved, rotary_dim, torch.float64)
    base_q, base_k = reference.rope(q, k, pos, inv_freq, scaling, interleaved, rotary_dim,
                                    torch.float64 if dtype == torch.float64 else dtype)
    assert_within_rule("q", qo, want_q, base_q, dtype if dtype != torch.float64 else torch.float32, FORWARD)
    assert_within_rule("k", ko, want_k, base_k, dtype if dtype != torch.float64 else torch.float32, FORWARD)
    assert torch.equal(qo[..., rotary_dim:], q[..., rotary_dim:])  # pass-through copied bit for bit
    # backward with dtheta
    g = torch.Generator().manual_seed(1)
    gq, gk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    B, S = q.shape[:2]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dtheta = torch.empty(B * S, rotary_dim // 2, dtype=acc)
    dq, dk = torch.empty_like(gq), torch.empty_like(gk)
    native.rope(gq, gk, dq, dk, rotary_dim=rotary_dim, interleaved=interleaved, backward=True, copy_pass=True,
                pos2=pos, inv_freq=inv_freq, scaling=scaling, cos3=None, sin3=None, qy4=qo, ky4=ko, dtheta=dtheta)
    ((want_q * gq.double()).sum() + (want_k * gk.double()).sum()).backward()
    low = dtype if dtype != torch.float64 else torch.float32  # the accuracy rule's dtype (fp64: fp32 floor)
    qb, kb = (x.detach().requires_grad_() for x in (q, k))
    invb = inv_freq.detach().clone().requires_grad_()
    bq, bk = reference.rope(qb, kb, pos, invb, scaling, interleaved, rotary_dim, qb.dtype)  # plain torch, same dtype
    ((bq * gq.to(bq.dtype)).sum() + (bk * gk.to(bk.dtype)).sum()).backward()
    assert_within_rule("dq", dq, qr.grad, qb.grad, low, BACKWARD)
    assert_within_rule("dk", dk, kr.grad, kb.grad, low, BACKWARD)
    # d/dinv_freq = sum over tokens of position * dtheta (the host's reduction in ops/rope.py)
    dinv = (pos.reshape(-1, 1).double() * dtheta.double()).sum(0)
    assert_within_rule("dinv_freq", dinv, invr.grad, invb.grad, low, BACKWARD)


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_table_mode_matches_hf_formula(table_dtype, dtype):
    q, k, pos, inv_freq = _rope_case(2, dtype, False, False, 48, 64, 3, 1, True)
    cos, sin = reference.rope_table(pos, inv_freq, 1.0, table_dtype)  # [b, s, r]
    out_dtype = torch.promote_types(dtype, table_dtype)
    qo, ko = torch.empty_like(q, dtype=out_dtype), torch.empty_like(k, dtype=out_dtype)
    native.rope(q, k, qo, ko, rotary_dim=48, interleaved=False, backward=False, copy_pass=True, pos2=None,
                inv_freq=None, scaling=1.0, cos3=cos, sin3=sin, qy4=None, ky4=None, dtheta=None)
    want_q, want_k = reference.rope_cos_sin(q, k, cos, sin, unsqueeze_dim=2, compute_dtype=torch.float64)
    base_q, base_k = reference.rope_cos_sin(q, k, cos, sin, unsqueeze_dim=2)
    assert_within_rule("q", qo, want_q, base_q, out_dtype, FORWARD)
    assert_within_rule("k", ko, want_k, base_k, out_dtype, FORWARD)
    # backward (transpose) in table mode: <rope(x), g> == <x, rope^T(g)>
    g = torch.Generator().manual_seed(3)
    gq, gk = torch.randn(q.shape, generator=g).to(out_dtype), torch.randn(k.shape, generator=g).to(out_dtype)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    native.rope(gq, gk, dq, dk, rotary_dim=48, interleaved=False, backward=True, copy_pass=True, pos2=None,
                inv_freq=None, scaling=1.0, cos3=cos, sin3=sin, qy4=None, ky4=None, dtheta=None)
    qr, kr = (x.detach().double().requires_grad_() for x in (q, k))
    wq, wk = reference.rope_cos_sin(qr, kr, cos, sin, unsqueeze_dim=2, compute_dtype=torch.float64)
    ((wq * gq.double()).sum() + (wk * gk.double()).sum()).backward()
    qb, kb = (x.detach().requires_grad_() for x in (q, k))
    bq, bk = reference.rope_cos_sin(qb, kb, cos, sin, unsqueeze_dim=2)
    ((bq * gq.to(bq.dtype)).sum() + (bk * gk.to(bk.dtype)).sum()).backward()
    assert_within_rule("dq", dq, qr.grad, qb.grad, dtype, BACKWARD)
    assert_within_rule("dk", dk, kr.grad, kb.grad, dtype, BACKWARD)


def test_rope_in_place_and_no_copy_pass():
    q, k, pos, inv_freq = _rope_case(4, torch.float32, False, True, 16, 24, 2, 2, False)
    want_q, want_k = reference.rope(q, k, pos, inv_freq, 1.0, True, 16, torch.float64)
    qi, ki = q.clone(), k.clone()
    native.rope(qi, ki, qi, ki, rotary_dim=16, interleaved=True, backward=False, copy_pass=False, pos2=pos,
                inv_freq=inv_freq, scaling=1.0, cos3=None, sin3=None, qy4=None, ky4=None, dtheta=None)
    torch.testing.assert_close(qi.double(), want_q, rtol=0, atol=1e-5)
    torch.testing.assert_close(ki.double(), want_k, rtol=0, atol=1e-5)
    qo = torch.full_like(q, 9.0)
    native.rope(q, k, qo, torch.empty_like(k), rotary_dim=16, interleaved=True, backward=False, copy_pass=False,
                pos2=pos, inv_freq=inv_freq, scaling=1.0, cos3=None, sin3=None, qy4=None, ky4=None, dtheta=None)
    assert (qo[..., 16:] == 9).all()  # pass-through dims untouched without copy_pass
