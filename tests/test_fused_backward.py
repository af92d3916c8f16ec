"""The experimental 5-matmul backward (RING_ATTN_BWD=fused: dK/dV and dQ in one kernel, dQ by fp32
atomics) against the float64 oracle under the interpreter, plus the ring's accumulating block backward, and
the cases it must leave to the deterministic two-kernel path."""
import pytest
import torch

import ring_attn
from ring_attn import reference
from ring_attn.backends.triton import attention as A
from ring_attn.ops.attention import attention_block_backward, attention_block_forward, attention_delta

from accuracy import BACKWARD, assert_within_rule

# CPU runs the kernels through the interpreter (conftest); with a GPU the same tests run the compiled kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["fused", "fused-ordered"])
def fused(monkeypatch, request):
    monkeypatch.setenv("RING_ATTN_BWD", request.param)
    calls = []
    real = A.bwd_fused_kernel

    class Spy:  # count launches, so a silent fall-back to the two-kernel path cannot pass as the fused one
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]
    monkeypatch.setattr(A, "bwd_fused_kernel", Spy())
    return calls


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
    assert fused, "the fused kernel did not run"
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
    assert len(fused) == 2
    qr, kr, vr = (x.cpu().double().requires_grad_() for x in (q, k, v))
    o, _ = reference.attention(qr, kr, vr, 0.25, True)
    o.backward(dout.cpu().double())
    dq, dk, dv = dq.cpu(), dk.cpu(), dv.cpu()
    torch.testing.assert_close(dq.double() - 0.5, qr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk.double(), kr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv.double(), vr.grad, rtol=1e-5, atol=1e-5)


def test_fused_backward_is_opt_in():
    assert A.tiles.fused_backward_mode() == ""


def test_ordered_fused_backward_is_bitwise_reproducible(monkeypatch):
    monkeypatch.setenv("RING_ATTN_BWD", "fused-ordered")
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, 40, h, 16, generator=g).to(DEVICE) for h in (4, 2, 2, 4))
    grads = []
    for _ in range(2):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        ring_attn.flash_attn_func(qs, ks, vs, causal=True).backward(dout)
        grads.append((qs.grad, ks.grad, vs.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fused", "fused-ordered"])
@pytest.mark.parametrize("s,h_q,h_kv,d,causal", [(1000, 8, 2, 128, True), (777, 4, 4, 64, False),
                                                 (2048, 4, 1, 64, True)])
def test_gpu_fused_backward(monkeypatch, mode, s, h_q, h_kv, d, causal):
    """On the GPU: the compiled kernel (real concurrency, so the ordered adds' counters and the atomics
    are exercised) against the oracle in bf16, and fused-ordered bitwise equal across runs."""
    monkeypatch.setenv("RING_ATTN_BWD", mode)
    g = torch.Generator().manual_seed(s)
    q, k, v, dout = (torch.randn(1, s, h, d, generator=g).to("cuda", torch.bfloat16)
                     for h in (h_q, h_kv, h_kv, h_q))
    grads = []
    for _ in range(2):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        ring_attn.flash_attn_func(qs, ks, vs, causal=causal).backward(dout)
        grads.append((qs.grad, ks.grad, vs.grad))
    if mode == "fused-ordered":
        for a, b in zip(*grads):
            assert torch.equal(a, b)
    res = {}
    for name, cdt in (("oracle", torch.float64), ("baseline", torch.bfloat16)):
        qr, kr, vr = (x.cpu().to(cdt).requires_grad_() for x in (q, k, v))
        o, _ = reference.attention(qr, kr, vr, None, causal, compute_dtype=cdt)
        o.backward(dout.cpu().to(cdt))
        res[name] = (qr.grad, kr.grad, vr.grad)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_within_rule(name, grads[0][i], res["oracle"][i], res["baseline"][i], torch.bfloat16, BACKWARD)
