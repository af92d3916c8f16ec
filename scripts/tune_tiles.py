"""Autotune the forward tiles on this GPU and write them out as a tile table (``RING_ATTN_TILES`` format).

The shipped tiles are fixed (``ring_attn/backends/triton/tiles.py``) so that every process picks the same
ones; this times the candidates instead (``RING_ATTN_AUTOTUNE=1``, set here before ``ring_attn`` is
imported) at the benchmark shapes, causal and not, plain and MERGE, and writes the winners:

    python scripts/tune_tiles.py --out tuned.json        # then RING_ATTN_TILES=tuned.json ...

Ship a table by reviewing it into ``tiles._FWD_TABLE`` (with the compile report's numbers), or by
distributing the JSON with ``RING_ATTN_TILES`` set on every rank.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["RING_ATTN_AUTOTUNE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# (batch, seqlen, heads_q, heads_kv, head_dim): benchmarks/bench_attention.py's anchors, one per head dim
SHAPES = [(1, 16384, 32, 8, 128), (4, 4096, 32, 32, 64)]


def autotuner():
    """The forward's ``triton.autotune`` object, whose cache holds the winners (the launcher's ``fwd_kernel`` is
    the table wrapper around it, with no cache of its own)."""
    from ring_attn.backends.triton.attention_kernels import fwd_kernel

    return fwd_kernel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("--out: autotuning needs a CUDA GPU (none visible)")
    from ring_attn.backends.triton import attention as A
    from ring_attn.backends.triton import tiles

    dtype = getattr(torch, args.dtype)
    for b, s, hq, hkv, d in SHAPES:
        q = torch.randn(b, s, hq, d, device="cuda", dtype=dtype)
        k = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype)
        v = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype)
        lse = torch.empty(b, hq, s, device="cuda", dtype=torch.float32)
        for causal in (True, False):
            for merge in (False, True):
                out = torch.zeros(b, s, hq, d, device="cuda", dtype=torch.float32 if merge else dtype)
                lse.fill_(float("-inf"))
                A.attention_forward(q, k, v, out, lse, softmax_scale=d ** -0.5, causal=causal,
                                    causal_offset=None, seqs=None, merge=merge, window=(-1, -1), softcap=0.0)
        torch.cuda.synchronize()
    major, minor = torch.cuda.get_device_capability()
    recs = tiles.dump_tuned(autotuner(), args.out, arch=major * 10 + minor)
    for r in recs:
        print(r)
    print(f"{len(recs)} tuned forward tiles written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
