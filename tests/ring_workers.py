"""Worker side of the distributed ring tests: one gloo process group per world size runs every case.

``run_world(world, tmpdir)`` spawns ``world`` processes once; each joins a gloo group through a file store,
runs :func:`cases_for` in order (every rank runs every case, in the same order), and saves what the parent
test needs: rank 0 writes the gathered (unsharded) outputs and gradients together with the global inputs,
every rank writes its own local observations (errors raised, timings, memory peaks, determinism).
The parent (tests/test_ring.py) computes the single-device references and asserts.

Workers use the fp32 torch reference backend (``RING_ATTN_BACKEND=reference``) except the one case marked
``backend="triton"``, which runs the Triton kernels through the interpreter (``TRITON_INTERPRET=1``), and the
cases with ``backend="native"`` (every dense/varlen/determinism case again, when ``ring_attn._C`` is built),
which run the ring on the native C++ backend.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import time
import traceback
from unittest import mock

import torch

HEAD_DIM = 16
LAYOUTS = ("contiguous", "zigzag", "striped")
NATIVE_BUILT = importlib.util.find_spec("ring_attn._C") is not None


def cases_for(world: int) -> list[dict]:
    """Every case run in a ``world``-rank group (deterministic, so the parent can parametrize on it)."""
    cases = []
    for layout in LAYOUTS:
        for causal in (False, True):
            for dtype, h_q, h_kv in (("float32", 4, 4), ("float32", 4, 2), ("float16", 4, 1)):
                cases.append(dict(kind="dense", layout=layout, causal=causal, dtype=dtype, b=2,
                                  s=6 * 2 * world, h_q=h_q, h_kv=h_kv, lse_grad=(h_kv == 2)))
            cases.append(dict(kind="varlen", layout=layout, causal=causal, dtype="float32", h_q=4, h_kv=2,
                              chunks=[3, 0, 1, 2]))
    cases.append(dict(kind="varlen", layout="zigzag", causal=True, dtype="float16", h_q=4, h_kv=2,
                      chunks=[2, 1, 3]))
    if world >= 2:  # scores in the hundreds, keys on every rank near copies of rank 0's: every merge weighs
        for causal in (False, True):  # two comparable blocks, where the running LSE's rounding would show
            cases.append(dict(kind="large_scores", layout="contiguous", causal=causal, dtype="float32", b=1,
                              s=16 * world, h_q=2, h_kv=1, lse_grad=False))
    cases.append(dict(kind="roundtrip"))
    cases.append(dict(kind="determinism", layout="zigzag", causal=True, dtype="float16", b=1, s=8 * 2 * world,
                      h_q=4, h_kv=2))
    cases.append(dict(kind="memory", s_local=256))
    cases.append(dict(kind="local_errors"))
    cases.append(dict(kind="padding"))
    cases.append(dict(kind="padding_varlen"))
    cases.append(dict(kind="call_forms"))
    cases.append(dict(kind="compat"))
    cases.append(dict(kind="llama3"))
    if NATIVE_BUILT:  # the same ring cases on the native C++ backend
        cases += [dict(c, backend="native") for c in cases
                  if c["kind"] in ("dense", "varlen", "determinism", "large_scores")]
    if world >= 2:
        cases.append(dict(kind="mismatch"))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and world == 2:
        cases.append(dict(kind="triton", layout="zigzag", causal=True, dtype="float32", b=1, s=8 * world,
                          h_q=2, h_kv=1, lse_grad=False))
        cases.append(dict(kind="triton_padding"))
        # the ring's block backward on the 5-matmul kernel with ordered dQ adds (RING_ATTN_BWD=fused-ordered):
        # pieces with global offsets, fp32 accumulators, dense and packed (every counter checked exact)
        cases.append(dict(kind="dense", backend="triton", bwd="fused-ordered", layout="zigzag", causal=True,
                          dtype="float32", b=1, s=8 * world, h_q=4, h_kv=2, lse_grad=True))
        cases.append(dict(kind="varlen", backend="triton", bwd="fused-ordered", layout="striped", causal=False,
                          dtype="float32", h_q=2, h_kv=1, chunks=[3, 0, 2]))
    if world == 4:
        cases.append(dict(kind="subgroup"))
        cases.append(dict(kind="mesh"))
    for i, c in enumerate(cases):
        c["name"] = f"w{world}-{i:02d}-{c['kind']}" + "".join(
            f"-{c[k]}" for k in ("layout", "dtype") if k in c) + ("-causal" if c.get("causal") else "") + (
            f"-h{c['h_q']}/{c['h_kv']}" if "h_q" in c else "") + (f"-{c['backend']}" if "backend" in c else "") + (
            f"-{c['bwd']}" if "bwd" in c else "")
    return cases


def _inputs(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case["dtype"])
    if case["kind"] == "varlen":
        world = case["world"]
        m = 2 * world if case["layout"] == "zigzag" else world
        lens = [m * c for c in case["chunks"]]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        t = int(cu[-1])
        shapes = [(t, case["h_q"], HEAD_DIM), (t, case["h_kv"], HEAD_DIM), (t, case["h_kv"], HEAD_DIM)]
    else:
        cu = None
        b, s = case["b"], case["s"]
        shapes = [(b, s, case["h_q"], HEAD_DIM), (b, s, case["h_kv"], HEAD_DIM), (b, s, case["h_kv"], HEAD_DIM)]
    q, k, v = (torch.randn(sh, generator=g).to(dtype) for sh in shapes)
    if case["kind"] == "large_scores":  # |LSE| ~ 1e3; each rank's keys (contiguous) ~ rank 0's
        q = q * 300
        chunk = k.shape[1] // case["world"]
        k = k[:, :chunk].repeat(1, case["world"], 1, 1) + 1e-3 * k
    dout = torch.randn(shapes[0], generator=g).to(dtype)
    lse_shape = (shapes[0][1], shapes[0][0]) if cu is not None else (shapes[0][0], shapes[0][2], shapes[0][1])
    dlse = torch.randn(lse_shape, generator=g) if case.get("lse_grad") else None
    return q, k, v, dout, dlse, cu


def _run_ring(case, q, k, v, dout, dlse, cu, group, rank, world):
    """Shard the global inputs, run the ring forward+backward, return local (out, lse, dq, dk, dv)."""
    import ring_attn
    from ring_attn.ring import layout as L

    layout = case["layout"]
    if cu is not None:
        sh = lambda x: L.varlen_shard_for_rank(x, cu, rank, world, 0, layout)  # noqa: E731
        shl = lambda x: L.varlen_shard_for_rank(x, cu, rank, world, 1, layout)  # noqa: E731
    else:
        sh = lambda x: L.shard_for_rank(x, rank, world, 1, layout)  # noqa: E731
        shl = lambda x: L.shard_for_rank(x, rank, world, 2, layout)  # noqa: E731
    ql, kl, vl = (sh(x).requires_grad_() for x in (q, k, v))
    if cu is not None:
        out, lse = ring_attn.ring_attn_varlen_func(ql, kl, vl, cu, int((cu[1:] - cu[:-1]).max()),
                                                   causal=case["causal"], group=group, layout=layout,
                                                   return_lse=True)
    else:
        out, lse = ring_attn.ring_attn_func(ql, kl, vl, causal=case["causal"], group=group, layout=layout,
                                            return_lse=True)
    loss = (out.float() * sh(dout).float()).sum()
    if dlse is not None:
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0) * shl(dlse)).sum()
    loss.backward()
    return out.detach(), lse.detach(), ql.grad, kl.grad, vl.grad


def _gather(local, cu, layout, group, dim=None):
    from ring_attn.ring import layout as L

    if cu is not None:
        return L.unshard_varlen(local, cu, 0 if dim is None else dim, group, layout)
    return L.unshard(local, 1 if dim is None else dim, group, layout)


def _attention_case(case, rank, world, group, store):
    import ring_attn.backends as backends

    case = dict(case, world=world)
    q, k, v, dout, dlse, cu = _inputs(case)
    pinned = "triton" if case["kind"] == "triton" else case.get("backend", "reference")
    with contextlib.ExitStack() as stack:
        if "bwd" in case:  # the fused backward computes dQ itself: a launch of the dQ kernel is a fall-back
            from ring_attn.backends.triton import attention as triton_attention

            class NoDqKernel:
                def __getitem__(self, grid):
                    raise AssertionError(f"RING_ATTN_BWD={case['bwd']}: the separate dQ kernel was launched")
            stack.enter_context(mock.patch.dict(os.environ, {"RING_ATTN_BWD": case["bwd"]}))
            stack.enter_context(mock.patch.object(triton_attention, "bwd_dq_kernel", NoDqKernel()))
        stack.enter_context(backends.force(pinned))
        out, lse, dq, dk, dv = _run_ring(case, q, k, v, dout, dlse, cu, group, rank, world)
    packed = cu is not None
    gathered = dict(out=_gather(out, cu, case["layout"], group), lse=_gather(lse, cu, case["layout"], group,
                                                                           dim=1 if packed else 2),
                    dq=_gather(dq, cu, case["layout"], group), dk=_gather(dk, cu, case["layout"], group),
                    dv=_gather(dv, cu, case["layout"], group))
    if rank == 0:
        store.update(inputs=dict(q=q, k=k, v=v, dout=dout, dlse=dlse, cu=cu), gathered=gathered,
                     local_dtypes=[str(t.dtype) for t in (out, dq, dk, dv)] + [str(lse.dtype)])


def _roundtrip_case(rank, world, group, store):
    import ring_attn
    from ring_attn.ring import layout as L

    res = {}
    for layout in LAYOUTS:
        x = torch.randn(3, 2 * world * 5, 7, generator=torch.Generator().manual_seed(5))
        pos = torch.arange(x.shape[1])
        xl = ring_attn.shard(x, dim=1, layout=layout)
        res[layout] = dict(
            round_trip=bool(torch.equal(ring_attn.unshard(xl, dim=1, layout=layout), x)),
            positions=bool(torch.equal(ring_attn.shard(pos, dim=0, layout=layout),
                                       ring_attn.shard_positions(x.shape[1], rank, world, layout))),
            local_len=xl.shape[1])
        cu = torch.tensor([0, 2 * world, 2 * world * 4], dtype=torch.int32)
        y = torch.randn(int(cu[-1]), 3, generator=torch.Generator().manual_seed(6))
        yl = ring_attn.shard_varlen(y, cu, layout=layout)
        res[layout]["varlen_round_trip"] = bool(torch.equal(ring_attn.unshard_varlen(yl, cu, layout=layout), y))
        res[layout]["varlen_cu"] = L.varlen_local_cu_seqlens(cu, world, layout).tolist()
    store["roundtrip"] = res


def _determinism_case(case, rank, world, group, store):
    import ring_attn.backends as backends

    case = dict(case, world=world)
    q, k, v, dout, dlse, cu = _inputs(case, seed=3)
    runs = []
    with backends.force(case.get("backend", "reference")):
        for _ in range(3):
            runs.append(_run_ring(case, q, k, v, dout, dlse, cu, group, rank, world))
    store["bitwise_equal"] = all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))


def _memory_case(case, rank, world, group, store):
    """Per-rank peak of one fwd+bwd at fixed s_local (the global sequence grows with W)."""
    import ring_attn
    import ring_attn.backends as backends

    s_local, h, d = case["s_local"], 4, 32
    g = torch.Generator().manual_seed(rank)
    q, k, v, do = (torch.randn(1, s_local, h, d, generator=g) for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    def step():
        out = ring_attn.ring_attn_func(q, k, v, causal=True, group=group, layout="zigzag")
        out.backward(do)

    from ring_attn.ring.demo import PeakTensorMemory

    with backends.force("reference"):
        step()  # first call: signature check, comm setup
        with PeakTensorMemory() as mem:
            step()
    store["peak_bytes"] = mem.peak
    store["q_bytes"] = q.numel() * q.element_size()


def _local_errors_case(rank, world, group, store):
    """Invalid calls made identically on every rank: each raises its own error on every rank before any K/V
    exchange (the ranks meet only in the signature exchange), and the group stays usable."""
    import ring_attn

    def q_(s, h=2, dtype=torch.float32):
        return torch.randn(1, s, h, HEAD_DIM, dtype=dtype)

    cu_bad = torch.tensor([0, 2 * world, 2 * world + world], dtype=torch.int32)  # a sequence of length W
    cu_ok = torch.tensor([0, 2 * world, 4 * world], dtype=torch.int32)
    calls = {
        "odd_zigzag": lambda: ring_attn.ring_attn_func(q_(5), q_(5), q_(5), layout="zigzag"),
        "q_k_tokens": lambda: ring_attn.ring_attn_func(q_(4), q_(6), q_(6)),
        "layout": lambda: ring_attn.ring_attn_func(q_(4), q_(4), q_(4), layout="diagonal"),
        "gqa": lambda: ring_attn.ring_attn_func(q_(4, 3), q_(4, 2), q_(4, 2)),
        "dtype": lambda: ring_attn.ring_attn_func(q_(4), q_(4, dtype=torch.float16), q_(4)),
        "varlen_split": lambda: ring_attn.ring_attn_varlen_func(
            torch.randn(3, 2, HEAD_DIM), torch.randn(3, 2, HEAD_DIM), torch.randn(3, 2, HEAD_DIM), cu_bad, 2 * world),
        "varlen_tokens": lambda: ring_attn.ring_attn_varlen_func(
            torch.randn(5, 2, HEAD_DIM), torch.randn(5, 2, HEAD_DIM), torch.randn(5, 2, HEAD_DIM), cu_ok, 2 * world),
        "cu_dtype": lambda: ring_attn.ring_attn_varlen_func(
            torch.randn(4, 2, HEAD_DIM), torch.randn(4, 2, HEAD_DIM), torch.randn(4, 2, HEAD_DIM), cu_ok.long(),
            2 * world),
    }
    calls.update(_refusals(world))

    def attempt(call):
        try:
            call()
            return None
        except Exception as e:  # noqa: BLE001 - the test inspects the type and message
            return (type(e).__name__, str(e))

    store["raised"] = {name: attempt(call) for name, call in calls.items()}
    t = torch.ones(1)
    torch.distributed.all_reduce(t, group=group)
    store["after"] = t.item()


def _refusals(world):
    """Calls a flash-attn / ring-flash-attn user may write that must raise (name -> call)."""
    import ring_attn
    from ring_attn import compat

    def q_(s=4 * world, h=2):
        return torch.randn(1, s, h, HEAD_DIM)

    x = q_()
    cu = torch.tensor([0, 2 * world, 4 * world], dtype=torch.int32)
    p = torch.randn(3, 2, HEAD_DIM)
    pv = torch.randn(4, 2, HEAD_DIM)
    return {
        "dropout": lambda: ring_attn.ring_attn_func(x, x, x, 0.1),
        "dropout_kw": lambda: ring_attn.ring_attn_func(x, x, x, dropout_p=0.5, causal=True),
        "old_positional_causal": lambda: ring_attn.ring_attn_func(x, x, x, True),
        "alibi_shape": lambda: ring_attn.ring_attn_func(x, x, x, alibi_slopes=torch.ones(3)),
        "alibi_dtype": lambda: ring_attn.ring_attn_func(x, x, x, alibi_slopes=torch.ones(1, 2, dtype=torch.float64)),
        "varlen_alibi_rows": lambda: ring_attn.ring_attn_varlen_func(pv, pv, pv, cu, 2 * world,
                                                                     alibi_slopes=torch.ones(3, 2)),
        "window_type": lambda: ring_attn.ring_attn_func(x, x, x, window_size=5),
        "softcap_negative": lambda: ring_attn.ring_attn_func(x, x, x, softcap=-1.0),
        "softcap_inf": lambda: ring_attn.ring_attn_func(x, x, x, 0.0, None, True, (-1, -1), float("inf")),
        "softcap_type": lambda: ring_attn.ring_attn_func(x, x, x, softcap="30"),
        "window_pair": lambda: ring_attn.ring_attn_func(x, x, x, window_size=(4, 0, 1)),
        "causal_type": lambda: ring_attn.ring_attn_func(x, x, x, causal="yes"),
        "deterministic_type": lambda: ring_attn.ring_attn_func(x, x, x, deterministic="no"),
        "group_type": lambda: ring_attn.ring_attn_func(x, x, x, 0.0, None, True, (-1, -1), 0.0, None, False, False,
                                                       "world"),
        "seqlen_range": lambda: ring_attn.ring_attn_func(x, x, x, causal=True, layout="contiguous",
                                                         seqlen=4 * world + 1),
        "seqlen_too_short": lambda: ring_attn.ring_attn_func(x, x, x, layout="contiguous", seqlen=3 * world),
        "padded_noncausal": lambda: (lambda y: ring_attn.ring_attn_func(y, y, y, layout="zigzag"))(
            ring_attn.shard(torch.randn(1, 6 * world - 1, 2, HEAD_DIM), layout="zigzag")),
        # the same, after a sequence that really has 6W tokens was sharded (the old process-wide record then
        # said "not padded" and this call attended to the padding silently)
        "padded_noncausal_sharded_since": lambda: (lambda y, _: ring_attn.ring_attn_func(y, y, y, layout="zigzag"))(
            ring_attn.shard(torch.randn(1, 6 * world - 1, 2, HEAD_DIM), layout="zigzag"),
            ring_attn.shard(torch.randn(1, 6 * world, 2, HEAD_DIM), layout="zigzag")),
        # tensors computed from a padded shard carry nothing: the fallback (most recent shard to 6W tokens)
        "padded_noncausal_computed": lambda: (lambda y: ring_attn.ring_attn_func(y * 2, y * 2, y * 2, layout="zigzag"))(
            ring_attn.shard(torch.randn(1, 6 * world - 1, 2, HEAD_DIM), layout="zigzag")),
        "varlen_dropout": lambda: ring_attn.ring_attn_varlen_func(pv, pv, pv, cu, 2 * world, 0.5),
        "varlen_max_seqlen_type": lambda: ring_attn.ring_attn_varlen_func(pv, pv, pv, cu, 2.0 * world),
        "varlen_max_seqlen_small": lambda: ring_attn.ring_attn_varlen_func(pv, pv, pv, cu, 1),
        "compat_zigzag_odd": lambda: compat.zigzag_ring_flash_attn_varlen_func(
            p, p, p, torch.tensor([0, 3], dtype=torch.int32), 3),
        "compat_qkv_shape": lambda: compat.ring_flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, HEAD_DIM)),
        "compat_kv_shape": lambda: compat.zigzag_ring_flash_attn_varlen_kvpacked_func(
            pv, torch.randn(4, 3, 2, HEAD_DIM), cu // world, 2),
        # ring-flash-attn has no softcap: its 8th positional argument is alibi_slopes (checked as slopes)
        "compat_alibi_positional": lambda: compat.stripe_flash_attn_func(x, x, x, 0.0, None, True, (-1, -1),
                                                                         torch.ones(3)),
        "compat_dropout": lambda: compat.ring_flash_attn_varlen_qkvpacked_func(
            torch.randn(4, 3, 2, HEAD_DIM), cu // world, 2, 0.1),
    }


def _single_case_inputs(seed, shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(sh, generator=g).to(dtype) for sh in shapes]


PAD_LENGTHS = (1, 5, 7, 13)


def _padding_case(rank, world, group, store, triton=False):
    """Dense sequences of every length in PAD_LENGTHS, sharded with ring_attn.shard (which pads), every layout,
    causal or not; with seqlen= the padding rows get dout = 1 (they must stay inert), without it (causal only)
    the padding rows get dout = 0 as a loss that ignores them would give. ``triton``: the Triton kernels
    (interpreter) on one length."""
    import ring_attn
    import ring_attn.backends as backends

    res = {}
    with backends.force("triton" if triton else "reference"):
        for layout in LAYOUTS:
            for causal in (False, True):
                for s in (PAD_LENGTHS[1:3] if triton else PAD_LENGTHS):
                    for with_seqlen in ((True, False) if causal else (True,)):
                        q, k, v, dout = _single_case_inputs(s, [(2, s, 4, HEAD_DIM), (2, s, 2, HEAD_DIM),
                                                                (2, s, 2, HEAD_DIM), (2, s, 4, HEAD_DIM)])
                        ql, kl, vl = (ring_attn.shard(t, layout=layout).requires_grad_() for t in (q, k, v))
                        dl = ring_attn.shard(dout, layout=layout, pad_value=1.0 if with_seqlen else 0.0)
                        out, lse = ring_attn.ring_attn_func(ql, kl, vl, causal=causal, layout=layout,
                                                            seqlen=s if with_seqlen else None, return_lse=True)
                        (out * dl).sum().backward()
                        full = {n: ring_attn.unshard(t.detach(), dim=2 if n == "lse" else 1, layout=layout)
                                for n, t in (("out", out), ("lse", lse), ("dq", ql.grad), ("dk", kl.grad),
                                             ("dv", vl.grad))}
                        key = (layout, causal, s, with_seqlen)
                        entry = dict(local_shape=tuple(out.shape),
                                     gathered={n: t[:, :, :s] if n == "lse" else t[:, :s] for n, t in full.items()})
                        if with_seqlen:  # padding rows: output 0, lse -inf, no gradient
                            entry["pad_rows_inert"] = bool(
                                (full["out"][:, s:] == 0).all() and torch.isinf(full["lse"][:, :, s:]).all() and
                                all((full[n][:, s:] == 0).all() for n in ("dq", "dk", "dv")))
                        if rank == 0:
                            entry["inputs"] = dict(q=q, k=k, v=v, dout=dout, dlse=None, cu=None)
                        res[key] = entry
        # no false alarm: non-causal, no seqlen, on the shards of a sequence that really has 6W tokens, sharded
        # *before* a sequence padded to the same 6W tokens (a batch sharded ahead; the old process-wide record
        # raised here)
        g = torch.Generator().manual_seed(6)  # the same tensors on every rank
        full = torch.randn(2, 6 * world, 4, HEAD_DIM, generator=g)
        full_kv = torch.randn(2, 6 * world, 2, HEAD_DIM, generator=g)
        ql, kvl = ring_attn.shard(full, layout="zigzag"), ring_attn.shard(full_kv, layout="zigzag")
        ring_attn.shard(torch.randn(2, 6 * world - 1, 4, HEAD_DIM, generator=g), layout="zigzag")
        out = ring_attn.unshard(ring_attn.ring_attn_func(ql, kvl, kvl, layout="zigzag"), layout="zigzag")
        single = ring_attn.flash_attn_func(full, full_kv, full_kv)
        store["no_false_alarm_err"] = ((out - single).abs().max() / single.abs().max()).item()
        # unshard(seqlen=) drops the padding itself
        x = torch.randn(2, 13, 3, generator=torch.Generator().manual_seed(13))  # the same on every rank
        store["unshard_seqlen"] = all(
            torch.equal(ring_attn.unshard(ring_attn.shard(x, layout=lay), layout=lay, seqlen=13), x)
            for lay in LAYOUTS)
    store["results"] = res


def _padding_varlen_case(rank, world, group, store):
    """Packed sequences of lengths the layouts cannot split (and an empty one), sharded with shard_varlen;
    padding rows get dout = 1 and must stay inert."""
    import ring_attn
    import ring_attn.backends as backends
    from ring_attn.ring import layout as L

    lens = [5, 1, 0, 7, 13]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    res = {}
    with backends.force("reference"):
        for layout in LAYOUTS:
            for causal in (False, True):
                q, k, v, dout = _single_case_inputs(7, [(t, 4, HEAD_DIM), (t, 2, HEAD_DIM), (t, 2, HEAD_DIM),
                                                        (t, 4, HEAD_DIM)])
                ql, kl, vl = (ring_attn.shard_varlen(x, cu, layout=layout).requires_grad_() for x in (q, k, v))
                dl = ring_attn.shard_varlen(dout, cu, layout=layout, pad_value=1.0)
                out, lse = ring_attn.ring_attn_varlen_func(ql, kl, vl, cu, max(lens), causal=causal, layout=layout,
                                                           return_lse=True)
                (out * dl).sum().backward()
                pad = L.varlen_shard_for_rank(torch.ones(t), cu, rank, world, 0, layout, pad_value=0.0) == 0
                entry = dict(
                    pad_rows=int(pad.sum()),
                    pad_rows_inert=bool((out[pad] == 0).all() and torch.isinf(lse[:, pad]).all() and
                                        all((g[pad] == 0).all() for g in (ql.grad, kl.grad, vl.grad))),
                    gathered={n: ring_attn.unshard_varlen(x.detach(), cu, dim=1 if n == "lse" else 0, layout=layout)
                              for n, x in (("out", out), ("lse", lse), ("dq", ql.grad), ("dk", kl.grad),
                                           ("dv", vl.grad))})
                if rank == 0:
                    entry["inputs"] = dict(q=q, k=k, v=v, dout=dout, dlse=None, cu=cu)
                res[(layout, causal)] = entry
    store["results"] = res


def _call_forms_case(rank, world, group, store):
    """ring_attn_func / ring_attn_varlen_func called the ways flash-attn and ring-flash-attn users write them
    give bitwise the result of the keyword call (and that result is checked against the oracle)."""
    import numpy as np

    import ring_attn
    import ring_attn.backends as backends

    s = 4 * world
    q, k, v, dout = _single_case_inputs(11, [(1, s, 4, HEAD_DIM), (1, s, 2, HEAD_DIM), (1, s, 2, HEAD_DIM),
                                              (1, s, 4, HEAD_DIM)])
    res = {}
    with backends.force("reference"):
        for layout in LAYOUTS:
            ql, kl, vl, dl = (ring_attn.shard(x, layout=layout) for x in (q, k, v, dout))

            def run(fn):
                a, b, c = (x.clone().requires_grad_() for x in (ql, kl, vl))
                got = fn(a, b, c)
                o = got[0] if isinstance(got, tuple) else got
                (o * dl).sum().backward()
                return got, (a.grad, b.grad, c.grad)

            ref, ref_grads = run(lambda a, b, c: ring_attn.ring_attn_func(a, b, c, causal=True, layout=layout,
                                                                         return_lse=True))
            forms = {
                "positional_causal": lambda a, b, c: ring_attn.ring_attn_func(a, b, c, 0.0, None, True,
                                                                              layout=layout),
                "positional_all": lambda a, b, c: ring_attn.ring_attn_func(a, b, c, 0.0, None, True, (-1, -1), 0.0,
                                                                           None, False, True, None, layout=layout),
                "dropout_then_keyword": lambda a, b, c: ring_attn.ring_attn_func(a, b, c, 0.0, causal=True,
                                                                                 layout=layout),
                "flash_keywords": lambda a, b, c: ring_attn.ring_attn_func(
                    a, b, c, dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=True, return_attn_probs=True, group=None, layout=layout),
                "causal_window_right_0": lambda a, b, c: ring_attn.ring_attn_func(a, b, c, 0.0, None, True, (-1, 0),
                                                                                  layout=layout),
                "int_scale": lambda a, b, c: ring_attn.ring_attn_func(a, b, c, 0.0, HEAD_DIM ** -0.5, True,
                                                                      layout=layout),
            }
            for name, fn in forms.items():
                got, grads = run(fn)
                out = got[0] if isinstance(got, tuple) else got
                ok = torch.equal(out, ref[0]) and all(torch.equal(x, y) for x, y in zip(grads, ref_grads))
                if name in ("positional_all", "flash_keywords"):
                    ok = ok and len(got) == 3 and got[2] is None and torch.equal(got[1], ref[1])
                else:
                    ok = ok and not isinstance(got, tuple)
                res[(layout, name)] = ok
            # non-causal positional: same as keyword
            a = ring_attn.ring_attn_func(ql, kl, vl, 0.0, 0.25, False, layout=layout)
            b = ring_attn.ring_attn_func(ql, kl, vl, softmax_scale=0.25, layout=layout)
            res[(layout, "noncausal_scale")] = torch.equal(a, b)
            store.setdefault("gathered", {})[layout] = dict(
                out=ring_attn.unshard(ref[0].detach(), layout=layout),
                lse=ring_attn.unshard(ref[1].detach(), dim=2, layout=layout),
                dq=ring_attn.unshard(ref_grads[0], layout=layout), dk=ring_attn.unshard(ref_grads[1], layout=layout),
                dv=ring_attn.unshard(ref_grads[2], layout=layout))
            # varlen forms
            cu = torch.tensor([0, 2 * world, 4 * world], dtype=torch.int32)
            pq, pk, pv = (ring_attn.shard_varlen(x[0], cu, layout=layout) for x in (q, k, v))
            vref = ring_attn.ring_attn_varlen_func(pq, pk, pv, cu, 4 * world, causal=True, layout=layout)
            vforms = {
                "varlen_positional": lambda: ring_attn.ring_attn_varlen_func(pq, pk, pv, cu, 4 * world, 0.0, None,
                                                                             True, layout=layout),
                "varlen_tensor_max": lambda: ring_attn.ring_attn_varlen_func(pq, pk, pv, cu,
                                                                             torch.tensor(4 * world), 0.0, None,
                                                                             True, layout=layout),
                "varlen_numpy_max": lambda: ring_attn.ring_attn_varlen_func(pq, pk, pv, cu, np.int64(4 * world),
                                                                            causal=True, layout=layout),
                "varlen_probs": lambda: ring_attn.ring_attn_varlen_func(pq, pk, pv, cu, 4 * world, 0.0, None, True,
                                                                        return_attn_probs=True, layout=layout)[0],
            }
            for name, fn in vforms.items():
                res[(layout, name)] = torch.equal(fn(), vref)
    store["results"] = res
    if rank == 0:
        store["inputs"] = dict(q=q, k=k, v=v, dout=dout, dlse=None, cu=None)


# ring-flash-attn's own test helpers (test/test_*_func.py), ported verbatim: how its users shard inputs
def rfa_extract_local_zigzag(value, rank, world_size, dim=1):
    value_chunks = value.chunk(2 * world_size, dim=dim)
    local_value = torch.cat([value_chunks[rank], value_chunks[2 * world_size - rank - 1]], dim=dim)
    return local_value.contiguous()


def rfa_extract_local_stripe(value, rank, world_size, dim=1):
    value = torch.stack(value.split(world_size, dim=dim), dim=dim).transpose(dim, dim + 1)
    slicer = [rank if i == dim else slice(None) for i in range(len(value.shape))]
    return value[tuple(slicer)].contiguous()  # (theirs indexes with the list; torch now wants a tuple)


def rfa_extract_local_ring(value, rank, world_size, dim=1):  # test_ring_flash_attn_func.py
    return value.chunk(world_size, dim=dim)[rank].detach().clone()


def rfa_extract_local_varlen_ring(value, cu_seqlens, rank, world_size):
    local_values = []
    for i in range(len(cu_seqlens) - 1):
        start, end = cu_seqlens[i], cu_seqlens[i + 1]
        local_values.append(value[start:end].chunk(world_size, dim=0)[rank].detach().clone())
    return torch.cat(local_values, dim=0).contiguous()


def rfa_extract_local_varlen_zigzag(value, cu_seqlens, rank, world_size):
    local_values = []
    for i in range(len(cu_seqlens) - 1):
        start, end = cu_seqlens[i], cu_seqlens[i + 1]
        local_value = value[start:end].chunk(2 * world_size, dim=0)
        local_values.extend([local_value[rank].detach().clone(),
                             local_value[2 * world_size - 1 - rank].detach().clone()])
    return torch.cat(local_values, dim=0).contiguous()


COMPAT_FAMILIES = {  # family -> (our layout, dense extract_local, varlen extract_local or None)
    "ring": ("contiguous", rfa_extract_local_ring, rfa_extract_local_varlen_ring),
    "zigzag_ring": ("zigzag", rfa_extract_local_zigzag, rfa_extract_local_varlen_zigzag),
    "stripe": ("striped", rfa_extract_local_stripe, None),
}


def _compat_case(rank, world, group, store):
    """ring_attn.compat called as ring-flash-attn's own tests call it (qkvpacked, return_attn_probs=True,
    inputs sharded with their extract_local), plus the q/k/v and kv-packed forms positionally; gathered with
    ring_attn.unshard for the parent to check against the oracle."""
    import ring_attn
    import ring_attn.backends as backends
    from ring_attn import compat

    s, nheads = 6 * world, 4
    cu_list = [0, 2 * world, 6 * world, 12 * world]
    cu = torch.tensor(cu_list, dtype=torch.int32)
    qkv, dout = _single_case_inputs(21, [(1, s, 3, nheads, HEAD_DIM), (1, s, nheads, HEAD_DIM)])
    pqkv, pdout = _single_case_inputs(22, [(cu_list[-1], 3, nheads, HEAD_DIM), (cu_list[-1], nheads, HEAD_DIM)])
    res, extract_ok = {}, {}
    with backends.force("reference"):
        for family, (layout, extract, vextract) in COMPAT_FAMILIES.items():
            local_qkv = extract(qkv, rank, world).detach().clone()
            local_dout = extract(dout, rank, world)
            extract_ok[family] = torch.equal(local_qkv, ring_attn.shard(qkv, layout=layout))
            for causal in (False, True):
                # their test's call: qkvpacked, keywords, return_attn_probs=True
                fn = getattr(compat, f"{family}_flash_attn_qkvpacked_func" if family != "stripe"
                             else "stripe_flash_attn_qkvpacked_func")
                a = local_qkv.clone().requires_grad_()
                out, lse, none = fn(a, dropout_p=0, causal=causal, window_size=(-1, -1), alibi_slopes=None,
                                    deterministic=False, return_attn_probs=True)
                out.backward(local_dout)
                # q, k, v positionally, and kv-packed
                base = f"{family}_flash_attn" if family != "stripe" else "stripe_flash_attn"
                b = [local_qkv[:, :, i].clone().requires_grad_() for i in range(3)]
                out2 = getattr(compat, f"{base}_func")(b[0], b[1], b[2], 0.0, None, causal)
                out2.backward(local_dout)
                if not causal:
                    # an unrelated sequence ring_attn.shard padded to this size (another batch's labels): the
                    # dense forms still take every token as real, as ring-flash-attn's (they refused, advising a
                    # seqlen= they do not take), and give the same bits
                    ring_attn.shard(torch.zeros(1, s - 1), dim=1, layout=layout)
                    again = getattr(compat, f"{base}_func")(b[0].detach(), b[1].detach(), b[2].detach(), 0.0, None,
                                                            causal)
                    res[("after_unrelated_shard", family)] = torch.equal(again, out2)
                    ring_attn.shard(torch.zeros(1, s), dim=1, layout=layout)  # the record: unpadded again
                c = [local_qkv[:, :, 0].clone().requires_grad_(), local_qkv[:, :, 1:].clone().requires_grad_()]
                out3 = getattr(compat, f"{base}_kvpacked_func")(c[0], c[1], 0.0, None, causal, (-1, -1), None,
                                                                False, False, None)
                out3.backward(local_dout)
                same = torch.equal(out2, out) and torch.equal(out3, out) and torch.equal(
                    torch.stack([x.grad for x in b], 2), a.grad) and torch.equal(
                    torch.cat([c[0].grad[:, :, None], c[1].grad], 2), a.grad)
                res[("dense", family, causal)] = dict(
                    none=none is None, same_across_forms=same,
                    gathered=dict(out=ring_attn.unshard(out.detach(), layout=layout),
                                  lse=ring_attn.unshard(lse.detach(), dim=2, layout=layout),
                                  dqkv=ring_attn.unshard(a.grad, layout=layout)))
            if vextract is None:
                continue
            local_pqkv = vextract(pqkv, cu_list, rank, world).detach().clone()
            local_pdout = vextract(pdout, cu_list, rank, world)
            extract_ok[family + "_varlen"] = torch.equal(local_pqkv, ring_attn.shard_varlen(pqkv, cu, layout=layout))
            local_cu = cu // world
            local_max = int((cu[1:] - cu[:-1]).max()) // world
            for causal in (False, True):
                a = local_pqkv.clone().requires_grad_()
                out, lse, none = getattr(compat, f"{family}_flash_attn_varlen_qkvpacked_func")(
                    a, local_cu, local_max, dropout_p=0, causal=causal, window_size=(-1, -1), alibi_slopes=None,
                    deterministic=False, return_attn_probs=True)
                out.backward(local_pdout)
                b = [local_pqkv[:, i].clone().requires_grad_() for i in range(3)]
                out2 = getattr(compat, f"{family}_flash_attn_varlen_func")(b[0], b[1], b[2], local_cu, local_max,
                                                                             0.0, None, causal)
                out2.backward(local_pdout)
                c = [local_pqkv[:, 0].clone().requires_grad_(), local_pqkv[:, 1:].clone().requires_grad_()]
                out3 = getattr(compat, f"{family}_flash_attn_varlen_kvpacked_func")(c[0], c[1], local_cu, local_max,
                                                                                      causal=causal)
                out3.backward(local_pdout)
                same = torch.equal(out2, out) and torch.equal(out3, out) and torch.equal(
                    torch.stack([x.grad for x in b], 1), a.grad) and torch.equal(
                    torch.cat([c[0].grad[:, None], c[1].grad], 1), a.grad)
                res[("varlen", family, causal)] = dict(
                    none=none is None, same_across_forms=same,
                    gathered=dict(out=ring_attn.unshard_varlen(out.detach(), cu, layout=layout),
                                  lse=ring_attn.unshard_varlen(lse.detach(), cu, dim=1, layout=layout),
                                  dqkv=ring_attn.unshard_varlen(a.grad, cu, layout=layout)))
    store["results"] = res
    store["extract_local_matches_shard"] = extract_ok
    if rank == 0:
        store["inputs"] = dict(qkv=qkv, dout=dout, pqkv=pqkv, pdout=pdout, cu=cu)


# packed sequences for the all-gather (llama3) case: an empty one, and sequences crossing the cuts between ranks
LLAMA3_CU = [0, 5, 5, 17, 30, 36]
LLAMA3_CONFIGS = [dict(causal=True, stride=1), dict(causal=True, stride=2), dict(causal=False, stride=1),
                  dict(causal=False, stride=2), dict(causal=True, stride=1, window=(3, 0)),
                  dict(causal=True, stride=2, alibi=True), dict(causal=True, stride=1, window=(4, 0), softcap=1.5)]


def _llama3_case(rank, world, group, store):
    """ring_attn.compat.llama3_flash_attn_*: each rank's contiguous piece of a packed batch of 36 * W / 3
    tokens (W = 4: 48), every config of LLAMA3_CONFIGS; the pieces go to the parent, which checks the whole
    against the oracle. Also: the three call forms agree bitwise, two runs agree bitwise, and a rank with a bad
    argument makes every rank raise (no hang)."""
    import functools

    import ring_attn.backends as backends
    from ring_attn import compat
    from ring_attn.ring.allgather import allgather_attn_varlen_func

    scale = 4 if world == 4 else 3
    cu = torch.tensor([c * scale // 3 for c in LLAMA3_CU[:-1]] + [12 * scale], dtype=torch.int32)
    total, hq, hkv = int(cu[-1]), 4, 2
    q, k, v, dout = _single_case_inputs(31, [(total, hq, HEAD_DIM), (total, hkv, HEAD_DIM), (total, hkv, HEAD_DIM),
                                            (total, hq, HEAD_DIM)])
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    n = total // world
    mine = slice(rank * n, (rank + 1) * n)
    res = {}

    def run(cfg, form="qkv"):
        cq, ck, mq, mk, ks = compat.llama3_flash_attn_prepare_cu_seqlens(cu, cfg["causal"], rank, world)
        lq, lk, lv = (x[mine].detach().clone().requires_grad_() for x in (q, k, v))
        kw = dict(causal=cfg["causal"], window_size=cfg.get("window", (-1, -1)),
                  alibi_slopes=slopes if cfg.get("alibi") else None, return_attn_probs=True)
        if cfg.get("softcap"):  # a keyword beyond ring-flash-attn's signature: ring_attn.ring.allgather's own
            fn = functools.partial(allgather_attn_varlen_func, softcap=cfg["softcap"])
        else:
            fn = compat.llama3_flash_attn_varlen_func
        out, lse, none = fn(lq, lk, lv, cq, ck, mq, mk, cfg["stride"], ks, **kw)
        out.backward(dout[mine])
        return dict(out=out.detach(), lse=lse.detach(), dq=lq.grad, dk=lk.grad, dv=lv.grad, none=none is None)

    with backends.force("reference"):
        for i, cfg in enumerate(LLAMA3_CONFIGS):
            res[i] = run(cfg)
        # the packed forms, positionally, and a second run: bitwise the same
        cq, ck, mq, mk, ks = compat.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world)
        qkv = torch.stack([q[mine], k[mine].repeat(1, 2, 1), v[mine].repeat(1, 2, 1)], 1).requires_grad_()
        out_p = compat.llama3_flash_attn_varlen_qkvpacked_func(qkv, cq, ck, mq, mk, 2, ks, 0.0, None, True)
        kv = torch.stack([k[mine], v[mine]], 1).requires_grad_()
        out_kv = compat.llama3_flash_attn_varlen_kvpacked_func(q[mine], kv, cq, ck, mq, mk, 1, ks, 0.0, None, True)
        lq, lk, lv = (x[mine] for x in (q, k, v))
        out_plain = compat.llama3_flash_attn_varlen_func(lq, lk, lv, cq, ck, mq, mk, 1, ks, 0.0, None, True)
        rerun = run(LLAMA3_CONFIGS[0])
        out_rep = compat.llama3_flash_attn_varlen_func(lq, qkv[:, 1], qkv[:, 2], cq, ck, mq, mk, 2, ks, 0.0, None,
                                                       True)
        store["forms_agree"] = dict(kvpacked=torch.equal(out_kv, out_plain), qkvpacked=torch.equal(out_p, out_rep),
                                    rerun=torch.equal(rerun["out"], res[0]["out"]) and all(
                                        torch.equal(rerun[g], res[0][g]) for g in ("dq", "dk", "dv")))
        # rank 0 passes a heads_k_stride that does not divide the K/V heads (and a local token count seen nowhere
        # before, so no rank has this call's shapes validated): every rank raises, none waits in a collective
        t0 = time.monotonic()
        short = slice(rank * (n - 1), (rank + 1) * (n - 1))
        cu_short = torch.tensor([0, (n - 1) * world], dtype=torch.int32)
        cq, ck, mq, mk, ks = compat.llama3_flash_attn_prepare_cu_seqlens(cu_short, True, rank, world)
        try:
            compat.llama3_flash_attn_varlen_func(q[short], k[short], v[short], cq, ck, mq, mk, 3 if rank == 0 else 1,
                                                 ks, causal=True)
            store["raised"] = None
        except Exception as e:  # noqa: BLE001 - the test inspects the type and message
            store["raised"] = (type(e).__name__, str(e))
        store["raise_seconds"] = time.monotonic() - t0
    store["results"] = res
    if rank == 0:
        store["inputs"] = dict(q=q, k=k, v=v, dout=dout, cu=cu, slopes=slopes)


def _mismatch_case(rank, world, group, store):
    import ring_attn
    import ring_attn.backends as backends

    s_local = 8 + (2 if rank == 0 else 0)  # rank 0 holds a different shard length
    q, k, v = (torch.randn(1, s_local, 2, HEAD_DIM) for _ in range(3))
    t0 = time.monotonic()
    try:
        with backends.force("reference"):
            ring_attn.ring_attn_func(q, k, v, causal=True, group=group)
        store["raised"] = None
    except Exception as e:  # noqa: BLE001 - the test inspects the type and message
        store["raised"] = (type(e).__name__, str(e))
    store["seconds"] = time.monotonic() - t0
    q, k, v = (torch.randn(1, 8, 2, HEAD_DIM) for _ in range(3))

    def attempt(label, fn):
        t1 = time.monotonic()
        try:
            with backends.force("reference"):
                fn()
            store[label] = None
        except Exception as e:  # noqa: BLE001 - the test inspects the type and message
            store[label] = (type(e).__name__, str(e))
        store[label + "_seconds"] = time.monotonic() - t1

    # same shapes everywhere, ALiBi slopes on rank 0 only: the signature carries "ALiBi or none"
    attempt("raised_alibi", lambda: ring_attn.ring_attn_func(q, k, v, causal=True, group=group,
                                                             alibi_slopes=torch.ones(2) if rank == 0 else None))
    # ALiBi on every rank, but different values on the last rank: the slopes themselves are compared (before
    # 2026-12-07 only "given or None" was, and each rank scored its queries with its own slopes, silently)
    slopes = torch.tensor([0.5, 0.25]) if rank < world - 1 else torch.tensor([0.5, 0.125])
    attempt("raised_alibi_values", lambda: ring_attn.ring_attn_func(q, k, v, causal=True, group=group,
                                                                    alibi_slopes=slopes))
    attempt("raised_alibi_values_varlen", lambda: ring_attn.ring_attn_varlen_func(
        q[0], k[0], v[0], torch.tensor([0, 8 * world], dtype=torch.int32), 8 * world, causal=True, group=group,
        alibi_slopes=slopes))
    with backends.force("reference"):  # equal slopes given in different forms ([h] and [b, h]) are the same
        ring_attn.ring_attn_func(q, k, v, causal=True, group=group,
                                 alibi_slopes=torch.tensor([0.5, 0.25]) if rank else torch.tensor([[0.5, 0.25]]))

    # rank 0 alone passes an argument its own checks refuse (shapes no rank has seen): it raises its error, the
    # others learn it failed in the signature exchange and raise too, none waits for it
    q, k, v = (torch.randn(1, 6, 2, HEAD_DIM) for _ in range(3))
    attempt("raised_local", lambda: ring_attn.ring_attn_func(
        q, k, v, causal=True, group=group, softmax_scale=float("nan") if rank == 0 else None))
    cu = torch.tensor([0, 4 * world, 8 * world], dtype=torch.int32)
    qp, kp, vp = (torch.randn(8, 2, HEAD_DIM) for _ in range(3))
    attempt("raised_local_varlen", lambda: ring_attn.ring_attn_varlen_func(
        qp, kp, vp, cu, 4 * world if rank else 1, causal=True, group=group))  # max_seqlen too small on rank 0
    # compat's own checks (ring-flash-attn's local cu_seqlens, packed kv) and llama3's run before the ring call's:
    # one bad rank still raises on every rank instead of leaving the others in the signature exchange
    from ring_attn import compat

    qz, kz, vz = (torch.randn(8, 2, HEAD_DIM) for _ in range(3))
    cu_local = torch.tensor([0, 3, 8] if rank == 0 else [0, 4, 8], dtype=torch.int32)  # odd length on rank 0
    attempt("raised_compat_varlen", lambda: compat.zigzag_ring_flash_attn_varlen_func(
        qz, kz, vz, cu_local, 4, causal=True, group=group))
    qd, kv = torch.randn(1, 12, 2, HEAD_DIM), torch.randn(1, 12, 3 if rank == 0 else 2, 2, HEAD_DIM)
    attempt("raised_compat_packed", lambda: compat.zigzag_ring_flash_attn_kvpacked_func(qd, kv, causal=True,
                                                                                        group=group))
    cq, ck, mq, mk, ks = compat.llama3_flash_attn_prepare_cu_seqlens(
        torch.tensor([0, 5, 8 * world], dtype=torch.int32), True, rank, world)
    attempt("raised_compat_llama3", lambda: compat.llama3_flash_attn_varlen_func(
        qz, kz, vz, cq, ck, mq, mk, 1, ks, 0.1 if rank == 0 else 0.0, None, True, group=group))
    # the all-gather form's per-head slopes ([h_q]) are compared too; its per-local-sequence form is each rank's own
    attempt("raised_llama3_slopes", lambda: compat.llama3_flash_attn_varlen_func(
        qz, kz, vz, cq, ck, mq, mk, 1, ks, 0.0, None, True, alibi_slopes=torch.tensor(
            [0.5, 0.25] if rank < world - 1 else [0.5, 0.375])))
    rows = cq.numel() - 1
    attempt("ok_llama3_slopes_mixed_forms", lambda: compat.llama3_flash_attn_varlen_func(
        qz, kz, vz, cq, ck, mq, mk, 1, ks, 0.0, None, True, alibi_slopes=torch.tensor([0.5, 0.25]) if rank == 0
        else torch.rand(rows, 2)))
    # unshard / unshard_varlen: shards of different shapes, one rank's bad seqlen, different cu_seqlens raise on
    # every rank (a small signature gather first) instead of hanging or aborting in the data gather
    attempt("raised_unshard_shape", lambda: ring_attn.unshard(torch.randn(1, 6 if rank == 0 else 4, 2), 1, group))
    attempt("raised_unshard_seqlen", lambda: ring_attn.unshard(torch.randn(1, 4, 2), 1, group,
                                                                seqlen=1 if rank == 0 else 4 * world))
    from ring_attn.ring.layout import unshard_varlen

    cu_u = [0, 2 * world, 6 * world] if rank == 0 else [0, 4 * world, 6 * world]
    attempt("raised_unshard_varlen", lambda: unshard_varlen(torch.randn(6, 2), torch.tensor(cu_u), 0, group))
    # the same shards, another layout on rank 0: the gathered order would be wrong there, silently (before
    # 2026-12-08 the layout was not compared; unshard_varlen raised on some ranks only)
    other = "contiguous" if rank == 0 else "zigzag"
    attempt("raised_unshard_layout", lambda: ring_attn.unshard(torch.randn(1, 4, 2), 1, group, layout=other))
    cu_l = torch.tensor([0, 2 * world, 6 * world])
    attempt("raised_unshard_varlen_layout", lambda: unshard_varlen(torch.randn(6, 2), cu_l, 0, group, layout=other))
    store["unshard_ok"] = ring_attn.unshard(torch.full((1, 2, 1), float(rank)), 1, group).flatten().tolist()
    # a signature every rank has validated, then rank 0 alone goes bad: every call is compared (on gloo on the
    # host, under the default mode too), so this raises everywhere (before 2026-12-07 the default skipped seen
    # signatures: the bad argument waited for the group's timeout, and a switch between two seen signatures ran
    # silently with mismatched masks)
    with backends.force("reference"):
        ring_attn.ring_attn_func(q, k, v, causal=True, group=group)
        ring_attn.ring_attn_func(q, k, v, causal=False, group=group, seqlen=6 * world)
    attempt("raised_seen_local", lambda: ring_attn.ring_attn_func(
        q, k, v, causal=True, group=group, window_size=(-1, -1) if rank else (1, 2, 3)))
    attempt("raised_seen_switch", lambda: ring_attn.ring_attn_func(q, k, v, causal=rank != 0, group=group,
                                                                   seqlen=6 * world))
    os.environ["RING_ATTN_VALIDATE"] = "every"
    try:
        attempt("raised_every", lambda: ring_attn.ring_attn_func(
            q, k, v, causal=True, group=group, window_size=(-1, -1) if rank else (1, 2, 3)))
        attempt("ok_every", lambda: ring_attn.ring_attn_func(q, k, v, causal=True, group=group))
        os.environ["RING_ATTN_VALIDATE"] = "sometimes"
        attempt("raised_mode", lambda: ring_attn.ring_attn_func(q, k, v, causal=True, group=group))
    finally:
        os.environ.pop("RING_ATTN_VALIDATE", None)
    # one rank's malformed switch (its own environment), or an infinite window: that rank raises its error, the
    # others a ValueError naming it, at once (before 2026-12-08 the others waited for it until the group timeout:
    # RING_ATTN_VALIDATE / RING_ATTN_BACKEND were read only inside the exchange or the ring, and window_size=inf
    # raised an OverflowError the checks did not catch)
    for var in ("RING_ATTN_VALIDATE", "RING_ATTN_BACKEND"):
        t1 = time.monotonic()
        try:  # (not attempt(): its force() pin would hide the environment's)
            with mock.patch.dict(os.environ, {var: "bogus"} if rank == 0 else {}):
                ring_attn.ring_attn_func(q, k, v, causal=True, group=group)
            store[f"raised_env_{var}"] = None
        except Exception as e:  # noqa: BLE001 - the test inspects the type and message
            store[f"raised_env_{var}"] = (type(e).__name__, str(e))
        store[f"raised_env_{var}_seconds"] = time.monotonic() - t1
    attempt("raised_inf_window", lambda: ring_attn.ring_attn_func(
        q, k, v, causal=True, group=group, window_size=(float("inf") if rank == 0 else -1, -1)))
    # a window wider than any sequence (past int64 too) is unbounded, on one rank as on all
    attempt("ok_huge_window", lambda: ring_attn.ring_attn_func(
        q, k, v, causal=True, group=group, window_size=(2**70 if rank == 0 else -1, -1)))
    # the group is still usable afterwards: one more collective succeeds
    t = torch.ones(1)
    torch.distributed.all_reduce(t, group=group)
    store["after"] = t.item()


def _subgroup_case(rank, world, group, store, mesh: bool):
    import torch.distributed as dist

    if mesh:
        from torch.distributed.device_mesh import init_device_mesh

        dm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
        sub = dm["cp"].get_group()
    else:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        sub = groups[rank // 2]
    sub_rank, sub_world = dist.get_rank(sub), dist.get_world_size(sub)
    data_id = dist.get_rank() // 2 if not mesh else dist.get_process_group_ranks(sub)[0]
    case = dict(kind="dense", layout="zigzag", causal=True, dtype="float32", b=1, s=24, h_q=4, h_kv=2,
                lse_grad=False, world=sub_world)
    q, k, v, dout, dlse, cu = _inputs(case, seed=10 + data_id)
    import ring_attn.backends as backends

    with backends.force("reference"):
        out, lse, dq, dk, dv = _run_ring(case, q, k, v, dout, dlse, cu, sub, sub_rank, sub_world)
    gathered = {n: _gather(t, None, "zigzag", sub) for n, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv))}
    store.update(global_ranks=dist.get_process_group_ranks(sub), sub_rank=sub_rank, seed=10 + data_id,
                 inputs=dict(q=q, k=k, v=v, dout=dout), gathered=gathered)


def _worker(rank, world, init_file, outdir):
    from spawn_world import worker_group

    with worker_group(rank, world, init_file, outdir) as results:
        for case in cases_for(world):
            store = {"case": case}
            t0 = time.monotonic()
            try:
                kind = case["kind"]
                if kind in ("dense", "varlen", "triton", "large_scores"):
                    _attention_case(case, rank, world, None, store)
                elif kind == "roundtrip":
                    _roundtrip_case(rank, world, None, store)
                elif kind == "determinism":
                    _determinism_case(case, rank, world, None, store)
                elif kind == "memory":
                    _memory_case(case, rank, world, None, store)
                elif kind == "local_errors":
                    _local_errors_case(rank, world, None, store)
                elif kind == "padding":
                    _padding_case(rank, world, None, store)
                elif kind == "triton_padding":
                    _padding_case(rank, world, None, store, triton=True)
                elif kind == "padding_varlen":
                    _padding_varlen_case(rank, world, None, store)
                elif kind == "call_forms":
                    _call_forms_case(rank, world, None, store)
                elif kind == "compat":
                    _compat_case(rank, world, None, store)
                elif kind == "llama3":
                    _llama3_case(rank, world, None, store)
                elif kind == "mismatch":
                    _mismatch_case(rank, world, None, store)
                elif kind in ("subgroup", "mesh"):
                    _subgroup_case(rank, world, None, store, mesh=kind == "mesh")
            except Exception:  # noqa: BLE001 - reported to the parent, which fails the case
                store["error"] = traceback.format_exc()
            store["wall_s"] = time.monotonic() - t0
            results[case["name"]] = store


def run_world(world: int, outdir: str, timeout_s: float = 240.0) -> list[dict]:
    """Spawn ``world`` gloo ranks once, run every case, return each rank's results (index = rank)."""
    from spawn_world import run_world as spawn

    return spawn(_worker, world, outdir, timeout_s)
