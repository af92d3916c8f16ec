"""``ring-attn kld``: how far the patched model's next-token distributions are from the stock model's.

After llama.cpp's ``perplexity --kl-divergence`` statistics: both models (the stock one with transformers'
default attention, ``sdpa`` or, where the model has no sdpa path, ``eager``; then the same weights patched by
:func:`ring_attn.integrations.hf.patch_hf`, one device) read the same tokens in windows of ``--ctx`` tokens;
window by window (the stock model, then the same window patched), and for every predicted token we compare
``p_stock`` and ``p_patched``, from the logits in float64 (a float32 log-softmax alone would add KL noise of
about 1e-8 nats, larger than what it measures):

* perplexity of each model, ``exp(mean NLL)``, with the standard error from the NLL's (``ppl * se(NLL)``);
* ``KL(p_stock || p_patched)`` in nats: mean with its standard error; median and 99th percentile with a 95%
  order-statistic (binomial) interval; max;
* top-1 agreement (argmax equal) with its binomial standard error.

``--model PATH`` reads a local transformers model directory (no hub access; ``--text FILE`` is tokenized with its
tokenizer); by default a random tiny Llama reads random tokens, which checks the kernels rather than a model.
Memory: one window's logits at a time, plus a few float64 numbers per predicted token.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from ring_attn._cli_support import json_safe, physical_memory

__all__ = ["add_arguments", "check_args", "run", "kl_statistics", "token_statistics", "summarize",
           "order_statistic_interval"]

_SEED_LIMIT = 2 ** 63  # torch.manual_seed's range
_BYTES_PER_TOKEN = 80  # host memory per evaluated token: its id, the per-token float64 statistics, their sorts


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
    parser.add_argument("--tokens", type=_positive_int, default=512,
                        help="tokens to evaluate, at least 3 (default 512)")
    parser.add_argument("--ctx", type=_ctx, default=128, help="window length per forward pass (default 128)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="model dtype (default float32)")
    parser.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random model and tokens (0 <= seed < 2^63)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress on stderr (neither ours nor transformers' loading bar)")


# ---------------------------------------------------------------------------------------------------------
# Argument checks (the parent process, before any model runs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _is_rope(config) -> bool:
    """Whether positions enter through RoPE (then a window past the trained length extrapolates) rather than a
    learned table of ``n_positions`` / ``max_position_embeddings`` rows (then it is out of range)."""
    return any(getattr(config, a, None) is not None for a in ("rope_theta", "rope_parameters", "rope_scaling"))


def check_args(args: argparse.Namespace) -> None:
    """Every flag, before a model is built: ranges (``--tokens`` >= 3 and within host memory, ``--seed``),
    ``--text`` only with ``--model``; the model directory's config (readable, a causal-LM ``model_type``) and, with
    ``--text``, its tokenizer and the text (UTF-8, at least 3 tokens, ids below the model's vocabulary); ``--ctx``
    within a learned position table. A ``--ctx`` past a RoPE model's ``max_position_embeddings`` is allowed (that
    is extrapolation, which the tool can measure) with a note on stderr. Stores the config as ``args.config`` and
    the text's token ids as ``args.token_ids`` (None for random tokens).

    Raises:
        ValueError naming the flag, the value and what is expected (``ring-attn`` prints it as one line, exit 2).
    """
    if args.tokens < 3:
        raise ValueError(f"--tokens {args.tokens}: expected an int >= 3 (at least two predicted tokens)")
    if not 0 <= args.seed < _SEED_LIMIT:
        raise ValueError(f"--seed {args.seed}: expected an int in [0, 2^63)")
    if args.text is not None and args.model is None:
        raise ValueError(f"--text {args.text}: needs --model (the text is tokenized with the model's tokenizer)")
    physical = physical_memory()
    if physical is not None and args.tokens * _BYTES_PER_TOKEN > physical:
        raise ValueError(f"--tokens {args.tokens}: the per-token statistics alone need "
                         f"{args.tokens * _BYTES_PER_TOKEN / 2**30:.3g} GiB, more than this machine's "
                         f"{physical / 2**30:.3g} GiB")
    import transformers

    if args.model is None:
        args.config, args.token_ids = _tiny_llama_config(), None
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(args.model, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any reason transformers cannot read it, as one line
            raise ValueError(f"--model {args.model}: transformers cannot read its config.json ({_first_line(exc)})")
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"--model {args.model}: model_type {config.model_type!r} has no causal-LM head in "
                             f"transformers (AutoModelForCausalLM); kld compares next-token distributions")
        args.config, args.token_ids = config, None
    config = args.config
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions and args.ctx > positions:
        if not _is_rope(config):
            raise ValueError(f"--ctx {args.ctx}: the model has {positions} learned positions "
                             f"({'n_positions' if getattr(config, 'n_positions', None) else 'max_position_embeddings'}"
                             f"); expected --ctx <= {positions}")
        print(f"ring-attn kld: note: --ctx {args.ctx} is past the model's max_position_embeddings {positions} "
              f"(RoPE extrapolation)", file=sys.stderr)
    if args.text is None:
        return
    try:
        tok = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any reason transformers cannot load it, as one line
        raise ValueError(f"--text needs --model {args.model}'s tokenizer, which transformers cannot load "
                         f"({_first_line(exc)})")
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"--text {args.text}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    ids = tok(text, return_tensors="pt").input_ids[0][: args.tokens]
    if ids.numel() < 3:
        raise ValueError(f"--text {args.text}: {ids.numel()} tokens after tokenization; expected at least 3")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(f"--text {args.text}: its tokenizer gives token id {int(ids.max())}, past --model "
                         f"{args.model}'s vocab_size {vocab} (a tokenizer of another model?)")
    if ids.numel() < args.tokens:
        print(f"ring-attn kld: note: --text {args.text} has {ids.numel()} tokens, fewer than --tokens "
              f"{args.tokens}: evaluating {ids.numel() - 1} predictions", file=sys.stderr)
    args.token_ids = ids


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


def token_statistics(logits_stock: torch.Tensor, logits_patched: torch.Tensor, targets: torch.Tensor,
                     rows: int = 256) -> dict:
    """Per predicted token, in float64 on the CPU: ``kl`` (``KL(p_stock || p_patched)``, nats), ``nll_stock``,
    ``nll_patched``, ``agree`` (1.0 where the argmaxes are equal) and ``finite_stock`` / ``finite_patched`` (the
    token's logits are all finite).

    ``logits_*``: ``[n, vocab]`` logits (or log-probabilities) of any float dtype, on any device; ``targets``:
    ``[n]`` int. The log-softmax runs in float64, ``rows`` tokens at a time (memory: a few ``rows x vocab``
    float64 buffers)."""
    n = targets.numel()
    out = {k: torch.empty(n, dtype=torch.float64) for k in ("kl", "nll_stock", "nll_patched", "agree")}
    out.update(finite_stock=torch.empty(n, dtype=torch.bool), finite_patched=torch.empty(n, dtype=torch.bool))
    for a in range(0, n, rows):
        b = min(n, a + rows)
        ls, lp = logits_stock[a:b].double(), logits_patched[a:b].double()
        out["finite_stock"][a:b] = torch.isfinite(ls).all(-1).cpu()
        out["finite_patched"][a:b] = torch.isfinite(lp).all(-1).cpu()
        ls, lp = torch.log_softmax(ls, -1), torch.log_softmax(lp, -1)
        t = targets[a:b].to(ls.device)[:, None]
        out["kl"][a:b] = (ls.exp() * (ls - lp)).sum(-1).cpu()
        out["nll_stock"][a:b] = -ls.gather(1, t).squeeze(1).cpu()
        out["nll_patched"][a:b] = -lp.gather(1, t).squeeze(1).cpu()
        out["agree"][a:b] = (ls.argmax(-1) == lp.argmax(-1)).double().cpu()
    return out


def _ppl(nll: torch.Tensor) -> dict:
    mean = nll.mean().item()
    ppl = math.exp(mean) if mean < 709.0 else math.inf  # past ~709 nats exp overflows a double
    return {"value": ppl, "se": ppl * nll.std().item() / math.sqrt(nll.numel())}


def summarize(per_token: dict) -> dict:
    """The statistics of :func:`token_statistics`' per-token values (all windows concatenated).

    Returns a dict: ``n``; ``ppl_stock``/``ppl_patched`` each ``{"value", "se"}`` (``inf`` past the double range);
    ``kl`` with ``mean``, ``se`` (standard error of the mean), ``median``/``p99`` with 95% ``*_ci`` intervals
    (widened, at small ``n``, to contain the interpolated estimate), ``max``, ``negative_fraction`` (tokens whose
    float64 KL rounds below 0, clamped to 0 in every other number); ``top1_agreement`` ``{"value", "se"}``."""
    raw = per_token["kl"]
    n = raw.numel()
    if n < 2:
        raise ValueError(f"need at least 2 predicted tokens, got {n}")
    kl = raw.clamp_min(0)  # >= 0 up to float64 rounding
    out = {"n": n, "ppl_stock": _ppl(per_token["nll_stock"]), "ppl_patched": _ppl(per_token["nll_patched"])}
    srt = kl.sort().values
    k = {"mean": kl.mean().item(), "se": kl.std().item() / math.sqrt(n)}
    for name, q in (("median", 0.5), ("p99", 0.99)):
        est = srt.quantile(q).item()
        lo, hi = order_statistic_interval(srt, q)
        k[name], k[name + "_ci"] = est, (min(lo, est), max(hi, est))
    k["max"] = srt[-1].item()
    k["negative_fraction"] = (raw < 0).double().mean().item()
    out["kl"] = k
    p = per_token["agree"].mean().item()
    out["top1_agreement"] = {"value": p, "se": math.sqrt(max(p * (1 - p), 0.0) / n)}
    return out


def kl_statistics(logp_stock: torch.Tensor, logp_patched: torch.Tensor, targets: torch.Tensor) -> dict:
    """:func:`summarize` of :func:`token_statistics` for two models' next-token logits or log-probabilities
    ``[n, vocab]`` (any float dtype; computed in float64) and targets ``[n]``."""
    return summarize(token_statistics(logp_stock, logp_patched, targets))


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
    """Progress on stderr (``done/total``, rate, an optional note): one line redrawn in place on a terminal;
    elsewhere (a log file, a pipe) a plain line at most every ``every_s`` seconds and at the end."""

    def __init__(self, total: int, label: str, enabled: bool = True, unit: str = "tok", every_s: float = 5.0):
        self.total, self.label, self.enabled, self.unit, self.every_s = total, label, enabled, unit, every_s
        self.done, self.t0, self.last = 0, time.monotonic(), -math.inf
        self.tty = enabled and sys.stderr.isatty()

    def _line(self, note: str) -> str:
        frac = min(1.0, self.done / max(1, self.total))
        rate = self.done / max(1e-9, time.monotonic() - self.t0)
        return (f"{self.label} [{'#' * int(24 * frac):<24}] {self.done}/{self.total} {self.unit} "
                f"{rate:,.0f} {self.unit}/s {note}")

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write(f"\r{self._line(note)}   ")
        elif time.monotonic() - self.last >= self.every_s or self.done >= self.total:
            self.last = time.monotonic()
            sys.stderr.write(self._line(note).rstrip() + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _tiny_llama_config():
    import transformers

    return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


class _LoadError(Exception):
    """The model's weights could not be loaded (checked only by loading them, in :func:`run`)."""


def _load(args, device, dtype):
    import transformers

    if args.model is None:
        torch.manual_seed(args.seed)
        model = transformers.LlamaForCausalLM(args.config)
        title = "random tiny Llama (2 layers, hidden 64, vocab 256)"
    else:
        # transformers' default attention: sdpa where the model supports it, else eager (Gemma 2's soft-capping)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - missing or corrupt weights, any reason: as one line
            raise _LoadError(f"--model {args.model}: transformers cannot load its weights ({_first_line(exc)})") \
                from None
        title = args.model
    model = model.to(device=device, dtype=dtype).eval()
    if args.token_ids is not None:
        ids = args.token_ids
    else:
        g = torch.Generator().manual_seed(args.seed + 1)
        ids = torch.randint(0, model.config.vocab_size, (args.tokens,), generator=g)
    return model, ids, title


@torch.no_grad()
def _compare(model, ids: torch.Tensor, ctx: int, device, progress: Progress) -> dict:
    """:func:`token_statistics` of every window of ``ctx`` tokens: the stock model, then the same window patched
    (patch and undo per window, so only one window's logits are ever held)."""
    from ring_attn.integrations import hf

    parts = []
    for start in range(0, ids.numel() - 1, ctx):
        window = ids[start:start + ctx + 1]
        if window.numel() < 2:
            break
        x = window[:-1][None].to(device)
        stock = model(x, use_cache=False).logits[0]
        with hf.patch_hf(model):
            patched = model(x, use_cache=False).logits[0]
        parts.append(token_statistics(stock, patched, window[1:]))
        del stock, patched
        progress.update(window.numel() - 1)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def run(args: argparse.Namespace) -> int:
    """Exit status 0 with the statistics; 1 with a one-line error when the model cannot be compared (its attention
    cannot be patched, or its logits are not finite)."""
    import transformers

    if not hasattr(args, "config"):  # called without the CLI's check_args
        check_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    show = not args.no_progress
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not show:
        transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar
    try:
        try:
            model, ids, title = _load(args, device, dtype)
        except _LoadError as exc:
            print(f"ring-attn kld: error: {exc}", file=sys.stderr)
            return 1
        stock = model.config._attn_implementation
        bar = Progress(ids.numel() - 1, "stock+patched", show)
        try:
            per_token = _compare(model, ids, args.ctx, device, bar)
        except (NotImplementedError, ValueError) as exc:  # e.g. attention the patch cannot replace
            print(f"ring-attn kld: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
        finally:
            bar.close()
    finally:
        if bars and not show:
            transformers.utils.logging.enable_progress_bar()
    n = per_token["kl"].numel()
    for who in ("stock", "patched"):
        bad = int((~per_token[f"finite_{who}"]).sum())
        if bad:
            other = "" if who == "stock" else " (the stock model's are finite there: a ring-attn bug, please report)"
            hint = f"; in {args.dtype} the model may overflow: try --dtype float32" if who == "stock" else ""
            print(f"ring-attn kld: error: the {who} model's logits are not finite at {bad} of {n} predicted tokens"
                  f"{other}{hint}", file=sys.stderr)
            return 1
    stats = summarize(per_token)
    stats.update(model=title, stock_attention=stock, dtype=args.dtype, device=str(device), ctx=args.ctx)
    if args.json:
        print(json.dumps(json_safe(stats), indent=2, allow_nan=False))
    else:
        print(format_statistics(stats, f"KL divergence, stock ({stock}) vs ring_attn: {title}, {args.dtype}, "
                                       f"{device}, windows of {args.ctx}"))
    return 0
