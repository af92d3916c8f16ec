"""Ring attention benchmark: step times, transfer, exposed communication, efficiency, and a W-GPU model.

Run under torchrun (one process per GPU)::

    torchrun --nproc-per-node 8 benchmarks/bench_ring.py                  # zigzag causal, Llama-3-8B heads
    PYTHONPATH=. python benchmarks/bench_ring.py                          # one GPU: W = 1 (ring overhead)
    PYTHONPATH=. python benchmarks/bench_ring.py --device cpu --small     # CPU smoke run (gloo, reference)

For every ``s_local`` (tokens per rank) it measures, with the same inputs on every rank:

* ``single_ms``: ``flash_attn_func`` on the whole ``W · s_local`` sequence on one device (the baseline);
* ``ring_ms``: ``ring_attn_func`` on the shards (forward, and forward+backward);
* ``compute_ms``: the same ring schedule with the transfers removed (each step attends to the rank's own
  K/V with the plan of the real step), so ``exposed_ms = ring_ms − compute_ms`` is the communication the
  compute did not hide;
* ``step_ms``: one diagonal step and one off-diagonal (half-block for zigzag) step of attention;
* ``xfer_ms``: one K/V exchange (and, for backward, one fp32 dK/dV exchange) between ring neighbours
  (with W = 1 on a GPU a loopback send to itself: a device copy, not a link; not measured with gloo);
* ``efficiency = (single_ms / W) / ring_ms`` (with W = 1 its inverse − 1 is the ring's overhead over the
  plain kernel);
* a model of W-GPU efficiency from the measured off-diagonal step speed and a link bandwidth (NVLink
  ≈ 450 GB/s per direction, InfiniBand ≈ 50 GB/s): each of the W−1 off-diagonal steps costs
  ``max(step compute, transfer)``, plus the diagonal step; and the smallest ``s_local`` whose off-diagonal
  step hides its transfer.

Prints a table and appends rows to ``$OUT/bench_ring.csv`` (``./bench_out`` by default).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_csv, environment, out_dir, print_table, time_ms  # noqa: E402

LINKS = {"nvlink": 450e9, "ib": 50e9}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _NoComm:
    """A ring of ``world`` ranks with the transfers removed: the schedule's compute alone."""

    def __init__(self, rank, world):
        self.rank, self.world_size = rank, world

    def exchange(self, sends, recvs, tag=0):
        return None

    def wait(self, handle=None):
        return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _init(device_kind: str):
    backend_name = "nccl" if device_kind == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if device_kind == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend_name, timeout=datetime.timedelta(minutes=10))
    else:
        store = os.path.join(tempfile.mkdtemp(prefix="bench-ring-"), "store")
        dist.init_process_group(backend_name, init_method=f"file://{store}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def _flops(b, hq, s_q, s_k, d, causal_fraction):
    return 4 * b * hq * s_q * s_k * d * causal_fraction


def _time_single(full, args, device) -> dict:
    """Forward and forward+backward times (ms) of single-device flash_attn_func on the whole sequence."""
    import ring_attn

    qf, kf, vf, dof = (x.to(device) for x in full)
    single = {"fwd": time_ms(lambda: ring_attn.flash_attn_func(qf, kf, vf, causal=args.causal),
                             warmup=args.warmup, rep=args.rep)}
    qg, kg, vg = (x.clone().requires_grad_() for x in (qf, kf, vf))

    def single_fb():
        o = ring_attn.flash_attn_func(qg, kg, vg, causal=args.causal)
        o.backward(dof)

    single["fwdbwd"] = time_ms(single_fb, warmup=args.warmup, rep=args.rep)
    return single


def bench_one(s_local, args, rank, world, device, dtype):
    import ring_attn
    from ring_attn.ops.attention import attention_block_backward, attention_block_forward, attention_delta
    from ring_attn.ring import attention as ra
    from ring_attn.ring.comm import RingComm

    b, hq, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    s = s_local * world
    g = torch.Generator(device="cpu").manual_seed(0)
    full = [torch.randn(b, s, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv, hq)]
    q, k, v, do = (ring_attn.shard(x, 1, layout=args.layout).to(device) for x in full)
    scale = d ** -0.5
    rows = []
    comm = ra.comm_for(dist.group.WORLD, device)
    addr = ra.DenseAddress(s_local)
    nocomm = _NoComm(rank, world)

    def barrier():
        _sync(device)
        dist.barrier()

    # single device, whole sequence (every rank runs it alone on its own device; timings are per device); its
    # full-length tensors are freed when _time_single returns
    single = _time_single(full, args, device)
    del full
    barrier()

    # ring, and the same schedule without transfers
    ql, kl, vl = (x.clone().requires_grad_() for x in (q, k, v))

    def ring_fwd():
        return ring_attn.ring_attn_func(ql, kl, vl, causal=args.causal, layout=args.layout)

    def ring_fb():
        ring_fwd().backward(do)

    def compute_fwd():
        return ra.ring_forward(q, k, v, scale, args.causal, args.layout, nocomm, addr)

    out_acc, lse = compute_fwd()
    out = out_acc.to(dtype)

    def compute_fb():
        compute_fwd()
        ra.ring_backward(do, q, k, v, out, lse, None, scale, args.causal, args.layout, nocomm, addr)

    ring_fwd()  # signature check, autotune
    barrier()
    ring = {"fwd": time_ms(ring_fwd, warmup=args.warmup, rep=args.rep)}
    barrier()
    ring["fwdbwd"] = time_ms(ring_fb, warmup=args.warmup, rep=args.rep)
    barrier()
    compute = {"fwd": time_ms(compute_fwd, warmup=args.warmup, rep=args.rep)}
    compute["fwdbwd"] = time_ms(compute_fb, warmup=args.warmup, rep=args.rep)
    barrier()

    # one diagonal step and one off-diagonal step (zigzag: half block; others: full block), fwd and bwd
    off_pieces = ra.plan(args.layout, args.causal, 1, 0)  # keys from an earlier rank (zigzag: half block)
    delta = attention_delta(do, out)
    f32 = dict(dtype=torch.float32, device=device)
    dq, dk, dv = torch.zeros(q.shape, **f32), torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32)

    def run_pieces(pieces, backward):
        for p in pieces:
            qs, ks, ls = addr.q(p.q_part), addr.k(p.k_part), addr.lse(p.q_part)
            if backward:
                attention_block_backward(do[qs], q[qs], k[ks], v[ks], lse[ls], delta[ls], dq[qs], dk[ks], dv[ks],
                                         scale, p.causal, p.offset)
            else:
                attention_block_forward(q[qs], k[ks], v[ks], scale, p.causal, p.offset, out_dtype=torch.float32)

    diag = ra.plan(args.layout, args.causal, 0, 0)
    step = {}
    for name, pieces in (("diag", diag), ("off", off_pieces)):
        for bwd in (False, True):
            step[(name, bwd)] = time_ms(lambda: run_pieces(pieces, bwd), warmup=args.warmup, rep=args.rep)
    off_frac = sum((0.5 if p.q_part == "second" or p.k_part == "first" else 1.0) for p in off_pieces)
    off_flops = _flops(b, hq, s_local, s_local, d, off_frac)
    rate_fwd = off_flops / (step[("off", False)] * 1e-3)
    rate_bwd = 2.5 * off_flops / (step[("off", True)] * 1e-3)

    # transfers between ring neighbours (loopback with W = 1)
    xcomm = comm if world > 1 or device.type == "cpu" else RingComm(None, device, loopback=True)
    kv_next = (torch.empty_like(k), torch.empty_like(v))
    dkv = (torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32))
    dkv_next = (torch.empty_like(dkv[0]), torch.empty_like(dkv[1]))

    def xfer(sends, recvs):
        xcomm.wait(xcomm.exchange(list(sends), list(recvs)))

    barrier()
    if world == 1 and device.type == "cpu":  # gloo has no pair to itself: nothing to measure
        xfer_kv = xfer_dkv = float("nan")
    else:
        xfer_kv = time_ms(lambda: xfer((k, v), kv_next), warmup=args.warmup, rep=args.rep)
        barrier()
        xfer_dkv = time_ms(lambda: xfer(dkv, dkv_next), warmup=args.warmup, rep=args.rep)
    kv_bytes = 2 * k.numel() * k.element_size()
    dkv_bytes = 2 * k.numel() * 4

    for passes, key in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd")):
        eff = (single[key] / world) / ring[key]
        row = dict(layout=args.layout, causal=args.causal, world=world, s_local=s_local, seqlen=s, batch=b,
                   heads=f"{hq}/{hkv}", head_dim=d, dtype=str(dtype).replace("torch.", ""), passes=passes,
                   single_ms=single[key], ring_ms=ring[key], compute_ms=compute[key],
                   exposed_ms=max(0.0, ring[key] - compute[key]), efficiency=eff,
                   overhead_vs_plain=(ring[key] / single[key] - 1.0) if world == 1 else "",
                   step_diag_ms=step[("diag", key != "fwd")], step_off_ms=step[("off", key != "fwd")],
                   xfer_ms=xfer_kv if key == "fwd" else xfer_kv + xfer_dkv,
                   xfer_gbps=(kv_bytes if key == "fwd" else kv_bytes + dkv_bytes) /
                   ((xfer_kv if key == "fwd" else xfer_kv + xfer_dkv) * 1e-3) / 1e9)
        # model: W_model GPUs, each off-diagonal step costs max(compute, transfer)
        rate = rate_fwd if key == "fwd" else rate_bwd
        t_step = (step[("off", False)] if key == "fwd" else step[("off", False)] + step[("off", True)]) * 1e-3
        t_diag = (step[("diag", False)] if key == "fwd" else step[("diag", False)] + step[("diag", True)]) * 1e-3
        bytes_step = kv_bytes if key == "fwd" else kv_bytes + (kv_bytes + dkv_bytes)  # bwd: K/V twice + dK/dV
        wm = args.model_world
        for link, bw in LINKS.items():
            t_x = bytes_step / bw
            ring_t = t_diag + (wm - 1) * max(t_step, t_x)
            ideal = t_diag + (wm - 1) * t_step
            row[f"model_eff_{link}_w{wm}"] = ideal / ring_t
            # off-diagonal compute ∝ s_local², transfer ∝ s_local: smallest s_local with compute >= transfer
            row[f"min_s_local_{link}"] = int(s_local * t_x / t_step) + 1
        row["offdiag_tflops"] = rate / 1e12
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke run, e.g. on CPU)")
    p.add_argument("--s-local", type=int, nargs="+", default=None, help="tokens per rank (default 4096 8192 16384)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--layout", choices=("zigzag", "contiguous", "striped"), default="zigzag")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--model-world", type=int, default=8, help="W of the efficiency model (default 8)")
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--csv", default=None, help="CSV path (default $OUT/bench_ring.csv)")
    args = p.parse_args(argv)
    if args.small:
        args.s_local = args.s_local or [64, 128]
        args.heads, args.kv_heads, args.head_dim, args.batch = 4, 2, 32, 1
        args.warmup, args.rep = 2, 5
        if args.device == "cpu":
            args.dtype = "float32"
    args.s_local = args.s_local or [4096, 8192, 16384]
    if args.device == "cpu":
        os.environ.setdefault("RING_ATTN_BACKEND", "reference")
    rank, world = _init(args.device)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    try:
        rows = []
        for s_local in args.s_local:
            rows += bench_one(s_local, args, rank, world, device, dtype)
        if rank == 0:
            cols = ["layout", "world", "s_local", "passes", "single_ms", "ring_ms", "compute_ms", "exposed_ms",
                    "efficiency", "overhead_vs_plain", "step_diag_ms", "step_off_ms", "xfer_ms", "xfer_gbps",
                    "offdiag_tflops", f"model_eff_nvlink_w{args.model_world}", f"model_eff_ib_w{args.model_world}",
                    "min_s_local_nvlink", "min_s_local_ib"]
            print_table(rows, cols)
            path = append_csv(args.csv or out_dir() / "bench_ring.csv", rows, environment())
            print(f"rows appended to {path}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
