"""flash-attn compatibility: every call form of flash-attn's interface (2.6/2.7), positional and keyword, as its
users and its own tests write them, against the float64 oracle (``ring_attn.reference``) under the accuracy rule
(``tests/accuracy.py``); sliding windows and softcap (forward and backward, dense and varlen), odd head dims,
bf16 under the Triton interpreter, and every refusal (ALiBi itself: ``tests/test_alibi.py``).

Cases follow flash-attn's tests/test_flash_attn.py (test_flash_attn_output / _varlen_output / _qkvpacked /
_kvpacked with local windows and softcap, seqlen_q != seqlen_k, MQA/GQA), shrunk for the interpreter (blocks of
16 there, so lengths of 20..70 cross several blocks, the ragged ends and the window edges).
"""
import importlib.util

import numpy as np
import pytest
import torch

import ring_attn
from ring_attn import backends, reference
from accuracy import BACKWARD, FORWARD, assert_within_rule


def _rand(shape, dtype, g):
    return torch.randn(shape, generator=g).to(dtype)


def _qkv(b, s_q, s_k, h_q, h_kv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _rand((b, s_q, h_q, d), dtype, g), _rand((b, s_k, h_kv, d), dtype, g), _rand((b, s_k, h_kv, d), dtype, g)


def _cu(lens):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)


def _oracle(q, k, v, dout, *, scale=None, causal=False, window=(-1, -1), softcap=0.0, cu_q=None, cu_k=None,
            alibi=None, compute=torch.float64):
    """``(out, lse, dq, dk, dv)`` of the plain-torch reference in ``compute`` (float64: the oracle); ``alibi``:
    flash-attn's ``alibi_slopes`` (used in ``compute`` too). ``window`` as flash-attn's entry points take it: a side
    at least the keys' length (varlen: the longest key sequence) is unbounded."""
    seqlen_k = k.shape[1] if cu_q is None else int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
    window = tuple(-1 if w >= seqlen_k else w for w in window)
    if window[0] >= 0 and window[1] < 0:  # flash-attn's set_params_fprop: then the right side is seqlen_k
        window = (window[0], seqlen_k)
    qr, kr, vr = (x.detach().to(compute).requires_grad_() for x in (q, k, v))
    sl = None if alibi is None else alibi.to(compute)
    if cu_q is None:
        o, l = reference.attention(qr, kr, vr, scale, causal, compute_dtype=compute, window=window, softcap=softcap,
                                   alibi_slopes=sl)
    else:
        o, l = reference.attention_varlen(qr, kr, vr, cu_q[:-1], cu_q[1:] - cu_q[:-1], cu_k[:-1],
                                          cu_k[1:] - cu_k[:-1], scale, causal, compute_dtype=compute,
                                          window=window, softcap=softcap, alibi_slopes=sl)
    (o.double() * dout.double()).sum().backward()
    return o, l, qr.grad, kr.grad, vr.grad


def _assert_matches(got, q, k, v, dout, **opts):
    """``got = (out, lse, dq, dk, dv)`` from ring_attn vs the oracle, with plain torch in q's dtype as the
    baseline of the rule. Returns the oracle's ``(out, lse, dq, dk, dv)``."""
    dtype = q.dtype
    oracle = _oracle(q, k, v, dout, **opts)
    base = _oracle(q, k, v, dout, compute=dtype, **opts)
    out, lse = got[0], got[1]
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(oracle[1])), "rows that see no key differ from the oracle"
    assert_within_rule("out", out, oracle[0], base[0], dtype, FORWARD)
    fin = ~torch.isinf(oracle[1])
    assert_within_rule("lse", lse[fin], oracle[1][fin], base[1].float()[fin], dtype, FORWARD)
    for name, g, o, b in zip(("dq", "dk", "dv"), got[2:], oracle[2:], base[2:]):
        assert g.dtype == dtype
        assert_within_rule(name, g, o, b, dtype, BACKWARD)
    return oracle


def _run(fn, q, k, v, dout, *args, **kwargs):
    """Call ``fn(q, k, v, *args, **kwargs)`` (must return ``(out, lse, ...)``) with autograd; returns
    ``(out, lse, dq, dk, dv)``."""
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    res = fn(qs, ks, vs, *args, **kwargs)
    out, lse = res[0], res[1]
    out.backward(dout)
    return out.detach(), lse.detach(), qs.grad, ks.grad, vs.grad


# ----------------------------------------------------------------------------------------- positional forms


def test_positional_arguments_mean_what_they_mean_in_flash_attn():
    q, k, v = _qkv(2, 19, 27, 4, 2, 16, torch.float32)
    causal = ring_attn.flash_attn_func(q, k, v, causal=True)
    # flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, ...): the 6th positional is causal
    torch.testing.assert_close(ring_attn.flash_attn_func(q, k, v, 0.0, None, True), causal, rtol=0, atol=0)
    torch.testing.assert_close(ring_attn.flash_attn_func(q, k, v, 0.0, causal=True), causal, rtol=0, atol=0)
    # the 4th positional is dropout_p: 0.1 drops (as the keyword does under the same seed), never read as causal
    torch.manual_seed(0)
    positional = ring_attn.flash_attn_func(q, k, v, 0.1)
    torch.manual_seed(0)
    assert torch.equal(positional, ring_attn.flash_attn_func(q, k, v, dropout_p=0.1))
    assert not torch.equal(positional, ring_attn.flash_attn_func(q, k, v))
    # every argument positionally: (dropout_p, scale, causal, window_size, softcap, alibi, deterministic, probs)
    res = ring_attn.flash_attn_func(q, k, v, 0.0, 0.3, True, (5, 0), 2.0, None, True, True)
    kw = ring_attn.flash_attn_func(q=q, k=k, v=v, dropout_p=0.0, softmax_scale=0.3, causal=True, window_size=(5, 0),
                                   softcap=2.0, alibi_slopes=None, deterministic=True, return_attn_probs=True)
    assert isinstance(res, tuple) and len(res) == 3 and res[2] is None and kw[2] is None
    torch.testing.assert_close(res[0], kw[0], rtol=0, atol=0)
    torch.testing.assert_close(res[1], kw[1], rtol=0, atol=0)
    o, l = reference.attention(q.double(), k.double(), v.double(), 0.3, True, window=(5, 0), softcap=2.0)
    torch.testing.assert_close(res[0].double(), o, rtol=0, atol=1e-5)
    assert res[1].shape == (2, 4, 19)  # flash-attn's softmax_lse layout [b, h, s_q], fp32
    assert torch.equal(torch.isinf(res[1]), torch.isinf(l))


def test_varlen_positional_arguments_and_return_conventions():
    lens_q, lens_k = [7, 0, 20], [11, 4, 20]
    g = torch.Generator().manual_seed(3)
    q, k, v = (_rand((sum(n), h, 16), torch.float32, g) for n, h in ((lens_q, 4), (lens_k, 2), (lens_k, 2)))
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    ref = ring_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 20, causal=True, window_size=(3, 0))
    # (..., max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi, deterministic, probs, table)
    res = ring_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 20, 0.0, None, True, (3, 0), 0.0, None, False,
                                           True, None)
    assert len(res) == 3 and res[2] is None and res[1].shape == (4, sum(lens_q))  # lse [h, total_q]
    torch.testing.assert_close(res[0], ref, rtol=0, atol=0)
    # max_seqlen as flash-attn callers often pass it: a 0-d tensor (cu.diff().max()) or a numpy int
    for m_q, m_k in ((torch.tensor(20), torch.tensor(20)), (np.int64(20), np.int32(20)),
                     ((cu_q[1:] - cu_q[:-1]).max(), (cu_k[1:] - cu_k[:-1]).max())):
        out = ring_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, m_q, m_k, 0.0, None, True, (3, 0))
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    o, _ = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q[:-1], cu_q[1:] - cu_q[:-1],
                                      cu_k[:-1], cu_k[1:] - cu_k[:-1], None, True, window=(3, 0))
    torch.testing.assert_close(ref.double(), o, rtol=0, atol=1e-5)


def test_return_lse_keyword_and_public_exports():
    q, k, v = _qkv(1, 9, 9, 2, 2, 8, torch.float32)
    out, lse = ring_attn.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert lse.shape == (1, 2, 9)
    with pytest.raises(TypeError):  # return_lse is keyword-only: the 10th positional does not exist
        ring_attn.flash_attn_func(q, k, v, 0.0, None, False, (-1, -1), 0.0, None, False, False, True)
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
                 "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"):
        assert name in ring_attn.__all__ and callable(getattr(ring_attn, name))


# ------------------------------------------------------------------------- window x causal x GQA x s_q != s_k

# (b, s_q, s_k, h_q, h_kv, d, causal, window, softcap, dtype)
DENSE_CASES = [
    (2, 37, 37, 4, 2, 16, False, (5, 3), 0.0, torch.float32),     # Mistral-style both-sided
    (2, 37, 37, 4, 2, 16, True, (7, -1), 0.0, torch.float32),     # sliding window, causal
    (1, 53, 29, 4, 1, 32, True, (10, 0), 0.0, torch.float32),     # s_q > s_k: leading rows see no key
    (1, 29, 53, 2, 2, 32, False, (0, 0), 0.0, torch.float16),     # the diagonal only
    (2, 45, 61, 6, 2, 16, False, (-1, 4), 0.0, torch.float16),    # right window only
    (1, 40, 40, 2, 1, 16, False, (20, -1), 0.0, torch.float32),   # left window only, non-causal
    (1, 33, 33, 2, 2, 16, True, (100, 100), 0.0, torch.float32),  # a window wider than the sequence
    (2, 31, 31, 4, 4, 16, False, (-1, -1), 5.0, torch.float32),   # softcap (Gemma 2: 50 on larger scores)
    (1, 37, 50, 4, 2, 32, True, (-1, -1), 0.7, torch.float16),    # softcap that bites, causal
    (2, 41, 41, 4, 2, 16, True, (9, 0), 1.5, torch.float32),      # Gemma 2 local layers: window + softcap
    (1, 70, 70, 2, 1, 16, False, (16, 16), 2.0, torch.float16),   # window edges on block boundaries
]


@pytest.mark.parametrize("b,s_q,s_k,h_q,h_kv,d,causal,window,softcap,dtype", DENSE_CASES)
def test_window_and_softcap_match_oracle(b, s_q, s_k, h_q, h_kv, d, causal, window, softcap, dtype):
    q, k, v = _qkv(b, s_q, s_k, h_q, h_kv, d, dtype, seed=s_q + s_k)
    dout = _rand(q.shape, dtype, torch.Generator().manual_seed(1))
    got = _run(ring_attn.flash_attn_func, q, k, v, dout, causal=causal, window_size=window, softcap=softcap,
               return_lse=True)
    _assert_matches(got, q, k, v, dout, causal=causal, window=window, softcap=softcap)


VARLEN_CASES = [
    ([17, 0, 33, 5], [17, 3, 33, 20], True, (6, 0), 0.0, torch.float32),
    ([25, 40], [40, 25], False, (4, 9), 0.0, torch.float16),
    ([30, 1, 22], [30, 1, 22], True, (-1, -1), 3.0, torch.float32),
    ([19, 34], [34, 19], False, (12, 2), 1.0, torch.float16),
]


@pytest.mark.parametrize("lens_q,lens_k,causal,window,softcap,dtype", VARLEN_CASES)
def test_varlen_window_and_softcap_match_oracle(lens_q, lens_k, causal, window, softcap, dtype):
    g = torch.Generator().manual_seed(sum(lens_q))
    q = _rand((sum(lens_q), 4, 16), dtype, g)
    k, v = _rand((sum(lens_k), 2, 16), dtype, g), _rand((sum(lens_k), 2, 16), dtype, g)
    dout = _rand(q.shape, dtype, g)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    got = _run(ring_attn.flash_attn_varlen_func, q, k, v, dout, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
               window_size=window, softcap=softcap, return_lse=True)
    _assert_matches(got, q, k, v, dout, causal=causal, window=window, softcap=softcap, cu_q=cu_q, cu_k=cu_k)


def test_a_window_side_as_wide_as_the_keys_is_unbounded_as_in_flash_attn():
    # flash-attn's entry points turn a side >= seqlen_k (varlen: max_seqlen_k; a KV cache: its capacity) into -1;
    # with seqlen_q > seqlen_k + 1 that shows: bottom-right alignment puts the first queries' windows before the
    # first key (before 2026-12-07 those rows were zeros here, full attention in flash-attn)
    q, k, v = _qkv(1, 9, 3, 2, 1, 16, torch.float32, seed=3)
    full = ring_attn.flash_attn_func(q, k, v)
    assert torch.equal(ring_attn.flash_attn_func(q, k, v, window_size=(-1, 3)), full)
    assert torch.equal(ring_attn.flash_attn_func(q, k, v, window_size=(5, 7)), full)
    narrow = ring_attn.flash_attn_func(q, k, v, window_size=(-1, 2))  # 2 < seqlen_k: bottom-right, rows 0-3 see none
    assert not narrow[0, :4].any() and narrow[0, 4:].abs().sum() > 0
    cu = torch.tensor([0, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 3], dtype=torch.int32)
    var = ring_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 9, 3, window_size=(-1, 3))
    assert torch.equal(var, full[0])
    var = ring_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 9, 4, window_size=(-1, 3))  # 3 < max_k 4
    assert not var[:3].any()
    # a KV cache: against its capacity (8 rows), not the filled length (3)
    cache_k, cache_v = torch.zeros(1, 8, 1, 16), torch.zeros(1, 8, 1, 16)
    cache_k[:, :3], cache_v[:, :3] = k, v
    got = ring_attn.flash_attn_with_kvcache(q, cache_k, cache_v, cache_seqlens=3, window_size=(-1, 8))
    assert torch.equal(got, full)
    got = ring_attn.flash_attn_with_kvcache(q, cache_k, cache_v, cache_seqlens=3, window_size=(-1, 4))  # 4 < 8
    assert not got[0, :2].any() and got[0, 2:].abs().sum() > 0


def test_a_window_bounded_on_the_left_only_gets_seqlen_k_on_the_right_as_in_flash_attn():
    # flash-attn's set_params_fprop: (left >= 0, right < 0) becomes (left, seqlen_k), not unbounded on the right;
    # with seqlen_q > seqlen_k + 1 the first queries then see fewer keys (before 2026-12-08: all of their window)
    q, k, v = _qkv(1, 9, 3, 2, 1, 16, torch.float32, seed=4)
    expect = ring_attn.flash_attn_func(q, k, v, window_size=(1, 3))
    # bottom-right: query i sees keys i - 7 ..= i - 3, so [0, 0, 0, 1, 2, 3, 3, 3, 2] keys per row
    assert [int((expect[0, i] != 0).any()) for i in range(9)] == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    for window in ((1, -1), (1, 5)):  # (1, 5): 5 >= seqlen_k becomes -1 first
        assert torch.equal(ring_attn.flash_attn_func(q, k, v, window_size=window), expect)
    cu, cu_k = torch.tensor([0, 9], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    var = ring_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 9, 4, window_size=(1, -1))  # max_k 4
    assert torch.equal(var, ring_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 9, 4, window_size=(1, 4)))
    assert not var[:2].any() and var[2:].abs().sum() > 0
    # a KV cache: against its capacity (4 rows)
    cache_k, cache_v = torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16)
    cache_k[:, :3], cache_v[:, :3] = k, v
    got = ring_attn.flash_attn_with_kvcache(q, cache_k, cache_v, cache_seqlens=3, window_size=(1, -1))
    assert torch.equal(got, ring_attn.flash_attn_with_kvcache(q, cache_k, cache_v, cache_seqlens=3,
                                                              window_size=(1, 4)))
    assert not got[0, :2].any()
    # causal: the right side is 0 anyway
    assert torch.equal(ring_attn.flash_attn_func(q, k, v, causal=True, window_size=(1, -1)),
                       ring_attn.flash_attn_func(q, k, v, causal=True, window_size=(1, 0)))
    # the right side is added only where it changes the result (seqlen_q > seqlen_k + 1): other calls keep the
    # kernels' unbounded-right variant
    from ring_attn._contracts import flash_attn_window

    assert flash_attn_window((1, -1), 3, 9) == (1, 3)
    assert flash_attn_window((1, -1), 3, 4) == (1, -1) and flash_attn_window((1, -1), 8, 8) == (1, -1)
    assert flash_attn_window((1, 5), 3, 4) == (1, -1) and flash_attn_window((4, 5), 3, 9) == (-1, -1)


@pytest.mark.parametrize("fn", ["func", "varlen", "qkvpacked"])
def test_inputs_with_a_strided_last_dim_get_gradients_as_flash_attn_does(fn):
    # flash-attn makes such inputs contiguous, so its gradients are; the backward here once allocated them like
    # the inputs and refused its own gradient buffers (ValueError after the forward had run)
    g = torch.Generator().manual_seed(5)

    def strided(*shape):  # last dim stride 2 (a transposed copy viewed back)
        return torch.randn(*shape, generator=g).transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()

    if fn == "qkvpacked":
        x = strided(1, 6, 3, 2, 8)
        args, call = (x,), lambda a: ring_attn.flash_attn_qkvpacked_func(*a, causal=True)
    elif fn == "varlen":
        x = [strided(6, 2, 8) for _ in range(3)]
        cu = torch.tensor([0, 2, 6], dtype=torch.int32)
        args, call = x, lambda a: ring_attn.flash_attn_varlen_func(*a, cu, cu, 4, 4, causal=True)
    else:
        args, call = [strided(1, 6, 2, 8) for _ in range(3)], lambda a: ring_attn.flash_attn_func(*a, causal=True)
    assert all(a.stride(-1) != 1 for a in args)
    dout = torch.randn(call(args).shape, generator=g)
    call(args).backward(dout)
    dense = [a.detach().contiguous().requires_grad_() for a in args]
    call(dense).backward(dout)
    for a, b in zip(args, dense):  # (autograd gives a leaf's .grad the leaf's strides)
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-6)


_NATIVE = pytest.param("native", marks=pytest.mark.skipif(
    importlib.util.find_spec("ring_attn._C") is None, reason="ring_attn._C is not built"))


@pytest.mark.parametrize("backend", [_NATIVE, "reference"])
@pytest.mark.parametrize("extreme", ["one-hot", "near -1e30", "softcap+alibi"])
def test_cpu_backward_rebuilds_the_forward_probabilities_at_extreme_scores(backend, extreme):
    # the backward forms each score with the forward's roundings (no FMA contraction of s * scale - lse), so
    # exp(score - lse) is the forward's probability: one-hot rows give exactly 1, scores near -1e30 stay finite
    # (before 2026-12-07 native: dv off by 3.5e-3 at softmax_scale 1e3, and inf gradients near -1e30). The Triton
    # kernels, like flash-attn's, rebuild p from a log2-scaled LSE: docs/design.md says where that limits them.
    g = torch.Generator().manual_seed(11)
    d, kw = 128, {}
    if extreme == "one-hot":
        q, k, v = (torch.randn(1, n, 1, d, generator=g) for n in (16, 40, 40))
        kw = dict(softmax_scale=1e3)
    elif extreme == "near -1e30":
        d = 24
        u = torch.randn(d, generator=g, dtype=torch.float64)
        u = u / u.norm()
        q = (1e15 * u * (1 + 0.01 * torch.randn(1, 8, 1, d, generator=g, dtype=torch.float64))).float()
        k = (-1e15 * u * (1 + 0.01 * torch.randn(1, 16, 1, d, generator=g, dtype=torch.float64))).float()
        v = torch.randn(1, 16, 1, d, generator=g)
    else:
        q, k, v = (torch.randn(1, n, 2, d, generator=g) for n in (16, 40, 40))
        kw = dict(softmax_scale=1e3, softcap=5e4, alibi_slopes=torch.tensor([0.5, 2.0]), causal=True)
    dout = torch.randn(q.shape, generator=g)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(_options_oracle(q64, k64, v64, kw), (q64, k64, v64), dout.double())
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    with backends.force(backend):
        got = torch.autograd.grad(ring_attn.flash_attn_func(q, k, v, **kw), (q, k, v), dout)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), name
        if name != "v":
            continue  # dq, dk: float32's cancellation in dP - delta, times softmax_scale (1e3) or K (1e15), any
            # backend; dv = Pᵀ·dO shows whether P is the forward's
        err = (a.double() - b).abs().max().item()
        assert err <= 1e-5 * max(1.0, b.abs().max().item()), (name, err)


def _options_oracle(q, k, v, kw):
    """float64 attention of [b, s, h, d] tensors with flash-attn's options (causal bottom-right, softcap, ALiBi)."""
    scale = kw.get("softmax_scale", q.shape[-1] ** -0.5)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if kw.get("softcap"):
        s = kw["softcap"] * torch.tanh(s / kw["softcap"])
    sq, sk = q.shape[1], k.shape[1]
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None]
    if kw.get("alibi_slopes") is not None:
        s = s - kw["alibi_slopes"].double()[:, None, None] * (i - j).abs()
    if kw.get("causal"):
        s = s.masked_fill(j > i, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("backend", [None, _NATIVE, "reference"])
def test_a_nan_score_gives_a_nan_lse_not_an_empty_row(backend):
    # -inf is the LSE of a row that sees no key: a merge then drops the block. A NaN (or inf) score must carry
    # NaN on (before 2026-12-07 native returned -inf, and merging into a running result hid the NaN)
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, n, 1, 16, generator=g) for n in (4, 6, 6))
    k[0, 2] = float("nan")
    with backends.force(backend):
        out, lse = ring_attn.flash_attn_func(q, k, v, return_lse=True)
    assert torch.isnan(out).all() and torch.isnan(lse).all()


def test_reference_backend_windows_and_softcap():
    q, k, v = _qkv(2, 30, 41, 4, 2, 16, torch.float32, seed=5)
    dout = _rand(q.shape, torch.float32, torch.Generator().manual_seed(2))
    with backends.force("reference"):
        got = _run(ring_attn.flash_attn_func, q, k, v, dout, 0.0, None, True, (6, 0), 2.5, return_attn_probs=True)
    _assert_matches(got, q, k, v, dout, causal=True, window=(6, 0), softcap=2.5)


def test_blocks_outside_the_window_are_never_read():
    """With blocks of 16 (the interpreter's), NaN placed where no visited block reaches stays out of the
    results: keys 0..15 are outside every window of query rows >= 32 (window (8, 0), causal), and query rows
    96..127 are outside every query range of key blocks below 80 in dK/dV."""
    if not backends.interpreter_enabled():
        pytest.skip("block sizes are only fixed (16) under the Triton interpreter")
    q, k, v = _qkv(1, 128, 128, 2, 1, 16, torch.float32, seed=9)
    k[:, :16] = float("nan")
    v[:, :16] = float("nan")
    out = ring_attn.flash_attn_func(q, k, v, causal=True, window_size=(8, 0))
    assert torch.isfinite(out[:, 32:]).all()
    assert torch.isnan(out[:, :16]).any()  # the poisoned keys are really read where they are visible
    q, k, v = _qkv(1, 128, 128, 2, 1, 16, torch.float32, seed=9)
    q[:, 96:] = float("nan")
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    ring_attn.flash_attn_func(qs, ks, vs, causal=True, window_size=(8, 0)).sum().backward()
    assert torch.isfinite(ks.grad[:, :80]).all() and torch.isfinite(vs.grad[:, :80]).all()
    assert torch.isfinite(qs.grad[:, :96]).all()
    o, _ = reference.attention(q[:, :96].double(), k[:, :96].double(), v[:, :96].double(), None, True,
                               window=(8, 0))
    torch.testing.assert_close(ring_attn.flash_attn_func(q, k, v, causal=True, window_size=(8, 0))[:, :96].double(),
                               o, rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------- packed forms


def test_qkvpacked_is_flash_attn_func_on_views_and_grads_flow_to_qkv():
    g = torch.Generator().manual_seed(4)
    qkv = _rand((2, 35, 3, 4, 16), torch.float32, g).requires_grad_()
    dout = _rand((2, 35, 4, 16), torch.float32, g)
    out, lse, probs = ring_attn.flash_attn_qkvpacked_func(qkv, 0.0, None, True, (6, 0), 1.5, None, False, True)
    assert probs is None
    out.backward(dout)
    q, k, v = qkv.detach().unbind(2)
    assert q.data_ptr() == qkv.data_ptr() and q.stride(-1) == 1  # views: nothing copied on the way in
    _assert_matches((out.detach(), lse.detach(), *qkv.grad.unbind(2)), q, k, v, dout, causal=True, window=(6, 0),
                    softcap=1.5)


def test_kvpacked_gqa():
    g = torch.Generator().manual_seed(5)
    q = _rand((1, 27, 6, 16), torch.float16, g)
    kv = _rand((1, 40, 2, 2, 16), torch.float16, g)
    dout = _rand(q.shape, torch.float16, g)
    qs, kvs = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out, lse = ring_attn.flash_attn_kvpacked_func(qs, kvs, causal=True, window_size=(12, 0), return_lse=True)
    out.backward(dout)
    k, v = kv.unbind(2)
    _assert_matches((out.detach(), lse.detach(), qs.grad, *kvs.grad.unbind(2)), q, k, v, dout, causal=True,
                    window=(12, 0))


def test_varlen_errors_name_the_callers_arguments_and_huge_bounds_are_fine():
    """flash_attn_varlen_qkvpacked_func's errors name its own cu_seqlens/max_seqlen (they said cu_seqlens_q /
    max_seqlen_q); an upper bound of 2^40 on max_seqlen costs nothing (the native grid was sized by it: minutes
    for 7 tokens). Both found by a randomized run."""
    qkv = torch.randn(7, 3, 2, 8)
    with pytest.raises(ValueError, match=r"^max_seqlen is 2 but cu_seqlens has a sequence of length 4$"):
        ring_attn.flash_attn_varlen_qkvpacked_func(qkv, _cu([3, 4]), 2)
    with pytest.raises(TypeError, match=r"^cu_seqlens.dtype is torch.int64"):
        ring_attn.flash_attn_varlen_qkvpacked_func(qkv, _cu([3, 4]).long(), 4)
    want = ring_attn.flash_attn_varlen_qkvpacked_func(qkv, _cu([3, 4]), 4, causal=True)
    for bound in (8, 2**40):
        got = ring_attn.flash_attn_varlen_func(*qkv.unbind(1), _cu([3, 4]), _cu([3, 4]), bound, bound, causal=True)
        assert torch.equal(got, want)


def test_varlen_qkvpacked_and_kvpacked():
    lens = [13, 0, 29]
    cu = _cu(lens)
    g = torch.Generator().manual_seed(6)
    qkv = _rand((sum(lens), 3, 2, 16), torch.float32, g).requires_grad_()
    dout = _rand((sum(lens), 2, 16), torch.float32, g)
    out, lse, _ = ring_attn.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), 0.0, None, True, (5, 0), 0.0,
                                                            return_attn_probs=True)
    out.backward(dout)
    q, k, v = qkv.detach().unbind(1)
    _assert_matches((out.detach(), lse.detach(), *qkv.grad.unbind(1)), q, k, v, dout, causal=True, window=(5, 0),
                    cu_q=cu, cu_k=cu)

    lens_k = [20, 4, 29]
    cu_k = _cu(lens_k)
    q = _rand((sum(lens), 4, 16), torch.float32, g)
    kv = _rand((sum(lens_k), 2, 2, 16), torch.float32, g)
    dout = _rand(q.shape, torch.float32, g)
    qs, kvs = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out, lse = ring_attn.flash_attn_varlen_kvpacked_func(qs, kvs, cu, cu_k, torch.tensor(29), np.int64(29),
                                                         softcap=2.0, return_lse=True)
    out.backward(dout)
    k, v = kv.unbind(1)
    _assert_matches((out.detach(), lse.detach(), qs.grad, *kvs.grad.unbind(1)), q, k, v, dout, softcap=2.0,
                    cu_q=cu, cu_k=cu_k)


# ------------------------------------------------------------------------------------- head dims, bf16


@pytest.mark.parametrize("d,dtype", [(1, torch.float32), (4, torch.float32), (12, torch.float16),
                                     (59, torch.float32), (111, torch.float16), (200, torch.float32)])
def test_any_head_dim(d, dtype):
    q, k, v = _qkv(1, 21, 34, 2, 1, d, dtype, seed=d)
    dout = _rand(q.shape, dtype, torch.Generator().manual_seed(d))
    got = _run(ring_attn.flash_attn_func, q, k, v, dout, causal=True, return_lse=True)
    _assert_matches(got, q, k, v, dout, causal=True)


@pytest.mark.parametrize("d", [8, 59, 64])
def test_no_copy_of_q_k_v_on_the_way_to_the_kernel(d, monkeypatch):
    """The backend receives the caller's tensors (views of a fused projection included), at any head dim."""
    seen = []
    impl = backends.select("attention", torch.device("cpu"), torch.float32, d)
    real = impl.attention_forward

    def spy(q, k, v, *a, **kw):
        seen.append((q.data_ptr(), k.data_ptr(), v.data_ptr()))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(impl, "attention_forward", spy)
    qkv = torch.randn(1, 18, 3, 2, d)
    q, k, v = qkv.unbind(2)
    ring_attn.flash_attn_qkvpacked_func(qkv, causal=True)
    assert seen == [(q.data_ptr(), k.data_ptr(), v.data_ptr())]


def test_bf16_under_the_interpreter_is_right():
    """The README's first snippet under TRITON_INTERPRET=1 on CPU: bf16 dense, varlen, window, softcap."""
    dtype = torch.bfloat16
    q, k, v = _qkv(2, 40, 52, 4, 2, 32, dtype, seed=11)
    dout = _rand(q.shape, dtype, torch.Generator().manual_seed(12))
    for opts in (dict(causal=True), dict(causal=False, window=(9, 3), softcap=3.0)):
        got = _run(ring_attn.flash_attn_func, q, k, v, dout, causal=opts["causal"],
                   window_size=opts.get("window", (-1, -1)), softcap=opts.get("softcap", 0.0), return_lse=True)
        assert got[0].abs().max() < 10  # never garbage (was off by 1e8..1e10 before the upcast)
        _assert_matches(got, q, k, v, dout, **opts)
    lens = [11, 30]
    cu = _cu(lens)
    g = torch.Generator().manual_seed(13)
    qp, kp, vp, dp = (_rand((41, h, 24), dtype, g) for h in (4, 2, 2, 4))
    got = _run(ring_attn.flash_attn_varlen_func, qp, kp, vp, dp, cu, cu, 30, 30, causal=True, return_lse=True)
    _assert_matches(got, qp, kp, vp, dp, causal=True, cu_q=cu, cu_k=cu)


# ------------------------------------------------------------------------------------------------ refusals

_q, _k, _v = _qkv(1, 8, 8, 4, 2, 16, torch.float32)
_alibi = torch.rand(4)

BAD_OPTIONS = [
    (ValueError, r"dropout_p must be a float in \[0, 1\), got nan", dict(dropout_p=float("nan"))),
    (ValueError, r"dropout_p must be a float in \[0, 1\), got 1\.0", dict(dropout_p=1.0)),
    (ValueError, r"dropout_p must be a float in \[0, 1\), got -0\.5", dict(dropout_p=-0.5)),
    (TypeError, r"dropout_p must be a float in \[0, 1\), got True \(bool\)", dict(dropout_p=True)),
    (TypeError, r"dropout_p must be a float in \[0, 1\), got '0\.1' \(str\)", dict(dropout_p="0.1")),
    # ALiBi is implemented (tests/test_alibi.py): malformed slopes are refused, naming the argument
    (ValueError, r"alibi_slopes has shape \(3,\); expected \(heads_q,\) = \(4,\)", dict(alibi_slopes=torch.rand(3))),
    (TypeError, r"alibi_slopes must be float32 \(as flash-attn requires\), got torch\.float16",
     dict(alibi_slopes=_alibi.half())),
    (TypeError, r"window_size must be a pair \(left, right\) of ints", dict(window_size=(3,))),
    (TypeError, r"window_size must be a pair", dict(window_size=5)),
    (TypeError, r"window_size\[0\] must be an int \(-1: unbounded\), got 2\.5", dict(window_size=(2.5, 0))),
    (TypeError, r"window_size\[1\] must be an int", dict(window_size=(2, True))),
    (ValueError, r"softcap must be a finite float >= 0 \(0: off\), got -1\.0", dict(softcap=-1.0)),
    (ValueError, r"softcap must be a finite float >= 0 \(0: off\), got inf", dict(softcap=float("inf"))),
    (TypeError, r"softcap must be a finite float >= 0 \(0: off\), got '30' \(str\)", dict(softcap="30")),
    (TypeError, r"softcap must be a finite float >= 0 \(0: off\), got None \(NoneType\)", dict(softcap=None)),
    (TypeError, r"causal must be a bool, got 'yes'", dict(causal="yes")),
    (TypeError, r"deterministic must be a bool, got 2", dict(deterministic=2)),
    (TypeError, r"causal must be a bool, got 0\.5", dict(causal=0.5)),
    (TypeError, r"return_attn_probs must be a bool, got None", dict(return_attn_probs=None)),
    (TypeError, r"return_lse must be a bool", dict(return_lse="no")),
]


@pytest.mark.parametrize("exc,msg,kwargs", BAD_OPTIONS, ids=[c[1][:32] for c in BAD_OPTIONS])
def test_refusals_dense(exc, msg, kwargs):
    with pytest.raises(exc, match=msg):
        ring_attn.flash_attn_func(_q, _k, _v, **kwargs)


_cu8 = torch.tensor([0, 3, 8], dtype=torch.int32)

BAD_VARLEN = [
    (ValueError, r"with block_table, k must be a paged cache \[num_blocks, page_block_size, heads_kv, head_dim\], "
                 r"got shape \(8, ", dict(block_table=torch.zeros(2, 4, dtype=torch.int32))),
    (TypeError, r"max_seqlen_q must be a non-negative int, got 5\.0", dict(max_seqlen_q=5.0)),
    (TypeError, r"max_seqlen_k must be a non-negative int, got True", dict(max_seqlen_k=True)),
    (TypeError, r"max_seqlen_q must be a non-negative int, got a tensor of shape \(\) and dtype torch\.float32",
     dict(max_seqlen_q=torch.tensor(5.0))),
    (TypeError, r"max_seqlen_q must be a non-negative int, got a tensor of shape \(2,\)",
     dict(max_seqlen_q=torch.tensor([5, 5]))),
    (ValueError, r"max_seqlen_k must be a non-negative int, got -1", dict(max_seqlen_k=np.int64(-1))),
    (ValueError, r"dropout_p must be a float in \[0, 1\), got 1\.5", dict(dropout_p=1.5)),
    (ValueError, r"softcap must be a finite float >= 0", dict(softcap=float("nan"))),
]


@pytest.mark.parametrize("exc,msg,override", BAD_VARLEN, ids=[c[1][:32] for c in BAD_VARLEN])
def test_refusals_varlen(exc, msg, override):
    args = dict(q=_q[0], k=_k[0], v=_v[0], cu_seqlens_q=_cu8, cu_seqlens_k=_cu8, max_seqlen_q=5, max_seqlen_k=5)
    args.update(override)
    with pytest.raises(exc, match=msg):
        ring_attn.flash_attn_varlen_func(**args)


def test_refusals_packed():
    with pytest.raises(ValueError, match=r"qkv must be 5-D \[batch, seqlen, 3, heads, head_dim\], got shape "
                                         r"\(1, 8, 2, 4, 16\)"):
        ring_attn.flash_attn_qkvpacked_func(torch.randn(1, 8, 2, 4, 16))
    with pytest.raises(ValueError, match=r"kv must be 5-D \[batch, seqlen_k, 2, heads_kv, head_dim\]"):
        ring_attn.flash_attn_kvpacked_func(_q, torch.randn(1, 8, 2, 16))
    with pytest.raises(ValueError, match=r"qkv must be 4-D \[total_tokens, 3, heads, head_dim\]"):
        ring_attn.flash_attn_varlen_qkvpacked_func(torch.randn(8, 3, 4, 16, 1), _cu8, 5)
    with pytest.raises(TypeError, match=r"kv must be a torch.Tensor, got tuple"):
        ring_attn.flash_attn_varlen_kvpacked_func(_q[0], (_k[0], _v[0]), _cu8, _cu8, 5, 5)
    with pytest.raises(ValueError, match=r"alibi_slopes has shape \(2, 4\); expected \(heads_q,\) = \(4,\) or "
                                         r"\(batch, heads_q\) = \(1, 4\)"):
        ring_attn.flash_attn_qkvpacked_func(torch.randn(1, 8, 3, 4, 16), alibi_slopes=torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"head_dim 257 is not supported; expected 1 \.\. 256"):
        ring_attn.flash_attn_func(*(torch.randn(1, 4, 1, 257) for _ in range(3)))


# ------------------------------------------------------------------- block-level API (what the ring calls)


@pytest.mark.parametrize("causal,window,softcap", [(True, (9, 0), 0.0), (False, (6, 11), 2.0), (True, (-1, -1), 1.5)])
def test_block_api_pieces_with_offsets_merge_and_accumulate(causal, window, softcap):
    """Keys split into pieces, each run with its own causal offset (global query/key positions) and merged into a
    running fp32 (out, lse); backward per piece added into fp32 accumulators: equal to the whole at once and to
    the oracle. Pieces entirely outside the window leave the running result untouched."""
    from ring_attn.ops.attention import attention_block_backward, attention_block_forward, attention_delta

    q, k, v = _qkv(2, 40, 56, 4, 2, 16, torch.float32, seed=21)
    scale = 0.25
    offset = 56 - 40  # global: query i sits at key position i + 16
    out = torch.zeros(q.shape)
    lse = torch.full((2, 4, 40), float("-inf"))
    pieces = [(0, 16), (16, 35), (35, 56)]
    for k0, k1 in pieces:
        attention_block_forward(q, k[:, k0:k1], v[:, k0:k1], scale, causal, offset - k0, out=out, lse=lse,
                                window=window, softcap=softcap)
    o, l = reference.attention(q.double(), k.double(), v.double(), scale, causal, window=window, softcap=softcap)
    torch.testing.assert_close(out.double(), o, rtol=0, atol=2e-6)
    assert torch.equal(torch.isinf(lse), torch.isinf(l))
    whole, whole_lse = attention_block_forward(q, k, v, scale, causal, window=window, softcap=softcap)
    torch.testing.assert_close(out, whole, rtol=0, atol=2e-6)

    dout = _rand(q.shape, torch.float32, torch.Generator().manual_seed(3))
    delta = attention_delta(dout, out)
    dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(v.shape)
    for k0, k1 in pieces:
        attention_block_backward(dout, q, k[:, k0:k1], v[:, k0:k1], lse, delta, dq, dk[:, k0:k1], dv[:, k0:k1],
                                 scale, causal, offset - k0, window=window, softcap=softcap)
    oracle = _oracle(q, k, v, dout, scale=scale, causal=causal, window=window, softcap=softcap)
    for name, g, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), oracle[2:]):
        torch.testing.assert_close(g.double(), ref, rtol=0, atol=5e-6, msg=name)

    # a piece no query can see (window ends before it): merging it changes nothing
    if window[1] >= 0 or causal:
        before = (out.clone(), lse.clone())
        attention_block_forward(q, k, v, scale, causal, -200, out=out, lse=lse, window=window, softcap=softcap)
        assert torch.equal(out, before[0]) and torch.equal(lse, before[1])


# ------------------------------------------------------------------------------------------------- GPU


def _to_cuda(*xs):
    return [x.cuda() for x in xs]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal,window,softcap,shape", [
    (True, (300, 0), 0.0, (2, 1000, 1000, 8, 2, 128)),    # Mistral-style: a window shorter than the sequence
    (True, (255, -1), 0.0, (1, 1531, 777, 4, 1, 64)),     # s_q > s_k
    (False, (100, 37), 50.0, (2, 700, 900, 6, 3, 96)),    # both sides + Gemma 2 softcap
    (True, (-1, -1), 30.0, (1, 513, 513, 4, 4, 256)),
    (True, (63, 0), 20.0, (1, 333, 333, 2, 1, 59)),       # odd head dim
])
def test_gpu_window_and_softcap_match_oracle(dtype, causal, window, softcap, shape):
    b, s_q, s_k, h_q, h_kv, d = shape
    q, k, v = _qkv(b, s_q, s_k, h_q, h_kv, d, dtype, seed=s_q)
    dout = _rand(q.shape, dtype, torch.Generator().manual_seed(2))
    got = _run(ring_attn.flash_attn_func, *_to_cuda(q, k, v, dout), causal=causal, window_size=window,
               softcap=softcap, return_lse=True)
    _assert_matches([x.cpu() for x in got], q, k, v, dout, causal=causal, window=window, softcap=softcap)
