"""Ring attention over real gloo process groups (W = 1, 2, 3, 4), checked against the single-device op.

One process group per world size is spawned once for the whole module (tests/ring_workers.py runs every
case inside it and saves what it saw); the tests here compute the single-device references on the whole
sequence and assert. Workers use the fp32 torch reference backend; one W=2 case runs the Triton kernels
through the interpreter.
"""
import os
import subprocess
import sys

import pytest
import torch

import ring_attn
import ring_attn.backends as backends
from accuracy import BACKWARD, FORWARD, assert_within_rule, max_err
from ring_attn import reference
from ring_workers import PAD_LENGTHS, cases_for

WORLDS = (1, 2, 3, 4)
FP32_RTOL = 1e-5


@pytest.fixture
def worlds(ring_worlds):
    """{world: [results of rank 0, rank 1, ...]}: every case of every world, run once (tests/conftest.py)."""
    return ring_worlds


def _case_ids(kinds):
    return [(w, c["name"]) for w in WORLDS for c in cases_for(w) if c["kind"] in kinds]


def _result(worlds, world, name, rank=0):
    st = worlds[world][rank][name]
    assert "error" not in st, f"rank {rank} failed:\n{st['error']}"
    return st


def _rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() if ref.numel() else 0.0


def _single_device(inp, causal, dtype_out=True, backend="reference"):
    """flash_attn_func / flash_attn_varlen_func on the whole sequence (``backend``): out, lse, grads."""
    q, k, v = (inp[n].clone().requires_grad_() for n in ("q", "k", "v"))
    with backends.force(backend):
        if inp["cu"] is not None:
            cu = inp["cu"]
            m = int((cu[1:] - cu[:-1]).max())
            out, lse = ring_attn.flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=causal, return_lse=True)
        else:
            out, lse = ring_attn.flash_attn_func(q, k, v, causal=causal, return_lse=True)
        loss = (out.float() * inp["dout"].float()).sum()
        if inp["dlse"] is not None:
            loss = loss + (lse.masked_fill(torch.isinf(lse), 0) * inp["dlse"]).sum()
        loss.backward()
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def _oracle(inp, causal, compute_dtype):
    """reference.attention in ``compute_dtype`` with autograd: out, lse, grads (float64 = the oracle; the
    input dtype = plain torch in low precision, the baseline of the accuracy rule)."""
    q, k, v = (inp[n].to(compute_dtype).requires_grad_() for n in ("q", "k", "v"))
    if inp["cu"] is not None:
        cu = inp["cu"]
        starts, lens = cu[:-1], cu[1:] - cu[:-1]
        out, lse = reference.attention_varlen(q, k, v, starts, lens, starts, lens, None, causal,
                                              compute_dtype=compute_dtype)
    else:
        out, lse = reference.attention(q, k, v, None, causal, compute_dtype=compute_dtype)
    loss = (out.double() * inp["dout"].double()).sum()
    if inp["dlse"] is not None:
        loss = loss + (lse.double().masked_fill(torch.isinf(lse), 0) * inp["dlse"].double()).sum()
    loss.backward()
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


@pytest.mark.parametrize("world,name", _case_ids(("dense", "varlen", "triton")))
def test_ring_matches_single_device(worlds, world, name):
    st = _result(worlds, world, name)
    case, inp, got = st["case"], st["inputs"], st["gathered"]
    dtype = inp["q"].dtype
    assert st["local_dtypes"] == [str(dtype)] * 4 + ["torch.float32"]
    ref = _single_device(inp, case["causal"])
    for n in ("out", "lse", "dq", "dk", "dv"):
        assert got[n].shape == ref[n].shape, f"{n}: {tuple(got[n].shape)} != {tuple(ref[n].shape)}"
    # rows that see no key (only zero-length sequences here) agree exactly: lse -inf and out 0
    assert torch.equal(torch.isinf(got["lse"]), torch.isinf(ref["lse"]))
    fin = ~torch.isinf(ref["lse"])
    if dtype == torch.float32:
        for n in ("out", "dq", "dk", "dv"):
            err = _rel_err(got[n], ref[n])
            assert err <= FP32_RTOL, f"{n}: relative error {err:.2e} vs single-device flash_attn_func"
        err = _rel_err(got["lse"][fin], ref["lse"][fin])
        assert err <= FP32_RTOL, f"lse: relative error {err:.2e}"
    else:
        oracle, base = _oracle(inp, case["causal"], torch.float64), _oracle(inp, case["causal"], dtype)
        # docs/design.md rule; the absolute floor is scaled by W (W partial results are merged)
        assert_within_rule("out", got["out"], oracle["out"], base["out"], dtype, FORWARD, floor_scale=world)
        assert_within_rule("lse", got["lse"][fin], oracle["lse"][fin], base["lse"].float()[fin], dtype, FORWARD,
                           floor_scale=world)
        for n in ("dq", "dk", "dv"):
            assert_within_rule(n, got[n], oracle[n], base[n], dtype, BACKWARD, floor_scale=world)
        # and it is as close to the single-device op as that op is to the oracle
        for n in ("out", "dq", "dk", "dv"):
            ring_err = (got[n].double() - oracle[n]).abs().max().item()
            single_err = (ref[n].double() - oracle[n]).abs().max().item()
            assert ring_err <= 2 * single_err + 1e-3 * world, f"{n}: ring {ring_err:.2e} vs single {single_err:.2e}"


@pytest.mark.parametrize("world,name", _case_ids(("large_scores",)))
def test_large_scores_merge_as_precisely_as_one_pass(worlds, world, name):
    """Scores in the hundreds (|LSE| ~ 1e3, an fp32 ulp there is 1e-4) with comparable blocks on every rank:
    the ring's merged result is as close to the float64 oracle as the single-device op on the same backend.
    (An fp32 running LSE carried its rounding into the merge weights: dq 4-5x the single-device error.)"""
    st = _result(worlds, world, name)
    case, inp, got = st["case"], st["inputs"], st["gathered"]
    oracle = _oracle(inp, case["causal"], torch.float64)
    assert oracle["lse"].abs().max() > 500
    single = _single_device(inp, case["causal"], backend=case.get("backend", "reference"))
    for n in ("out", "dq", "dk", "dv"):
        ring_err, single_err = (max_err(x[n], oracle[n]) for x in (got, single))
        assert ring_err <= 1.5 * single_err + 1e-7 * oracle[n].abs().max().item(), \
            f"{n}: ring {ring_err:.2e} vs single device {single_err:.2e} (oracle max {oracle[n].abs().max():.2e})"


@pytest.mark.parametrize("world", WORLDS)
def test_backward_is_bitwise_deterministic(worlds, world):
    names = [c["name"] for c in cases_for(world) if c["kind"] == "determinism"]  # reference (and native)
    for name in names:
        for rank in range(world):
            assert _result(worlds, world, name, rank)["bitwise_equal"] is True, name


@pytest.mark.parametrize("world", WORLDS)
def test_shard_unshard_with_a_process_group(worlds, world):
    name = next(c["name"] for c in cases_for(world) if c["kind"] == "roundtrip")
    for rank in range(world):
        res = _result(worlds, world, name, rank)["roundtrip"]
        for layout, r in res.items():
            assert r["round_trip"] and r["varlen_round_trip"], (layout, r)
            assert r["positions"], f"{layout}: shard(positions) != shard_positions"
            assert r["local_len"] == 10
            assert r["varlen_cu"] == [0, 2, 8]


@pytest.mark.parametrize("world", WORLDS)
def test_invalid_inputs_raise_on_every_rank(worlds, world):
    name = next(c["name"] for c in cases_for(world) if c["kind"] == "local_errors")
    expected = {
        "odd_zigzag": ("ValueError", "even number of local tokens"),
        "q_k_tokens": ("ValueError", "same number of local tokens"),
        "layout": ("ValueError", "layout must be one of"),
        "gqa": ("ValueError", "positive multiple of k/v heads"),
        "dtype": ("TypeError", "must share a dtype"),
        # a sequence the layout cannot split is padded by shard_varlen: q must hold the padded count
        "varlen_split": ("ValueError", "but q has 3"),
        "varlen_tokens": ("ValueError", "but q has 5"),
        "cu_dtype": ("TypeError", "cu_seqlens.dtype"),
    }
    expected.update(REFUSALS)
    for rank in range(world):
        st = _result(worlds, world, name, rank)
        assert set(st["raised"]) == set(expected)
        for call, (etype, needle) in expected.items():
            got = st["raised"][call]
            assert got is not None, f"{call} did not raise"
            assert got[0] == etype and needle in got[1], (call, got)
        if world > 1:
            assert "after padding" in st["raised"]["varlen_split"][1]
        assert st["after"] == world  # the group is still in step (one rank alone with a bad argument:
        # test_mismatched_ranks_raise_on_every_rank)


REFUSALS = {  # call (tests/ring_workers.py::_refusals) -> (exception type, text the message must contain)
    "dropout": ("NotImplementedError", "dropout_p=0.1 is not supported"),
    "dropout_kw": ("NotImplementedError", "dropout_p=0.5 is not supported"),
    "old_positional_causal": ("TypeError", "dropout_p must be a float, got True"),
    "alibi_shape": ("ValueError", "alibi_slopes has shape (3,); expected (heads_q,) = (2,)"),
    "alibi_dtype": ("TypeError", "alibi_slopes must be float32"),
    "varlen_alibi_rows": ("ValueError", "expected (heads_q,) = (2,) or (n_seqs, heads_q) = (2, 2)"),
    "window_type": ("TypeError", "window_size must be a pair of ints"),
    "softcap_negative": ("ValueError", "softcap must be a finite float >= 0"),
    "softcap_inf": ("ValueError", "softcap must be a finite float >= 0 (0: off), got inf"),
    "softcap_type": ("TypeError", "ring_attn_func: softcap must be a finite float >= 0 (0: off), got '30' (str)"),
    "window_pair": ("TypeError", "window_size must be a pair of ints"),
    "causal_type": ("TypeError", "causal must be a bool, got 'yes'"),
    "deterministic_type": ("TypeError", "deterministic must be a bool"),
    "group_type": ("TypeError", "group must be a torch.distributed ProcessGroup or None, got 'world'"),
    "seqlen_range": ("ValueError", "seqlen must be the real global sequence length"),
    "seqlen_too_short": ("ValueError", "seqlen must be the real global sequence length"),
    "padded_noncausal": ("ValueError", "q is a shard that ring_attn.shard made from a sequence of "),
    "padded_noncausal_sharded_since": ("ValueError", "non-causal attention would attend to the padding. Pass seqlen="),
    "padded_noncausal_computed": ("ValueError", "were not made by ring_attn.shard (computed from shards?)"),
    "varlen_dropout": ("NotImplementedError", "dropout_p=0.5 is not supported"),
    "varlen_max_seqlen_type": ("TypeError", "max_seqlen must be an int"),
    "varlen_max_seqlen_small": ("ValueError", "max_seqlen must be >= the longest sequence"),
    "compat_zigzag_odd": ("ValueError", "local sequence 0 (cu_seqlens[0:2] = [0, 3]) has odd length 3"),
    "compat_qkv_shape": ("ValueError", "qkv must be [batch, seqlen, 3, heads, head_dim]"),
    "compat_kv_shape": ("ValueError", "kv must be [total_tokens, 2, heads, head_dim]"),
    "compat_alibi_positional": ("ValueError", "alibi_slopes has shape (3,); expected (heads_q,) = (2,)"),
    "compat_dropout": ("NotImplementedError", "dropout_p=0.1 is not supported"),
}


# ---------------------------------------------------------------------------------------------------------
# Any sequence length (shard pads, the ring masks, unshard drops), the call forms


def _check_against_oracle(what, got, inp, causal, world):
    """fp32 ring results vs the float64 oracle on the *unpadded* sequence (docs/design.md rule), and vs the
    single-device op within FP32_RTOL."""
    def fresh():  # _oracle marks fp32 inputs as requiring grad in place (.to() of the same dtype is a no-op)
        return {n: t.detach().clone() if isinstance(t, torch.Tensor) else t for n, t in inp.items()}

    oracle, base = _oracle(fresh(), causal, torch.float64), _oracle(fresh(), causal, torch.float32)
    single = _single_device(fresh(), causal)
    fin = ~torch.isinf(oracle["lse"])
    assert torch.equal(torch.isinf(got["lse"]), ~fin), f"{what}: rows without keys differ"
    assert_within_rule(f"{what} out", got["out"], oracle["out"], base["out"], torch.float32, FORWARD,
                       floor_scale=world)
    assert_within_rule(f"{what} lse", got["lse"][fin], oracle["lse"][fin], base["lse"][fin], torch.float32,
                       FORWARD, floor_scale=world)
    for n in ("dq", "dk", "dv"):
        assert_within_rule(f"{what} {n}", got[n], oracle[n], base[n], torch.float32, BACKWARD, floor_scale=world)
    for n in ("out", "dq", "dk", "dv"):
        assert _rel_err(got[n], single[n]) <= FP32_RTOL, f"{what} {n} vs single device"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("causal", [False, True])
def test_any_length_is_padded_and_masked(worlds, world, layout, causal):
    """Lengths 1, 5, 7, 13 (most of which no layout can split over W = 2..4), sharded with ring_attn.shard:
    outputs, LSE and gradients of the real tokens equal single-device attention over the unpadded sequence;
    with seqlen= the padding rows are inert (out 0, lse -inf, zero gradients, although they got dout = 1);
    causal attention needs no seqlen at all."""
    name = next(c["name"] for c in cases_for(world) if c["kind"] == "padding")
    inputs = _result(worlds, world, name, 0)["results"]
    for rank in range(world):
        st = _result(worlds, world, name, rank)
        assert st["unshard_seqlen"] is True
        for s in PAD_LENGTHS:
            for with_seqlen in ((True, False) if causal else (True,)):
                r = st["results"][(layout, causal, s, with_seqlen)]
                m = 2 * world if layout == "zigzag" else world
                assert r["local_shape"] == (2, -(-s // m) * m // world, 4, 16)
                if with_seqlen:
                    assert r["pad_rows_inert"] is True, (s, rank)
                if rank == 0:
                    _check_against_oracle(f"S={s} seqlen={with_seqlen}", r["gathered"],
                                          inputs[(layout, causal, s, with_seqlen)]["inputs"], causal, world)


@pytest.mark.parametrize("world", WORLDS)
def test_noncausal_on_a_sequence_that_really_has_the_padded_length_runs(worlds, world):
    """No false alarm: non-causal ring attention without seqlen= on the shards of a sequence of 6W tokens runs
    (and is right) although a sequence padded to the same 6W tokens was sharded after it. The opposite order,
    the padded sequence's own shards after the unpadded one, still raises (REFUSALS: padded_noncausal_*)."""
    name = next(c["name"] for c in cases_for(world) if c["kind"] == "padding")
    for rank in range(world):
        assert _result(worlds, world, name, rank)["no_false_alarm_err"] <= FP32_RTOL


def test_any_length_with_the_triton_kernels(worlds):
    """The padded pieces (per-sequence row counts below the shard length) through the Triton kernels
    (interpreter on CPU), W = 2, lengths 5 and 7, every layout, causal and not."""
    cases = [c["name"] for c in cases_for(2) if c["kind"] == "triton_padding"]
    if not cases:
        pytest.skip("Triton kernels run only with TRITON_INTERPRET=1 or on a GPU")
    for rank in range(2):
        res = _result(worlds, 2, cases[0], rank)["results"]
        assert len(res) == 3 * 2 * 3
        for (layout, causal, s, with_seqlen), r in res.items():
            if with_seqlen:
                assert r["pad_rows_inert"] is True, (layout, causal, s, rank)
            if rank == 0:
                _check_against_oracle(f"triton {layout} causal={causal} S={s} seqlen={with_seqlen}", r["gathered"],
                                      r["inputs"], causal, 2)


@pytest.mark.parametrize("world", WORLDS)
def test_varlen_any_lengths_are_padded_and_masked(worlds, world):
    name = next(c["name"] for c in cases_for(world) if c["kind"] == "padding_varlen")
    for rank in range(world):
        for (layout, causal), r in _result(worlds, world, name, rank)["results"].items():
            assert r["pad_rows_inert"] is True, (layout, causal, rank)
            if rank == 0:
                _check_against_oracle(f"varlen {layout} causal={causal}", r["gathered"], r["inputs"], causal, world)
    if world == 4:  # lengths 5, 1, 0, 7, 13 really were padded here
        assert _result(worlds, world, name, 0)["results"][("zigzag", True)]["pad_rows"] > 0


@pytest.mark.parametrize("world", WORLDS)
def test_flash_attn_call_forms(worlds, world):
    """Positional calls in flash-attn's order, keywords, return_attn_probs, (-1, 0) windows with causal, tensor
    and numpy max_seqlen: bitwise the keyword call's result, which matches the oracle."""
    name = next(c["name"] for c in cases_for(world) if c["kind"] == "call_forms")
    for rank in range(world):
        res = _result(worlds, world, name, rank)["results"]
        bad = [k for k, ok in res.items() if ok is not True]
        assert not bad, bad
        assert len(res) == 3 * 11
    st = _result(worlds, world, name, 0)
    for layout, got in st["gathered"].items():
        _check_against_oracle(f"call forms {layout}", got, st["inputs"], True, world)


@pytest.mark.parametrize("world", [w for w in WORLDS if w > 1])
def test_mismatched_ranks_raise_on_every_rank(worlds, world):
    name = next(c["name"] for c in cases_for(world) if c["kind"] == "mismatch")
    for rank in range(world):
        st = _result(worlds, world, name, rank)
        assert st["raised"] is not None, f"rank {rank} did not raise"
        etype, msg = st["raised"]
        assert etype == "ValueError" and "inconsistent inputs" in msg
        assert "rank 0: q [1, 10, 2, 16]" in msg and f"rank {world - 1}: q [1, 8, 2, 16]" in msg
        assert st["seconds"] < 10.0
        etype, msg = st["raised_alibi"]
        assert etype == "ValueError" and "inconsistent inputs" in msg
        assert f"alibi_slopes=given, seqlen={8 * world}; rank 1:" in msg, msg
        assert "alibi_slopes=None" in msg.split("rank 1:")[1], msg
        etype, msg = st["raised_llama3_slopes"]
        assert etype == "ValueError" and "different alibi_slopes values" in msg, msg
        assert f"ranks [{world - 1}] differ from rank 0, first at flat index 1 (rank 0: 0.25, rank {world - 1}: " \
               "0.375)" in msg, msg
        assert st["ok_llama3_slopes_mixed_forms"] is None, st["ok_llama3_slopes_mixed_forms"]
        for label in ("raised_alibi_values", "raised_alibi_values_varlen"):
            etype, msg = st[label]
            assert etype == "ValueError" and "different alibi_slopes values" in msg, (label, msg)
            assert f"ranks [{world - 1}] differ from rank 0, first at flat index 1 (rank 0: 0.25, rank {world - 1}: " \
                   "0.125)" in msg, msg
        assert st["after"] == world
        # one rank's own bad argument: that rank raises its error, every other rank a ValueError naming it
        for label, own in (("raised_local", "softmax_scale"), ("raised_local_varlen", "max_seqlen"),
                           ("raised_compat_varlen", "has odd length 3"), ("raised_compat_packed", "kv must be"),
                           ("raised_compat_llama3", "dropout_p=0.1"), ("raised_every", "window_size"),
                           ("raised_seen_local", "window_size")):
            etype, msg = st[label]
            if rank == 0:
                assert own in msg, (label, msg)
            else:
                assert etype == "ValueError" and "rank 0: invalid arguments (raised on that rank)" in msg, (label, msg)
            assert st[label + "_seconds"] < 10.0
        for label in ("raised_unshard_shape", "raised_unshard_varlen", "raised_unshard_layout",
                      "raised_unshard_varlen_layout"):
            etype, msg = st[label]
            assert etype == "ValueError" and "every rank must pass a shard of the same shape" in msg, (label, msg)
            assert st[label + "_seconds"] < 10.0
        for label in ("raised_unshard_layout", "raised_unshard_varlen_layout"):
            assert "rank 0: shape" in st[label][1] and "layout='contiguous'" in st[label][1], st[label]
            assert "rank 1: shape" in st[label][1] and "layout='zigzag'" in st[label][1], st[label]
        assert "rank 0: shape (1, 6, 2)" in st["raised_unshard_shape"][1]
        etype, msg = st["raised_unshard_seqlen"]
        assert ("seqlen" in msg) if rank == 0 else "rank 0: invalid arguments (raised on that rank)" in msg, msg
        assert len(st["unshard_ok"]) == 2 * world  # the group gathers normally afterwards
        etype, msg = st["raised_seen_switch"]  # two signatures every rank has seen, mixed across ranks
        assert etype == "ValueError" and "inconsistent inputs" in msg and "rank 0:" in msg, msg
        assert st["ok_every"] is None
        assert st["raised_mode"][0] == "ValueError" and "RING_ATTN_VALIDATE='sometimes'" in st["raised_mode"][1]
        for label, own in (("raised_env_RING_ATTN_VALIDATE", "RING_ATTN_VALIDATE='bogus'"),
                           ("raised_env_RING_ATTN_BACKEND", "RING_ATTN_BACKEND='bogus' is not a backend"),
                           ("raised_inf_window", "window_size must be a pair of ints")):
            assert st[label] is not None, f"rank {rank}: {label} did not raise"
            etype, msg = st[label]
            assert (own in msg) if rank == 0 else "rank 0: invalid arguments (raised on that rank)" in msg, msg
            assert st[label + "_seconds"] < 10.0, (label, st[label + "_seconds"])
        assert st["ok_huge_window"] is None, st["ok_huge_window"]


def test_peak_memory_does_not_grow_with_world_size(worlds):
    """Fixed s_local, growing W (so the global sequence grows): per-rank peak tensor memory of a causal
    zigzag fwd+bwd. W=1 is the single-device op (no ring buffers, no fp32 accumulators) and W=2 has one
    receive buffer set, so the peak settles from W=3 on; the extra over W=2 is a fixed number of shard-sized
    buffers."""
    peaks = {}
    for w in WORLDS:
        name = next(c["name"] for c in cases_for(w) if c["kind"] == "memory")
        peaks[w] = max(_result(worlds, w, name, r)["peak_bytes"] for r in range(w))
    q_bytes = _result(worlds, 1, next(c["name"] for c in cases_for(1) if c["kind"] == "memory"))["q_bytes"]
    assert 0 < peaks[1] <= peaks[2], peaks
    assert peaks[4] <= peaks[3] * 1.01, peaks
    assert peaks[4] - peaks[2] <= 4 * q_bytes, (peaks, q_bytes)  # the second receive buffers, not W-sized
    assert peaks[4] < 1.5 * peaks[2], peaks


@pytest.mark.parametrize("kind", ["subgroup", "mesh"])
def test_subgroups_of_a_larger_job(worlds, kind):
    """W=4 world split into two rings of 2 (new_group, and the "cp" dim of a ("dp", "cp") DeviceMesh),
    each ring on its own data."""
    name = next(c["name"] for c in cases_for(4) if c["kind"] == kind)
    seen = set()
    for rank in range(4):
        st = _result(worlds, 4, name, rank)
        assert len(st["global_ranks"]) == 2 and rank in st["global_ranks"]
        if st["sub_rank"] != 0:
            continue
        seen.add(tuple(st["global_ranks"]))
        inp = dict(st["inputs"], cu=None, dlse=None)
        ref = _single_device(inp, causal=True)
        for n in ("out", "dq", "dk", "dv"):
            assert _rel_err(st["gathered"][n], ref[n]) <= FP32_RTOL, (kind, st["global_ranks"], n)
    assert len(seen) == 2


# ---------------------------------------------------------------------------------------------------------
# GPU: NCCL with one rank (a one-rank group sending to itself), Triton kernels.

_NCCL_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
dist.init_process_group("nccl", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.cuda.set_device(0)
import ring_attn
from ring_attn.ring.comm import RingComm
from ring_attn.ring.attention import _Dense, _RingAttnFunction
worst = 0.0
sched = RingComm(None, torch.device("cuda"))
for layout in ("zigzag", "striped", "contiguous"):
    for dtype in (torch.bfloat16, torch.float16):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(2, 512, 8, 64, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(2, 512, 2, 64, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(2, 512, 2, 64, device="cuda", dtype=dtype, generator=g)
        do = torch.randn_like(q)
        a = [x.clone().requires_grad_() for x in (q, k, v)]
        b = [x.clone().requires_grad_() for x in (q, k, v)]
        c = [x.clone().requires_grad_() for x in (q, k, v)]
        o1 = ring_attn.ring_attn_func(*a, causal=True, layout=layout); o1.backward(do)
        o2 = ring_attn.flash_attn_func(*b, causal=True); o2.backward(do)
        # the ring schedule itself at W = 1 (ring_attn_func short-cuts to the plain op): fp32 partial outputs,
        # kernels adding into fp32 accumulators on CUDA
        o3, _ = _RingAttnFunction.apply(*c, 0.125, True, layout, sched, _Dense(512), (-1, -1), 0.0)
        o3.backward(do)
        pairs = [(o1, o2), (o3, o2)] + [(p.grad, r.grad) for p, r in zip(a, b)] + \
            [(p.grad, r.grad) for p, r in zip(c, b)]
        for x, y in pairs:
            worst = max(worst, ((x.float() - y.float()).abs().max() / y.float().abs().max()).item())
# the P2P path itself: a one-rank ring sending to itself through RingComm (comm stream + events)
comm = RingComm(None, torch.device("cuda"), loopback=True)
bufs = [torch.empty_like(q), torch.empty_like(k)]
h = comm.exchange([q.contiguous(), k.contiguous()], bufs)
comm.wait(h)
checks = [(bufs[0] * 2).sum() == (q * 2).sum(), torch.equal(bufs[1], k)]  # read on the compute stream
torch.cuda.synchronize()
# the signature check: host read at a signature's first call, the device-side comparison at the second
from ring_attn.ring.attention import _validated, validate_across_ranks
pg = dist.group.WORLD
for _ in range(2):
    validate_across_ranks("t", pg, "nccl", torch.device("cuda"), [7, 1, 2])
torch.cuda.synchronize()
seen = _validated[pg].get((7, 1, 2))
print("WORST", worst, "SELF_P2P", all(bool(c) for c in checks), "SEEN", seen is not None and seen.is_cuda)
dist.destroy_process_group()
"""


@pytest.mark.gpu
def test_nccl_single_rank_ring_on_gpu(tmp_path):
    script = tmp_path / "nccl_w1.py"
    script.write_text(_NCCL_SCRIPT)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("RING_ATTN_BACKEND", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORST")][-1].split()
    assert float(line[1]) < 1e-2, line  # same kernels, one block pair: tiny differences only
    assert line[3] == "True" and line[5] == "True"
