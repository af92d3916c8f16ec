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

import datetime
import importlib.util
import os
import time
import traceback

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
    cases.append(dict(kind="roundtrip"))
    cases.append(dict(kind="determinism", layout="zigzag", causal=True, dtype="float16", b=1, s=8 * 2 * world,
                      h_q=4, h_kv=2))
    cases.append(dict(kind="memory", s_local=256))
    cases.append(dict(kind="local_errors"))
    if NATIVE_BUILT:  # the same ring cases on the native C++ backend
        cases += [dict(c, backend="native") for c in cases if c["kind"] in ("dense", "varlen", "determinism")]
    if world >= 2:
        cases.append(dict(kind="mismatch"))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and world == 2:
        cases.append(dict(kind="triton", layout="zigzag", causal=True, dtype="float32", b=1, s=8 * world,
                          h_q=2, h_kv=1, lse_grad=False))
    if world == 4:
        cases.append(dict(kind="subgroup"))
        cases.append(dict(kind="mesh"))
    for i, c in enumerate(cases):
        c["name"] = f"w{world}-{i:02d}-{c['kind']}" + "".join(
            f"-{c[k]}" for k in ("layout", "dtype") if k in c) + ("-causal" if c.get("causal") else "") + (
            f"-h{c['h_q']}/{c['h_kv']}" if "h_q" in c else "") + (f"-{c['backend']}" if "backend" in c else "")
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
    with backends.force(pinned):
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
    """Invalid calls made identically on every rank: each must raise before any collective (so no rank waits
    for a peer), and the group must stay usable."""
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
    raised = {}
    for name, call in calls.items():
        try:
            call()
            raised[name] = None
        except Exception as e:  # noqa: BLE001 - the test inspects the type and message
            raised[name] = (type(e).__name__, str(e))
    store["raised"] = raised
    t = torch.ones(1)
    torch.distributed.all_reduce(t, group=group)
    store["after"] = t.item()


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
    os.environ["RING_ATTN_BACKEND"] = "reference"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for case in cases_for(world):
            store = {"case": case}
            t0 = time.monotonic()
            try:
                kind = case["kind"]
                if kind in ("dense", "varlen", "triton"):
                    _attention_case(case, rank, world, None, store)
                elif kind == "roundtrip":
                    _roundtrip_case(rank, world, None, store)
                elif kind == "determinism":
                    _determinism_case(case, rank, world, None, store)
                elif kind == "memory":
                    _memory_case(case, rank, world, None, store)
                elif kind == "local_errors":
                    _local_errors_case(rank, world, None, store)
                elif kind == "mismatch":
                    _mismatch_case(rank, world, None, store)
                elif kind in ("subgroup", "mesh"):
                    _subgroup_case(rank, world, None, store, mesh=kind == "mesh")
            except Exception:  # noqa: BLE001 - reported to the parent, which fails the case
                store["error"] = traceback.format_exc()
            store["wall_s"] = time.monotonic() - t0
            results[case["name"]] = store
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        # every rank is done with the group before any tears it down: without this, gloo intermittently
        # aborted ("terminate called without an active exception") in a rank whose peers had already exited
        dist.barrier()
        dist.destroy_process_group()


def run_world(world: int, outdir: str, timeout_s: float = 240.0) -> list[dict]:
    """Spawn ``world`` gloo ranks once, run every case, return each rank's results (index = rank)."""
    import torch.multiprocessing as mp

    os.makedirs(outdir, exist_ok=True)
    init_file = os.path.join(outdir, "store")
    ctx = mp.start_processes(_worker, args=(world, init_file, outdir), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"world {world}: workers did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:  # only our own children, by handle
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
