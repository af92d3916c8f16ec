"""ring_attn.layers.rotary (flash-attn's ``flash_attn.layers.rotary``): ``apply_rotary_emb``,
``apply_rotary_emb_qkv_``, ``apply_rotary_emb_kv_`` and ``RotaryEmbedding``. The signatures, every backend
against a float64 oracle written from flash-attn's definition (both pair layouts, partial rotary dims, int and
per-row offsets, packed sequences, GQA-packed qkv, XPos), in place, gradients, table caching and refusals."""
import inspect

import pytest
import torch

from ring_attn import reference
from ring_attn.layers import rotary
from ring_attn.layers.rotary import (RotaryEmbedding, apply_rotary_emb, apply_rotary_emb_kv_,
                                      apply_rotary_emb_qkv_)

pytestmark = pytest.mark.usefixtures("cpu_backend")


def test_signature_is_flash_attn_s(cpu_backend):
    params = [str(p) for p in inspect.signature(apply_rotary_emb).parameters.values()]
    assert params == ["x", "cos", "sin", "interleaved=False", "inplace=False", "seqlen_offsets=0",
                      "cu_seqlens=None", "max_seqlen=None"]


def _oracle(x, cos, sin, pos, interleaved):
    return reference.rotary_emb(x, cos, sin, pos, interleaved)


def _tables(g, rows, half, dtype=torch.float32):
    angle = torch.rand(rows, half, generator=g, dtype=torch.float64) * 6.3
    return angle.cos().to(dtype), angle.sin().to(dtype)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 10])
@pytest.mark.parametrize("offsets", ["zero", "int", "tensor"])
def test_dense_against_the_oracle(interleaved, rotary_dim, offsets, cpu_backend):
    g = torch.Generator().manual_seed(0)
    b, s, h, d = 3, 7, 2, 16
    x = torch.randn(b, s, h, d, generator=g)
    cos, sin = _tables(g, 40, rotary_dim // 2)
    off = {"zero": 0, "int": 5, "tensor": torch.tensor([0, 9, 30])}[offsets]
    pos = torch.arange(s)[None, :] + (off[:, None] if isinstance(off, torch.Tensor) else off)
    out = apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets=off)
    ref = _oracle(x, cos, sin, pos.expand(b, s), interleaved)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("interleaved", [False, True])
def test_packed_sequences_restart_their_positions(interleaved, cpu_backend):
    g = torch.Generator().manual_seed(1)
    lens = [4, 0, 6, 3]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    x = torch.randn(int(cu[-1]), 3, 8, generator=g)
    cos, sin = _tables(g, 20, 4)
    offs = torch.tensor([2, 0, 7, 1])
    pos = torch.cat([torch.arange(n) + o for n, o in zip(lens, offs.tolist())])
    out = apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets=offs, cu_seqlens=cu, max_seqlen=6)
    torch.testing.assert_close(out.double(), _oracle(x, cos, sin, pos, interleaved), rtol=0, atol=2e-6)
    pos0 = torch.cat([torch.arange(n) for n in lens])
    out0 = apply_rotary_emb(x, cos, sin, interleaved, cu_seqlens=cu, max_seqlen=6)
    torch.testing.assert_close(out0.double(), _oracle(x, cos, sin, pos0, interleaved), rtol=0, atol=2e-6)


@pytest.mark.parametrize("inplace", [False, True])
def test_packed_rows_outside_every_sequence_are_left_as_they_are(inplace, cpu_backend):
    """Rows past cu_seqlens[-1] (a packed buffer with room to spare) belong to no sequence: not rotated (flash-attn
    never touches them), their gradient passes through unchanged."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(10, 2, 8, generator=g)
    cos, sin = _tables(g, 12, 4)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    pos = torch.cat([torch.arange(4), torch.arange(3)])
    out = apply_rotary_emb(x.clone() if inplace else x, cos, sin, cu_seqlens=cu, max_seqlen=4, inplace=inplace)
    torch.testing.assert_close(out[:7].double(), _oracle(x[:7], cos, sin, pos, False), rtol=0, atol=2e-6)
    assert torch.equal(out[7:], x[7:])
    leaf = x.double().requires_grad_()
    (grad,) = torch.autograd.grad(apply_rotary_emb(leaf, cos.double(), sin.double(), cu_seqlens=cu).sum(), leaf)
    assert torch.equal(grad[7:], torch.ones_like(grad[7:]))


def test_half_precision_in_place_and_gradients(cpu_backend):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 2, 16, generator=g)
    cos, sin = _tables(g, 8, 6)
    ref = _oracle(x, cos, sin, torch.arange(5).expand(2, 5), False)
    for dtype in (torch.float16, torch.bfloat16):
        out = apply_rotary_emb(x.to(dtype), cos.to(dtype), sin.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=3e-2)
    y = x.clone()
    back = apply_rotary_emb(y, cos, sin, inplace=True)
    assert back is y and torch.equal(y, apply_rotary_emb(x, cos, sin))
    # gradients: the transpose rotation, checked in float64 against finite differences
    xd = torch.randn(2, 4, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cd, sd = (t.double() for t in _tables(g, 10, 3))
    for inter in (False, True):
        torch.autograd.gradcheck(lambda t: apply_rotary_emb(t, cd, sd, inter, seqlen_offsets=2), (xd,))
    # in place under autograd: x is a non-leaf that is overwritten and marked dirty
    leaf = torch.randn(2, 4, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    z = leaf * 1.0
    out = apply_rotary_emb(z, cd, sd, inplace=True)
    assert out is z
    (gin,) = torch.autograd.grad(out.sum(), leaf)
    (gref,) = torch.autograd.grad(apply_rotary_emb(leaf, cd, sd).sum(), leaf)
    torch.testing.assert_close(gin, gref, rtol=0, atol=1e-12)


def test_refusals(cpu_backend):
    x = torch.randn(2, 5, 2, 8)
    cos, sin = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="positions reach 6 but cos/sin have 6 rows"):
        apply_rotary_emb(x, cos, sin, seqlen_offsets=2)
    with pytest.raises(ValueError, match="positions reach 7"):
        apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"rotary_dim = 2 \* cos.shape\[1\] = 10"):
        apply_rotary_emb(x, torch.randn(6, 5), torch.randn(6, 5))
    with pytest.raises(ValueError, match="same shape"):
        apply_rotary_emb(x, cos, torch.randn(6, 3))
    with pytest.raises(ValueError, match=r"x must be \[batch, seqlen, heads, head_dim\]"):
        apply_rotary_emb(x[0], cos, sin)
    with pytest.raises(ValueError, match="seqlen_offsets must be an int"):
        apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="x must be a float16"):
        apply_rotary_emb(x.int(), cos, sin)
    with pytest.raises(ValueError, match="cu_seqlens must be an int32"):
        apply_rotary_emb(x[0], cos, sin, cu_seqlens=torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match="put a token at position -1: positions must be >= 0"):
        apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([0, -1]))
    # packed, CPU cu_seqlens: the real longest sequence is checked, whatever max_seqlen claims
    with pytest.raises(ValueError, match="positions reach 6 but cos/sin have 6 rows"):
        apply_rotary_emb(torch.randn(11, 2, 8), cos, sin, cu_seqlens=torch.tensor([0, 4, 11], dtype=torch.int32),
                         max_seqlen=3)
    # cu_seqlens decreasing, negative or past the packed rows (accepted silently before; flash-attn's kernel
    # would write past the end of x)
    for cu in ([0, 5, 3, 5], [0, 9], [-1, 4], [0, 2, 5, 100]):
        with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing, from >= 0 to at most the 5"):
            apply_rotary_emb(torch.randn(5, 2, 8), cos, sin, cu_seqlens=torch.tensor(cu, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------------
# the in-place forms and the module


def test_in_place_signatures_are_flash_attn_s(cpu_backend):
    def params(f):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]
    e = inspect.Parameter.empty
    assert params(apply_rotary_emb_qkv_) == [("qkv", e), ("cos", e), ("sin", e), ("cos_k", None), ("sin_k", None),
                                             ("interleaved", False), ("seqlen_offsets", 0), ("num_heads_q", None)]
    assert params(apply_rotary_emb_kv_) == [("kv", e), ("cos", e), ("sin", e), ("interleaved", False),
                                            ("seqlen_offsets", 0)]
    assert params(RotaryEmbedding.__init__)[:6] == [("self", e), ("dim", e), ("base", 10000.0),
                                                    ("interleaved", False), ("scale_base", None), ("device", None)]
    assert params(RotaryEmbedding.forward) == [("self", e), ("qkv", e), ("kv", None), ("seqlen_offset", 0),
                                               ("max_seqlen", None), ("num_heads_q", None)]
    assert rotary.apply_rotary_emb_func is apply_rotary_emb


def _positions(b, s, off, device=None):
    base = torch.arange(s, device=off.device if isinstance(off, torch.Tensor) else device)[None, :]
    return (base + (off[:, None] if isinstance(off, torch.Tensor) else off)).expand(b, s)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["5d", "gqa", "mqa"])
@pytest.mark.parametrize("k_tables", [False, True])
def test_qkv_in_place_against_the_oracle(interleaved, layout, k_tables, cpu_backend):
    g = torch.Generator().manual_seed(10)
    b, s, d, r = 2, 5, 16, 12
    hq, hk = {"5d": (3, 3), "gqa": (4, 2), "mqa": (3, 1)}[layout]
    cos, sin = _tables(g, 30, r // 2)
    cos_k, sin_k = _tables(g, 30, r // 2) if k_tables else (None, None)
    off = torch.tensor([0, 11]) if layout == "gqa" else 4
    if layout == "5d":
        qkv = torch.randn(b, s, 3, hq, d, generator=g)
        q0, k0, v0 = qkv[:, :, 0].clone(), qkv[:, :, 1].clone(), qkv[:, :, 2].clone()
        nq = None
    else:
        qkv = torch.randn(b, s, hq + 2 * hk, d, generator=g)
        q0, k0, v0 = (t.clone() for t in qkv.split([hq, hk, hk], dim=2))
        nq = hq
    ptr = qkv.data_ptr()
    out = apply_rotary_emb_qkv_(qkv, cos, sin, cos_k, sin_k, interleaved, off, nq)
    assert out is qkv and out.data_ptr() == ptr
    q, k, v = (out[:, :, 0], out[:, :, 1], out[:, :, 2]) if nq is None else out.split([hq, hk, hk], dim=2)
    pos = _positions(b, s, off)
    torch.testing.assert_close(q.double(), _oracle(q0, cos, sin, pos, interleaved), rtol=0, atol=2e-6)
    ck, sk = (cos, sin) if cos_k is None else (cos_k, sin_k)
    torch.testing.assert_close(k.double(), _oracle(k0, ck, sk, pos, interleaved), rtol=0, atol=2e-6)
    assert torch.equal(v, v0)
    assert torch.equal(q[..., r:], q0[..., r:]) and torch.equal(k[..., r:], k0[..., r:])


@pytest.mark.parametrize("interleaved", [False, True])
def test_kv_in_place_against_the_oracle(interleaved, cpu_backend):
    g = torch.Generator().manual_seed(11)
    kv = torch.randn(3, 4, 2, 2, 8, generator=g)
    k0, v0 = kv[:, :, 0].clone(), kv[:, :, 1].clone()
    cos, sin = _tables(g, 12, 4)
    off = torch.tensor([1, 0, 8], dtype=torch.int32)
    out = apply_rotary_emb_kv_(kv, cos, sin, interleaved, off)
    assert out is kv
    torch.testing.assert_close(kv[:, :, 0].double(), _oracle(k0, cos, sin, _positions(3, 4, off.long()), interleaved),
                               rtol=0, atol=2e-6)
    assert torch.equal(kv[:, :, 1], v0)


def test_in_place_gradients(cpu_backend):
    """The in-place forms under autograd: the input is a non-leaf overwritten in place. Gradients (float64)
    against autograd through the float64 oracle, with separate, scaled k tables (XPos: the backward is the
    transpose rotation, not the inverse), per-row offsets and the GQA layout."""
    g = torch.Generator().manual_seed(12)
    cos, sin, cos_k, sin_k = (t.double() for t in (*_tables(g, 10, 3), *_tables(g, 10, 3)))
    cos_k = cos_k * 1.3

    def rot(t, c, s_, off, inter):
        return reference.rotary_emb(t, c, s_, _positions(t.shape[0], t.shape[1], off), inter)

    offs = torch.tensor([0, 5])
    cases = [  # (input shape, ours, oracle)
        ((2, 3, 3, 2, 8), lambda t, i: apply_rotary_emb_qkv_(t, cos, sin, cos_k, sin_k, i, 2),
         lambda t, i: torch.stack([rot(t[:, :, 0], cos, sin, 2, i), rot(t[:, :, 1], cos_k, sin_k, 2, i),
                                   t[:, :, 2]], dim=2)),
        ((2, 3, 4, 8), lambda t, i: apply_rotary_emb_qkv_(t, cos, sin, interleaved=i, seqlen_offsets=offs,
                                                           num_heads_q=2),
         lambda t, i: torch.cat([rot(t[:, :, :2], cos, sin, offs, i), rot(t[:, :, 2:3], cos, sin, offs, i),
                                 t[:, :, 3:]], dim=2)),
        ((2, 3, 2, 2, 8), lambda t, i: apply_rotary_emb_kv_(t, cos, sin, i, 1),
         lambda t, i: torch.stack([rot(t[:, :, 0], cos, sin, 1, i), t[:, :, 1]], dim=2)),
    ]
    for shape, ours, oracle in cases:
        for inter in (False, True):
            leaf = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
            w = torch.randn(*shape, generator=g, dtype=torch.float64)
            z = leaf * 1.0
            out = ours(z, inter)
            assert out is z
            (got,) = torch.autograd.grad(out, leaf, w)
            (want,) = torch.autograd.grad(oracle(leaf, inter), leaf, w)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if cpu_backend == "reference":  # finite differences once (slow under the Triton interpreter)
        x5 = torch.randn(2, 3, 3, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(lambda t: apply_rotary_emb_qkv_(t * 1.0, cos, sin, cos_k, sin_k, True, 2), (x5,))
    # a leaf that requires grad: refused before the kernel writes into it (autograd's own refusal came after)
    leaf = torch.randn(1, 2, 3, 1, 6, requires_grad=True)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf"):
        apply_rotary_emb_qkv_(leaf, cos, sin)
    assert torch.equal(leaf.detach(), before)
    x = torch.randn(1, 2, 1, 6, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match=r"x \(1, 2, 1, 6\) is a leaf tensor that requires grad"):
        apply_rotary_emb(x, cos, sin, inplace=True)
    assert torch.equal(x.detach(), before)


def _flash_tables(dim, base, n, scale_base=None):
    """RotaryEmbedding's tables, from flash-attn's formulas in float64."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = torch.arange(n, dtype=torch.float64)[:, None] * inv
    cos, sin = freqs.cos(), freqs.sin()
    if scale_base is None:
        return cos, sin, cos, sin
    scale = (torch.arange(0, dim, 2, dtype=torch.float64) + 0.4 * dim) / (1.4 * dim)
    xpos = scale ** ((torch.arange(n, dtype=torch.float64) - n // 2) / scale_base)[:, None]
    return cos * xpos, sin * xpos, cos / xpos, sin / xpos


@pytest.mark.parametrize("scale_base", [None, 512])
@pytest.mark.parametrize("with_kv", [False, True])
def test_rotary_embedding_module(scale_base, with_kv, cpu_backend):
    g = torch.Generator().manual_seed(13)
    b, s, h, d, dim, off = 2, 6, 2, 16, 12, 3
    mod = RotaryEmbedding(dim, base=500.0, interleaved=False, scale_base=scale_base)
    n = s + off
    cq, sq, ck, sk = _flash_tables(dim, 500.0, n, scale_base)
    pos = _positions(b, s, off)
    if with_kv:
        q, kv = torch.randn(b, s, h, d, generator=g), torch.randn(b, s, 2, h, d, generator=g)
        q0, k0, v0 = q.clone(), kv[:, :, 0].clone(), kv[:, :, 1].clone()
        q_out, kv_out = mod(q, kv, seqlen_offset=off)
        assert q_out is q and kv_out is kv
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        qkv = torch.randn(b, s, 3, h, d, generator=g)
        q0, k0, v0 = (qkv[:, :, i].clone() for i in range(3))
        assert mod(qkv, seqlen_offset=off) is qkv
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert mod._seq_len_cached == n and mod._cos_cached.dtype == torch.float32
    torch.testing.assert_close(mod._cos_cached.double(), cq, rtol=0, atol=5e-6)
    torch.testing.assert_close(q.double(), reference.rotary_emb(q0, cq, sq, pos), rtol=0, atol=1e-5)
    torch.testing.assert_close(k.double(), reference.rotary_emb(k0, ck, sk, pos), rtol=0, atol=1e-5)
    assert torch.equal(v, v0)


def test_rotary_embedding_tables_follow_length_dtype_and_mode(cpu_backend):
    mod = RotaryEmbedding(8, interleaved=True)
    x = torch.randn(1, 4, 3, 2, 8)
    mod(x)
    first = mod._cos_cached
    mod(torch.randn(1, 2, 3, 2, 8))  # shorter: the tables stay
    assert mod._cos_cached is first and mod._seq_len_cached == 4
    mod(torch.randn(1, 2, 3, 2, 8), seqlen_offset=5)  # 7 rows needed: rebuilt
    assert mod._seq_len_cached == 7
    mod(torch.randn(1, 2, 3, 2, 8, dtype=torch.float64))
    assert mod._cos_cached.dtype == torch.float64
    with torch.inference_mode():
        mod(torch.randn(1, 2, 3, 2, 8, dtype=torch.float64), max_seqlen=9)
    assert mod._cos_cached.is_inference() and mod._seq_len_cached == 9
    mod.train()
    mod(torch.randn(1, 2, 3, 2, 8, dtype=torch.float64))  # training after inference-mode tables: rebuilt
    assert not mod._cos_cached.is_inference()
    # per-row offsets: max_seqlen sizes the tables, the rows are checked against them
    fresh = RotaryEmbedding(8)
    offs = torch.tensor([0, 6])
    with pytest.raises(ValueError, match="pass max_seqlen"):
        fresh(torch.randn(2, 2, 3, 2, 8), seqlen_offset=offs)
    fresh(torch.randn(2, 2, 3, 2, 8), seqlen_offset=offs, max_seqlen=8)
    with pytest.raises(ValueError, match="positions reach 8 but cos/sin have 8 rows"):
        fresh(torch.randn(2, 2, 3, 2, 8), seqlen_offset=torch.tensor([0, 7]))


def test_rotary_embedding_half_precision_matches_float32_tables(cpu_backend):
    """bf16 module (a model-wide ``.bfloat16()``): the tables are still built from float32 frequencies."""
    mod = RotaryEmbedding(16, base=1e6, scale_base=256).bfloat16()
    assert mod.inv_freq.dtype == torch.bfloat16
    qkv = torch.randn(1, 40, 3, 1, 16)
    mod(qkv.bfloat16())
    cq, _, ck, _ = _flash_tables(16, 1e6, 40, 256)
    torch.testing.assert_close(mod._cos_cached.double(), cq, rtol=0, atol=8e-3)
    torch.testing.assert_close(mod._cos_k_cached.double(), ck, rtol=0, atol=1.6e-2)


def test_in_place_refusals(cpu_backend):
    cos, sin = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="num_heads_q must be given"):
        apply_rotary_emb_qkv_(torch.randn(1, 2, 6, 8), cos, sin)
    with pytest.raises(ValueError, match="does not split into num_heads_q=3"):
        apply_rotary_emb_qkv_(torch.randn(1, 2, 6, 8), cos, sin, num_heads_q=3)
    with pytest.raises(ValueError, match=r"dim 2 must be 3"):
        apply_rotary_emb_qkv_(torch.randn(1, 2, 2, 1, 8), cos, sin)
    with pytest.raises(ValueError, match="num_heads_q=2 does not match"):
        apply_rotary_emb_qkv_(torch.randn(1, 2, 3, 1, 8), cos, sin, num_heads_q=2)
    with pytest.raises(ValueError, match="cos_k and sin_k go together"):
        apply_rotary_emb_qkv_(torch.randn(1, 2, 3, 1, 8), cos, sin, cos_k=cos)
    with pytest.raises(ValueError, match="cos_k .* must cover the rotary dims"):
        apply_rotary_emb_qkv_(torch.randn(1, 2, 3, 1, 8), cos, sin, torch.randn(6, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="rotary_dim = 2 \\* cos.shape\\[1\\] = 8 must be in \\[2, head_dim=6\\]"):
        apply_rotary_emb_kv_(torch.randn(1, 2, 2, 1, 6), cos, sin)
    with pytest.raises(ValueError, match=r"dim 2 must be 2"):
        apply_rotary_emb_kv_(torch.randn(1, 2, 3, 1, 8), cos, sin)
    with pytest.raises(TypeError, match="kv must be a float16"):
        apply_rotary_emb_kv_(torch.zeros(1, 2, 2, 1, 8, dtype=torch.int32), cos, sin)
    x = torch.randn(1, 4, 3, 1, 8)
    before = x.clone()
    with pytest.raises(ValueError, match="positions reach 6 but cos/sin have 6 rows"):
        apply_rotary_emb_qkv_(x, cos, sin, seqlen_offsets=3)
    assert torch.equal(x, before)  # nothing written
    with pytest.raises(ValueError, match="positions reach 5 but cos_k/sin_k have 5 rows"):
        apply_rotary_emb_qkv_(x, cos, sin, cos[:5], sin[:5], seqlen_offsets=2)
    with pytest.raises(ValueError, match="dim must be an even int"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match=r"RotaryEmbedding\(dim=32\) rotates 32 dims but the heads have head_dim=16"):
        RotaryEmbedding(32)(torch.randn(1, 2, 3, 1, 16))
    with pytest.raises(NotImplementedError, match="pos_idx_in_fp32=False"):
        RotaryEmbedding(8, pos_idx_in_fp32=False)
    # flash-attn 2.0-2.7's positional order (dim, base, interleaved, scale_base, pos_idx_in_fp32, device)
    with pytest.raises(TypeError, match="device=True.*pos_idx_in_fp32"):
        RotaryEmbedding(8, 10000.0, False, None, True)


@pytest.mark.gpu
def test_in_place_forms_on_gpu(cpu_backend):
    """bf16 on the GPU (the compiled RoPE kernel, strided q/k views of one packed tensor): RotaryEmbedding with
    XPos over a GQA-packed qkv, and over q + kv, against the float64 oracle; gradients through the in-place op."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b, s, hq, hk, d = 2, 300, 8, 2, 128
    mod = RotaryEmbedding(64, base=1e6, scale_base=512, device="cuda")
    qkv = torch.randn(b, s, hq + 2 * hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q0, k0, v0 = (t.clone() for t in qkv.split([hq, hk, hk], dim=2))
    off = torch.tensor([0, 700], device="cuda")
    mod(qkv, seqlen_offset=off, max_seqlen=1024, num_heads_q=hq)
    pos = _positions(b, s, off)
    q, k, v = qkv.split([hq, hk, hk], dim=2)
    ref_q = reference.rotary_emb(q0, mod._cos_cached, mod._sin_cached, pos)
    ref_k = reference.rotary_emb(k0, mod._cos_k_cached, mod._sin_k_cached, pos)
    torch.testing.assert_close(q.double(), ref_q, rtol=0, atol=4e-2)
    torch.testing.assert_close(k.double(), ref_k, rtol=0, atol=4e-2)
    assert torch.equal(v, v0)
    leaf = torch.randn(b, s, 3, hq, d, device="cuda", dtype=torch.float32, generator=g, requires_grad=True)
    w = torch.randn(b, s, 3, hq, d, device="cuda", generator=g)
    plain = RotaryEmbedding(64, device="cuda")
    out = plain(leaf * 1.0)
    (got,) = torch.autograd.grad(out, leaf, w)
    cos, sin = plain._cos_cached, plain._sin_cached
    pos0 = _positions(b, s, 0, "cuda")
    want = torch.stack([reference.rotary_emb(w[:, :, i], cos, -sin, pos0) if i < 2 else  # the transpose
                        w[:, :, 2].double() for i in range(3)], dim=2)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------
# Property-based: random layouts, offsets and packing against the float64 oracle

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# the backend fixture pins one backend for every example of a test (that is the point of it)
_one_backend = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@_one_backend
@given(b=st.integers(1, 3), s=st.integers(1, 9), h=st.integers(1, 3), d=st.sampled_from([8, 16, 24]),
       half=st.integers(1, 4), interleaved=st.booleans(), offsets=st.sampled_from(["int", "tensor"]),
       packed=st.booleans(), spare=st.integers(0, 3), inplace=st.booleans(), seed=st.integers(0, 2**16))
def test_random_apply_rotary_emb_calls(b, s, h, d, half, interleaved, offsets, packed, spare, inplace, seed,
                                       cpu_backend):
    """Dense or packed x (sequences of random lengths, spare rows past cu_seqlens[-1] left as they are), int or
    per-sequence offsets, partial rotary dims, in place or not: against the float64 oracle."""
    g = torch.Generator().manual_seed(seed)
    rd = 2 * min(half, d // 2)
    lens = torch.randint(0, s + 1, (b,), generator=g).tolist()
    off = (int(torch.randint(0, 5, (1,), generator=g)) if offsets == "int" else
           torch.randint(0, 5, (b,), generator=g))
    rows = s + 5
    cos, sin = _tables(g, rows, rd // 2)
    if packed:
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        x = torch.randn(int(cu[-1]) + spare, h, d, generator=g)
        offs = off if isinstance(off, torch.Tensor) else torch.full((b,), off)
        pos = torch.cat([torch.arange(n) + o for n, o in zip(lens, offs.tolist())]).long()
        kw = dict(cu_seqlens=cu, max_seqlen=max(lens))
        n_real = int(cu[-1])
    else:
        x = torch.randn(b, s, h, d, generator=g)
        pos = _positions(b, s, off)
        kw = {}
        n_real = None
    x0 = x.clone()
    out = apply_rotary_emb(x, cos, sin, interleaved, inplace, off, **kw)
    assert (out is x) == inplace and out.shape == x0.shape
    real = out if n_real is None else out[:n_real]
    src = x0 if n_real is None else x0[:n_real]
    torch.testing.assert_close(real.double(), _oracle(src, cos, sin, pos, interleaved), rtol=0, atol=2e-6)
    if n_real is not None:
        assert torch.equal(out[n_real:], x0[n_real:])


@_one_backend
@given(b=st.integers(1, 2), s=st.integers(1, 6), hq=st.integers(1, 4), hk=st.integers(1, 2),
       d=st.sampled_from([8, 16]), layout=st.sampled_from(["5d", "4d", "kv"]), xpos=st.booleans(),
       interleaved=st.booleans(), offset=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_random_in_place_calls(b, s, hq, hk, d, layout, xpos, interleaved, offset, seed, cpu_backend):
    """apply_rotary_emb_qkv_ (5-D and GQA-packed) and apply_rotary_emb_kv_ with random shapes, separate k tables
    or not: q/k parts against the oracle, v untouched, the same tensor returned."""
    g = torch.Generator().manual_seed(seed)
    cos, sin = _tables(g, s + 4, d // 4)
    cos_k, sin_k = (t * 1.25 for t in _tables(g, s + 4, d // 4)) if xpos else (None, None)
    pos = _positions(b, s, offset)
    if layout == "5d":
        x = torch.randn(b, s, 3, hq, d, generator=g)
        parts = lambda t: (t[:, :, 0], t[:, :, 1], t[:, :, 2])  # noqa: E731
        call = lambda: apply_rotary_emb_qkv_(x, cos, sin, cos_k, sin_k, interleaved, offset)  # noqa: E731
    elif layout == "4d":
        x = torch.randn(b, s, hq * hk + 2 * hk, d, generator=g)
        parts = lambda t: t.split([hq * hk, hk, hk], dim=2)  # noqa: E731
        call = lambda: apply_rotary_emb_qkv_(x, cos, sin, cos_k, sin_k, interleaved, offset, hq * hk)  # noqa: E731
    else:
        x = torch.randn(b, s, 2, hk, d, generator=g)
        parts = lambda t: (None, t[:, :, 0], t[:, :, 1])  # noqa: E731
        call = lambda: apply_rotary_emb_kv_(x, cos if cos_k is None else cos_k,  # noqa: E731
                                            sin if sin_k is None else sin_k, interleaved, offset)
    q0, k0, v0 = (None if t is None else t.clone() for t in parts(x))
    assert call() is x
    q, k, v = parts(x)
    ck, sk = (cos, sin) if cos_k is None else (cos_k, sin_k)
    if q0 is not None:
        torch.testing.assert_close(q.double(), _oracle(q0, cos, sin, pos, interleaved), rtol=0, atol=2e-6)
    torch.testing.assert_close(k.double(), _oracle(k0, ck, sk, pos, interleaved), rtol=0, atol=2e-6)
    assert torch.equal(v, v0)
