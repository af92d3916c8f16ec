"""flash_attn_with_kvcache (flash-attn's decoding entry point): signature, in-place cache update, attention over
each row's filled cache against the float64 oracle (accuracy rule, tests/accuracy.py) on every backend that
runs on CPU, rotary embedding of the new tokens (both pair layouts), and every refusal. Paged and left-padded
caches: tests/test_paged.py.

Cases follow flash-attn's tests/test_flash_attn.py::test_flash_attn_kvcache (new tokens appended or not, a cache
larger than the batch picked by cache_batch_idx, GQA, causal and local windows, softcap, ALiBi), shrunk for
the Triton interpreter.
"""
import inspect

import pytest
import torch

import ring_attn
from accuracy import FORWARD, assert_within_rule
from ring_attn import backends, reference

# flash-attn 2.6/2.7's flash_attn_with_kvcache parameters, in order, with defaults
SIGNATURE = ["q", "k_cache", "v_cache", "k=None", "v=None", "rotary_cos=None", "rotary_sin=None",
             "cache_seqlens=None", "cache_batch_idx=None", "cache_leftpad=None", "block_table=None",
             "softmax_scale=None", "causal=False", "window_size=(-1, -1)", "softcap=0.0", "rotary_interleaved=True",
             "alibi_slopes=None", "num_splits=0", "return_softmax_lse=False"]


def test_signature_is_flash_attn_s():
    params = [str(p) for p in inspect.signature(ring_attn.flash_attn_with_kvcache).parameters.values()]
    assert params == SIGNATURE
    assert "flash_attn_with_kvcache" in ring_attn.__all__ and ring_attn.flash_attn_with_kvcache.__doc__


def _rotary_ref(x, cos, sin, pos, interleaved):
    """Rotary embedding in float64 of ``x`` ``[b, s, h, d]`` at integer positions ``pos`` ``[b, s]``."""
    return reference.rotary_emb(x, cos, sin, pos, interleaved)


def _expected(q, k_cache, v_cache, k, v, lens, rows, causal, window, softcap, alibi, rotary, compute):
    """The updated cache rows and, per batch row, attention in ``compute`` over its filled cache."""
    kc, vc = k_cache.clone(), v_cache.clone()
    b, s_q = q.shape[:2]
    s_new = 0 if k is None else k.shape[1]
    q_use = q
    if rotary is not None:
        cos, sin, inter = rotary
        pos_k = lens[:, None].long() + torch.arange(s_new)
        k = _rotary_ref(k, cos, sin, pos_k, inter).to(k.dtype)
        pos_q = lens[:, None].long() + (torch.arange(s_q) if causal or window != (-1, -1) else torch.zeros(s_q,
                                                                                                           dtype=int))
        q_use = _rotary_ref(q, cos, sin, pos_q, inter).to(q.dtype)
    outs, lses = [], []
    for i in range(b):
        r, n = int(rows[i]), int(lens[i])
        if k is not None:
            kc[r, n:n + s_new], vc[r, n:n + s_new] = k[i], v[i]
        sl = None if alibi is None else alibi[i:i + 1].to(compute)
        o, l = reference.attention(q_use[i:i + 1].to(compute), kc[r:r + 1, :n + s_new].to(compute),
                                   vc[r:r + 1, :n + s_new].to(compute), None, causal, compute_dtype=compute,
                                   window=window, softcap=softcap, alibi_slopes=sl)
        outs.append(o)
        lses.append(l)
    return kc, vc, torch.cat(outs), torch.cat(lses)


CASES = [  # b, b_cache, s_cache, s_q, s_new, h_q, h_kv, d, causal, window, softcap, alibi, batch_idx, lens
    (2, 2, 24, 1, 1, 4, 2, 16, True, (-1, -1), 0.0, False, False, [5, 17]),  # one decoding step
    (3, 3, 20, 3, 3, 4, 1, 32, True, (-1, -1), 0.0, False, False, [0, 9, 14]),  # MQA, a chunk, an empty cache
    (2, 4, 20, 2, 0, 2, 2, 16, False, (-1, -1), 0.0, False, True, [7, 20]),  # nothing appended, rows picked
    (2, 3, 30, 4, 2, 4, 2, 8, True, (5, 0), 1.5, False, True, [12, 3]),  # a window and softcap
    (2, 2, 18, 2, 2, 2, 1, 16, True, (-1, -1), 0.0, True, False, [4, 11]),  # ALiBi
    (1, 1, 16, 1, 1, 2, 2, 16, False, (3, 3), 0.0, False, False, 6),  # int cache_seqlens, a symmetric window
]


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_matches_the_oracle_and_updates_the_cache(backend, case):
    b, b_c, s_cache, s_q, s_new, h_q, h_kv, d, causal, window, softcap, use_alibi, use_idx, lens = case
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, s_q, h_q, d, generator=g)
    k_cache, v_cache = (torch.randn(b_c, s_cache, h_kv, d, generator=g) for _ in range(2))
    k, v = ((torch.randn(b, s_new, h_kv, d, generator=g) for _ in range(2)) if s_new else (None, None))
    rows = torch.randperm(b_c, generator=g)[:b].to(torch.int32) if use_idx else torch.arange(b, dtype=torch.int32)
    lens_t = torch.full((b,), lens, dtype=torch.int32) if isinstance(lens, int) else torch.tensor(lens,
                                                                                                    dtype=torch.int32)
    alibi = torch.rand(b, h_q, generator=g) if use_alibi else None
    exp_k, exp_v, oracle, oracle_lse = _expected(q, k_cache, v_cache, k, v, lens_t, rows, causal, window, softcap,
                                                 alibi, None, torch.float64)
    _, _, base, base_lse = _expected(q, k_cache, v_cache, k, v, lens_t, rows, causal, window, softcap, alibi, None,
                                     torch.float32)
    kc, vc = k_cache.clone(), v_cache.clone()
    with backends.force(backend):
        out, lse = ring_attn.flash_attn_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=lens if isinstance(lens, int) else lens_t,
            cache_batch_idx=rows if use_idx else None, causal=causal,
            window_size=window, softcap=softcap, alibi_slopes=alibi, return_softmax_lse=True)
        plain = ring_attn.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), cache_seqlens=lens_t + s_new,
                                                  cache_batch_idx=rows if use_idx else None, causal=causal,
                                                  window_size=window, softcap=softcap, alibi_slopes=alibi)
    assert torch.equal(plain, out)  # appending, then attending = attending to the already-filled cache
    assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v)  # appended in place, nothing else touched
    assert out.shape == q.shape and lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    assert_within_rule(f"kvcache {backend} out", out, oracle, base, torch.float32, FORWARD)
    assert_within_rule(f"kvcache {backend} lse", lse, oracle_lse, base_lse, torch.float32, FORWARD)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_rotary_of_the_new_tokens(interleaved, causal):
    """k is rotated at positions cache_seqlens + j before it is stored; q at the same positions (causal) or all
    at cache_seqlens (not causal); dims past rotary_dim pass through."""
    g = torch.Generator().manual_seed(5)
    b, s_cache, s_q, h_q, h_kv, d, rd = 2, 20, 3, 4, 2, 32, 16
    q = torch.randn(b, s_q, h_q, d, generator=g)
    k_cache, v_cache = (torch.randn(b, s_cache, h_kv, d, generator=g) for _ in range(2))
    k, v = (torch.randn(b, s_q, h_kv, d, generator=g) for _ in range(2))
    angles = torch.arange(s_cache)[:, None] * (10000.0 ** (-torch.arange(rd // 2) / (rd // 2)))
    cos, sin = angles.cos(), angles.sin()
    lens = torch.tensor([4, 13], dtype=torch.int32)
    exp_k, exp_v, oracle, _ = _expected(q, k_cache, v_cache, k, v, lens, torch.arange(b), causal, (-1, -1), 0.0,
                                        None, (cos, sin, interleaved), torch.float64)
    _, _, base, _ = _expected(q, k_cache, v_cache, k, v, lens, torch.arange(b), causal, (-1, -1), 0.0, None,
                              (cos, sin, interleaved), torch.float32)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = ring_attn.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, cache_seqlens=lens, causal=causal,
                                            rotary_interleaved=interleaved)
    assert torch.allclose(kc, exp_k, atol=1e-6) and torch.equal(vc, exp_v)
    assert_within_rule(f"kvcache rotary {interleaved} {causal}", out, oracle, base, torch.float32, FORWARD)
    # the other pair layout rotates other dims: a different result
    other = ring_attn.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cos, sin,
                                              cache_seqlens=lens, causal=causal, rotary_interleaved=not interleaved)
    assert (other - out).abs().max() > 1e-3


def test_half_precision_and_no_autograd():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 1, 4, 16, generator=g).half().requires_grad_()
    kc, vc = (torch.randn(2, 10, 2, 16, generator=g).half() for _ in range(2))
    out = ring_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([3, 10], dtype=torch.int32),
                                            causal=True)
    assert out.dtype == torch.float16 and not out.requires_grad
    ref, _ = reference.attention(q[1:].detach().double(), kc[1:].double(), vc[1:].double(), None, True)
    assert (out[1:].double() - ref).abs().max() < 2e-3


def _bad_calls():
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    cos = torch.randn(8, 4)
    return [
        (NotImplementedError, "cache_leftpad with a paged cache", dict(block_table=torch.zeros(2, 1, dtype=torch.int32),
                                                                       cache_leftpad=lens)),
        (ValueError, "cache_leftpad must lie in", dict(cache_leftpad=lens + 1, cache_seqlens=lens)),
        (ValueError, "both k and v", dict(k=k, cache_seqlens=lens)),
        (ValueError, "pass cache_seqlens", dict(k=k, v=v)),
        (ValueError, "fit the cache", dict(k=k, v=v, cache_seqlens=torch.tensor([3, 8], dtype=torch.int32))),
        (ValueError, "fit the cache", dict(cache_seqlens=9)),
        (ValueError, "fit the cache", dict(cache_seqlens=-1)),
        (ValueError, "cache_batch_idx must index", dict(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32))),
        (ValueError, "cache_seqlens must be an int32", dict(cache_seqlens=torch.tensor([3.0, 5.0]))),
        (ValueError, "need k and v", dict(rotary_cos=cos, rotary_sin=cos, cache_seqlens=lens)),
        (ValueError, "both rotary_cos and rotary_sin", dict(k=k, v=v, rotary_cos=cos, cache_seqlens=lens)),
        (ValueError, "cover 6 positions", dict(k=k, v=v, rotary_cos=cos[:6], rotary_sin=cos[:6],
                                               cache_seqlens=torch.tensor([3, 7], dtype=torch.int32),
                                               causal=True)),
        (ValueError, "rotary_dim <= head_dim", dict(k=k, v=v, rotary_cos=torch.randn(8, 9),
                                                    rotary_sin=torch.randn(8, 9), cache_seqlens=lens)),
        (ValueError, "num_splits", dict(num_splits=-1)),
        (TypeError, "causal must be a bool", dict(causal="yes")),
        (ValueError, "softcap", dict(softcap=-1.0)),
        (ValueError, "k must be", dict(k=torch.randn(2, 1, 4, 16), v=v, cache_seqlens=lens)),
    ], q, kc, vc


def test_refusals_before_anything_is_written():
    cases, q, kc, vc = _bad_calls()
    for exc, msg, kw in cases:
        k0, v0 = kc.clone(), vc.clone()
        with pytest.raises(exc, match=msg):
            ring_attn.flash_attn_with_kvcache(q, kc, vc, **kw)
        assert torch.equal(kc, k0) and torch.equal(vc, v0), msg
    with pytest.raises(ValueError, match="pass cache_batch_idx"):
        ring_attn.flash_attn_with_kvcache(q, torch.randn(3, 8, 2, 16), torch.randn(3, 8, 2, 16))
    with pytest.raises(ValueError, match="same shape"):
        ring_attn.flash_attn_with_kvcache(q, kc, torch.randn(2, 9, 2, 16))
    with pytest.raises(TypeError, match="share a dtype"):
        ring_attn.flash_attn_with_kvcache(q.half(), kc, vc)
    with pytest.raises(ValueError, match="multiple of k_cache/v_cache heads"):
        ring_attn.flash_attn_with_kvcache(torch.randn(2, 1, 3, 16), kc, vc)
    with pytest.raises(TypeError, match="q, k_cache, v_cache must share a dtype; got q torch.float32, k_cache "
                                        "torch.float16"):
        ring_attn.flash_attn_with_kvcache(q, kc.half(), vc)
    with pytest.raises(ValueError, match=r"cache_batch_idx \[1, 1\] names a cache row twice"):
        ring_attn.flash_attn_with_kvcache(q, kc, vc, torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16),
                                          cache_seqlens=1, cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32))
    for bad in (3.0, True, [3, 4]):
        with pytest.raises(TypeError, match=r"flash_attn_with_kvcache: cache_seqlens must be an int or an int32 "
                                            r"\(or int64\) tensor of shape"):
            ring_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=bad)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_strided_caches_are_read_and_written_in_place(backend):
    """A heads-major buffer ``[b, h, s, d]`` passed as ``[b, s, h, d]`` (HF's cache layout, transposed): its rows do
    not flatten to a view, yet the append must land in the caller's buffer and the attention must read it there
    (flash-attn takes any batch/row/head strides). Bit for bit what the same call on contiguous copies gives,
    with cache_batch_idx and GQA. A layout whose batch stride is not a multiple of its row stride raises before
    anything is written."""
    if backend == "native" and not backends.native_available():
        pytest.skip("native extension not built")
    g = torch.Generator().manual_seed(7)
    b, b_c, s_c, h_q, h_kv, d = 2, 3, 12, 4, 2, 16
    q = torch.randn(b, 2, h_q, d, generator=g)
    k, v = (torch.randn(b, 2, h_kv, d, generator=g) for _ in range(2))
    heads_major = [torch.randn(b_c, h_kv, s_c, d, generator=g) for _ in range(2)]
    kc, vc = (t.transpose(1, 2) for t in heads_major)  # [b_c, s_c, h_kv, d] views of the buffers
    kc2, vc2 = kc.contiguous(), vc.contiguous()
    lens, rows = torch.tensor([3, 9], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32)
    with backends.force(backend):
        out = ring_attn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, cache_batch_idx=rows,
                                                causal=True)
        ref = ring_attn.flash_attn_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=lens, cache_batch_idx=rows,
                                                causal=True)
    assert torch.equal(out, ref)
    assert torch.equal(heads_major[0].transpose(1, 2), kc2) and torch.equal(heads_major[1].transpose(1, 2), vc2)
    seq_major = torch.randn(s_c, b_c, h_kv, d, generator=g).transpose(0, 1)  # batch stride h*d < row stride
    before = seq_major.clone()
    with backends.force(backend), pytest.raises(ValueError, match="k_cache .* cannot be read in place"):
        ring_attn.flash_attn_with_kvcache(q, seq_major, seq_major.clone(), k, v, cache_seqlens=lens,
                                          cache_batch_idx=rows)
    assert torch.equal(seq_major, before)


def _strided(t):
    """``t``'s values in a stride-2 view of a larger buffer."""
    big = torch.full((2 * t.numel() + 1,), 99, dtype=t.dtype)
    view = big[1::2]
    view.copy_(t)
    return view


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_an_empty_cache_is_no_keys(backend):
    """A cache of capacity 0 (``k_cache`` ``[b, 0, h, d]``) with batch >= 2: every row sees no key (output 0,
    lse -inf), as with batch 1 or a paged cache of no pages (a RuntimeError from as_strided before 2026-12-08);
    appending to it is refused before anything is written."""
    if backend == "native" and not backends.native_available():
        pytest.skip("native extension not built")
    q = torch.randn(2, 1, 2, 8)
    kc, vc = torch.zeros(2, 0, 2, 8), torch.zeros(2, 0, 2, 8)
    with backends.force(backend):
        out, lse = ring_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=0, return_softmax_lse=True)
        assert torch.equal(out, torch.zeros_like(q)) and bool((lse == float("-inf")).all())
        with pytest.raises(ValueError, match="cache_seqlens \\+ seqlen_new must fit the cache"):
            ring_attn.flash_attn_with_kvcache(q, kc, vc, torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8),
                                              cache_seqlens=0)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("paged", [False, True])
def test_strided_index_tensors_equal_contiguous_ones(backend, paged):
    """cache_seqlens / cache_batch_idx / cache_leftpad and varlen cu_seqlens given as strided views: the Triton
    kernels read them with a unit stride, so a view was read as its buffer's neighbouring values (error 1.07 on
    the cache, up to 1e19 on paged varlen; found by a randomized run). Bit for bit the contiguous call now."""
    if backend == "native" and not backends.native_available():
        pytest.skip("native extension not built")
    g = torch.Generator().manual_seed(11)
    b, s_c, h_q, h_kv, d, page = 2, 24, 4, 2, 16, 4
    q = torch.randn(b, 2, h_q, d, generator=g)
    lens, rows, pad = (torch.tensor(x, dtype=torch.int32) for x in ([3, 20], [1, 0], [1, 2]))
    if paged:
        kc0, vc0 = (torch.randn(b * s_c // page, page, h_kv, d, generator=g) for _ in range(2))
        kw = dict(block_table=torch.arange(b * s_c // page, dtype=torch.int32).reshape(b, -1).flip(0))
    else:
        kc0, vc0 = (torch.randn(b, s_c, h_kv, d, generator=g) for _ in range(2))
        kw = dict(cache_batch_idx=rows, cache_leftpad=pad)
    for s_new in (0, 2):
        new = {} if not s_new else dict(k=torch.randn(b, s_new, h_kv, d, generator=g),
                                        v=torch.randn(b, s_new, h_kv, d, generator=g))
        got_c, want_c = (kc0.clone(), vc0.clone()), (kc0.clone(), vc0.clone())
        with backends.force(backend):
            got = ring_attn.flash_attn_with_kvcache(q, *got_c, **new, cache_seqlens=_strided(lens), causal=True,
                                                    **{n: _strided(t) if n != "block_table" else t
                                                       for n, t in kw.items()})
            want = ring_attn.flash_attn_with_kvcache(q, *want_c, **new, cache_seqlens=lens, causal=True, **kw)
        assert torch.equal(got, want) and torch.equal(got_c[0], want_c[0]) and torch.equal(got_c[1], want_c[1])
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 9, 20], dtype=torch.int32)
    qp = torch.randn(5, h_q, d, generator=g)
    kp, vp = (torch.randn(20, h_kv, d, generator=g) for _ in range(2))
    extra = {}
    if paged:
        kp, vp = kc0, vc0
        cu_k = torch.tensor([0, 9, 20], dtype=torch.int32)
        extra = dict(block_table=torch.tensor([[5, 0, 2], [1, 3, 4]], dtype=torch.int32))
    with backends.force(backend):
        got = ring_attn.flash_attn_varlen_func(qp, kp, vp, _strided(cu_q), _strided(cu_k), 3, 11, causal=True,
                                               **extra)
        want = ring_attn.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 3, 11, causal=True, **extra)
    assert torch.equal(got, want)


def test_a_backend_that_cannot_run_raises_before_the_cache_is_written(monkeypatch):
    """A pinned backend that cannot run the inputs (here Triton on CPU tensors without the interpreter) raised
    only after the append had written k/v into the cache."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kc, vc = torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2, 16)
    with backends.force("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ring_attn.flash_attn_with_kvcache(torch.randn(1, 2, 2, 16), kc, vc, torch.ones(1, 2, 2, 16),
                                          torch.ones(1, 2, 2, 16), cache_seqlens=3)
    assert not kc.any() and not vc.any()


@pytest.mark.gpu
def test_decoding_steps_on_gpu():
    """bf16 on the GPU (the Triton kernels): eight decoding steps of four rows with different fill levels and
    GQA 8/2, d=128, each step appending one token; every step's output against the float32 reference over the
    filled cache."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b, s_cache, h_q, h_kv, d = 4, 2048, 8, 2, 128
    kc, vc = (torch.randn(b, s_cache, h_kv, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    lens = torch.tensor([0, 100, 1000, 2000], dtype=torch.int32, device="cuda")
    worst = 0.0
    for step in range(8):
        q = torch.randn(b, 1, h_q, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(b, 1, h_kv, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        out = ring_attn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens + step, causal=True)
        for i in range(b):
            n = int(lens[i]) + step + 1
            ref, _ = reference.attention(q[i:i + 1].float(), kc[i:i + 1, :n].float(), vc[i:i + 1, :n].float(),
                                         None, True, compute_dtype=torch.float32)
            worst = max(worst, (out[i:i + 1].float() - ref).abs().max().item())
    assert worst < 2e-2, worst


@pytest.mark.gpu
def test_heads_major_cache_on_gpu():
    """bf16 on the GPU: a heads-major cache buffer [b, h, s, d] passed transposed (the Triton kernel reads rows
    whose head stride exceeds the row stride) gives what contiguous copies give, and the appends land in it."""
    g = torch.Generator(device="cuda").manual_seed(1)
    b, s_cache, h_q, h_kv, d = 3, 1024, 8, 2, 128
    bufs = [torch.randn(b, h_kv, s_cache, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2)]
    kc, vc = (t.transpose(1, 2) for t in bufs)
    kc2, vc2 = kc.contiguous(), vc.contiguous()
    lens = torch.tensor([0, 300, 1000], dtype=torch.int32, device="cuda")
    for step in range(3):
        q = torch.randn(b, 1, h_q, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(b, 1, h_kv, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        out = ring_attn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens + step, causal=True)
        ref = ring_attn.flash_attn_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=lens + step, causal=True)
        assert (out.float() - ref.float()).abs().max().item() <= 2 ** -8
    assert torch.equal(bufs[0].transpose(1, 2), kc2) and torch.equal(bufs[1].transpose(1, 2), vc2)


def test_shape_only_index_tensors_are_made_once():
    """The per-row offsets that depend only on shapes (query starts, query lengths, cache-row starts) come from a
    cache keyed by (device, stream, n, step, first): a decoding step launches no kernels for them. Not while
    traced (FakeTensor, compile), where a cached tensor would outlive its trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ring_attn.ops import kvcache

    a = kvcache._steps(torch.device("cpu"), 5, 7, 2)
    assert a.tolist() == [2, 9, 16, 23, 30] and a.dtype == torch.int32
    assert kvcache._steps(torch.device("cpu"), 5, 7, 2) is a  # reused
    assert kvcache._steps(torch.device("cpu"), 5, 7, 2, cache=False) is not a
    assert kvcache._steps(torch.device("cpu"), 4, 7, 2).tolist() == [2, 9, 16, 23]
    q = torch.randn(2, 1, 2, 16)
    assert kvcache._reusable(q)
    with FakeTensorMode() as mode:
        assert not kvcache._reusable(mode.from_tensor(q))
    # two batch sizes and two cache lengths in a row: each call gets its own offsets
    g = torch.Generator().manual_seed(4)
    for b, s in ((3, 12), (2, 12), (2, 20)):
        q = torch.randn(b, 1, 2, 16, generator=g)
        kc, vc = (torch.randn(b, s, 2, 16, generator=g) for _ in range(2))
        lens = torch.randint(1, s + 1, (b,), generator=g, dtype=torch.int32)
        out = ring_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)
        for i in range(b):
            ref, _ = reference.attention(q[i:i + 1].double(), kc[i:i + 1, :lens[i]].double(),
                                         vc[i:i + 1, :lens[i]].double(), None, False)
            assert (out[i:i + 1].double() - ref).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Property-based: random shapes, fill levels, cache layouts and options against the float64 oracle

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def kvcache_case(draw):
    b = draw(st.integers(1, 3))
    c = dict(b=b, b_c=b + draw(st.integers(0, 2)), s_cache=draw(st.integers(4, 40)), s_new=draw(st.integers(0, 3)),
             s_q=draw(st.integers(1, 4)), h_kv=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2, 4])),
             d=draw(st.sampled_from([16, 32, 48])), causal=draw(st.booleans()),
             window=draw(st.sampled_from([(-1, -1), (3, 0), (2, 2), (0, -1)])),
             softcap=draw(st.sampled_from([0.0, 2.0])), alibi=draw(st.booleans()),
             heads_major=draw(st.booleans()), int_lens=draw(st.booleans()),
             rotary=draw(st.sampled_from([None, True, False])), seed=draw(st.integers(0, 2**16)))
    c["s_new"] = min(c["s_new"], c["s_cache"])
    room = c["s_cache"] - c["s_new"]
    c["lens"] = [draw(st.integers(0, room))] * b if c["int_lens"] else \
        [draw(st.integers(0, room)) for _ in range(b)]
    c["rows"] = draw(st.permutations(list(range(c["b_c"]))))[:b] if c["b_c"] > b or draw(st.booleans()) else None
    if c["rotary"] is not None and not c["s_new"]:
        c["rotary"] = None  # rotary rotates the new tokens: only with k/v
    return c


@pytest.mark.parametrize("backend", ["reference", "native"])
@given(c=kvcache_case())
def test_random_calls_match_the_oracle(backend, c):
    """Any mix of fill levels (int or per row), appends, cache rows picked by cache_batch_idx, contiguous or
    heads-major caches, GQA, causal/windows/softcap/ALiBi and rotary of the new tokens: the output, the LSE and
    the cache after the append against the float64 oracle."""
    if backend == "native" and not backends.native_available():
        pytest.skip("native extension not built")
    g = torch.Generator().manual_seed(c["seed"])
    b, b_c, s_c, s_q, s_new, h_kv, d = (c[x] for x in ("b", "b_c", "s_cache", "s_q", "s_new", "h_kv", "d"))
    h_q = h_kv * c["group"]
    q = torch.randn(b, s_q, h_q, d, generator=g)
    caches = [torch.randn(b_c, h_kv, s_c, d, generator=g) for _ in range(2)]
    if c["heads_major"]:
        kc, vc = (t.transpose(1, 2) for t in caches)
    else:
        kc, vc = (t.transpose(1, 2).contiguous() for t in caches)
    k, v = (torch.randn(b, s_new, h_kv, d, generator=g) for _ in range(2)) if s_new else (None, None)
    lens = torch.tensor(c["lens"], dtype=torch.int32)
    rows = torch.arange(b, dtype=torch.int32) if c["rows"] is None else torch.tensor(c["rows"], dtype=torch.int32)
    alibi = torch.rand(b, h_q, generator=g) * 0.5 if c["alibi"] else None
    rotary = None
    if c["rotary"] is not None:
        angle = torch.rand(s_c + s_q, d // 4, generator=g, dtype=torch.float64) * 6.3
        rotary = (angle.cos().float(), angle.sin().float(), c["rotary"])
    window = c["window"]
    exp_k, exp_v, oracle, oracle_lse = _expected(q, kc, vc, k, v, lens, rows, c["causal"], window, c["softcap"],
                                                 alibi, rotary, torch.float64)
    _, _, base, base_lse = _expected(q, kc, vc, k, v, lens, rows, c["causal"], window, c["softcap"], alibi, rotary,
                                     torch.float32)
    with backends.force(backend):
        out, lse = ring_attn.flash_attn_with_kvcache(
            q, kc, vc, k, v, *(rotary[:2] if rotary else (None, None)),
            cache_seqlens=c["lens"][0] if c["int_lens"] else lens, cache_batch_idx=None if c["rows"] is None else rows,
            causal=c["causal"], window_size=window, softcap=c["softcap"], alibi_slopes=alibi,
            rotary_interleaved=bool(c["rotary"]), return_softmax_lse=True)
    torch.testing.assert_close(kc, exp_k, rtol=0, atol=1e-6)
    assert torch.equal(vc, exp_v)
    seen = torch.isfinite(oracle_lse)  # rows that see no key: output 0, LSE -inf
    assert torch.equal(torch.isfinite(lse), seen)
    assert_within_rule(f"kvcache {backend} out", out, oracle, base, torch.float32, FORWARD)
    assert_within_rule(f"kvcache {backend} lse", lse[seen], oracle_lse[seen], base_lse[seen], torch.float32, FORWARD)
