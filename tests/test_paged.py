"""Paged KV caches (flash-attn's ``block_table``) and left-padded caches (``cache_leftpad``).

A paged cache holds the same keys as a contiguous one, scattered over pages: every backend must give bit for bit
what it gives on the contiguous cache (the Triton kernel reads the pages in place, ``KVPages``; the CPU backends
get the pages gathered by the ops layer), and the pages must receive the appended tokens where the contiguous
cache does. The contiguous path itself is checked against the float64 oracle in tests/test_kvcache.py and
tests/test_attention.py; left padding is checked against the oracle here. Cases follow flash-attn's
test_flash_attn_kvcache (paged_kv_block_size, has_leftpad), shrunk for the Triton interpreter.
"""
import pytest
import torch

import ring_attn
from accuracy import FORWARD, assert_within_rule
from ring_attn import backends, reference
from ring_attn._contracts import KVPages, VarlenSeqs
from ring_attn.ops.attention_block import attention_block_forward

BACKENDS = ["reference", "native", "triton"]


def _paginate(cache, page, g, spare=2):
    """A paged copy of a contiguous cache ``[b, s, h, d]`` (``s`` a multiple of ``page``): pages in a random
    order with ``spare`` unused pages of noise, and the table (entries past a row's pages: -1)."""
    b, s = cache.shape[:2]
    per_row = s // page
    n_pages = b * per_row + spare
    order = torch.randperm(n_pages, generator=g)
    table = order[:b * per_row].reshape(b, per_row).to(torch.int32)
    pages = torch.randn((n_pages, page) + tuple(cache.shape[2:]), generator=g).to(cache.dtype)
    for i in range(b):
        for j in range(per_row):
            pages[table[i, j]] = cache[i, j * page:(j + 1) * page]
    extra = torch.full((b, 1), -1, dtype=torch.int32)  # an unread entry: never dereferenced
    return pages, torch.cat([table, extra], 1)


def _gather(pages, table, rows):
    """The contiguous cache the pages hold: ``[b, rows, h, d]``."""
    page = pages.shape[1]
    return torch.stack([torch.cat([pages[table[i, j]] for j in range(rows // page)]) for i in range(table.shape[0])])


CASES = [  # b, s_cache, page, s_q, s_new, h_q, h_kv, d, causal, window, softcap, alibi, rotary, lens, splits
    (3, 24, 8, 1, 1, 4, 2, 16, True, (-1, -1), 0.0, False, False, [0, 9, 23], 0),  # decoding, GQA
    (2, 32, 16, 3, 3, 4, 1, 32, True, (-1, -1), 0.0, False, True, [5, 29], 0),  # MQA, a chunk, rotary
    (2, 24, 4, 2, 0, 2, 2, 16, False, (-1, -1), 0.0, False, False, [7, 24], 2),  # nothing appended, split-KV
    (2, 30, 3, 4, 2, 4, 2, 8, True, (5, 0), 1.5, False, False, [12, 3], 0),  # odd page size, window, softcap
    (2, 16, 1, 2, 2, 2, 1, 16, True, (-1, -1), 0.0, True, False, [4, 11], 0),  # one-row pages, ALiBi
    # several key blocks per loop (the next block's table entries are loaded one block ahead): a block inside
    # one page (pages of 16 = the interpreter's BLOCK_N), and blocks spanning pages (pages of 8)
    (2, 96, 16, 1, 1, 4, 2, 16, True, (-1, -1), 0.0, False, False, [70, 94], 0),
    (2, 96, 8, 1, 1, 4, 2, 16, False, (-1, -1), 0.0, False, False, [70, 94], 0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_kvcache_pages_equal_the_contiguous_cache(backend, case):
    b, s_cache, page, s_q, s_new, h_q, h_kv, d, causal, window, softcap, use_alibi, rotary, lens, splits = case
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, s_q, h_q, d, generator=g)
    k_cache, v_cache = (torch.randn(b, s_cache, h_kv, d, generator=g) for _ in range(2))
    k, v = ((torch.randn(b, s_new, h_kv, d, generator=g) for _ in range(2)) if s_new else (None, None))
    k_pages, table = _paginate(k_cache, page, g)
    v_pages = torch.randn(k_pages.shape, generator=g)
    for i in range(b):
        for j in range(s_cache // page):
            v_pages[table[i, j]] = v_cache[i, j * page:(j + 1) * page]
    lens_t = torch.tensor(lens, dtype=torch.int32)
    alibi = torch.rand(b, h_q, generator=g) if use_alibi else None
    cos = sin = None
    if rotary:
        angle = torch.rand(s_cache, d // 4, generator=g) * 6.3
        cos, sin = angle.cos(), angle.sin()
    kw = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens_t, causal=causal, window_size=window,
              softcap=softcap, alibi_slopes=alibi, num_splits=splits, return_softmax_lse=True)
    spare = k_pages[table[0, 0]].clone()
    with backends.force(backend):
        out, lse = ring_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **kw)
        p_out, p_lse = ring_attn.flash_attn_with_kvcache(q, k_pages, v_pages, k, v, block_table=table, **kw)
    assert torch.equal(p_out, out) and torch.equal(p_lse, lse)
    # the appended tokens landed in the right pages, and nothing else moved
    assert torch.equal(_gather(k_pages, table, s_cache), k_cache)
    assert torch.equal(_gather(v_pages, table, s_cache), v_cache)
    if s_new == 0:
        assert torch.equal(k_pages[table[0, 0]], spare)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_may_share_pages(backend):
    """Two rows reading the same prefix pages (a shared prompt), each with its own last page."""
    g = torch.Generator().manual_seed(5)
    page, h, d = 4, 2, 16
    k_pages, v_pages = (torch.randn(6, page, h, d, generator=g) for _ in range(2))
    table = torch.tensor([[0, 1, 2], [0, 1, 5]], dtype=torch.int32)
    q = torch.randn(2, 1, h, d, generator=g)
    lens = torch.tensor([10, 12], dtype=torch.int32)
    with backends.force(backend):
        out = ring_attn.flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=lens, block_table=table)
        flat = ring_attn.flash_attn_with_kvcache(q, _gather(k_pages, table, 12), _gather(v_pages, table, 12),
                                                 cache_seqlens=lens)
    assert torch.equal(out, flat)


def _leftpad_oracle(q, k_cache, v_cache, k, v, lens, pad, causal, window, alibi, rotary, compute):
    """Per row: the new tokens written at ``lens[i]`` (rotated at the cache index, as flash-attn), then attention
    in ``compute`` over cache positions ``pad[i] .. lens[i] + s_new``."""
    kc, vc = k_cache.clone(), v_cache.clone()
    b, s_q = q.shape[:2]
    s_new = 0 if k is None else k.shape[1]
    if rotary is not None:
        cos, sin = rotary
        k = reference.rotary_emb(k, cos, sin, lens[:, None].long() + torch.arange(s_new)).to(k.dtype)
        pos = lens[:, None].long() + (torch.arange(s_q) if causal else torch.zeros(s_q, dtype=torch.long))
        q = reference.rotary_emb(q, cos, sin, pos).to(q.dtype)
    outs = []
    for i in range(b):
        n, p = int(lens[i]), int(pad[i])
        if k is not None:
            kc[i, n:n + s_new], vc[i, n:n + s_new] = k[i], v[i]
        sl = None if alibi is None else alibi[i:i + 1].to(compute)
        o, _ = reference.attention(q[i:i + 1].to(compute), kc[i:i + 1, p:n + s_new].to(compute),
                                   vc[i:i + 1, p:n + s_new].to(compute), None, causal, compute_dtype=compute,
                                   window=window, alibi_slopes=sl)
        outs.append(o)
    return kc, torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,window,use_alibi,rotary", [(True, (-1, -1), False, False),
                                                           (False, (-1, -1), True, False),
                                                           (True, (3, 0), False, True)])
def test_cache_leftpad_against_the_oracle(backend, causal, window, use_alibi, rotary):
    g = torch.Generator().manual_seed(2)
    b, s_cache, s_q, h_q, h_kv, d = 3, 20, 2, 4, 2, 16
    q = torch.randn(b, s_q, h_q, d, generator=g)
    k_cache, v_cache = (torch.randn(b, s_cache, h_kv, d, generator=g) for _ in range(2))
    k, v = (torch.randn(b, s_q, h_kv, d, generator=g) for _ in range(2))
    lens = torch.tensor([6, 0, 17], dtype=torch.int32)
    pad = torch.tensor([4, 0, 17], dtype=torch.int32)  # row 2: only the new tokens are keys
    alibi = torch.rand(b, h_q, generator=g) if use_alibi else None
    rot = None
    if rotary:
        angle = torch.rand(s_cache, d // 2, generator=g) * 6.3
        rot = (angle.cos(), angle.sin())
    exp_k, oracle = _leftpad_oracle(q, k_cache, v_cache, k, v, lens, pad, causal, window, alibi, rot,
                                    torch.float64)
    _, base = _leftpad_oracle(q, k_cache, v_cache, k, v, lens, pad, causal, window, alibi, rot, torch.float32)
    kc, vc = k_cache.clone(), v_cache.clone()
    with backends.force(backend):
        out = ring_attn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, cache_leftpad=pad,
                                                causal=causal, window_size=window, alibi_slopes=alibi,
                                                rotary_cos=None if rot is None else rot[0],
                                                rotary_sin=None if rot is None else rot[1],
                                                rotary_interleaved=False)
    torch.testing.assert_close(kc, exp_k, rtol=0, atol=1e-6)  # rotated in float64 here, float32 there
    assert_within_rule(f"leftpad {backend}", out, oracle, base, torch.float32, FORWARD)
    # zero padding is no padding
    with backends.force(backend):
        a = ring_attn.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=lens,
                                              cache_leftpad=torch.zeros(b, dtype=torch.int32), causal=causal)
        c = ring_attn.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=lens,
                                              causal=causal)
    assert torch.equal(a, c)


def _varlen_case(g, page):
    lens_q, lens_k = [3, 1, 0, 5], [7, 12, 4, 5]
    h_q, h_kv, d = 4, 2, 16
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), h_q, d, generator=g)
    per_row = -(-max(lens_k) // page)
    n_pages = len(lens_k) * per_row + 1
    k_pages, v_pages = (torch.randn(n_pages, page, h_kv, d, generator=g) for _ in range(2))
    table = torch.randperm(n_pages, generator=g)[:len(lens_k) * per_row].reshape(len(lens_k), per_row)
    table = table.to(torch.int32)
    for i, n in enumerate(lens_k):  # entries past a sequence's pages: -1, never read
        table[i, -(-n // page):] = -1
    k = torch.cat([_gather(k_pages, table[i:i + 1].clamp(min=0), per_row * page)[0, :n] for i, n in enumerate(lens_k)])
    v = torch.cat([_gather(v_pages, table[i:i + 1].clamp(min=0), per_row * page)[0, :n] for i, n in enumerate(lens_k)])
    return q, k, v, k_pages, v_pages, table, cu_q, cu_k, max(lens_q), max(lens_k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page", [4, 5])
def test_varlen_block_table_equals_the_packed_keys(backend, page):
    g = torch.Generator().manual_seed(8)
    q, k, v, k_pages, v_pages, table, cu_q, cu_k, max_q, max_k = _varlen_case(g, page)
    for causal, window, softcap in [(True, (-1, -1), 0.0), (False, (2, 1), 0.0), (False, (-1, -1), 2.0)]:
        with backends.force(backend):
            ref = ring_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                                   window_size=window, softcap=softcap, return_attn_probs=True)
            got = ring_attn.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, max_q, max_k, causal=causal,
                                                   window_size=window, softcap=softcap, return_attn_probs=True,
                                                   block_table=table)
        assert got[2] is None and torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # cu_seqlens_k need not end at the pages' row count (it does not here), and max_seqlen_k may be an upper bound
    assert int(cu_k[-1]) != k_pages.shape[0] * page
    with backends.force(backend):
        got = ring_attn.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, max_q, max_k + 7, causal=True,
                                               block_table=table)
        ref = ring_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    assert torch.equal(got, ref)


def test_block_level_pages_are_read_in_place_by_triton():
    """``attention_block_forward(pages=...)``: the Triton backend takes the table (no gathered copy); the CPU
    backends get the gathered rows; all equal the packed keys' result, also when merging into a running
    result."""
    g = torch.Generator().manual_seed(4)
    q, k, v, k_pages, v_pages, table, cu_q, cu_k, max_q, max_k = _varlen_case(g, 4)
    seqs = VarlenSeqs.from_cu_seqlens(cu_q, cu_k, max_q, max_k)
    pages = KVPages(table, 4)
    for backend in BACKENDS:
        with backends.force(backend):
            ref = attention_block_forward(q, k, v, 0.25, True, None, seqs, out_dtype=torch.float32)
            got = attention_block_forward(q, k_pages.flatten(0, 1), v_pages.flatten(0, 1), 0.25, True, None, seqs,
                                          out_dtype=torch.float32, pages=pages)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), backend
            o, l_ = ref[0].clone(), ref[1].clone()
            o2, l2 = ref[0].clone(), ref[1].clone()
            attention_block_forward(q, k, v, 0.25, False, None, seqs, out=o, lse=l_)
            attention_block_forward(q, k_pages.flatten(0, 1), v_pages.flatten(0, 1), 0.25, False, None, seqs,
                                    out=o2, lse=l2, pages=pages)
            assert torch.equal(o, o2) and torch.equal(l_, l2), backend
    assert backends.CAPABILITIES[("triton", "attention")].paged
    assert not backends.CAPABILITIES[("native", "attention")].paged
    with pytest.raises(ValueError, match="need packed seqs"):
        attention_block_forward(q[None], k[None], v[None], 0.25, True, pages=pages)


def _kv_refusals():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 16, generator=g)
    kp, vp = (torch.randn(5, 4, 2, 16, generator=g) for _ in range(2))
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([3, 5], dtype=torch.int32)  # the paged cache holds 8 rows per sequence
    fits = torch.tensor([3, 4], dtype=torch.int32)  # the contiguous one [2, 4, 2, 16]
    k, v = (torch.randn(2, 1, 2, 16, generator=g) for _ in range(2))
    return [
        (NotImplementedError, "cache_leftpad with a paged cache", dict(block_table=table, cache_leftpad=lens)),
        (ValueError, "cache_batch_idx cannot be used with block_table",
         dict(block_table=table, cache_batch_idx=torch.tensor([1, 0], dtype=torch.int32))),
        (ValueError, "block_table must be an int32", dict(block_table=table.long())),
        (ValueError, "block_table must be an int32", dict(block_table=table[:1])),
        (ValueError, r"block_table\[1, 1\] = 7 is read", dict(block_table=torch.tensor([[0, 1], [2, 7]],
                                                                                        dtype=torch.int32),
                                                              cache_seqlens=lens)),
        (ValueError, r"block_table\[0, 0\] = -1 is read",  # read for the appended token of an empty row
         dict(block_table=torch.tensor([[-1, 1], [2, 3]], dtype=torch.int32), k=k, v=v,
              cache_seqlens=torch.zeros(2, dtype=torch.int32))),
        (ValueError, "fit the cache", dict(block_table=table, k=k, v=v, cache_seqlens=torch.tensor([3, 8],
                                                                                                  dtype=torch.int32))),
        (ValueError, "cache_leftpad must lie in", dict(cache_leftpad=torch.tensor([0, 6], dtype=torch.int32),
                                                       cache_seqlens=fits)),
        (ValueError, "cache_leftpad must lie in", dict(cache_leftpad=torch.tensor([-1, 0], dtype=torch.int32),
                                                       cache_seqlens=fits)),
        (ValueError, "cache_leftpad must be an int32", dict(cache_leftpad=torch.tensor([0.0, 1.0]),
                                                            cache_seqlens=fits)),
    ], q, kp, vp


def test_kvcache_refusals_before_anything_is_written():
    cases, q, kp, vp = _kv_refusals()
    for exc, msg, kw in cases:
        k0, v0 = kp.clone(), vp.clone()
        cache = (kp, vp) if "block_table" in kw else (kp[:2], vp[:2])  # contiguous: [2, 4, 2, 16]
        with pytest.raises(exc, match=msg):
            ring_attn.flash_attn_with_kvcache(q, *cache, **kw)
        assert torch.equal(kp, k0) and torch.equal(vp, v0), msg
    strided = torch.randn(5, 8, 2, 16)[:, :4]  # pages 8 rows apart, 4 used: not flattenable in place
    with pytest.raises(ValueError, match="must follow each other"):
        ring_attn.flash_attn_with_kvcache(q, strided, strided.clone(), block_table=torch.zeros(2, 1,
                                                                                               dtype=torch.int32))
    # an empty page pool / an empty cache picked by cache_batch_idx: said so (was "k_cache batch size 0 != q batch
    # size 1", from the one-row check of dtypes and heads)
    empty = torch.empty(0, 4, 2, 16)
    with pytest.raises(ValueError, match=r"k_cache \(0, 4, 2, 16\) holds no pages, but q's batch of 2"):
        ring_attn.flash_attn_with_kvcache(q, empty, empty.clone(), block_table=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="holds no rows, but q's batch of 2 needs the rows cache_batch_idx picks"):
        ring_attn.flash_attn_with_kvcache(q, empty, empty.clone(), cache_batch_idx=torch.tensor([0, 1],
                                                                                                  dtype=torch.int32))


def test_varlen_block_table_refusals():
    g = torch.Generator().manual_seed(1)
    q, k, v, k_pages, v_pages, table, cu_q, cu_k, max_q, max_k = _varlen_case(g, 4)
    call = ring_attn.flash_attn_varlen_func
    with pytest.raises(NotImplementedError, match="no gradient flows through a paged KV cache"):
        call(q.requires_grad_(), k_pages, v_pages, cu_q, cu_k, max_q, max_k, block_table=table)
    q = q.detach()
    with torch.no_grad():  # under no_grad the same call runs
        call(q.requires_grad_(), k_pages, v_pages, cu_q, cu_k, max_q, max_k, block_table=table)
    q = q.detach()
    with pytest.raises(NotImplementedError, match="dropout_p=0.1 with block_table"):
        call(q, k_pages, v_pages, cu_q, cu_k, max_q, max_k, dropout_p=0.1, block_table=table)
    with pytest.raises(ValueError, match="must be a paged cache"):
        call(q, k, v, cu_q, cu_k, max_q, max_k, block_table=table)
    with pytest.raises(ValueError, match="block_table must be an int32"):
        call(q, k_pages, v_pages, cu_q, cu_k, max_q, max_k, block_table=table[:, :1].T)
    with pytest.raises(ValueError, match="holds 3 pages of 4 rows"):
        call(q, k_pages, v_pages, cu_q, torch.tensor([0, 7, 19, 23, 41], dtype=torch.int32), max_q, 18,
             block_table=table)
    with pytest.raises(ValueError, match="max_seqlen_k is 11"):
        call(q, k_pages, v_pages, cu_q, cu_k, max_q, 11, block_table=table)
    bad = table.clone()
    bad[1, 2] = 99
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = 99 is read"):
        call(q, k_pages, v_pages, cu_q, cu_k, max_q, max_k, block_table=bad)


def test_varlen_block_table_under_torch_compile():
    """The paged call runs eagerly inside a compiled function (a graph break, not an error) and gives the same
    bits."""
    g = torch.Generator().manual_seed(3)
    q, _k, _v, k_pages, v_pages, table, cu_q, cu_k, max_q, max_k = _varlen_case(g, 4)

    def f(q):
        return ring_attn.flash_attn_varlen_func(q * 2, k_pages, v_pages, cu_q, cu_k, max_q, max_k, causal=True,
                                                block_table=table) + 1

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, backend="eager")(q), f(q))


@pytest.mark.gpu
def test_paged_decoding_on_gpu():
    """bf16 on the GPU: decoding steps over a paged cache (pages of 256 and 16 rows, shuffled) give what the
    same steps over the contiguous cache give, split-KV and GQA packing included (the same tiles and order;
    a different compiled kernel, so equality is asked up to one bf16 rounding of values below 1)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b, s_cache, h_q, h_kv, d = 4, 2048, 8, 2, 128
    kc, vc = (torch.randn(b, s_cache, h_kv, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    for page in (256, 16):
        per_row = s_cache // page
        table = torch.randperm(b * per_row, device="cuda", generator=g).reshape(b, per_row).to(torch.int32)
        kp = torch.empty(b * per_row, page, h_kv, d, device="cuda", dtype=torch.bfloat16)
        vp = torch.empty_like(kp)
        kp[table.flatten().long()] = kc.reshape(b * per_row, page, h_kv, d)
        vp[table.flatten().long()] = vc.reshape(b * per_row, page, h_kv, d)
        k2, v2 = kc.clone(), vc.clone()
        lens = torch.tensor([0, 100, 1000, 2000], dtype=torch.int32, device="cuda")
        for step in range(4):
            q = torch.randn(b, 1, h_q, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = (torch.randn(b, 1, h_kv, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            flat = ring_attn.flash_attn_with_kvcache(q, k2, v2, k, v, cache_seqlens=lens + step, causal=True)
            paged = ring_attn.flash_attn_with_kvcache(q, kp, vp, k, v, cache_seqlens=lens + step, causal=True,
                                                      block_table=table)
            worst = (paged.float() - flat.float()).abs().max().item()
            assert worst <= 2 ** -8, (page, step, worst)
        torch.cuda.synchronize()
