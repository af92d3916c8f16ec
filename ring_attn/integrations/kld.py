"""``ring-attn kld``: how far the patched model's next-token distributions are from the stock model's.

After llama.cpp's ``perplexity --kl-divergence`` statistics: both models (the stock one with transformers'
default attention, ``sdpa`` or, where the model has no sdpa path, ``eager``; then the same weights patched by
:func:`ring_attn.integrations.hf.patch_hf`, one device) read the same tokens in windows of ``--ctx`` tokens;
for every predicted token we compare ``p_stock`` and ``p_patched``:

* perplexity of each model, ``exp(mean NLL)``, with the standard error from the NLL's (``ppl * se(NLL)``);
* ``KL(p_stock || p_patched)`` in nats: mean with its standard error; median and 99th percentile with a 95%
  order-statistic (binomial) interval; max;
* top-1 agreement (argmax equal) with its binomial standard error.

``--model PATH`` reads a local transformers model directory (no hub access; ``--text FILE`` is tokenized with its
tokenizer); by default a random tiny Llama reads random tokens, which checks the kernels rather than a model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

__all__ = ["add_arguments", "run", "kl_statistics", "order_statistic_interval"]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _ctx(text: str) -> int:
    v = _positive_int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"--ctx must be at least 2 (one token predicts the next), got {v}")
    return v


def _model_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"--model {text!r} is not a directory (a local transformers model "
                                         f"directory with config.json; the hub is not used)")
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"--model {text!r} has no config.json")
    return text


def _text_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"--text {text!r} is not a file")
    return text


def _device(text: str) -> str:
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"--device {text!r} is not a device (expected cpu or cuda[:N])") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {text}: CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device {text!r}: expected cpu or cuda[:N]")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=_model_dir, default=None,
                        help="local transformers model directory (default: a random tiny Llama)")
    parser.add_argument("--text", type=_text_file, default=None,
                        help="text file to evaluate, tokenized with --model's tokenizer (default: random tokens)")
    parser.add_argument("--tokens", type=_positive_int, default=512, help="tokens to evaluate (default 512)")
    parser.add_argument("--ctx", type=_ctx, default=128, help="window length per forward pass (default 128)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="model dtype (default float32)")
    parser.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random model and tokens")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


# ---------------------------------------------------------------------------------------------------------
# Statistics


def order_statistic_interval(sorted_values: torch.Tensor, q: float, z: float = 1.96) -> tuple[float, float]:
    """95% distribution-free interval of the ``q`` quantile: the order statistics at ranks
    ``n q -/+ z sqrt(n q (1 - q))`` (normal approximation of the binomial count below the quantile)."""
    n = sorted_values.numel()
    half = z * math.sqrt(n * q * (1 - q))
    lo = min(n - 1, max(0, math.floor(n * q - half)))
    hi = min(n - 1, max(0, math.ceil(n * q + half)))
    return float(sorted_values[lo]), float(sorted_values[hi])


def kl_statistics(logp_stock: torch.Tensor, logp_patched: torch.Tensor, targets: torch.Tensor) -> dict:
    """Statistics of two models' next-token log-probabilities ``[n, vocab]`` (float) for targets ``[n]``.

    Returns a dict: ``n``; ``ppl_stock``/``ppl_patched`` each ``{"value", "se"}``; ``kl`` with ``mean``, ``se``
    (standard error of the mean), ``median``/``p99`` with 95% ``*_ci`` intervals, ``max``; ``top1_agreement``
    ``{"value", "se"}``.
    """
    lp_s, lp_p = logp_stock.double(), logp_patched.double()
    n = targets.numel()
    if n < 2:
        raise ValueError(f"need at least 2 predicted tokens, got {n}")
    kl = (lp_s.exp() * (lp_s - lp_p)).sum(-1).clamp_min(0)  # >= 0 up to rounding
    out = {"n": n}
    for name, lp in (("ppl_stock", lp_s), ("ppl_patched", lp_p)):
        nll = -lp.gather(1, targets[:, None]).squeeze(1)
        ppl = math.exp(nll.mean().item())
        out[name] = {"value": ppl, "se": ppl * nll.std().item() / math.sqrt(n)}
    srt = kl.sort().values
    out["kl"] = {"mean": kl.mean().item(), "se": kl.std().item() / math.sqrt(n),
                 "median": srt.quantile(0.5).item(), "median_ci": order_statistic_interval(srt, 0.5),
                 "p99": srt.quantile(0.99).item(), "p99_ci": order_statistic_interval(srt, 0.99),
                 "max": srt[-1].item()}
    agree = (lp_s.argmax(-1) == lp_p.argmax(-1)).double()
    p = agree.mean().item()
    out["top1_agreement"] = {"value": p, "se": math.sqrt(max(p * (1 - p), 0.0) / n)}
    return out


def format_statistics(s: dict, title: str) -> str:
    k = s["kl"]
    return "\n".join([
        title,
        f"tokens predicted      {s['n']}",
        f"perplexity stock      {s['ppl_stock']['value']:.6f} +/- {s['ppl_stock']['se']:.6f}",
        f"perplexity patched    {s['ppl_patched']['value']:.6f} +/- {s['ppl_patched']['se']:.6f}",
        f"KL mean (nats)        {k['mean']:.3e} +/- {k['se']:.3e}",
        f"KL median             {k['median']:.3e}  (95% CI {k['median_ci'][0]:.3e} .. {k['median_ci'][1]:.3e})",
        f"KL p99                {k['p99']:.3e}  (95% CI {k['p99_ci'][0]:.3e} .. {k['p99_ci'][1]:.3e})",
        f"KL max                {k['max']:.3e}",
        f"top-1 agreement       {100 * s['top1_agreement']['value']:.3f}% +/- "
        f"{100 * s['top1_agreement']['se']:.3f}%",
    ])


# ---------------------------------------------------------------------------------------------------------
# Running the models


class Progress:
    """A one-line progress bar on stderr (``done/total``, rate, an optional note)."""

    def __init__(self, total: int, label: str, enabled: bool = True, unit: str = "tok"):
        self.total, self.label, self.enabled, self.unit = total, label, enabled, unit
        self.done, self.t0 = 0, time.monotonic()

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        frac = min(1.0, self.done / max(1, self.total))
        rate = self.done / max(1e-9, time.monotonic() - self.t0)
        bar = "#" * int(24 * frac)
        sys.stderr.write(f"\r{self.label} [{bar:<24}] {self.done}/{self.total} {self.unit} "
                         f"{rate:,.0f} {self.unit}/s {note}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _tiny_llama(seed: int):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _load(args, device, dtype):
    import transformers

    if args.model is None:
        model = _tiny_llama(args.seed)
        title = "random tiny Llama (2 layers, hidden 64, vocab 256)"
    else:
        # transformers' default attention: sdpa where the model supports it, else eager (Gemma 2's soft-capping)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
        title = args.model
    model = model.to(device=device, dtype=dtype).eval()
    if args.text is not None:
        if args.model is None:
            raise SystemExit("ring-attn kld: error: --text needs --model (a tokenizer)")
        tok = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        with open(args.text, encoding="utf-8") as f:
            ids = tok(f.read(), return_tensors="pt").input_ids[0][: args.tokens]
    else:
        g = torch.Generator().manual_seed(args.seed + 1)
        ids = torch.randint(0, model.config.vocab_size, (args.tokens,), generator=g)
    return model, ids, title


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor, ctx: int, device, progress: Progress) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities (float32, on CPU) of every window of ``ctx`` tokens, and their targets."""
    lps, tgts = [], []
    for start in range(0, ids.numel() - 1, ctx):
        window = ids[start:start + ctx + 1]
        if window.numel() < 2:
            break
        logits = model(window[:-1][None].to(device), use_cache=False).logits[0]
        lps.append(torch.log_softmax(logits.float(), -1).cpu())
        tgts.append(window[1:])
        progress.update(window.numel() - 1)
    return torch.cat(lps), torch.cat(tgts)


def run(args: argparse.Namespace) -> int:
    from ring_attn.integrations import hf

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    model, ids, title = _load(args, device, dtype)
    if ids.numel() < 3:
        raise SystemExit(f"ring-attn kld: error: only {ids.numel()} tokens to evaluate; need at least 3")
    n_pred = ids.numel() - 1
    stock = model.config._attn_implementation
    show = not args.no_progress
    bar = Progress(n_pred, "stock  ", show)
    lp_stock, targets = _logprobs(model, ids, args.ctx, device, bar)
    bar.close()
    with hf.patch_hf(model):
        bar = Progress(n_pred, "patched", show)
        lp_patched, _ = _logprobs(model, ids, args.ctx, device, bar)
        bar.close()
    stats = kl_statistics(lp_stock, lp_patched, targets)
    stats.update(model=title, stock_attention=stock, dtype=args.dtype, device=str(device), ctx=args.ctx)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(format_statistics(stats, f"KL divergence, stock ({stock}) vs ring_attn: {title}, {args.dtype}, "
                                       f"{device}, windows of {args.ctx}"))
    return 0
