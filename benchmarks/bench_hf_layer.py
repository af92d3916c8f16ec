"""HF LlamaDecoderLayer forward+backward: patched (ring_attn, one GPU) against sdpa and eager in the same run.

Default shape: Llama-3-8B sizes (hidden 4096, 32 query heads, 8 KV heads, head dim 128, MLP 14336), 8192 tokens,
batch 1, bf16 (the issue's anchor: 24.5 ms with sdpa, 83 ms eager on an H100). The rotary cos/sin come from the
model's rotary embedding once, outside the timing; the patched layer rotates with the fused kernel from the
same positions. ``--tiny-model`` times a whole tiny LlamaForCausalLM training step instead (the CPU number in
the README).

    PYTHONPATH=. python benchmarks/bench_hf_layer.py                   # GPU, CSV under $OUT
    PYTHONPATH=. python benchmarks/bench_hf_layer.py --quick           # tiny layer, any device (smoke test)
    PYTHONPATH=. python benchmarks/bench_hf_layer.py --tiny-model      # tiny model step, patched vs stock
    PYTHONPATH=. python benchmarks/bench_hf_layer.py --compile         # each layer under torch.compile (inductor)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` and `ring_attn` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DTYPES, append_csv, environment, out_dir, print_table, time_ms  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336)
QUICK = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
TINY_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
IMPLS = ("ring_attn", "sdpa", "eager")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help=f"tiny layer {QUICK}, 64 tokens, fp32 (smoke run)")
    p.add_argument("--tiny-model", action="store_true", help=f"whole tiny model step {TINY_MODEL}")
    p.add_argument("--seqlen", type=int, default=None, help="tokens (default 8192; --quick 64; --tiny-model 256)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--skip", nargs="*", default=[], choices=IMPLS, help="implementations to leave out")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="time every implementation under torch.compile(backend=BACKEND) (default inductor): the "
                        "patched layer compiles as one graph, like sdpa's")
    p.add_argument("--rep", type=int, default=50, help="timing repetitions (ms budget on GPU)")
    p.add_argument("--csv", default="bench_hf_layer.csv", help="file name under $OUT (or ./bench_out)")
    args = p.parse_args(argv)
    if args.seqlen is not None and args.seqlen < 1:
        p.error(f"--seqlen must be positive, got {args.seqlen}")
    return args


def _config(sizes: dict, impl: str):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=sizes.get("vocab_size", 128), num_hidden_layers=sizes.get(
        "num_hidden_layers", 1), max_position_embeddings=131072, rope_theta=500000.0,
        **{k: v for k, v in sizes.items() if k not in ("vocab_size", "num_hidden_layers")})
    cfg._attn_implementation = impl
    return cfg


def bench_layer(impl: str, sizes: dict, seqlen: int, dtype, device, rep: int, compile_backend=None) -> float:
    """Median ms of one decoder layer's forward + backward with ``impl`` (compiled with ``compile_backend``)."""
    import transformers
    from transformers.models.llama import modeling_llama

    from ring_attn.integrations import hf

    cfg = _config(sizes, "sdpa" if impl == "ring_attn" else impl)
    torch.manual_seed(0)
    layer = modeling_llama.LlamaDecoderLayer(cfg, layer_idx=0).to(device=device, dtype=dtype)
    rotary = modeling_llama.LlamaRotaryEmbedding(cfg).to(device)
    x = torch.randn(1, seqlen, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    pos = torch.arange(seqlen, device=device)[None]
    dy = torch.randn_like(x)
    handle = hf.patch_hf() if impl == "ring_attn" else None
    try:
        if handle is not None:
            cfg._attn_implementation = "ring_attn"
        emb = rotary(x, pos)  # tagged for the fused kernel when patched
        run = layer if compile_backend is None else torch.compile(layer, backend=compile_backend)

        def step():
            out = run(x, attention_mask=None, position_ids=pos, position_embeddings=emb)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(dy)

        ms = time_ms(step, rep=rep)
    finally:
        if handle is not None:
            handle.undo()
    del transformers
    return ms


def bench_tiny_model(impl: str, seqlen: int, dtype, device, rep: int, compile_backend=None) -> float:
    """Median ms of one training step (forward, loss, backward) of a tiny LlamaForCausalLM."""
    import transformers

    from ring_attn.integrations import hf

    cfg = _config(TINY_MODEL, "sdpa" if impl == "ring_attn" else impl)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()
    ids = torch.randint(0, cfg.vocab_size, (1, seqlen), device=device)
    handle = hf.patch_hf(model) if impl == "ring_attn" else None
    try:
        run = model if compile_backend is None else torch.compile(model, backend=compile_backend)

        def step():
            run(ids, labels=ids, use_cache=False).loss.backward()

        ms = time_ms(step, rep=rep)
    finally:
        if handle is not None:
            handle.undo()
    return ms


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    small = args.quick or args.tiny_model
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" and not small else "fp32")]
    seqlen = args.seqlen or (64 if args.quick else 256 if args.tiny_model else 8192)
    sizes = QUICK if args.quick else LLAMA3_8B
    env = environment()
    what = "tiny LlamaForCausalLM step" if args.tiny_model else "LlamaDecoderLayer fwd+bwd"
    rows = []
    for impl in IMPLS:
        if impl in args.skip:
            continue
        torch._dynamo.reset()  # each implementation compiles from scratch
        if args.tiny_model:
            ms = bench_tiny_model(impl, seqlen, dtype, device, args.rep, args.compile)
        else:
            ms = bench_layer(impl, sizes, seqlen, dtype, device, args.rep, args.compile)
        rows.append(dict(bench=what, impl=impl, compiled=args.compile or "no", seqlen=seqlen,
                         dtype=str(dtype).replace("torch.", ""), device=env["device"], ms=ms))
    base = next((r["ms"] for r in rows if r["impl"] == "sdpa"), None)
    for r in rows:
        r["vs_sdpa"] = base / r["ms"] if base else float("nan")
    print(f"{what}: {sizes if not args.tiny_model else TINY_MODEL}, {seqlen} tokens, {dtype}, {env['device']}")
    print_table(rows, ["impl", "compiled", "seqlen", "dtype", "ms", "vs_sdpa"])
    path = append_csv(out_dir() / args.csv, rows, env)
    print(f"CSV: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
