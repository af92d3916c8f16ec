"""CPU benchmark: the native C++ backend against torch's CPU SDPA, the plain-torch fallback, and HF eager RoPE.

Attention forward+backward (issue 10 target: 1x4096 tokens, 8/2 heads, d=64, causal, fp32): ring_attn's
``flash_attn_func`` pinned to the native backend and to the reference fallback, against
``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa=True`` and with K/V repeated to 8 heads.
RoPE forward and forward+backward (q 32 + k 8 heads x 4096 x 128, fp32): ``ring_attn.apply_rope`` (angles
in-kernel) and ``apply_rope_cos_sin`` (HF tables) on the native backend, against HF eager
``apply_rotary_pos_emb`` (transformers' llama modeling) with its cos/sin tables. Everything runs in one process
with ``--threads`` intra-op threads (default 2). Prints a table (seconds, median of ``--reps``) and appends the
rows to ``bench_cpu.csv`` under ``$OUT`` (or ./bench_out).

    PYTHONPATH=. python benchmarks/bench_cpu.py            # the issue's shapes
    PYTHONPATH=. python benchmarks/bench_cpu.py --quick    # small shapes, one rep: a smoke test
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` and `ring_attn` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import append_csv, environment, out_dir, print_table  # noqa: E402

ATTN = dict(b=1, s=4096, hq=8, hkv=2, d=64)
ROPE = dict(b=1, s=4096, hq=32, hk=8, d=128)
ATTN_QUICK = dict(b=1, s=256, hq=4, hkv=2, d=64)
ROPE_QUICK = dict(b=1, s=64, hq=4, hk=2, d=32)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes and one rep (a CPU smoke test)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op / OpenMP threads (default 2)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 3; --quick: 1)")
    p.add_argument("--skip-reference", action="store_true", help="leave out the slow plain-torch fallback")
    p.add_argument("--csv", default="bench_cpu.csv", help="file name under $OUT (or ./bench_out)")
    return p.parse_args(argv)


def _seconds(fn, reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def attention_rows(shape: dict, reps: int, skip_reference: bool) -> list[dict]:
    import ring_attn
    from ring_attn import backends

    b, s, hq, hkv, d = (shape[k] for k in ("b", "s", "hq", "hkv", "d"))
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(b, s, h, d, generator=g) for h in (hq, hkv, hkv, hq))
    flops = 4.0 * b * hq * s * s * d / 2 * 3.5  # causal fwd (2 GEMMs) + bwd (5 GEMMs), useful work only

    def ring(pin):
        def run():
            with backends.force(pin):
                qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
                out = ring_attn.flash_attn_func(qs, ks, vs, causal=True)
                torch.autograd.grad(out, (qs, ks, vs), do)
        return run

    qt, kt, vt, dot = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))
    kr, vr = (x.repeat_interleave(hq // hkv, dim=1) for x in (kt, vt))

    def sdpa(kk, vv, gqa):
        def run():
            qs, ks, vs = (x.detach().requires_grad_() for x in (qt, kk, vv))
            out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            torch.autograd.grad(out, (qs, ks, vs), dot)
        return run

    impls = []
    if backends.native_available():
        impls.append(("ring_attn native", ring("native")))
    impls += [("torch sdpa enable_gqa", sdpa(kt, vt, True)), ("torch sdpa repeated kv", sdpa(kr, vr, False))]
    if not skip_reference:
        impls.append(("ring_attn reference", ring("reference")))
    rows = []
    for name, fn in impls:
        sec = _seconds(fn, reps)
        rows.append(dict(op="attention fwd+bwd", impl=name, shape=f"{b}x{s} h{hq}/{hkv} d{d} causal fp32",
                         seconds=sec, gflops=flops / sec / 1e9))
    return rows


def rope_rows(shape: dict, reps: int) -> list[dict]:
    import ring_attn
    from ring_attn import backends, reference, rope_scaling

    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except Exception:  # transformers missing or its layout changed: report without the peer
        apply_rotary_pos_emb = None
    b, s, hq, hk, d = (shape[k] for k in ("b", "s", "hq", "hk", "d"))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(b, s, hq, d, generator=g), torch.randn(b, s, hk, d, generator=g)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    positions = torch.arange(s)
    inv_freq, _ = rope_scaling.rope_parameters("default", d, 5e5)
    cos, sin = reference.rope_table(positions[None], inv_freq)  # HF tables [1, s, d]
    q_hf, k_hf = q.transpose(1, 2), k.transpose(1, 2)  # HF's [b, h, s, d] (views: no copy)
    gq_hf, gk_hf = gq.transpose(1, 2), gk.transpose(1, 2)

    def fwd(fn, a, c):
        return lambda: fn(a, c)

    def fwd_bwd(fn, a, c, ga, gc):
        def run():
            a_, c_ = a.detach().requires_grad_(), c.detach().requires_grad_()
            qo, ko = fn(a_, c_)
            torch.autograd.grad((qo, ko), (a_, c_), (ga, gc))
        return run

    def pinned(fn, pin):
        def run(a, c):
            with backends.force(pin):
                return fn(a, c)
        return run

    impls = []
    if backends.native_available():
        impls.append(("ring_attn apply_rope native",
                      pinned(lambda a, c: ring_attn.apply_rope(a, c, positions, inv_freq), "native"), q, k, gq, gk))
        impls.append(("ring_attn apply_rope_cos_sin native",
                      pinned(lambda a, c: ring_attn.apply_rope_cos_sin(a, c, cos, sin), "native"),
                      q_hf, k_hf, gq_hf, gk_hf))
    if apply_rotary_pos_emb is not None:
        impls.append(("hf eager apply_rotary_pos_emb", lambda a, c: apply_rotary_pos_emb(a, c, cos, sin),
                      q_hf, k_hf, gq_hf, gk_hf))
    rows = []
    for name, fn, a, c, ga, gc in impls:
        for what, run in (("fwd", fwd(fn, a, c)), ("fwd+bwd", fwd_bwd(fn, a, c, ga, gc))):
            rows.append(dict(op=f"rope {what}", impl=name, shape=f"{b}x{s} q{hq}+k{hk} d{d} fp32",
                             seconds=_seconds(run, reps)))
    return rows


def _speedups(rows: list[dict]) -> None:
    """``vs_peer``: the fastest peer's time divided by this row's (peers: torch SDPA / HF eager)."""
    for op in {r["op"] for r in rows}:
        group = [r for r in rows if r["op"] == op]
        peers = [r["seconds"] for r in group if r["impl"].startswith(("torch", "hf"))]
        for r in group:
            r["vs_best_peer"] = min(peers) / r["seconds"] if peers else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = args.reps or (1 if args.quick else 3)
    rows = attention_rows(ATTN_QUICK if args.quick else ATTN, reps, args.skip_reference)
    rows += rope_rows(ROPE_QUICK if args.quick else ROPE, reps)
    _speedups(rows)
    env = environment()
    env["threads"] = args.threads
    try:
        import platform

        env["cpu"] = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name")), platform.processor())
    except OSError:
        env["cpu"] = platform.processor()
    print(f"{env['date']}  cpu: {env['cpu']}  threads: {args.threads}  torch {env['torch']}  "
          f"transformers {env['transformers']}")
    print_table(rows, ["op", "impl", "shape", "seconds", "gflops", "vs_best_peer"])
    path = append_csv(out_dir() / args.csv, rows, env)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
