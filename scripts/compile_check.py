"""Compile the attention kernels for a GPU target on a machine without a GPU, exactly as the launcher's JIT
would specialise them at the benchmark shapes, and report what the compiler made of each configuration.

The Triton interpreter accepts code the real compiler rejects and says nothing about registers or shared
memory. This script calls the real host launchers (``ring_attn.backends.triton.attention``) on CPU tensors of
the benchmark shapes with the kernels swapped for recorders, so the recorded arguments are the ones a GPU run
passes (strides, lengths, GQA group, constexprs). It then binds them with Triton's own JIT binder
(``create_function_from_signature`` + ``JITFunction._pack_args``, the code path of ``JITFunction.run``), which
computes the launch's specialisation: pointer alignment / integers divisible by 16 (``tt.divisibility``) and
integers equal to 1 as constants. The result is compiled for the target with ``triton.compile``. Reported per
kernel and config: registers, spill (stack) bytes, shared memory (the pipelined allocation Triton requests
at launch), wgmma instruction shapes with counts, whether loads use TMA (``cp.async.bulk.tensor``) or
``cp.async``, and configs over the target's shared-memory limit.

    python scripts/compile_check.py                         # sm_90, every case, a table
    python scripts/compile_check.py --json                  # the same as a list of JSON records
    python scripts/compile_check.py --cases fwd-d128 --all-configs   # every autotune candidate too
    python scripts/compile_check.py --arch 80               # A100
    python scripts/compile_check.py --cases rope rope-table # RoPE: registers, global ld/st widths, fp64 mix

Must run WITHOUT TRITON_INTERPRET set (the interpreter does not compile).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from ring_attn._contracts import Dropout, KVPages, VarlenSeqs  # noqa: E402
from ring_attn.backends.triton import attention as A  # noqa: E402
from ring_attn.backends.triton import attention_kernels as K  # noqa: E402
R = importlib.import_module("ring_attn.backends.triton.rope")  # the module: the package re-exports the function
from ring_attn.backends.triton import tiles as T  # noqa: E402

# name -> (b, s, h_q, h_kv, d, causal, dtype); the benchmark anchors (benchmarks/bench_attention.py) plus
# d=256 (the shared-memory edge). "merge" cases are the ring's steps (fp32 running out, fp64 running lse).
CASES = {
    "fwd-d128": dict(op="fwd", shape=(1, 16384, 32, 8, 128), causal=True, merge=False),
    "fwd-d128-merge": dict(op="fwd", shape=(1, 16384, 32, 8, 128), causal=True, merge=True),
    "fwd-d128-full": dict(op="fwd", shape=(1, 16384, 32, 32, 128), causal=False, merge=False),
    "fwd-d64": dict(op="fwd", shape=(4, 4096, 32, 32, 64), causal=True, merge=False),
    "fwd-d256": dict(op="fwd", shape=(1, 4096, 16, 16, 256), causal=True, merge=False),
    "bwd-d128": dict(op="bwd", shape=(1, 16384, 32, 8, 128), causal=True, accumulate=False),
    "bwd-d128-acc": dict(op="bwd", shape=(1, 16384, 32, 8, 128), causal=True, accumulate=True),
    "bwd-d64": dict(op="bwd", shape=(4, 4096, 32, 32, 64), causal=True, accumulate=False),
    "bwd-d256": dict(op="bwd", shape=(1, 4096, 16, 16, 256), causal=True, accumulate=False),
    # the 5-matmul backward: dK/dV's kernel adding dQ partials (RING_ATTN_BWD=fused: unordered atomics)
    "bwd-d128-fused": dict(op="bwd", shape=(1, 16384, 32, 8, 128), causal=True, accumulate=True,
                           env={"RING_ATTN_BWD": "fused"}),
    "bwd-d64-fused": dict(op="bwd", shape=(4, 4096, 32, 32, 64), causal=True, accumulate=True,
                          env={"RING_ATTN_BWD": "fused"}),
    # ... with dQ added in increasing key-block order (RING_ATTN_BWD=fused-ordered; deterministic)
    "bwd-d128-ordered": dict(op="bwd", shape=(1, 16384, 32, 8, 128), causal=True, accumulate=True,
                             env={"RING_ATTN_BWD": "fused-ordered"}),
    "bwd-d64-ordered": dict(op="bwd", shape=(4, 4096, 32, 32, 64), causal=True, accumulate=True,
                            env={"RING_ATTN_BWD": "fused-ordered"}),
}
# fused RoPE (angle mode, half-split pairing): q [1, 32768, 32, 128] + k [1, 32768, 8, 128]; "shape" is
# (b, s, h_q, h_kv, d) as above. A bandwidth-bound kernel: the report adds its global load/store mix.
CASES["rope"] = dict(op="rope", shape=(1, 32768, 32, 8, 128), causal=False)
CASES["rope-table"] = dict(op="rope", shape=(1, 32768, 32, 8, 128), causal=False, table=True)

# the forward on tensor descriptors with warp specialisation (RING_ATTN_FWD=tma; issue 9 item 3)
for _name in ("fwd-d128", "fwd-d128-merge", "fwd-d128-full", "fwd-d64"):
    CASES[_name + "-tma"] = dict(CASES[_name], env={"RING_ATTN_FWD": "tma"})
# ALiBi (the ALIBI constexpr on: the bias in every loop; fp32 slopes [b, h_q]): the non-default kernels
for _name in ("fwd-d128", "bwd-d128", "bwd-d64", "bwd-d128-fused"):
    CASES[_name + "-alibi"] = dict(CASES[_name], alibi=True)
# A small case for the test: compiles in seconds.
# decoding: one new token over a 32k-token cache (the 16-row decode tile, split-KV: SPLIT launches)
for _name, _d in (("fwd-d128-decode", 128), ("fwd-d64-decode", 64), ("fwd-d256-decode", 256)):
    CASES[_name] = dict(op="fwd", shape=(1, 1, 32, 8, _d), s_k=32768, causal=True, merge=False)
# attention dropout (the Philox mask in the loops)
for _name in ("fwd-d128", "bwd-d128", "bwd-d64", "fwd-d256", "bwd-d256", "fwd-d128-decode"):
    CASES[_name + "-dropout"] = dict(CASES[_name], dropout=True)
# a paged KV cache (flash-attn's block_table): pages of 256 rows (flash-attn's minimum; one table entry per key
# block) and of 16 rows (vLLM's default; a key block spans pages: rows gathered)
CASES["fwd-d128-decode-paged"] = dict(CASES["fwd-d128-decode"], paged=256)
CASES["fwd-d128-decode-paged16"] = dict(CASES["fwd-d128-decode"], paged=16)
CASES["tiny"] = dict(op="fwd", shape=(1, 256, 2, 2, 64), causal=True, merge=False)
CASES["tiny-decode"] = dict(op="fwd", shape=(1, 1, 2, 2, 64), s_k=4096, causal=True, merge=False)
CASES["tiny-tma"] = dict(CASES["tiny"], env={"RING_ATTN_FWD": "tma"})

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _Recorder:
    """Stands in for a kernel: ``rec[grid](*args, **kwargs)`` records the launch instead of running it;
    ``rec.fn`` (the JIT function under an autotuner) records the same way."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    @property
    def fn(self):
        return _Recorder(self.kernel.fn, self.log)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kernel, grid, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(log, arch):
    mods = (A, R)
    saved = {(m, n): getattr(m, n) for m in mods for n in dir(m)
             if isinstance(getattr(m, n), (JITFunction, Autotuner))}
    saved_arch = T.current_arch
    try:
        for (m, n), v in saved.items():
            setattr(m, n, _Recorder(v, log))
        T.current_arch = lambda: arch  # the launcher picks tiles for the target, not for this machine
        yield
    finally:
        for (m, n), v in saved.items():
            setattr(m, n, v)
        T.current_arch = saved_arch


def record_launches(case: dict, dtype: torch.dtype, arch: int = 90):
    """Run the host launcher of ``case`` on uninitialised CPU tensors and return its kernel launches."""
    b, s, hq, hkv, d = case["shape"]
    s_k = case.get("s_k", s)  # keys: as many as queries unless the case says (decoding)
    e = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt)  # noqa: E731
    q, k, v = e(b, s, hq, d), e(b, s_k, hkv, d), e(b, s_k, hkv, d)
    lse = e(b, hq, s, dt=torch.float64 if case.get("merge") else torch.float32)  # the ring merges into fp64
    alibi = e(b, hq, dt=torch.float32) if case.get("alibi") else None
    drop = Dropout(0.1, 2 ** 40 + 1, b * s, s_k) if case.get("dropout") else None
    log = []
    env = case.get("env", {})
    saved_env = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with _recording(log, arch):
            if case["op"] == "rope":
                half = d // 2
                tab = case.get("table", False)
                R.rope(q, k, torch.empty_like(q), torch.empty_like(k), rotary_dim=d, interleaved=False,
                       backward=False, copy_pass=False,
                       pos2=None if tab else torch.empty(1, s, dtype=torch.int64),
                       inv_freq=None if tab else torch.empty(half, dtype=torch.float32), scaling=1.0,
                       cos3=e(1, s, d) if tab else None, sin3=e(1, s, d) if tab else None,
                       qy4=None, ky4=None, dtheta=None)
            elif case["op"] == "fwd" and case.get("paged"):  # packed rows, keys through the page table
                page = case["paged"]
                i32 = lambda *shape: torch.zeros(*shape, dtype=torch.int32)  # noqa: E731
                seqs = VarlenSeqs(i32(b), i32(b) + s, i32(b), i32(b) + s_k, s, s_k, True)
                A.attention_forward(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), e(b * s, hq, d),
                                    e(hq, b * s, dt=torch.float32), softmax_scale=d ** -0.5, causal=case["causal"],
                                    causal_offset=None, seqs=seqs, merge=False, window=(-1, -1), softcap=0.0,
                                    alibi=alibi, dropout=drop, pages=KVPages(i32(b, s_k // page), page))
            elif case["op"] == "fwd":
                out = e(b, s, hq, d, dt=torch.float32 if case["merge"] else dtype)
                A.attention_forward(q, k, v, out, lse, softmax_scale=d ** -0.5, causal=case["causal"],
                                    causal_offset=None, seqs=None, merge=case["merge"], window=(-1, -1),
                                    softcap=0.0, alibi=alibi, dropout=drop)
            else:
                gdt = torch.float32 if case["accumulate"] else dtype
                A.attention_backward(e(b, s, hq, d), q, k, v, lse, e(b, hq, s, dt=torch.float32),
                                     e(b, s, hq, d, dt=gdt), e(b, s, hkv, d, dt=gdt), e(b, s, hkv, d, dt=gdt),
                                     softmax_scale=d ** -0.5, causal=case["causal"], causal_offset=None,
                                     seqs=None, accumulate=case["accumulate"], window=(-1, -1), softcap=0.0,
                                     alibi=alibi, dropout=drop)
    finally:
        for name, val in saved_env.items():
            if val is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = val
    return log


def _jit_fn(kernel):
    while isinstance(kernel, Autotuner) or hasattr(kernel, "fn") and not hasattr(kernel, "params"):
        kernel = kernel.fn
    return kernel


def compile_launch(kernel, args, kwargs, arch: int):
    """Compile one recorded launch for ``arch`` with the JIT's own specialisation; return the compiled
    kernel. ``kwargs`` holds the constexprs, including the tile config and num_warps/num_stages."""
    fn = _jit_fn(kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__), signature, attrs


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """What cuobjdump (shipped with Triton's NVIDIA backend) prints for ``cubin`` with ``flag``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack (spill) bytes from cuobjdump."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return {"regs": int(regs.group(1)) if regs else None, "spill_bytes": int(stack.group(1)) if stack else None}


def _sass_mix(cubin: bytes) -> dict:
    """Instruction mix of the machine code (SASS, from cuobjdump): total instructions, global loads/stores by
    width (``LDG.E.128`` = 16 bytes), fp64 arithmetic (DADD/DMUL/DFMA), conversions to/from 64-bit
    (F2I.S64/I2F.F64/F2F.F64...), special-function (MUFU) and multiply-high (IMAD.HI) instructions. Static
    counts, not executed ones."""
    text = _cuobjdump(cubin, "-sass")
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text)
    mem = Counter(o for o in ops if o.startswith(("LDG", "STG")))
    return {"sass_instructions": len(ops), "sass_gmem": dict(sorted(mem.items())),
            "sass_f64": sum(o.startswith(("DADD", "DMUL", "DFMA")) for o in ops),
            "sass_cvt64": sum(o.startswith(("F2I", "I2F", "F2F")) and "64" in o for o in ops),
            "sass_mufu": sum(o.startswith("MUFU") for o in ops),
            # 32-bit multiply-high: Philox's rounds (attention dropout), two per round per generated block
            "sass_imad_hi": sum(o.startswith("IMAD.HI") for o in ops)}


def analyse(ck, arch: int) -> dict:
    """Resource usage and instruction mix of a compiled kernel."""
    ptx = ck.asm.get("ptx", "")
    wgmma = Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))
    if "tcgen05.mma" in ptx:
        mma = "tcgen05"
    elif wgmma:
        mma = "wgmma"
    elif "mma.sync" in ptx:
        mma = "mma.sync"
    else:
        mma = "none"
    smem = ck.metadata.shared
    # global memory instruction mix (a bandwidth-bound kernel wants few, wide ones: .v4.b32 = 16 bytes)
    gmem = Counter(re.findall(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)", ptx))
    return {**_resource_usage(ck.asm["cubin"]), "smem_bytes": smem,
            "smem_over_limit": smem > T.smem_limit(arch), "mma": mma,
            "wgmma": dict(sorted(wgmma.items())),
            "mma_sync": len(re.findall(r"mma\.sync\.aligned", ptx)),
            "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
            # warp specialisation really applied: the program's warps grow (Hopper: a producer warpgroup
            # added) and registers are moved between warpgroups with setmaxnreg (inc/dec values listed)
            "warps": ck.metadata.num_warps,
            "setmaxnreg": sorted({f"{m.group(1)} {m.group(2)}" for m in
                                  re.finditer(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)}),
            "cp_async_loads": len(re.findall(r"cp\.async\.(?:ca|cg)\.shared", ptx)),
            "gmem": dict(sorted(gmem.items())),
            **_sass_mix(ck.asm["cubin"])}


def _cfg_name(c: dict) -> str:
    if "BLOCK_N" not in c:  # a kernel without attention tiles (RoPE, the split-KV combine): its block constexprs
        return " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in c.items())
    ws = {True: " ws", False: " no-ws"}.get(c.get("WARP_SPECIALIZE"), "")
    return f"M{c['BLOCK_M']} N{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}{ws}"


def configs_for(kernel, kwargs, all_configs):
    """(config dict, shipped) pairs to compile for one recorded launch: the tile the launch carries (the
    default table's), plus with ``all_configs`` the forward autotuner's candidates."""
    fields = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    out = []
    if all(f in kwargs for f in fields):
        out.append(({f: kwargs[f] for f in fields}, True))
    if "WARP_SPECIALIZE" in kwargs and out:  # the TMA forward: also its other warp-specialisation setting
        out[0][0]["WARP_SPECIALIZE"] = kwargs["WARP_SPECIALIZE"]
        if all_configs:
            out.append((dict(out[0][0], WARP_SPECIALIZE=not kwargs["WARP_SPECIALIZE"]), False))
            for bm, bn, w, s in ((128, 128, 4, 2), (128, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 3)):
                for ws in (True, False):
                    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, WARP_SPECIALIZE=ws)
                    if cfg not in [o[0] for o in out]:
                        out.append((cfg, False))
    fn = _jit_fn(kernel)
    if not out and not isinstance(getattr(K, fn.__name__, None), Autotuner):  # e.g. RoPE: the launch as is
        return [({k: v for k, v in kwargs.items() if k.startswith("BLOCK_") or k == "num_warps"}, True)]
    tuner = getattr(K, fn.__name__, None)
    if isinstance(tuner, Autotuner) and (all_configs or not out):
        for c in tuner.configs:
            cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            if cfg not in [o[0] for o in out]:
                out.append((cfg, False))
    return out


def run_case(name: str, dtype_name: str, arch: int, all_configs: bool, only_shipped_bwd=True):
    case = CASES[name]
    records = []
    for kernel, grid, args, kwargs in record_launches(case, DTYPES[dtype_name], arch):
        kname = _jit_fn(kernel).__name__
        for cfg, shipped in configs_for(kernel, kwargs, all_configs):
            kw = dict(kwargs)
            kw.update(cfg)
            rec = {"case": name, "kernel": kname, "config": _cfg_name(cfg), "shipped": shipped,
                   "dtype": dtype_name, "arch": arch, "head_dim": case["shape"][4], "causal": case["causal"],
                   "merge": case.get("merge", False), "accumulate": case.get("accumulate", False),
                   # split-KV launches: the grid's third axis (key ranges) at the target's SM count
                   "split_kv": (grid(kw)[2] if callable(grid) else grid[2]) if kwargs.get("SPLIT") else 1}
            t0 = time.time()
            try:
                ck, signature, attrs = compile_launch(kernel, args, kw, arch)
                rec.update(analyse(ck, arch))
                fn = _jit_fn(kernel)
                rec["specialised"] = {
                    "divisible_by_16": [fn.arg_names[p[0]] for p, a in attrs.items() if a],
                    "const_1": [n for n, t in signature.items() if t == "constexpr"
                                and n not in fn.constexprs_names] if hasattr(fn, "constexprs_names") else
                    [fn.arg_names[i] for i, n in enumerate(fn.arg_names)
                     if signature[n] == "constexpr" and not fn.params[i].is_constexpr]}
                if "BLOCK_N" in cfg:
                    rec["smem_estimate"] = T.smem_estimate(cfg, case["shape"][4], dtype_name, kname)
                    rec["fits_estimate"] = T.fits(cfg, case["shape"][4], dtype_name, arch, kname)
            except Exception as exc:  # report and go on: one failing config must not hide the others
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rec["compile_s"] = round(time.time() - t0, 1)
            records.append(rec)
    return records


def _fmt_wgmma(w: dict) -> str:
    return " ".join(f"{k}×{v}" for k, v in w.items()) or "-"


def print_rope_table(records):
    print("| case | kernel | config | regs | spill B | SASS instr | global ld/st (SASS) | fp64 ops | cvt 64-bit "
          "| MUFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if "error" in r:
            print(f"| {r['case']} | {r['kernel']} | {r['config']} | | | | | | | FAILED {r['error'][:80]} |")
            continue
        mem = " ".join(f"{k}×{v}" for k, v in r["sass_gmem"].items())
        print(f"| {r['case']} | {r['kernel']} | {r['config']} | {r['regs']} | {r['spill_bytes']} "
              f"| {r['sass_instructions']} | {mem} | {r['sass_f64']} | {r['sass_cvt64']} | {r['sass_mufu']} |")


def _kb(n) -> str:
    return "-" if n is None else f"{n / 1024:.0f}"


def print_table(records):
    rope = [r for r in records if r["kernel"] == "rope_kernel"]
    records = [r for r in records if r["kernel"] != "rope_kernel"]
    if rope:
        print_rope_table(rope)
        if not records:
            return
        print()
    print("| case | kernel | config | shipped | regs | spill B | smem KB (est) | wgmma | TMA/cp.async | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if "error" in r:
            print(f"| {r['case']} | {r['kernel']} | {r['config']} | {'yes' if r['shipped'] else ''} "
                  f"| | | | | | FAILED {r['error'][:80]} |")
            continue
        note = "OVER SMEM LIMIT" if r["smem_over_limit"] else ("spills" if r["spill_bytes"] else "")
        if r.get("split_kv", 1) > 1:
            note = (note + " " if note else "") + f"split-KV: {r['split_kv']} key ranges"
        if r.get("setmaxnreg"):
            note = (note + " " if note else "") + f"warp-specialised: {r['warps']} warps, setmaxnreg " + \
                ", ".join(r["setmaxnreg"])
        print(f"| {r['case']} | {r['kernel']} | {r['config']} | {'yes' if r['shipped'] else ''} | {r['regs']} "
              f"| {r['spill_bytes']} | {r['smem_bytes'] / 1024:.0f} ({_kb(r.get('smem_estimate'))}) "
              f"| {_fmt_wgmma(r['wgmma'])} | {r['tma_loads']}/{r['cp_async_loads']} | {note} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--cases", nargs="+", default=[c for c in CASES if not c.startswith("tiny")],
                    help=f"subset of {sorted(CASES)}")
    ap.add_argument("--all-configs", action="store_true",
                    help="also compile every forward autotune candidate, not only the shipped tile")
    ap.add_argument("--json", action="store_true", help="print a JSON list of records instead of a table")
    args = ap.parse_args(argv)
    for c in args.cases:
        if c not in CASES:
            ap.error(f"--cases: unknown case {c!r}; expected one of {sorted(CASES)}")
    records = []
    for c in args.cases:
        records += run_case(c, args.dtype, args.arch, args.all_configs)
        print(f"# {c}: done", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print_table(records)
    bad = [r for r in records if "error" in r or (r["shipped"] and (r["smem_over_limit"] or r["spill_bytes"]))]
    return 1 if any("error" in r for r in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
