"""The Hopper forward on tensor descriptors (``fwd_tma_kernel``, opt-in with ``RING_ATTN_FWD=tma``).

Under the Triton interpreter tensor descriptors (``tl.make_tensor_descriptor``, ``desc.load/store``) run on
CPU, and ``tl.range(..., warp_specialize=True)`` runs as a plain loop, so both code structures of the kernel
(warp-specialised: one loop, every block masked; not: unmasked loop then the masked diagonal) are checked
against the float64 oracle here, fp16 and bf16 (bf16 dots upcast under the interpreter, as everywhere).
A spy on the launcher proves the TMA kernel ran (not a silent fallback). The fallback selection is tested
for every requirement. What the sm_90 compiler makes of it is in scripts/compile_check.py (``*-tma``).
"""
import pytest
import torch

import ring_attn
from ring_attn import backends, reference
from ring_attn.backends.triton import attention as A
from ring_attn.backends.triton import tiles
from ring_attn.ops.attention import attention_block_forward
from accuracy import FORWARD, assert_within_rule


class _Spy:
    """Stands in for ``fwd_tma_kernel`` in the launcher and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


@pytest.fixture
def tma(monkeypatch):
    """RING_ATTN_FWD=tma on the Triton backend, with a spy on the TMA kernel."""
    monkeypatch.setenv("RING_ATTN_FWD", "tma")
    spy = _Spy(A.fwd_tma_kernel)
    monkeypatch.setattr(A, "fwd_tma_kernel", spy)
    with backends.force("triton"):
        yield spy


def _qkv(b, s_q, s_k, h_q, h_kv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda s, h: torch.randn(b, s, h, d, generator=g).to(dtype)  # noqa: E731
    return mk(s_q, h_q), mk(s_k, h_kv), mk(s_k, h_kv)


def _check(out, lse, q, k, v, scale, causal, dtype):
    o64, l64 = reference.attention(q.double(), k.double(), v.double(), scale, causal, compute_dtype=torch.float64)
    ob, lb = reference.attention(q, k, v, scale, causal, compute_dtype=dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(l64))
    assert_within_rule("out", out, o64, ob.to(dtype), dtype, FORWARD)
    fin = torch.isfinite(l64)
    assert_within_rule("lse", lse[fin], l64[fin], lb.float()[fin], dtype, FORWARD)


@pytest.mark.parametrize("warp_specialize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d,shape", [(64, (2, 37, 45, 4, 2)), (128, (1, 50, 33, 2, 1)), (64, (1, 70, 70, 2, 2))])
def test_tma_forward_matches_oracle(tma, monkeypatch, warp_specialize, dtype, causal, d, shape):
    monkeypatch.setattr(tiles, "_TMA_WARP_SPECIALIZE", warp_specialize)
    b, s_q, s_k, h_q, h_kv = shape
    q, k, v = _qkv(b, s_q, s_k, h_q, h_kv, d, dtype)
    out, lse = ring_attn.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert tma.calls == 1
    _check(out, lse, q, k, v, d ** -0.5, causal, dtype)


def test_tma_forward_equals_pointer_forward_bitwise(tma, monkeypatch):
    """Same tile, same reduction order: the TMA forward gives the pointer kernel's bits (interpreter)."""
    q, k, v = _qkv(2, 45, 61, 4, 2, 64, torch.float16, seed=3)
    for causal in (True, False):
        got = ring_attn.flash_attn_func(q, k, v, causal=causal, return_lse=True)
        monkeypatch.setenv("RING_ATTN_FWD", "pointer")
        want = ring_attn.flash_attn_func(q, k, v, causal=causal, return_lse=True)
        monkeypatch.setenv("RING_ATTN_FWD", "tma")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert tma.calls == 2


def test_tma_forward_varlen(tma):
    lens = [19, 0, 33, 7, 0]  # empty sequences inside and at the end of the packed tensor
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    g = torch.Generator().manual_seed(5)
    q = torch.randn(t, 4, 64, generator=g).half()
    k = torch.randn(t, 2, 64, generator=g).half()
    v = torch.randn(t, 2, 64, generator=g).half()
    out = ring_attn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    assert tma.calls == 1
    for i, n in enumerate(lens):
        a = int(cu[i])
        if n == 0:
            continue
        sl = slice(a, a + n)
        ro, _ = reference.attention(q[None, sl].double(), k[None, sl].double(), v[None, sl].double(), 64 ** -0.5,
                                    True, compute_dtype=torch.float64)
        rb, _ = reference.attention(q[None, sl], k[None, sl], v[None, sl], 64 ** -0.5, True,
                                    compute_dtype=torch.float16)
        assert_within_rule(f"out[{i}]", out[None, sl], ro, rb.half(), torch.float16, FORWARD)


@pytest.mark.parametrize("causal", [False, True])
def test_tma_forward_merge_epilogue(tma, causal):
    """The ring's forward: the first key block into fp32 (out, lse), the rest merged in place by the fp32
    MERGE epilogue of the TMA kernel; equals attention over all keys."""
    q, k, v = _qkv(2, 29, 45, 4, 2, 64, torch.float16)
    splits = [0, 13, 30, 45]
    out = lse = None
    for a, b in zip(splits[:-1], splits[1:]):
        off = (45 - 29) - a
        if out is None:
            out, lse = attention_block_forward(q, k[:, a:b], v[:, a:b], 0.3, causal, off, out_dtype=torch.float32)
        else:
            attention_block_forward(q, k[:, a:b], v[:, a:b], 0.3, causal, off, out=out, lse=lse)
    assert tma.calls == 3
    ro, rl = reference.attention(q.double(), k.double(), v.double(), 0.3, causal, compute_dtype=torch.float64)
    assert (out.double() - ro).abs().max() < 2e-3
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    fin = torch.isfinite(rl)
    assert (lse.double()[fin] - rl[fin]).abs().max() < 1e-4


# ---- selection: the TMA variant only when asked for and every requirement holds; else the pointer kernel

def _variant(q, k, v, out=None, **kw):
    return A.forward_variant(q, k, v, q.new_empty(q.shape) if out is None else out, **kw)


def test_default_is_the_pointer_kernel(monkeypatch):
    monkeypatch.delenv("RING_ATTN_FWD", raising=False)
    q, k, v = _qkv(1, 17, 17, 2, 2, 64, torch.float16)
    assert _variant(q, k, v)[0] == "pointer"
    monkeypatch.setenv("RING_ATTN_FWD", "pointer")
    assert _variant(q, k, v) == ("pointer", "RING_ATTN_FWD=pointer")
    monkeypatch.setenv("RING_ATTN_FWD", "tma")
    assert _variant(q, k, v)[0] == "tma"


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("RING_ATTN_FWD", "fast")
    q, k, v = _qkv(1, 17, 17, 2, 2, 64, torch.float16)
    with pytest.raises(ValueError, match="RING_ATTN_FWD='fast'"):
        _variant(q, k, v)


def test_fallback_selection(monkeypatch):
    monkeypatch.setenv("RING_ATTN_FWD", "tma")
    q, k, v = _qkv(1, 17, 17, 2, 2, 64, torch.float16)
    assert _variant(q, k, v, window=(4, 0))[0] == "pointer"
    assert _variant(q, k, v, softcap=30.0)[0] == "pointer"
    q80, k80, v80 = _qkv(1, 17, 17, 2, 2, 80, torch.float16)
    assert _variant(q80, k80, v80) == ("pointer", "head dim 80 not in (64, 128)")
    q32, k32, v32 = _qkv(1, 17, 17, 2, 2, 64, torch.float32)
    assert _variant(q32, k32, v32)[1].startswith("dtype torch.float32")
    assert _variant(q[:, :0], k, v) == ("pointer", "an empty sequence dimension")
    # decoding-shaped calls (<= 16 query rows in the longest sequence) take the pointer kernel's decode tile
    assert _variant(q[:, :16], k, v) == ("pointer", "16 query rows: decoding-shaped (the decode tile)")
    assert _variant(q[0], k[0], v[0], varlen=True, max_q=3)[0] == "pointer"
    assert _variant(q[0], k[0], v[0], varlen=True, max_q=17)[0] == "tma"
    # last dim not contiguous
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert "last dim not contiguous" in _variant(qt, k, v)[1]
    # row stride of 2*64+4 halves = 264 B: not a 16-byte multiple
    wide = torch.randn(1, 17, 2 * 64 + 4).half()[..., :128].unflatten(-1, (2, 64))
    assert "16-byte multiples" in _variant(wide, k, v)[1]
    # base pointer off by one element (2 B)
    flat = torch.randn(17 * 2 * 64 + 1).half()[1:].view(1, 17, 2, 64)
    assert "base pointer" in _variant(flat, k, v)[1]
    # a 16-bit output that is not aligned only matters when O is stored by TMA (not merged)
    assert "out:" in _variant(q, k, v, out=flat)[1]
    assert _variant(q, k, v, out=flat, merge=True)[0] == "tma"
    # not Hopper (on a GPU): keep the pointer kernel
    monkeypatch.setattr(A, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(tiles, "current_arch", lambda: 80)
    assert _variant(q, k, v) == ("pointer", "sm_80 is not Hopper (sm_90)")
    monkeypatch.setattr(tiles, "current_arch", lambda: 90)
    assert _variant(q, k, v)[0] == "tma"


def test_old_triton_keeps_the_pointer_kernel(monkeypatch):
    import triton.language as tl

    monkeypatch.setenv("RING_ATTN_FWD", "tma")
    monkeypatch.delattr(tl, "make_tensor_descriptor")
    q, k, v = _qkv(1, 17, 17, 2, 2, 64, torch.float16)
    variant, why = _variant(q, k, v)
    assert variant == "pointer" and "make_tensor_descriptor" in why


def test_fallback_runs_the_pointer_kernel(tma):
    """A case the TMA kernel does not take (head dim 80) still runs, on the pointer kernel."""
    q, k, v = _qkv(1, 20, 20, 2, 1, 80, torch.float16)
    out, lse = ring_attn.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert tma.calls == 0
    _check(out, lse, q, k, v, 80 ** -0.5, True, torch.float16)

