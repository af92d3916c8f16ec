"""Split-KV forward (decoding-shaped launches on a GPU): the key range of each (query block, head) cut into
ranges computed by separate programs and combined by LSE. Checked under the Triton interpreter against the
float64 oracle (accuracy rule, tests/accuracy.py) with the split count forced, for the masks the kernel has
(causal, windows, softcap, ALiBi), GQA, dense and packed layouts, rows outside every sequence and sequences
without keys; the split and tile choice (`split_plan`, `tiles.split_count`) as pure functions; the kv-cache
entry point's ``num_splits``. The sm_90 build of the split kernel is in tests/test_compile_check.py.
"""
import pytest
import torch

import ring_attn
from accuracy import FORWARD, assert_within_rule
from ring_attn import backends, reference
from ring_attn._contracts import VarlenSeqs
from ring_attn.backends.triton import attention as tri
from ring_attn.backends.triton import tiles
from ring_attn.ops.attention_block import attention_block_forward

pytestmark = pytest.mark.skipif(not backends.triton_available(), reason="needs triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [  # b, s_q, s_k, h_q, h_kv, d, causal, window, softcap, alibi
    (2, 1, 70, 4, 2, 32, True, (-1, -1), 0.0, False),     # decoding, GQA
    (1, 3, 90, 4, 1, 16, False, (-1, -1), 0.0, True),     # MQA, ALiBi, not causal
    (2, 2, 75, 2, 2, 32, True, (20, 0), 1.5, False),      # a window inside a few splits, softcap
    (1, 5, 64, 2, 2, 16, False, (5, 7), 0.0, False),      # a symmetric window: most splits see no key
    (1, 20, 50, 2, 1, 16, True, (-1, -1), 0.0, False),    # 20 query rows (two row blocks, no packing)
    (2, 6, 70, 8, 2, 16, True, (10, 0), 0.0, True),       # 6 tokens x 4 heads packed: 24 rows, two row blocks
]


def _inputs(case, dtype, seed=0):
    b, s_q, s_k, h_q, h_kv, d, causal, window, softcap, use_alibi = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s_q, h_q, d, generator=g).to(dtype)
    k = torch.randn(b, s_k, h_kv, d, generator=g).to(dtype)
    v = torch.randn(b, s_k, h_kv, d, generator=g).to(dtype)
    alibi = torch.rand(h_q, generator=g) if use_alibi else None
    return q, k, v, dict(window=window, softcap=softcap, alibi_slopes=alibi)


def _oracle(q, k, v, causal, kw, compute):
    return reference.attention(q.to(compute), k.to(compute), v.to(compute), None, causal, compute_dtype=compute,
                               **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_forward_matches_the_oracle(case, dtype, splits):
    q, k, v, kw = _inputs(case, dtype)
    causal = case[6]
    with backends.force("triton"):
        out, lse = attention_block_forward(q, k, v, q.shape[-1] ** -0.5, causal, num_splits=splits, **kw)
        again, lse2 = attention_block_forward(q, k, v, q.shape[-1] ** -0.5, causal, num_splits=splits, **kw)
    oracle, oracle_lse = _oracle(q, k, v, causal, kw, torch.float64)
    base, base_lse = _oracle(q, k, v, causal, kw, torch.float32 if dtype == torch.float32 else dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_within_rule(f"split {splits} out", out, oracle.to(torch.float64), base, dtype, FORWARD)
    assert_within_rule(f"split {splits} lse", lse, oracle_lse, base_lse, dtype, FORWARD)
    assert torch.equal(out, again) and torch.equal(lse, lse2)  # one split count, one result


def test_the_split_path_really_runs(monkeypatch):
    """A spy on the split launcher: num_splits > 1 takes it (clamped to one range per key block), 1 and
    merging never do, and 0 under the interpreter does not (no GPU to fill)."""
    calls = []
    real = tri._forward_split

    def spy(*args, **kwargs):
        calls.append(args[7])  # the split count
        return real(*args, **kwargs)

    monkeypatch.setattr(tri, "_forward_split", spy)
    q, k, v, kw = _inputs(CASES[0], torch.float32)
    with backends.force("triton"):
        attention_block_forward(q, k, v, 0.2, True, num_splits=3, **kw)
        attention_block_forward(q, k, v, 0.2, True, num_splits=1000, **kw)  # 70 keys = 5 blocks of 16
        attention_block_forward(q, k, v, 0.2, True, num_splits=1, **kw)
        attention_block_forward(q, k, v, 0.2, True, **kw)
        o, l = attention_block_forward(q, k, v, 0.2, True, out_dtype=torch.float32, **kw)
        attention_block_forward(q, k, v, 0.2, True, out=o, lse=l, num_splits=3, **kw)  # merge: never split
    assert calls == [3, 5]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_gqa_decoding_packs_the_group(monkeypatch, num_splits):
    """Decoding-shaped GQA launches put the group's query heads in one program (PACK_GQA), split or not;
    equal (to rounding) to the unpacked kernel run head by head, and to the oracle."""
    plans = []
    real = tri.split_plan
    monkeypatch.setattr(tri, "split_plan", lambda *a, **kw: (plans.append(real(*a, **kw)), plans[-1])[1])
    case = (2, 3, 70, 8, 2, 16, True, (-1, -1), 0.0, True)
    q, k, v, kw = _inputs(case, torch.float32, seed=2)
    with backends.force("triton"):
        out, lse = attention_block_forward(q, k, v, 0.25, True, num_splits=num_splits, **kw)
        # the same heads one kv head at a time (group 1: nothing to pack)
        per_head = [attention_block_forward(q[:, :, h:h + 1], k[:, :, h // 4:h // 4 + 1], v[:, :, h // 4:h // 4 + 1],
                                            0.25, True, num_splits=num_splits, window=kw["window"],
                                            alibi_slopes=kw["alibi_slopes"][h:h + 1]) for h in range(8)]
    assert plans[0][2] is True and all(p[2] is False for p in plans[1:])
    assert torch.allclose(out, torch.cat([o for o, _ in per_head], 2), atol=1e-6, rtol=0)
    assert torch.allclose(lse, torch.cat([l for _, l in per_head], 1), atol=1e-6, rtol=0)
    oracle, oracle_lse = _oracle(q, k, v, True, kw, torch.float64)  # scale 0.25 = 16 ** -0.5, the default
    base, base_lse = _oracle(q, k, v, True, kw, torch.float32)
    assert_within_rule("packed out", out, oracle, base, torch.float32, FORWARD)
    assert_within_rule("packed lse", lse, oracle_lse, base_lse, torch.float32, FORWARD)


def test_packed_rows_outside_the_sequences_are_left_alone():
    """Packed layout with a gap between sequences, a sequence without keys and one without queries: rows
    outside every sequence keep what the output held; a row with no key gets out 0 and lse -inf."""
    g = torch.Generator().manual_seed(1)
    h_q, h_kv, d = 2, 1, 16
    q = torch.randn(12, h_q, d, generator=g)
    k = torch.randn(80, h_kv, d, generator=g)
    v = torch.randn(80, h_kv, d, generator=g)
    # (q start, q len, k start, k len): rows 3..4 and 10..11 belong to no sequence
    spans = [(0, 3, 0, 40), (5, 2, 40, 0), (7, 0, 40, 10), (7, 3, 45, 35)]
    seqs = VarlenSeqs(*(torch.tensor([s[i] for s in spans], dtype=torch.int32) for i in range(4)), 3, 40, False)
    out = torch.full((12, h_q, d), 7.0)
    lse = torch.full((h_q, 12), 5.0)
    with backends.force("triton"):
        backends.select("attention", q.device, q.dtype, d, varlen=True).attention_forward(
            q, k, v, out, lse, softmax_scale=0.25, causal=True, causal_offset=None, seqs=seqs, merge=False,
            window=(-1, -1), softcap=0.0, num_splits=4)
    for r in (3, 4, 10, 11):
        assert torch.all(out[r] == 7.0) and torch.all(lse[:, r] == 5.0), r
    assert torch.all(out[5:7] == 0) and torch.all(lse[:, 5:7] == float("-inf"))
    for qs, ql, ks, kl in spans:
        if ql and kl:
            ref, ref_lse = reference.attention(q[None, qs:qs + ql].double(), k[None, ks:ks + kl].double(),
                                               v[None, ks:ks + kl].double(), 0.25, True)
            assert (out[qs:qs + ql].double() - ref[0]).abs().max() < 1e-5
            assert (lse[:, qs:qs + ql].double() - ref_lse[0]).abs().max() < 1e-5


def test_split_count_fills_the_gpu():
    sms = 132
    assert tiles.split_count(132, 1000, sms) == 1 and tiles.split_count(106, 1000, sms) == 1  # >= 80 % busy
    assert tiles.split_count(32, 7, sms) == 1  # under 2 x 4 key blocks: not worth a split
    assert tiles.split_count(32, 4096, sms) == 4  # 128 programs: 97 % of one wave
    assert tiles.split_count(8, 8, sms) == 2  # at least 4 key blocks per split
    for programs in (1, 3, 8, 20, 32, 50, 100):
        n = tiles.split_count(programs, 100000, sms)
        assert 1 <= n <= tiles.MAX_SPLITS

        def eff(m):
            return programs * m / (-(-programs * m // sms) * sms)
        assert eff(n) >= 0.85 * max(eff(m) for m in range(1, tiles.MAX_SPLITS + 1))
        assert all(eff(m) < 0.85 * max(eff(x) for x in range(1, tiles.MAX_SPLITS + 1)) for m in range(1, n))


def test_split_plan_tiles_and_counts(monkeypatch):
    """On a GPU (interpreter off): decoding-shaped launches take the 16-row decode tile and, with num_splits=0,
    the heuristic's split count; longer query sequences keep the table's tile and split only when asked;
    merging never splits;
    an explicit count is clamped to the key blocks and MAX_SPLITS."""
    monkeypatch.setattr(tri, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(tiles, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(tiles, "sm_count", lambda: 132)
    key = tiles.FwdKey(90, 128, "bf16", True, False)
    tile, n, pack = tri.split_plan(key, 1, 131072, 32, False)
    assert tile == dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3) and n == 4 and not pack
    # GQA 32/8 packs the group's 4 heads into one program: 8 programs, so 15 ranges (120 of 132 SMs)
    assert tri.split_plan(key, 1, 131072, 32, False, 0, 4) == (tile, 15, True)
    assert tri.split_plan(key, 4, 131072, 32, False, 0, 4) == (tile, 15, True)  # 4 tokens x 4 heads: 16 rows
    assert tri.split_plan(key, 5, 131072, 32, False, 0, 4) == (tile, 8, True)  # 20 rows: two row blocks
    assert tri.split_plan(key, 16, 131072, 32, False)[0]["BLOCK_M"] == 16
    assert tri.split_plan(key, 1, 131072, 32, True) == (tile, 1, False)  # merge
    assert tri.split_plan(key, 1, 131072, 32, False, 1, 4) == (tile, 1, True)
    assert tri.split_plan(key, 1, 200, 32, False, 50) == (tile, 4, False)  # 200 keys = 4 blocks of 64
    assert tri.split_plan(key, 1, 10 ** 7, 1, False, 1000)[1] == tiles.MAX_SPLITS
    assert tri.split_plan(key, 1, 0, 32, False, 8) == (tile, 1, False)  # no keys
    # prefill: the table's tile, no split, no packing
    assert tri.split_plan(key, 4096, 4096, 32, False, 0, 4) == (None, 1, False)
    # longer queries split only when asked (the combine is not worth it automatically), with the table's tile
    assert tri.split_plan(key, 128, 131072, 32, False) == (None, 1, False)
    assert tri.split_plan(key, 128, 131072, 32, False, 8) == (tiles.fwd_tile(key), 8, False)
    for d in (64, 128, 256):
        t = tiles.fwd_decode_tile(tiles.FwdKey(90, d, "bf16", True, False))
        assert t["BLOCK_M"] == 16 and tiles.fits(t, d, "bf16", 90)


@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_kvcache_num_splits(num_splits):
    """flash_attn_with_kvcache's num_splits reaches the kernel: the same result (up to rounding) for every
    count, checked against the float64 oracle, and the cache is appended the same way."""
    g = torch.Generator().manual_seed(4)
    b, s_cache, h_q, h_kv, d = 2, 96, 4, 2, 16
    q = torch.randn(b, 1, h_q, d, generator=g)
    kc, vc = (torch.randn(b, s_cache, h_kv, d, generator=g) for _ in range(2))
    k, v = (torch.randn(b, 1, h_kv, d, generator=g) for _ in range(2))
    lens = torch.tensor([60, 90], dtype=torch.int32)
    kc2, vc2 = kc.clone(), vc.clone()
    with backends.force("triton"):
        out, lse = ring_attn.flash_attn_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=lens, causal=True,
                                                     num_splits=num_splits, return_softmax_lse=True)
    for i in range(b):
        n = int(lens[i])
        kc[i, n], vc[i, n] = k[i, 0], v[i, 0]
        ref, ref_lse = reference.attention(q[i:i + 1].double(), kc[i:i + 1, :n + 1].double(),
                                           vc[i:i + 1, :n + 1].double(), None, True)
        assert (out[i:i + 1].double() - ref).abs().max() < 1e-5
        assert (lse[i:i + 1].double() - ref_lse).abs().max() < 1e-5
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)


@pytest.mark.gpu
def test_gpu_decoding_splits(monkeypatch):
    """bf16 on the GPU: one query row over 8k keys, GQA 32/8, d=128. The default (num_splits=0) splits (a spy
    sees it), and 0, 1 and 5 splits all match the float32 reference; a repeated call gives the same bits."""
    calls = []
    real = tri._forward_split
    monkeypatch.setattr(tri, "_forward_split", lambda *a, **kw: (calls.append(a[7]), real(*a, **kw))[1])
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 8192, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    ref, ref_lse = reference.attention(q.float(), k.float(), v.float(), None, True, compute_dtype=torch.float32)
    for n in (0, 1, 5):
        out, lse = attention_block_forward(q, k, v, 128 ** -0.5, True, num_splits=n)
        again, _ = attention_block_forward(q, k, v, 128 ** -0.5, True, num_splits=n)
        assert torch.equal(out, again)
        assert (out.float() - ref).abs().max().item() < 2e-2, n
        assert (lse - ref_lse).abs().max().item() < 1e-3, n
    assert len(calls) == 4 and calls[0] > 1 and calls[2:] == [5, 5]
