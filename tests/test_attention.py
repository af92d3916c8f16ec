"""flash_attn_func / flash_attn_varlen_func and the block-level API against the float64 oracle.

On CPU the Triton kernels run through the interpreter (conftest sets TRITON_INTERPRET=1), so shapes are small;
block sizes there are 16, so lengths up to ~70 cross several blocks, ragged ends and the causal diagonal.
bf16 is covered by the GPU tests at the bottom and, under the interpreter (fp32 dots), by tests/test_flash_compat.py.
"""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ring_attn
from ring_attn import backends, reference
from ring_attn.ops.attention import (
    VarlenSeqs,
    attention_block_backward,
    attention_block_forward,
    attention_delta,
)
from accuracy import BACKWARD, FORWARD, assert_within_rule
from ring_attn.backends.triton.tiles import DECODE_MAX_Q

# every test runs with automatic selection and pinned to the native and reference backends (conftest)
pytestmark = pytest.mark.usefixtures("cpu_backend")

CPU_DTYPES = [torch.float32, torch.float16]
HEAD_DIMS = [8, 16, 40, 64, 80, 96, 128]


def _qkv(b, s_q, s_k, h_q, h_kv, d, dtype, device="cpu", fused=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fused:  # views of one [b, s, h_q + 2 h_kv, d] projection: strided heads, contiguous last dim
        assert s_q == s_k
        qkv = torch.randn(b, s_q, h_q + 2 * h_kv, d, generator=g).to(device=device, dtype=dtype)
        q, k, v = qkv.split([h_q, h_kv, h_kv], dim=2)
    else:
        q = torch.randn(b, s_q, h_q, d, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(b, s_k, h_kv, d, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(b, s_k, h_kv, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def _check_against_oracle(q, k, v, causal, softmax_scale=None, use_lse_grad=False):
    """Run the op with autograd and compare out, lse and all grads with the rule of docs/design.md."""
    dtype = q.dtype
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = ring_attn.flash_attn_func(qs, ks, vs, causal=causal, softmax_scale=softmax_scale, return_lse=True)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(out.device, dtype)
    dlse = torch.randn(lse.shape, generator=g).to(lse.device) if use_lse_grad else None
    loss = (out.float() * dout.float()).sum() + ((lse.masked_fill(torch.isinf(lse), 0) * dlse).sum() if
                                                  use_lse_grad else 0.0)
    loss.backward()

    results = {}
    for name, cdt in (("oracle", torch.float64), ("baseline", dtype)):
        qr, kr, vr = (x.detach().cpu().to(cdt).requires_grad_() for x in (q, k, v))
        o, l = reference.attention(qr, kr, vr, softmax_scale, causal, compute_dtype=cdt)
        ref_loss = (o.double() * dout.double().cpu()).sum()
        if use_lse_grad:
            ref_loss = ref_loss + (l.double().masked_fill(torch.isinf(l), 0) * dlse.double().cpu()).sum()
        ref_loss.backward()
        results[name] = (o.to(dtype), l, qr.grad, kr.grad, vr.grad)
    oracle, baseline = results["oracle"], results["baseline"]

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(oracle[1])), "rows with no visible key differ"
    assert_within_rule("out", out, oracle[0], baseline[0], dtype, FORWARD)
    finite = ~torch.isinf(oracle[1])
    assert_within_rule("lse", lse.cpu()[finite], oracle[1][finite], baseline[1].float()[finite], dtype, FORWARD)
    for name, got, o_g, b_g in zip(("dq", "dk", "dv"), (qs.grad, ks.grad, vs.grad), oracle[2:], baseline[2:]):
        assert got.dtype == dtype
        assert_within_rule(name, got, o_g, b_g, dtype, BACKWARD)


@given(
    b=st.integers(1, 2),
    s_q=st.integers(1, 70),
    s_k=st.integers(1, 70),
    h_kv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4, 8]),
    d=st.sampled_from(HEAD_DIMS),
    causal=st.booleans(),
    dtype=st.sampled_from(CPU_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_dense_matches_oracle(b, s_q, s_k, h_kv, group, d, causal, dtype, seed):
    h_q = h_kv * group
    if h_q * b * max(s_q, s_k) * d > 70 * 8 * 128:  # keep each interpreted example around a second
        h_kv, h_q = 1, group
    _check_against_oracle(*_qkv(b, s_q, s_k, h_q, h_kv, d, dtype, seed=seed), causal)


@given(s=st.integers(1, 50), group=st.sampled_from([1, 2, 4]), d=st.sampled_from([16, 64, 80]),
       causal=st.booleans(), dtype=st.sampled_from(CPU_DTYPES))
def test_strided_fused_qkv_views(s, group, d, causal, dtype):
    q, k, v = _qkv(2, s, s, 2 * group, 2, d, dtype, fused=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    _check_against_oracle(q, k, v, causal)


def test_head_dim_256_and_custom_scale():
    _check_against_oracle(*_qkv(1, 23, 31, 2, 1, 256, torch.float32), causal=True, softmax_scale=0.3)


def test_last_dim_not_contiguous_is_accepted():
    q, k, v = _qkv(1, 20, 20, 2, 2, 32, torch.float32)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) != 1
    assert qt.stride(-1) != 1
    torch.testing.assert_close(ring_attn.flash_attn_func(qt, k, v, causal=True),
                               ring_attn.flash_attn_func(q, k, v, causal=True), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_lse_is_differentiable(dtype):
    _check_against_oracle(*_qkv(2, 37, 29, 4, 2, 32, dtype), causal=True, use_lse_grad=True)


def test_empty_sequences_backward_with_an_expanded_gradient():
    """Zero tokens (dense S = 0, and a packed batch of empty sequences): forward and backward run, and
    ``out.sum().backward()`` hands the backward an expanded gradient (every stride 0), which an empty tensor's
    checks must not refuse."""
    x = torch.randn(2, 0, 2, 16, requires_grad=True)
    ring_attn.flash_attn_func(x, x, x, causal=True).sum().backward()
    assert x.grad.shape == x.shape
    xv = torch.randn(0, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    out, lse = ring_attn.flash_attn_varlen_func(xv, xv, xv, cu, cu, 0, 0, causal=True, return_lse=True)
    (out.sum() + lse.sum()).backward()
    assert xv.grad.shape == xv.shape and lse.shape == (2, 0)


def test_head_dim_one_with_any_last_stride_and_no_keys():
    """head_dim 1, whose last stride torch leaves arbitrary (a permuted tensor is "contiguous" with stride 12
    there, and its gradient buffers inherit it), and a packed batch whose keys are all empty (zero-size k/v with
    stride 0): the backward refused its own gradient buffers ("dq must have a contiguous last dim"; found by a
    randomized run). Forward and gradients match the float64 oracle."""
    q = torch.randn(1, 1, 4, 3, dtype=torch.float64).permute(0, 2, 3, 1).float()  # [1, 4, 3, 1], strides (12,3,1,12)
    assert q.stride(-1) == 12 and q.is_contiguous()
    k, v = torch.randn(1, 5, 3, 1), torch.randn(1, 5, 3, 1)
    _check_against_oracle(q, k, v, causal=True)
    qv = torch.randn(4, 3, 1, requires_grad=True)
    kv = torch.empty_strided((0, 1, 1), (1, 0, 0)).requires_grad_()
    out = ring_attn.flash_attn_varlen_func(qv, kv, kv, torch.tensor([0, 4], dtype=torch.int32),
                                           torch.tensor([0, 0], dtype=torch.int32), 4, 0, causal=True)
    out.sum().backward()
    assert not out.any() and not qv.grad.any() and kv.grad.shape == kv.shape


def test_gradients_do_not_depend_on_the_upstream_gradients_layout():
    """The same dout as a strided view and contiguous gives the same bits on every backend (the reference
    backend's matmuls rounded by layout, so torch.compile, which hands the backward a contiguous gradient,
    differed from eager; found by a randomized run)."""
    q, k, v = _qkv(1, 7, 9, 2, 1, 15, torch.float32)
    buf = torch.randn(10, 2, 3, 18)
    dout = buf[1:8, :1, :2, :15].transpose(0, 1)
    grads = []
    for g in (dout, dout.contiguous()):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        ring_attn.flash_attn_func(*xs, causal=True, softcap=3.0).backward(g)
        grads.append([x.grad for x in xs])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_rows_that_see_no_key():
    # causal with s_q > s_k: query i sees keys j <= i - 7, so the first 7 rows see nothing
    q, k, v = _qkv(1, 40, 33, 2, 1, 16, torch.float32)
    for x in (q, k, v):
        x.requires_grad_()
    out, lse = ring_attn.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :7] == 0) and torch.all(lse[:, :, :7] == float("-inf"))
    assert torch.isfinite(lse[:, :, 7:]).all() and (out[:, 7:].abs().sum(-1) > 0).all()
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert torch.all(q.grad[:, :7] == 0)


def test_backward_is_bitwise_deterministic():
    q, k, v = _qkv(2, 53, 61, 8, 2, 64, torch.float16)
    dout = torch.randn(q.shape).half()
    grads = []
    for _ in range(2):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        ring_attn.flash_attn_func(qs, ks, vs, causal=True).backward(dout)
        grads.append((qs.grad, ks.grad, vs.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------- varlen


@st.composite
def varlen_case(draw):
    n = draw(st.integers(1, 4))
    lens_q = [draw(st.integers(0, 30)) for _ in range(n)]
    same = draw(st.booleans())
    lens_k = lens_q if same else [draw(st.integers(0, 30)) for _ in range(n)]
    return lens_q, lens_k


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)


@given(case=varlen_case(), group=st.sampled_from([1, 2, 4]), d=st.sampled_from([16, 40, 64]),
       causal=st.booleans(), dtype=st.sampled_from(CPU_DTYPES))
def test_varlen_equals_dense_per_sequence(case, group, d, causal, dtype):
    lens_q, lens_k = case
    h_kv, h_q = 2, 2 * group
    g = torch.Generator().manual_seed(sum(lens_q) + 7 * sum(lens_k))
    q = torch.randn(sum(lens_q), h_q, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(sum(lens_k), h_kv, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(sum(lens_k), h_kv, d, generator=g).to(dtype).requires_grad_()
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    out, lse = ring_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                return_lse=True)
    assert out.shape == q.shape and lse.shape == (h_q, q.shape[0])
    dout = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(dout)
    for i in range(len(lens_q)):
        a, e = cu_q[i].item(), cu_q[i + 1].item()
        ak, ek = cu_k[i].item(), cu_k[i + 1].item()
        if e == a:
            continue
        qi, ki, vi = (x.detach()[None, lo:hi].clone().requires_grad_() for x, lo, hi in
                      ((q, a, e), (k, ak, ek), (v, ak, ek)))
        if ek == ak:  # a sequence with no keys: zero output, -inf lse, zero grads
            assert torch.all(out[a:e] == 0) and torch.all(lse[:, a:e] == float("-inf"))
            assert torch.all(q.grad[a:e] == 0)
            continue
        oi, li = ring_attn.flash_attn_func(qi, ki, vi, causal=causal, return_lse=True)
        oi.backward(dout[None, a:e])
        # bitwise when both calls take the same forward path; a decoding-shaped call (<= 16 query rows) has
        # its own tile and packs GQA groups, so against a longer batch it agrees to rounding only
        same_path = (max(lens_q) <= DECODE_MAX_Q) == (e - a <= DECODE_MAX_Q) or group == 1
        exact = dict(rtol=0, atol=0) if same_path else dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 \
            else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(out[a:e], oi[0], **exact)
        torch.testing.assert_close(lse[:, a:e], li[0], **exact)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(q.grad[a:e], qi.grad[0], **tol)
        torch.testing.assert_close(k.grad[ak:ek], ki.grad[0], **tol)
        torch.testing.assert_close(v.grad[ak:ek], vi.grad[0], **tol)


# ------------------------------------------------------------------------------------ block-level API (ring)


@pytest.mark.parametrize("offset", [-1, 0, 5, -20])
def test_block_forward_causal_offset_and_fp32_out(offset):
    q, k, v = _qkv(2, 24, 30, 4, 2, 32, torch.float16)
    out, lse = attention_block_forward(q, k, v, 0.2, True, causal_offset=offset, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    ro, rl = reference.attention(q, k, v, 0.2, True, causal_offset=offset)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    assert (out.double() - ro).abs().max() < 2e-3
    fin = torch.isfinite(rl)
    assert (lse.double()[fin] - rl[fin]).abs().max() < 1e-3


def test_block_backward_adds_into_accumulators_from_final_lse():
    """Split keys into two blocks: grads of the blocks, from the final out/lse, must add up to the whole."""
    q, k, v = _qkv(1, 33, 40, 4, 2, 32, torch.float32)
    dout = torch.randn(q.shape)
    out, lse = attention_block_forward(q, k, v, 0.25, True)
    delta = attention_delta(dout, out)
    dq = torch.full(q.shape, 0.5)
    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
    # block 1: keys [0, 17); block 2: keys [17, 40). Bottom-right offset of the whole is 40 - 33 = 7.
    attention_block_backward(dout, q, k[:, :17], v[:, :17], lse, delta, dq, dk[:, :17], dv[:, :17], 0.25, True,
                             causal_offset=7)
    attention_block_backward(dout, q, k[:, 17:], v[:, 17:], lse, delta, dq, dk[:, 17:], dv[:, 17:], 0.25, True,
                             causal_offset=7 - 17)
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    o, _ = reference.attention(qr, kr, vr, 0.25, True)
    o.backward(dout.double())
    torch.testing.assert_close(dq.double() - 0.5, qr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk.double(), kr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv.double(), vr.grad, rtol=1e-5, atol=1e-5)


def test_block_forward_partial_varlen_seqs():
    """VarlenSeqs addressing only the second half of each packed sequence (what the zigzag ring does)."""
    lens = [10, 6, 14]
    cu = _cu(lens)
    q = torch.randn(30, 2, 16)
    k, v = torch.randn(30, 1, 16), torch.randn(30, 1, 16)
    half = torch.tensor(lens, dtype=torch.int32) // 2
    seqs = VarlenSeqs(cu[:-1] + half, half, cu[:-1], torch.tensor(lens, dtype=torch.int32), 7, 14, False)
    out, lse = attention_block_forward(q, k, v, 0.25, False, seqs=seqs, out_dtype=torch.float32)
    for i, n in enumerate(lens):
        a = cu[i].item()
        assert torch.all(out[a:a + n // 2] == 0) and torch.all(lse[:, a:a + n // 2] == float("-inf"))
        ro, rl = reference.attention(q[None, a + n // 2:a + n], k[None, a:a + n], v[None, a:a + n], 0.25, False)
        torch.testing.assert_close(out[a + n // 2:a + n].double(), ro[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[:, a + n // 2:a + n].double(), rl[0], rtol=1e-5, atol=1e-5)


def test_block_backward_rejects_low_precision_accumulators():
    q, k, v = _qkv(1, 8, 8, 1, 1, 16, torch.float16)
    out, lse = attention_block_forward(q, k, v, 0.25, False)
    delta = attention_delta(out, out)
    with pytest.raises(TypeError, match="dq accumulator must be float32"):
        attention_block_backward(out, q, k, v, lse, delta, torch.zeros_like(q), torch.zeros(k.shape),
                                 torch.zeros(v.shape), 0.25, False)


def _block_misuse(case):
    q, k, v = _qkv(2, 5, 7, 4, 2, 8, torch.float32)
    out, lse = attention_block_forward(q, k, v, 0.3, False)
    delta = attention_delta(torch.randn_like(q), out)
    grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    return {
        "k batch": lambda: attention_block_forward(q, k[:1], v[:1], 0.3, False),
        "v keys": lambda: attention_block_forward(q, k, v[:, :3], 0.3, False),
        "head dim": lambda: attention_block_forward(q, k[..., :4], v[..., :4], 0.3, False),
        "dtype": lambda: attention_block_forward(q, k.half(), v.half(), 0.3, False),
        "scale": lambda: attention_block_forward(q, k, v, "0.3", False),
        "offset": lambda: attention_block_forward(q, k, v, 0.3, True, 1.5),
        "delta dout": lambda: attention_delta(torch.randn(2, 2, 4, 8), out),
        "delta dlse": lambda: attention_delta(torch.randn_like(q), out, torch.zeros(2, 4, 4)),
        "bwd dout": lambda: attention_block_backward(torch.randn(2, 2, 4, 8), q, k, v, lse, delta, *grads, 0.3, False),
        "bwd lse": lambda: attention_block_backward(torch.randn_like(q), q, k, v, lse[:, :, :1], delta, *grads, 0.3,
                                                    False),
        "bwd delta": lambda: attention_block_backward(torch.randn_like(q), q, k, v, lse, delta[:1], *grads, 0.3,
                                                      False),
        "bwd k batch": lambda: attention_block_backward(torch.randn_like(q), q, k[:1], v[:1], lse, delta, grads[0],
                                                        grads[1][:1], grads[2][:1], 0.3, False),
    }[case], grads


@pytest.mark.parametrize("case, exc, match", [
    ("k batch", ValueError, "attention_block_forward: k batch size 1 != q batch size 2"),
    ("v keys", ValueError, "k and v must have the same shape"),
    ("head dim", ValueError, "k head_dim 4 != q head_dim 8"),
    ("dtype", TypeError, "must share a dtype"),
    ("scale", TypeError, r"softmax_scale must be a finite float or None, got '0.3' \(str\)"),
    ("offset", TypeError, "causal_offset must be an int, got 1.5"),
    ("delta dout", ValueError, r"attention_delta: dout has shape \(2, 2, 4, 8\); expected \(2, 5, 4, 8\)"),
    ("delta dlse", ValueError, r"attention_delta: dlse has shape \(2, 4, 4\); expected \(2, 4, 5\)"),
    ("bwd dout", ValueError, r"attention_block_backward: dout has shape \(2, 2, 4, 8\)"),
    ("bwd lse", ValueError, r"attention_block_backward: lse has shape \(2, 4, 1\); expected \(2, 4, 5\)"),
    ("bwd delta", ValueError, r"attention_block_backward: delta has shape \(1, 4, 5\)"),
    ("bwd k batch", ValueError, "attention_block_backward: k batch size 1 != q batch size 2"),
])
def test_block_api_refuses_misfitting_inputs_before_running(case, exc, match):
    """The block functions index k/v, dout, lse and delta by q's shape: a misfit was read out of bounds (garbage or
    inf, different on every run; found by a randomized run). Each raises before anything is written."""
    call, grads = _block_misuse(case)
    with pytest.raises(exc, match=match):
        call()
    if case.startswith("bwd"):
        assert all(int(g.count_nonzero()) == 0 for g in grads)


# ------------------------------------------------------------------------------- backends, compile


@pytest.mark.parametrize("causal", [False, True])
def test_reference_backend_keeps_the_contracts(causal):
    q, k, v = _qkv(2, 45, 20, 4, 1, 32, torch.float32)
    with backends.force("reference"):
        assert backends.select("attention", q.device).NAME == "reference"
        _check_against_oracle(q, k, v, causal)
        cu = _cu([5, 0, 40])
        qv, kv, vv = q[0, :45], k[0, :20].repeat(3, 1, 1)[:45], v[0, :20].repeat(3, 1, 1)[:45]
        ref_out = ring_attn.flash_attn_varlen_func(qv, kv, vv, cu, cu, 40, 40, causal=causal)
    tri_out = ring_attn.flash_attn_varlen_func(qv, kv, vv, cu, cu, 40, 40, causal=causal)
    torch.testing.assert_close(ref_out, tri_out, rtol=1e-5, atol=1e-5)


def test_backend_selection_explains_itself(monkeypatch):
    with backends.force(None):  # automatic selection, whatever the cpu_backend fixture pinned
        monkeypatch.setenv("RING_ATTN_BACKEND", "cuda-magic")
        with pytest.raises(ValueError, match="RING_ATTN_BACKEND='cuda-magic'"):
            backends.select("attention", torch.device("cpu"))
        monkeypatch.delenv("RING_ATTN_BACKEND")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        expected = "native" if backends.native_available() else "reference"  # the built extension comes first
        assert backends.select("attention", torch.device("cpu")).NAME == expected
    assert "TRITON_INTERPRET=1" in " ".join(backends.not_supported_reasons("triton", "attention", torch.device("cpu")))


def test_torch_compile_fullgraph():
    q, k, v = _qkv(1, 20, 20, 4, 2, 16, torch.float32)

    def f(q, k, v):
        out, lse = ring_attn.flash_attn_func(q, k, v, causal=True, return_lse=True)
        return (out * 2).sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True)  # inductor: the custom ops stay opaque in its graph
    args = [x.clone().requires_grad_() for x in (q, k, v)]
    eager_args = [x.clone().requires_grad_() for x in (q, k, v)]
    y, y_eager = compiled(*args), f(*eager_args)
    y.backward()
    y_eager.backward()
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(args, eager_args):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_compile_dynamic_true_is_one_graph():
    """dynamic=True makes the float arguments symbolic: the finiteness checks compare instead of calling
    math.isfinite, which broke the graph (fullgraph=True: an error; found by a randomized compile run)."""
    from torch._dynamo.utils import counters

    q, k, v = _qkv(2, 8, 8, 4, 2, 16, torch.float32)
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda q, k, v, c: ring_attn.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True,
                                                                   softcap=c),
                      backend="aot_eager", fullgraph=True, dynamic=True)
    for c in (0.0, 5.0):
        assert torch.equal(f(q, k, v, c), ring_attn.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True,
                                                                    softcap=c))
    assert sum(counters["graph_break"].values()) == 0


def test_block_api_takes_the_backends_head_dims():
    """The block checks leave the head dim's upper bound to the backend: native takes any (320 here), the
    public flash-attn functions keep flash-attn's 256."""
    if not backends.native_available():
        pytest.skip("native extension not built")
    q, k, v = _qkv(1, 3, 5, 2, 1, 320, torch.float32)
    with backends.force("native"):
        out, lse = attention_block_forward(q, k, v, 0.05, True)
    ref_out, ref_lse = reference.attention(q.double(), k.double(), v.double(), 0.05, True)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head_dim 320 is not supported; expected 1 .. 256"):
        ring_attn.flash_attn_func(q, k, v)
    with pytest.raises(ValueError, match="softmax_scale must be a finite float"):  # float() would overflow
        ring_attn.flash_attn_func(q[..., :16], k[..., :16], v[..., :16], softmax_scale=10 ** 400)
    # numpy scalars are real numbers (np.float32 is not a float subclass; it was refused)
    got = ring_attn.flash_attn_func(q[..., :16], k[..., :16], v[..., :16], softmax_scale=np.float32(0.25))
    assert torch.equal(got, ring_attn.flash_attn_func(q[..., :16], k[..., :16], v[..., :16], softmax_scale=0.25))


def test_torch_compile_varlen_max_seqlen_stays_symbolic():
    """A packed batch's max_seqlen differs from step to step: once dynamo makes it symbolic it must stay so (the
    int check's operator.index specialised it: one graph per value, and fullgraph=True failed at the recompile
    limit, the 9th value; found by a randomized compile run)."""
    from torch._dynamo.utils import counters

    def f(q, k, v, cu, m):
        return ring_attn.flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for t in range(3, 15):
        q, k, v = torch.randn(t, 4, 16), torch.randn(t, 2, 16), torch.randn(t, 2, 16)
        cu = torch.tensor([0, 1, t], dtype=torch.int32)
        assert torch.equal(compiled(q, k, v, cu, t - 1), f(q, k, v, cu, t - 1))
    assert counters["stats"]["unique_graphs"] <= 2


# ------------------------------------------------------------------------------------------- bad inputs

_q, _k, _v = _qkv(1, 8, 8, 4, 2, 16, torch.float32)
_cu8 = torch.tensor([0, 3, 8], dtype=torch.int32)
_p = (_q[0], _k[0], _v[0])

BAD_DENSE = [
    ("q must be a torch.Tensor", TypeError, (_q.numpy(), _k, _v), {}),
    ("q must be 4-D", ValueError, (_q[0], _k, _v), {}),
    ("v must be 4-D", ValueError, (_q, _k, _v[0]), {}),
    ("q.dtype is torch.float64", TypeError, (_q.double(), _k, _v), {}),
    ("must share a dtype", TypeError, (_q, _k.half(), _v), {}),
    ("k and v must have the same shape", ValueError, (_q, _k, _v[:, :5]), {}),
    ("k batch size 2 != q batch size 1", ValueError, (_q, _k.repeat(2, 1, 1, 1), _v.repeat(2, 1, 1, 1)), {}),
    ("k head_dim 8 != q head_dim 16", ValueError, (_q, _k[..., :8], _v[..., :8]), {}),
    ("head_dim 0 is not supported", ValueError, (_q[..., :0], _k[..., :0], _v[..., :0]), {}),
    ("head_dim 264 is not supported", ValueError, (_q.repeat(1, 1, 1, 33)[..., :264],) * 3, {}),
    ("q heads \\(4\\) must be a positive multiple of k/v heads \\(3\\)", ValueError,
     (_q, _k.repeat(1, 1, 2, 1)[:, :, :3], _v.repeat(1, 1, 2, 1)[:, :, :3]), {}),
    ("softmax_scale must be a finite float", ValueError, (_q, _k, _v), {"softmax_scale": float("nan")}),
]


@pytest.mark.parametrize("msg,exc,args,kwargs", BAD_DENSE, ids=[c[0][:30] for c in BAD_DENSE])
def test_bad_dense_input(msg, exc, args, kwargs):
    with pytest.raises(exc, match=msg):
        ring_attn.flash_attn_func(*args, **kwargs)


BAD_VARLEN = [
    ("cu_seqlens_q.dtype is torch.int64", TypeError, dict(cu_seqlens_q=_cu8.long())),
    ("cu_seqlens_k must be 1-D", ValueError, dict(cu_seqlens_k=_cu8[None])),
    ("cu_seqlens_q\\[0\\] is 1; expected 0", ValueError, dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32))),
    ("must be non-decreasing", ValueError, dict(cu_seqlens_q=torch.tensor([0, 5, 3, 8], dtype=torch.int32),
                                                cu_seqlens_k=torch.tensor([0, 3, 5, 8], dtype=torch.int32))),
    ("cu_seqlens_k\\[-1\\] is 7; expected the number of packed tokens 8", ValueError,
     dict(cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32))),
    ("cu_seqlens_q has 3 entries but cu_seqlens_k has 4", ValueError,
     dict(cu_seqlens_k=torch.tensor([0, 3, 5, 8], dtype=torch.int32))),
    ("max_seqlen_q is 4 but cu_seqlens_q has a sequence of length 5", ValueError, dict(max_seqlen_q=4)),
    ("max_seqlen_k must be a non-negative int", ValueError, dict(max_seqlen_k=-1)),
    ("q must be 3-D", ValueError, dict(q=_q)),
]


@pytest.mark.parametrize("msg,exc,override", BAD_VARLEN, ids=[c[0][:30] for c in BAD_VARLEN])
def test_bad_varlen_input(msg, exc, override):
    args = dict(q=_p[0], k=_p[1], v=_p[2], cu_seqlens_q=_cu8, cu_seqlens_k=_cu8, max_seqlen_q=5, max_seqlen_k=5)
    args.update(override)
    with pytest.raises(exc, match=msg):
        ring_attn.flash_attn_varlen_func(**args)


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 1000, 1000, 8, 2, 128), (1, 777, 1531, 4, 1, 64), (2, 300, 200, 6, 3, 96),
                                   (1, 257, 257, 2, 2, 256), (1, 129, 129, 4, 4, 80)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_matches_oracle(dtype, shape, causal):
    b, s_q, s_k, h_q, h_kv, d = shape
    _check_against_oracle(*_qkv(b, s_q, s_k, h_q, h_kv, d, dtype, device="cuda"), causal)


@pytest.mark.gpu
def test_gpu_varlen_bf16_and_determinism():
    lens = [1, 300, 0, 1025, 77]
    cu = _cu(lens).cuda()
    q = torch.randn(sum(lens), 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lens), 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(sum(lens), 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        for x in (q, k, v):
            x.grad = None
        out = ring_attn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
        out.backward(dout)
        grads.append([x.grad.clone() for x in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    a, e = 1, 301
    oi = ring_attn.flash_attn_func(q[None, a:e], k[None, a:e], v[None, a:e], causal=True)
    torch.testing.assert_close(out[a:e], oi[0], rtol=0, atol=0)


def test_batches_too_large_for_one_grid_are_split(monkeypatch):
    """batch x heads beyond CUDA's grid-dim-1 limit (65535) is launched in chunks; same results."""
    from ring_attn.ops import attention_block as attn_mod

    q, k, v = _qkv(3, 19, 19, 4, 2, 16, torch.float32)
    cu = _cu([7, 0, 12, 19, 19])
    packed = (q.reshape(-1, 4, 16)[:57], k.reshape(-1, 2, 16)[:57], v.reshape(-1, 2, 16)[:57])
    dout = torch.randn(q.shape)
    expected = []
    for chunked in (False, True):
        if chunked:
            monkeypatch.setattr(attn_mod, "_MAX_GRID_Y", 8)  # 2 sequences (x 4 heads) per launch
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out = ring_attn.flash_attn_func(qs, ks, vs, causal=True)
        out.backward(dout)
        pv = [x.clone().requires_grad_() for x in packed]
        out_v = ring_attn.flash_attn_varlen_func(*pv, cu, cu, 19, 19, causal=True)
        out_v.backward(dout.reshape(-1, 4, 16)[:57])
        expected.append([out, qs.grad, ks.grad, vs.grad, out_v] + [x.grad for x in pv])
    for a, b in zip(*expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["triton", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_forward_merges_into_running_result(which, causal):
    """Keys in three blocks: the first block's fp32 (out, lse), then the others merged in place (the ring's
    forward) equal attention over all keys. A strided view of the running result is merged into too."""
    q, k, v = _qkv(2, 29, 45, 4, 2, 32, torch.float16)
    splits = [0, 13, 30, 45]
    with backends.force(which):
        out, lse = None, None
        for a, b in zip(splits[:-1], splits[1:]):
            off = (45 - 29) - a  # bottom-right alignment of the whole, shifted to this block's first key
            if out is None:
                out, lse = attention_block_forward(q, k[:, a:b], v[:, a:b], 0.3, causal, off,
                                                   out_dtype=torch.float32)
            else:
                res = attention_block_forward(q, k[:, a:b], v[:, a:b], 0.3, causal, off, out=out, lse=lse)
                assert res[0] is out and res[1] is lse
        ro, rl = reference.attention(q, k, v, 0.3, causal)
        assert (out.double() - ro).abs().max() < 2e-3
        assert torch.equal(torch.isinf(lse), torch.isinf(rl))
        fin = torch.isfinite(rl)
        assert (lse.double()[fin] - rl[fin]).abs().max() < 1e-4
        # merging into the second half of the rows only (a strided view), as the zigzag ring does
        o2, l2 = attention_block_forward(q, k[:, :20], v[:, :20], 0.3, False, out_dtype=torch.float32)
        attention_block_forward(q[:, 15:], k[:, 20:], v[:, 20:], 0.3, False, out=o2[:, 15:], lse=l2[:, :, 15:])
    r1, _ = reference.attention(q[:, :15], k[:, :20], v[:, :20], 0.3, False)
    r2, _ = reference.attention(q[:, 15:], k, v, 0.3, False)
    assert (o2[:, :15].double() - r1).abs().max() < 2e-3 and (o2[:, 15:].double() - r2).abs().max() < 2e-3


def test_block_forward_merge_rejects_bad_running_result():
    q, k, v = _qkv(1, 8, 8, 2, 1, 16, torch.float32)
    out, lse = attention_block_forward(q, k, v, 0.25, False)
    with pytest.raises(ValueError, match="pass both out and lse"):
        attention_block_forward(q, k, v, 0.25, False, out=out)
    with pytest.raises(TypeError, match="must be float32"):
        attention_block_forward(q, k, v, 0.25, False, out=out.half(), lse=lse)
    with pytest.raises(ValueError, match="do not match q"):
        attention_block_forward(q, k, v, 0.25, False, out=out[:, :4], lse=lse)
