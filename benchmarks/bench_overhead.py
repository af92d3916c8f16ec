"""Host overhead per call: the Python and launch cost of one attention call, against SDPA and (where installed)
flash-attn in the same process.

At long context the GPU hides it (the host runs ahead), but a decoding step calls attention once per layer with
almost no GPU work, and short training sequences do little more: there the host time per call is the step time.
Shapes are tiny so that the GPU finishes each call faster than the host issues the next; the time per call of a
loop of calls (one synchronisation at the end) is then the host's. Cases: a 128-token forward and
forward+backward (GQA 8/2, d=64) and one decoding step over a 1024-token cache (``flash_attn_with_kvcache``).

``--stub`` (the default without a GPU) times the host path only, with ring_attn's Triton launches replaced by
no-ops (under the interpreter, which would otherwise run the kernels on the CPU); SDPA then runs its CPU math on
the same tiny tensors, so its row is an upper bound of its overhead, not a like-for-like number.

    PYTHONPATH=. python benchmarks/bench_overhead.py                  # GPU: table + CSV under $OUT
    TRITON_INTERPRET=1 python benchmarks/bench_overhead.py --stub     # CPU: ring_attn's host path alone
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` and `ring_attn` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import append_csv, environment, out_dir, print_table  # noqa: E402

_LAUNCHERS = ("fwd_autotuned_kernel", "fwd_tma_kernel", "split_combine_kernel", "delta_kernel", "bwd_dkdv_kernel",
              "bwd_dq_kernel")


class _NoLaunch:
    """Stands in for a Triton kernel in ``--stub`` mode: ``kernel[grid](...)`` and ``kernel.fn[grid](...)`` do
    nothing."""

    fn = property(lambda self: self)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_launches(on: bool = True):
    """Within: the Triton launcher's kernels are no-ops (the host path is what is timed); restored after."""
    from ring_attn.backends.triton import attention as launcher

    saved = {name: getattr(launcher, name) for name in _LAUNCHERS}
    try:
        if on:
            for name in _LAUNCHERS:
                setattr(launcher, name, _NoLaunch())
        yield
    finally:
        for name, kernel in saved.items():
            setattr(launcher, name, kernel)


def per_call_us(fn, n: int, sync) -> float:
    """Microseconds per call of ``n`` back-to-back calls (after a warm-up), synchronising once at the end."""
    for _ in range(max(10, n // 10)):
        fn()
    sync()
    best = float("inf")
    for _ in range(3):  # the best of three loops: other load on the machine only adds
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def cases(dev, dtype):
    """``[(case, impl, closure)]``: every implementation of every case that can run here."""
    import torch.nn.functional as F

    import ring_attn

    g = torch.Generator().manual_seed(0)

    def mk(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(dev, dtype).requires_grad_(grad)

    b, s, hq, hk, d = 1, 128, 8, 2, 64
    q, k, v = mk(b, s, hq, d, grad=True), mk(b, s, hk, d, grad=True), mk(b, s, hk, d, grad=True)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dout = mk(b, s, hq, d)
    q1, kc, vc = mk(b, 1, hq, d), mk(b, 1024, hk, d), mk(b, 1024, hk, d)
    lens = torch.full((b,), 1000, dtype=torch.int32, device=dev)
    q1t, kct, vct = (x.transpose(1, 2).contiguous() for x in (q1, kc[:, :1000], vc[:, :1000]))
    out = []

    def fwd_bwd(run, inputs, grad_out):
        return lambda: torch.autograd.grad(run(), inputs, grad_out)

    ours = lambda: ring_attn.flash_attn_func(q, k, v, causal=True)  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)  # noqa: E731
    out += [("fwd 1x128 8/2 d64", "ring_attn", lambda: ours().detach()),
            ("fwd 1x128 8/2 d64", "sdpa", lambda: sdpa().detach()),
            ("fwd+bwd 1x128 8/2 d64", "ring_attn", fwd_bwd(ours, (q, k, v), dout)),
            ("fwd+bwd 1x128 8/2 d64", "sdpa", fwd_bwd(sdpa, (qt, kt, vt), dout.transpose(1, 2).contiguous())),
            ("decode 1x1024 8/2 d64", "ring_attn",
             lambda: ring_attn.flash_attn_with_kvcache(q1, kc, vc, cache_seqlens=lens, causal=True)),
            ("decode 1x1024 8/2 d64", "sdpa",
             lambda: F.scaled_dot_product_attention(q1t, kct, vct, enable_gqa=True))]
    # a right-padded batch of two (HF's attention_mask), the mask reused across calls as across layers
    qp, kp, vp = mk(2, s, hq, d, grad=True), mk(2, s, hk, d, grad=True), mk(2, s, hk, d, grad=True)
    keep = torch.ones(2, s, dtype=torch.bool, device=dev)
    keep[1, s // 2:] = False
    allowed = torch.ones(s, s, dtype=torch.bool, device=dev).tril()[None, None] & keep[:, None, None, :]
    qpt, kpt, vpt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (qp, kp, vp))
    doutp = mk(2, s, hq, d)
    out += [("padded fwd+bwd 2x128 8/2 d64", "ring_attn",
             fwd_bwd(lambda: ring_attn.padded_attention(qp, kp, vp, keep, causal=True), (qp, kp, vp), doutp)),
            ("padded fwd+bwd 2x128 8/2 d64", "sdpa",
             fwd_bwd(lambda: F.scaled_dot_product_attention(qpt, kpt, vpt, attn_mask=allowed, enable_gqa=True),
                     (qpt, kpt, vpt), doutp.transpose(1, 2).contiguous()))]
    if dev.type == "cuda":
        try:
            import flash_attn

            out += [("fwd 1x128 8/2 d64", "flash-attn",
                     lambda: flash_attn.flash_attn_func(q.detach(), k.detach(), v.detach(), causal=True)),
                    ("fwd+bwd 1x128 8/2 d64", "flash-attn",
                     fwd_bwd(lambda: flash_attn.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)),
                    ("decode 1x1024 8/2 d64", "flash-attn",
                     lambda: flash_attn.flash_attn_with_kvcache(q1, kc, vc, cache_seqlens=lens, causal=True))]
        except ImportError:
            print("flash-attn is not installed: its rows are missing")
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stub", action="store_true", help="no-op Triton launches (default without a GPU)")
    ap.add_argument("--calls", type=int, default=300, help="calls per timed loop")
    ap.add_argument("--csv", default="bench_overhead.csv", help="file name under $OUT (or ./bench_out)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    stub = args.stub or dev.type == "cpu"
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"  # before ring_attn is imported: the Triton path on CPU tensors
    import ring_attn.backends as backends

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    env = environment()
    rows = []
    with backends.force("triton"), stubbed_launches(stub):
        for case, impl, fn in cases(dev, dtype):
            rows.append({"case": case, "impl": impl, "us_per_call": per_call_us(fn, args.calls, sync),
                         "mode": "stub" if stub and impl == "ring_attn" else "real", "device": env["device"]})
    print(f"host time per call (us), {env['device']}, {dtype}" + (" (ring_attn launches stubbed)" if stub else ""))
    print_table(rows, ["case", "impl", "us_per_call", "mode"])
    append_csv(out_dir() / args.csv, rows, env)
    return rows


if __name__ == "__main__":
    main()
