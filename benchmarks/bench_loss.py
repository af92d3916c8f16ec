"""Causal-LM loss at long context: time and peak memory of the output head + cross entropy, forward+backward.

Implementations, in the same run: ``torch`` (``lm_head`` matmul, then ``F.cross_entropy(logits.float())``, what
transformers' loss does), ``compile`` (the same under ``torch.compile``), ``ring_attn_logits`` (the matmul, then
``ring_attn.cross_entropy_sum``: no float32 copies), ``ring_attn_linear`` (``ring_attn.linear_cross_entropy_sum``:
no logits tensor) and ``liger`` (Liger-Kernel's fused linear cross entropy, when it can be imported). Default
shape: 16384 tokens, Llama 3's head (hidden 4096, vocabulary 128256), bf16. Peak memory is what one
forward+backward allocates on top of the inputs (CUDA only). Every loss is checked against ``torch``'s.

    PYTHONPATH=. python benchmarks/bench_loss.py                       # GPU, CSV under $OUT
    PYTHONPATH=. python benchmarks/bench_loss.py --quick --device cpu  # smoke run anywhere
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` and `ring_attn` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DTYPES, append_csv, environment, out_dir, print_table, time_ms  # noqa: E402

FULL = dict(tokens=16384, hidden=4096, vocab=128256)
QUICK = dict(tokens=64, hidden=32, vocab=1000)
IMPLS = ("torch", "compile", "ring_attn_logits", "ring_attn_linear", "liger")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help=f"tiny shape {QUICK}, fp32 (smoke run)")
    p.add_argument("--tokens", type=int, default=None, help=f"rows (default {FULL['tokens']})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--skip", nargs="*", default=[], choices=IMPLS, help="implementations to leave out")
    p.add_argument("--rep", type=int, default=20, help="timing repetitions (ms budget on GPU)")
    p.add_argument("--csv", default="bench_loss.csv", help="file name under $OUT (or ./bench_out)")
    args = p.parse_args(argv)
    if args.tokens is not None and args.tokens < 1:
        p.error(f"--tokens must be positive, got {args.tokens}")
    return args


def _implementations(skip) -> tuple[dict, dict]:
    import ring_attn

    F = torch.nn.functional

    def plain(h, w, t):
        return F.cross_entropy((h @ w.t()).float(), t, reduction="sum")

    impls = {
        "torch": plain,
        "ring_attn_logits": lambda h, w, t: ring_attn.cross_entropy_sum(h @ w.t(), t),
        "ring_attn_linear": ring_attn.linear_cross_entropy_sum,
    }
    skipped = {}
    if "compile" not in skip:
        impls["compile"] = torch.compile(plain)
    if "liger" not in skip:
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except Exception as exc:  # not installed, or no GPU build
            skipped["liger"] = f"not importable ({type(exc).__name__})"
        else:
            impls["liger"] = lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, reduction="sum")
    for name in skip:
        impls.pop(name, None)
        skipped.setdefault(name, "--skip")
    return impls, skipped


def run_one(fn, h, w, t, device, rep):
    """(ms of forward+backward, peak MB above the inputs or nan, the loss value)."""
    def step():
        h.grad = w.grad = None
        loss = fn(h, w, t)
        loss.backward()
        return loss

    loss = step()  # warm-up (and compilation)
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize()
        h.grad = w.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return time_ms(step, warmup=2, rep=rep), peak, float(loss.detach())


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    shape = dict(QUICK if args.quick else FULL)
    if args.tokens:
        shape["tokens"] = args.tokens
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" and not args.quick else "fp32")]
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(shape["tokens"], shape["hidden"], generator=g) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(shape["vocab"], shape["hidden"], generator=g) * shape["hidden"] ** -0.5).to(device, dtype)
    w.requires_grad_()
    t = torch.randint(0, shape["vocab"], (shape["tokens"],), generator=g).to(device)
    t[::7] = -100  # some ignored rows
    impls, skipped = _implementations(args.skip)
    env = environment()
    rows, ref = [], None
    for name, fn in impls.items():
        ms, peak, loss = run_one(fn, h, w, t, device, args.rep)
        ref = loss if name == "torch" else ref
        rows.append(dict(impl=name, tokens=shape["tokens"], vocab=shape["vocab"], hidden=shape["hidden"],
                         dtype=str(dtype).replace("torch.", ""), device=env["device"], ms=ms, peak_mb=peak,
                         loss_rel_diff=abs(loss - ref) / abs(ref) if ref else float("nan")))
    base = next((r["ms"] for r in rows if r["impl"] == "torch"), None)
    for r in rows:
        r["vs_torch"] = base / r["ms"] if base else float("nan")
    print(f"LM head + cross entropy, fwd+bwd: {shape}, {dtype}, {env['device']}")
    print_table(rows, ["impl", "tokens", "dtype", "ms", "vs_torch", "peak_mb", "loss_rel_diff"])
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    path = append_csv(out_dir() / args.csv, rows, env)
    print(f"CSV: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
