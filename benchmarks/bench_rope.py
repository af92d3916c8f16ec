"""RoPE benchmark: ring_attn.apply_rope against HF eager, HF under torch.compile and Liger-Kernel; and flash-attn's
rotary helper (``apply_rotary_emb``, cos/sin tables ``[s, d / 2]``, one call per tensor) as ring_attn.layers.rotary
runs it and, where installed, as flash-attn runs it.

Shape (the peers' shape, benchmarks/RESULTS.md): q [1, 32768, 32, 128] + k [1, 32768, 8, 128], bf16, forward and forward+backward. Every
implementation is reported as a share of the device-to-device copy bandwidth measured in the same run: the copy
of the same bytes (q and k, read once and written once) is the floor for a forward pass, twice that for
forward+backward. cos/sin tables (HF, Liger, apply_rope_cos_sin) are built once, outside the timing.

    PYTHONPATH=. python benchmarks/bench_rope.py                 # GPU: the peers' shape, CSV under $OUT
    PYTHONPATH=. python benchmarks/bench_rope.py --device cpu --small --skip compile   # smoke run anywhere
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` and `ring_attn` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DTYPES, append_csv, environment, out_dir, print_table, time_ms  # noqa: E402

FULL = dict(b=1, s=32768, hq=32, hk=8, d=128)
SMALL = dict(b=1, s=8, hq=2, hk=1, d=16)
IMPLS = ("ring_attn", "ring_attn_cos_sin", "ring_attn_rotary", "hf_eager", "compile", "liger", "flash_attn")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help=f"tiny shape {SMALL} for a smoke run")
    for key in FULL:
        p.add_argument(f"--{key}", type=int, default=None, help=f"override {key} (default {FULL[key]})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--theta", type=float, default=5e5)
    p.add_argument("--skip", nargs="*", default=[], choices=IMPLS, help="implementations to leave out")
    p.add_argument("--csv", default="bench_rope.csv", help="file name under $OUT (or ./bench_out)")
    return p.parse_args(argv)


def shape_of(args) -> dict:
    shape = dict(SMALL if args.small else FULL)
    for key in shape:
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    return shape


def _fwd_bwd(fn, q, k, gq, gk):
    """Forward+backward closure: grads wrt q and k (torch.autograd.grad: no .grad accumulation between reps)."""

    def run():
        qo, ko = fn(q, k)
        return torch.autograd.grad((qo, ko), (q, k), (gq, gk))

    return run


def build(args, shape):
    """Every implementation as ``name -> (forward closure, forward+backward closure)``, plus the copy and the
    inputs (for the correctness check)."""
    from ring_attn import apply_rope, apply_rope_cos_sin, reference, rope_scaling

    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    b, s, hq, hk, d = (shape[x] for x in ("b", "s", "hq", "hk", "d"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, s, hq, d, generator=g).to(dev, dtype)  # [b, s, h, d]: ring_attn's layout
    k = torch.randn(b, s, hk, d, generator=g).to(dev, dtype)
    qh = q.transpose(1, 2).contiguous()  # [b, h, s, d]: HF's attention layout, for HF / Liger
    kh = k.transpose(1, 2).contiguous()
    positions = torch.arange(s, device=dev)
    inv_freq, scale = rope_scaling.rope_parameters("default", d, args.theta)
    inv_freq = inv_freq.to(dev)
    cos, sin = reference.rope_table(positions[None], inv_freq, scale, dtype=dtype)  # [1, s, d], HF's tables
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    gqh, gkh = gq.transpose(1, 2).contiguous(), gk.transpose(1, 2).contiguous()
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731

    impls: dict[str, tuple] = {}
    skipped: dict[str, str] = {}

    def ours(q_, k_):
        return apply_rope(q_, k_, positions, inv_freq, scale)

    impls["ring_attn"] = (lambda: ours(q, k), _fwd_bwd(ours, leaf(q), leaf(k), gq, gk))

    def ours_tables(q_, k_):
        return apply_rope_cos_sin(q_, k_, cos, sin)

    impls["ring_attn_cos_sin"] = (lambda: ours_tables(qh, kh), _fwd_bwd(ours_tables, leaf(qh), leaf(kh), gqh, gkh))

    # flash-attn's rotary helper (tables [s, d / 2], one call per tensor), ring_attn's and flash-attn's own
    from ring_attn.layers.rotary import apply_rotary_emb

    cos2, sin2 = cos[0, :, : d // 2].contiguous(), sin[0, :, : d // 2].contiguous()

    def flash_style(rotary):
        return lambda q_, k_: (rotary(q_, cos2, sin2), rotary(k_, cos2, sin2))

    impls["ring_attn_rotary"] = (lambda: flash_style(apply_rotary_emb)(q, k),
                                 _fwd_bwd(flash_style(apply_rotary_emb), leaf(q), leaf(k), gq, gk))
    if "flash_attn" not in args.skip:
        try:
            from flash_attn.layers.rotary import apply_rotary_emb as fa_rotary
        except Exception as exc:
            skipped["flash_attn"] = f"not importable ({type(exc).__name__})"
        else:
            impls["flash_attn"] = (lambda: flash_style(fa_rotary)(q, k),
                                   _fwd_bwd(flash_style(fa_rotary), leaf(q), leaf(k), gq, gk))

    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except Exception as exc:  # transformers missing or changed
        apply_rotary_pos_emb = None
        skipped["hf_eager"] = skipped["compile"] = f"transformers: {type(exc).__name__}: {exc}"
    if apply_rotary_pos_emb is not None:
        hf = lambda q_, k_: apply_rotary_pos_emb(q_, k_, cos, sin)  # noqa: E731
        impls["hf_eager"] = (lambda: hf(qh, kh), _fwd_bwd(hf, leaf(qh), leaf(kh), gqh, gkh))
        if "compile" not in args.skip:
            compiled = torch.compile(apply_rotary_pos_emb)
            hfc = lambda q_, k_: compiled(q_, k_, cos, sin)  # noqa: E731
            impls["hf_compile"] = (lambda: hfc(qh, kh), _fwd_bwd(hfc, leaf(qh), leaf(kh), gqh, gkh))
    if "liger" not in args.skip:
        try:
            from liger_kernel.transformers.rope import liger_rotary_pos_emb
        except Exception as exc:
            skipped["liger"] = f"not importable ({type(exc).__name__})"
        else:
            lg = lambda q_, k_: liger_rotary_pos_emb(q_, k_, cos, sin)  # noqa: E731
            impls["liger"] = (lambda: lg(qh, kh), _fwd_bwd(lg, leaf(qh), leaf(kh), gqh, gkh))
    for name in args.skip:
        impls.pop(name, None)
        impls.pop("hf_" + name, None)
        skipped.setdefault(name, "--skip")

    # copy of the same bytes (q and k together): the bandwidth ceiling of a pass that reads and writes them once
    src = torch.empty(q.numel() + k.numel(), device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    check = dict(q=q, k=k, qh=qh, kh=kh, positions=positions, inv_freq=inv_freq, scale=scale, cos=cos, sin=sin)
    return impls, copy, skipped, check


def correctness(impls, check) -> dict:
    """Max |difference| of each implementation's forward against ring_attn's (all in the bench dtype)."""
    from ring_attn import reference

    want_q, _ = reference.rope(check["q"], check["k"], check["positions"], check["inv_freq"], check["scale"])
    errs = {}
    for name, (fwd, _) in impls.items():
        q_out = fwd()[0]
        if q_out.shape != want_q.shape:  # HF layout [b, h, s, d]
            q_out = q_out.transpose(1, 2)
        errs[name] = (q_out.double() - want_q.to(q_out.device)).abs().max().item()
    return errs


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    shape = shape_of(args)
    impls, copy, skipped, check = build(args, shape)
    elem = torch.finfo(DTYPES[args.dtype]).bits // 8
    n = shape["b"] * shape["s"] * (shape["hq"] + shape["hk"]) * shape["d"]
    traffic = 2 * n * elem  # read q and k, write q and k
    errs = correctness(impls, check)

    copy_ms = time_ms(copy)
    rows = [dict(impl="copy", pass_="copy", ms=copy_ms, gb_s=traffic / copy_ms / 1e6, share_of_copy=1.0,
                 max_err_vs_fp64=0.0)]
    for name, (fwd, fwd_bwd) in impls.items():
        for pass_, fn, passes in (("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 2)):
            ms = time_ms(fn)
            rows.append(dict(impl=name, pass_=pass_, ms=ms, gb_s=passes * traffic / ms / 1e6,
                             share_of_copy=passes * copy_ms / ms, max_err_vs_fp64=errs[name]))
    shape_txt = (f"q [{shape['b']}, {shape['s']}, {shape['hq']}, {shape['d']}] + "
                 f"k [{shape['b']}, {shape['s']}, {shape['hk']}, {shape['d']}] {args.dtype} on {args.device}")
    print(f"RoPE, {shape_txt}; minimum traffic {traffic / 1e6:.0f} MB per pass")
    for row in rows:
        row.update(shape=shape_txt, pass_name=row.pop("pass_"))
    print_table(rows, ["impl", "pass_name", "ms", "gb_s", "share_of_copy", "max_err_vs_fp64"])
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    path = append_csv(out_dir() / args.csv, rows, environment())
    print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
