"""The 5-matmul backward (RING_ATTN_BWD=fused / fused-ordered: dK/dV and dQ in one kernel, dQ added into
fp32 by unordered atomics or in a fixed order) against the float64 oracle under the interpreter: dense and
varlen, GQA, s_q != s_k, sliding windows, softcap, bf16, the ring's accumulating block backward with offsets.
Under the interpreter every ordered add checks that its counter is exact (the launcher raises otherwise)."""
import os
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ring_attn
from ring_attn import backends, reference
from ring_attn.backends.triton import attention as A
from ring_attn.ops.attention import attention_block_backward, attention_block_forward, attention_delta

import test_flash_compat as FC
from accuracy import BACKWARD, assert_within_rule

# CPU runs the kernels through the interpreter (conftest); with a GPU the same tests run the compiled kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["fused", "fused-ordered"])
def fused(monkeypatch, request):
    monkeypatch.setenv("RING_ATTN_BWD", request.param)
    calls = []

    class Spy:  # record launches, so a silent fall-back to the two-kernel path cannot pass as the fused one
        def __init__(self, real):
            self.real = real

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append((self.real.fn.__name__, kwargs.get("DQ_MODE", 0)))
                return self.real[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(A, "bwd_dkdv_kernel", Spy(A.bwd_dkdv_kernel))
    monkeypatch.setattr(A, "bwd_dq_kernel", Spy(A.bwd_dq_kernel))
    want = {"fused": 1, "fused-ordered": 2}[request.param]

    def fused_only():  # every backward launch so far was the fused kernel in the asked-for mode
        return bool(calls) and all(c == ("bwd_dkdv_kernel", want) for c in calls)
    fused_only.calls = calls
    return fused_only


@pytest.mark.parametrize("b,s_q,s_k,h_q,h_kv,d,causal,dtype", [
    (1, 37, 37, 4, 2, 32, True, torch.float32),
    (2, 20, 45, 2, 2, 16, True, torch.float32),
    (1, 45, 20, 4, 1, 24, True, torch.float32),
    (1, 33, 50, 2, 1, 64, False, torch.float16),
])
def test_fused_backward_matches_oracle(fused, b, s_q, s_k, h_q, h_kv, d, causal, dtype):
    g = torch.Generator().manual_seed(s_q * 7 + d)
    q = torch.randn(b, s_q, h_q, d, generator=g).to(dtype)
    k = torch.randn(b, s_k, h_kv, d, generator=g).to(dtype)
    v = torch.randn(b, s_k, h_kv, d, generator=g).to(dtype)
    dout = torch.randn(b, s_q, h_q, d, generator=g).to(dtype)
    qs, ks, vs = (x.to(DEVICE).clone().requires_grad_() for x in (q, k, v))
    ring_attn.flash_attn_func(qs, ks, vs, causal=causal).backward(dout.to(DEVICE))
    assert fused(), f"the fused kernel did not run alone: {fused.calls}"
    res = {}
    for name, cdt in (("oracle", torch.float64), ("baseline", dtype)):
        qr, kr, vr = (x.to(cdt).clone().requires_grad_() for x in (q, k, v))
        o, _ = reference.attention(qr, kr, vr, None, causal, compute_dtype=cdt)
        o.backward(dout.to(cdt))
        res[name] = (qr.grad, kr.grad, vr.grad)
    for i, (name, got) in enumerate((("dq", qs.grad), ("dk", ks.grad), ("dv", vs.grad))):
        assert got.dtype == dtype
        assert_within_rule(name, got, res["oracle"][i], res["baseline"][i], dtype, BACKWARD)


def test_fused_block_backward_adds_into_accumulators(fused):
    """The ring's call: keys in two blocks with global causal offsets, grads added into fp32 accumulators."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, h, 32, generator=g).to(DEVICE) for n, h in ((33, 4), (40, 2), (40, 2)))
    dout = torch.randn(q.shape, generator=g).to(DEVICE)
    out, lse = attention_block_forward(q, k, v, 0.25, True)
    delta = attention_delta(dout, out)
    dq = torch.full(q.shape, 0.5, device=DEVICE)
    dk, dv = torch.zeros(k.shape, device=DEVICE), torch.zeros(v.shape, device=DEVICE)
    attention_block_backward(dout, q, k[:, :17], v[:, :17], lse, delta, dq, dk[:, :17], dv[:, :17], 0.25, True,
                             causal_offset=7)
    attention_block_backward(dout, q, k[:, 17:], v[:, 17:], lse, delta, dq, dk[:, 17:], dv[:, 17:], 0.25, True,
                             causal_offset=7 - 17)
    assert fused() and len(fused.calls) == 2
    qr, kr, vr = (x.cpu().double().requires_grad_() for x in (q, k, v))
    o, _ = reference.attention(qr, kr, vr, 0.25, True)
    o.backward(dout.cpu().double())
    dq, dk, dv = dq.cpu(), dk.cpu(), dv.cpu()
    torch.testing.assert_close(dq.double() - 0.5, qr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk.double(), kr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv.double(), vr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", FC.DENSE_CASES, ids=lambda c: f"{c[6]}-w{c[7]}-cap{c[8]}-s{c[1]}x{c[2]}")
def test_fused_windows_and_softcap(fused, case):
    FC.test_window_and_softcap_match_oracle(*case)
    assert fused(), f"the fused kernel did not run alone: {fused.calls}"


@pytest.mark.parametrize("case", FC.VARLEN_CASES, ids=lambda c: f"{c[2]}-w{c[3]}-cap{c[4]}")
def test_fused_varlen(fused, case):
    FC.test_varlen_window_and_softcap_match_oracle(*case)
    assert fused(), f"the fused kernel did not run alone: {fused.calls}"


@pytest.mark.parametrize("causal,window,softcap", [(True, (9, 0), 0.0), (False, (6, 11), 2.0), (True, (-1, -1), 1.5)])
def test_fused_block_api_pieces(fused, causal, window, softcap):
    FC.test_block_api_pieces_with_offsets_merge_and_accumulate(causal, window, softcap)
    assert fused(), f"the fused kernel did not run alone: {fused.calls}"


def test_fused_bf16_under_the_interpreter(fused):
    FC.test_bf16_under_the_interpreter_is_right()
    assert fused(), f"the fused kernel did not run alone: {fused.calls}"


@given(mode=st.sampled_from(["fused", "fused-ordered"]), b=st.integers(1, 2), s_q=st.integers(1, 70),
       s_k=st.integers(1, 70), h_kv=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
       d=st.sampled_from([8, 16, 40]), causal=st.booleans(), left=st.integers(-1, 40), right=st.integers(-1, 40),
       softcap=st.sampled_from([0.0, 1.5]), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**16))
def test_fused_backward_property(mode, b, s_q, s_k, h_kv, group, d, causal, left, right, softcap, dtype, seed):
    """Random shapes, GQA ratios, windows (left/right, with and without causal), softcap and dtypes: the fused
    backward equals the oracle, and (interpreter) every ordered add found its counter exact."""
    q, k, v = FC._qkv(b, s_q, s_k, h_kv * group, h_kv, d, dtype, seed=seed)
    dout = FC._rand(q.shape, dtype, torch.Generator().manual_seed(seed + 1))
    window = (left, right)
    launched = []
    real = A.bwd_dq_kernel

    class NoDq:  # the dQ kernel must not run: the fused kernel computes dQ
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]
    with mock.patch.dict(os.environ, {"RING_ATTN_BWD": mode}), mock.patch.object(A, "bwd_dq_kernel", NoDq()):
        got = FC._run(ring_attn.flash_attn_func, q, k, v, dout, causal=causal, window_size=window,
                      softcap=softcap, return_lse=True)
    assert not launched
    FC._assert_matches(got, q, k, v, dout, causal=causal, window=window, softcap=softcap)


def test_fused_backward_is_opt_in(monkeypatch):
    monkeypatch.delenv("RING_ATTN_BWD", raising=False)
    assert backends.backward_mode() == ""
    monkeypatch.setenv("RING_ATTN_BWD", "two-kernel")
    assert backends.backward_mode() == ""


@pytest.mark.parametrize("fn", ["flash_attn_func", "ring_attn_func"])
def test_deterministic_true_contradicts_unordered_atomics(monkeypatch, fn):
    """flash-attn's deterministic=True is honoured: under RING_ATTN_BWD=fused (unordered atomics) it is refused
    before anything runs (the ring: before any collective); fused-ordered and the default accept it."""
    q = torch.randn(1, 8, 2, 16)
    call = getattr(ring_attn, fn)
    monkeypatch.setenv("RING_ATTN_BWD", "fused")
    with pytest.raises(ValueError, match=r"deterministic=True, but RING_ATTN_BWD=fused selects the Triton backward "
                                         r"with unordered fp32 atomics .* RING_ATTN_BWD=fused-ordered"):
        call(q, q, q, causal=True, deterministic=True)
    if fn == "flash_attn_func":  # (the ring needs a process group to run at all)
        call(q, q, q, causal=True, deterministic=False)
        for mode in ("fused-ordered", "two-kernel"):
            monkeypatch.setenv("RING_ATTN_BWD", mode)
            call(q, q, q, causal=True, deterministic=True)


def test_unknown_backward_mode_is_refused_before_any_launch(monkeypatch):
    q = torch.randn(1, 20, 2, 16, requires_grad=True)
    out = ring_attn.flash_attn_func(q, q.detach(), q.detach(), causal=True)
    monkeypatch.setenv("RING_ATTN_BWD", "fused_ordered")
    with pytest.raises(ValueError, match=r"RING_ATTN_BWD='fused_ordered': expected 'fused-ordered', 'fused', "
                                         r"'two-kernel' or unset"):
        out.sum().backward()
    assert q.grad is None


@pytest.mark.parametrize("window,softcap", [((-1, -1), 0.0), ((7, 0), 1.5)])
def test_ordered_fused_backward_is_bitwise_reproducible(monkeypatch, window, softcap):
    monkeypatch.setenv("RING_ATTN_BWD", "fused-ordered")
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, 40, h, 16, generator=g).to(DEVICE) for h in (4, 2, 2, 4))
    grads = []
    for _ in range(2):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        ring_attn.flash_attn_func(qs, ks, vs, causal=True, window_size=window, softcap=softcap).backward(dout)
        grads.append((qs.grad, ks.grad, vs.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fused", "fused-ordered"])
@pytest.mark.parametrize("s,h_q,h_kv,d,causal,window,softcap", [
    (1000, 8, 2, 128, True, (-1, -1), 0.0), (777, 4, 4, 64, False, (-1, -1), 0.0),
    (2048, 4, 1, 64, True, (-1, -1), 0.0), (1500, 4, 2, 128, True, (300, 0), 30.0),
    (1100, 4, 4, 64, False, (200, 90), 0.0)])
def test_gpu_fused_backward(monkeypatch, mode, s, h_q, h_kv, d, causal, window, softcap):
    """On the GPU: the compiled kernel (real concurrency, so the ordered adds' counters and the atomics
    are exercised) against the oracle in bf16, and fused-ordered bitwise equal across runs."""
    monkeypatch.setenv("RING_ATTN_BWD", mode)
    g = torch.Generator().manual_seed(s)
    q, k, v, dout = (torch.randn(1, s, h, d, generator=g).to("cuda", torch.bfloat16)
                     for h in (h_q, h_kv, h_kv, h_q))
    grads = []
    for _ in range(2):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        ring_attn.flash_attn_func(qs, ks, vs, causal=causal, window_size=window, softcap=softcap).backward(dout)
        grads.append((qs.grad, ks.grad, vs.grad))
    if mode == "fused-ordered":
        for a, b in zip(*grads):
            assert torch.equal(a, b)
    res = {}
    for name, cdt in (("oracle", torch.float64), ("baseline", torch.bfloat16)):
        qr, kr, vr = (x.cpu().to(cdt).requires_grad_() for x in (q, k, v))
        o, _ = reference.attention(qr, kr, vr, None, causal, compute_dtype=cdt, window=window, softcap=softcap)
        o.backward(dout.cpu().to(cdt))
        res[name] = (qr.grad, kr.grad, vr.grad)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_within_rule(name, grads[0][i], res["oracle"][i], res["baseline"][i], torch.bfloat16, BACKWARD)
