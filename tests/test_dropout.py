"""Attention dropout (flash-attn's ``dropout_p``): the mask is a pure function of a seed and each element's place
(``ring_attn._contracts.Dropout``), so the backward regenerates the forward's and every backend draws the same.

* the torch Philox of the oracle equals Triton's ``tl.randint`` bit for bit, and the keep rate is 1 - p;
* block level: the Triton kernels (interpreter), the native C++ backend and the reference backend, forward and
  backward, against the
  float64 oracle with the same mask, over causal / windows / softcap / ALiBi / GQA / packed sequences / a
  chunked batch / the split-KV and packed-GQA decoding paths / the fused backwards;
* the public functions: ``flash_attn_func`` and ``flash_attn_varlen_func`` with ``dropout_p``, gradients
  against the oracle with the seed the call drew, ``torch.manual_seed`` reproducibility, fresh masks per call,
  refusals (the ring).
"""
import pytest
import torch

import ring_attn
from accuracy import BACKWARD, FORWARD, assert_within_rule
from ring_attn import backends, reference
from ring_attn._contracts import Dropout, VarlenSeqs
from ring_attn.ops.attention_block import attention_block_backward, attention_block_forward, attention_delta

pytestmark = pytest.mark.skipif(not backends.triton_available(), reason="needs triton")


def test_philox4_equals_tritons_randint4x():
    import triton
    import triton.language as tl

    @triton.jit
    def words(OFF, OUT, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        r0, r1, r2, r3 = tl.randint4x(seed, tl.load(OFF + i))
        tl.store(OUT + i * 4, r0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(OUT + i * 4 + 1, r1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(OUT + i * 4 + 2, r2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(OUT + i * 4 + 3, r3.to(tl.int64) & 0xFFFFFFFF)

    g = torch.Generator().manual_seed(0)
    off = torch.randint(0, 2 ** 42, (64,), generator=g, dtype=torch.int64)
    off[:4] = torch.tensor([0, 1, 2 ** 32 - 1, 2 ** 32 + 5])
    for seed in (0, 12345, 2 ** 40 + 77, 2 ** 62 + 3):
        out = torch.empty(64, 4, dtype=torch.int64)
        words[(1,)](off, out, seed, N=64)
        assert torch.equal(out, reference.philox4(seed, off)), seed


def test_one_philox_call_decides_four_adjacent_keys():
    """The contract's grouping: key j of a row takes word j mod 4 of counter row·groups + j div 4, so a row of
    10 keys uses 3 counters (the last one's words 2 and 3 unused) and the next row starts a new counter."""
    d = Dropout(0.5, 99, rows=3, keys=10)
    assert d.groups == 3
    keep = reference.dropout_keep(d, torch.tensor(1), torch.arange(3)[:, None], torch.arange(10)[None, :])
    words = reference.philox4(99, (1 * 3 + torch.arange(3)[:, None]) * 3 + torch.arange(3)[None, :])
    assert torch.equal(keep, words.flatten(-2)[:, :10] >= d.threshold)
    # the oracle's whole-tensor form (per counter, flattened) equals the element-wise one, with row0
    d2 = Dropout(0.3, 2 ** 35 + 1, rows=2 * 7, keys=13, row0=5)
    b, h, s_q, s_k = 2, 3, 7, 13
    whole = reference._keep(d2, b, h, s_q, 0, s_q, s_k, 0, "cpu")
    row = (torch.arange(b)[:, None] * s_q + torch.arange(s_q)[None, :])[:, None, :, None]
    each = reference.dropout_keep(d2, torch.arange(h)[None, :, None, None], row, torch.arange(s_k))
    assert torch.equal(whole, each)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    d = Dropout(p, 2 ** 33 + 5, rows=64, keys=512)
    keep = reference.dropout_keep(d, torch.arange(4)[:, None, None], torch.arange(64)[None, :, None],
                                  torch.arange(512)[None, None, :])
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * ((p * (1 - p) / n) ** 0.5)
    # the four words of one Philox call decide four adjacent keys: each pair of them is kept together at the
    # rate of independent draws
    for w in (1, 2, 3):
        both = (keep[..., 0::4] & keep[..., w::4]).float()
        q = (1 - p) ** 2
        assert abs(both.mean().item() - q) < 4 * ((q * (1 - q) / both.numel()) ** 0.5), w
    other = reference.dropout_keep(d._replace(seed=d.seed + 1), torch.arange(4)[:, None, None],
                                   torch.arange(64)[None, :, None], torch.arange(512)[None, None, :])
    assert (keep != other).float().mean().item() > 0.5 * 2 * p * (1 - p)  # another seed: another mask


CASES = [  # b, s_q, s_k, h_q, h_kv, d, causal, window, softcap, alibi
    (2, 24, 24, 4, 2, 16, True, (-1, -1), 0.0, False),
    (1, 20, 35, 2, 1, 32, False, (-1, -1), 0.0, True),
    (2, 19, 19, 2, 2, 16, True, (6, 0), 2.0, False),
    (1, 3, 40, 4, 2, 16, True, (-1, -1), 0.0, False),   # decoding-shaped: packed GQA heads
]


def _qkv(case, dtype, seed=0):
    b, s_q, s_k, h_q, h_kv, d = case[:6]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, s_q, h_q, d, generator=g).to(dtype), torch.randn(b, s_k, h_kv, d, generator=g).to(dtype),
            torch.randn(b, s_k, h_kv, d, generator=g).to(dtype))


def _block(q, k, v, case, drop, backend, **kw):
    """Forward and backward at block level on ``backend``; returns out, lse, dq, dk, dv (and dout)."""
    causal, window, softcap, use_alibi = case[6:]
    alibi = torch.linspace(0.1, 0.5, q.shape[2]) if use_alibi else None
    scale = q.shape[-1] ** -0.5
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.dtype)
    with backends.force(backend):
        out, lse = attention_block_forward(q, k, v, scale, causal, window=window, softcap=softcap,
                                           alibi_slopes=alibi, dropout=drop, **kw)
        delta = attention_delta(dout, out)
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        attention_block_backward(dout, q, k, v, lse, delta, dq, dk, dv, scale, causal, accumulate=False,
                                 window=window, softcap=softcap, alibi_slopes=alibi, dropout=drop)
    return out, lse, dq, dk, dv, dout, alibi


def _oracle(q, k, v, case, drop, dout, alibi, compute):
    causal, window, softcap = case[6:9]
    leaves = [x.detach().to(compute).requires_grad_() for x in (q, k, v)]
    out, lse = reference.attention(*leaves, None, causal, compute_dtype=compute, window=window, softcap=softcap,
                                   alibi_slopes=alibi, dropout=drop)
    out.backward(dout.to(compute))
    return out.detach(), lse.detach(), *(x.grad for x in leaves)


@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_block_matches_the_oracle(backend, dtype, case):
    if backend == "native" and not backends.native_available():
        pytest.skip("the native extension ring_attn._C is not built")
    q, k, v = _qkv(case, dtype)
    drop = Dropout(0.3, 2 ** 40 + 11, rows=q.shape[0] * q.shape[1], keys=k.shape[1])
    got = _block(q, k, v, case, drop, backend)
    dout, alibi = got[5], got[6]
    oracle = _oracle(q, k, v, case, drop, dout, alibi, torch.float64)
    base = _oracle(q, k, v, case, drop, dout, alibi, torch.float32 if dtype == torch.float32 else dtype)
    for name, g, o, bl, rule in zip(("out", "lse", "dq", "dk", "dv"), got[:5], oracle, base,
                                    (FORWARD, FORWARD, BACKWARD, BACKWARD, BACKWARD)):
        assert_within_rule(f"dropout {backend} {name}", g, o, bl, dtype, rule)
    # dropout really dropped: without it the output differs by far more than the accuracy rule
    plain = _oracle(q, k, v, case, None, dout, alibi, torch.float64)
    assert (oracle[0] - plain[0]).abs().max() > 0.05


def test_triton_equals_reference_with_the_fused_backwards(monkeypatch):
    """The 5-matmul backward (RING_ATTN_BWD=fused-ordered / fused) drops the same probabilities."""
    case = CASES[0]
    q, k, v = _qkv(case, torch.float32, seed=3)
    drop = Dropout(0.25, 77, rows=q.shape[0] * q.shape[1], keys=k.shape[1])
    want = _block(q, k, v, case, drop, "reference")
    for mode in ("fused-ordered", "fused"):
        monkeypatch.setenv("RING_ATTN_BWD", mode)
        got = _block(q, k, v, case, drop, "triton")
        for name, a, b in zip(("dq", "dk", "dv"), got[2:5], want[2:5]):
            assert (a - b).abs().max() < 1e-4, (mode, name)


def test_split_kv_and_chunked_batches_draw_the_same_mask(monkeypatch):
    """The split-KV forward (keys cut into ranges) and a batch cut into grid chunks (row0 moves) give the same
    result as one pass: the mask is a function of the element's place in the call, not of the schedule."""
    case = CASES[3]
    q, k, v = _qkv(case, torch.float32, seed=4)
    drop = Dropout(0.4, 5, rows=q.shape[0] * q.shape[1], keys=k.shape[1])
    one = _block(q, k, v, case, drop, "triton", num_splits=1)[0]
    split = _block(q, k, v, case, drop, "triton", num_splits=3)[0]
    assert (one - split).abs().max() < 1e-5
    from ring_attn.ops import attention_block as ab

    case = CASES[0]
    q, k, v = _qkv(case, torch.float32, seed=5)
    drop = Dropout(0.4, 6, rows=q.shape[0] * q.shape[1], keys=k.shape[1])
    whole = _block(q, k, v, case, drop, "triton")
    monkeypatch.setattr(ab, "_MAX_GRID_Y", q.shape[2])  # one batch entry per chunk
    chunked = _block(q, k, v, case, drop, "triton")
    for a, b in zip(whole[:5], chunked[:5]):
        assert torch.equal(a, b)


def test_packed_sequences_match_the_oracle():
    g = torch.Generator().manual_seed(6)
    lens_q, lens_k = [5, 0, 9, 3], [7, 4, 9, 11]
    h_q, h_kv, d = 4, 2, 16
    q = torch.randn(sum(lens_q), h_q, d, generator=g)
    k = torch.randn(sum(lens_k), h_kv, d, generator=g)
    v = torch.randn(sum(lens_k), h_kv, d, generator=g)
    cq = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    ck = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    seqs = VarlenSeqs.from_cu_seqlens(cq, ck, max(lens_q), max(lens_k))
    drop = Dropout(0.3, 123456789, rows=q.shape[0], keys=max(lens_k))
    outs = {}
    for backend in ("triton", "native", "reference") if backends.native_available() else ("triton", "reference"):
        with backends.force(backend):
            outs[backend] = attention_block_forward(q, k, v, 0.25, True, seqs=seqs, dropout=drop)[0]
    for i in range(len(lens_q)):
        a, e, ak, ek = int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])
        if e == a:
            continue
        ref, _ = reference.attention(q[None, a:e].double(), k[None, ak:ek].double(), v[None, ak:ek].double(), 0.25,
                                     True, dropout=drop, row_base=a)
        for backend, out in outs.items():
            assert (out[a:e].double() - ref[0]).abs().max() < 1e-5, (backend, i)


def _seed_spy(monkeypatch):
    seeds = []
    real = Dropout.draw_seed
    monkeypatch.setattr(Dropout, "draw_seed", staticmethod(lambda: (seeds.append(real()), seeds[-1])[1]))
    return seeds


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_func_dropout_gradients(monkeypatch, causal):
    seeds = _seed_spy(monkeypatch)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 21, 4, 16, generator=g).requires_grad_()
    k = torch.randn(2, 21, 2, 16, generator=g).requires_grad_()
    v = torch.randn(2, 21, 2, 16, generator=g).requires_grad_()
    dout = torch.randn(2, 21, 4, 16, generator=g)
    out = ring_attn.flash_attn_func(q, k, v, dropout_p=0.2, causal=causal)
    out.backward(dout)
    assert len(seeds) == 1
    drop = Dropout(0.2, seeds[0], rows=2 * 21, keys=21)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, _ = reference.attention(*leaves, None, causal, dropout=drop)
    ref.backward(dout.double())
    assert (out.double() - ref).abs().max() < 1e-5
    for x, r in zip((q, k, v), leaves):
        assert (x.grad.double() - r.grad).abs().max() < 1e-4


def test_varlen_dropout_and_the_rng(monkeypatch):
    """flash_attn_varlen_func: the packed rows are the dropout rows; the seed comes from torch's generator, so
    torch.manual_seed reproduces a call and two calls in a row differ."""
    seeds = _seed_spy(monkeypatch)
    g = torch.Generator().manual_seed(8)
    lens = [6, 11]
    cu = torch.tensor([0, 6, 17], dtype=torch.int32)
    q, k, v = (torch.randn(17, 2, 16, generator=g) for _ in range(3))
    torch.manual_seed(1)
    a = ring_attn.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, dropout_p=0.5, causal=True)
    b = ring_attn.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, dropout_p=0.5, causal=True)
    torch.manual_seed(1)
    c = ring_attn.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, dropout_p=0.5, causal=True)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert seeds[0] == seeds[2] != seeds[1]
    drop = Dropout(0.5, seeds[0], rows=17, keys=11)
    for s0, n in ((0, 6), (6, 11)):
        ref, _ = reference.attention(q[None, s0:s0 + n].double(), k[None, s0:s0 + n].double(),
                                     v[None, s0:s0 + n].double(), None, True, dropout=drop, row_base=s0)
        assert (a[s0:s0 + n].double() - ref[0]).abs().max() < 1e-5
    # p = 0 draws nothing and is the plain function
    n_seeds = len(seeds)
    assert torch.equal(ring_attn.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, dropout_p=0.0, causal=True),
                       ring_attn.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, causal=True))
    assert len(seeds) == n_seeds
    del lens


def test_refusals():
    q = torch.randn(1, 8, 2, 16)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            ring_attn.flash_attn_func(q, q, q, dropout_p=bad)
    with pytest.raises(TypeError, match="dropout_p"):  # a bool (often causal in dropout_p's position)
        ring_attn.flash_attn_func(q, q, q, dropout_p=True)


@pytest.mark.gpu
def test_gpu_dropout_matches_the_reference(monkeypatch):
    """bf16 on the GPU (the compiled kernels, Philox on the device): out and gradients against the float32
    reference with the seed the call drew; GQA 8/2, d=128, causal."""
    seeds = _seed_spy(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h: torch.randn(2, 300, h, 128, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = mk(8).requires_grad_(), mk(2).requires_grad_(), mk(2).requires_grad_()
    dout = mk(8)
    out = ring_attn.flash_attn_func(q, k, v, dropout_p=0.1, causal=True)
    out.backward(dout)
    drop = Dropout(0.1, seeds[0], rows=2 * 300, keys=300)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref, _ = reference.attention(*leaves, None, True, compute_dtype=torch.float32, dropout=drop)
    ref.backward(dout.float())
    assert (out.float() - ref).abs().max().item() < 3e-2
    for x, r in zip((q, k, v), leaves):
        assert (x.grad.float() - r.grad).abs().max().item() < 6e-2


def test_opcheck_with_dropout():
    """torch.library.opcheck accepts the forward op with dropout (schema, fake tensor: the seed output is an
    int64 CPU tensor [1], autograd registration)."""
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=g) for _ in range(3))
    torch.library.opcheck(torch.ops.ring_attn.flash_attn_forward.default,
                          (*(x.clone().requires_grad_() for x in (q, k, v)), None, None, 20, 20, 0.25, True, -1, -1,
                           0.0, None, 0.3), test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
