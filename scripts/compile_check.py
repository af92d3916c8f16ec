"""Compile the attention kernels for a GPU target on a machine without a GPU, and print the compiler's
resource report (registers, spills, shared memory) for each configuration.

The Triton interpreter accepts code the real compiler rejects (loop-carried type changes, unsupported
layouts), and says nothing about registers or shared memory; this catches both at no device cost:

    python scripts/compile_check.py                 # sm_90 (H100/H200)
    python scripts/compile_check.py --arch 80       # A100

Must run WITHOUT TRITON_INTERPRET set.
"""
from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ring_attn.backends.triton import attention_kernels as K  # noqa: E402
from ring_attn.backends.triton.attention import bwd_blocks  # noqa: E402


def _signature(fn, dtype, constexprs, int64_names=()):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.isupper() and name.startswith(("SQ_", "SK_")):
            sig[name] = "*i32"
        elif name in ("LSE", "DELTA", "DLSE") or (name in ("DQ", "DK", "DV") and constexprs.get("ACCUMULATE")):
            sig[name] = "*fp32"
        elif name.isupper():
            sig[name] = f"*{dtype}"
        elif name in ("qk_scale", "sm_scale", "softcap_in", "softcap_out"):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in int64_names else "i32"
    return sig


def compile_one(jit_fn, dtype, constexprs, arch, num_warps, num_stages):
    # window/softcap/interpreter-bf16 flags default to off (the plain kernels) unless a caller sets them
    constexprs = {**{n: False for n in ("LOCAL", "SOFTCAP", "UPCAST", "ROUND_BF16") if n in jit_fn.arg_names},
                  **constexprs}
    src = ASTSource(jit_fn, _signature(jit_fn, dtype, constexprs), constexprs)
    target = GPUTarget("cuda", arch, 32)
    k = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm.get("ptx", "")
    return {**_resource_usage(k.asm["cubin"]), "smem_bytes": k.metadata.shared,
            "mma": "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")}


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack (spill) bytes from cuobjdump, shipped with Triton's NVIDIA backend."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return {"regs": int(regs.group(1)) if regs else None, "stack_bytes": int(stack.group(1)) if stack else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args(argv)
    fwd = K.fwd_kernel.fn  # the JITFunction under the autotuner
    fails = 0
    for d in (64, 128, 256):
        bd = max(16, 1 << (d - 1).bit_length())
        for causal in (True, False):
            for cfg in K.fwd_kernel.configs:
                c = dict(HEAD_DIM=d, BLOCK_D=bd, CAUSAL=causal, VARLEN=False, BOTTOM_RIGHT=True, MERGE=causal,
                         DOT_PRECISION="ieee" if args.dtype == "fp32" else "tf32", **cfg.kwargs)
                if d > 128 and cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] > 128 * 64:
                    continue
                try:
                    r = compile_one(fwd, args.dtype, c, args.arch, cfg.num_warps, cfg.num_stages)
                    print(f"fwd d={d} causal={causal} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: {r}")
                except Exception as exc:
                    fails += 1
                    print(f"fwd d={d} causal={causal} {cfg.kwargs}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        blocks = bwd_blocks(d)
        for name, kern, (bm, bn) in (("dkdv", K.bwd_dkdv_kernel, blocks["dkdv"]), ("dq", K.bwd_dq_kernel,
                                                                               blocks["dq"])):
            for acc in (False, True):
                c = dict(HEAD_DIM=d, BLOCK_D=bd, CAUSAL=True, VARLEN=False, BOTTOM_RIGHT=True, ACCUMULATE=acc,
                         DOT_PRECISION="ieee" if args.dtype == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn)
                try:
                    r = compile_one(kern, args.dtype, c, args.arch, blocks["num_warps"], blocks["num_stages"])
                    print(f"{name} d={d} acc={acc} M{bm} N{bn}: {r}")
                except Exception as exc:
                    fails += 1
                    print(f"{name} d={d} acc={acc}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
