"""ALiBi (flash-attn's ``alibi_slopes``) in the local attention functions, against the float64 oracle
(``ring_attn.reference``) under the accuracy rule (``tests/accuracy.py``).

flash-attn (2.6/2.7) adds ``-slope * |i + seqlen_k - seqlen_q - j|`` to the score of query ``i`` and key ``j``
(after the softcap, before masking), causal or not; slopes are fp32 ``(nheads,)`` or ``(batch, nheads)``
(varlen: ``(n_seqs, nheads)``). Covered: causal and not, s_q != s_k both ways, GQA, windows, softcap, fp32/fp16,
odd head dims, varlen, both slope shapes, the packed forms, the block-level API with explicit offsets and merges,
the fused backward modes (``RING_ATTN_BWD``), every CPU backend (Triton under the interpreter, the native C++
backend, the torch reference), backend routing, a property test, the refusals, and a GPU test. Shapes are small: blocks are 16 under the interpreter, so lengths of 20..70 cross several
blocks, the ragged ends and the window edges.
"""
import importlib.util

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ring_attn
from ring_attn import backends, reference
import test_flash_compat as FC
from accuracy import BACKWARD, FORWARD, assert_within_rule
from test_flash_compat import _cu, _qkv, _rand, _run


NATIVE_BUILT = importlib.util.find_spec("ring_attn._C") is not None


def _slopes(shape, seed):
    """Slopes as flash-attn's tests draw them (``torch.rand(...) * 0.3``), kept away from 0 so the bias bites."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.3 + 0.05


def _oracle(q, k, v, dout, alibi, **opts):
    """``(out, lse, dq, dk, dv)`` of the plain-torch reference with the slopes (float64: the oracle)."""
    return FC._oracle(q, k, v, dout, alibi=alibi, **opts)


def _assert_matches(got, q, k, v, dout, alibi, **opts):
    """``got = (out, lse, dq, dk, dv)`` vs the oracle under the accuracy rule (test_flash_compat's check), and
    the case is one where ALiBi matters: the oracle without the slopes is far from the result."""
    oracle = FC._assert_matches(got, q, k, v, dout, alibi=alibi, **opts)
    no_alibi = FC._oracle(q, k, v, dout, **opts)
    assert (no_alibi[0] - oracle[0]).abs().max() > 1e-2, "ALiBi changes nothing here: the case tests nothing"


# ------------------------------------------------------------------------------------------- the oracle


def test_oracle_bias_is_flash_attn_formula():
    """The oracle's scores equal a hand-built ``q·kᵀ·scale - slope·|i + s_k - s_q - j|`` softmax (one head)."""
    q, k, v = _qkv(1, 5, 7, 1, 1, 4, torch.float64, seed=1)
    slope = torch.tensor([0.7], dtype=torch.float64)
    i = torch.arange(5, dtype=torch.float64)[:, None]
    j = torch.arange(7, dtype=torch.float64)[None, :]
    s = (q[0, :, 0] @ k[0, :, 0].T) * 0.5 - 0.7 * (i + 2 - j).abs()
    s = s.masked_fill(j > i + 2, float("-inf"))  # causal, bottom-right
    p = torch.softmax(s, -1)
    o, l = reference.attention(q, k, v, 0.5, True, alibi_slopes=slope)
    torch.testing.assert_close(o[0, :, 0], p @ v[0, :, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(l[0, 0], torch.logsumexp(s, -1), rtol=0, atol=1e-12)
    # softcap first, then the bias
    o, _ = reference.attention(q, k, v, 0.5, False, softcap=0.3, alibi_slopes=slope)
    s = torch.tanh((q[0, :, 0] @ k[0, :, 0].T) * 0.5 / 0.3) * 0.3 - 0.7 * (i + 2 - j).abs()
    torch.testing.assert_close(o[0, :, 0], torch.softmax(s, -1) @ v[0, :, 0], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ dense

# (b, s_q, s_k, h_q, h_kv, d, causal, window, softcap, dtype, per-batch slopes)
DENSE_CASES = [
    (2, 37, 37, 4, 2, 16, True, (-1, -1), 0.0, torch.float32, True),     # causal, GQA 2, (b, h) slopes
    (1, 45, 29, 4, 4, 16, False, (-1, -1), 0.0, torch.float32, False),   # s_q > s_k, non-causal
    (1, 53, 29, 2, 1, 16, True, (-1, -1), 0.0, torch.float32, True),     # s_q > s_k, causal: empty rows
    (1, 29, 53, 4, 2, 32, True, (-1, -1), 0.0, torch.float16, False),    # s_q < s_k, causal
    (2, 33, 33, 6, 2, 16, False, (5, 3), 0.0, torch.float16, True),      # GQA 3, both-sided window
    (1, 40, 40, 2, 1, 16, True, (9, 0), 1.5, torch.float32, False),      # window + softcap (Gemma 2 local)
    (2, 31, 31, 4, 4, 16, False, (-1, -1), 5.0, torch.float32, True),    # softcap, non-causal
    (1, 21, 34, 2, 1, 59, True, (-1, -1), 0.0, torch.float32, False),    # odd head dim
    (1, 70, 70, 2, 1, 12, False, (16, 16), 0.0, torch.float16, True),    # window edges on block boundaries
    (1, 48, 48, 2, 2, 16, False, (-1, 20), 0.0, torch.float32, True),    # right window only: unmasked loops
]


@pytest.mark.parametrize("b,s_q,s_k,h_q,h_kv,d,causal,window,softcap,dtype,per_batch", DENSE_CASES)
def test_dense_matches_oracle(cpu_backend, b, s_q, s_k, h_q, h_kv, d, causal, window, softcap, dtype, per_batch):
    q, k, v = _qkv(b, s_q, s_k, h_q, h_kv, d, dtype, seed=s_q + s_k + d)
    dout = _rand(q.shape, dtype, torch.Generator().manual_seed(1))
    alibi = _slopes((b, h_q) if per_batch else (h_q,), seed=s_q)
    got = _run(ring_attn.flash_attn_func, q, k, v, dout, causal=causal, window_size=window, softcap=softcap,
               alibi_slopes=alibi, return_lse=True)
    _assert_matches(got, q, k, v, dout, alibi, causal=causal, window=window, softcap=softcap)


def test_positional_alibi_and_per_batch_rows_are_used():
    """``alibi_slopes`` is flash_attn_func's 9th positional argument; row ``b`` of ``(batch, heads)`` slopes
    applies to batch entry ``b`` (swapping the rows swaps the results)."""
    q, k, v = _qkv(2, 24, 24, 2, 2, 16, torch.float32, seed=3)
    q[1], k[1], v[1] = q[0], k[0], v[0]  # two identical batch entries
    alibi = torch.tensor([[0.1, 0.5], [0.9, 0.02]])
    out = ring_attn.flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, alibi)
    kw = ring_attn.flash_attn_func(q, k, v, causal=True, alibi_slopes=alibi)
    torch.testing.assert_close(out, kw, rtol=0, atol=0)
    swapped = ring_attn.flash_attn_func(q, k, v, causal=True, alibi_slopes=alibi.flip(0))
    torch.testing.assert_close(swapped[0], out[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(swapped[1], out[0], rtol=0, atol=1e-6)
    assert (out[0] - out[1]).abs().max() > 1e-2
    # (heads,) slopes equal the same row repeated over the batch
    torch.testing.assert_close(ring_attn.flash_attn_func(q, k, v, causal=True, alibi_slopes=alibi[1]),
                               ring_attn.flash_attn_func(q, k, v, causal=True, alibi_slopes=alibi[1].repeat(2, 1)),
                               rtol=0, atol=0)


def test_slopes_with_any_strides_and_no_gradient():
    """Slopes that are a strided view are read correctly; slopes that require grad get none (as flash-attn)."""
    q, k, v = _qkv(2, 30, 30, 4, 2, 16, torch.float32, seed=8)
    dout = _rand(q.shape, torch.float32, torch.Generator().manual_seed(9))
    big = _slopes((4, 2), seed=4)
    alibi = big.T  # (2, 4), strides (1, 2)
    assert not alibi.is_contiguous()
    leaf = alibi.clone().requires_grad_()
    got = _run(ring_attn.flash_attn_func, q, k, v, dout, causal=True, alibi_slopes=leaf, return_lse=True)
    assert leaf.grad is None
    got_strided = _run(ring_attn.flash_attn_func, q, k, v, dout, causal=True, alibi_slopes=alibi, return_lse=True)
    for a, b in zip(got, got_strided):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _assert_matches(got, q, k, v, dout, alibi.contiguous(), causal=True)


# ----------------------------------------------------------------------------------------------- varlen

# (lens_q, lens_k, causal, window, softcap, dtype, per-sequence slopes)
VARLEN_CASES = [
    ([17, 0, 33, 5], [17, 3, 33, 20], True, (-1, -1), 0.0, torch.float32, True),
    ([25, 40], [40, 25], False, (-1, -1), 0.0, torch.float16, False),
    ([30, 1, 22], [30, 1, 22], True, (6, 0), 3.0, torch.float32, True),
    ([19, 34], [34, 19], False, (12, 2), 0.0, torch.float16, True),
]


@pytest.mark.parametrize("lens_q,lens_k,causal,window,softcap,dtype,per_seq", VARLEN_CASES)
def test_varlen_matches_oracle(cpu_backend, lens_q, lens_k, causal, window, softcap, dtype, per_seq):
    g = torch.Generator().manual_seed(sum(lens_q))
    q = _rand((sum(lens_q), 4, 16), dtype, g)
    k, v = _rand((sum(lens_k), 2, 16), dtype, g), _rand((sum(lens_k), 2, 16), dtype, g)
    dout = _rand(q.shape, dtype, g)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    alibi = _slopes((len(lens_q), 4) if per_seq else (4,), seed=len(lens_q))
    got = _run(ring_attn.flash_attn_varlen_func, q, k, v, dout, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
               window_size=window, softcap=softcap, alibi_slopes=alibi, return_lse=True)
    _assert_matches(got, q, k, v, dout, alibi, causal=causal, window=window, softcap=softcap, cu_q=cu_q, cu_k=cu_k)


# ------------------------------------------------------------------------------- the fused backward modes


@pytest.mark.parametrize("mode", ["fused", "fused-ordered"])
def test_fused_backward_modes(mode, monkeypatch):
    """RING_ATTN_BWD=fused / fused-ordered: dQ comes from the dK/dV kernel's step, which must add the bias too."""
    monkeypatch.setenv("RING_ATTN_BWD", mode)
    q, k, v = _qkv(2, 45, 37, 4, 2, 16, torch.float32, seed=31)
    dout = _rand(q.shape, torch.float32, torch.Generator().manual_seed(32))
    alibi = _slopes((2, 4), seed=33)
    for opts in (dict(causal=True), dict(causal=False, window=(7, 4), softcap=2.0)):
        got = _run(ring_attn.flash_attn_func, q, k, v, dout, causal=opts["causal"],
                   window_size=opts.get("window", (-1, -1)), softcap=opts.get("softcap", 0.0), alibi_slopes=alibi,
                   return_lse=True)
        _assert_matches(got, q, k, v, dout, alibi, **opts)
    lens = [20, 0, 33]
    cu = _cu(lens)
    g = torch.Generator().manual_seed(34)
    qp, kp, vp, dp = (_rand((53, h, 16), torch.float16, g) for h in (4, 2, 2, 4))
    alibi = _slopes((3, 4), seed=35)
    got = _run(ring_attn.flash_attn_varlen_func, qp, kp, vp, dp, cu, cu, 33, 33, causal=True, alibi_slopes=alibi,
               return_lse=True)
    _assert_matches(got, qp, kp, vp, dp, alibi, causal=True, cu_q=cu, cu_k=cu)


# ------------------------------------------------------------------------------------------ packed forms


def test_packed_forms(cpu_backend):
    g = torch.Generator().manual_seed(41)
    qkv = _rand((2, 35, 3, 4, 16), torch.float32, g).requires_grad_()
    dout = _rand((2, 35, 4, 16), torch.float32, g)
    alibi = _slopes((4,), seed=42)
    out, lse, _ = ring_attn.flash_attn_qkvpacked_func(qkv, 0.0, None, True, (-1, -1), 0.0, alibi, False, True)
    out.backward(dout)
    q, k, v = qkv.detach().unbind(2)
    _assert_matches((out.detach(), lse.detach(), *qkv.grad.unbind(2)), q, k, v, dout, alibi, causal=True)

    q = _rand((1, 27, 6, 16), torch.float16, g)
    kv = _rand((1, 40, 2, 2, 16), torch.float16, g)
    dout = _rand(q.shape, torch.float16, g)
    alibi = _slopes((1, 6), seed=43)
    qs, kvs = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out, lse = ring_attn.flash_attn_kvpacked_func(qs, kvs, causal=True, alibi_slopes=alibi, return_lse=True)
    out.backward(dout)
    _assert_matches((out.detach(), lse.detach(), qs.grad, *kvs.grad.unbind(2)), q, *kv.unbind(2), dout, alibi,
                    causal=True)

    lens = [13, 0, 29]
    cu = _cu(lens)
    qkv = _rand((42, 3, 2, 16), torch.float32, g).requires_grad_()
    dout = _rand((42, 2, 16), torch.float32, g)
    alibi = _slopes((3, 2), seed=44)
    out, lse, _ = ring_attn.flash_attn_varlen_qkvpacked_func(qkv, cu, 29, 0.0, None, False, (-1, -1), 0.0, alibi,
                                                            return_attn_probs=True)
    out.backward(dout)
    _assert_matches((out.detach(), lse.detach(), *qkv.grad.unbind(1)), *qkv.detach().unbind(1), dout, alibi,
                    cu_q=cu, cu_k=cu)

    lens_k = [20, 4, 29]
    cu_k = _cu(lens_k)
    q = _rand((42, 4, 16), torch.float32, g)
    kv = _rand((53, 2, 2, 16), torch.float32, g)
    dout = _rand(q.shape, torch.float32, g)
    alibi = _slopes((4,), seed=45)
    qs, kvs = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out, lse = ring_attn.flash_attn_varlen_kvpacked_func(qs, kvs, cu, cu_k, 29, 29, causal=True, softcap=2.0,
                                                         alibi_slopes=alibi, return_lse=True)
    out.backward(dout)
    _assert_matches((out.detach(), lse.detach(), qs.grad, *kvs.grad.unbind(1)), q, *kv.unbind(1), dout, alibi,
                    causal=True, softcap=2.0, cu_q=cu, cu_k=cu_k)


def test_torch_compile_fullgraph_and_opcheck():
    """The slopes travel through the custom ops: torch.compile(fullgraph) gives the eager results and
    gradients, and torch.library.opcheck accepts the forward op with slopes (schema, fake tensor, autograd)."""
    q, k, v = _qkv(2, 20, 20, 4, 2, 16, torch.float32, seed=51)
    alibi = _slopes((2, 4), seed=52)

    def f(q, k, v, alibi):
        out, lse = ring_attn.flash_attn_func(q, k, v, causal=True, alibi_slopes=alibi, return_lse=True)
        return (out * 2).sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True)
    args = [x.clone().requires_grad_() for x in (q, k, v)]
    eager_args = [x.clone().requires_grad_() for x in (q, k, v)]
    y, y_eager = compiled(*args, alibi), f(*eager_args, alibi)
    y.backward()
    y_eager.backward()
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(args, eager_args):
        torch.testing.assert_close(a.grad, b.grad)
    torch.library.opcheck(torch.ops.ring_attn.flash_attn_forward.default,
                          (*(x.clone().requires_grad_() for x in (q, k, v)), None, None, 20, 20, 0.25, True, -1, -1,
                           0.0, alibi, 0.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------- block-level API (explicit offsets)


@pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (False, (6, 11), 2.0)])
def test_block_api_offsets_and_merge(cpu_backend, causal, window, softcap):
    """Keys split into pieces, each with its own causal offset (global positions), merged into a running fp32
    (out, lse) and backpropagated into fp32 accumulators: the bias uses the explicit offset, so the pieces give
    the whole and the oracle."""
    from ring_attn.ops.attention_block import attention_block_backward, attention_block_forward, attention_delta

    q, k, v = _qkv(2, 40, 56, 4, 2, 16, torch.float32, seed=21)
    alibi = _slopes((2, 4), seed=22)
    scale, offset = 0.25, 56 - 40
    out, lse = torch.zeros(q.shape), torch.full((2, 4, 40), float("-inf"))
    pieces = [(0, 16), (16, 35), (35, 56)]
    for k0, k1 in pieces:
        attention_block_forward(q, k[:, k0:k1], v[:, k0:k1], scale, causal, offset - k0, out=out, lse=lse,
                                window=window, softcap=softcap, alibi_slopes=alibi)
    o, l = reference.attention(q.double(), k.double(), v.double(), scale, causal, window=window, softcap=softcap,
                               alibi_slopes=alibi.double())
    torch.testing.assert_close(out.double(), o, rtol=0, atol=2e-6)
    assert torch.equal(torch.isinf(lse), torch.isinf(l))
    whole, _ = attention_block_forward(q, k, v, scale, causal, window=window, softcap=softcap, alibi_slopes=alibi)
    torch.testing.assert_close(out, whole, rtol=0, atol=2e-6)

    dout = _rand(q.shape, torch.float32, torch.Generator().manual_seed(3))
    delta = attention_delta(dout, out)
    dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(v.shape)
    for k0, k1 in pieces:
        attention_block_backward(dout, q, k[:, k0:k1], v[:, k0:k1], lse, delta, dq, dk[:, k0:k1], dv[:, k0:k1],
                                 scale, causal, offset - k0, window=window, softcap=softcap, alibi_slopes=alibi)
    oracle = _oracle(q, k, v, dout, alibi, scale=scale, causal=causal, window=window, softcap=softcap)
    for name, g, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), oracle[2:]):
        torch.testing.assert_close(g.double(), ref, rtol=0, atol=5e-6, msg=name)


# ------------------------------------------------------------------------------------ property-based test


@given(data=st.data())
def test_property_random_shapes_and_options(data):
    """Random shapes, GQA ratios, windows, causal, softcap, slope shapes, dtypes and backward mode."""
    h_kv = data.draw(st.integers(1, 2), label="h_kv")
    h_q = h_kv * data.draw(st.integers(1, 3), label="group")
    b = data.draw(st.integers(1, 2), label="b")
    s_q = data.draw(st.integers(1, 50), label="s_q")
    s_k = data.draw(st.integers(1, 50), label="s_k")
    d = data.draw(st.sampled_from([8, 16, 20]), label="d")
    causal = data.draw(st.booleans(), label="causal")
    window = (data.draw(st.integers(-1, 20), label="left"), data.draw(st.integers(-1, 20), label="right"))
    softcap = data.draw(st.sampled_from([0.0, 0.0, 2.0]), label="softcap")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    per_batch = data.draw(st.booleans(), label="per_batch")
    mode = data.draw(st.sampled_from(["two-kernel", "fused", "fused-ordered"]), label="RING_ATTN_BWD")
    seed = data.draw(st.integers(0, 1000), label="seed")
    q, k, v = _qkv(b, s_q, s_k, h_q, h_kv, d, dtype, seed=seed)
    dout = _rand(q.shape, dtype, torch.Generator().manual_seed(seed + 1))
    alibi = torch.rand((b, h_q) if per_batch else (h_q,), generator=torch.Generator().manual_seed(seed)) * 0.5
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RING_ATTN_BWD", mode)
        got = _run(ring_attn.flash_attn_func, q, k, v, dout, causal=causal, window_size=window, softcap=softcap,
                   alibi_slopes=alibi, return_lse=True)
    opts = dict(causal=causal, window=window, softcap=softcap)
    oracle = _oracle(q, k, v, dout, alibi, **opts)
    base = _oracle(q, k, v, dout, alibi, compute=dtype, **opts)
    assert torch.equal(torch.isinf(got[1]), torch.isinf(oracle[1]))
    assert_within_rule("out", got[0], oracle[0], base[0], dtype, FORWARD)
    for name, g, o, bl in zip(("dq", "dk", "dv"), got[2:], oracle[2:], base[2:]):
        assert_within_rule(name, g, o, bl, dtype, BACKWARD)


# ------------------------------------------------------------------------------------ backend selection


def test_every_backend_lists_alibi():
    """The capability table: triton, native and reference all run ALiBi, so nothing is refused for it."""
    for name in backends.BACKENDS:
        assert backends.CAPABILITIES[(name, "attention")].alibi, name
    reasons = backends.not_supported_reasons("native", "attention", "cpu", torch.float32, 16, alibi=True)
    assert not any("alibi" in r for r in reasons), reasons


@pytest.mark.skipif(not NATIVE_BUILT, reason="ring_attn._C is not built (no C++ compiler at install time)")
def test_auto_selection_routes_alibi_to_native(monkeypatch):
    """A CPU machine with the extension built and no interpreter: automatic selection now hands ALiBi calls
    (dense and varlen, with window and softcap) to native, as it does plain attention; the interpreter on
    (this test suite) keeps Triton first."""
    monkeypatch.setattr(backends, "interpreter_enabled", lambda: False)
    with backends.force(None):
        for kw in (dict(), dict(varlen=True, window=(5, 0), softcap=2.0)):
            assert backends.select("attention", torch.device("cpu"), torch.float32, 16, alibi=True,
                                   **kw).NAME == "native"
            assert backends.select("attention", torch.device("cpu"), torch.float16, 16, alibi=True,
                                   **kw).NAME == backends.select("attention", torch.device("cpu"), torch.float16,
                                                                 16, **kw).NAME
    monkeypatch.undo()
    if backends.triton_available() and backends.interpreter_enabled():
        with backends.force(None):
            assert backends.select("attention", torch.device("cpu"), torch.float32, 16, alibi=True).NAME == "triton"


@pytest.mark.skipif(not NATIVE_BUILT, reason="ring_attn._C is not built (no C++ compiler at install time)")
def test_pinned_native_is_handed_the_slopes(monkeypatch):
    """Pinned native: the public function reaches the native kernels with the fp32 ``[batch, h_q]`` slopes
    (per-head slopes expanded over the batch) in forward and backward, and the result matches the oracle."""
    from ring_attn.backends import native

    seen = []
    for fn in ("attention_forward", "attention_backward"):
        orig = getattr(native, fn)

        def spy(*a, _orig=orig, _fn=fn, **kw):
            seen.append((_fn, kw["alibi"]))
            return _orig(*a, **kw)

        monkeypatch.setattr(native, fn, spy)
    q, k, v = _qkv(2, 70, 70, 4, 2, 16, torch.float32, seed=12)
    dout = _rand(q.shape, torch.float32, torch.Generator().manual_seed(13))
    alibi = _slopes((4,), seed=14)
    with backends.force("native"):
        got = _run(ring_attn.flash_attn_func, q, k, v, dout, causal=True, alibi_slopes=alibi, return_lse=True)
    assert [name for name, _ in seen] == ["attention_forward", "attention_backward"]
    for _, sl in seen:
        assert sl.dtype == torch.float32 and sl.shape == (2, 4)
        assert torch.equal(sl, alibi.expand(2, 4))
    _assert_matches(got, q, k, v, dout, alibi, causal=True)


def test_tma_forward_falls_back_with_alibi(monkeypatch):
    """RING_ATTN_FWD=tma: the TMA forward has no ALiBi, so the pointer kernel runs (and says why)."""
    from ring_attn.backends.triton import attention as A

    monkeypatch.setenv("RING_ATTN_FWD", "tma")
    q, k, v = _qkv(1, 40, 40, 2, 2, 64, torch.float16, seed=5)
    variant, why = A.forward_variant(q, k, v, torch.empty_like(q), alibi=True)
    assert variant == "pointer"
    if A.forward_variant(q, k, v, torch.empty_like(q))[0] == "tma":  # everything else would have allowed it
        assert "ALiBi" in why
    dout = _rand(q.shape, torch.float16, torch.Generator().manual_seed(6))
    alibi = _slopes((2,), seed=7)
    got = _run(ring_attn.flash_attn_func, q, k, v, dout, causal=True, alibi_slopes=alibi, return_lse=True)
    _assert_matches(got, q, k, v, dout, alibi, causal=True)


# ------------------------------------------------------------------------------------------------ refusals

_q, _k, _v = _qkv(2, 8, 8, 4, 2, 16, torch.float32)
_cu8 = torch.tensor([0, 3, 8], dtype=torch.int32)

BAD_DENSE = [
    (TypeError, r"alibi_slopes must be float32 \(as flash-attn requires\), got torch\.float16 \(shape \(4,\)\)",
     torch.rand(4).half()),
    (TypeError, r"alibi_slopes must be float32 .* got torch\.float64", torch.rand(2, 4, dtype=torch.float64)),
    (TypeError, r"alibi_slopes must be a float32 torch\.Tensor of shape \(4,\) or \(2, 4\) or None, got list",
     [0.1, 0.2, 0.3, 0.4]),
    (ValueError, r"alibi_slopes has shape \(3,\); expected \(heads_q,\) = \(4,\) or \(batch, heads_q\) = \(2, 4\)",
     torch.rand(3)),
    (ValueError, r"alibi_slopes has shape \(3, 4\); expected .* \(batch, heads_q\) = \(2, 4\)", torch.rand(3, 4)),
    (ValueError, r"alibi_slopes has shape \(2, 4, 1\)", torch.rand(2, 4, 1)),
    (ValueError, r"alibi_slopes has shape \(\); expected", torch.tensor(0.5)),
    (ValueError, r"alibi_slopes is on meta; expected q's device cpu", torch.empty(4, device="meta")),
]


def _no_launch(*a, **kw):
    raise AssertionError("a backend was selected before the arguments were checked")


@pytest.mark.parametrize("exc,msg,alibi", BAD_DENSE, ids=[c[1][:40] for c in BAD_DENSE])
def test_refusals(exc, msg, alibi, monkeypatch):
    monkeypatch.setattr(backends, "select", _no_launch)
    with pytest.raises(exc, match=msg):
        ring_attn.flash_attn_func(_q, _k, _v, alibi_slopes=alibi)
    with pytest.raises(exc, match=msg.replace(r"\(2, 4\)", r"\(\d, 4\)").replace("batch", "(batch|n_seqs)")):
        ring_attn.flash_attn_varlen_func(_q[0], _k[0], _v[0], _cu8, _cu8, 5, 5, alibi_slopes=alibi)


def test_refusals_varlen_and_block_api(monkeypatch):
    monkeypatch.setattr(backends, "select", _no_launch)
    with pytest.raises(ValueError, match=r"alibi_slopes has shape \(3, 4\); expected \(heads_q,\) = \(4,\) or "
                                         r"\(n_seqs, heads_q\) = \(2, 4\)"):
        ring_attn.flash_attn_varlen_func(_q[0], _k[0], _v[0], _cu8, _cu8, 5, 5, alibi_slopes=torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"alibi_slopes has shape \(2, 2\)"):
        ring_attn.flash_attn_qkvpacked_func(torch.randn(2, 8, 3, 4, 16), alibi_slopes=torch.rand(2, 2))
    from ring_attn.ops.attention_block import attention_block_backward, attention_block_forward

    with pytest.raises(TypeError, match=r"alibi_slopes must be float32"):
        attention_block_forward(_q, _k, _v, 0.25, True, alibi_slopes=torch.rand(4).double())
    with pytest.raises(ValueError, match=r"alibi_slopes has shape \(5,\)"):
        attention_block_backward(_q, _q, _k, _v, torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), torch.zeros(_q.shape),
                                 torch.zeros(_k.shape), torch.zeros(_v.shape), 0.25, True, alibi_slopes=torch.rand(5))


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("causal,window,softcap,shape,per_batch,mode,varlen", [
    (True, (-1, -1), 0.0, (2, 1000, 1000, 8, 2, 128), False, "two-kernel", True),  # BLOOM/MPT-style, GQA
    (False, (100, 37), 30.0, (1, 700, 900, 6, 3, 128), True, "fused-ordered", False),  # window + softcap
    (True, (255, -1), 0.0, (1, 1531, 777, 4, 4, 64), True, "two-kernel", False),    # s_q > s_k, window
])
def test_gpu_bf16_matches_oracle(causal, window, softcap, shape, per_batch, mode, varlen, monkeypatch):
    """bf16 on the GPU (the real Triton kernels with ALIBI on) against the float64 oracle. Few cases: each new
    constexpr combination is a compile, and scripts/gpu_check.sh gives every GPU test 100 s together."""
    monkeypatch.setenv("RING_ATTN_BWD", mode)
    dtype = torch.bfloat16
    b, s_q, s_k, h_q, h_kv, d = shape
    q, k, v = _qkv(b, s_q, s_k, h_q, h_kv, d, dtype, seed=s_q)
    dout = _rand(q.shape, dtype, torch.Generator().manual_seed(2))
    # the standard ALiBi slopes 2^(-8 i / h), as BLOOM uses them
    heads = 2.0 ** (-8.0 * torch.arange(1, h_q + 1) / h_q)
    g = torch.Generator().manual_seed(4)
    alibi = heads.repeat(b, 1) * torch.rand(b, 1, generator=g) if per_batch else heads
    got = _run(ring_attn.flash_attn_func, *(x.cuda() for x in (q, k, v, dout)), causal=causal, window_size=window,
               softcap=softcap, alibi_slopes=alibi.float().cuda(), return_lse=True)
    _assert_matches([x.cpu() for x in got], q, k, v, dout, alibi.float(), causal=causal, window=window,
                    softcap=softcap)
    if not varlen:
        return
    lens = [300, 0, 517, 33]
    cu = _cu(lens).cuda()
    qp, kp, vp, dp = (_rand((850, h, d), dtype, g) for h in (h_q, h_kv, h_kv, h_q))
    sl = heads.repeat(4, 1) * torch.rand(4, 1, generator=g)
    got = _run(ring_attn.flash_attn_varlen_func, *(x.cuda() for x in (qp, kp, vp, dp)), cu, cu, 517, 517,
               causal=causal, window_size=window, softcap=softcap, alibi_slopes=sl.float().cuda(), return_lse=True)
    _assert_matches([x.cpu() for x in got], qp, kp, vp, dp, sl.float(), causal=causal, window=window,
                    softcap=softcap, cu_q=cu.cpu(), cu_k=cu.cpu())
