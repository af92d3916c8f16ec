"""Decoding benchmark: ring_attn.flash_attn_with_kvcache (one new token per row over a filled KV cache) against
SDPA and, where installed, flash-attn's own flash_attn_with_kvcache, in one process.

Decoding reads the whole cache once per token and does little math, so every implementation is reported as
a share of the device-to-device copy bandwidth measured in the same run: ``bytes = K + V of the filled rows``
(the query, output and LSE are noise). ``ring_attn`` is the default (split-KV chosen by the kernels,
``num_splits=0``); ``ring_attn_nosplit`` forces one pass over the keys (``num_splits=1``): the difference is
what split-KV is worth at that shape. ``ring_attn_paged`` / ``ring_attn_paged16`` read the same cache from
shuffled pages of 256 / 16 rows through a ``block_table`` (flash-attn's paged KV; 256: one table entry per key
block, 16: rows gathered), and ``flash_attn_paged`` is flash-attn's with pages of 256 rows where installed.
SDPA gets the cache as contiguous ``[b, h, s, d]`` tensors of exactly the filled length (its best case: no copy
timed). Outputs are checked against a float32 reference first.

    PYTHONPATH=. python benchmarks/bench_decode.py                    # GPU: table + CSV under $OUT
    python benchmarks/bench_decode.py --device cpu --small            # smoke run anywhere (tests use it)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` and `ring_attn` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DTYPES, append_csv, environment, out_dir, print_table, time_ms  # noqa: E402

# (batch, filled cache length, heads_q, heads_kv, head_dim): Llama-3-8B's attention at long context, and a
# batch of shorter rows (enough programs without splitting: the decode tile alone)
FULL_SHAPES = [(1, 131072, 32, 8, 128), (4, 32768, 32, 8, 128), (32, 4096, 32, 8, 128)]
SMALL_SHAPES = [(1, 48, 4, 2, 16), (2, 32, 2, 2, 16)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help=f"tiny shapes {SMALL_SHAPES} for a smoke run")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    p.add_argument("--csv", default="bench_decode.csv", help="file name under $OUT (or ./bench_out)")
    return p.parse_args(argv)


def paginate(kc, vc, page, g):
    """The cache ``[b, s, h, d]`` as shuffled pages ``[b·s/page, page, h, d]`` and the int32 table
    ``[b, s/page]`` that lists each row's pages in order."""
    b, s = kc.shape[:2]
    n = b * (s // page)
    table = torch.randperm(n, generator=g).to(torch.int32).reshape(b, s // page)
    kp = torch.empty((n, page) + tuple(kc.shape[2:]), dtype=kc.dtype, device=kc.device)
    vp = torch.empty_like(kp)
    flat = table.flatten().long().to(kc.device)
    kp[flat] = kc.reshape(n, page, *kc.shape[2:])
    vp[flat] = vc.reshape(n, page, *vc.shape[2:])
    return kp, vp, table.to(kc.device)


def build(b, s, hq, hk, d, dev, dtype):
    """``name -> closure`` for every implementation at one shape, the copy of the same bytes, the reference
    output and what was skipped (with why)."""
    import ring_attn
    from ring_attn import reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, 1, hq, d, generator=g).to(dev, dtype)
    kc = torch.randn(b, s, hk, d, generator=g).to(dev, dtype)
    vc = torch.randn(b, s, hk, d, generator=g).to(dev, dtype)
    lens = torch.full((b,), s, dtype=torch.int32, device=dev)
    impls, skipped = {}, {}
    impls["ring_attn"] = lambda: ring_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True)
    impls["ring_attn_nosplit"] = lambda: ring_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens,
                                                                           causal=True, num_splits=1)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, kc, vc))

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=hq != hk).transpose(1, 2)

    impls["sdpa"] = sdpa
    paged = {page: paginate(kc, vc, page, g) for page in (256, 16) if s % page == 0}
    for page, (kp, vp, table) in paged.items():
        impls["ring_attn_paged" + ("" if page == 256 else str(page))] = \
            lambda kp=kp, vp=vp, table=table: ring_attn.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens,
                                                                                block_table=table, causal=True)
    try:
        from flash_attn import flash_attn_with_kvcache as fa_kvcache
    except Exception as exc:
        skipped["flash_attn"] = f"not importable ({type(exc).__name__})"
    else:
        impls["flash_attn"] = lambda: fa_kvcache(q, kc, vc, cache_seqlens=lens, causal=True)
        if 256 in paged:
            kp, vp, table = paged[256]
            impls["flash_attn_paged"] = lambda: fa_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table,
                                                           causal=True)
    ref, _ = reference.attention(q.float(), kc.float(), vc.float(), None, True, compute_dtype=torch.float32)
    src = torch.empty(2 * kc.numel(), device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    return impls, (lambda: dst.copy_(src)), ref, skipped


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    if dev.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # the CPU path is a smoke test; bf16 tl.dot is broken in the interpreter
    env = environment()
    print(f"# {env.get('device')} | torch {env.get('torch')} | {env.get('date')} | {dtype}")
    rows = []
    for b, s, hq, hk, d in (SMALL_SHAPES if args.small else FULL_SHAPES):
        impls, copy, ref, skipped = build(b, s, hq, hk, d, dev, dtype)
        for name, why in skipped.items():
            print(f"{name}: skipped: {why}")
        kv_bytes = 2 * b * s * hk * d * torch.empty(0, dtype=dtype).element_size()
        copy_ms = time_ms(copy, rep=args.rep)
        copy_gbs = 2 * kv_bytes / (copy_ms * 1e-3) / 1e9  # the copy reads and writes kv_bytes
        shape = f"{b}x{s} {hq}/{hk} d{d}"
        for name, fn in impls.items():
            try:
                err = (fn().float() - ref).abs().max().item()
                ms = time_ms(fn, rep=args.rep)
            except Exception as exc:  # a peer that cannot run the shape is reported, not fatal
                print(f"{name} on {shape}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            gbs = kv_bytes / (ms * 1e-3) / 1e9
            rows.append({"impl": name, "shape": shape, "us": ms * 1e3, "GB/s": gbs,
                         "of_copy": gbs / (copy_gbs / 2), "max_err": err, "dtype": str(dtype)[6:]})
        print_table([r for r in rows if r["shape"] == shape], ["impl", "shape", "us", "GB/s", "of_copy", "max_err"])
        print(f"copy: {copy_gbs / 2:.0f} GB/s read rate ({copy_ms * 1e3:.1f} us for {2 * kv_bytes / 1e9:.2f} GB "
              f"moved)\n")
        del impls
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    append_csv(out_dir() / args.csv, rows, env)
    return rows


if __name__ == "__main__":
    main()
