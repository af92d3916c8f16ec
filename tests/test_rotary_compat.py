"""ring_attn.layers.rotary.apply_rotary_emb (flash-attn's ``flash_attn.layers.rotary.apply_rotary_emb``): the
signature, every backend against a float64 oracle written from flash-attn's definition (both pair layouts,
partial rotary dims, int and per-row offsets, packed sequences), in place, gradients, and refusals."""
import inspect

import pytest
import torch

from ring_attn import reference
from ring_attn.layers.rotary import apply_rotary_emb

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
