"""Attention microbenchmark: ring_attn.flash_attn_func against the peers, in one process.

Peers: SDPA with the flash backend (FlashAttention-2 inside torch), SDPA with the cuDNN backend, and
FlexAttention compiled by torch.compile (Triton). Shapes are those of the peer table in benchmarks/RESULTS.md. Passes: fwd, bwd,
fwd+bwd. FLOPs: 4·b·h_q·s_q·s_k·d, ×0.5 causal; bwd = 2.5× fwd, fwd+bwd = 3.5× fwd. Times are
``triton.testing.do_bench`` medians.

    PYTHONPATH=. python benchmarks/bench_attention.py                 # GPU: table + CSV under $OUT or bench_out/
    PYTHONPATH=. python benchmarks/bench_attention.py --plot          # also a PNG (needs matplotlib)
    python benchmarks/bench_attention.py --device cpu --small         # smoke run on CPU (tests use it)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_csv, environment, out_dir, print_table, time_ms  # noqa: E402

import ring_attn  # noqa: E402

# (batch, seqlen, heads_q, heads_kv, head_dim, causal) — benchmarks/RESULTS.md, peer numbers
ANCHOR_SHAPES = [
    (1, 16384, 32, 8, 128, True),
    (1, 16384, 32, 32, 128, True),
    (1, 16384, 32, 32, 128, False),
    (4, 4096, 32, 32, 128, True),
    (1, 32768, 32, 32, 128, True),
    (4, 4096, 32, 32, 64, True),
]
SMALL_SHAPES = [(1, 64, 4, 2, 32, True), (1, 48, 2, 2, 16, False)]
PASSES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def fwd_flops(b, s, h_q, d, causal):
    return 4 * b * h_q * s * s * d * (0.5 if causal else 1.0)


def _ours(q, k, v, causal):
    return lambda: ring_attn.flash_attn_func(q, k, v, causal=causal)


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "math": SDPBackend.MATH}[backend_name]

    def make(q, k, v, causal):
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad) for x in (q, k, v))
        gqa = qt.shape[1] != kt.shape[1]

        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                                        enable_gqa=gqa)
        return run, (qt, kt, vt)
    return make


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # one compile per shape; the default limit is 8
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    compiled = torch.compile(flex_attention, dynamic=False)

    def make(q, k, v, causal):
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad) for x in (q, k, v))
        s = qt.shape[2]
        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, s, s, device=q.device) if causal else None
        gqa = qt.shape[1] != kt.shape[1]
        return (lambda: compiled(qt, kt, vt, block_mask=mask, enable_gqa=gqa)), (qt, kt, vt)
    return make


def bench_one(make, q, k, v, causal, passes, rep):
    """Median ms for each pass, or the exception text when the implementation cannot run the shape."""
    made = make(q, k, v, causal)
    fn, inputs = made if isinstance(made, tuple) else (made, (q, k, v))
    out = fn()
    dout = torch.randn_like(out)
    result = {}
    for p in passes:
        if p == "fwd":
            with torch.no_grad():
                result[p] = time_ms(fn, rep=rep)
        elif p == "bwd":
            out = fn()
            result[p] = time_ms(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True), rep=rep)
        else:
            result[p] = time_ms(lambda: torch.autograd.grad(fn(), inputs, dout), rep=rep)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke test; CPU)")
    ap.add_argument("--passes", default=",".join(PASSES), help="comma list of fwd,bwd,fwd+bwd")
    ap.add_argument("--peers", default="sdpa-flash,sdpa-cudnn,flex", help="comma list; empty for none")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    ap.add_argument("--plot", action="store_true", help="also write attention.png (needs matplotlib)")
    args = ap.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    if args.device == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # the CPU path is a smoke test; bf16 tl.dot is broken in the interpreter
    passes = [p for p in args.passes.split(",") if p]
    shapes = SMALL_SHAPES if args.small else ANCHOR_SHAPES
    impls = {"ring_attn": _ours}
    peer_makers = {"sdpa-flash": lambda: _sdpa("flash"), "sdpa-cudnn": lambda: _sdpa("cudnn"), "flex": _flex,
                   "sdpa-math": lambda: _sdpa("math")}
    for name in [p for p in args.peers.split(",") if p]:
        try:
            impls[name] = peer_makers[name]()
        except Exception as exc:  # a peer missing from this torch build is reported, not fatal
            print(f"peer {name} unavailable: {type(exc).__name__}: {exc}")

    env = environment()
    print(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['date']} | {dtype}")
    rows = []
    dest = out_dir()
    for b, s, h_q, h_kv, d, causal in shapes:
        g = torch.Generator(device=args.device).manual_seed(0)
        mk = lambda h: torch.randn(b, s, h, d, device=args.device, dtype=dtype, generator=g,  # noqa: E731
                                   requires_grad=True)
        q, k, v = mk(h_q), mk(h_kv), mk(h_kv)
        flops = fwd_flops(b, s, h_q, d, causal)
        shape_rows = []
        for name, make in impls.items():
            try:
                times = bench_one(make, q, k, v, causal, passes, args.rep)
            except Exception as exc:
                print(f"{name} on {b}x{s} {h_q}/{h_kv} d{d}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            for p, ms in times.items():
                shape_rows.append({"impl": name, "shape": f"{b}x{s} {h_q}/{h_kv} d{d}", "mask": "causal" if causal
                                   else "full", "pass": p, "ms": ms,
                                   "tflops": flops * FLOP_FACTOR[p] / (ms * 1e-3) / 1e12, "dtype": str(dtype)[6:]})
        # print and save each shape as soon as it is measured: a time limit loses only the shapes not reached
        _print_pivot(shape_rows, list(impls))
        append_csv(dest / "attention.csv", shape_rows, env)
        rows += shape_rows
        del q, k, v
        if args.device == "cuda":
            torch.cuda.empty_cache()

    print("\n# summary")
    _print_pivot(rows, list(impls))
    print(f"CSV rows appended to {dest / 'attention.csv'}")
    if args.plot:
        _plot(rows, list(impls), dest / "attention.png")
    return 0


def _print_pivot(rows, impl_names):
    table = {}
    for r in rows:
        key = (r["shape"], r["mask"], r["pass"])
        table.setdefault(key, {"shape": r["shape"], "mask": r["mask"], "pass": r["pass"]})[r["impl"]] = \
            round(r["tflops"], 1)
    print("TFLOP/s (higher is better)")
    print_table(list(table.values()), ["shape", "mask", "pass", *impl_names])


def _plot(rows, impl_names, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install 'ring-attn[bench]'); no PNG written")
        return
    keys = sorted({(r["shape"], r["mask"], r["pass"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.6), 5))
    width = 0.8 / max(1, len(impl_names))
    for i, name in enumerate(impl_names):
        vals = [next((r["tflops"] for r in rows if r["impl"] == name and (r["shape"], r["mask"], r["pass"]) == key),
                     0.0) for key in keys]
        ax.bar([x + i * width for x in range(len(keys))], vals, width, label=name)
    ax.set_xticks([x + 0.4 for x in range(len(keys))])
    ax.set_xticklabels([f"{s}\n{m} {p}" for s, m, p in keys], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("TFLOP/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
